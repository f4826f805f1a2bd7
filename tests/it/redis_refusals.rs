//! A Redis that is up but refuses (spec §5.3 "Permanent vs. passing"): `OOM` (maxmemory
//! reached), `READONLY` (a replica, as during a failover), `MISCONF` (a failed background
//! save). Each is a wait, not a failure: nothing is acked while it lasts, `/readyz` says
//! `refusing`, and once Redis takes writes again every message is written once and no dead
//! letter exists. The dead letter itself waits the same way, and keeps at most
//! `[dead_letter] max_payload` of a payload.

use std::time::Duration;

use redis::Commands;

use crate::bridge::{config, eventually, Bridge, Client};
use crate::bridge_delivery::NUMBERED_ROUTE;
use crate::harness::Mosquitto;
use crate::harness::{free_port, Redis};
use crate::ops::{get, get_until, http_addr, sample};

/// How long the bridge may take to write a backlog once Redis takes writes again.
const CATCH_UP: Duration = Duration::from_secs(60);

const REFUSING: &str = r#"{"ready":false,"mqtt":"up","redis":"refusing"}"#;
const READY: &str = r#"{"ready":true,"mqtt":"up","redis":"up"}"#;

/// Two actions, so each message is a MULTI/EXEC: a refusal while queueing aborts it
/// (`EXECABORT`), which must count as the refusal it is.
const ROUTE: &str = NUMBERED_ROUTE;

const COUNT: u32 = 50;

fn redis_conn(redis: &Redis) -> redis::Connection {
    redis.client().get_connection().expect("test connection")
}

fn cmd(redis: &Redis, args: &[&str]) {
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    let _: redis::Value = c
        .query(&mut redis_conn(redis))
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
}

/// Publishes [`COUNT`] messages while `refuse` holds, checks nothing became an outcome and
/// `/readyz` says `refusing`, then lifts it with `restore` and checks every message was
/// written exactly once, with no dead letter.
async fn refusal_is_a_wait(
    redis: &Redis,
    name: &str,
    refuse: impl FnOnce(&Redis),
    restore: impl FnOnce(&Redis),
) {
    let broker = Mosquitto::start();
    let bridge = Bridge::start(&config(redis, &broker, name, ROUTE));
    let addr = http_addr(&bridge);
    get_until(addr, "/readyz", 200).await;

    refuse(redis);
    let mut client = Client::connect(&broker, &format!("{name}-publisher")).await;
    client
        .publish_all((0..COUNT).map(|n| {
            (
                "load/data".to_string(),
                format!(r#"{{"n":{n}}}"#).into_bytes(),
            )
        }))
        .await;

    let body = get_until(addr, "/readyz", 503).await;
    assert_eq!(body, REFUSING, "log:\n{}", bridge.log_text());
    // Messages are held (as many as the broker's in-flight window lets through), and none
    // has an outcome: none is acked.
    let metrics = metrics_until(addr, |m| {
        sample(m, "routemq_bridge_inflight_messages").is_some_and(|n| n >= 1.0)
            && sample(m, r#"routemq_bridge_redis_errors_total{kind="refused"}"#)
                .is_some_and(|n| n > 0.0)
    })
    .await
    .unwrap_or_else(|| panic!("messages held; log:\n{}", bridge.log_text()));
    assert!(
        !metrics.contains("routemq_bridge_messages_total{"),
        "a refusal is no outcome:\n{metrics}"
    );
    let mut conn = redis_conn(redis);
    let keys: Vec<String> = conn.keys("msg:*").expect("KEYS");
    assert!(keys.is_empty(), "nothing can be written: {keys:?}");

    restore(redis);
    let written = eventually(CATCH_UP, || {
        let n: usize = conn.llen("order").ok()?;
        (n >= COUNT as usize).then_some(n)
    })
    .await;
    assert_eq!(
        written,
        Some(COUNT as usize),
        "every message written once; log:\n{}",
        bridge.log_text()
    );
    let order: Vec<String> = conn.lrange("order", 0, -1).expect("LRANGE");
    let expected: Vec<String> = (0..COUNT).map(|n| format!(r#"{{"n":{n}}}"#)).collect();
    assert_eq!(order, expected, "in order, once each");
    let dead: usize = conn.llen("dead_letter").expect("LLEN");
    assert_eq!(dead, 0, "no dead letter");
    assert_eq!(get_until(addr, "/readyz", 200).await, READY);
}

/// The newest dead-letter record, once there is one (bounded).
async fn newest_dead_letter(conn: &mut redis::Connection, bridge: &Bridge) -> serde_json::Value {
    let record = eventually(CATCH_UP, || {
        conn.lindex::<_, Option<String>>("dead_letter", 0)
            .ok()
            .flatten()
    })
    .await
    .unwrap_or_else(|| panic!("dead letter written; log:\n{}", bridge.log_text()));
    serde_json::from_str(&record).expect("record JSON")
}

/// Polls `/metrics` until `check` holds (bounded); the text then.
async fn metrics_until(addr: std::net::SocketAddr, check: impl Fn(&str) -> bool) -> Option<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = get(addr, "/metrics").await.1;
        if check(&metrics) {
            return Some(metrics);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_wait_while_redis_is_out_of_memory() {
    let redis = Redis::start_with(&["--maxmemory-policy", "noeviction"]);
    refusal_is_a_wait(
        &redis,
        "refused-oom",
        // Below what Redis already uses: every write is refused with OOM.
        |r| cmd(r, &["CONFIG", "SET", "maxmemory", "1"]),
        |r| cmd(r, &["CONFIG", "SET", "maxmemory", "0"]),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_wait_while_redis_is_a_read_only_replica() {
    let redis = Redis::start();
    let dead_master = free_port().to_string();
    refusal_is_a_wait(
        &redis,
        "refused-readonly",
        // A replica of a master that is not there: READONLY, as an old master during a
        // failover.
        |r| cmd(r, &["REPLICAOF", "127.0.0.1", &dead_master]),
        |r| cmd(r, &["REPLICAOF", "NO", "ONE"]),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_wait_while_redis_cannot_save() {
    // `dir` may only be changed at run time with protected configs enabled; Redis refuses
    // writes after a failed save only when it has save points.
    let redis = Redis::start_with(&[
        "--enable-protected-configs",
        "yes",
        "--save",
        "3600 1",
        "--stop-writes-on-bgsave-error",
        "yes",
    ]);
    let dir = redis.dir().display().to_string();
    refusal_is_a_wait(
        &redis,
        "refused-misconf",
        // Nothing can be created in /proc, not even by root: BGSAVE fails, and with
        // stop-writes-on-bgsave-error Redis answers writes with MISCONF.
        |r| {
            cmd(r, &["CONFIG", "SET", "dir", "/proc"]);
            cmd(r, &["BGSAVE"]);
            wait_bgsave(r, "err");
        },
        |r| {
            cmd(r, &["CONFIG", "SET", "dir", &dir]);
            cmd(r, &["BGSAVE"]);
            wait_bgsave(r, "ok");
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_made_while_redis_cannot_save_is_refusing_not_down() {
    let redis = Redis::start_with(&["--enable-protected-configs", "yes", "--save", "3600 1"]);
    let dir = redis.dir().display().to_string();
    let broker = Mosquitto::start();
    let bridge = Bridge::start(&config(&redis, &broker, "refused-reconnect", ROUTE));
    let addr = http_addr(&bridge);
    get_until(addr, "/readyz", 200).await;
    cmd(&redis, &["CONFIG", "SET", "dir", "/proc"]);
    cmd(&redis, &["BGSAVE"]);
    wait_bgsave(&redis, "err");
    // A dropped connection while Redis refuses: MISCONF refuses the new connection's PING
    // too. It is a refusing Redis, not a missing one.
    cmd(
        &redis,
        &["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"],
    );
    let reconnected = "redis connection re-established";
    assert!(
        bridge.wait_for_log(reconnected, Duration::from_secs(30)),
        "reconnected; log:\n{}",
        bridge.log_text()
    );
    assert_eq!(get_until(addr, "/readyz", 503).await, REFUSING);
    cmd(&redis, &["CONFIG", "SET", "dir", &dir]);
    cmd(&redis, &["BGSAVE"]);
    wait_bgsave(&redis, "ok");
    assert_eq!(get_until(addr, "/readyz", 200).await, READY);
}

/// Waits (bounded) until the last background save ended with `status` (`ok` / `err`).
fn wait_bgsave(redis: &Redis, status: &str) {
    let mut conn = redis_conn(redis);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let wanted = format!("rdb_last_bgsave_status:{status}");
    loop {
        let info: String = redis::cmd("INFO")
            .arg("persistence")
            .query(&mut conn)
            .expect("INFO");
        if info.contains(&wanted) && info.contains("rdb_bgsave_in_progress:0") {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no BGSAVE with status {status}:\n{info}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_message_waits_until_its_dead_letter_is_written() {
    let redis = Redis::start_with(&["--maxmemory-policy", "noeviction"]);
    let broker = Mosquitto::start();
    let bridge = Bridge::start(&config(&redis, &broker, "refused-dead-letter", ROUTE));
    let addr = http_addr(&bridge);

    cmd(&redis, &["CONFIG", "SET", "maxmemory", "1"]);
    let mut client = Client::connect(&broker, "refused-dead-letter-publisher").await;
    client.publish("load/data", "not json").await;
    // The outcome is known (invalid), but its record cannot be written: still held.
    let held = metrics_until(addr, |m| {
        sample(m, "routemq_bridge_inflight_messages") == Some(1.0)
            && sample(m, r#"routemq_bridge_redis_errors_total{kind="refused"}"#)
                .is_some_and(|n| n > 0.0)
    })
    .await;
    assert!(
        held.is_some(),
        "held while its dead letter is refused; log:\n{}",
        bridge.log_text()
    );

    cmd(&redis, &["CONFIG", "SET", "maxmemory", "0"]);
    let mut conn = redis_conn(&redis);
    let record = newest_dead_letter(&mut conn, &bridge).await;
    assert_eq!(record["reason"], "invalid_json");
    assert_eq!(record["payload"], "not json");
    let acked = metrics_until(addr, |m| {
        sample(m, "routemq_bridge_inflight_messages") == Some(0.0)
    })
    .await;
    assert!(acked.is_some(), "acked once the record is written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_keeps_at_most_max_payload_of_a_large_payload() {
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let bridge = Bridge::start(
        &config(
            &redis,
            &broker,
            "dead-letter-max-payload",
            &format!("[limits]\nmax_payload = \"2MiB\"\n{ROUTE}"),
        )
        .replace(
            "reconnect_max_delay = \"1s\"",
            "reconnect_max_delay = \"1s\"\nmax_packet_size = \"4MiB\"",
        )
        .replace(
            "redis_list = \"dead_letter\"",
            "redis_list = \"dead_letter\"\nmax_payload = \"16KiB\"",
        ),
    );
    let mut client = Client::connect(&broker, "dead-letter-max-payload-publisher").await;
    // 1 MiB of text that is not JSON: invalid_json, not payload_too_large.
    client.publish("load/data", vec![b'x'; 1024 * 1024]).await;
    let mut conn = redis_conn(&redis);
    let record = newest_dead_letter(&mut conn, &bridge).await;
    assert_eq!(record["reason"], "invalid_json");
    assert_eq!(record["payload"].as_str().map(str::len), Some(16 * 1024));
    assert_eq!(record["truncated"], true);
}
