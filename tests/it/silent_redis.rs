//! A silently dead Redis (spec §6): no FIN, no RST — a cable pulled, a NAT that forgot the
//! flow, a frozen process — is noticed within about 2 × `socket_timeout` and the connection
//! is rebuilt, with nothing lost meanwhile. The silence is made by a [`FaultProxy`] between
//! the daemon and Redis that keeps the TCP connections open but forwards nothing.
//!
//! (The pub/sub subscriber's side of the same promise is in `republish.rs`, where its
//! subscription can be observed.)

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use redis::Commands;

use crate::bridge::{config, eventually, Bridge, Client};
use crate::harness::{FaultProxy, Mosquitto, Redis};
use crate::ops::{get, http_addr, sample};

/// `socket_timeout` of these tests: short, so the bound is short.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(1);

/// How long after the silence starts the bridge may take to notice it: the promised 2 ×
/// `socket_timeout`, plus slack for a shared, loaded CPU.
const NOTICE: Duration = Duration::from_secs(2 * SOCKET_TIMEOUT.as_secs() + 2);

/// How long the bridge may take to catch up once Redis answers again (debug build).
const CATCH_UP: Duration = Duration::from_secs(60);

/// A route writing `msg:<n>` for every message on `load/data`.
const NUMBERED_ROUTE: &str = r#"
[[routes]]
name = "numbered"
topic = "load/data"
[[routes.actions]]
op = "set"
key = "msg:{json.n}"
"#;

fn numbered(range: std::ops::Range<u32>) -> Vec<(String, Vec<u8>)> {
    range
        .map(|n| {
            (
                "load/data".to_string(),
                format!(r#"{{"n":{n}}}"#).into_bytes(),
            )
        })
        .collect()
}

fn written_numbers(conn: &mut redis::Connection) -> BTreeSet<u32> {
    let keys: Vec<String> = conn.keys("msg:*").unwrap_or_default();
    keys.iter()
        .filter_map(|k| k.strip_prefix("msg:")?.parse().ok())
        .collect()
}

/// The bridge's config with Redis reached through `proxy` and `socket_timeout` shortened.
fn through(proxy: &FaultProxy, redis: &Redis, broker: &Mosquitto, client_id: &str) -> String {
    let text = config(redis, broker, client_id, NUMBERED_ROUTE);
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
    let bridge = Bridge::start(&through(&proxy, &redis, &broker, "bridge-silent-redis"));
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
