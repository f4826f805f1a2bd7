//! A silently dead Redis (spec §6): no FIN, no RST — a cable pulled, a NAT that forgot the
//! flow, a frozen process — is noticed within about 2 × `socket_timeout` and the connection
//! is rebuilt, with nothing lost meanwhile. The silence is made by a [`FaultProxy`] between
//! the daemon and Redis that keeps the TCP connections open but forwards nothing.
//!
//! (The pub/sub subscriber's side of the same promise is in `republish.rs`, where its
//! subscription can be observed.) The proxy's own kernel ACKs, as a frozen Redis's does, so
//! those tests prove the checks above the socket; the kernel's part — keepalive on every
//! socket — is read from `/proc/net/tcp`.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use redis::Commands;

use crate::bridge::{config, eventually, Bridge, Client};
use crate::bridge_delivery::{numbered, written_numbers, NUMBERED_ROUTE};
use crate::harness::{FaultProxy, Mosquitto, Redis};
use crate::ops::{get, http_addr, sample};
use crate::republish::pending;

/// `socket_timeout` of these tests: short, so the bound is short.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(1);

/// How long after the silence starts the bridge may take to notice it: the promised 2 ×
/// `socket_timeout`, plus slack for a shared, loaded CPU.
const NOTICE: Duration = Duration::from_secs(2 * SOCKET_TIMEOUT.as_secs() + 2);

/// How long the bridge may take to catch up once Redis answers again (debug build).
const CATCH_UP: Duration = Duration::from_secs(60);

/// The bridge's config (`rest` after the service tables) with Redis reached through
/// `proxy` and `socket_timeout` shortened.
fn through(
    proxy: &FaultProxy,
    redis: &Redis,
    broker: &Mosquitto,
    client_id: &str,
    rest: &str,
) -> String {
    let text = config(redis, broker, client_id, rest);
    let shortened = text.replace(
        r#"socket_timeout = "2s""#,
        &format!(r#"socket_timeout = "{}s""#, SOCKET_TIMEOUT.as_secs()),
    );
    assert_ne!(shortened, text, "the test config sets socket_timeout");
    shortened.replace(&redis.url(), &proxy.redis_url())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_redis_with_a_pipeline_in_flight_is_noticed_rebuilt_and_nothing_is_lost() {
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let proxy = FaultProxy::start(redis.port());
    let bridge = Bridge::start(&through(
        &proxy,
        &redis,
        &broker,
        "bridge-silent-redis",
        NUMBERED_ROUTE,
    ));
    let mut client = Client::connect(&broker, "silent-redis-publisher").await;
    let mut conn = redis.client().get_connection().expect("redis connection");

    client.publish_all(numbered(0..1000)).await;
    let writing = eventually(Duration::from_secs(30), || {
        (!written_numbers(&mut conn).is_empty()).then_some(())
    })
    .await;
    assert!(writing.is_some(), "the bridge did not start writing");
    let offset = bridge.log_text().len();
    proxy.blackhole(true);
    let silent_since = Instant::now();
    // More messages keep the pipeline busy while nothing comes back.
    client.publish_all(numbered(1000..1500)).await;

    assert!(
        bridge.wait_for_log_after(offset, "redis connection lost", NOTICE),
        "the silence was not noticed within {NOTICE:?}; log:\n{}",
        bridge.log_text()
    );
    // Silent for at least 2 × socket_timeout, as a real outage would be.
    tokio::time::sleep_until((silent_since + 2 * SOCKET_TIMEOUT).into()).await;
    proxy.blackhole(false);

    assert!(
        bridge.wait_for_log_after(offset, "redis connection re-established", CATCH_UP),
        "the connection was not rebuilt; log:\n{}",
        bridge.log_text()
    );
    eventually(CATCH_UP, || {
        (written_numbers(&mut conn).len() >= 1500).then_some(())
    })
    .await;
    assert_eq!(
        written_numbers(&mut conn),
        (0..1500).collect::<BTreeSet<_>>(),
        "every message is written; log:\n{}",
        bridge.log_text()
    );
    let (_, metrics) = get(http_addr(&bridge), "/metrics").await;
    let reconnects = sample(
        &metrics,
        r#"routemq_bridge_reconnects_total{target="redis"}"#,
    );
    assert!(
        reconnects.is_some_and(|n| n >= 1.0),
        "the rebuilt connection is counted: {reconnects:?}"
    );
}

/// The republish rules that open the dedicated connections: a subscriber and a blocking
/// stream reader.
const DEDICATED: &str = r#"
[[republish]]
name = "commands"
source = "pubsub"
channel = "commands:{device_id}"
topic = "devices/{device_id}/commands"

[[republish]]
name = "alerts"
source = "stream"
stream = "alerts:out"
topic = "alerts/{field.site}"
"#;

/// The socket inodes the process `pid` holds open.
fn socket_inodes(pid: u32) -> BTreeSet<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return BTreeSet::new();
    };
    fds.filter_map(|fd| {
        let target = std::fs::read_link(fd.ok()?.path()).ok()?;
        let target = target.to_str()?;
        target
            .strip_prefix("socket:[")?
            .strip_suffix(']')?
            .parse()
            .ok()
    })
    .collect()
}

/// For each established TCP connection to `port` among `inodes`: its timer (`tr`: 2 is
/// keepalive) and the time left on it, from `/proc/net/tcp` and `/proc/net/tcp6`.
fn timers_to(port: u16, inodes: &BTreeSet<u64>) -> Vec<(u8, Duration)> {
    let mut found = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(remote), Some(state), Some(timer), Some(inode)) =
                (fields.get(2), fields.get(3), fields.get(5), fields.get(9))
            else {
                continue;
            };
            let remote_port = remote
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            let inode: Option<u64> = inode.parse().ok();
            if *state != "01"
                || remote_port != Some(port)
                || !inode.is_some_and(|i| inodes.contains(&i))
            {
                continue;
            }
            let Some((kind, left)) = timer.split_once(':') else {
                continue;
            };
            let (Ok(kind), Ok(ticks)) =
                (u8::from_str_radix(kind, 16), u64::from_str_radix(left, 16))
            else {
                continue;
            };
            // The time left is in USER_HZ ticks, 100 a second on Linux.
            found.push((kind, Duration::from_millis(ticks * 10)));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_redis_socket_has_tcp_keepalive_set_from_socket_timeout() {
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let rest = format!("{NUMBERED_ROUTE}{DEDICATED}");
    let text = config(&redis, &broker, "bridge-keepalive", &rest).replace(
        r#"socket_timeout = "2s""#,
        &format!(r#"socket_timeout = "{}s""#, SOCKET_TIMEOUT.as_secs()),
    );
    let bridge = Bridge::start(&text);
    let pid = bridge.pid().expect("running");
    // The command connection, the subscriber and the stream reader; each idle socket has
    // its keepalive timer armed, due within about one socket_timeout (the system default
    // is two hours). A socket with data in flight shows its retransmit timer instead, so
    // look until all three are seen idle at once.
    let mut last = Vec::new();
    let all_armed = eventually(Duration::from_secs(20), || {
        last = timers_to(redis.port(), &socket_inodes(pid));
        (last.len() >= 3
            && last
                .iter()
                .all(|(kind, left)| *kind == 2 && *left <= SOCKET_TIMEOUT + Duration::from_secs(1)))
        .then_some(())
    })
    .await;
    assert!(
        all_armed.is_some(),
        "every connection to Redis has keepalive due within socket_timeout; \
         (timer, time left) per socket: {last:?}; log:\n{}",
        bridge.log_text()
    );
}

/// The next message on `topic` within `timeout`, skipping others.
async fn next_on(client: &mut Client, topic: &str, timeout: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = client.next_message(left).await?;
        if message.topic == topic {
            return Some(message.payload.to_vec());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reader_on_a_silent_connection_reconnects_within_two_socket_timeouts() {
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let proxy = FaultProxy::start(redis.port());
    let mut listener = Client::connect(&broker, "silent-stream-listener").await;
    listener.subscribe("alerts/#").await;
    listener.publish("alerts/probe", "probe").await;
    assert!(
        next_on(&mut listener, "alerts/probe", CATCH_UP)
            .await
            .is_some(),
        "the listener's subscription is active"
    );
    let rest = format!(
        r#"{NUMBERED_ROUTE}
[[republish]]
name = "alerts"
source = "stream"
stream = "alerts:out"
topic = "alerts/{{field.site}}"
"#
    );
    let bridge = Bridge::start(&through(
        &proxy,
        &redis,
        &broker,
        "bridge-silent-stream",
        &rest,
    ));
    let group = eventually(CATCH_UP, || pending(&redis, "alerts:out", "routemq-bridge")).await;
    assert!(group.is_some(), "the consumer group was created");
    let mut conn = redis.client().get_connection().expect("redis connection");
    let xadd = |conn: &mut redis::Connection, payload: &str| {
        let _: String = conn
            .xadd(
                "alerts:out",
                "*",
                &[("site", "north"), ("payload", payload)],
            )
            .expect("XADD");
    };
    xadd(&mut conn, "before");
    let before = next_on(&mut listener, "alerts/north", CATCH_UP).await;
    assert_eq!(before.as_deref(), Some(&b"before"[..]));
    // Once the entry is acknowledged the reader goes straight into its next blocking read:
    // the silence starts with that read in flight.
    let acked = eventually(CATCH_UP, || {
        (pending(&redis, "alerts:out", "routemq-bridge") == Some(0)).then_some(())
    })
    .await;
    assert!(acked.is_some(), "the entry was acknowledged");
    let offset = bridge.log_text().len();
    proxy.blackhole(true);
    let silent_since = Instant::now();

    assert!(
        bridge.wait_for_log_after(offset, "stream read failed", NOTICE),
        "the blocking read on the silent connection was not given up within {NOTICE:?}; log:\n{}",
        bridge.log_text()
    );
    tokio::time::sleep_until((silent_since + 2 * SOCKET_TIMEOUT).into()).await;
    proxy.blackhole(false);

    xadd(&mut conn, "after");
    let after = next_on(&mut listener, "alerts/north", CATCH_UP).await;
    assert_eq!(
        after.as_deref(),
        Some(&b"after"[..]),
        "an entry added after the silence is republished; log:\n{}",
        bridge.log_text()
    );
}
