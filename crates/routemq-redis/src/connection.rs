//! How the manager reaches Redis: one server (plain or TLS) or a cluster, behind one type.
//!
//! [`RedisConnection`] wraps a [`ConnectionManager`] (one multiplexed connection to one
//! server, made again by itself after a drop), a plain [`MultiplexedConnection`] (Sentinel
//! mode: one server-side connection for its whole life, see below) or an async
//! [`ClusterConnection`] (one multiplexed connection per node, routed by slot), and
//! implements `ConnectionLike`, so every command, pipeline and script in the crate is
//! written once and runs on all three. `Target` is the recipe for making one from a
//! [`RedisConfig`]; it is also where credentials and timeouts are applied, so there is one
//! place that touches the password.
//!
//! Every socket it opens, the command connection's and the dedicated ones' alike, carries
//! TCP keepalive and `TCP_USER_TIMEOUT` derived from `socket_timeout` (`tcp_settings`), so
//! the kernel gives up on a peer gone silent without FIN or RST (a cable pulled, a NAT that
//! forgot the flow) in about 2 × `socket_timeout` instead of the ~15 minutes of TCP's own
//! retransmissions (spec §6). A Redis process that froze still has its kernel ACKing: that
//! silence is caught above the socket, by the response timeout, the health PING, the
//! subscriber's PING and the stream readers' deadlines.
//!
//! Cluster mode follows the same code paths; the daemon's integration tests run it against
//! a real six-node cluster (tests/it/cluster.rs). Multi-key commands, MULTI/EXEC, scripts
//! and pipelines must keep their keys in one slot with hash tags (`{device}:a`,
//! `{device}:b`): the cluster client sends a pipeline to one node and refuses one whose
//! keys span slots (`CrossSlot`) before sending it — `RedisManager::query_pipeline_spread`
//! sends a plain pipeline's commands one by one instead, each to its key's node.
//!
//! Sentinel mode (`[redis.sentinel]`, spec §10) is a single-server connection whose address
//! is asked of the sentinels at every connect: `Target::Sentinel` asks them in turn
//! `SENTINEL get-master-addr-by-name <master>`, connects there
//! with `[redis]`'s credentials and TLS, and accepts the connection only when `ROLE` says
//! `master` (a replica being promoted, or an old master not yet demoted, is passed over).
//! One such round (all sentinels and masters tried) is bounded by one connection budget
//! (`socket_connect_timeout + socket_timeout`), like a single server's connect, so the
//! health task keeps its heartbeat (the watchdog's `redis` limit) even when a frozen master
//! is named by every sentinel; an address already tried in the round is not tried again,
//! and the next round starts with the sentinel after the last one that failed, so a frozen
//! sentinel does not take every round.
//! The manager's health task reconnects through it after a lost connection, and asks the
//! sentinels again while the master refuses writes (`READONLY` from a demoted master), so
//! every failover is followed; the address last connected to is what dedicated
//! connections (subscribers, stream readers) use. A task of the manager also listens for
//! `+switch-master` on one sentinel at a time (one connection to a sentinel, not counted
//! against `max_connections`) and marks the connection down as soon as the sentinels
//! announce a master other than the one connected to: that only hurries what the lost
//! connection or `READONLY` would tell a moment later.
//! The Sentinel command connection is a plain [`MultiplexedConnection`], not a
//! `ConnectionManager`: `WAIT` only counts the writes made on the server-side connection it
//! is sent on, and the manager's "acked means replicated" holds per connection epoch. A
//! `ConnectionManager` would silently reconnect to the same address within one epoch, and a
//! `WAIT` on the fresh connection answers at once with the replicas online, covering
//! nothing. A plain connection fails every call once lost, so the manager marks it down
//! and the health task connects again, through the sentinels, as a new epoch.
//! (redis-rs's own `sentinel` module finds a master too, but asks each sentinel with no
//! connect or response timeout — one silent sentinel would stall every reconnection — and
//! keeps the address to itself, which dedicated connections and `+switch-master` need.)

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use ::redis::cluster::{ClusterClient, ClusterClientBuilder};
use ::redis::cluster_async::ClusterConnection;
use ::redis::io::tcp::{socket2::TcpKeepalive, TcpSettings};
use ::redis::{
    Client, Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisFuture, Value,
};

use super::config::RedisConfig;
use super::error::{Error, Result};

/// The command connection: what [`super::RedisManager::get_client`] hands out for
/// pipelines, scripts and anything the manager has no method for. Clones share the
/// underlying connection. `Single` and `Cluster` reconnect on their own after a dropped
/// connection; `Plain` never does (see the module doc, Sentinel).
#[derive(Clone)]
pub enum RedisConnection {
    Single(ConnectionManager),
    /// Sentinel mode: one server-side connection; once lost, every call fails.
    Plain(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for RedisConnection {
    // The library's own Debug prints the connection info, password included: never use it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisConnection::Single(_) => f.write_str("RedisConnection::Single"),
            RedisConnection::Plain(_) => f.write_str("RedisConnection::Plain"),
            RedisConnection::Cluster(_) => f.write_str("RedisConnection::Cluster"),
        }
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Single(c) => c.req_packed_command(cmd),
            RedisConnection::Plain(c) => c.req_packed_command(cmd),
            RedisConnection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConnection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConnection::Plain(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConnection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Single(c) => c.get_db(),
            RedisConnection::Plain(c) => c.get_db(),
            RedisConnection::Cluster(c) => c.get_db(),
        }
    }
}

/// Shortest and longest wait (ms) of the cluster client before it retries a command
/// (jittered, doubling from 20 ms per retry in between).
const CLUSTER_RETRY_MIN_WAIT_MS: u64 = 10;
const CLUSTER_RETRY_MAX_WAIT_MS: u64 = 250;

/// Where and how to connect, built once per `initialize` from the config.
#[derive(Clone)]
pub(crate) enum Target {
    Single {
        client: Client,
        config: ConnectionManagerConfig,
    },
    Cluster(ClusterClient),
    Sentinel(Box<SentinelTarget>),
}

/// How to find and reach the master the sentinels name.
#[derive(Clone)]
pub(crate) struct SentinelTarget {
    master: String,
    /// The sentinels, with the sentinels' credentials, asked in turn.
    sentinels: Vec<ConnectionInfo>,
    /// The data connection's settings (credentials, database, TLS, TCP); its address is
    /// replaced by the master's.
    data: ConnectionInfo,
    connect_timeout: Duration,
    response_timeout: Duration,
    /// The master last connected to.
    current: Arc<Mutex<Option<ConnectionInfo>>>,
    /// The sentinel a connect round asks first: the one after the last that failed.
    first: Arc<std::sync::atomic::AtomicUsize>,
}

impl Target {
    pub(crate) fn from_config(config: &RedisConfig) -> Result<Target> {
        crate::tls::install_crypto_provider();
        if let Some(sentinel) = &config.sentinel {
            return SentinelTarget::from_config(config, sentinel)
                .map(|s| Target::Sentinel(Box::new(s)));
        }
        if config.cluster.is_empty() {
            let client = Client::open(connection_info(config)?)
                .map_err(|e| Error::Invalid(format!("redis connection settings: {e}")))?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(config.socket_connect_timeout))
                .set_response_timeout(Some(config.socket_timeout))
                // The manager's health task owns reconnection (with our backoff, our state
                // and our counters); the library makes one attempt per failed use.
                .set_number_of_retries(0);
            Ok(Target::Single { client, config })
        } else {
            let nodes = config
                .cluster
                .iter()
                .map(|node| {
                    node.expose()
                        .into_connection_info()
                        .map_err(|e| Error::Invalid(format!("redis cluster node: {e}")))
                })
                .collect::<Result<Vec<_>>>()?;
            let mut builder = ClusterClientBuilder::new(nodes)
                .connection_timeout(config.socket_connect_timeout)
                .response_timeout(config.socket_timeout)
                // The library waits at least 1.28 s before each retry of a command answered
                // `TRYAGAIN`/`CLUSTERDOWN` or sent while the slot map is rebuilt: two of
                // those outlast a `socket_timeout` of 2 s, and a timeout makes the manager
                // drop the connection. A slot migrating under load needs a few ms.
                .min_retry_wait(CLUSTER_RETRY_MIN_WAIT_MS)
                .max_retry_wait(CLUSTER_RETRY_MAX_WAIT_MS)
                .tcp_settings(tcp_settings(TcpSettings::default(), config.socket_timeout));
            if let Some(username) = &config.username {
                builder = builder.username(username);
            }
            if let Some(password) = &config.password {
                builder = builder.password(password.expose());
            }
            let client = builder
                .build()
                .map_err(|e| Error::Invalid(format!("redis cluster settings: {e}")))?;
            Ok(Target::Cluster(client))
        }
    }

    /// Opens a fresh command connection and proves it with a PING, all within
    /// `connect_timeout + response_timeout`.
    /// A fresh connection, proven by PING. A PING that Redis refuses for now (`MISCONF`,
    /// `LOADING`, …) still yields the connection, with the refusal: the manager installs it
    /// as refusing, so it reports `refusing` rather than `down` and notices the recovery.
    pub(crate) async fn connect(
        &self,
        config: &RedisConfig,
    ) -> Result<(RedisConnection, Option<String>)> {
        if let Target::Sentinel(sentinel) = self {
            return sentinel.connect().await;
        }
        let budget = config.socket_connect_timeout + config.socket_timeout;
        let attempt = async {
            let mut conn = match self {
                // Lazy: the connection is made by the PING below, within its timeouts.
                Target::Single { client, config } => RedisConnection::Single(
                    ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?,
                ),
                Target::Cluster(client) => {
                    RedisConnection::Cluster(client.get_async_connection().await?)
                }
                Target::Sentinel(_) => unreachable!("handled above"),
            };
            let ping = ::redis::cmd("PING").query_async::<String>(&mut conn).await;
            Ok::<_, ::redis::RedisError>((conn, ping))
        };
        match tokio::time::timeout(budget + Duration::from_millis(100), attempt).await {
            Ok(Ok((conn, Ok(_)))) => Ok((conn, None)),
            Ok(Ok((conn, Err(e)))) => match Error::from(e) {
                Error::Refused(why) => Ok((conn, Some(why))),
                other => Err(other),
            },
            Ok(Err(e)) => Err(Error::from(e)),
            Err(_) => Err(Error::Timeout),
        }
    }
}

impl SentinelTarget {
    fn from_config(
        config: &RedisConfig,
        sentinel: &crate::config::SentinelConfig,
    ) -> Result<SentinelTarget> {
        if let Some((key, message)) = sentinel.problem() {
            return Err(Error::Invalid(format!("redis.sentinel.{key}: {message}")));
        }
        let sentinels = sentinel
            .nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                let info = node
                    .expose()
                    .into_connection_info()
                    .map_err(|e| Error::Invalid(format!("redis.sentinel.nodes: node {i}: {e}")))?;
                let mut redis = info.redis_settings().clone();
                if let Some(username) = &sentinel.username {
                    redis = redis.set_username(username);
                }
                if let Some(password) = &sentinel.password {
                    redis = redis.set_password(password.expose());
                }
                let tcp = tcp_settings(info.tcp_settings().clone(), config.socket_timeout);
                Ok(info.set_redis_settings(redis).set_tcp_settings(tcp))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SentinelTarget {
            master: sentinel.master.clone(),
            sentinels,
            data: connection_info(config)?,
            connect_timeout: config.socket_connect_timeout,
            response_timeout: config.socket_timeout,
            current: Arc::new(Mutex::new(None)),
            first: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        })
    }

    /// The master last connected to (for dedicated connections).
    pub(crate) fn current(&self) -> Option<ConnectionInfo> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn budget(&self) -> Duration {
        self.connect_timeout + self.response_timeout + Duration::from_millis(100)
    }

    /// What sentinel `i` names as the master: `host:port`.
    async fn ask(&self, i: usize) -> Result<Option<(String, u16)>> {
        let info = self.sentinels[i].clone();
        let attempt = async {
            let client = Client::open(info)?;
            let config = ::redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(self.connect_timeout))
                .set_response_timeout(Some(self.response_timeout));
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            ::redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(&self.master)
                .query_async::<Option<(String, u16)>>(&mut conn)
                .await
        };
        match tokio::time::timeout(self.budget(), attempt).await {
            Ok(result) => result.map_err(Error::from),
            Err(_) => Err(Error::Timeout),
        }
    }

    /// The master's address as the first sentinel that answers names it.
    pub(crate) async fn discover(&self) -> Result<(String, u16)> {
        let mut last = Error::Unavailable("no sentinel configured".into());
        for i in 0..self.sentinels.len() {
            match self.ask(i).await {
                Ok(Some(addr)) => return Ok(addr),
                Ok(None) => {
                    last = Error::Unavailable(format!(
                        "sentinel {i} does not know master {:?}",
                        self.master
                    ))
                }
                Err(e) => last = Error::Unavailable(format!("sentinel {i}: {e}")),
            }
        }
        Err(last)
    }

    /// Whether the sentinels now name a master other than the one connected to.
    pub(crate) async fn master_moved(&self) -> bool {
        let Ok((host, port)) = self.discover().await else {
            return false;
        };
        match self.current() {
            Some(info) => !same_addr(info.addr(), &host, port),
            None => true,
        }
    }

    /// Waits on one sentinel after another for a `+switch-master` of our master and calls
    /// `switched` with the new address each time; ends when `switched` returns false (the
    /// manager is gone). A sentinel that cannot be reached or drops the subscription is
    /// left for the next one after a pause: this only hurries what the health task notices
    /// anyway (the lost connection, `READONLY`).
    pub(crate) async fn watch_switches(&self, mut switched: impl FnMut(String, u16) -> bool) {
        let mut backoff =
            crate::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut i = 0;
        loop {
            let info = self.sentinels[i % self.sentinels.len()].clone();
            i += 1;
            let subscribe = async {
                let client = Client::open(info)?;
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe("+switch-master").await?;
                Ok::<_, ::redis::RedisError>(pubsub)
            };
            if let Ok(Ok(mut pubsub)) = tokio::time::timeout(self.budget(), subscribe).await {
                backoff.reset();
                let mut messages = pubsub.on_message();
                while let Some(message) = futures_util::StreamExt::next(&mut messages).await {
                    let Ok(text) = message.get_payload::<String>() else {
                        continue;
                    };
                    // `<name> <old-ip> <old-port> <new-ip> <new-port>`
                    let fields: Vec<&str> = text.split(' ').collect();
                    if let [name, _, _, host, port] = fields.as_slice() {
                        if *name != self.master {
                            continue;
                        }
                        let Ok(port) = port.parse::<u16>() else {
                            continue;
                        };
                        if !switched(host.to_string(), port) {
                            return;
                        }
                    }
                }
            }
            if !switched(String::new(), 0) {
                return;
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// Whether `host:port` is the master connected to now.
    pub(crate) fn is_current(&self, host: &str, port: u16) -> bool {
        self.current()
            .is_some_and(|info| same_addr(info.addr(), host, port))
    }

    fn data_info(&self, host: String, port: u16) -> ConnectionInfo {
        let addr = match self.data.addr() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host,
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(host, port),
        };
        self.data.clone().set_addr(addr)
    }

    /// Asks the sentinels in turn; connects to the first master named that says it is one.
    /// The whole round within one [`SentinelTarget::budget`] (see the module doc).
    async fn connect(&self) -> Result<(RedisConnection, Option<String>)> {
        use std::sync::atomic::Ordering;
        let mut last = Error::Unavailable("no sentinel configured".into());
        let deadline = tokio::time::Instant::now() + self.budget();
        let n = self.sentinels.len();
        let first = self.first.load(Ordering::Relaxed);
        let mut tried: Vec<(String, u16)> = Vec::new();
        for i in (first..first + n).map(|i| i % n) {
            // Whatever fails moves the next round's start past this sentinel.
            self.first.store(i + 1, Ordering::Relaxed);
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Unavailable(format!(
                    "no master found within {:?}: {last}",
                    self.budget()
                )));
            }
            let asked = match tokio::time::timeout_at(deadline, self.ask(i)).await {
                Ok(asked) => asked,
                Err(_) => Err(Error::Timeout),
            };
            let (host, port) = match asked {
                Ok(Some(addr)) => addr,
                Ok(None) => {
                    last = Error::Unavailable(format!(
                        "sentinel {i} does not know master {:?}",
                        self.master
                    ));
                    continue;
                }
                Err(e) => {
                    last = Error::Unavailable(format!("sentinel {i}: {e}"));
                    continue;
                }
            };
            if tried.contains(&(host.clone(), port)) {
                continue; // failed already in this round
            }
            tried.push((host.clone(), port));
            let info = self.data_info(host.clone(), port);
            match tokio::time::timeout_at(deadline, self.open(info.clone())).await {
                Ok(Ok(pair)) => {
                    self.first.store(i, Ordering::Relaxed);
                    tracing::info!(master = %format!("{host}:{port}"), name = %self.master, "redis master found by the sentinels");
                    *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(info);
                    return Ok(pair);
                }
                Ok(Err(e)) => {
                    last = Error::Unavailable(format!("master {host}:{port}: {e}"));
                }
                Err(_) => last = Error::Unavailable(format!("master {host}:{port}: timed out")),
            }
        }
        Err(last)
    }

    /// A connection to `info`, proven by PING and by `ROLE` saying `master`.
    async fn open(&self, info: ConnectionInfo) -> Result<(RedisConnection, Option<String>)> {
        let client = Client::open(info).map_err(|e| Error::Invalid(e.to_string()))?;
        // Plain, not a ConnectionManager: one epoch of the manager is one server-side
        // connection, so a `WAIT` covers the writes made before it (module doc).
        let config = ::redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.response_timeout));
        let mut conn = RedisConnection::Plain(
            client
                .get_multiplexed_async_connection_with_config(&config)
                .await?,
        );
        let refused = match ::redis::cmd("PING").query_async::<String>(&mut conn).await {
            Ok(_) => None,
            Err(e) => match Error::from(e) {
                Error::Refused(why) => Some(why),
                other => return Err(other),
            },
        };
        let role = ::redis::cmd("ROLE")
            .query_async::<Vec<Value>>(&mut conn)
            .await?;
        match role.first() {
            Some(Value::BulkString(r)) if r.as_slice() == b"master" => Ok((conn, refused)),
            Some(Value::SimpleString(r)) if r == "master" => Ok((conn, refused)),
            _ => Err(Error::Unavailable(
                "not a master (yet): the sentinels are failing over".into(),
            )),
        }
    }
}

fn same_addr(addr: &ConnectionAddr, host: &str, port: u16) -> bool {
    match addr {
        ConnectionAddr::Tcp(h, p)
        | ConnectionAddr::TcpTls {
            host: h, port: p, ..
        } => h == host && *p == port,
        _ => false,
    }
}

/// The address, database and credentials for one server: `url` when set, else
/// host/port/db; `username`/`password` from the config override the URL's.
pub(crate) fn connection_info(config: &RedisConfig) -> Result<ConnectionInfo> {
    let info = match &config.url {
        Some(url) => url
            .expose()
            .into_connection_info()
            // The library's message never repeats the URL, which may hold a password.
            .map_err(|e| Error::Invalid(format!("REDIS_URL: {e}")))?,
        None => ConnectionAddr::Tcp(config.host.clone(), config.port)
            .into_connection_info()
            .map_err(|e| Error::Invalid(format!("redis host/port: {e}")))?,
    };
    let mut redis = info.redis_settings().clone();
    if config.url.is_none() {
        redis = redis.set_db(config.db);
    }
    if let Some(username) = &config.username {
        redis = redis.set_username(username);
    }
    if let Some(password) = &config.password {
        redis = redis.set_password(password.expose());
    }
    let tcp = tcp_settings(info.tcp_settings().clone(), config.socket_timeout);
    Ok(info.set_redis_settings(redis).set_tcp_settings(tcp))
}

/// Longest `socket_timeout` the TCP settings follow: the kernel takes keepalive times in
/// seconds up to 32,767, and a silence of hours is no longer "noticed" anyway.
const TCP_TIMEOUT_CAP: Duration = Duration::from_secs(3600);

/// `base` with keepalive and `TCP_USER_TIMEOUT` set so that a silent peer is dropped by the
/// kernel about 2 × `socket_timeout` after the last byte it sent: probes start after one
/// `socket_timeout` of silence and the connection is given up after two, whether the
/// silence falls on an idle connection (keepalive) or on one with data unacknowledged
/// (user timeout). Keepalive counts in whole seconds, hence the rounding.
pub(crate) fn tcp_settings(base: TcpSettings, socket_timeout: Duration) -> TcpSettings {
    let timeout = socket_timeout.min(TCP_TIMEOUT_CAP);
    let idle = (timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0)).max(1);
    let interval = (idle / 4).max(1);
    let retries = u32::try_from(idle.div_ceil(interval)).unwrap_or(u32::MAX);
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(idle))
        .with_interval(Duration::from_secs(interval))
        .with_retries(retries);
    let settings = base.set_keepalive(keepalive);
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    let settings = settings.set_user_timeout(2 * timeout);
    settings
}

/// True when `e` means the connection is gone or stuck (not that Redis refused a command):
/// the manager then stops sending and lets its health task reconnect.
pub(crate) fn is_connection_loss(e: &::redis::RedisError) -> bool {
    e.is_timeout()
        || e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn credentials_apply_to_a_url_and_to_host_port() {
        let mut config = RedisConfig {
            url: Some(Secret::new("redis://:old@example.org:6390/3")),
            username: Some("bridge".into()),
            password: Some(Secret::new("0123")),
            ..RedisConfig::default()
        };
        let info = connection_info(&config).expect("valid url");
        assert_eq!(info.redis_settings().username(), Some("bridge"));
        assert_eq!(info.redis_settings().password(), Some("0123"));
        assert_eq!(info.redis_settings().db(), 3);
        assert_eq!(info.addr().to_string(), "example.org:6390");

        config.url = None;
        config.host = "10.0.0.7".into();
        config.port = 6400;
        config.db = 2;
        let info = connection_info(&config).expect("valid host");
        assert_eq!(info.addr().to_string(), "10.0.0.7:6400");
        assert_eq!(info.redis_settings().db(), 2);
        assert_eq!(info.redis_settings().password(), Some("0123"));
    }

    #[test]
    fn every_connection_gives_up_on_a_silent_peer_after_about_two_socket_timeouts() {
        let config = RedisConfig {
            socket_timeout: Duration::from_secs(5),
            ..RedisConfig::default()
        };
        let info = connection_info(&config).expect("valid config");
        assert!(info.tcp_settings().keepalive().is_some());
        #[cfg(target_os = "linux")]
        assert_eq!(
            info.tcp_settings().user_timeout(),
            Some(Duration::from_secs(10))
        );
        // Silence on an idle connection: probes after `idle`, given up `retries` probes of
        // `interval` later.
        for (timeout, idle, interval, retries) in [
            (Duration::from_millis(200), 1, 1, 1),
            (Duration::from_secs(1), 1, 1, 1),
            (Duration::from_millis(1500), 2, 1, 2),
            (Duration::from_secs(5), 5, 1, 5),
            (Duration::from_secs(30), 30, 7, 5),
            (Duration::from_secs(10 * 365 * 24 * 3600), 3600, 900, 4),
        ] {
            let settings = tcp_settings(TcpSettings::default(), timeout);
            let expected = TcpKeepalive::new()
                .with_time(Duration::from_secs(idle))
                .with_interval(Duration::from_secs(interval))
                .with_retries(retries);
            assert_eq!(
                format!("{:?}", settings.keepalive()),
                format!("{:?}", Some(&expected)),
                "socket_timeout {timeout:?}"
            );
        }
    }

    #[test]
    fn rediss_url_means_tls() {
        let config = RedisConfig {
            url: Some(Secret::new("rediss://redis.example.org:6380")),
            ..RedisConfig::default()
        };
        let info = connection_info(&config).expect("valid url");
        assert!(matches!(info.addr(), ConnectionAddr::TcpTls { .. }));
    }

    #[test]
    fn a_bad_url_is_invalid_and_does_not_echo_the_password() {
        let config = RedisConfig {
            url: Some(Secret::new("http://user:hunter2@host")),
            ..RedisConfig::default()
        };
        let err = connection_info(&config).expect_err("http is not redis");
        assert!(matches!(err, Error::Invalid(_)));
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
}
