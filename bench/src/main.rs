//! `routemq-bench`: measures the bridge against spec §11 on this machine alone.
//!
//! One run starts a private Redis and Mosquitto, then:
//! 1. **drain** — preloads N QoS 1 messages into a persistent session (waiting for every
//!    PUBACK) while its subscriber is connected but paused, and measures how fast (a) a do-nothing subscriber, (b) the bridge with a
//!    one-`set` route and (c) the bridge with session + rate limit + dedup + two actions
//!    empty that queue; (b) and (c) are reported as ratios to (a), all from one run;
//! 2. **live** — publishes at fixed rates to a running bridge and measures publish →
//!    visible-in-Redis latency (keyspace notifications), RSS under load and idle, CPU;
//! 3. **spool** (`--parts spool`, not by default) — the bridge spools N messages while its
//!    Redis is not there yet, then drains them with live traffic on other topics: append
//!    and replay rates, live p99 during the drain against after it (spec §6.2);
//! 4. **accounting** — every message must be in Redis (its own key), nothing in the dead
//!    letter, outcome counters (when the bridge serves `/metrics`) all `written`, and
//!    nothing left unacknowledged in the broker.
//!
//! It prints one table and writes it as JSON to `bench/out/` (git-ignored). The bridge is
//! the release binary beside this one (`cargo build --release` first).

mod mqtt;
mod procstat;
mod report;
mod services;
mod spool;
mod store;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Parser;

use procstat::{sample, PeakRss};
use report::{DrainRow, IdleRow, LiveRow, Report};
use services::{Bridge, Service, TempDir};
use store::{Store, DEAD_LETTER, MSG_PREFIX};

/// The `share_group` of `--instances` bridges, followed by the route's letter: a group per
/// route, because the broker keeps giving the group's messages to an earlier run's
/// persistent sessions too (they are members until they expire).
const SHARE_GROUP: &str = "bench-";

pub type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "routemq-bench",
    about = "Speed and footprint of routemq-bridge (spec §11)"
)]
struct Args {
    /// Messages preloaded for each drain.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Distinct device ids (topics `bench/dev-<n>/data`).
    #[arg(long, default_value_t = 1000)]
    devices: u64,
    /// Live publish rates, messages per second.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,10000")]
    rates: Vec<u64>,
    /// Seconds of publishing at each live rate.
    #[arg(long, default_value_t = 5)]
    live_seconds: u64,
    /// Mosquitto's `max_inflight_messages`, the same for every subscriber measured.
    #[arg(long, default_value_t = 20)]
    broker_inflight: u16,
    /// The bridge binary [default: routemq-bridge beside this binary].
    #[arg(long)]
    bridge: Option<PathBuf>,
    /// A command the bridge runs under, e.g. "perf record -o /tmp/perf-{run}.data --";
    /// `{run}` becomes drain-b, live-c, ...; footprint numbers are then the wrapper's.
    #[arg(long, allow_hyphen_values = true)]
    bridge_prefix: Option<String>,
    /// What to run: drain, live, spool (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "drain,live")]
    parts: Vec<String>,
    /// Routes for the live runs: b (one set), c (the full route), f (one set and an
    /// `mqtt_publish` forward, to measure what confirming forwards costs).
    #[arg(long, value_delimiter = ',', default_value = "b,c")]
    live_routes: Vec<String>,
    /// The live rate during and after the spool's drain (`--parts spool`), messages per
    /// second, for `--live-seconds` each.
    #[arg(long, default_value_t = 1000)]
    spool_rate: u64,
    /// The spool's `fsync` policy (`--parts spool`).
    #[arg(long, default_value = "batch", value_parser = ["batch", "always"])]
    spool_fsync: String,
    /// Where the JSON goes.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/out"))]
    out: PathBuf,
    /// The rate-limit strategy of route (c). §11's figure is for sliding_window (exact, the
    /// default); the others show what a cheaper limiter changes.
    #[arg(long, default_value = "sliding_window",
          value_parser = ["sliding_window", "fixed_window", "token_bucket"])]
    rate_limit: String,
    /// The Redis the bridges write to: one server, or a 3-master cluster (drain only; the
    /// route's keys are hash-tagged by device there).
    #[arg(long, default_value = "single", value_parser = ["single", "cluster"])]
    redis: String,
    /// Bridges draining the queue together, as one `share_group` (drain only).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    instances: u32,
    /// The MQTT protocol the bridge speaks (spec §6.1); the publishers speak 3.1.1.
    #[arg(long, default_value = "3.1.1", value_parser = ["3.1.1", "5"])]
    protocol: String,
}

/// The two bridge configurations measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RouteKind {
    /// (b): one `set` of the payload at the message's own key.
    OneSet,
    /// (c): session (required) + sliding-window rate limit that is never hit + dedup +
    /// `set` and `incr`.
    Full,
    /// (f): (b) plus an `mqtt_publish` forward at QoS 1 (live runs only).
    Forward,
}

impl RouteKind {
    fn from_name(name: &str) -> Res<RouteKind> {
        match name {
            "b" => Ok(RouteKind::OneSet),
            "c" => Ok(RouteKind::Full),
            "f" => Ok(RouteKind::Forward),
            other => Err(format!("unknown route {other:?}: b, c or f").into()),
        }
    }

    fn label(self) -> &'static str {
        match self {
            RouteKind::OneSet => "(b) bridge, one set",
            RouteKind::Full => "(c) bridge, session+rate_limit+dedup+2 actions",
            RouteKind::Forward => "(f) bridge, one set + mqtt_publish",
        }
    }

    fn short(self) -> &'static str {
        match self {
            RouteKind::OneSet => "b",
            RouteKind::Full => "c",
            RouteKind::Forward => "f",
        }
    }

    /// The route, with `strategy` as (c)'s rate-limit strategy; on a cluster the keys one
    /// MULTI/EXEC writes share the device's hash tag (`bench:msg:{{{device_id}}}:…`).
    fn route_toml(self, strategy: &str, cluster: bool) -> String {
        let toml = self.route_toml_single(strategy);
        if !cluster {
            return toml;
        }
        ["bench:msg:", "bench:dedup:", "bench:count:"]
            .iter()
            .fold(toml, |toml, prefix| {
                toml.replace(
                    &format!("{prefix}{{device_id}}"),
                    &format!("{prefix}{{{{{{device_id}}}}}}"),
                )
            })
    }

    fn route_toml_single(self, strategy: &str) -> String {
        let toml = match self {
            RouteKind::OneSet => {
                r#"
[[routes]]
name = "bench"
topic = "bench/{device_id}/data"
qos = 1
payload = "json"

  [[routes.actions]]
  op = "set"
  key = "bench:msg:{device_id}:{json.seq}"
"#
            }
            RouteKind::Forward => {
                return RouteKind::OneSet.route_toml_single(strategy)
                    + r#"
  [[routes.actions]]
  op = "mqtt_publish"
  topic = "bench-forward/{device_id}"
"#;
            }
            RouteKind::Full => {
                r#"
[[routes]]
name = "bench"
topic = "bench/{device_id}/data"
qos = 1
payload = "json"

  [routes.session]
  key = "bench:session:{device_id}"
  required = true

  [routes.rate_limit]
  key = "bench:rl:{device_id}"
  strategy = "sliding_window"
  max = 1000000
  window = "60s"

  [routes.dedup]
  key = "bench:dedup:{device_id}:{json.seq}"
  ttl = "10m"

  [[routes.actions]]
  op = "set"
  key = "bench:msg:{device_id}:{json.seq}"

  [[routes.actions]]
  op = "incr"
  key = "bench:count:{device_id}"
"#
            }
        };
        toml.replace(
            r#"strategy = "sliding_window""#,
            &format!("strategy = {strategy:?}"),
        )
    }

    /// Keys in Redis once `messages` over `devices` were all processed, not counting the
    /// rate-limit keys of strategies whose keys come and go (`exact_limiter`: the sliding
    /// window keeps one set per device for the whole run).
    fn expected_keys(self, messages: u64, devices: u64, exact_limiter: bool) -> u64 {
        let used = devices.min(messages);
        match self {
            RouteKind::OneSet | RouteKind::Forward => messages,
            // message keys + dedup marks + sessions + counters (+ rate-limit sets)
            RouteKind::Full => 2 * messages + devices + used + u64::from(exact_limiter) * used,
        }
    }
}

struct Bench {
    args: Args,
    bridge_binary: PathBuf,
    prefix: Vec<String>,
    /// One server, or every node of the cluster.
    redis: Vec<Service>,
    broker: Service,
    store: Store,
    dir: TempDir,
}

impl Bench {
    fn config(&self, route: RouteKind, client_id: &str) -> Res<(PathBuf, u16)> {
        let share_group = if self.args.instances > 1 {
            format!("share_group = \"{SHARE_GROUP}{}\"\n", route.short())
        } else {
            String::new()
        };
        self.write_config(
            client_id,
            &share_group,
            &self.store.redis_toml,
            &route.route_toml(&self.args.rate_limit, self.store.cluster),
        )
    }

    /// Writes the bridge's config for `client_id`: `mqtt` more keys of `[mqtt]`, `redis` the
    /// body of `[redis]`, `rest` what follows the fixed tables (routes, `[spool]`). Returns
    /// its path and the free port its HTTP endpoint listens on.
    fn write_config(
        &self,
        client_id: &str,
        mqtt: &str,
        redis: &str,
        rest: &str,
    ) -> Res<(PathBuf, u16)> {
        let http = services::free_port()?;
        // Under MQTT 5 the session is kept by session_expiry (its default, 7 days).
        let session = if self.args.protocol == "5" {
            "protocol = \"5\""
        } else {
            "clean_session = false"
        };
        let text = format!(
            r#"[mqtt]
url = "mqtt://127.0.0.1:{port}"
client_id = "{client_id}"
{session}
{mqtt}
[redis]
{redis}

[http]
listen = "127.0.0.1:{http}"

[dead_letter]
redis_list = "{DEAD_LETTER}"

[log]
level = "info"
format = "text"
{rest}"#,
            port = self.broker.port,
        );
        let path = self.dir.path().join(format!("{client_id}.toml"));
        std::fs::write(&path, text)?;
        Ok((path, http))
    }

    /// Starts the bridge; `{run}` in the prefix becomes `run` (e.g. `drain-b`), so a
    /// profiler writes one file per run.
    fn spawn_bridge(&self, config: &Path, run: &str) -> Res<Bridge> {
        let prefix: Vec<String> = self
            .prefix
            .iter()
            .map(|p| p.replace("{run}", run))
            .collect();
        Bridge::spawn(&prefix, &self.bridge_binary, config)
    }

    /// Messages the broker still holds for `client_id` after the bridge exited.
    async fn leftover(&self, client_id: &str) -> Res<u64> {
        // The bridge exits right after writing DISCONNECT; the broker may not have read the
        // acks before it yet, and a new connection with the same client id would take the
        // session over and discard them (they would then be redelivered, a false alarm).
        // Nothing observable says the broker has read them: give it a moment.
        tokio::time::sleep(Duration::from_millis(500)).await;
        mqtt::leftover(self.broker.port, client_id, Duration::from_secs(1)).await
    }

    async fn reset_redis(&mut self, route: RouteKind) -> Res<()> {
        self.store.flush().await?;
        if route == RouteKind::Full {
            self.store.seed_sessions(self.args.devices).await?;
        }
        Ok(())
    }

    /// Fills the queue of a subscriber that is connected but not reading.
    async fn preload(&mut self) -> Res<f64> {
        let n = self.args.messages;
        let took = mqtt::preload(self.broker.port, 0, n, self.args.devices).await?;
        Ok(n as f64 / took.as_secs_f64())
    }

    /// (a): the do-nothing subscriber.
    ///
    /// Why "connected but paused" rather than "offline, then reconnect": Mosquitto 2.0.11
    /// (Debian 12's) sends everything queued for an offline client at once on reconnect,
    /// ignoring `max_inflight_messages`, and then loses track of some of the PUBACKs (those
    /// messages come back with DUP on the next connection). A connected subscriber that
    /// does not read gets its queue through the normal path: the in-flight window holds,
    /// and the rest queues in the broker, as a persistent session's backlog does.
    async fn drain_baseline(&mut self) -> Res<DrainRow> {
        let client_id = "bench-drain-a";
        self.store.flush().await?;
        mqtt::create_session(self.broker.port, client_id, mqtt::FILTER).await?;
        let subscriber = mqtt::Subscriber::connect(self.broker.port, client_id).await?;
        let preload_rate = self.preload().await?;
        let others0 = self.others_cpu(std::process::id());
        let d = subscriber.drain(self.args.messages).await?;
        let others = self.others_cpu(std::process::id()).since(&others0);
        let left = mqtt::leftover(self.broker.port, client_id, Duration::from_secs(1)).await?;
        let secs = d.last.duration_since(d.resumed).as_secs_f64();
        Ok(DrainRow {
            name: "(a) do-nothing subscriber".into(),
            short: "a".into(),
            messages: self.args.messages,
            preload_rate,
            seconds: secs,
            rate: self.args.messages as f64 / secs,
            cpu_s: None,
            others,
            redis_commands: Vec::new(),
            peak_rss_kib: None,
            hwm_kib: None,
            accounted: d.received,
            dead_letters: 0,
            left_in_broker: left,
            outcomes: None,
            exit_ok: true,
            problems: Vec::new(),
        })
    }

    /// (b) or (c): the bridge (or `--instances` bridges in one share group) drains the same
    /// queue; done when Redis holds every key.
    async fn drain_bridge(&mut self, route: RouteKind) -> Res<DrainRow> {
        let instances = self.args.instances;
        let filter = if instances > 1 {
            format!("$share/{SHARE_GROUP}{}/{}", route.short(), mqtt::FILTER)
        } else {
            mqtt::FILTER.to_string()
        };
        self.reset_redis(route).await?;
        let mut bridges = Vec::new();
        for i in 1..=instances {
            let client_id = if instances > 1 {
                format!("bench-drain-{}-{i}", route.short())
            } else {
                format!("bench-drain-{}", route.short())
            };
            mqtt::create_session(self.broker.port, &client_id, &filter).await?;
            let (config, http) = self.config(route, &client_id)?;
            let run = if instances > 1 {
                format!("drain-{}-{i}", route.short())
            } else {
                format!("drain-{}", route.short())
            };
            let mut bridge = self.spawn_bridge(&config, &run)?;
            bridge.wait_for_log("subscribed", Duration::from_secs(15))?;
            bridges.push((client_id, http, bridge));
        }
        // Paused while the queue fills, as the do-nothing subscriber is (see `drain`).
        for (_, _, bridge) in &bridges {
            bridge.signal("STOP");
        }
        let preload_rate = self.preload().await;
        for (_, _, bridge) in &bridges {
            bridge.signal("CONT");
        }
        let preload_rate = preload_rate?;
        let resumed = Instant::now();
        let pids: Vec<u32> = bridges.iter().map(|(_, _, b)| b.pid()).collect();
        let peaks: Vec<PeakRss> = pids.iter().map(|&pid| PeakRss::start(pid)).collect();
        let cpu0: Vec<_> = pids
            .iter()
            .map(|&pid| sample(pid).unwrap_or_default())
            .collect();
        let others0 = self.others_cpu(0);
        self.store.reset_stats().await?;
        let n = self.args.messages;
        let exact_limiter = self.args.rate_limit == "sliding_window";
        let expected = route.expected_keys(n, self.args.devices, exact_limiter);
        let mut waited = self
            .store
            .wait_for_keys(expected, Duration::from_secs(10))
            .await;
        if waited.is_ok() && route == RouteKind::Full && !exact_limiter {
            // The limiter's keys come and go (token bucket) or roll over (fixed window): the
            // key count is only a lower bound; the message keys themselves say when.
            waited = self
                .store
                .wait_for_count(&format!("{MSG_PREFIX}*"), n, Duration::from_secs(10))
                .await;
        }
        let ends: Vec<_> = pids
            .iter()
            .map(|&pid| sample(pid).unwrap_or_default())
            .collect();
        let others = self.others_cpu(0).since(&others0);
        let redis_commands = self.store.command_stats().await?;
        let peak_rss: u64 = peaks.into_iter().map(PeakRss::stop).sum();
        let mut problems = Vec::new();
        let done = match waited {
            Ok(at) => at,
            Err(e) => {
                problems.push(e.to_string());
                Instant::now()
            }
        };
        let secs = done.duration_since(resumed).as_secs_f64();
        let accounted = self.store.count(&format!("{MSG_PREFIX}*")).await?;
        let dead_letters = self.store.llen(DEAD_LETTER).await?;
        if route == RouteKind::Full {
            let counted = self
                .store
                .sum_counters("bench:count:", self.args.devices)
                .await?;
            if counted != n {
                problems.push(format!("incr counters sum to {counted}, not {n}"));
            }
        }
        let mut outcomes: Option<BTreeMap<String, u64>> = None;
        let mut exit_ok = true;
        let mut left = 0;
        let mut shares = Vec::new();
        for (client_id, http, mut bridge) in bridges {
            if let Some(counts) = scrape_outcomes(http) {
                shares.push(counts.values().sum::<u64>());
                let merged = outcomes.get_or_insert_with(BTreeMap::new);
                for (outcome, count) in counts {
                    *merged.entry(outcome).or_insert(0) += count;
                }
            }
            problems.extend(bridge.warnings());
            exit_ok &= bridge.terminate(Duration::from_secs(20))?.success();
            left += self.leftover(&client_id).await?;
        }
        let cluster = if self.store.cluster {
            format!(", {}-node cluster", self.redis.len())
        } else {
            String::new()
        };
        let mut name = if route == RouteKind::Full && !exact_limiter {
            format!("{}, {}", route.label(), self.args.rate_limit)
        } else {
            route.label().into()
        };
        if instances > 1 {
            name = format!("{name} ×{instances} (shares {shares:?}){cluster}");
        } else {
            name.push_str(&cluster);
        }
        if self.args.protocol == "5" {
            name.push_str(", MQTT 5");
        }
        Ok(DrainRow {
            name,
            short: route.short().into(),
            messages: n,
            preload_rate,
            seconds: secs,
            rate: n as f64 / secs,
            cpu_s: Some(
                ends.iter()
                    .zip(&cpu0)
                    .map(|(end, start)| end.cpu_s - start.cpu_s)
                    .sum(),
            ),
            others,
            redis_commands,
            peak_rss_kib: Some(peak_rss),
            hwm_kib: Some(ends.iter().map(|e| e.hwm_kib).sum()),
            accounted,
            dead_letters,
            left_in_broker: left,
            outcomes,
            exit_ok,
            problems,
        })
    }

    /// CPU seconds so far of the broker, Redis and (when not 0) the subscriber process.
    fn others_cpu(&self, subscriber: u32) -> report::OthersCpu {
        let cpu = |pid: u32| sample(pid).map(|s| s.cpu_s).unwrap_or(0.0);
        report::OthersCpu {
            broker_s: cpu(self.broker.pid()),
            redis_s: self.redis.iter().map(|r| cpu(r.pid())).sum(),
            subscriber_s: (subscriber != 0).then(|| cpu(subscriber)),
        }
    }

    /// Idle footprint over `window`, after `settle`.
    async fn idle(pid: u32, when: &str, settle: Duration, window: Duration) -> IdleRow {
        tokio::time::sleep(settle).await;
        let s0 = sample(pid).unwrap_or_default();
        tokio::time::sleep(window).await;
        let s1 = sample(pid).unwrap_or_default();
        IdleRow {
            when: when.into(),
            rss_kib: s1.rss_kib,
            cpu_s: s1.cpu_s - s0.cpu_s,
            window_s: window.as_secs_f64(),
        }
    }

    /// Fixed-rate publishing to a running bridge.
    async fn live(&mut self, route: RouteKind) -> Res<(Vec<LiveRow>, Vec<IdleRow>, Vec<String>)> {
        let client_id = format!("bench-live-{}", route.short());
        self.reset_redis(route).await?;
        mqtt::create_session(self.broker.port, &client_id, mqtt::FILTER).await?;
        let (config, http) = self.config(route, &client_id)?;
        let mut bridge = self.spawn_bridge(&config, &format!("live-{}", route.short()))?;
        bridge.wait_for_log("subscribed", Duration::from_secs(15))?;
        let pid = bridge.pid();
        let mut idle = vec![
            Bench::idle(
                pid,
                "before load",
                Duration::from_secs(2),
                Duration::from_secs(3),
            )
            .await,
        ];

        let secs = self.args.live_seconds;
        let counts: Vec<u64> = self.args.rates.iter().map(|r| r * secs).collect();
        let total: u64 = counts.iter().sum();
        let probe = self.store.probe(0, total).await?;
        let mut publisher = mqtt::Paced::connect(self.broker.port).await?;
        let mut rows = Vec::new();
        let mut problems = Vec::new();
        let mut first = 0u64;
        for (&rate, &count) in self.args.rates.iter().zip(&counts) {
            let peak = PeakRss::start(pid);
            let c0 = sample(pid).unwrap_or_default();
            let sent = publisher.run(first, count, rate, self.args.devices).await?;
            let (from, to) = (first as usize, (first + count) as usize);
            if !probe.wait_seen(from, to, Duration::from_secs(30)).await {
                problems.push(format!(
                    "at {rate} msg/s only {} of {count} messages became visible",
                    probe.seen_in(from, to)
                ));
            }
            let c1 = sample(pid).unwrap_or_default();
            let peak_rss = peak.stop();
            let seen = probe.times(from, to);
            let mut latencies: Vec<Duration> = sent
                .iter()
                .zip(&seen)
                .filter_map(|(s, v)| v.map(|v| v.saturating_duration_since(*s)))
                .collect();
            latencies.sort();
            let achieved = match (sent.first(), sent.last()) {
                (Some(a), Some(b)) if b > a => (count - 1) as f64 / (*b - *a).as_secs_f64(),
                _ => 0.0,
            };
            rows.push(LiveRow {
                route: route.short().into(),
                rate,
                achieved_rate: achieved,
                sent: count,
                seen: latencies.len() as u64,
                p50_ms: percentile(&latencies, 50.0),
                p99_ms: percentile(&latencies, 99.0),
                max_ms: latencies.last().map(ms).unwrap_or(0.0),
                peak_rss_kib: peak_rss,
                cpu_s: c1.cpu_s - c0.cpu_s,
            });
            first += count;
        }
        publisher.wait_acked(total, Duration::from_secs(30)).await?;
        publisher.close().await?;
        probe.stop();
        idle.push(
            Bench::idle(
                pid,
                "after load",
                Duration::from_secs(2),
                Duration::from_secs(3),
            )
            .await,
        );
        if let Some(s) = sample(pid) {
            idle.push(IdleRow {
                when: "lifetime peak (VmHWM)".into(),
                rss_kib: s.hwm_kib,
                cpu_s: s.cpu_s,
                window_s: 0.0,
            });
        }

        let keys = self.store.count(&format!("{MSG_PREFIX}*")).await?;
        if keys != total {
            problems.push(format!(
                "{keys} message keys in Redis for {total} published"
            ));
        }
        let dead = self.store.llen(DEAD_LETTER).await?;
        if dead > 0 {
            problems.push(format!("{dead} dead letters"));
        }
        if let Some(outcomes) = scrape_outcomes(http) {
            let written = outcomes.get("written").copied().unwrap_or(0);
            if written != total || outcomes.len() != 1 {
                problems.push(format!(
                    "outcome counters {outcomes:?} for {total} published"
                ));
            }
        }
        problems.extend(bridge.warnings());
        let status = bridge.terminate(Duration::from_secs(20))?;
        if !status.success() {
            problems.push(format!("the bridge exited with {status}"));
        }
        let left = self.leftover(&client_id).await?;
        if left > 0 {
            problems.push(format!("{left} messages left unacked in the broker"));
        }
        Ok((rows, idle, problems))
    }
}

fn ms(d: &Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile of sorted latencies, in ms.
fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    ms(&sorted[rank.clamp(1, sorted.len()) - 1])
}

/// `routemq_bridge_messages_total` by outcome, when the bridge serves `/metrics` (builds
/// without the HTTP endpoint answer nothing, and the accounting rests on Redis alone).
fn scrape_outcomes(port: u16) -> Option<BTreeMap<String, u64>> {
    let mut stream = std::net::TcpStream::connect_timeout(
        &([127, 0, 0, 1], port).into(),
        Duration::from_secs(1),
    )
    .ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    let mut outcomes = BTreeMap::new();
    for line in body.lines() {
        let Some(rest) = line.strip_prefix("routemq_bridge_messages_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.split_once('}') else {
            continue;
        };
        let outcome = labels
            .split(',')
            .find_map(|l| l.trim().strip_prefix("outcome=\""))
            .map(|v| v.trim_end_matches('"').to_string());
        if let (Some(outcome), Ok(v)) = (outcome, value.trim().parse::<f64>()) {
            *outcomes.entry(outcome).or_insert(0) += v as u64;
        }
    }
    Some(outcomes)
}

fn bridge_binary(args: &Args) -> Res<PathBuf> {
    let path = match &args.bridge {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .ok_or("no directory beside the bench binary")?
            .join("routemq-bridge"),
    };
    if !path.is_file() {
        return Err(format!(
            "bridge binary {} not found: run `cargo build --release` first (or pass --bridge)",
            path.display()
        )
        .into());
    }
    Ok(path)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cpu}, {cores} cores available")
}

/// `/proc/loadavg`'s 1-minute figure: how busy the machine was with other work.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(String::from))
        .unwrap_or_else(|| "?".into())
}

async fn run(args: Args) -> Res<Report> {
    let bridge_binary = bridge_binary(&args)?;
    let prefix = args
        .bridge_prefix
        .as_deref()
        .map(|p| p.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    let live_routes = args
        .live_routes
        .iter()
        .map(|r| RouteKind::from_name(r))
        .collect::<Res<Vec<_>>>()?;
    let cluster = args.redis == "cluster";
    if (cluster || args.instances > 1) && args.parts.iter().any(|p| p == "live") {
        return Err("--redis cluster and --instances measure the drain: add --parts drain".into());
    }
    let redis = if cluster {
        services::redis_cluster(3)?
    } else {
        vec![services::redis()?]
    };
    let broker = services::mosquitto(args.broker_inflight)?;
    let store = if cluster {
        Store::connect_cluster(&redis.iter().map(|r| r.port).collect::<Vec<_>>()).await?
    } else {
        Store::connect(redis[0].port).await?
    };
    let mut bench = Bench {
        bridge_binary,
        prefix,
        redis,
        broker,
        store,
        dir: TempDir::new("configs")?,
        args: args.clone(),
    };
    eprintln!(
        "redis-server pids {:?} ports {:?}, mosquitto pid {} port {}",
        bench.redis.iter().map(Service::pid).collect::<Vec<_>>(),
        bench.redis.iter().map(|r| r.port).collect::<Vec<_>>(),
        bench.broker.pid(),
        bench.broker.port
    );
    let mut report = Report::new(args.messages, args.devices, args.broker_inflight, machine());
    report.load_start = load_average();
    if args.parts.iter().any(|p| p == "drain") {
        eprintln!("drain (a): preloading {} messages...", args.messages);
        report.drain.push(bench.drain_baseline().await?);
        for route in [RouteKind::OneSet, RouteKind::Full] {
            eprintln!("drain ({}): preloading...", route.short());
            report.drain.push(bench.drain_bridge(route).await?);
        }
    }
    if args.parts.iter().any(|p| p == "live") {
        for route in live_routes {
            eprintln!("live ({}): rates {:?}...", route.short(), args.rates);
            let (rows, idle, problems) = bench.live(route).await?;
            report.live.extend(rows);
            report.idle.extend(idle.into_iter().map(|mut i| {
                i.when = format!("({}) {}", route.short(), i.when);
                i
            }));
            report.problems.extend(
                problems
                    .into_iter()
                    .map(|p| format!("live ({}): {p}", route.short())),
            );
        }
    }
    if args.parts.iter().any(|p| p == "spool") {
        eprintln!(
            "spool: {} messages spooled, then drained with live traffic at {} msg/s...",
            args.messages, args.spool_rate
        );
        report.spool = Some(bench.spool().await?);
    }
    Ok(report)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let out = args.out.clone();
    let started = Instant::now();
    match run(args).await {
        Ok(mut report) => {
            report.wall_s = started.elapsed().as_secs_f64();
            report.load_end = load_average();
            print!("{}", report.table());
            match report.write_json(&out) {
                Ok(path) => println!("JSON: {}", path.display()),
                Err(e) => eprintln!("could not write the JSON to {}: {e}", out.display()),
            }
            if report.all_accounted() {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("routemq-bench: {e}");
            std::process::ExitCode::from(2)
        }
    }
}
