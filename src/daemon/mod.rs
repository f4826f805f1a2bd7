//! The daemon: wires the parts together and owns the process lifecycle (spec §6, §8, §9).
//!
//! Start-up: metrics recorder, Redis manager (it keeps reconnecting in the background if
//! Redis is down), the MQTT source, the engine and the dispatcher, the HTTP endpoint. Then
//! one loop hands messages to the dispatcher until a signal says otherwise; it tells
//! systemd `READY=1` once MQTT is subscribed and starts the watchdog/status task.
//!
//! SIGHUP reloads routes, republish rules, `[limits]`, `[dead_letter]` and the log level
//! in place: the MQTT session stays up, the subscriptions follow the new cover, and
//! messages in flight finish on the routes they started with. `[mqtt]`, `[redis]` and
//! `[http]` changes are logged as needing a restart. A config that does not load is
//! refused, every error logged, and the running one stays.
//!
//! Shutdown (SIGTERM/SIGINT) is explicit and visible: `STOPPING=1`, stop taking messages
//! (the MQTT connection stays up so acks can go out), let every lane finish what it holds —
//! bounded by `shutdown_timeout`; what does not finish stays unacked and the broker
//! redelivers it — then DISCONNECT cleanly, close Redis and stop the HTTP endpoint.
//!
//! The process never lingers broken (spec §6): a task that moves messages (the MQTT loop,
//! a lane, the ack path, a republish worker) ending unexpectedly takes the same shutdown
//! path and then exits 1, so `Restart=on-failure` brings it back; and the watchdog is fed
//! only while messages move or have a reason to wait ([`stuck_while_up`]).

pub mod config;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::daemon::config::BridgeConfig;
use crate::dead_letter::DeadLetter;
use crate::events;
use crate::liveness::{Heartbeat, Liveness};
use crate::metrics::{Metrics, Observed};
use crate::mqtt::publisher::MqttPublisher;
use crate::mqtt::{Inbound, MqttConfig, MqttSource};
use crate::redis::{ConnectionState, RedisConfig, RedisManager};
use crate::republish::RepublishService;
use crate::router::dispatch::Dispatcher;
use crate::router::engine::Engine;
use crate::router::route::RouteTable;
use crate::spool::{Front, Spool};
use crate::systemd::Notifier;

/// The main loop beats this often, even when no message comes.
const MAIN_LOOP_TICK: Duration = Duration::from_secs(1);
/// The main loop only queues messages and handles signals: silence this long means stuck.
const MAIN_LOOP_MAX_SILENCE: Duration = Duration::from_secs(10);
/// Slack on top of what a loop's own timeouts allow (a slow TLS handshake, a busy CPU).
const LOOP_SLACK: Duration = Duration::from_secs(15);

/// However short the other bounds, a message may wait this long with Redis and the
/// broker up before the message path counts as stuck.
const MESSAGE_MIN_STALL: Duration = Duration::from_secs(5);

/// Why the daemon stopped with an error (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Mqtt(#[from] crate::mqtt::client::OptionsError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Spool(#[from] crate::spool::store::StoreError),
    #[error("the {0} ended unexpectedly; exiting so that systemd restarts the bridge")]
    TaskEnded(&'static str),
}

/// Everything the daemon runs with: the loaded config and its compiled routes.
pub struct Loaded {
    pub config: BridgeConfig,
    pub routes: RouteTable,
    pub path: PathBuf,
}

/// Where Redis is, for a log line: the URL without its credentials, the host and port, or
/// the cluster's seed nodes.
fn redis_address(config: &crate::redis::RedisConfig) -> String {
    if !config.cluster.is_empty() {
        let nodes: Vec<String> = config
            .cluster
            .iter()
            .map(|n| crate::config::redact_url(n.expose()))
            .collect();
        return format!("cluster {}", nodes.join(", "));
    }
    match &config.url {
        Some(url) => crate::config::redact_url(url.expose()),
        None => format!("{}:{}", config.host, config.port),
    }
}

fn dead_letter(config: &BridgeConfig) -> DeadLetter {
    DeadLetter {
        list: config.dead_letter.redis_list.clone(),
        max_len: config.dead_letter.max_len,
        max_payload: usize::try_from(config.dead_letter.max_payload).unwrap_or(usize::MAX),
    }
}

fn max_payload(config: &BridgeConfig) -> usize {
    usize::try_from(config.limits.max_payload).unwrap_or(usize::MAX)
}

/// How long the MQTT loop may go without an event: it gets one per `keep_alive` while
/// connected, and one per connection attempt (at most `reconnect_max_delay` apart)
/// otherwise. `None` when keep-alive is off: then an idle loop is silent forever.
fn mqtt_max_silence(config: &MqttConfig) -> Option<Duration> {
    (!config.keep_alive.is_zero()).then(|| {
        config
            .keep_alive
            .saturating_add(config.reconnect_max_delay)
            .saturating_add(LOOP_SLACK)
    })
}

/// How long the Redis health task may go without a round: a pause, then one PING or one
/// connection attempt.
fn redis_max_silence(config: &RedisConfig) -> Duration {
    crate::redis::manager::HEALTH_INTERVAL
        .max(crate::redis::manager::RECONNECT_MAX_DELAY)
        .saturating_add(config.socket_timeout)
        .saturating_add(config.socket_connect_timeout)
        .saturating_add(LOOP_SLACK)
}

/// How long one message may be held while Redis and the broker are up before the message
/// path counts as stuck: longer than anything that legitimately holds it then — a command
/// timing out and its reconnect, another worker's dedup lease (waited for up to twice its
/// length), the drain of a shutdown, two watchdog periods.
fn message_max_wait(
    limits: &crate::config::LimitsConfig,
    redis: &RedisConfig,
    routes: &RouteTable,
    watchdog: Option<Duration>,
) -> Duration {
    let lease = routes
        .routes
        .iter()
        .filter_map(|r| r.dedup.as_ref().map(|d| d.lease))
        .max()
        .unwrap_or(Duration::ZERO);
    let redis_round = redis
        .socket_timeout
        .saturating_add(redis.socket_connect_timeout);
    [
        MESSAGE_MIN_STALL,
        limits.shutdown_timeout,
        // `watchdog_interval` is half of WatchdogSec.
        watchdog.unwrap_or_default().saturating_mul(4),
        redis_round.saturating_mul(2),
        lease.saturating_mul(2).saturating_add(redis_round),
    ]
    .into_iter()
    .max()
    .unwrap_or(MESSAGE_MIN_STALL)
}

/// A progress check of the message path: stuck when the oldest work `oldest` reports (the
/// message held longest by the lanes, the ack being handed over) has waited longer than
/// `max_wait` while Redis and the broker were up. Time while either was down does not
/// count — messages wait for them by design (spec §6), so an outage never stops the
/// watchdog — and work held since before an outage counts from when both were last seen
/// up again.
fn stuck_while_up(
    oldest: impl Fn() -> Option<Instant> + Send + Sync + 'static,
    observed: Observed,
    max_wait: impl Fn() -> Duration + Send + Sync + 'static,
) -> impl Fn() -> bool + Send + Sync + 'static {
    let last_outage = std::sync::Mutex::new(Instant::now());
    move || {
        let now = Instant::now();
        let mut last_outage = last_outage.lock().unwrap_or_else(|p| p.into_inner());
        let redis_up = matches!(
            observed.redis_state(),
            ConnectionState::Up | ConnectionState::Disabled
        );
        if !redis_up || !observed.mqtt().connected {
            *last_outage = now;
            return false;
        }
        oldest()
            .is_some_and(|held| now.saturating_duration_since(held.max(*last_outage)) > max_wait())
    }
}

/// The `STATUS=` line: connection states and counts since start.
fn status_line(observed: &Observed, routes: &RouteTable) -> String {
    let t = &events::TOTALS;
    let mqtt = observed.mqtt();
    format!(
        "mqtt {}, redis {}; {} routes, {} filters; {} received, {} written, {} dead-lettered, \
         {} unrouted, {} in flight",
        if mqtt.connected && mqtt.subscribed {
            "up"
        } else {
            "down"
        },
        observed.redis_state().as_str(),
        routes.routes.len(),
        routes.subscriptions.len(),
        t.received.load(Ordering::Relaxed),
        t.written.load(Ordering::Relaxed),
        t.dead_lettered.load(Ordering::Relaxed),
        t.unrouted.load(Ordering::Relaxed),
        observed.mqtt_stats.inflight(),
    )
}

/// Gives the heap a burst left behind back to the system once traffic stops (spec §11: a
/// few MiB idle). glibc keeps freed memory at its high-water mark; one `malloc_trim` per
/// quiet period — two main-loop ticks in a row with no new message and nothing in flight,
/// so the dispatcher's idle lanes (`LANE_IDLE`) have exited and freed theirs — returns it.
#[derive(Default)]
struct IdleTrim {
    last_seen: u64,
    quiet_ticks: u8,
}

impl IdleTrim {
    fn tick(&mut self, inflight: usize) {
        let seen = events::TOTALS.received.load(Ordering::Relaxed)
            + events::TOTALS.unrouted.load(Ordering::Relaxed);
        if seen != self.last_seen || inflight != 0 {
            self.last_seen = seen;
            self.quiet_ticks = 0;
        } else if self.quiet_ticks < 2 {
            self.quiet_ticks += 1;
            if self.quiet_ticks == 2 {
                release_free_heap();
            }
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_heap() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_heap() {}

/// What a running daemon can change on reload.
struct RunningDaemon {
    path: PathBuf,
    /// `[mqtt]`, `[redis]` and `[http]` as started; the rest as last reloaded.
    config: BridgeConfig,
    engine: Arc<Engine>,
    source: MqttSource,
    notifier: Notifier,
    observed: Observed,
    /// Redis → MQTT, on its own MQTT connection.
    republish: RepublishService,
}

impl RunningDaemon {
    fn status(&self) -> String {
        status_line(&self.observed, &self.engine.routes())
    }

    /// SIGHUP.
    async fn reload(&mut self) {
        self.notifier.reloading();
        tracing::info!(path = %self.path.display(), "SIGHUP: reloading the configuration");
        match BridgeConfig::compile(&self.path, &crate::config::process_env()) {
            Err(errors) => events::config_reload_rejected(&self.path, &errors),
            // Routes and rules are compiled for the new file's protocol; the connections
            // keep the one they were opened with: a reload cannot mix them (MQTT 5 keys on
            // a 3.1.1 connection would be dropped silently, `{user.*}` never found).
            Ok((new, _)) if new.mqtt.protocol != self.config.mqtt.protocol => {
                let error = crate::config::ConfigError::new(
                    self.path.display().to_string(),
                    "mqtt.protocol",
                    "changing the MQTT protocol needs a restart; the running configuration \
                     is kept",
                );
                events::config_reload_rejected(
                    &self.path,
                    &crate::config::ConfigErrors::new(vec![error]),
                );
            }
            Ok((new, routes)) => {
                // A publishing route needs the outgoing connection: open it first, and keep
                // the running config if it cannot be (its forwards would all fail).
                let publisher = if routes.publishes() {
                    match self.republish.publisher() {
                        Ok(publisher) => Some(publisher),
                        Err(e) => {
                            let error = crate::config::ConfigError::new(
                                self.path.display().to_string(),
                                "mqtt",
                                format!("cannot open the outgoing MQTT connection that mqtt_publish and rate-limit replies need: {e}"),
                            );
                            let errors = crate::config::ConfigErrors::new(vec![error]);
                            events::config_reload_rejected(&self.path, &errors);
                            self.notifier.reloaded(&self.status());
                            return;
                        }
                    }
                } else {
                    None
                };
                self.apply(new, routes, publisher).await
            }
        }
        self.notifier.reloaded(&self.status());
    }

    async fn apply(
        &mut self,
        new: BridgeConfig,
        routes: RouteTable,
        publisher: Option<MqttPublisher>,
    ) {
        let old = &self.config;
        if new.mqtt != old.mqtt {
            events::config_needs_restart("[mqtt]");
        }
        if new.redis != old.redis {
            events::config_needs_restart("[redis]");
        }
        if new.http != old.http {
            events::config_needs_restart("[http]");
        }
        if new.spool != old.spool {
            events::config_needs_restart("[spool]");
        }
        if new.log.format != old.log.format {
            events::config_needs_restart("[log] format");
        }
        let route_count = routes.routes.len();
        let filter_count = routes.subscriptions.len();
        crate::metrics::register_routes(&routes);
        let (added, removed) = self.source.update_subscriptions(&routes.subscriptions);
        self.source.set_max_inflight(new.limits.max_inflight);
        self.engine
            .reload(routes, publisher, max_payload(&new), dead_letter(&new));
        crate::logging::set_level(&new.log.level);
        if let Err(e) = self
            .republish
            .apply(&new.republish_rules, dead_letter(&new))
            .await
        {
            tracing::error!(error = %e, "republish: could not start the MQTT connection");
        }
        self.config = BridgeConfig {
            mqtt: old.mqtt.clone(),
            redis: old.redis.clone(),
            http: old.http.clone(),
            spool: old.spool.clone(),
            ..new
        };
        events::config_reload_applied(&format!(
            "{route_count} routes, {filter_count} filters ({added} subscribed, {removed} \
             unsubscribed), {} republish rules, log level {:?}",
            self.config.republish_rules.len(),
            self.config.log.level
        ));
    }
}

/// The topic lanes: straight to the engine, or through the spool's front when `[spool]` is
/// configured (spec §6.2). Two types rather than one handler with an `Option` inside, so a
/// bridge without a spool runs exactly the code it ran before.
enum Lanes {
    Direct(Dispatcher<Inbound, Engine>),
    Spooled(Dispatcher<Inbound, Front>),
}

impl Lanes {
    fn dispatch(&self, message: Inbound) {
        match self {
            Lanes::Direct(d) => d.dispatch(message),
            Lanes::Spooled(d) => d.dispatch(message),
        }
    }

    fn oldest(&self) -> Box<dyn Fn() -> Option<Instant> + Send + Sync + 'static> {
        match self {
            Lanes::Direct(d) => Box::new(d.oldest()),
            Lanes::Spooled(d) => Box::new(d.oldest()),
        }
    }

    async fn drained(&self) {
        match self {
            Lanes::Direct(d) => d.drained().await,
            Lanes::Spooled(d) => d.drained().await,
        }
    }
}

/// Gives a received message to its topic's lane; an overflowed one is only counted, never
/// queued (a lane stuck waiting for Redis would hold it without bound).
fn hand_over(dispatcher: &Lanes, engine: &Engine, message: Inbound) {
    if message.is_overflow() {
        engine.overflow(&message.message.topic, message.received);
    } else {
        dispatcher.dispatch(message);
    }
}

/// Runs until SIGTERM/SIGINT, then drains and returns.
pub async fn run(loaded: Loaded) -> Result<(), DaemonError> {
    let Loaded {
        config,
        routes,
        path,
    } = loaded;
    crate::tls::install_crypto_provider();
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sighup = signal(SignalKind::hangup())?;
    // The Redis crate keeps no metrics: it reports every call, and `events` counts it
    // (`redis_command_duration_seconds`, `redis_errors_total`). Whatever recorder is
    // installed below, ours or an embedding application's, receives them.
    crate::redis::observe::set_command_observer(events::redis_command);
    let prometheus = crate::metrics::install();
    // Secrets print as <redacted>: the whole config is safe to show.
    tracing::debug!(?config, "configuration");
    events::config_warnings(&config.warnings);
    // Bound first: a port already taken fails the start at once, and the address is in
    // the log before anything else happens.
    let listener = crate::http::bind(config.http.listen).await?;

    let redis = RedisManager::new(config.redis.clone());
    if config.redis.enabled && !redis.initialize().await {
        tracing::warn!(
            redis = %redis_address(&config.redis),
            "waiting for Redis: Redis is not reachable yet; is redis-server running and \
             reachable? Reconnecting in the background; messages wait unacked until it answers"
        );
    }
    // Opened (and repaired, if a crash left it damaged) before any message arrives.
    let spool = match &config.spool {
        Some(spool) => Some(Spool::open(spool, &redis)?),
        None => None,
    };
    let (source, mut inbound) = MqttSource::start(
        &config.mqtt,
        &routes.subscriptions,
        config.limits.max_inflight,
    )?;
    tracing::info!(
        routes = routes.routes.len(),
        filters = routes.subscriptions.len(),
        "routemq-bridge {} started",
        crate::VERSION
    );
    crate::metrics::register_routes(&routes);
    // Redis → MQTT (spec §7) and the routes' forwards, on an MQTT connection of its own.
    let mut republish = RepublishService::new(&config.mqtt, &redis);
    let publisher = if routes.publishes() {
        Some(republish.publisher()?)
    } else {
        None
    };
    let engine = Arc::new(Engine::new(
        routes,
        redis.clone(),
        publisher,
        &config.mqtt.client_id,
        usize::try_from(config.mqtt.max_packet_size).unwrap_or(usize::MAX),
        max_payload(&config),
        dead_letter(&config),
    ));
    if let Some(spool) = &spool {
        engine.set_keeper(spool.clone());
    }
    let dispatcher = match &spool {
        Some(spool) => Lanes::Spooled(Dispatcher::new(Arc::new(Front {
            engine: engine.clone(),
            spool: spool.clone(),
        }))),
        None => Lanes::Direct(Dispatcher::new(engine.clone())),
    };
    // The first death is kept: one before this point is heard too.
    let died = crate::liveness::task_died();
    tokio::pin!(died);
    republish
        .apply(&config.republish_rules, dead_letter(&config))
        .await?;
    let observed = Observed {
        redis: redis.clone(),
        mqtt_status: source.status(),
        mqtt_stats: source.stats().clone(),
        spool: spool.as_ref().map(|s| s.status()),
    };

    // Liveness: the loops that must keep turning.
    let liveness = Liveness::new();
    let main_beat = Heartbeat::new();
    liveness.watch("main", main_beat.clone(), MAIN_LOOP_MAX_SILENCE);
    if let Some(max) = mqtt_max_silence(&config.mqtt) {
        liveness.watch("mqtt", source.heartbeat(), max);
    }
    // Only when the health task runs (Redis enabled and its config usable).
    if redis.heartbeat().age().is_some() {
        liveness.watch("redis", redis.heartbeat(), redis_max_silence(&config.redis));
    }
    // And the messages that must keep moving.
    let max_wait = {
        let (limits, redis_config) = (config.limits.clone(), config.redis.clone());
        let engine = engine.clone();
        let watchdog = crate::systemd::watchdog_interval();
        move || message_max_wait(&limits, &redis_config, &engine.routes(), watchdog)
    };
    liveness.watch_with(
        "lanes",
        stuck_while_up(dispatcher.oldest(), observed.clone(), max_wait.clone()),
    );
    let ack_path = source.ack_path();
    liveness.watch_with(
        "ack path",
        stuck_while_up(move || ack_path.since(), observed.clone(), max_wait),
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    // The drain stops with the lanes, before the connections close.
    let (drain_stop, drain_stopped) = watch::channel(false);
    let drain = spool.as_ref().map(|spool| {
        tokio::spawn(crate::spool::replay::run(
            spool.clone(),
            engine.clone(),
            redis.state(),
            drain_stopped,
        ))
    });
    let metrics = prometheus.map(|handle| Metrics::new(handle, observed.clone()));
    let upkeep = metrics
        .clone()
        .map(|m| tokio::spawn(m.upkeep(stop_rx.clone())));
    let http = crate::http::serve(
        listener,
        Arc::new(crate::http::State {
            metrics,
            observed: observed.clone(),
            liveness: liveness.clone(),
        }),
        stop_rx.clone(),
    );

    let notifier = Notifier::from_env();
    let mut mqtt_status = source.status();
    let mut running = RunningDaemon {
        path,
        config,
        engine,
        source,
        notifier: notifier.clone(),
        observed: observed.clone(),
        republish,
    };
    let mut supervisor = None;
    let mut started = false;
    let mut idle_trim = IdleTrim::default();
    let mut tick = tokio::time::interval(MAIN_LOOP_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut failure = None;
    loop {
        tokio::select! {
            message = inbound.recv() => match message {
                Some(message) => hand_over(&dispatcher, &running.engine, message),
                // Only the MQTT loop closes it, and only once told to stop.
                None => {
                    failure = Some(DaemonError::TaskEnded("MQTT loop"));
                    break;
                }
            },
            task = &mut died => {
                failure = Some(DaemonError::TaskEnded(task));
                break;
            }
            _ = tick.tick() => {
                main_beat.beat();
                idle_trim.tick(running.observed.mqtt_stats.inflight());
            }
            subscribed = mqtt_status.wait_for(|s| s.subscribed), if !started => {
                started = true;
                if subscribed.is_err() {
                    continue; // the MQTT loop ended; the inbound channel closes next
                }
                notifier.ready(&running.status());
                let observed = observed.clone();
                let engine = running.engine.clone();
                supervisor = Some(tokio::spawn(crate::systemd::supervise(
                    notifier.clone(),
                    liveness.clone(),
                    crate::systemd::watchdog_interval(),
                    move || status_line(&observed, &engine.routes()),
                    stop_rx.clone(),
                )));
            }
            _ = sighup.recv() => running.reload().await,
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }

    if let Some(e) = &failure {
        tracing::error!(error = %e, "a task that moves messages is gone; shutting down");
    }
    notifier.stopping();
    tracing::info!("shutting down: finishing in-flight messages");
    let RunningDaemon {
        source,
        config,
        republish,
        engine,
        ..
    } = running;
    source.stop_receiving();
    // What was received before the stop is in flight too: finish it.
    while let Ok(message) = inbound.try_recv() {
        hand_over(&dispatcher, &engine, message);
    }
    // The republish rules stop (their unacked stream entries stay pending) while the lanes
    // drain, so a stop takes one `shutdown_timeout`, not the sum of both; the outgoing
    // connection closes after the lanes, whose forwards it carries.
    let timeout = config.limits.shutdown_timeout;
    let mut republish = republish;
    let _ = drain_stop.send(true);
    let ((), drained, _) = tokio::join!(
        republish.stop_rules(),
        tokio::time::timeout(timeout, dispatcher.drained()),
        tokio::time::timeout(timeout, async {
            if let Some(drain) = drain {
                let _ = drain.await;
            }
        })
    );
    if drained.is_err() {
        tracing::warn!(
            unfinished = source.stats().inflight(),
            ?timeout,
            "shutdown_timeout reached; unfinished messages stay unacked for redelivery"
        );
    }
    if let Some(spool) = &spool {
        spool.close().await;
    }
    tokio::join!(
        source.disconnect(Duration::from_secs(5)),
        republish.shutdown()
    );
    redis.disconnect().await;
    let _ = stop_tx.send(true);
    for task in [Some(http), supervisor, upkeep].into_iter().flatten() {
        let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
    }
    tracing::info!("stopped");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
