//! Bounded and alive whatever our own bugs do (spec §6 "the process never lingers broken",
//! §5.3 `internal_error`, §9): faults injected into the real (debug) daemon through its
//! test-only hooks (`src/fault.rs`), the watchdog heard on a fake `NOTIFY_SOCKET`, a flood
//! of HTTP clients that never read, and `check` refusing what `run` could not start.

use std::time::{Duration, Instant};

use redis::Commands;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::bridge::{config, eventually, Bridge, Client};
use crate::harness::{wait_with_timeout, Mosquitto, Redis};
use crate::ops::{get, get_until, http_addr, sample};

const WAIT: Duration = Duration::from_secs(20);

/// Every payload appended to `log:{id}`, in arrival order.
const LOG_ROUTE: &str = r#"
[[routes]]
name = "log"
topic = "alive/{id}"
payload = "bytes"
[[routes.actions]]
op = "rpush"
key = "log:{id}"

[limits]
shutdown_timeout = "1s"
"#;

fn list(redis: &Redis, key: &str) -> Vec<String> {
    let mut conn = redis.client().get_connection().expect("redis");
    conn.lrange(key, 0, -1).expect("lrange")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_while_handling_one_message_dead_letters_it_as_internal_error_and_acks_it() {
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let mut bridge = Bridge::start_with_env(
        &config(&redis, &broker, "alive-panic", LOG_ROUTE),
        &[("ROUTEMQ_FAULT_PANIC_ON_PAYLOAD", "boom")],
    );
    let mut client = Client::connect(&broker, "alive-panic-publisher").await;
    client.publish("alive/a", "boom").await;
    client.publish("alive/a", "after").await;

    let after = eventually(WAIT, || {
        Some(list(&redis, "log:a")).filter(|l| !l.is_empty())
    })
    .await;
    assert_eq!(
        after,
        Some(vec!["after".to_string()]),
        "the next one goes on"
    );
    let record = eventually(WAIT, || {
        let mut conn = redis.client().get_connection().ok()?;
        let raw: Option<String> = conn.lindex("dead_letter", 0).ok()?;
        serde_json::from_str::<Value>(&raw?).ok()
    })
    .await
    .unwrap_or_else(|| panic!("no dead-letter record; log:\n{}", bridge.log_text()));
    assert_eq!(record["reason"], "internal_error", "{record}");
    assert_eq!(record["topic"], "alive/a");
    assert_eq!(record["route"], "log");
    assert_eq!(record["payload"], "boom");
    let (_, metrics) = get(http_addr(&bridge), "/metrics").await;
    assert_eq!(
        sample(
            &metrics,
            r#"routemq_bridge_messages_total{route="log",outcome="failed"}"#
        ),
        Some(1.0),
        "{metrics}"
    );

    // It was acked: after a restart on the same persistent session the broker redelivers
    // nothing, so only the new message arrives.
    assert!(bridge.terminate(WAIT).success());
    bridge.spawn();
    client.publish("alive/a", "sentinel").await;
    let log = eventually(WAIT, || {
        Some(list(&redis, "log:a")).filter(|l| l.iter().any(|p| p == "sentinel"))
    })
    .await;
    assert_eq!(
        log,
        Some(vec!["after".to_string(), "sentinel".to_string()]),
        "nothing redelivered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mqtt_loop_dying_makes_the_daemon_exit_1() {
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let mut bridge = Bridge::start_with_env(
        &config(&redis, &broker, "alive-loop-death", LOG_ROUTE),
        &[("ROUTEMQ_FAULT_END_MQTT_LOOP_ON_PAYLOAD", "die")],
    );
    let mut client = Client::connect(&broker, "alive-loop-death-publisher").await;
    client.publish("alive/a", "die").await;
    let status = tokio::task::block_in_place(|| bridge.wait_exit(WAIT))
        .unwrap_or_else(|| panic!("still running; log:\n{}", bridge.log_text()));
    assert_eq!(
        status.code(),
        Some(1),
        "exit 1 so Restart=on-failure restarts it; log:\n{}",
        bridge.log_text()
    );
    // The log reader may still be catching up with the exited process.
    assert!(
        bridge.wait_for_log("MQTT loop ended unexpectedly", WAIT),
        "log:\n{}",
        bridge.log_text()
    );
}

/// A bridge whose watchdog pings every 200 ms (`WatchdogSec` 400 ms) to `socket`, with
/// bounds short enough that a message counts as stuck after 5 s with Redis and the broker up.
fn watched_bridge(
    redis: &Redis,
    broker: &Mosquitto,
    client_id: &str,
    socket: &std::path::Path,
    extra_env: &[(&str, &str)],
) -> Bridge {
    let notify_socket = socket.display().to_string();
    let mut env = vec![
        ("NOTIFY_SOCKET", notify_socket.as_str()),
        ("WATCHDOG_USEC", "400000"),
        ("ROUTEMQ_BRIDGE_REDIS__SOCKET_TIMEOUT", "500ms"),
        ("ROUTEMQ_BRIDGE_REDIS__SOCKET_CONNECT_TIMEOUT", "500ms"),
    ];
    env.extend_from_slice(extra_env);
    Bridge::start_with_env(&config(redis, broker, client_id, LOG_ROUTE), &env)
}

/// When each `WATCHDOG=1` arrived during `span`.
async fn pings_during(socket: &tokio::net::UnixDatagram, span: Duration) -> Vec<Instant> {
    let deadline = tokio::time::Instant::now() + span;
    let mut pings = Vec::new();
    let mut buf = vec![0u8; 4096];
    while let Ok(received) = tokio::time::timeout_at(deadline, socket.recv(&mut buf)).await {
        let n = received.expect("recv");
        if String::from_utf8_lossy(&buf[..n])
            .lines()
            .any(|l| l == "WATCHDOG=1")
        {
            pings.push(Instant::now());
        }
    }
    pings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_hung_on_one_message_stops_the_watchdog() {
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&path).expect("bind NOTIFY_SOCKET");
    let bridge = watched_bridge(
        &redis,
        &broker,
        "alive-hung-lane",
        &path,
        &[("ROUTEMQ_FAULT_HANG_ON_PAYLOAD", "hang")],
    );
    assert!(
        !pings_during(&socket, Duration::from_secs(1))
            .await
            .is_empty(),
        "pinging before"
    );

    let mut client = Client::connect(&broker, "alive-hung-lane-publisher").await;
    client.publish("alive/h", "hang").await;
    // Other topics still flow, and the loops all turn: only progress can tell.
    client.publish("alive/o", "ok").await;
    let ok = eventually(WAIT, || {
        Some(list(&redis, "log:o")).filter(|l| !l.is_empty())
    })
    .await;
    assert_eq!(ok, Some(vec!["ok".to_string()]));

    // Within the bound (5 s here) the pings stop, and stay stopped.
    let deadline = Instant::now() + WAIT;
    loop {
        let pings = pings_during(&socket, Duration::from_secs(2)).await;
        if pings.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the watchdog is still fed with a lane hung; log:\n{}",
            bridge.log_text()
        );
    }
    let body = get_until(http_addr(&bridge), "/healthz", 503).await;
    assert!(body.contains("lanes"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_waiting_for_redis_do_not_stop_the_watchdog() {
    let mut redis = Redis::start();
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&path).expect("bind NOTIFY_SOCKET");
    let bridge = watched_bridge(&redis, &broker, "alive-redis-outage", &path, &[]);
    let addr = http_addr(&bridge);
    assert!(!pings_during(&socket, Duration::from_secs(1))
        .await
        .is_empty());

    redis.stop();
    get_until(addr, "/readyz", 503).await;
    let mut client = Client::connect(&broker, "alive-redis-outage-publisher").await;
    client.publish("alive/r", "waits").await;
    // Well past the 5 s a message may be held with Redis up: pings never pause.
    let pings = pings_during(&socket, Duration::from_secs(8)).await;
    assert!(pings.len() > 20, "{} pings in 8 s", pings.len());
    let longest_gap = pings
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    assert!(
        longest_gap < Duration::from_secs(2),
        "the watchdog paused {longest_gap:?} during a Redis outage; log:\n{}",
        bridge.log_text()
    );
    assert_eq!(get(addr, "/healthz").await.0, 200);

    redis.start_again();
    let written = eventually(WAIT, || {
        Some(list(&redis, "log:r")).filter(|l| !l.is_empty())
    })
    .await;
    assert_eq!(written, Some(vec!["waits".to_string()]));
    assert!(!pings_during(&socket, Duration::from_secs(1))
        .await
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_during_a_flood_of_clients_that_never_read() {
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let bridge = Bridge::start(&config(&redis, &broker, "alive-http-flood", LOG_ROUTE));
    let addr = http_addr(&bridge);

    // Each asks for /metrics again and again and reads nothing: the answers fill the
    // socket buffers and the server's writes block.
    let requests = "GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n".repeat(100);
    let mut flood = Vec::new();
    for _ in 0..100 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        // Not waiting for the write to finish: the server may stop reading.
        let _ = tokio::time::timeout(
            Duration::from_millis(50),
            stream.write_all(requests.as_bytes()),
        )
        .await;
        flood.push(stream);
    }

    let started = Instant::now();
    let (status, body) = get(addr, "/healthz").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "/healthz took {:?}",
        started.elapsed()
    );
    drop(flood);
}

#[test]
fn an_mqtt_5_key_under_3_1_1_is_refused_with_exit_2_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bridge.toml");
    std::fs::write(
        &path,
        "[mqtt]\nurl = \"mqtt://127.0.0.1:1\"\nsession_expiry = \"1h\"\n",
    )
    .expect("write config");
    for command in ["check", "run"] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_routemq-bridge"))
            .arg(command)
            .arg("--config")
            .arg(&path)
            .env_remove("JOURNAL_STREAM")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start routemq-bridge");
        let status = wait_with_timeout(&mut child, WAIT).expect("exits");
        let mut stderr = String::new();
        if let Some(mut err) = child.stderr.take() {
            std::io::Read::read_to_string(&mut err, &mut stderr).ok();
        }
        assert_eq!(status.code(), Some(2), "{command}: {stderr}");
        assert!(
            stderr.contains("mqtt.session_expiry"),
            "{command}: {stderr}"
        );
        assert!(stderr.contains("MQTT 5"), "{command}: {stderr}");
    }
}
