//! Operations (spec §6 SIGHUP, §8, §9) against the real daemon: health and readiness,
//! metrics that move and pass `promtool`, secrets kept out of logs, the systemd
//! notification protocol, and reload by SIGHUP.

use std::net::SocketAddr;
use std::time::Duration;

use redis::Commands;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::bridge::{config, eventually, Bridge, Client, SUBSCRIBED};
use crate::harness::{Mosquitto, Redis};

const WAIT: Duration = Duration::from_secs(20);

const LATEST_ROUTE: &str = r#"
[[routes]]
name = "latest"
topic = "sensors/{device_id}/data"
[[routes.actions]]
op = "set"
key = "sensor:{device_id}:latest"
"#;

/// The address the daemon logged for its HTTP endpoint (`listen` port 0 in tests).
pub(crate) fn http_addr(bridge: &Bridge) -> SocketAddr {
    let needle = "http listening on ";
    let log = bridge.log_text();
    let start = log
        .find(needle)
        .unwrap_or_else(|| panic!("no {needle:?} in the log:\n{log}"))
        + needle.len();
    let addr: String = log[start..]
        .chars()
        .take_while(|c| !c.is_whitespace())
        .collect();
    addr.parse()
        .unwrap_or_else(|e| panic!("bad address {addr:?}: {e}"))
}

/// `GET path` over a fresh connection: (status code, body).
pub(crate) async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("HTTP answer in time")
        .expect("HTTP exchange");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("malformed response: {response:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, body.to_string())
}

/// Polls `path` until its status is `status`; the last body.
pub(crate) async fn get_until(addr: SocketAddr, path: &str, status: u16) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (code, body) = get(addr, path).await;
        if code == status {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} still answers {code} {body} after {WAIT:?}, expected {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of the sample `series` (name and labels exactly as rendered).
pub(crate) fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_redis_while_redis_is_stopped() {
    let mut redis = Redis::start();
    let broker = Mosquitto::start();
    let bridge = Bridge::start(&config(&redis, &broker, "ops-ready-redis", LATEST_ROUTE));
    let addr = http_addr(&bridge);

    let body = get_until(addr, "/readyz", 200).await;
    assert_eq!(body, r#"{"ready":true,"mqtt":"up","redis":"up"}"#);
    assert_eq!(get(addr, "/healthz").await.0, 200);

    redis.stop();
    let body = get_until(addr, "/readyz", 503).await;
    assert_eq!(body, r#"{"ready":false,"mqtt":"up","redis":"down"}"#);
    // Redis being down is not a reason to restart the bridge.
    assert_eq!(get(addr, "/healthz").await.0, 200);

    redis.start_again();
    let body = get_until(addr, "/readyz", 200).await;
    assert_eq!(body, r#"{"ready":true,"mqtt":"up","redis":"up"}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_names_mqtt_while_the_broker_is_stopped() {
    let redis = Redis::start();
    let mut broker = Mosquitto::start();
    let bridge = Bridge::start(&config(&redis, &broker, "ops-ready-mqtt", LATEST_ROUTE));
    let addr = http_addr(&bridge);
    get_until(addr, "/readyz", 200).await;

    broker.stop();
    let body = get_until(addr, "/readyz", 503).await;
    assert_eq!(body, r#"{"ready":false,"mqtt":"down","redis":"up"}"#);
    assert_eq!(get(addr, "/healthz").await.0, 200);

    broker.start_again();
    get_until(addr, "/readyz", 200).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_as_messages_flow_and_pass_promtool() {
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let bridge = Bridge::start(&config(&redis, &broker, "ops-metrics", LATEST_ROUTE));
    let addr = http_addr(&bridge);

    let (status, before) = get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        sample(
            &before,
            r#"routemq_bridge_messages_received_total{route="latest"}"#
        ),
        Some(0.0),
        "routes start at zero:\n{before}"
    );

    let mut client = Client::connect(&broker, "ops-metrics-publisher").await;
    let n = 20;
    client
        .publish_all((0..n).map(|i| (format!("sensors/dev-{i}/data"), b"{}".to_vec())))
        .await;
    let mut conn = redis.client().get_connection().expect("redis");
    eventually(WAIT, || {
        conn.exists::<_, bool>(format!("sensor:dev-{}:latest", n - 1))
            .ok()
            .filter(|e| *e)
    })
    .await
    .expect("the last message reached Redis");

    // The outcome is counted right after the write: poll until the scrape shows all of them.
    let deadline = tokio::time::Instant::now() + WAIT;
    let metrics = loop {
        let (_, metrics) = get(addr, "/metrics").await;
        let written = sample(
            &metrics,
            r#"routemq_bridge_messages_total{route="latest",outcome="written"}"#,
        );
        if written == Some(f64::from(n)) || tokio::time::Instant::now() > deadline {
            break metrics;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let expect = |series: &str, value: f64| {
        assert_eq!(
            sample(&metrics, series),
            Some(value),
            "{series} in:\n{metrics}"
        );
    };
    expect(
        r#"routemq_bridge_messages_received_total{route="latest"}"#,
        f64::from(n),
    );
    expect(
        r#"routemq_bridge_messages_total{route="latest",outcome="written"}"#,
        f64::from(n),
    );
    expect(
        r#"routemq_bridge_message_duration_seconds_count{route="latest"}"#,
        f64::from(n),
    );
    expect("routemq_bridge_mqtt_connected", 1.0);
    expect("routemq_bridge_redis_up", 1.0);
    expect("routemq_bridge_inflight_messages", 0.0);
    expect(
        &format!(
            r#"routemq_bridge_build_info{{version="{}"}}"#,
            env!("CARGO_PKG_VERSION")
        ),
        1.0,
    );
    // One round trip per message: a MULTI/EXEC, or a plain pipeline when the route's one
    // command is atomic by itself (this route has a single `set`).
    let round_trips: f64 = ["multi", "pipeline"]
        .iter()
        .filter_map(|command| {
            sample(
                &metrics,
                &format!(
                    r#"routemq_bridge_redis_command_duration_seconds_count{{command="{command}"}}"#
                ),
            )
        })
        .sum();
    assert!(
        round_trips >= f64::from(n),
        "one timed round trip per message, got {round_trips}:\n{metrics}"
    );
    assert!(
        metrics.contains(
            r#"routemq_bridge_message_duration_seconds_bucket{route="latest",le="0.0001"}"#
        ),
        "sub-millisecond buckets:\n{metrics}"
    );
    assert!(
        !metrics.contains("dev-"),
        "labels never carry topics or device ids:\n{metrics}"
    );
    promtool_check_metrics(&metrics);
}

/// Spec §5.3: a QoS 0 message beyond `max_inflight` ends as outcome `overflow` on the route
/// it matches — counted, never dropped silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_messages_beyond_max_inflight_are_counted_as_overflow() {
    let mut redis = Redis::start();
    let broker = Mosquitto::start();
    let rest = r#"
[limits]
max_inflight = 1

[[routes]]
name = "burst"
topic = "burst/{n}"
qos = 0
[[routes.actions]]
op = "set"
key = "burst:{n}"
"#;
    let bridge = Bridge::start(&config(&redis, &broker, "ops-overflow", rest));
    let addr = http_addr(&bridge);
    // With Redis gone the first message waits, holding the only in-flight slot.
    redis.stop();
    let mut client = Client::connect(&broker, "ops-overflow-publisher").await;
    client
        .publish_all((0..5).map(|i| (format!("burst/m{i}"), b"{}".to_vec())))
        .await;

    let series = r#"routemq_bridge_messages_total{route="burst",outcome="overflow"}"#;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, metrics) = get(addr, "/metrics").await;
        if sample(&metrics, series) == Some(4.0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "expected 4 overflows in:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The one that held the slot is written once Redis is back.
    redis.start_again();
    let mut conn = redis.client().get_connection().expect("redis");
    eventually(WAIT, || {
        conn.exists::<_, bool>("burst:m0").ok().filter(|e| *e)
    })
    .await
    .expect("the message in flight reached Redis");
}

/// `promtool check metrics` on `text`; skipped loudly when promtool is not installed.
pub(crate) fn promtool_check_metrics(text: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            eprintln!(
                "\n!!!!! SKIPPED: promtool not found ({e}); install it with \
                 `apt-get install -y prometheus` to lint /metrics !!!!!\n"
            );
            return;
        }
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let output = child.wait_with_output().expect("promtool runs");
    assert!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}\n--- metrics ---\n{text}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_password_appears_neither_in_debug_logs_nor_in_debug_output() {
    let password = "Pa55-w0rd-that-must-not-leak";
    let redis = Redis::start_with(&["--requirepass", password]);
    let broker = Mosquitto::start();
    let toml = config(&redis, &broker, "ops-secrets", LATEST_ROUTE)
        .replace(
            "[redis]\n",
            &format!("[redis]\npassword = \"{password}\"\n"),
        )
        .replace(
            "[mqtt]\n",
            &format!("[mqtt]\nusername = \"bridge\"\npassword = \"{password}\"\n"),
        );
    let mut bridge = Bridge::start_with_env(&toml, &[("RUST_LOG", "debug")]);
    let mut client = Client::connect(&broker, "ops-secrets-publisher").await;
    client.publish("sensors/dev-1/data", b"{}".to_vec()).await;
    let redis_url = format!("redis://:{password}@127.0.0.1:{}", redis.port());
    let mut conn = redis::Client::open(redis_url)
        .expect("url")
        .get_connection()
        .expect("redis with password");
    eventually(WAIT, || {
        conn.get::<_, Option<String>>("sensor:dev-1:latest")
            .ok()
            .flatten()
    })
    .await
    .expect("the bridge authenticated and wrote");
    assert!(bridge.terminate(WAIT).success());

    let log = bridge.log_text();
    assert!(log.contains("DEBUG"), "the log is at debug level:\n{log}");
    assert!(
        log.contains("<redacted>"),
        "the config is logged, redacted:\n{log}"
    );
    assert!(
        !log.contains(password),
        "the password leaked into the log:\n{log}"
    );

    let (loaded, _) = routemq_bridge::daemon::config::BridgeConfig::compile(
        bridge.config_path(),
        &std::collections::HashMap::new(),
    )
    .expect("config loads");
    let debug = format!("{loaded:?}");
    assert!(debug.contains("<redacted>"), "{debug}");
    assert!(
        !debug.contains(password),
        "the password leaked into Debug: {debug}"
    );
    let manager = routemq_bridge::redis::RedisManager::new(loaded.redis.clone());
    assert!(!format!("{manager:?}").contains(password));
}

/// Datagrams the daemon sent to a fake `NOTIFY_SOCKET`, split into lines.
async fn next_notifications(socket: &tokio::net::UnixDatagram) -> Vec<String> {
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, socket.recv(&mut buf))
        .await
        .expect("a notification in time")
        .expect("recv");
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_status_watchdog_and_stopping_in_that_order() {
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&path).expect("bind NOTIFY_SOCKET");
    let notify_socket = path.display().to_string();
    let mut bridge = Bridge::start_with_env(
        &config(&redis, &broker, "ops-systemd", LATEST_ROUTE),
        &[
            ("NOTIFY_SOCKET", notify_socket.as_str()),
            // Pings every 200 ms.
            ("WATCHDOG_USEC", "400000"),
        ],
    );

    let mut lines = Vec::new();
    while !lines.iter().any(|l: &String| l == "WATCHDOG=1") {
        lines.extend(next_notifications(&socket).await);
    }
    assert!(bridge.terminate(WAIT).success());
    while !lines.iter().any(|l: &String| l == "STOPPING=1") {
        lines.extend(next_notifications(&socket).await);
    }

    let first = |prefix: &str| {
        lines
            .iter()
            .position(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in {lines:?}"))
    };
    let ready = first("READY=1");
    let status = first("STATUS=");
    let watchdog = first("WATCHDOG=1");
    let stopping = first("STOPPING=1");
    assert!(
        ready < status && status < watchdog && watchdog < stopping,
        "order READY, STATUS, WATCHDOG, STOPPING: {lines:?}"
    );
    assert!(
        lines[status].contains("1 routes") && lines[status].contains("mqtt up"),
        "STATUS says what runs: {}",
        lines[status]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_added_by_sighup_handles_messages() {
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let base = config(&redis, &broker, "ops-reload", LATEST_ROUTE);
    let bridge = Bridge::start(&base);
    let addr = http_addr(&bridge);

    let added = r#"
[[routes]]
name = "counts"
topic = "counters/{name}"
[[routes.actions]]
op = "incr"
key = "count:{name}"
"#;
    let offset = bridge.reload_with(&format!("{base}{added}"));
    assert!(
        bridge.wait_for_log_after(offset, "configuration reloaded", WAIT),
        "reload applied:\n{}",
        bridge.log_text()
    );
    assert!(
        bridge.wait_for_log_after(offset, SUBSCRIBED, WAIT),
        "the new filter was granted:\n{}",
        bridge.log_text()
    );

    let mut client = Client::connect(&broker, "ops-reload-publisher").await;
    client.publish("counters/boots", b"1".to_vec()).await;
    client.publish("sensors/dev-9/data", b"{}".to_vec()).await;
    let mut conn = redis.client().get_connection().expect("redis");
    let count = eventually(WAIT, || {
        conn.get::<_, Option<i64>>("count:boots").ok().flatten()
    })
    .await;
    assert_eq!(count, Some(1), "the added route handled its message");
    let latest = eventually(WAIT, || {
        conn.get::<_, Option<String>>("sensor:dev-9:latest")
            .ok()
            .flatten()
    })
    .await;
    assert_eq!(latest.as_deref(), Some("{}"), "the old route still works");

    let (_, metrics) = get(addr, "/metrics").await;
    assert_eq!(
        sample(
            &metrics,
            r#"routemq_bridge_config_reloads_total{result="applied"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_config_sent_by_sighup_leaves_the_old_routes_working() {
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let base = config(&redis, &broker, "ops-reload-broken", LATEST_ROUTE);
    let bridge = Bridge::start(&base);
    let addr = http_addr(&bridge);

    // Two mistakes: both must be logged.
    let broken = r#"
[[routes]]
name = "broken"
topic = "broken/{id}"
colour = "blue"
[[routes.actions]]
op = "set"
key = "x:{nope}"
"#;
    let offset = bridge.reload_with(&format!("{base}{broken}"));
    assert!(
        bridge.wait_for_log_after(offset, "configuration reload refused", WAIT),
        "reload refused:\n{}",
        bridge.log_text()
    );
    let log = bridge.log_text()[offset..].to_string();
    assert!(log.contains("colour"), "the unknown key is logged:\n{log}");
    assert!(log.contains("nope"), "the unknown param is logged:\n{log}");

    let mut client = Client::connect(&broker, "ops-reload-broken-publisher").await;
    client.publish("sensors/dev-3/data", b"{}".to_vec()).await;
    let mut conn = redis.client().get_connection().expect("redis");
    let latest = eventually(WAIT, || {
        conn.get::<_, Option<String>>("sensor:dev-3:latest")
            .ok()
            .flatten()
    })
    .await;
    assert_eq!(latest.as_deref(), Some("{}"), "the old route still works");

    let (_, metrics) = get(addr, "/metrics").await;
    assert_eq!(
        sample(
            &metrics,
            r#"routemq_bridge_config_reloads_total{result="rejected"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(get(addr, "/readyz").await.0, 200);
}
