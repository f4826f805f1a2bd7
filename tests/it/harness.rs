//! The test harness: real `redis-server` and `mosquitto` processes, each on a free loopback
//! port in a temporary directory of its own, so tests run in parallel, never touch the
//! machine's services on 6379/1883, and can stop and restart a service on the same port to
//! prove recovery. Every process is killed and its directory removed when its handle drops,
//! also when the test panics.

#![allow(dead_code)] // each test module uses a different part of the harness

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a service may take to start listening before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Finds `name` on `PATH` or in `/usr/sbin` (where Debian puts `mosquitto`), or fails the
/// test with the Debian package that provides it.
pub fn find_binary(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!("`{name}` not found on PATH or in /usr/sbin: install it with `apt-get install -y {package}`")
        })
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral loopback port");
    listener.local_addr().expect("local addr").port()
}

/// Sends `signal` to the process `pid`.
pub fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Waits for `child` to exit, killing it after `timeout`. Returns its exit status.
pub fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One service process: how to start it, and the running child if any.
struct Service {
    name: &'static str,
    binary: PathBuf,
    args: Vec<String>,
    dir: TempDir,
    port: u16,
    child: Option<Child>,
    ready: fn(u16) -> bool,
}

impl Service {
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let log = std::fs::File::create(self.dir.path().join("stdout.log")).expect("log file");
        let mut child = Command::new(&self.binary)
            .args(&self.args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.binary.display()));
        let deadline = Instant::now() + START_TIMEOUT;
        // No event tells us a server is listening: poll its port, bounded.
        while !(self.ready)(self.port) {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{} exited with {status} before listening on {}: {}",
                    self.name,
                    self.port,
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!(
                    "{} did not listen on {} within {START_TIMEOUT:?}",
                    self.name, self.port
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child = Some(child);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout.log")).unwrap_or_default()
    }

    /// SIGTERM (a clean shutdown: mosquitto saves its persistence) and wait.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGTERM);
            if wait_with_timeout(&mut child, Duration::from_secs(10)).is_none() {
                panic!("{} did not stop within 10 s of SIGTERM", self.name);
            }
        }
    }

    /// SIGKILL and wait.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

fn redis_ready(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    // `+PONG`, or `-NOAUTH …` from a server started with a password: listening either way.
    let mut buf = [0u8; 7];
    stream.read_exact(&mut buf).is_ok() && (&buf == b"+PONG\r\n" || buf.starts_with(b"-NOAUTH"))
}

fn tcp_ready(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// A private `redis-server`. It keeps nothing on disk, so a restart starts empty.
pub struct Redis(Service);

impl Redis {
    pub fn start() -> Redis {
        Self::start_with(&[])
    }

    /// Starts with extra `redis-server` arguments, e.g. `["--requirepass", "secret"]`.
    pub fn start_with(extra: &[&str]) -> Redis {
        let binary = find_binary("redis-server", "redis-server");
        let dir = tempfile::Builder::new()
            .prefix("routemq-bridge-redis-")
            .tempdir()
            .expect("tempdir");
        let port = free_port();
        let mut args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            &dir.path().display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut service = Service {
            name: "redis-server",
            binary,
            args,
            dir,
            port,
            child: None,
            ready: redis_ready,
        };
        service.spawn();
        Redis(service)
    }

    pub fn port(&self) -> u16 {
        self.0.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.0.port)
    }

    /// A manager config for this server, with short timeouts so failures show quickly.
    pub fn manager_config(&self) -> routemq_bridge::redis::RedisConfig {
        routemq_bridge::redis::RedisConfig {
            url: Some(routemq_bridge::config::Secret::new(self.url())),
            socket_timeout: Duration::from_secs(2),
            socket_connect_timeout: Duration::from_secs(2),
            ..Default::default()
        }
    }

    /// A connected manager for this server.
    pub async fn manager(&self) -> routemq_bridge::redis::RedisManager {
        let manager = routemq_bridge::redis::RedisManager::new(self.manager_config());
        assert!(manager.initialize().await, "connect to the test redis");
        manager
    }

    /// A plain synchronous client, for tests to look at what the bridge wrote.
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("redis url")
    }

    pub fn is_running(&self) -> bool {
        self.0.child.is_some()
    }

    pub fn stop(&mut self) {
        self.0.stop();
    }

    pub fn kill(&mut self) {
        self.0.kill();
    }

    /// Starts again on the same port (after `stop` or `kill`).
    pub fn start_again(&mut self) {
        self.0.spawn();
    }

    /// SIGSTOP: the server keeps its connections open but answers nothing — a Redis stuck
    /// on a slow disk or a long command — until [`Redis::resume`].
    pub fn pause(&mut self) {
        if let Some(child) = &self.0.child {
            signal(child.id(), libc::SIGSTOP);
        }
    }

    /// SIGCONT after [`Redis::pause`].
    pub fn resume(&mut self) {
        if let Some(child) = &self.0.child {
            signal(child.id(), libc::SIGCONT);
        }
    }

    pub fn dir(&self) -> &Path {
        self.0.dir.path()
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.0.child.as_ref().map(Child::id)
    }
}

/// How long `redis-cli --cluster create` plus the gossip may take before every node says
/// `cluster_state:ok`.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(60);

/// A private Redis Cluster of 3 masters and 3 replicas (spec §10), each node a
/// `redis-server` of its own (see [`Redis`]) with its cluster bus on a second free port (the
/// default, port + 10000, may not exist for an ephemeral port). Every node is killed by PID
/// when the handle drops; the one [`RedisCluster::shared`] instance at process exit.
pub struct RedisCluster {
    nodes: Vec<Redis>,
}

/// The cluster the tests share (each under key prefixes of its own): starting six servers
/// and letting them agree costs seconds, once per test binary instead of once per test.
static SHARED_CLUSTER: std::sync::OnceLock<RedisCluster> = std::sync::OnceLock::new();

extern "C" fn kill_shared_cluster() {
    if let Some(cluster) = SHARED_CLUSTER.get() {
        for node in &cluster.nodes {
            if let Some(pid) = node.pid() {
                signal(pid, libc::SIGKILL);
            }
            let _ = std::fs::remove_dir_all(node.dir());
        }
    }
}

impl RedisCluster {
    /// Starts six nodes, joins them with `redis-cli --cluster create --cluster-replicas 1`
    /// and waits (bounded) until every node reports `cluster_state:ok` and they agree
    /// ([`RedisCluster::wait_stable`]).
    pub fn start() -> RedisCluster {
        let nodes: Vec<Redis> = (0..6)
            .map(|_| {
                let bus = free_port().to_string();
                Redis::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                    "--cluster-port",
                    &bus,
                ])
            })
            .collect();
        let cli = find_binary("redis-cli", "redis-server");
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addresses.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "1", "--cluster-yes"]);
        run_tool(&cli, &args, nodes[0].dir());
        let cluster = RedisCluster { nodes };
        // `cluster_state:ok` everywhere, and every node agreeing on the configuration
        // (`redis-cli --cluster reshard` refuses to start otherwise).
        cluster.wait_stable();
        cluster
    }

    /// The cluster shared by every test of this binary, started by the first caller.
    pub fn shared() -> &'static RedisCluster {
        SHARED_CLUSTER.get_or_init(|| {
            // SAFETY: registers a plain function; atexit has no other precondition.
            unsafe {
                libc::atexit(kill_shared_cluster);
            }
            RedisCluster::start()
        })
    }

    /// Polls `CLUSTER INFO` on every running node until each says `cluster_state:ok` (no
    /// event tells us the gossip converged). After a node was killed this is the wait to
    /// use: `redis-cli --cluster check` ([`RedisCluster::wait_stable`]) keeps complaining
    /// about the dead one.
    pub fn wait_ok(&self) {
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            loop {
                let info: Option<String> = node
                    .client()
                    .get_connection_with_timeout(Duration::from_secs(1))
                    .ok()
                    .and_then(|mut c| redis::cmd("CLUSTER").arg("INFO").query(&mut c).ok());
                if info
                    .as_deref()
                    .is_some_and(|i| i.contains("cluster_state:ok"))
                {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "node {} not ok within {CLUSTER_TIMEOUT:?}: {info:?}",
                    node.port()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    pub fn nodes(&self) -> &[Redis] {
        &self.nodes
    }

    /// `redis://` URLs of every node: the bridge's `[redis] cluster` seeds.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Redis::url).collect()
    }

    /// `cluster = [...]` for the bridge's `[redis]` table.
    pub fn toml_seeds(&self) -> String {
        let quoted: Vec<String> = self.urls().iter().map(|u| format!("{u:?}")).collect();
        format!("cluster = [{}]", quoted.join(", "))
    }

    /// A cluster-aware client (follows MOVED/ASK), for tests to read what the bridge wrote.
    pub fn client(&self) -> redis::cluster::ClusterClient {
        redis::cluster::ClusterClient::new(self.urls()).expect("cluster client")
    }

    /// The port of the master serving `key` now (`CLUSTER KEYSLOT`, then `CLUSTER SLOTS`).
    pub fn master_of(&self, key: &str) -> u16 {
        let slot = self.slot_of(key);
        let mut conn = self.nodes[0].client().get_connection().expect("connect");
        if let Some((_, _, master)) = slot_ranges(&mut conn)
            .into_iter()
            .find(|(start, end, _)| (*start..=*end).contains(&slot))
        {
            return master;
        }
        panic!("slot {slot} of {key:?} is served by no master");
    }

    /// The slot of `key` (`CLUSTER KEYSLOT`).
    pub fn slot_of(&self, key: &str) -> u16 {
        let mut conn = self.nodes[0].client().get_connection().expect("connect");
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut conn)
            .expect("CLUSTER KEYSLOT");
        u16::try_from(slot).expect("a slot")
    }

    /// The node listening on `port`.
    pub fn node(&self, port: u16) -> &Redis {
        self.nodes
            .iter()
            .find(|n| n.port() == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
    }

    /// Mutable access to the node on `port` (to kill or stop it).
    pub fn node_mut(&mut self, port: u16) -> &mut Redis {
        self.nodes
            .iter_mut()
            .find(|n| n.port() == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
    }

    /// The cluster node id of the node on `port` (`CLUSTER MYID`).
    pub fn node_id(&self, port: u16) -> String {
        let mut conn = self.node(port).client().get_connection().expect("connect");
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query(&mut conn)
            .expect("CLUSTER MYID")
    }

    /// The node's role as `ROLE` reports it: `"master"` or `"slave"`.
    pub fn role(&self, port: u16) -> Option<String> {
        let mut conn = self
            .node(port)
            .client()
            .get_connection_with_timeout(Duration::from_secs(1))
            .ok()?;
        let role: Vec<redis::Value> = redis::cmd("ROLE").query(&mut conn).ok()?;
        match role.first() {
            Some(redis::Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            Some(redis::Value::SimpleString(s)) => Some(s.clone()),
            _ => None,
        }
    }

    /// Ports of the running nodes that say they are masters (`ROLE`), lowest first.
    pub fn masters(&self) -> Vec<u16> {
        let mut masters: Vec<u16> = self
            .nodes
            .iter()
            .filter(|n| n.is_running() && self.role(n.port()).as_deref() == Some("master"))
            .map(Redis::port)
            .collect();
        masters.sort_unstable();
        masters
    }

    /// The port of a replica of the master on `master` that is connected to it and in sync
    /// (its `ROLE` says `connected`), waiting (bounded) for one: right after the cluster was
    /// created the replicas are still syncing.
    pub fn replica_of(&self, master: u16) -> u16 {
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        loop {
            for node in self.nodes.iter().filter(|n| n.is_running()) {
                let Ok(mut conn) = node
                    .client()
                    .get_connection_with_timeout(Duration::from_secs(1))
                else {
                    continue;
                };
                let Ok(role) = redis::cmd("ROLE").query::<Vec<redis::Value>>(&mut conn) else {
                    continue;
                };
                let text = |i: usize| {
                    role.get(i)
                        .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
                };
                let of = role
                    .get(2)
                    .and_then(|v| redis::from_redis_value_ref::<u16>(v).ok());
                if text(0).as_deref() == Some("slave")
                    && of == Some(master)
                    && text(3).as_deref() == Some("connected")
                {
                    return node.port();
                }
            }
            assert!(
                Instant::now() < deadline,
                "master {master} has no replica in sync within {CLUSTER_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `CLUSTER FAILOVER` on the replica on `replica` (see [`RedisCluster::replica_of`]),
    /// then waits (bounded) until it reports itself master.
    pub fn promote(&self, replica: u16) {
        let mut conn = self
            .node(replica)
            .client()
            .get_connection()
            .expect("connect");
        let _: () = redis::cmd("CLUSTER")
            .arg("FAILOVER")
            .query(&mut conn)
            .expect("CLUSTER FAILOVER");
        self.wait_master(replica, CLUSTER_TIMEOUT);
    }

    /// Waits until the node on `replica` reports itself master (`ROLE`), within `timeout`:
    /// after `CLUSTER FAILOVER`, or after its master died and the cluster promoted it.
    pub fn wait_master(&self, replica: u16, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.role(replica).as_deref() != Some("master") {
            assert!(
                Instant::now() < deadline,
                "replica {replica} not promoted within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Promotes a replica of the master on `master` ([`RedisCluster::promote`]) and waits
    /// until the cluster is stable again. Returns the promoted node's port.
    pub fn failover_replica_of(&self, master: u16) -> u16 {
        let replica = self.replica_of(master);
        self.promote(replica);
        self.wait_stable();
        replica
    }

    /// `redis-cli --cluster reshard`: moves `slots` slots from the master on `from` to the
    /// master on `to` (redis-cli takes the source's lowest slots first), keys and all.
    pub fn reshard(&self, from: u16, to: u16, slots: u16) {
        let cli = find_binary("redis-cli", "redis-server");
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        let entry = format!("127.0.0.1:{from}");
        let slots = slots.to_string();
        run_tool(
            &cli,
            &[
                "--cluster",
                "reshard",
                &entry,
                "--cluster-from",
                &from_id,
                "--cluster-to",
                &to_id,
                "--cluster-slots",
                &slots,
                "--cluster-yes",
            ],
            self.nodes[0].dir(),
        );
    }

    /// The slots the master on `port` serves now, lowest first (from `CLUSTER SLOTS`).
    pub fn slots_of(&self, port: u16) -> Vec<u16> {
        let mut conn = self.node(port).client().get_connection().expect("connect");
        let mut slots: Vec<u16> = slot_ranges(&mut conn)
            .into_iter()
            .filter(|(_, _, master)| *master == port)
            .flat_map(|(start, end, _)| start..=end)
            .collect();
        slots.sort_unstable();
        slots
    }

    /// Waits (bounded) until every running node says `cluster_state:ok` and no slot is
    /// migrating or importing anywhere (`redis-cli --cluster check` passes).
    pub fn wait_stable(&self) {
        self.wait_ok();
        let cli = find_binary("redis-cli", "redis-server");
        let entry = self
            .nodes
            .iter()
            .find(|n| n.is_running())
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .expect("a running node");
        let deadline = Instant::now() + CLUSTER_TIMEOUT;
        loop {
            let (status, text, _) = output_within(
                Command::new(&cli)
                    .args(["--cluster", "check", &entry])
                    .current_dir(self.nodes[0].dir()),
                TOOL_TIMEOUT,
            );
            if status.success() && !text.contains("[WARNING]") && !text.contains("[ERR]") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cluster not stable within {CLUSTER_TIMEOUT:?}: {text}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `CLUSTER SLOTS` asked on `conn`: (first slot, last slot, port of its master) per range.
fn slot_ranges(conn: &mut redis::Connection) -> Vec<(u16, u16, u16)> {
    let ranges: Vec<redis::Value> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query(conn)
        .expect("CLUSTER SLOTS");
    let int = |v: &redis::Value| -> u16 {
        redis::from_redis_value_ref(v)
            .unwrap_or_else(|e| panic!("CLUSTER SLOTS: not a slot or port: {v:?}: {e}"))
    };
    ranges
        .iter()
        .filter_map(|range| {
            let redis::Value::Array(fields) = range else {
                return None;
            };
            let (Some(start), Some(end), Some(redis::Value::Array(master))) =
                (fields.first(), fields.get(1), fields.get(2))
            else {
                return None;
            };
            let port = master.get(1).map(int).expect("master port");
            Some((int(start), int(end), port))
        })
        .collect()
}

/// The master name the sentinels of [`RedisSentinel`] monitor.
pub const SENTINEL_MASTER: &str = "mymaster";

/// How long a [`RedisSentinel`] may take to be ready, or to finish a failover.
const SENTINEL_TIMEOUT: Duration = Duration::from_secs(30);

/// A private Redis Sentinel topology (spec §10) from Debian's `redis-server` alone: a master,
/// one replica (`--replicaof`) and three sentinels (`redis-server <conf> --sentinel`,
/// quorum 2, `down-after-milliseconds` 1000, `failover-timeout` 5000), all on free loopback
/// ports. Every process is killed by PID when the handle drops.
pub struct RedisSentinel {
    /// The two data nodes; which one is master changes with failovers.
    pub data: Vec<Redis>,
    sentinels: Vec<Service>,
}

impl RedisSentinel {
    /// Starts the topology and waits (bounded) until the replica is in sync and every
    /// sentinel knows the replica and the two other sentinels.
    pub fn start() -> RedisSentinel {
        let master = Redis::start();
        let replica = Redis::start_with(&["--replicaof", "127.0.0.1", &master.port().to_string()]);
        let binary = find_binary("redis-server", "redis-server");
        let sentinels: Vec<Service> = (0..3)
            .map(|_| {
                let dir = tempfile::Builder::new()
                    .prefix("routemq-bridge-sentinel-")
                    .tempdir()
                    .expect("tempdir");
                let port = free_port();
                let conf = dir.path().join("sentinel.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "port {port}\nbind 127.0.0.1\ndaemonize no\ndir {dir}\n\
                         sentinel resolve-hostnames no\n\
                         sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {master} 2\n\
                         sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
                         sentinel failover-timeout {SENTINEL_MASTER} 5000\n\
                         sentinel parallel-syncs {SENTINEL_MASTER} 1\n",
                        dir = dir.path().display(),
                        master = master.port(),
                    ),
                )
                .expect("write sentinel.conf");
                let mut service = Service {
                    name: "redis-sentinel",
                    binary: binary.clone(),
                    args: vec![conf.display().to_string(), "--sentinel".to_string()],
                    dir,
                    port,
                    child: None,
                    ready: redis_ready,
                };
                service.spawn();
                service
            })
            .collect();
        let topology = RedisSentinel {
            data: vec![master, replica],
            sentinels,
        };
        topology.wait_ready();
        topology
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + SENTINEL_TIMEOUT;
        let master = self.master_port();
        for node in &self.data {
            if node.port() == master {
                continue;
            }
            wait_until(deadline, "the replica in sync", || {
                info(node.port(), "replication").contains("master_link_status:up")
            });
        }
        for port in self.sentinel_ports() {
            wait_until(deadline, "the sentinels to know each other", || {
                let mut conn = match connect(port) {
                    Some(c) => c,
                    None => return false,
                };
                let replicas: Vec<redis::Value> = redis::cmd("SENTINEL")
                    .arg("REPLICAS")
                    .arg(SENTINEL_MASTER)
                    .query(&mut conn)
                    .unwrap_or_default();
                let sentinels: Vec<redis::Value> = redis::cmd("SENTINEL")
                    .arg("SENTINELS")
                    .arg(SENTINEL_MASTER)
                    .query(&mut conn)
                    .unwrap_or_default();
                replicas.len() == self.data.len() - 1 && sentinels.len() == 2
            });
        }
    }

    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(|s| s.port).collect()
    }

    /// `redis://` URLs of the sentinels.
    pub fn sentinel_urls(&self) -> Vec<String> {
        self.sentinel_ports()
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The master's port as the first sentinel that answers names it.
    pub fn master_port(&self) -> u16 {
        for port in self.sentinel_ports() {
            let Some(mut conn) = connect(port) else {
                continue;
            };
            let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(SENTINEL_MASTER)
                .query(&mut conn)
                .ok()
                .flatten();
            if let Some((_, port)) = addr {
                return port;
            }
        }
        panic!("no sentinel names the master");
    }

    /// The data node on `port`.
    pub fn node(&self, port: u16) -> &Redis {
        self.data
            .iter()
            .find(|n| n.port() == port)
            .unwrap_or_else(|| panic!("no data node on port {port}"))
    }

    /// The current master (as the sentinels name it).
    pub fn master(&self) -> &Redis {
        self.node(self.master_port())
    }

    /// `SENTINEL FAILOVER`, then waits until every sentinel names another master, that
    /// master says `ROLE` master, and the old one replicates from it. Returns the new port.
    pub fn failover(&self) -> u16 {
        let old = self.master_port();
        let mut conn = connect(self.sentinel_ports()[0]).expect("connect to a sentinel");
        let _: () = redis::cmd("SENTINEL")
            .arg("FAILOVER")
            .arg(SENTINEL_MASTER)
            .query(&mut conn)
            .expect("SENTINEL FAILOVER");
        let new = self.wait_new_master(old);
        let deadline = Instant::now() + SENTINEL_TIMEOUT;
        wait_until(deadline, "the old master to replicate from the new", || {
            let info = info(old, "replication");
            info.contains("role:slave") && info.contains("master_link_status:up")
        });
        new
    }

    /// `kill -9` of the master; waits until the sentinels promoted the replica. Returns the
    /// new master's port. The killed node stays down: see [`RedisSentinel::restart`].
    pub fn kill_master(&mut self) -> u16 {
        let old = self.master_port();
        let node = self
            .data
            .iter_mut()
            .find(|n| n.port() == old)
            .expect("the master is a data node");
        node.kill();
        self.wait_new_master(old)
    }

    /// Starts the data node on `port` again (empty: nothing is kept on disk), as systemd
    /// would after a crash, and waits until the sentinels made it a replica of the master
    /// and it is in sync.
    pub fn restart(&mut self, port: u16) {
        let node = self
            .data
            .iter_mut()
            .find(|n| n.port() == port)
            .expect("a data node");
        node.start_again();
        let deadline = Instant::now() + SENTINEL_TIMEOUT;
        wait_until(
            deadline,
            "the restarted node to replicate the master",
            || {
                let info = info(port, "replication");
                info.contains("role:slave") && info.contains("master_link_status:up")
            },
        );
    }

    fn wait_new_master(&self, old: u16) -> u16 {
        let deadline = Instant::now() + SENTINEL_TIMEOUT;
        let mut new = old;
        for port in self.sentinel_ports() {
            wait_until(deadline, "the sentinels to name a new master", || {
                let Some(mut conn) = connect(port) else {
                    return false;
                };
                let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(SENTINEL_MASTER)
                    .query(&mut conn)
                    .ok()
                    .flatten();
                match addr {
                    Some((_, p)) if p != old => {
                        new = p;
                        true
                    }
                    _ => false,
                }
            });
        }
        wait_until(deadline, "the new master to say ROLE master", || {
            info(new, "replication").contains("role:master")
        });
        new
    }

    /// The bridge's `[redis.sentinel]` table (no `[redis]` address: the sentinels name it).
    pub fn toml(&self) -> String {
        let quoted: Vec<String> = self
            .sentinel_urls()
            .iter()
            .map(|u| format!("{u:?}"))
            .collect();
        format!(
            "[redis.sentinel]\nmaster = {SENTINEL_MASTER:?}\nnodes = [{}]\n",
            quoted.join(", ")
        )
    }
}

/// A synchronous connection to the server on `port`, or `None` when it does not answer.
fn connect(port: u16) -> Option<redis::Connection> {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .ok()?
        .get_connection_with_timeout(Duration::from_secs(1))
        .ok()
}

/// `INFO <section>` of the server on `port` ("" when it does not answer).
fn info(port: u16, section: &str) -> String {
    connect(port)
        .and_then(|mut c| redis::cmd("INFO").arg(section).query(&mut c).ok())
        .unwrap_or_default()
}

/// Polls `ready` every 50 ms until it holds; panics naming `what` after `deadline`.
fn wait_until(deadline: Instant, what: &str, mut ready: impl FnMut() -> bool) {
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A private `mosquitto` with persistence in its own directory, so a persistent session
/// survives a clean restart.
pub struct Mosquitto(Service);

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Self::start_with("")
    }

    /// Starts with extra lines appended to `mosquitto.conf`.
    pub fn start_with(extra_conf: &str) -> Mosquitto {
        let binary = find_binary("mosquitto", "mosquitto");
        let dir = tempfile::Builder::new()
            .prefix("routemq-bridge-mosquitto-")
            .tempdir()
            .expect("tempdir");
        let port = free_port();
        // `user root`: started as root, Mosquitto would otherwise drop to the `mosquitto`
        // user, which cannot write its persistence into our directory — and the persistent
        // session would silently not survive a restart. Ignored when not started as root.
        let conf = format!(
            "listener {port} 127.0.0.1\n\
             allow_anonymous true\n\
             persistence true\n\
             persistence_location {dir}/\n\
             user root\n\
             max_queued_messages 1000000\n\
             message_size_limit 0\n\
             log_dest stdout\n\
             {extra_conf}\n",
            dir = dir.path().display()
        );
        let conf_path = dir.path().join("mosquitto.conf");
        std::fs::write(&conf_path, conf).expect("write mosquitto.conf");
        let mut service = Service {
            name: "mosquitto",
            binary,
            args: vec!["-c".to_string(), conf_path.display().to_string()],
            dir,
            port,
            child: None,
            ready: tcp_ready,
        };
        service.spawn();
        Mosquitto(service)
    }

    pub fn port(&self) -> u16 {
        self.0.port
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.0.port)
    }

    pub fn stop(&mut self) {
        self.0.stop();
    }

    pub fn kill(&mut self) {
        self.0.kill();
    }

    pub fn start_again(&mut self) {
        self.0.spawn();
    }

    /// Sends `sig` to the running broker (SIGSTOP to freeze it with its connections open,
    /// SIGCONT, SIGHUP to reload its password file).
    pub fn signal(&self, sig: libc::c_int) {
        if let Some(child) = &self.0.child {
            signal(child.id(), sig);
        }
    }

    pub fn log(&self) -> String {
        self.0.log()
    }

    /// Its directory: config, log and persistence (`mosquitto.db`).
    pub fn dir(&self) -> &Path {
        self.0.dir.path()
    }
}

/// Runs `program` with `args` in `dir`, failing the test with its output if it fails.
fn run_tool(program: &Path, args: &[&str], dir: &Path) {
    let (status, stdout, stderr) = output_within(
        Command::new(program).args(args).current_dir(dir),
        TOOL_TIMEOUT,
    );
    assert!(
        status.success(),
        "{} {args:?} failed with {status}: {stdout}{stderr}",
        program.display(),
    );
}

/// The longest a tool the harness runs (`redis-cli --cluster reshard`, `… check`,
/// `mosquitto_passwd`, `openssl`) may take: a hung one fails its test instead of the run.
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `command` to its end within `timeout` (killed and a panic past it), its output
/// captured in files (a pipe could fill and stall a chatty tool such as a reshard):
/// (status, stdout, stderr).
pub fn output_within(
    command: &mut Command,
    timeout: Duration,
) -> (std::process::ExitStatus, String, String) {
    let dir = tempfile::tempdir().expect("a temp dir for the tool's output");
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = command
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("stdout file"))
        .stderr(std::fs::File::create(&err).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    let Some(status) = wait_with_timeout(&mut child, timeout) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{command:?} did not finish within {timeout:?}");
    };
    let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
    (status, read(&out), read(&err))
}

/// Writes a Mosquitto `password_file` at `path` holding `users` (name, password), hashed by
/// `mosquitto_passwd` (Mosquitto 2 wants its PBKDF2 `$7$` hashes, not plain text).
pub fn mosquitto_password_file(path: &Path, users: &[(&str, &str)]) {
    let tool = find_binary("mosquitto_passwd", "mosquitto");
    let dir = path.parent().expect("password file in a directory");
    let file = path.display().to_string();
    for (i, (user, password)) in users.iter().enumerate() {
        // `-c` creates (truncates) the file: only for the first user.
        let mut args = vec!["-b"];
        if i == 0 {
            args.push("-c");
        }
        args.extend([file.as_str(), user, password]);
        run_tool(&tool, &args, dir);
    }
}

/// A throwaway certificate authority with a server certificate (for `localhost` and
/// `127.0.0.1`) and a client certificate, made with the `openssl` CLI at test time so that
/// no key is ever committed. EC P-256 keys in PKCS#8 PEM, valid for two days.
pub struct Pki {
    dir: TempDir,
}

impl Pki {
    pub fn generate() -> Pki {
        let openssl = find_binary("openssl", "openssl");
        let dir = tempfile::Builder::new()
            .prefix("routemq-bridge-pki-")
            .tempdir()
            .expect("tempdir");
        let run = |args: &[&str]| run_tool(&openssl, args, dir.path());
        let write = |name: &str, text: &str| {
            std::fs::write(dir.path().join(name), text).expect("write extension file")
        };
        // webpki insists on a v3 CA (basicConstraints CA:TRUE) and on end-entity
        // certificates that are not CAs; the server is named by subjectAltName, not CN.
        write(
            "ca.ext",
            "basicConstraints = critical, CA:TRUE\n\
             keyUsage = critical, keyCertSign, cRLSign\n\
             subjectKeyIdentifier = hash\n",
        );
        write(
            "server.ext",
            "basicConstraints = critical, CA:FALSE\n\
             keyUsage = critical, digitalSignature\n\
             extendedKeyUsage = serverAuth\n\
             subjectAltName = DNS:localhost, IP:127.0.0.1\n\
             authorityKeyIdentifier = keyid\n",
        );
        write(
            "client.ext",
            "basicConstraints = critical, CA:FALSE\n\
             keyUsage = critical, digitalSignature\n\
             extendedKeyUsage = clientAuth\n\
             authorityKeyIdentifier = keyid\n",
        );
        for name in ["ca", "server", "client"] {
            let key = format!("{name}.key");
            let csr = format!("{name}.csr");
            let subject = format!("/CN=routemq-bridge-test-{name}");
            run(&[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                &key,
            ]);
            run(&["req", "-new", "-key", &key, "-subj", &subject, "-out", &csr]);
        }
        run(&[
            "x509", "-req", "-in", "ca.csr", "-signkey", "ca.key", "-days", "2", "-extfile",
            "ca.ext", "-out", "ca.crt",
        ]);
        for name in ["server", "client"] {
            let (csr, ext, crt) = (
                format!("{name}.csr"),
                format!("{name}.ext"),
                format!("{name}.crt"),
            );
            run(&[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &crt,
            ]);
        }
        Pki { dir }
    }

    pub fn ca_key(&self) -> PathBuf {
        self.dir.path().join("ca.key")
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    pub fn server_cert(&self) -> PathBuf {
        self.dir.path().join("server.crt")
    }

    pub fn server_key(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }

    pub fn client_cert(&self) -> PathBuf {
        self.dir.path().join("client.crt")
    }

    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client.key")
    }

    /// Lines for `mosquitto.conf` adding a TLS listener on `port` that serves this PKI's
    /// server certificate and requires a client certificate signed by its CA.
    pub fn mosquitto_listener(&self, port: u16) -> String {
        format!(
            "listener {port} 127.0.0.1\n\
             cafile {ca}\n\
             certfile {cert}\n\
             keyfile {key}\n\
             require_certificate true\n",
            ca = self.ca_cert().display(),
            cert = self.server_cert().display(),
            key = self.server_key().display(),
        )
    }
}

/// A TCP forwarder on a free loopback port in front of a real server (usually Redis), that a
/// test can tell to fail the way networks fail: drop every connection now, drop them right
/// after a chosen request got through (so the server acted but the client never hears the
/// reply), or swallow everything both ways (a black hole: no RST, no answer). Plain threads,
/// so it works under any test runtime; every socket closes when it drops.
pub struct FaultProxy {
    port: u16,
    shared: Arc<ProxyShared>,
    acceptor: Option<JoinHandle<()>>,
}

/// What the proxy's threads share.
#[derive(Default)]
struct ProxyShared {
    /// Both sockets of every open connection, to shut them down from outside.
    connections: Mutex<Vec<(TcpStream, TcpStream)>>,
    blackhole: AtomicBool,
    stopping: AtomicBool,
    /// Armed by [`FaultProxy::drop_after_request`]: the request to wait for.
    trigger: Mutex<Option<Trigger>>,
    /// How many times the trigger fired.
    fired: AtomicUsize,
}

/// A one-shot fault: after a request containing `pattern`, hold the reply for `stall`, then
/// drop every connection instead of forwarding it.
struct Trigger {
    pattern: Vec<u8>,
    stall: Duration,
}

impl ProxyShared {
    fn drop_all(&self) {
        let connections = std::mem::take(&mut *self.connections.lock().expect("proxy lock"));
        for (client, server) in connections {
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
        }
    }
}

impl FaultProxy {
    /// Starts forwarding a free loopback port to `127.0.0.1:target_port`.
    pub fn start(target_port: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy port");
        let port = listener.local_addr().expect("proxy addr").port();
        let shared = Arc::new(ProxyShared::default());
        let accepting = shared.clone();
        let acceptor = std::thread::spawn(move || {
            for client in listener.incoming() {
                if accepting.stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                // The target down: the client sees its connection closed, as it would.
                let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                // One handle per pump direction and one for `drop_all`.
                let (Ok(client2), Ok(server2), Ok(client3), Ok(server3)) = (
                    client.try_clone(),
                    server.try_clone(),
                    client.try_clone(),
                    server.try_clone(),
                ) else {
                    continue;
                };
                accepting
                    .connections
                    .lock()
                    .expect("proxy lock")
                    .push((client3, server3));
                // Set by the upstream pump when the armed request went through on this
                // connection; read by the downstream pump.
                let requested = Arc::new(AtomicBool::new(false));
                // Set when the client side ends (e.g. the client was killed).
                let closed = Arc::new(AtomicBool::new(false));
                let (up, down) = (accepting.clone(), accepting.clone());
                let (seen, closing) = (requested.clone(), closed.clone());
                std::thread::spawn(move || {
                    pump(client, server, &up, |chunk| {
                        let armed = up.trigger.lock().expect("proxy lock");
                        if armed.as_ref().is_some_and(|t| contains(chunk, &t.pattern)) {
                            seen.store(true, Ordering::SeqCst);
                        }
                        true
                    });
                    closing.store(true, Ordering::SeqCst);
                });
                std::thread::spawn(move || {
                    pump(server2, client2, &down, |_| {
                        if !requested.load(Ordering::SeqCst) {
                            return true;
                        }
                        // The first reply after the request: lost with the connection.
                        let fired = down.trigger.lock().expect("proxy lock").take();
                        if let Some(trigger) = fired {
                            down.fired.fetch_add(1, Ordering::SeqCst);
                            // Held back here, so is every later reply on this connection —
                            // until the stall ends or the client goes away (then the others
                            // are left alone).
                            let until = Instant::now() + trigger.stall;
                            while Instant::now() < until && !closed.load(Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            if !closed.load(Ordering::SeqCst) {
                                down.drop_all();
                            }
                            return false;
                        }
                        true
                    })
                });
            }
        });
        FaultProxy {
            port,
            shared,
            acceptor: Some(acceptor),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://` URL of the proxy.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Closes every open connection now (both sides); new ones are still accepted.
    pub fn drop_connections(&self) {
        self.shared.drop_all();
    }

    /// While on, the proxy accepts and reads but forwards nothing either way.
    pub fn blackhole(&self, on: bool) {
        self.shared.blackhole.store(on, Ordering::SeqCst);
    }

    /// Arms a one-shot fault: once a client→server chunk containing `pattern` (e.g.
    /// `b"EXEC"`) was forwarded, the next server→client chunk on that connection is not
    /// forwarded, and every connection is dropped instead. The server got the request and
    /// acted on it; the client never hears the reply.
    pub fn drop_after_request(&self, pattern: &[u8]) {
        self.stall_then_drop_after_request(pattern, Duration::ZERO);
    }

    /// Like [`FaultProxy::drop_after_request`], but the reply is first held for `stall`
    /// (longer than the client's timeout: the client sees a timeout, then the drop). A
    /// client that goes away meanwhile (killed while it waits) ends the stall, and then
    /// only its own connection is closed.
    pub fn stall_then_drop_after_request(&self, pattern: &[u8], stall: Duration) {
        *self.shared.trigger.lock().expect("proxy lock") = Some(Trigger {
            pattern: pattern.to_vec(),
            stall,
        });
    }

    /// How many times [`FaultProxy::drop_after_request`] fired (counted as soon as the
    /// reply is held back).
    pub fn fired(&self) -> usize {
        self.shared.fired.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wakes the blocking accept so the thread sees `stopping`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        self.shared.drop_all();
    }
}

/// Copies `from` to `to` chunk by chunk while `pass(chunk)` says so (false: the chunk is
/// not forwarded and the pump ends); black-holed chunks are read and discarded. Ends with
/// either side, closing both — except in a black hole, which lets no close through either
/// (a server that gives up on a silent client must not tell the client so).
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    shared: &ProxyShared,
    mut pass: impl FnMut(&[u8]) -> bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if shared.blackhole.load(Ordering::SeqCst) {
            continue;
        }
        if !pass(&buf[..n]) || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    if !shared.blackhole.load(Ordering::SeqCst) {
        let _ = to.shutdown(Shutdown::Both);
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
