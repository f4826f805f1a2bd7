//! Pub/sub (spec §3, §6, §7): publish (raw or JSON) through the manager, and a subscriber
//! that survives Redis restarts.
//!
//! A subscribed connection can do nothing else, so [`Subscriber::start`] runs one task on a
//! dedicated connection (from [`RedisManager::dedicated_connection`], so it counts against
//! `max_connections` for as long as the subscription lives; when no connection is left the
//! task logs it and keeps trying with backoff). It SUBSCRIBEs the literal
//! channels and PSUBSCRIBEs the patterns, and forwards [`Message`]s through a bounded channel:
//! a slow consumer slows the task instead of growing a queue. (The `redis` crate's own reader
//! buffers what the server sends while the task waits; Redis's pub/sub output-buffer limit
//! does not see that, so keep consumers fast.) When the connection is lost — the message
//! stream ends, or a PING sent after `socket_timeout` without a message gets no answer
//! within another `socket_timeout` — the task reconnects with jittered
//! exponential backoff (100 ms doubling to 2 s) and subscribes everything again; messages
//! published meanwhile are lost, as pub/sub promises nothing more. Dropping the
//! [`Subscription`] or calling [`Subscription::stop`] ends the task and its connection.
//! Every (re)connection asks the manager for its node ([`RedisManager::dedicated_client`]):
//! on a cluster any node will do, since every `PUBLISH` is broadcast to all nodes, and a
//! dead node is left for the next one.

use crate::backoff::Backoff;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::error::{Error, Result};
use super::manager::RedisManager;

/// Messages buffered between the subscriber task and the consumer by default.
pub const DEFAULT_CAPACITY: usize = 1024;
const BACKOFF_INITIAL: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Floor of the interval between PINGs on an idle subscription (see [`Worker::pump`]).
const MIN_HEALTH_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Publishes `payload` on `channel`; returns how many subscribers received it.
pub async fn publish(manager: &RedisManager, channel: &str, payload: &[u8]) -> Result<i64> {
    manager
        .query(::redis::cmd("PUBLISH").arg(channel).arg(payload))
        .await
}

/// Publishes `value` as compact JSON on `channel`; returns how many subscribers received it.
pub async fn publish_json<T: Serialize + ?Sized>(
    manager: &RedisManager,
    channel: &str,
    value: &T,
) -> Result<i64> {
    let json = serde_json::to_vec(value).map_err(|e| Error::Invalid(e.to_string()))?;
    publish(manager, channel, &json).await
}

/// One received message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub channel: String,
    /// The pattern that matched, for messages received through PSUBSCRIBE.
    pub pattern: Option<String>,
    pub payload: Vec<u8>,
}

/// Starts subscriptions; see [`Subscriber::start`].
#[derive(Debug)]
pub struct Subscriber;

impl Subscriber {
    /// Subscribes `channels` and psubscribes `patterns` on a dedicated connection, with a
    /// buffer of [`DEFAULT_CAPACITY`] messages. Connecting happens in the background: the
    /// subscription keeps trying until Redis answers (see [`Subscription::subscribed`]).
    /// Must be called within a Tokio runtime.
    pub fn start(
        manager: &RedisManager,
        channels: Vec<String>,
        patterns: Vec<String>,
    ) -> Subscription {
        Self::start_with_capacity(manager, channels, patterns, DEFAULT_CAPACITY)
    }

    /// [`Subscriber::start`] with a buffer of `capacity` messages (at least 1).
    pub fn start_with_capacity(
        manager: &RedisManager,
        channels: Vec<String>,
        patterns: Vec<String>,
        capacity: usize,
    ) -> Subscription {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let (subscribed_tx, subscribed_rx) = watch::channel(false);
        let (stop_tx, stop_rx) = watch::channel(false);
        let reconnects = Arc::new(AtomicU64::new(0));
        let worker = Worker {
            manager: manager.clone(),
            channels,
            patterns,
            tx,
            subscribed: subscribed_tx,
            stop: stop_rx,
            reconnects: Arc::clone(&reconnects),
        };
        let task = tokio::spawn(worker.run());
        Subscription {
            rx,
            monitor: Monitor {
                subscribed: subscribed_rx,
                reconnects,
            },
            stop: stop_tx,
            task: Some(task),
        }
    }
}

/// A running subscription. Receive with [`Subscription::recv`]; ends when dropped.
#[derive(Debug)]
pub struct Subscription {
    rx: mpsc::Receiver<Message>,
    monitor: Monitor,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl Subscription {
    /// The next message; `None` once the subscription has ended (stopped, or Redis is
    /// disabled or misconfigured).
    pub async fn recv(&mut self) -> Option<Message> {
        self.rx.recv().await
    }

    /// True while every channel and pattern is subscribed on a live connection.
    pub fn is_subscribed(&self) -> bool {
        self.monitor.is_subscribed()
    }

    /// Waits until everything is subscribed (at once if it already is). Returns false if the
    /// subscription ended first.
    pub async fn subscribed(&self) -> bool {
        self.monitor.subscribed().await
    }

    /// How many times the connection was re-established after being lost.
    pub fn reconnects(&self) -> u64 {
        self.monitor.reconnects()
    }

    /// A handle on the subscription's state for another task than the one receiving.
    pub fn monitor(&self) -> Monitor {
        self.monitor.clone()
    }

    /// Ends the subscription and waits for its task to close the connection.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// Observes a [`Subscription`] from elsewhere (see [`Subscription::monitor`]).
#[derive(Clone, Debug)]
pub struct Monitor {
    subscribed: watch::Receiver<bool>,
    reconnects: Arc<AtomicU64>,
}

impl Monitor {
    /// True while every channel and pattern is subscribed on a live connection.
    pub fn is_subscribed(&self) -> bool {
        *self.subscribed.borrow()
    }

    /// Waits until everything is subscribed; false if the subscription ended first.
    pub async fn subscribed(&self) -> bool {
        let mut watch = self.subscribed.clone();
        let up = watch.wait_for(|up| *up).await.is_ok();
        up
    }

    /// How many times the connection was re-established after being lost.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        // Nothing to flush: aborting only drops the connection sooner.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The task behind a [`Subscription`].
struct Worker {
    manager: RedisManager,
    channels: Vec<String>,
    patterns: Vec<String>,
    tx: mpsc::Sender<Message>,
    subscribed: watch::Sender<bool>,
    stop: watch::Receiver<bool>,
    reconnects: Arc<AtomicU64>,
}

/// Why a connection's session ended.
enum End {
    /// Stop requested or consumer gone: end the task.
    Stop,
    /// Connection lost: reconnect.
    Lost(String),
}

impl Worker {
    async fn run(mut self) {
        if !self.manager.config().enabled {
            tracing::info!("redis is disabled: pub/sub subscription not started");
            return;
        }
        // The permit counts this connection against max_connections while the task lives.
        let mut wait = BACKOFF_INITIAL;
        let (mut client, _permit) = loop {
            match self.manager.dedicated_connection().await {
                Ok(pair) => break pair,
                Err(Error::PoolExhausted) => tracing::warn!(
                    "pub/sub: every connection allowed by max_connections is in use; retrying"
                ),
                // Sentinel: no master found yet (the sentinels or the master are down).
                Err(e @ Error::Unavailable(_)) => {
                    tracing::debug!(error = %e, "pub/sub: no master yet; retrying")
                }
                Err(e) => {
                    tracing::error!(error = %e, "pub/sub subscription cannot start");
                    return;
                }
            }
            let pause = wait.mul_f64(rand::random_range(0.5..=1.0));
            wait = (wait * 2).min(BACKOFF_MAX * 5);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.stop.wait_for(|stop| *stop) => return,
            }
        };
        let mut backoff = Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX);
        let mut connected_before = false;
        let mut first = true;
        loop {
            // The node of last time may be gone: on a cluster it may be dead or demoted, under
            // Sentinel the master may have changed (a demoted master still relays what its
            // successor publishes, but the subscription belongs on the master, spec §10, and
            // the old one may go next: a change of master after this point ends the session,
            // see `pump`). A single server gets the same client back.
            let mut master = self.manager.master_changes();
            master.borrow_and_update();
            if !std::mem::take(&mut first) {
                match self.manager.dedicated_client(None).await {
                    Ok(c) => client = c,
                    Err(e) => tracing::debug!(error = %e, "pub/sub: keeping the last node"),
                }
            }
            match self.connect(&client).await {
                Ok(pubsub) => {
                    if connected_before {
                        self.reconnects.fetch_add(1, Ordering::Relaxed);
                        tracing::info!("pub/sub: reconnected and resubscribed");
                    }
                    connected_before = true;
                    backoff.reset();
                    self.subscribed.send_replace(true);
                    let end = self.pump(pubsub, master).await;
                    self.subscribed.send_replace(false);
                    match end {
                        End::Stop => return,
                        End::Lost(why) => {
                            tracing::warn!(reason = %why, "pub/sub connection lost; reconnecting")
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "pub/sub: connect failed; retrying"),
            }
            let pause = backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.stop.wait_for(|stop| *stop) => return,
            }
        }
    }

    /// A fresh connection with everything subscribed, each step bounded by the configured
    /// timeouts (the `redis` crate's pub/sub connect has none of its own).
    async fn connect(&self, client: &::redis::Client) -> Result<::redis::aio::PubSub> {
        let config = self.manager.config();
        let mut pubsub =
            tokio::time::timeout(config.socket_connect_timeout, client.get_async_pubsub())
                .await
                .map_err(|_| Error::Timeout)??;
        if !self.channels.is_empty() {
            tokio::time::timeout(config.socket_timeout, pubsub.subscribe(&self.channels))
                .await
                .map_err(|_| Error::Timeout)??;
        }
        if !self.patterns.is_empty() {
            tokio::time::timeout(config.socket_timeout, pubsub.psubscribe(&self.patterns))
                .await
                .map_err(|_| Error::Timeout)??;
        }
        Ok(pubsub)
    }

    /// Forwards messages until the connection is lost, the subscription ends, or (Sentinel)
    /// the manager moved to another master since `master` was read.
    ///
    /// A subscribed connection has no response timeout and may rightly stay quiet for
    /// hours, so silence proves nothing: after `socket_timeout` without a message it PINGs
    /// and gives the connection up when no answer comes within another `socket_timeout`.
    /// That notices a dead peer within 2 × `socket_timeout` (spec §6) — also a frozen Redis
    /// or a proxy that stopped forwarding, which TCP keepalive cannot see.
    async fn pump(
        &mut self,
        pubsub: ::redis::aio::PubSub,
        mut master: watch::Receiver<u64>,
    ) -> End {
        let (mut sink, mut stream) = pubsub.split();
        let timeout = self.manager.config().socket_timeout;
        let mut health = tokio::time::interval(timeout.max(MIN_HEALTH_CHECK_INTERVAL));
        health.reset(); // the first tick would fire at once
        loop {
            let event = tokio::select! {
                _ = self.stop.wait_for(|stop| *stop) => return End::Stop,
                Ok(()) = master.changed() => {
                    return End::Lost("the sentinels named another master".into())
                }
                next = stream.next() => Event::Message(next),
                _ = health.tick() => Event::HealthCheck,
            };
            match event {
                Event::Message(None) => return End::Lost("connection closed".into()),
                Event::Message(Some(msg)) => {
                    let message = Message {
                        channel: msg.get_channel_name().to_string(),
                        pattern: if msg.from_pattern() {
                            msg.get_pattern().ok()
                        } else {
                            None
                        },
                        payload: msg.get_payload_bytes().to_vec(),
                    };
                    // Back-pressure: wait for room, but stay stoppable meanwhile.
                    let sent = tokio::select! {
                        sent = self.tx.send(message) => sent.is_ok(),
                        _ = self.stop.wait_for(|stop| *stop) => false,
                    };
                    if !sent {
                        return End::Stop; // stopped, or the consumer is gone
                    }
                    health.reset();
                }
                Event::HealthCheck => {
                    let ping = tokio::time::timeout(timeout, sink.ping::<::redis::Value>()).await;
                    match ping {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return End::Lost(format!("ping failed: {e}")),
                        Err(_) => return End::Lost("ping timed out".into()),
                    }
                }
            }
        }
    }
}

/// What woke [`Worker::pump`].
enum Event {
    Message(Option<::redis::Msg>),
    HealthCheck,
}
