//! The bridge on Redis Sentinel (spec §10): a master, a replica and three sentinels
//! ([`RedisSentinel`]). Under load, `SENTINEL FAILOVER` and (separately) `kill -9` of the
//! master lose no acked message and write none twice; pub/sub and stream republish follow
//! the master; `[redis.sentinel]` is checked like every table. Each fault test has a
//! topology of its own (a failover changes it for everyone).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::bridge::{check_config, config_on, eventually, Bridge, Client};
use crate::bridge_middleware::latest_http_addr;
use crate::harness::{Mosquitto, RedisSentinel};
use crate::ops::{get, get_until};

const DEVICES: usize = 500;
const PER_DEVICE: usize = 10;
/// How long the 5,000 messages may take, failover included.
const DRAIN: Duration = Duration::from_secs(90);

/// The bridge's config on `topology` and `broker`, then `rest`.
fn sentinel_config(
    topology: &RedisSentinel,
    broker: &Mosquitto,
    client_id: &str,
    rest: &str,
) -> String {
    let redis = format!(
        "socket_timeout = \"2s\"\nsocket_connect_timeout = \"1s\"\n\n{}",
        topology.toml()
    );
    config_on(&redis, broker, client_id, rest)
}

/// Session (required) + rate limit (a budget admitting all) + dedup + two actions.
const ROUTE: &str = r#"
[[routes]]
name = "s"
topic = "s/{id}"
session = { key = "session:{id}", required = true }
rate_limit = { key = "rl:{id}", strategy = "fixed_window", max = 100000, window = "1h" }
dedup = { key = "dedup:{id}:{json.seq}", ttl = "1h" }
[[routes.actions]]
op = "set_json"
key = "latest:{id}"
[[routes.actions]]
op = "rpush"
key = "list:{id}"
"#;

fn conn(topology: &RedisSentinel) -> redis::Connection {
    topology
        .master()
        .client()
        .get_connection_with_timeout(Duration::from_secs(2))
        .expect("connect to the master")
}

/// Every device's session, replicated before the bridge starts.
fn create_sessions(topology: &RedisSentinel) {
    let mut c = conn(topology);
    let mut pipe = redis::pipe();
    for d in 0..DEVICES {
        pipe.cmd("SET")
            .arg(format!("session:d{d}"))
            .arg(r#"{"user":"u"}"#)
            .ignore();
    }
    let () = pipe.query(&mut c).expect("create sessions");
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query(&mut c)
        .expect("WAIT");
    assert_eq!(acked, 1, "the replica has the sessions");
}

/// The entries of every device's list on the current master; `None` when it does not
/// answer (a failover under way).
fn lists(topology: &RedisSentinel) -> Option<BTreeMap<usize, Vec<String>>> {
    let client =
        redis::Client::open(format!("redis://127.0.0.1:{}", topology.master_port())).ok()?;
    let mut c = client
        .get_connection_with_timeout(Duration::from_secs(1))
        .ok()?;
    let mut pipe = redis::pipe();
    for d in 0..DEVICES {
        pipe.cmd("LRANGE").arg(format!("list:d{d}")).arg(0).arg(-1);
    }
    let all: Vec<Vec<String>> = pipe.query(&mut c).ok()?;
    Some(all.into_iter().enumerate().collect())
}

fn total(lists: &BTreeMap<usize, Vec<String>>) -> usize {
    lists.values().map(Vec::len).sum()
}

/// Publishes the 5,000 messages from a task (500 devices × 10, interleaved).
fn publish_load(mut client: Client) -> tokio::task::JoinHandle<Client> {
    tokio::spawn(async move {
        let messages = (0..PER_DEVICE).flat_map(|seq| {
            (0..DEVICES).map(move |d| {
                (
                    format!("s/d{d}"),
                    format!(r#"{{"seq":{seq}}}"#).into_bytes(),
                )
            })
        });
        client.publish_all(messages).await;
        client
    })
}

/// The fault test body: 5,000 messages, `fault` once a few hundred are written, then every
/// message written exactly once on the new master, nothing dead-lettered, `/readyz` 200.
/// Returns the bridge's log.
async fn load_through(
    client_id: &str,
    fault: impl FnOnce(&mut RedisSentinel) -> u16 + Send,
) -> String {
    let mut topology = RedisSentinel::start();
    let broker = Mosquitto::start();
    create_sessions(&topology);
    let old = topology.master_port();
    let bridge = Bridge::start(&sentinel_config(&topology, &broker, client_id, ROUTE));
    let client = Client::connect(&broker, &format!("{client_id}-publisher")).await;
    let publishing = publish_load(client);
    let started = eventually(Duration::from_secs(30), || {
        lists(&topology).filter(|l| total(l) >= 300)
    })
    .await;
    let started = started.map(|l| total(&l));
    let expected = DEVICES * PER_DEVICE;
    assert!(
        started.is_some_and(|n| n < expected),
        "the fault strikes while the load is under way ({started:?} of {expected} written); log:\n{}",
        bridge.log_text()
    );
    let new = tokio::task::block_in_place(|| fault(&mut topology));
    assert_ne!(new, old, "the sentinels promoted the replica");
    let _client = publishing.await.expect("publisher task");
    let seen = eventually(DRAIN, || lists(&topology).filter(|l| total(l) >= expected)).await;
    let seen = seen.unwrap_or_else(|| {
        panic!(
            "not every message written: {:?} of {expected}; log:\n{}",
            lists(&topology).map(|l| total(&l)),
            bridge.log_text()
        )
    });
    // Nothing written twice, nothing lost: each device's list is its ten payloads, once each
    // (in order of arrival per topic, spec §6).
    for (d, entries) in &seen {
        let wanted: Vec<String> = (0..PER_DEVICE)
            .map(|s| format!(r#"{{"seq":{s}}}"#))
            .collect();
        assert_eq!(entries, &wanted, "device d{d}");
    }
    assert_eq!(topology.master_port(), new, "no second failover");
    let mut c = conn(&topology);
    let dead: i64 = redis::cmd("LLEN")
        .arg("dead_letter")
        .query(&mut c)
        .expect("LLEN");
    assert_eq!(
        dead,
        0,
        "nothing dead-lettered; log:\n{}",
        bridge.log_text()
    );
    let addr = latest_http_addr(&bridge);
    get_until(addr, "/readyz", 200).await;
    let log = bridge.log_text();
    assert!(
        log.contains(&format!("master=127.0.0.1:{new}")),
        "the bridge found the new master; log:\n{log}"
    );
    eprintln!(
        "fault at {started:?} of {expected} written; reconnects {}, lost {}, refusing {}",
        log.matches("re-established").count(),
        log.matches("connection lost").count(),
        log.matches("refuses writes").count()
    );
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentinel_failover_under_load_writes_every_message_exactly_once() {
    let log = load_through("sentinel-f1", |t| t.failover()).await;
    assert!(
        log.contains("the sentinels announced +switch-master"),
        "the bridge heard the switch; log:\n{log}"
    );
}

/// `kill -9` of the master. With one replica, the promoted master has none left until the
/// killed node is back (systemd restarts it; the sentinels make it a replica): with
/// `wait_replicas = 1` writes wait unacked until then — so the test restarts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_under_load_loses_no_acked_message() {
    load_through("sentinel-k1", |t| {
        let old = t.master_port();
        let new = t.kill_master();
        t.restart(old);
        new
    })
    .await;
}

/// Pub/sub and stream republish keep flowing after a failover: a subscriber counts what the
/// bridge republished from the master before and from the new master after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_and_stream_republish_follow_the_new_master() {
    let topology = RedisSentinel::start();
    let broker = Mosquitto::start();
    let rules = r#"
[[routes]]
name = "unused"
topic = "unused/{id}"
[[routes.actions]]
op = "set"
key = "unused:{id}"

[[republish]]
name = "cmds"
source = "pubsub"
channel = "cmd:{id}"
topic = "out/cmd/{id}"
qos = 1

[[republish]]
name = "alerts"
source = "stream"
stream = "alerts"
group = "bridge"
payload_field = "payload"
topic = "out/alert"
claim_idle = "5s"
qos = 1
"#;
    let bridge = Bridge::start(&sentinel_config(&topology, &broker, "sentinel-r1", rules));
    let mut listener = Client::connect(&broker, "sentinel-r1-listener").await;
    listener.subscribe("out/#").await;
    let round = |topology: &RedisSentinel, tag: &'static str| {
        let port = topology.master_port();
        async move {
            // Publish until the subscriber is (re)subscribed on this master, then count.
            let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}"))
                .expect("url")
                .get_multiplexed_async_connection()
                .await
                .expect("connect");
            for i in 0..20 {
                let _: () = redis::cmd("XADD")
                    .arg("alerts")
                    .arg("*")
                    .arg("payload")
                    .arg(format!("{tag}-a{i}"))
                    .query_async(&mut c)
                    .await
                    .expect("XADD");
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            let mut i = 0;
            loop {
                let receivers: i64 = redis::cmd("PUBLISH")
                    .arg("cmd:x")
                    .arg(format!("{tag}-c{i}"))
                    .query_async(&mut c)
                    .await
                    .expect("PUBLISH");
                i += 1;
                if receivers > 0 {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{tag}: the bridge subscribed on the master (port {port}) within 30 s"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            for j in 0..20 {
                let _: i64 = redis::cmd("PUBLISH")
                    .arg("cmd:x")
                    .arg(format!("{tag}-p{j}"))
                    .query_async(&mut c)
                    .await
                    .expect("PUBLISH");
            }
        }
    };
    round(&topology, "before").await;
    let counted = count(&mut listener, "before").await;
    assert_eq!(counted, (20, 20), "before; log:\n{}", bridge.log_text());
    let old = topology.master_port();
    let new = tokio::task::block_in_place(|| topology.failover());
    assert_ne!(old, new);
    round(&topology, "after").await;
    let counted = count(&mut listener, "after").await;
    assert_eq!(
        counted,
        (20, 20),
        "stream entries and pub/sub messages republished from the new master; log:\n{}",
        bridge.log_text()
    );
}

/// Distinct `<tag>-a*` (stream) and `<tag>-p*` (pub/sub) payloads received, waiting until
/// 20 of each arrived or 30 s passed.
async fn count(listener: &mut Client, tag: &str) -> (usize, usize) {
    let mut alerts = std::collections::BTreeSet::new();
    let mut commands = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while alerts.len() < 20 || commands.len() < 20 {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(msg) = listener.next_message(left).await else {
            break;
        };
        let text = String::from_utf8_lossy(&msg.payload).to_string();
        if text.starts_with(&format!("{tag}-a")) {
            alerts.insert(text);
        } else if text.starts_with(&format!("{tag}-p")) {
            commands.insert(text);
        }
    }
    (alerts.len(), commands.len())
}

// ---- config ---------------------------------------------------------------------------

const BASE: &str = "[http]\nlisten = \"127.0.0.1:0\"\n";

#[test]
fn check_names_the_missing_master_and_the_empty_node_list() {
    let (code, out) = check_config(&format!("{BASE}[redis.sentinel]\nnodes = []\n"));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("redis.sentinel.master"), "{out}");
    let (code, out) = check_config(&format!(
        "{BASE}[redis.sentinel]\nmaster = \"mymaster\"\nnodes = []\n"
    ));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("redis.sentinel.nodes"), "{out}");
    let (code, out) = check_config(&format!(
        "{BASE}[redis.sentinel]\nmaster = \"m\"\nnodes = [\"redis://127.0.0.1:26379\"]\nmastr = 1\n"
    ));
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("redis.sentinel.mastr"),
        "unknown keys are errors: {out}"
    );
    // Out of range: an error naming the key, not a silent clamp (4294967296 was u32::MAX).
    for n in ["17", "4294967296"] {
        let (code, out) = check_config(&format!(
            "{BASE}[redis.sentinel]\nmaster = \"m\"\nnodes = [\"redis://127.0.0.1:26379\"]\nwait_replicas = {n}\n"
        ));
        assert_eq!(code, Some(2), "wait_replicas = {n}: {out}");
        assert!(
            out.contains("redis.sentinel.wait_replicas") && out.contains("0..=16"),
            "{out}"
        );
    }
    let (code, out) = check_config(&format!(
        "{BASE}[redis]\ncluster = [\"redis://127.0.0.1:7000\"]\n[redis.sentinel]\nmaster = \"m\"\nnodes = [\"redis://127.0.0.1:26379\"]\n"
    ));
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("redis.sentinel") && out.contains("not both"),
        "{out}"
    );
}

#[test]
fn check_warns_that_host_and_url_are_unused_with_sentinel_and_prints_no_secret() {
    const SECRET: &str = "S3nt1nel-Pa55";
    let config = format!(
        "{BASE}[redis]\nhost = \"10.0.0.1\"\nurl = \"redis://:{SECRET}@10.0.0.1:6379\"\n\
         [redis.sentinel]\nmaster = \"mymaster\"\nnodes = [\"redis://:{SECRET}@127.0.0.1:26379\"]\n\
         password = \"{SECRET}\"\n"
    );
    let (code, out) = check_config(&config);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("warning:") && out.contains("redis.host") && out.contains("redis.url"),
        "{out}"
    );
    assert!(out.contains("master \"mymaster\""), "{out}");
    assert!(!out.contains(SECRET), "a secret printed: {out}");
    // RouteMQ's variables count as set explicitly too (spec §10).
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bridge.toml");
    std::fs::write(
        &path,
        format!(
            "{BASE}[redis.sentinel]\nmaster = \"mymaster\"\nnodes = [\"redis://127.0.0.1:26379\"]\n"
        ),
    )
    .expect("write config");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_routemq-bridge"))
        .args(["check", "--config"])
        .arg(&path)
        .env("REDIS_HOST", "10.0.0.9")
        .output()
        .expect("run check");
    let out = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{out}");
    assert!(
        out.contains("warning:") && out.contains("environment variable REDIS_HOST"),
        "{out}"
    );
    // Without host/url: no warning.
    let (code, out) = check_config(&format!(
        "{BASE}[redis.sentinel]\nmaster = \"mymaster\"\nnodes = [\"redis://127.0.0.1:26379\"]\n"
    ));
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("warning:"), "{out}");
}

#[test]
fn the_sentinel_table_is_set_by_environment_variables() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bridge.toml");
    std::fs::write(&path, BASE).expect("write config");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_routemq-bridge"))
        .arg("check")
        .arg("--config")
        .arg(&path)
        .env("ROUTEMQ_BRIDGE_REDIS__SENTINEL__MASTER", "envmaster")
        .env(
            "ROUTEMQ_BRIDGE_REDIS__SENTINEL__NODES",
            "redis://127.0.0.1:26379,redis://127.0.0.1:26380",
        )
        .env("ROUTEMQ_BRIDGE_REDIS__SENTINEL__WAIT_REPLICAS", "0")
        .output()
        .expect("run check");
    let out = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{out}");
    assert!(out.contains("master \"envmaster\""), "{out}");
    assert!(out.contains("26380"), "{out}");
    assert!(out.contains("wait_replicas 0"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manager_finds_the_master_and_readyz_says_up() {
    // The smallest path: sentinel discovery, a write, /readyz.
    let topology = RedisSentinel::start();
    let broker = Mosquitto::start();
    let bridge = Bridge::start(&sentinel_config(
        &topology,
        &broker,
        "sentinel-m1",
        r#"
[[routes]]
name = "m"
topic = "m/{id}"
payload = "text"
[[routes.actions]]
op = "set"
key = "m:{id}"
"#,
    ));
    let mut client = Client::connect(&broker, "sentinel-m1-publisher").await;
    client.publish("m/a", "hello").await;
    let mut c = conn(&topology);
    let got = eventually(Duration::from_secs(10), || {
        redis::cmd("GET")
            .arg("m:a")
            .query::<Option<String>>(&mut c)
            .ok()
            .flatten()
    })
    .await;
    assert_eq!(got.as_deref(), Some("hello"), "log:\n{}", bridge.log_text());
    let (status, _) = get(latest_http_addr(&bridge), "/readyz").await;
    assert_eq!(status, 200);
}

/// `wait_replicas = 1` with the replica down: the write lands on the master but the message
/// is not acked (no `written` outcome), `/readyz` says `refusing`, and the short `WAIT`s are
/// counted; once the replica is back and in sync, the messages count as written, once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_replica_down_a_write_waits_unacked_until_a_replica_has_it() {
    let mut topology = RedisSentinel::start();
    let broker = Mosquitto::start();
    let bridge = Bridge::start(&sentinel_config(
        &topology,
        &broker,
        "sentinel-w1",
        r#"
[[routes]]
name = "w"
topic = "w/{id}"
payload = "text"
[[routes.actions]]
op = "rpush"
key = "w:{id}"
"#,
    ));
    let addr = latest_http_addr(&bridge);
    let master = topology.master_port();
    let replica = topology
        .data
        .iter()
        .map(|n| n.port())
        .find(|p| *p != master)
        .expect("a replica");
    topology
        .data
        .iter_mut()
        .find(|n| n.port() == replica)
        .expect("the replica")
        .kill();
    let mut client = Client::connect(&broker, "sentinel-w1-publisher").await;
    for i in 0..5 {
        client.publish("w/a", format!("m{i}")).await;
    }
    let mut c = conn(&topology);
    let on_master = eventually(Duration::from_secs(10), || {
        redis::cmd("LLEN")
            .arg("w:a")
            .query::<i64>(&mut c)
            .ok()
            .filter(|n| *n >= 1)
    })
    .await;
    assert!(on_master.is_some(), "the write reached the master");
    let body = get_until(addr, "/readyz", 503).await;
    assert!(body.contains("refusing"), "{body}");
    let (_, metrics) = get(addr, "/metrics").await;
    let waits = crate::ops::sample(&metrics, "routemq_bridge_redis_replica_waits_total");
    assert!(
        waits.is_some_and(|n| n >= 1.0),
        "short WAITs counted: {waits:?}"
    );
    let written = crate::ops::sample(
        &metrics,
        r#"routemq_bridge_messages_total{route="w",outcome="written"}"#,
    );
    assert_eq!(
        written, None,
        "nothing counts as written before a replica has it"
    );
    tokio::task::block_in_place(|| topology.restart(replica));
    let seen = crate::bridge_middleware::outcomes_at(addr, "w", &[("written", 5.0)]).await;
    assert_eq!(seen, [Some(5.0)], "log:\n{}", bridge.log_text());
    get_until(addr, "/readyz", 200).await;
    let entries: Vec<String> = redis::cmd("LRANGE")
        .arg("w:a")
        .arg(0)
        .arg(-1)
        .query(&mut conn(&topology))
        .expect("LRANGE");
    assert_eq!(entries, ["m0", "m1", "m2", "m3", "m4"], "written once each");
}

// ---- the manager's replica waits (review findings) ------------------------------------

/// A manager on `topology` (`wait_replicas = 1`, `socket_timeout` 2 s: `WAIT`s of 1 s).
async fn sentinel_manager(topology: &RedisSentinel) -> routemq_bridge::redis::RedisManager {
    sentinel_manager_with(topology, Duration::from_secs(1), Duration::from_secs(2)).await
}

/// [`sentinel_manager`] with other `socket_connect_timeout` and `socket_timeout`.
async fn sentinel_manager_with(
    topology: &RedisSentinel,
    connect_timeout: Duration,
    socket_timeout: Duration,
) -> routemq_bridge::redis::RedisManager {
    use routemq_bridge::config::Secret;
    use routemq_bridge::redis::{config::SentinelConfig, RedisConfig, RedisManager};
    let config = RedisConfig {
        socket_timeout,
        socket_connect_timeout: connect_timeout,
        sentinel: Some(SentinelConfig {
            master: crate::harness::SENTINEL_MASTER.to_string(),
            nodes: topology
                .sentinel_urls()
                .into_iter()
                .map(Secret::new)
                .collect(),
            username: None,
            password: None,
            wait_replicas: 1,
        }),
        ..RedisConfig::default()
    };
    let manager = RedisManager::new(config);
    assert!(manager.initialize().await, "the manager finds the master");
    manager
}

/// The data node that is not the master.
fn replica_port(topology: &RedisSentinel) -> u16 {
    let master = topology.master_port();
    topology
        .data
        .iter()
        .map(|n| n.port())
        .find(|p| *p != master)
        .expect("a replica")
}

fn replica_node(topology: &mut RedisSentinel, port: u16) -> &mut crate::harness::Redis {
    topology
        .data
        .iter_mut()
        .find(|n| n.port() == port)
        .expect("the replica")
}

fn set_pipe(key: &str) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.cmd("SET").arg(key).arg("v").ignore();
    pipe
}

/// A master demoted while a write waits for its replicas answers the blocked `WAIT` with
/// `UNBLOCKED` (or a `WAIT` sent after with `ERR … replica instances`): the write must fail
/// as a wait (the caller writes again on the new master), never for good — a permanent
/// error dead-letters and acks a message that exists only on the old master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_demoted_under_a_wait_fails_the_write_as_a_wait_not_for_good() {
    let mut topology = RedisSentinel::start();
    let manager = sentinel_manager(&topology).await;
    let replica = replica_port(&topology);
    // SIGSTOP: the replica acknowledges nothing, so every WAIT runs its full second.
    replica_node(&mut topology, replica).pause();
    let writer = manager.clone();
    let write =
        tokio::spawn(async move { writer.query_pipeline_durable(&set_pipe("demoted:a")).await });
    let short = eventually(Duration::from_secs(10), || {
        (manager.replica_waits() >= 1).then_some(())
    })
    .await;
    assert!(short.is_some(), "the write waits for its replica");
    // Demote the master under the next WAIT.
    let mut c = conn(&topology);
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(replica)
        .query(&mut c)
        .expect("REPLICAOF");
    let result = tokio::time::timeout(Duration::from_secs(10), write)
        .await
        .expect("the write returns within 10 s")
        .expect("writer task");
    replica_node(&mut topology, replica).resume();
    let err = result.expect_err("not acked: no replica has the write");
    assert!(
        err.is_transient(),
        "a demotion is a wait (written again on the new master), not a failure: {err:?}"
    );
}

/// `WAIT` covers only the writes made on its own server-side connection, so in Sentinel
/// mode one command connection must never be re-made underneath (a `ConnectionManager`
/// does): once the server dropped it, it answers nothing more, and the manager reconnects
/// as a new epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sentinel_command_connection_is_one_server_side_connection_for_its_life() {
    let topology = RedisSentinel::start();
    let manager = sentinel_manager(&topology).await;
    let mut command = manager.get_client().expect("the command connection");
    let id: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut command)
        .await
        .expect("CLIENT ID");
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(id)
        .query(&mut conn(&topology))
        .expect("CLIENT KILL");
    assert_eq!(killed, 1);
    // For two seconds, whatever answers through this handle is that same connection.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut answered = Vec::new();
    while tokio::time::Instant::now() < deadline {
        if let Ok(now) = redis::cmd("CLIENT")
            .arg("ID")
            .query_async::<i64>(&mut command)
            .await
        {
            answered.push(now);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        answered.iter().all(|now| *now == id),
        "the handle of connection {id} answered from connections {answered:?}"
    );
    // The manager itself moved on to a new connection.
    let up = eventually(Duration::from_secs(10), || {
        (manager.reconnects() >= 1 && manager.is_enabled()).then_some(())
    })
    .await;
    assert!(up.is_some(), "the manager reconnected");
}

/// After a replica outage, a steady stream of writes (some always waiting for replicas)
/// must not keep the state `refusing`: the first `WAIT` that counts enough replicas makes
/// it `up` again (else `/readyz` stays 503 under load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_steady_load_the_state_is_up_again_once_replicas_acknowledge() {
    use routemq_bridge::redis::ConnectionState;
    let mut topology = RedisSentinel::start();
    let manager = sentinel_manager(&topology).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..32)
        .map(|w| {
            let manager = manager.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let pipe = set_pipe(&format!("load:{w}"));
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if manager.query_pipeline_durable(&pipe).await.is_err() {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            })
        })
        .collect();
    let replica = replica_port(&topology);
    let mut state = manager.state();
    replica_node(&mut topology, replica).pause();
    let refusing = tokio::time::timeout(
        Duration::from_secs(10),
        state.wait_for(|s| *s == ConnectionState::Refusing),
    )
    .await
    .is_ok();
    replica_node(&mut topology, replica).resume();
    assert!(refusing, "short WAITs make the state refusing");
    let up = tokio::time::timeout(
        Duration::from_secs(10),
        state.wait_for(|s| *s == ConnectionState::Up),
    )
    .await
    .is_ok();
    let now = *manager.state().borrow();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for writer in writers {
        let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
    }
    assert!(
        up,
        "up again under load once the replica is back (state {now:?})"
    );
}

/// A bridge stopped while its write waited for the replica (replica down) leaves the done
/// mark on the master only; the next run finds it as somebody else's write (`duplicate`)
/// and must not ack it before a replica has it either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_found_on_the_master_is_acked_only_once_a_replica_has_it() {
    let mut topology = RedisSentinel::start();
    let broker = Mosquitto::start();
    let mut bridge = Bridge::start(&sentinel_config(
        &topology,
        &broker,
        "sentinel-d1",
        r#"
[[routes]]
name = "d"
topic = "d/{id}"
payload = "text"
dedup = { key = "dedup:{id}", ttl = "1h" }
[[routes.actions]]
op = "rpush"
key = "d:{id}"
"#,
    ));
    let replica = replica_port(&topology);
    replica_node(&mut topology, replica).kill();
    let mut client = Client::connect(&broker, "sentinel-d1-publisher").await;
    client.publish("d/a", "m0").await;
    let waits = |addr| async move {
        let (_, metrics) = get(addr, "/metrics").await;
        crate::ops::sample(&metrics, "routemq_bridge_redis_replica_waits_total")
    };
    let addr = latest_http_addr(&bridge);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while waits(addr).await.is_none_or(|n| n < 1.0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first run waits for the replica; log:\n{}",
            bridge.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bridge.kill();
    bridge.spawn();
    let addr = latest_http_addr(&bridge);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while waits(addr).await.is_none_or(|n| n < 1.0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the second run waits for the replica before its duplicate counts; log:\n{}",
            bridge.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, metrics) = get(addr, "/metrics").await;
    let duplicate = crate::ops::sample(
        &metrics,
        r#"routemq_bridge_messages_total{route="d",outcome="duplicate"}"#,
    );
    assert_eq!(duplicate, None, "not acked before a replica has it");
    tokio::task::block_in_place(|| topology.restart(replica));
    let seen = crate::bridge_middleware::outcomes_at(addr, "d", &[("duplicate", 1.0)]).await;
    assert_eq!(seen, [Some(1.0)], "log:\n{}", bridge.log_text());
}

/// A frozen master that every sentinel still names (its replica frozen too, so they cannot
/// fail over): each connect round must stay within one connection budget (here 3 s + 1 s),
/// not one per sentinel (each naming the same master: 3 × a 3 s connect timeout), or the
/// health task's heartbeat goes stale and the watchdog restarts the bridge mid-outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_master_named_by_every_sentinel_does_not_stall_the_health_task() {
    let mut topology = RedisSentinel::start();
    let manager =
        sentinel_manager_with(&topology, Duration::from_secs(3), Duration::from_secs(1)).await;
    let heartbeat = manager.heartbeat();
    let master = topology.master_port();
    let replica = replica_port(&topology);
    replica_node(&mut topology, replica).pause();
    replica_node(&mut topology, master).pause();
    let down = eventually(Duration::from_secs(10), || {
        (!manager.is_enabled()).then_some(())
    })
    .await;
    // Watch the heartbeat through several connect rounds.
    let mut oldest = Duration::ZERO;
    let until = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::time::Instant::now() < until {
        oldest = oldest.max(heartbeat.age().unwrap_or_default());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    replica_node(&mut topology, master).resume();
    replica_node(&mut topology, replica).resume();
    assert!(down.is_some(), "the frozen master is noticed");
    // One round (at most 4.1 s; a frozen master takes its 3 s connect timeout once) plus
    // the longest backoff (2 s); the old round tried it once per sentinel (9 s + 2 s).
    assert!(
        oldest < Duration::from_millis(7500),
        "the health task went {oldest:?} without a round"
    );
}
