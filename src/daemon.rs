//! The daemon: wires the parts together and owns the process lifecycle (spec §6).
//!
//! Start-up: Redis manager (it keeps reconnecting in the background if Redis is down), the
//! MQTT source, the engine and the dispatcher. Then one loop hands messages to the
//! dispatcher until a signal says otherwise.
//!
//! Shutdown (SIGTERM/SIGINT) is explicit and visible: stop taking messages (the MQTT
//! connection stays up so acks can go out), let every lane finish what it holds — bounded
//! by `shutdown_timeout`; what does not finish stays unacked and the broker redelivers it —
//! then DISCONNECT cleanly and close Redis.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};

use crate::config::BridgeConfig;
use crate::mqtt::MqttSource;
use crate::redis::RedisManager;
use crate::router::dispatch::Dispatcher;
use crate::router::engine::{DeadLetter, Engine};
use crate::router::route::RouteTable;

/// Why the daemon stopped with an error (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    Mqtt(#[from] crate::mqtt::client::OptionsError),
    #[error("signal handling: {0}")]
    Signals(#[from] std::io::Error),
}

/// Everything the daemon runs with: the loaded config and its compiled routes.
pub struct Loaded {
    pub config: BridgeConfig,
    pub routes: RouteTable,
    pub path: PathBuf,
}

fn dead_letter(config: &BridgeConfig) -> DeadLetter {
    DeadLetter {
        list: config.dead_letter.redis_list.clone(),
        max_len: config.dead_letter.max_len,
    }
}

/// Runs until SIGTERM/SIGINT, then drains and returns.
pub async fn run(loaded: Loaded) -> Result<(), DaemonError> {
    let Loaded { config, routes, .. } = loaded;
    crate::tls::install_crypto_provider();
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut sigint = signal(SignalKind::interrupt())?;

    let redis = RedisManager::new(config.redis.clone());
    if config.redis.enabled && !redis.initialize().await {
        tracing::warn!("Redis is not reachable yet; reconnecting in the background, messages wait");
    }
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
    let max_payload = usize::try_from(config.limits.max_payload).unwrap_or(usize::MAX);
    let engine = Arc::new(Engine::new(
        routes,
        redis.clone(),
        source.client().clone(),
        &config.mqtt.client_id,
        max_payload,
        dead_letter(&config),
    ));
    let dispatcher = Dispatcher::new(engine.clone());
    // Redis → MQTT (spec §7), on an MQTT connection of its own.
    let mut republish = crate::republish::RepublishService::new(&config, &redis);
    republish
        .apply(&config.republish_rules, dead_letter(&config))
        .await?;

    loop {
        tokio::select! {
            message = inbound.recv() => match message {
                Some(message) => dispatcher.dispatch(message),
                None => break,
            },
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }

    tracing::info!("shutting down: finishing in-flight messages");
    source.stop_receiving();
    republish.shutdown().await;
    // What was received before the stop is in flight too: finish it.
    while let Ok(message) = inbound.try_recv() {
        dispatcher.dispatch(message);
    }
    let timeout = config.limits.shutdown_timeout;
    if tokio::time::timeout(timeout, dispatcher.drained())
        .await
        .is_err()
    {
        tracing::warn!(
            unfinished = source.stats().inflight(),
            ?timeout,
            "shutdown_timeout reached; unfinished messages stay unacked for redelivery"
        );
    }
    source.disconnect(Duration::from_secs(5)).await;
    redis.disconnect().await;
    tracing::info!("stopped");
    Ok(())
}
