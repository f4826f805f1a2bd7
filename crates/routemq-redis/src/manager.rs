//! The Redis manager: one per application, cheap to clone, the one door to Redis.
//!
//! # Connection and recovery
//!
//! The manager holds one multiplexed command connection (a [`RedisConnection`]: a
//! `ConnectionManager`, a cluster connection when `cluster` is set, a plain multiplexed
//! connection with `[redis.sentinel]`) shared by every clone
//! and every task. A background *health task* owns its life:
//!
//! - while Redis is **up** it PINGs every [`HEALTH_INTERVAL`]; a command that fails with an
//!   I/O error or a timeout marks the manager down at once and wakes the task;
//! - while Redis is **down** every call fails fast with [`Error::Unavailable`] (nothing piles
//!   up behind a dead socket), and the task opens a fresh connection with jittered
//!   exponential backoff ([`RECONNECT_MIN_DELAY`] doubling to [`RECONNECT_MAX_DELAY`]); the
//!   first one that answers PING replaces the old one and the manager is up again.
//!
//! - while Redis **refuses** (connected, but answering `OOM`, `READONLY`, `MISCONF`, …) the
//!   state is [`ConnectionState::Refusing`]: commands still go out (callers wait and retry,
//!   spec §5.3), and the task probes every [`REFUSAL_PROBE_INTERVAL`] with a write that
//!   changes nothing ([`REFUSAL_PROBE_KEY`]) until Redis takes it.
//!
//! A connection is never kept once it timed out: a Redis gone silent (no FIN, no RST, or a
//! frozen process) fails the commands in flight after `socket_timeout`, or the next PING
//! does, so it is noticed within [`HEALTH_INTERVAL`] + `socket_timeout` (spec §6: about 2 ×
//! `socket_timeout`) and a fresh connection replaces it.
//!
//! So unlike RouteMQ, `initialize()` returning false (Redis down at start-up) is not final:
//! [`RedisManager::is_enabled`] turns true when Redis comes back, without another call.
//! [`RedisManager::disconnect`] stops the task and drops the connection. The up/down state is
//! an atomic on the hot path and a [`watch`] channel for observers ([`RedisManager::state`]);
//! [`RedisManager::reconnects`] counts re-established connections (for `reconnects_total`).
//! Every command passes one place (`call`), which times it and reports it with its error
//! to the command observer ([`crate::observe`]), from which the daemon keeps its metrics
//! (`redis_command_duration_seconds`, `redis_errors_total`).
//! No lock is held across an `.await`.
//!
//! # Sentinel
//!
//! With `[redis.sentinel]` the command connection goes to the master the sentinels name
//! (see [`crate::connection`]); the health task follows every failover: a lost connection
//! is re-made through the sentinels, and while the master refuses writes (`READONLY`: it was
//! demoted but is still reachable) the task asks the sentinels (at most every
//! [`SENTINEL_LOOKUP_INTERVAL`]) and reconnects as soon as they name another master.
//! Dedicated connections go to the master last connected to.
//!
//! Acked means replicated: Redis replicates asynchronously, so a master killed by
//! `kill -9` (or demoted by `SENTINEL FAILOVER` while still taking writes) loses what it
//! acknowledged but had not yet shipped, and the promoted replica never saw it. With
//! `wait_replicas = n` (default 1) [`RedisManager::query_pipeline_durable`] follows each
//! route write with `WAIT n <socket_timeout / 2>` on the same connection — the same
//! server-side connection: one epoch of the command connection is one connection, never
//! re-made underneath (see [`crate::connection`]), since `WAIT` covers only the writes made
//! on the connection it is sent on. When fewer
//! replicas acknowledged, the write is *not* sent again on that master (it is there, only
//! not yet replicated): `WAIT` is re-issued, counted ([`RedisManager::replica_waits`]) and
//! logged rate-limited, the state is `refusing` (`/readyz` 503), for as long as the
//! connection to that master lives — the message stays unacked meanwhile; the first `WAIT`
//! that counts enough replicas makes the state `up` again. Once the master
//! changed (a failover: the connection was lost or the sentinels named another master) the
//! call fails as unavailable and the caller's retry writes the message again on the new
//! master: at least once, exactly once with `dedup`. An error reply to `WAIT` (`UNBLOCKED`
//! when the master is demoted under it, `ERR … replica instances` when it already was)
//! means the same: the connection is marked down and the call fails as unavailable, never
//! as a permanent failure. `WAIT` blocks the connection it is
//! sent on, and the command connection is shared, so one `WAIT` is in flight at a time and
//! covers every write answered before it was sent (`ReplicaGate`): concurrent writers share
//! it. The cost: each write's ack waits up to two replica round trips (the `WAIT` in flight
//! when it was answered, then its own), and every command on the command connection queues
//! behind an in-flight `WAIT` (on loopback a fraction of a millisecond; on a slow link, the
//! link's latency; with replicas missing, up to `socket_timeout / 2`).
//!
//! # `max_connections`
//!
//! `REDIS_MAX_CONNECTIONS` bounds the connections the manager holds open at once: the one
//! command connection plus one per *dedicated* connection, handed out by
//! [`RedisManager::dedicated_connection`] for what cannot share a multiplexed connection
//! (pub/sub subscribers, blocking stream reads). Each dedicated connection holds a
//! [`ConnectionPermit`] for its whole life; when none is left the call fails with
//! [`Error::PoolExhausted`] instead of opening one more. Commands never wait for a permit:
//! they all share the command connection. (In cluster mode the command connection is one
//! per node, and a dedicated connection goes to a node chosen when it is opened: the
//! master of a key's slot, or any listed node — see [`RedisManager::dedicated_client`].)
//!
//! # Errors
//!
//! The primitives ([`RedisManager::query`], [`RedisManager::query_pipeline`],
//! [`RedisManager::run_script`]) return [`Result`]; the seed's methods (in `commands.rs`)
//! come in a sentinel form that logs rate-limited warnings and a `try_` form that returns
//! the error.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use ::redis::{Cmd, FromRedisValue, Pipeline, RedisResult, ScriptInvocation};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::config::RedisConfig;
use super::connection::{self, RedisConnection, Target};
use super::error::{Error, Result};
use super::warn::WarnLimiter;
use crate::backoff::Backoff;
use crate::heartbeat::Heartbeat;
use crate::observe;

/// How often the health task PINGs a connection that looks fine.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// First delay between reconnection attempts.
pub const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(100);
/// Cap of the delay between reconnection attempts.
pub const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(2);

/// How often the health task tries a write while Redis refuses, to notice its recovery.
pub const REFUSAL_PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// The key of that probe: `SET <key> "" XX` on a key that does not exist is refused exactly
/// when writes are (`OOM`, `READONLY`, `MISCONF`, …) and otherwise changes nothing.
pub const REFUSAL_PROBE_KEY: &str = "routemq-bridge:probe:never-set";

/// The channel [`RedisManager::replicated`] publishes an empty message to: a write that
/// reaches the replicas without touching a key.
pub const REPLICATION_BARRIER: &str = "routemq-bridge:replication-barrier";

/// Sentinel mode, while the master refuses: how often the health task asks the sentinels
/// whether they name another master (each ask opens a connection to a sentinel; the
/// `+switch-master` listener reports a failover sooner anyway).
pub const SENTINEL_LOOKUP_INTERVAL: Duration = Duration::from_secs(1);

/// Whether the manager can talk to Redis right now (for `redis_up` and `/readyz`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// `ENABLE_REDIS=false`: the manager never connects.
    Disabled,
    /// Not initialized, disconnected, or Redis is not answering (reconnecting).
    Down,
    /// Connected, but Redis refuses writes for now (`OOM`, `READONLY`, `MISCONF`, …: spec
    /// §5.3). Commands are still sent — reads work, and a write may pass again any moment —
    /// and the health task probes with a harmless write until one is accepted.
    Refusing,
    /// Connected and answering.
    Up,
}

impl ConnectionState {
    /// `"up"`, `"down"`, `"refusing"` or `"disabled"`, as `/readyz` reports it.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionState::Disabled => "disabled",
            ConnectionState::Down => "down",
            ConnectionState::Refusing => "refusing",
            ConnectionState::Up => "up",
        }
    }
}

/// Spec §3's `RedisManager`. Clones share one connection, one health task and one state.
#[derive(Clone)]
pub struct RedisManager {
    inner: Arc<Inner>,
}

/// Held by a dedicated connection (see [`RedisManager::dedicated_connection`]) for as long
/// as the connection is open; dropping it gives the slot back.
#[derive(Debug)]
pub struct ConnectionPermit(#[allow(dead_code)] OwnedSemaphorePermit);

/// The command connection and the number of the attempt that made it, so a failure seen on
/// an old connection cannot mark a newer one down.
struct Slot {
    epoch: u64,
    conn: RedisConnection,
}

struct Inner {
    config: RedisConfig,
    /// The hot-path view of the state: true only while connected and answering.
    up: AtomicBool,
    state: watch::Sender<ConnectionState>,
    slot: RwLock<Option<Slot>>,
    /// Epoch of the connection in `slot`; 0 when there is none.
    current_epoch: AtomicU64,
    next_epoch: AtomicU64,
    ever_up: AtomicBool,
    reconnects: AtomicU64,
    /// Wakes the health task when a call saw the connection fail.
    wake: Arc<Notify>,
    /// Set by `initialize`, cleared by `disconnect`; makes `initialize` idempotent.
    started: AtomicBool,
    /// Bumped by `disconnect`, so an `initialize` racing with it does not start a task.
    generation: AtomicU64,
    task: Mutex<Option<JoinHandle<()>>>,
    /// Sentinel mode: the task listening for `+switch-master`.
    watcher: Mutex<Option<JoinHandle<()>>>,
    dedicated: Arc<Semaphore>,
    warnings: WarnLimiter,
    /// Bumped by the health task every round, so a stuck task can be noticed (watchdog).
    heartbeat: Heartbeat,
    /// Cluster mode: which node the next keyless dedicated connection tries (round robin,
    /// so a dead node is not tried forever).
    next_node: AtomicUsize,
    /// Sentinel mode: the master last connected to, for dedicated connections.
    master: RwLock<Option<::redis::ConnectionInfo>>,
    /// `WAIT`s that came back with fewer replicas than `wait_replicas`.
    replica_waits: AtomicU64,
    /// Writes now waiting for replicas (see `WaitingForReplicas`).
    waiting_for_replicas: AtomicU64,
    /// The last `WAIT` counted fewer replicas than `wait_replicas`: the refusal it caused
    /// ends with the next `WAIT` that counts enough (or, with no write waiting, with a
    /// passing probe), not with a probe write, which replicas do not have to acknowledge.
    replicas_short: AtomicBool,
    /// The `WAIT`s of [`RedisManager::query_pipeline_durable`], one at a time.
    replica_gate: watch::Sender<ReplicaGate>,
    /// Sentinel mode: bumped each time the manager connects to another master.
    master_changes: watch::Sender<u64>,
}

/// `WAIT` blocks the connection it is sent on, and the command connection is shared: a
/// `WAIT` per write would queue each behind the one before (with replicas missing, one
/// `socket_timeout / 2` each, until the connection times out). So one `WAIT` is in flight
/// at a time and covers every write answered before it was sent: writers wait for the
/// first one numbered after their write, and one of them sends it when none is in flight.
/// Held by the caller sending the gate's `WAIT`; clears `in_flight` when dropped.
struct LeadGuard<'a>(&'a watch::Sender<ReplicaGate>);

impl Drop for LeadGuard<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|g| g.in_flight = false);
    }
}

/// Counts one write waiting for its replicas in `Inner::waiting_for_replicas` for as long
/// as it lives, so a caller dropped mid-`WAIT` (a cancelled future) is uncounted too.
struct WaitingForReplicas<'a>(&'a AtomicU64);

impl<'a> WaitingForReplicas<'a> {
    fn new(count: &'a AtomicU64) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        WaitingForReplicas(count)
    }
}

impl Drop for WaitingForReplicas<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct ReplicaGate {
    /// Number of the last `WAIT` sent.
    started: u64,
    /// Whether a `WAIT` is in flight now.
    in_flight: bool,
    /// The last `WAIT` that counted enough replicas, and the connection it was sent on.
    acked_epoch: u64,
    acked: u64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The task only holds a Weak and would stop by itself; abort spares it one more wait.
        if let Some(task) = lock(&self.task).take() {
            task.abort();
        }
        if let Some(watcher) = lock(&self.watcher).take() {
            watcher.abort();
        }
    }
}

/// A poisoned lock only means a thread panicked while holding it; the data (an Option we
/// replace wholesale) is still consistent.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl std::fmt::Debug for RedisManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // RedisConfig's url and password are `Secret`s and print redacted; the connection is
        // left out on purpose (the library's Debug prints the password).
        f.debug_struct("RedisManager")
            .field("config", &self.inner.config)
            .field("state", &*self.inner.state.borrow())
            .field("reconnects", &self.reconnects())
            .finish()
    }
}

/// The process-wide default manager (spec §3), built on first use from the seed's
/// environment variables (`ENABLE_REDIS`, `REDIS_*`, `REDIS_URL`).
static DEFAULT: std::sync::OnceLock<RedisManager> = std::sync::OnceLock::new();

impl RedisManager {
    /// The process-wide default manager, configured from the environment like RouteMQ's
    /// module-level `redis_manager`. Call [`RedisManager::initialize`] on it once. Invalid
    /// variables are logged and the seed's defaults used for the rest.
    pub fn global() -> &'static RedisManager {
        DEFAULT.get_or_init(|| {
            let config = RedisConfig::from_env().unwrap_or_else(|errors| {
                for error in errors.iter() {
                    tracing::error!(%error, "invalid Redis environment variable");
                }
                RedisConfig::default()
            });
            RedisManager::new(config)
        })
    }

    /// A manager for `config`; no I/O until [`RedisManager::initialize`].
    pub fn new(config: RedisConfig) -> Self {
        let initial = if config.enabled {
            ConnectionState::Down
        } else {
            ConnectionState::Disabled
        };
        // One connection is the command connection; the rest are for dedicated ones.
        let dedicated = config.max_connections.max(1) - 1;
        RedisManager {
            inner: Arc::new(Inner {
                config,
                up: AtomicBool::new(false),
                state: watch::Sender::new(initial),
                slot: RwLock::new(None),
                current_epoch: AtomicU64::new(0),
                next_epoch: AtomicU64::new(1),
                ever_up: AtomicBool::new(false),
                reconnects: AtomicU64::new(0),
                wake: Arc::new(Notify::new()),
                started: AtomicBool::new(false),
                generation: AtomicU64::new(0),
                task: Mutex::new(None),
                watcher: Mutex::new(None),
                dedicated: Arc::new(Semaphore::new(dedicated)),
                warnings: WarnLimiter::default(),
                heartbeat: Heartbeat::new(),
                next_node: AtomicUsize::new(0),
                master: RwLock::new(None),
                replica_waits: AtomicU64::new(0),
                waiting_for_replicas: AtomicU64::new(0),
                replicas_short: AtomicBool::new(false),
                replica_gate: watch::Sender::new(ReplicaGate::default()),
                master_changes: watch::Sender::new(0),
            }),
        }
    }

    pub fn config(&self) -> &RedisConfig {
        &self.inner.config
    }

    /// Connects and starts the health task. True when Redis answered; false when it is
    /// disabled, misconfigured, or not answering — in the last case the manager keeps
    /// reconnecting in the background and [`RedisManager::is_enabled`] turns true by itself.
    /// Calling it again while running only reports the current state.
    pub async fn initialize(&self) -> bool {
        let inner = &self.inner;
        if !inner.config.enabled {
            tracing::info!("redis is disabled (ENABLE_REDIS=false)");
            return false;
        }
        if inner.started.swap(true, Ordering::AcqRel) {
            return self.is_enabled();
        }
        let generation = inner.generation.load(Ordering::Acquire);
        let target = match Target::from_config(&inner.config) {
            Ok(target) => target,
            Err(e) => {
                // Retrying cannot fix a bad URL: say so once, loudly, and stay down.
                tracing::error!(error = %e, "redis is misconfigured; not connecting");
                inner.started.store(false, Ordering::Release);
                return false;
            }
        };
        match target.connect(&inner.config).await {
            Ok((conn, refused)) => inner.install(conn, refused, &target),
            Err(e) => tracing::warn!(
                error = %e,
                "redis is not answering at start-up; reconnecting in the background"
            ),
        }
        let mut task = lock(&inner.task);
        if inner.generation.load(Ordering::Acquire) != generation {
            // disconnect() ran while we were connecting: it wins.
            drop(task);
            inner.clear();
            return false;
        }
        inner.heartbeat.beat();
        if let Target::Sentinel(sentinel) = &target {
            *lock(&inner.watcher) = Some(tokio::spawn(watch_switches(
                Arc::downgrade(inner),
                sentinel.as_ref().clone(),
            )));
        }
        *task = Some(tokio::spawn(health_loop(
            Arc::downgrade(inner),
            Arc::clone(&inner.wake),
            target,
        )));
        self.is_enabled()
    }

    /// Stops the health task and drops the command connection. Dedicated connections
    /// already handed out are their owners' to close. [`RedisManager::initialize`] may be
    /// called again afterwards.
    pub async fn disconnect(&self) {
        let inner = &self.inner;
        inner.generation.fetch_add(1, Ordering::AcqRel);
        if let Some(watcher) = lock(&inner.watcher).take() {
            watcher.abort();
        }
        let task = lock(&inner.task).take();
        if let Some(task) = task {
            task.abort();
            // Wait until it is really gone, so it cannot install a connection after this.
            let _ = task.await;
        }
        inner.clear();
        inner.started.store(false, Ordering::Release);
    }

    /// True while Redis is enabled, connected and answering.
    pub fn is_enabled(&self) -> bool {
        self.inner.up.load(Ordering::Acquire)
    }

    /// Observes up/down transitions (for `redis_up`, `/readyz`, and tests that wait for
    /// recovery).
    pub fn state(&self) -> watch::Receiver<ConnectionState> {
        self.inner.state.subscribe()
    }

    /// The health task's heartbeat: it beats at least every [`HEALTH_INTERVAL`] plus one
    /// PING or connection attempt while the task runs (after `initialize`). For watchdogs.
    pub fn heartbeat(&self) -> Heartbeat {
        self.inner.heartbeat.clone()
    }

    /// How many times a lost connection was re-established (the first connection does not
    /// count).
    pub fn reconnects(&self) -> u64 {
        self.inner.reconnects.load(Ordering::Relaxed)
    }

    /// The command connection, for pipelines, scripts and commands the manager has no
    /// method for. `None` when disabled or before the first successful connection. It
    /// reconnects by itself (except in Sentinel mode, where a lost one stays lost: ask
    /// again), but calls through it bypass the manager's fail-fast and state tracking:
    /// prefer [`RedisManager::query`] and friends.
    pub fn get_client(&self) -> Option<RedisConnection> {
        if !self.inner.config.enabled {
            return None;
        }
        read_slot(&self.inner.slot).map(|(_, conn)| conn)
    }

    /// The `redis::Client` for this configuration, credentials applied. In cluster mode, a
    /// client for the first seed node (pub/sub messages reach every node of a cluster).
    /// Opening connections with it is not counted against `max_connections`: use
    /// [`RedisManager::dedicated_connection`] for connections kept open.
    pub fn redis_client(&self) -> Result<::redis::Client> {
        let config = &self.inner.config;
        if config.sentinel.is_some() {
            let master = self
                .inner
                .master
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let info = master.ok_or_else(|| Error::Unavailable("no master found yet".into()))?;
            return ::redis::Client::open(info).map_err(|e| Error::Invalid(e.to_string()));
        }
        let info = match config.cluster.first() {
            Some(first) => {
                let single = RedisConfig {
                    url: Some(first.clone()),
                    cluster: Vec::new(),
                    ..config.clone()
                };
                connection::connection_info(&single)?
            }
            None => connection::connection_info(config)?,
        };
        crate::tls::install_crypto_provider();
        ::redis::Client::open(info).map_err(|e| Error::Invalid(e.to_string()))
    }

    /// A client for one dedicated connection (a subscriber, a blocking reader) and the
    /// permit that counts it against `max_connections`. Keep the permit as long as the
    /// connection is open. [`Error::PoolExhausted`] when every allowed connection is in use.
    /// On a cluster the client is for a node that answers (see
    /// [`RedisManager::dedicated_client`]); a connection for one key's node is
    /// [`RedisManager::dedicated_connection_for_key`].
    pub async fn dedicated_connection(&self) -> Result<(::redis::Client, ConnectionPermit)> {
        let permit = self.dedicated_permit()?;
        let client = self.dedicated_client(None).await?;
        Ok((client, permit))
    }

    /// Like [`RedisManager::dedicated_connection`], for commands on `key` (a blocking
    /// `XREADGROUP` on a stream): on a cluster, the client is for the master serving `key`'s
    /// slot now, so the reads are not answered `MOVED`.
    pub async fn dedicated_connection_for_key(
        &self,
        key: &str,
    ) -> Result<(::redis::Client, ConnectionPermit)> {
        let permit = self.dedicated_permit()?;
        let client = self.dedicated_client(Some(key)).await?;
        Ok((client, permit))
    }

    fn dedicated_permit(&self) -> Result<ConnectionPermit> {
        if !self.inner.config.enabled {
            return Err(Error::Disabled);
        }
        Arc::clone(&self.inner.dedicated)
            .try_acquire_owned()
            .map(ConnectionPermit)
            .map_err(|_| Error::PoolExhausted)
    }

    /// The client to open (or open again) a dedicated connection with, now; ask again
    /// before each reconnection, because on a cluster the node of last time may be gone or
    /// demoted. A single server: [`RedisManager::redis_client`]. A cluster: for `key`, the
    /// master serving its slot (asked over the command connection: `CLUSTER KEYSLOT`,
    /// `CLUSTER SLOTS`); without a key (pub/sub: a cluster broadcasts every `PUBLISH` to
    /// all its nodes, replicas included), the nodes the cluster lists, in turn. While the
    /// cluster cannot be asked, the seed nodes in turn.
    pub async fn dedicated_client(&self, key: Option<&str>) -> Result<::redis::Client> {
        let config = &self.inner.config;
        if config.cluster.is_empty() {
            return self.redis_client();
        }
        let turn = self.inner.next_node.fetch_add(1, Ordering::Relaxed);
        let node = match self.cluster_node(key, turn).await {
            Ok(node) => node,
            Err(e) => {
                tracing::debug!(error = %e, "cannot ask the cluster for a node; trying the seeds in turn");
                None
            }
        };
        let seed = &config.cluster[turn % config.cluster.len()];
        let single = RedisConfig {
            url: Some(seed.clone()),
            cluster: Vec::new(),
            ..config.clone()
        };
        let mut info = connection::connection_info(&single)?;
        if let Some((host, port)) = node {
            let addr = match info.addr().clone() {
                ::redis::ConnectionAddr::TcpTls {
                    insecure,
                    tls_params,
                    ..
                } => ::redis::ConnectionAddr::TcpTls {
                    host,
                    port,
                    insecure,
                    tls_params,
                },
                _ => ::redis::ConnectionAddr::Tcp(host, port),
            };
            info = info.set_addr(addr);
        }
        crate::tls::install_crypto_provider();
        ::redis::Client::open(info).map_err(|e| Error::Invalid(e.to_string()))
    }

    /// The node a dedicated connection should go to (see [`RedisManager::dedicated_client`]):
    /// `key`'s master, or the `turn`-th node the cluster lists. `None` when the cluster
    /// lists none.
    async fn cluster_node(&self, key: Option<&str>, turn: usize) -> Result<Option<(String, u16)>> {
        let slots: ::redis::Value = self.query(::redis::cmd("CLUSTER").arg("SLOTS")).await?;
        let ranges = cluster_slots(&slots);
        if let Some(key) = key {
            let slot: u16 = self
                .query(::redis::cmd("CLUSTER").arg("KEYSLOT").arg(key))
                .await?;
            // The master is the first entry; when its endpoint is unknown, there is no
            // master to read from (a replica would answer MOVED): none, not a replica.
            return Ok(ranges
                .into_iter()
                .find(|(start, end, _)| (*start..=*end).contains(&slot))
                .and_then(|(_, _, nodes)| nodes.into_iter().next().flatten()));
        }
        let mut nodes: Vec<(String, u16)> = ranges
            .into_iter()
            .flat_map(|(_, _, nodes)| nodes.into_iter().flatten())
            .collect();
        nodes.sort();
        nodes.dedup();
        Ok(match nodes.len() {
            0 => None,
            n => Some(nodes.swap_remove(turn % n)),
        })
    }

    /// Connection settings for dedicated connections: the configured connect timeout and no
    /// response timeout (a blocking read or a subscriber waits as long as it must). Their
    /// owners bound each wait themselves so a silent Redis is still noticed; the client
    /// from [`RedisManager::dedicated_connection`] already sets TCP keepalive and
    /// `TCP_USER_TIMEOUT`.
    pub fn dedicated_connection_config(&self) -> ::redis::AsyncConnectionConfig {
        ::redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.inner.config.socket_connect_timeout))
            .set_response_timeout(None)
    }

    /// The command connection if Redis is up, else the error to fail fast with.
    fn command_connection(&self) -> Result<(u64, RedisConnection)> {
        let inner = &self.inner;
        if !inner.config.enabled {
            return Err(Error::Disabled);
        }
        if !inner.up.load(Ordering::Acquire) {
            let why = if inner.started.load(Ordering::Acquire) {
                "not connected; reconnecting"
            } else {
                "not initialized"
            };
            return Err(Error::Unavailable(why.into()));
        }
        read_slot(&inner.slot).ok_or_else(|| Error::Unavailable("not connected".into()))
    }

    /// Converts a library result, marking the connection down when it was lost, or
    /// refusing when Redis refused.
    fn settle<T>(&self, epoch: u64, result: RedisResult<T>) -> Result<T> {
        result.map_err(|e| {
            if connection::is_connection_loss(&e) {
                self.inner.mark_down(epoch, &e);
            }
            let e = Error::from(e);
            if let Error::Refused(why) = &e {
                self.inner.mark_refusing(epoch, why);
            }
            e
        })
    }

    /// The one place every call to Redis passes: takes the command connection (or fails
    /// fast), runs `call` on it (with the connection's epoch, for callers that go on using
    /// it), and reports the round trip and any error to
    /// `redis_command_duration_seconds{command}` / `redis_errors_total{kind}`.
    async fn call<T, F, Fut>(&self, command: &str, call: F) -> Result<T>
    where
        F: FnOnce(u64, RedisConnection) -> Fut,
        Fut: std::future::Future<Output = RedisResult<T>>,
    {
        let (epoch, conn) = match self.command_connection() {
            Ok(conn) => conn,
            Err(e) => {
                observe::command(command, None, Some(&e));
                return Err(e);
            }
        };
        let started = Instant::now();
        let result = self.settle(epoch, call(epoch, conn).await);
        observe::command(command, Some(started.elapsed()), result.as_ref().err());
        result
    }

    /// Run one command. The primitive every method is built on.
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
        self.call(&command_name(cmd), |_, mut conn| async move {
            cmd.query_async(&mut conn).await
        })
        .await
    }

    /// Run a pipeline (or a MULTI/EXEC transaction when built with `.atomic()`).
    ///
    /// On a cluster, a transaction whose slot is on the move (resharding: `MOVED`, `ASK` or
    /// `TRYAGAIN` for a command queued in it, which aborts the whole transaction, so nothing
    /// was applied) is sent again for up to `socket_timeout`, after a keyed read that lets
    /// the cluster client learn where the slot lives now: the library follows redirections
    /// for single commands but not inside a transaction. Past that budget the error is a
    /// refusal ([`Error::Refused`]): a wait, not a failure.
    pub async fn query_pipeline<T: FromRedisValue>(&self, pipe: &Pipeline) -> Result<T> {
        let budget = self.inner.config.socket_timeout;
        self.call(pipeline_command(pipe), |_, mut conn| async move {
            if pipe.is_transaction() && matches!(conn, RedisConnection::Cluster(_)) {
                cluster_transaction(&mut conn, pipe, budget).await
            } else {
                pipe.query_async(&mut conn).await
            }
        })
        .await
    }

    /// Run a pipeline whose replies the caller does not need, and whose commands may live
    /// on different nodes of a cluster: a plain (non-transaction) pipeline on a cluster is
    /// sent command by command, in order, each routed to its key's node (redis-rs refuses a
    /// pipeline across slots); anywhere else, and for a transaction, it is
    /// [`RedisManager::query_pipeline`]. Every reply is checked. Like any non-atomic
    /// pipeline, a retry after an error sends the commands that succeeded again.
    pub async fn query_pipeline_spread(&self, pipe: &Pipeline) -> Result<()> {
        if self.inner.config.cluster.is_empty() || pipe.is_transaction() {
            return self.query_pipeline::<()>(pipe).await;
        }
        for cmd in pipe.cmd_iter() {
            let reply: ::redis::Value = self.query(cmd).await?;
            if let ::redis::Value::ServerError(e) = reply {
                return Err(Error::from(::redis::RedisError::from(e)));
            }
        }
        Ok(())
    }

    /// A route's write: [`RedisManager::query_pipeline_spread`], and with
    /// `[redis.sentinel] wait_replicas = n > 0`, then `WAIT` until `n` replicas have it on
    /// the same connection (see the module doc, "Sentinel"). While fewer acknowledged,
    /// `WAIT` is re-issued as long as the master is the same; once it changed, the write
    /// fails as [`Error::Unavailable`] so the caller's retry sends it again on the new
    /// master.
    pub async fn query_pipeline_durable(&self, pipe: &Pipeline) -> Result<()> {
        let Some(replicas) = self.wait_replicas() else {
            return self.query_pipeline_spread(pipe).await;
        };
        // The connection the write went over, for the WAIT that must follow it there.
        let (epoch, mut conn) = self
            .call(pipeline_command(pipe), |epoch, mut conn| async move {
                pipe.query_async::<()>(&mut conn)
                    .await
                    .map(|()| (epoch, conn))
            })
            .await?;
        let _waiting = WaitingForReplicas::new(&self.inner.waiting_for_replicas);
        self.await_replicas(epoch, &mut conn, replicas).await
    }

    /// With `[redis.sentinel] wait_replicas = n > 0`: returns once `n` replicas have every
    /// write the master took before this call (found there by another attempt, e.g. a dedup
    /// done mark whose first attempt lost its connection before its `WAIT`). A `PUBLISH`
    /// to [`REPLICATION_BARRIER`] (replicated, changes no key) gives `WAIT` an offset to
    /// wait for on this connection. Elsewhere, `Ok` at once.
    ///
    /// `since`: the [`RedisManager::epoch`] read before the caller looked at what it found;
    /// when the command connection is another one now (another master, maybe without that
    /// write), the call fails as [`Error::Unavailable`] so the caller looks again.
    pub async fn replicated(&self, since: u64) -> Result<()> {
        let Some(replicas) = self.wait_replicas() else {
            return Ok(());
        };
        let (epoch, mut conn) = self.command_connection()?;
        if epoch != since {
            return Err(Error::Unavailable(
                "the connection changed since the read; reading again".into(),
            ));
        }
        let published = self.settle(
            epoch,
            ::redis::cmd("PUBLISH")
                .arg(REPLICATION_BARRIER)
                .arg("")
                .query_async::<i64>(&mut conn)
                .await,
        );
        published?;
        let _waiting = WaitingForReplicas::new(&self.inner.waiting_for_replicas);
        self.await_replicas(epoch, &mut conn, replicas).await
    }

    /// `[redis.sentinel] wait_replicas`, when writes wait for replicas (set and above 0).
    fn wait_replicas(&self) -> Option<u32> {
        self.inner
            .config
            .sentinel
            .as_ref()
            .map(|s| s.wait_replicas)
            .filter(|&n| n > 0)
    }

    /// Which command connection is current (0: none), for [`RedisManager::replicated`].
    pub fn epoch(&self) -> u64 {
        self.inner.current_epoch.load(Ordering::Acquire)
    }

    /// Returns once a `WAIT` sent on the connection of `epoch` after this call began
    /// counted `replicas` acknowledgements: it covers every write this caller made on that
    /// connection before. One `WAIT` is in flight at a time (see [`ReplicaGate`]): the
    /// callers that arrive meanwhile share the next one.
    async fn await_replicas(
        &self,
        epoch: u64,
        conn: &mut RedisConnection,
        replicas: u32,
    ) -> Result<()> {
        let inner = &self.inner;
        let timeout = (inner.config.socket_timeout / 2).max(Duration::from_millis(1));
        let millis = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let mut gate = inner.replica_gate.subscribe();
        // A WAIT numbered `needed` or later is sent after our write was answered.
        let needed = gate.borrow().started + 1;
        let moved = || {
            Error::Unavailable(
                "the master changed before its replicas acknowledged a write; writing it again"
                    .into(),
            )
        };
        loop {
            // Before each WAIT: on another connection (or none) a WAIT here would cover
            // nothing of ours, or go to a demoted master.
            if inner.current_epoch.load(Ordering::Acquire) != epoch
                || !inner.up.load(Ordering::Acquire)
            {
                return Err(moved());
            }
            let covered = |g: &ReplicaGate| g.acked_epoch == epoch && g.acked >= needed;
            // Lead the next WAIT unless one is in flight.
            let mut round = 0;
            let led = inner.replica_gate.send_if_modified(|g| {
                if covered(g) || g.in_flight {
                    return false;
                }
                g.in_flight = true;
                g.started += 1;
                round = g.started;
                true
            });
            if led {
                // Ends our lead however this future ends (also when it is dropped mid-WAIT).
                let _lead = LeadGuard(&inner.replica_gate);
                let started = Instant::now();
                let acked = ::redis::cmd("WAIT")
                    .arg(replicas)
                    .arg(millis)
                    .query_async::<i64>(conn)
                    .await
                    .map_err(Error::from);
                observe::command("wait", Some(started.elapsed()), acked.as_ref().err());
                // Any error: the connection was lost, or the master was demoted under the
                // WAIT (`UNBLOCKED`) or before it (`ERR WAIT cannot be used with replica
                // instances`). Either way this connection cannot tell whether our write
                // reaches a replica: drop it, and let the caller write again on whichever
                // master the manager reconnects to. Never a permanent failure.
                let acked = match acked {
                    Ok(n) => n,
                    Err(e) => {
                        inner.mark_down(epoch, &e);
                        return Err(Error::Unavailable(format!(
                            "WAIT for replicas failed ({e}); writing again"
                        )));
                    }
                };
                let enough = acked >= i64::from(replicas);
                if enough {
                    inner.replica_gate.send_modify(|g| {
                        if (g.acked_epoch, g.acked) < (epoch, round) {
                            g.acked_epoch = epoch;
                            g.acked = round;
                        }
                    });
                    inner.replicas_caught_up(epoch);
                } else {
                    inner.replicas_short.store(true, Ordering::Release);
                    inner.replica_waits.fetch_add(1, Ordering::Relaxed);
                    inner.mark_refusing(
                        epoch,
                        &format!(
                            "only {acked} of {replicas} replica(s) acknowledged a write (WAIT)"
                        ),
                    );
                }
            } else if !covered(&gate.borrow_and_update()) {
                // Someone else's WAIT is in flight: wait for its end (bounded, so a change
                // of master is noticed even if that caller was cancelled mid-WAIT).
                let _ = tokio::time::timeout(
                    inner.config.socket_timeout,
                    gate.wait_for(|g| covered(g) || !g.in_flight),
                )
                .await;
            }
            if covered(&gate.borrow()) {
                return Ok(());
            }
        }
    }

    /// Changes each time the manager connects to another master (Sentinel mode; never
    /// elsewhere): a dedicated connection to the old one should move, as the subscribers do.
    pub fn master_changes(&self) -> watch::Receiver<u64> {
        self.inner.master_changes.subscribe()
    }

    /// How many `WAIT`s came back with fewer replicas than `[redis.sentinel] wait_replicas`
    /// (each one a message held back until its write is replicated).
    pub fn replica_waits(&self) -> u64 {
        self.inner.replica_waits.load(Ordering::Relaxed)
    }

    /// Run a Lua script (EVALSHA, falling back to EVAL after a Redis restart).
    pub async fn run_script<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T> {
        self.call("evalsha", |_, mut conn| async move {
            invocation.invoke_async(&mut conn).await
        })
        .await
    }

    /// Logs `err` from `op` as a rate-limited warning (sentinel-form methods).
    pub(crate) fn warn_failed(&self, op: &str, err: &Error) {
        let kind = match err {
            // The operator switched Redis off: nothing to warn about.
            Error::Disabled => return,
            Error::Decode(_) => "decode",
            Error::Invalid(_) => "invalid",
            Error::PoolExhausted => "pool",
            other => other.metric_kind().unwrap_or("other"),
        };
        self.inner
            .warnings
            .warn(kind, format_args!("redis {op} failed: {err}"));
    }
}

/// The `command` label of a command: its name in lower case (`set`, `xadd`), bounded to
/// what a command name can be so a label never carries data.
fn command_name(cmd: &Cmd) -> String {
    match cmd.args_iter().next() {
        Some(::redis::Arg::Simple(name))
            if !name.is_empty()
                && name.len() <= 32
                && name.iter().all(|b| b.is_ascii_alphabetic() || *b == b'_') =>
        {
            String::from_utf8_lossy(name).to_ascii_lowercase()
        }
        _ => "other".to_string(),
    }
}

/// The name a pipeline is counted under: `multi` for a transaction, else `pipeline`.
fn pipeline_command(pipe: &Pipeline) -> &'static str {
    if pipe.is_transaction() {
        "multi"
    } else {
        "pipeline"
    }
}

/// A range of slots of `CLUSTER SLOTS`: first, last, and the nodes serving it (host, port),
/// the master first; `None` for a node whose endpoint is unknown.
type SlotRange = (u16, u16, Vec<Option<(String, u16)>>);

/// `CLUSTER SLOTS` as (first slot, last slot, nodes serving them: the master first, then
/// its replicas as host and port). A node whose endpoint it cannot read (unknown: `?` or
/// empty) keeps its place as `None`, so a replica is never taken for the master.
fn cluster_slots(reply: &::redis::Value) -> Vec<SlotRange> {
    use ::redis::{from_redis_value_ref, Value};
    let Value::Array(ranges) = reply else {
        return Vec::new();
    };
    ranges
        .iter()
        .filter_map(|range| {
            let Value::Array(fields) = range else {
                return None;
            };
            let start: u16 = from_redis_value_ref(fields.first()?).ok()?;
            let end: u16 = from_redis_value_ref(fields.get(1)?).ok()?;
            let nodes = fields[2..]
                .iter()
                .map(|node| {
                    let Value::Array(node) = node else {
                        return None;
                    };
                    let host: String = from_redis_value_ref(node.first()?).ok()?;
                    let port: u16 = from_redis_value_ref(node.get(1)?).ok()?;
                    (!host.is_empty() && host != "?").then_some((host, port))
                })
                .collect();
            Some((start, end, nodes))
        })
        .collect()
}

/// First and longest pause between two attempts of a transaction whose slot is moving.
const SLOT_MOVE_MIN_DELAY: Duration = Duration::from_millis(5);
const SLOT_MOVE_MAX_DELAY: Duration = Duration::from_millis(200);

/// A transaction on a cluster, sent again while its slot is on the move (see
/// [`RedisManager::query_pipeline`]) until it passes, fails otherwise, or `budget` is spent.
async fn cluster_transaction<T: FromRedisValue>(
    conn: &mut RedisConnection,
    pipe: &Pipeline,
    budget: Duration,
) -> RedisResult<T> {
    let deadline = Instant::now() + budget;
    let mut delay = SLOT_MOVE_MIN_DELAY;
    loop {
        let result = pipe.query_async(conn).await;
        match &result {
            Err(e) if slot_on_the_move(e) && Instant::now() + delay < deadline => {
                tracing::debug!(error = %e, "cluster transaction hit a moving slot; sending it again");
                follow_slot(conn, pipe).await;
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(SLOT_MOVE_MAX_DELAY);
            }
            _ => return result,
        }
    }
}

/// Whether `e` (a transaction's error) says its slot moved or is being migrated: `MOVED`,
/// `ASK` or `TRYAGAIN`, for any command queued in it.
fn slot_on_the_move(e: &::redis::RedisError) -> bool {
    e.clone().into_server_errors().is_some_and(|errors| {
        errors
            .iter()
            .any(|(_, err)| matches!(err.code(), "MOVED" | "ASK" | "TRYAGAIN"))
    })
}

/// A read of the transaction's first key (`EXISTS`, which changes nothing), routed by slot:
/// the cluster client follows the `MOVED` it gets, refreshing its slot map, so the next
/// attempt goes to the new owner. Its own result does not matter.
async fn follow_slot(conn: &mut RedisConnection, pipe: &Pipeline) {
    let Some(key) = pipe
        .cmd_iter()
        .find_map(|cmd| match cmd.args_iter().nth(1) {
            Some(::redis::Arg::Simple(key)) => Some(key.to_vec()),
            _ => None,
        })
    else {
        return;
    };
    let _ = ::redis::cmd("EXISTS")
        .arg(key)
        .query_async::<::redis::Value>(conn)
        .await;
}

fn read_slot(slot: &RwLock<Option<Slot>>) -> Option<(u64, RedisConnection)> {
    slot.read()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|s| (s.epoch, s.conn.clone()))
}

impl Inner {
    fn set_state(&self, state: ConnectionState) {
        // A refusing Redis is connected: commands are sent, not failed fast.
        self.up.store(
            matches!(state, ConnectionState::Up | ConnectionState::Refusing),
            Ordering::Release,
        );
        self.state.send_if_modified(|current| {
            let changed = *current != state;
            *current = state;
            changed
        });
    }

    /// A fresh connection answered: make it the command connection.
    /// `refused`: the connection answers, but PING was refused for now (see
    /// `Target::connect`): installed as refusing.
    fn install(&self, conn: RedisConnection, refused: Option<String>, target: &Target) {
        if let Target::Sentinel(sentinel) = target {
            let found = sentinel.current();
            let previous = std::mem::replace(
                &mut *self.master.write().unwrap_or_else(|e| e.into_inner()),
                found.clone(),
            );
            let addr = |info: &Option<::redis::ConnectionInfo>| {
                info.as_ref().map(|i| i.addr().to_string())
            };
            if previous.is_some() && addr(&previous) != addr(&found) {
                self.master_changes.send_modify(|n| *n += 1);
            }
        }
        let epoch = self.next_epoch.fetch_add(1, Ordering::Relaxed);
        *self.slot.write().unwrap_or_else(|e| e.into_inner()) = Some(Slot { epoch, conn });
        self.current_epoch.store(epoch, Ordering::Release);
        if self.ever_up.swap(true, Ordering::AcqRel) {
            let n = self.reconnects.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::info!(reconnects = n, "redis connection re-established");
        } else {
            tracing::info!("redis connected");
        }
        match refused {
            None => self.set_state(ConnectionState::Up),
            Some(why) => {
                self.set_state(ConnectionState::Refusing);
                self.warnings.warn(
                    "refused",
                    format_args!("redis refuses writes ({why}); messages wait unacked until it takes them again"),
                );
            }
        }
    }

    /// The connection of `epoch` failed. Ignored when a newer one replaced it meanwhile.
    fn mark_down(&self, epoch: u64, why: &dyn std::fmt::Display) {
        if self.current_epoch.load(Ordering::Acquire) != epoch {
            return;
        }
        if self.up.swap(false, Ordering::AcqRel) {
            self.warnings.warn(
                "connection",
                format_args!("redis connection lost ({why}); failing fast while reconnecting"),
            );
            self.set_state(ConnectionState::Down);
        }
        self.wake.notify_one();
    }

    /// The connection of `epoch` got a refusal: Redis is up but does not take writes.
    fn mark_refusing(&self, epoch: u64, why: &str) {
        if self.current_epoch.load(Ordering::Acquire) != epoch {
            return;
        }
        let changed = self.state.send_if_modified(|current| {
            let refusing = *current == ConnectionState::Up;
            if refusing {
                *current = ConnectionState::Refusing;
            }
            refusing
        });
        if changed {
            self.warnings.warn(
                "refused",
                format_args!(
                    "redis refuses writes ({why}); messages wait unacked until it takes them again"
                ),
            );
            self.wake.notify_one();
        }
    }

    /// A `WAIT` on the connection of `epoch` counted enough replicas: a refusal caused by
    /// short `WAIT`s ends here. (Under load writers are always waiting, so waiting for
    /// none to wait would keep `refusing` forever.) A refusal of another kind at the same
    /// time (`OOM`) shows again at its next write.
    fn replicas_caught_up(&self, epoch: u64) {
        if self.replicas_short.swap(false, Ordering::AcqRel)
            && self.current_epoch.load(Ordering::Acquire) == epoch
            && self.is_refusing()
        {
            tracing::info!("redis replicas acknowledge writes again");
            self.set_state(ConnectionState::Up);
        }
    }

    fn is_refusing(&self) -> bool {
        *self.state.borrow() == ConnectionState::Refusing
    }

    fn clear(&self) {
        self.current_epoch.store(0, Ordering::Release);
        self.set_state(ConnectionState::Down);
        *self.slot.write().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// The health task: PING while up, reconnect with backoff while down. Holds only a `Weak`
/// between rounds, so dropping the last manager clone ends it.
async fn health_loop(inner: Weak<Inner>, wake: Arc<Notify>, target: Target) {
    let mut backoff = Backoff::new(RECONNECT_MIN_DELAY, RECONNECT_MAX_DELAY);
    // When the sentinels were last asked whether the master moved (rate-limited).
    let mut looked_up: Option<Instant> = None;
    loop {
        let up = match inner.upgrade() {
            Some(inner) => inner.up.load(Ordering::Acquire),
            None => return,
        };
        if up {
            backoff.reset();
            let wait = match inner.upgrade() {
                Some(inner) if inner.is_refusing() => REFUSAL_PROBE_INTERVAL,
                Some(_) => HEALTH_INTERVAL,
                None => return,
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = wake.notified() => {}
            }
        } else {
            tokio::time::sleep(backoff.next_delay()).await;
        }
        let Some(inner) = inner.upgrade() else { return };
        inner.heartbeat.beat();
        if inner.up.load(Ordering::Acquire) {
            if let Some((epoch, mut conn)) = read_slot(&inner.slot) {
                if inner.is_refusing() {
                    // A demoted master answers READONLY while the sentinels already name
                    // its successor: reconnect there (through the sentinels) at once.
                    let due = looked_up.is_none_or(|t| t.elapsed() >= SENTINEL_LOOKUP_INTERVAL);
                    if let (Target::Sentinel(sentinel), true) = (&target, due) {
                        looked_up = Some(Instant::now());
                        if sentinel.master_moved().await {
                            inner.mark_down(epoch, &"the sentinels name a new master");
                            continue;
                        }
                    }
                    probe_writes(&inner, epoch, &mut conn).await;
                    continue;
                }
                let ping = ::redis::cmd("PING").query_async::<String>(&mut conn).await;
                match ping.map_err(Error::from) {
                    Ok(_) => {}
                    // Loading a dataset, a busy script: connected, but not answering.
                    Err(Error::Refused(why)) => inner.mark_refusing(epoch, &why),
                    // Lost or stuck: commands will not work either.
                    Err(e) => inner.mark_down(epoch, &e),
                }
            }
        } else {
            match target.connect(&inner.config).await {
                Ok((conn, refused)) => inner.install(conn, refused, &target),
                Err(e) => inner.warnings.warn(
                    "connection",
                    format_args!("redis still unavailable: {e}; retrying"),
                ),
            }
        }
    }
}

/// Sentinel mode: a `+switch-master` of our master to an address other than the one
/// connected to marks the connection down at once, so the health task reconnects through
/// the sentinels without waiting for the old master to fail a command or be demoted.
async fn watch_switches(inner: Weak<Inner>, sentinel: crate::connection::SentinelTarget) {
    let target = sentinel.clone();
    target
        .watch_switches(|host, port| {
            let Some(inner) = inner.upgrade() else {
                return false;
            };
            if port != 0 {
                tracing::info!(master = %format!("{host}:{port}"), "the sentinels announced +switch-master");
                if !sentinel.is_current(&host, port) {
                    let epoch = inner.current_epoch.load(Ordering::Acquire);
                    inner.mark_down(epoch, &"the sentinels switched to a new master");
                }
            }
            true
        })
        .await;
}

/// While refusing: a write that changes nothing. Accepted (or refused for any reason that is
/// not a refusal, such as an ACL without that key) → up again.
async fn probe_writes(inner: &Inner, epoch: u64, conn: &mut RedisConnection) {
    let probe = ::redis::cmd("SET")
        .arg(REFUSAL_PROBE_KEY)
        .arg("")
        .arg("XX")
        .query_async::<::redis::Value>(conn)
        .await;
    match probe.map_err(Error::from) {
        Err(Error::Refused(_)) => {}
        Err(e @ (Error::Unavailable(_) | Error::Timeout)) => inner.mark_down(epoch, &e),
        _ => {
            // A refusal from short WAITs ends with a WAIT that counts enough replicas
            // (`replicas_caught_up`); with no write waiting there is none to send, and the
            // next write finds out again.
            let replicas_pending = inner.replicas_short.load(Ordering::Acquire)
                && inner.waiting_for_replicas.load(Ordering::Acquire) > 0;
            if inner.current_epoch.load(Ordering::Acquire) == epoch
                && inner.is_refusing()
                && !replicas_pending
            {
                inner.replicas_short.store(false, Ordering::Release);
                tracing::info!("redis takes writes again");
                inner.set_state(ConnectionState::Up);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::redis::Value;

    fn node(host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::BulkString(host.as_bytes().to_vec()),
            Value::Int(port),
            Value::BulkString(b"0123abcd".to_vec()),
        ])
    }

    #[test]
    fn cluster_slots_are_read_master_first_and_unknown_endpoints_keep_their_place() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("10.0.0.1", 7000),
                node("10.0.0.4", 7003),
            ]),
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(10922),
                node("?", 7001),
                node("10.0.0.5", 7004),
            ]),
            Value::Array(vec![Value::Int(10923)]),
        ]);
        assert_eq!(
            cluster_slots(&reply),
            vec![
                (
                    0,
                    5460,
                    vec![
                        Some(("10.0.0.1".to_string(), 7000)),
                        Some(("10.0.0.4".to_string(), 7003))
                    ]
                ),
                (
                    5461,
                    10922,
                    vec![None, Some(("10.0.0.5".to_string(), 7004))]
                ),
            ]
        );
        assert!(cluster_slots(&Value::Nil).is_empty());
    }

    #[test]
    fn a_moving_slot_is_told_from_other_transaction_errors() {
        let error = |reply: &str| {
            ::redis::parse_redis_value(reply.as_bytes())
                .expect("a RESP reply")
                .extract_error()
                .expect_err("an error")
        };
        assert!(slot_on_the_move(&error("-MOVED 3999 127.0.0.1:6381\r\n")));
        assert!(slot_on_the_move(&error("-ASK 3999 127.0.0.1:6381\r\n")));
        assert!(slot_on_the_move(&error(
            "-TRYAGAIN Multiple keys request during rehashing of slot\r\n"
        )));
        assert!(!slot_on_the_move(&error(
            "-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"
        )));
    }
}
