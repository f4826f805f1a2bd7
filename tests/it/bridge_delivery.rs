//! Delivery guarantees of the daemon (spec §6), end to end against real services: nothing
//! acked that was not written, whatever stops — Redis, the broker, the bridge itself — and
//! order kept per topic.
//!
//! Messages carry their number (`{"n":…}`) and routes write one key per number (`set
//! msg:{json.n}`), an effect that is idempotent under at-least-once redelivery, so the tests
//! can assert that the *set* of written numbers is complete. Where order or exactly-once
//! matters, an `rpush` list is compared with what was published.
//!
//! Every promise holds under MQTT 3.1.1 and MQTT 5 alike (spec §6.1): each test is written
//! once, taking the bridge's protocol, and runs twice (`v3_1_1::…`, `v5::…`); the test
//! publisher speaks 3.1.1 either way, the broker translates.

use std::collections::BTreeSet;
use std::time::Duration;

use redis::Commands;

use crate::bridge::{eventually, Bridge, Client, Protocol, SUBSCRIBED};
use crate::harness::{FaultProxy, Mosquitto, Redis};

/// How long the bridge may take to catch up with a backlog (debug build, shared CPU).
const CATCH_UP: Duration = Duration::from_secs(90);

/// The log line the MQTT source writes when it loses the broker.
const CONNECTION_LOST: &str = "MQTT connection lost";

/// The log line (debug) of a message waiting for Redis.
const RETRYING: &str = "redis unavailable; message waits and retries";

/// A route writing `msg:<n>` for every message on `load/data`, and pushing the payload on
/// `order`.
pub(crate) const NUMBERED_ROUTE: &str = r#"
[[routes]]
name = "numbered"
topic = "load/data"
[[routes.actions]]
op = "set"
key = "msg:{json.n}"
[[routes.actions]]
op = "rpush"
key = "order"
"#;

pub(crate) fn numbered(range: std::ops::Range<u32>) -> Vec<(String, Vec<u8>)> {
    range
        .map(|n| {
            (
                "load/data".to_string(),
                format!(r#"{{"n":{n}}}"#).into_bytes(),
            )
        })
        .collect()
}

/// The message numbers written as `msg:<n>` keys.
pub(crate) fn written_numbers(conn: &mut redis::Connection) -> BTreeSet<u32> {
    let keys: Vec<String> = conn.keys("msg:*").unwrap_or_default();
    keys.iter()
        .filter_map(|k| k.strip_prefix("msg:")?.parse().ok())
        .collect()
}

/// The `order` list as message numbers.
fn pushed_numbers(conn: &mut redis::Connection) -> Vec<u32> {
    let items: Vec<String> = conn.lrange("order", 0, -1).unwrap_or_default();
    items
        .iter()
        .map(|item| {
            let v: serde_json::Value = serde_json::from_str(item).expect("pushed JSON");
            v["n"].as_u64().expect("n") as u32
        })
        .collect()
}

/// Waits until `msg:<n>` exists for every `n` in `0..count`; returns what is written then.
async fn wait_all_written(conn: &mut redis::Connection, count: u32) -> BTreeSet<u32> {
    eventually(CATCH_UP, || {
        (conn.keys::<_, Vec<String>>("msg:*").map_or(0, |k| k.len()) >= count as usize)
            .then_some(())
    })
    .await;
    written_numbers(conn)
}

/// Waits until every message `0..count` is written and asserts exactly those are, with
/// `why` and the bridge's log when not.
async fn assert_all_written(conn: &mut redis::Connection, count: u32, bridge: &Bridge, why: &str) {
    let written = wait_all_written(conn, count).await;
    assert_eq!(
        written,
        (0..count).collect::<BTreeSet<_>>(),
        "{why}; log:\n{}",
        bridge.log_text()
    );
}

/// [`assert_all_written`] on a fresh connection to `redis`, then that the bridge never lost
/// its MQTT connection meanwhile (`why` says what must not cost it).
async fn assert_all_written_without_reconnecting(
    redis: &Redis,
    count: u32,
    bridge: &Bridge,
    why: &str,
) {
    let mut conn = connection(redis);
    assert_all_written(
        &mut conn,
        count,
        bridge,
        &format!("every message is written ({why})"),
    )
    .await;
    assert!(
        !bridge.log_text().contains(CONNECTION_LOST),
        "{why} must not cost the MQTT connection; log:\n{}",
        bridge.log_text()
    );
}

/// [`NUMBERED_ROUTE`] with `[limits] max_inflight = max`.
fn numbered_route_holding(max: usize) -> String {
    format!("[limits]\nmax_inflight = {max}\n{NUMBERED_ROUTE}")
}

fn connection(redis: &Redis) -> redis::Connection {
    redis
        .client()
        .get_connection()
        .expect("test connection to redis")
}

async fn messages_arriving_while_redis_is_down_are_all_written_once_it_is_back(protocol: Protocol) {
    // Redis with an fsync'ed append-only file, so what was written before the crash
    // survives it and the count at the end can be exact.
    let mut redis = Redis::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let broker = Mosquitto::start();
    let bridge =
        Bridge::start(&protocol.config(&redis, &broker, "bridge-redis-down", NUMBERED_ROUTE));
    let mut client = Client::connect(&broker, "redis-down-publisher").await;
    let mut conn = connection(&redis);

    client.publish_all(numbered(0..50)).await;
    let some = eventually(Duration::from_secs(30), || {
        let n = written_numbers(&mut conn).len();
        (n > 0).then_some(n)
    })
    .await;
    assert!(some.is_some(), "nothing written before Redis went down");

    redis.kill();
    let offset = bridge.log_text().len();
    client.publish_all(numbered(50..200)).await;
    assert!(
        bridge.wait_for_log_after(offset, RETRYING, Duration::from_secs(30)),
        "the bridge never noticed Redis was down; log:\n{}",
        bridge.log_text()
    );
    redis.start_again();

    assert_all_written_without_reconnecting(&redis, 200, &bridge, "Redis going down").await;
}

async fn kill_9_of_the_bridge_loses_nothing_at_qos_1(protocol: Protocol) {
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let mut bridge =
        Bridge::start(&protocol.config(&redis, &broker, "bridge-kill-9", NUMBERED_ROUTE));
    let mut client = Client::connect(&broker, "kill-9-publisher").await;
    let mut conn = connection(&redis);

    // The first half streams in while the bridge is killed mid-way…
    client.publish_all(numbered(0..1000)).await;
    let before_kill = eventually(Duration::from_secs(30), || {
        let n = written_numbers(&mut conn).len();
        (n >= 50).then_some(n)
    })
    .await;
    assert!(before_kill.is_some(), "the bridge did not start writing");
    bridge.kill();
    let at_kill = written_numbers(&mut conn).len();
    // …the second half waits in the broker for our persistent session.
    client.publish_all(numbered(1000..2000)).await;
    assert!(
        at_kill < 2000,
        "some messages must still be unwritten at the kill"
    );

    bridge.spawn();
    assert_all_written(
        &mut conn,
        2000,
        &bridge,
        &format!("every message is written after the restart (written at kill: {at_kill})"),
    )
    .await;
}

async fn messages_on_one_topic_are_applied_in_arrival_order(protocol: Protocol) {
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let bridge = Bridge::start(&protocol.config(
        &redis,
        &broker,
        "bridge-order",
        r#"
[[routes]]
name = "ordered"
topic = "load/data"
[[routes.actions]]
op = "set"
key = "latest"
[[routes.actions]]
op = "rpush"
key = "order"

# A second, busier topic proceeding at the same time must not disturb the first.
[[routes]]
name = "other"
topic = "other/data"
[[routes.actions]]
op = "incr"
key = "other"
"#,
    ));
    let mut client = Client::connect(&broker, "order-publisher").await;
    let mut messages = numbered(0..500);
    let interleaved: Vec<_> = (0..500)
        .map(|n| ("other/data".to_string(), format!("{n}").into_bytes()))
        .collect();
    // Interleave the two topics message by message.
    let mut all = Vec::with_capacity(1000);
    for (a, b) in messages.drain(..).zip(interleaved) {
        all.push(a);
        all.push(b);
    }
    client.publish_all(all).await;

    let mut conn = connection(&redis);
    let len = eventually(CATCH_UP, || {
        let len: usize = conn.llen("order").unwrap_or(0);
        (len >= 500).then_some(len)
    })
    .await;
    assert_eq!(len, Some(500), "log:\n{}", bridge.log_text());
    assert_eq!(
        pushed_numbers(&mut conn),
        (0..500).collect::<Vec<_>>(),
        "the list holds every message of the topic, in publish order"
    );
    let latest: String = conn.get("latest").expect("latest");
    assert_eq!(
        latest, r#"{"n":499}"#,
        "the latest key holds the last message"
    );
    let other = eventually(CATCH_UP, || {
        let n: i64 = conn.get::<_, Option<i64>>("other").ok().flatten()?;
        (n >= 500).then_some(n)
    })
    .await;
    assert_eq!(
        other,
        Some(500),
        "the other topic got all its messages once"
    );
}

async fn a_1_mib_message_is_written_without_a_disconnect(protocol: Protocol) {
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let bridge = Bridge::start(
        &protocol
            .config(
                &redis,
                &broker,
                "bridge-big",
                r#"
[limits]
max_payload = "2MiB"

[[routes]]
name = "blobs"
topic = "blobs/{id}"
payload = "bytes"
[[routes.actions]]
op = "set"
key = "blob:{id}"
"#,
            )
            .replace(
                "reconnect_max_delay = \"1s\"",
                "reconnect_max_delay = \"1s\"\nmax_packet_size = \"4MiB\"",
            ),
    );
    let mut client = Client::connect(&broker, "big-publisher").await;
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    client
        .publish_all([
            ("blobs/big".to_string(), big.clone()),
            ("blobs/small".to_string(), b"after".to_vec()),
        ])
        .await;

    let mut conn = connection(&redis);
    let small = eventually(Duration::from_secs(30), || {
        conn.get::<_, Option<Vec<u8>>>("blob:small").ok().flatten()
    })
    .await;
    assert_eq!(
        small.as_deref(),
        Some(&b"after"[..]),
        "the message after the big one flows; log:\n{}",
        bridge.log_text()
    );
    let written: Option<Vec<u8>> = conn.get("blob:big").expect("get blob:big");
    assert!(
        written == Some(big),
        "the 1 MiB payload is written byte for byte"
    );
    assert!(
        !bridge.log_text().contains(CONNECTION_LOST),
        "a big message must not cost the connection; log:\n{}",
        bridge.log_text()
    );
}

async fn the_bridge_reconnects_after_a_broker_restart_with_and_without_its_session(
    protocol: Protocol,
) {
    let redis = Redis::start();
    let mut broker = Mosquitto::start();
    let bridge =
        Bridge::start(&protocol.config(&redis, &broker, "bridge-broker-restart", NUMBERED_ROUTE));
    let mut conn = connection(&redis);
    {
        let mut client = Client::connect(&broker, "restart-publisher-1").await;
        client.publish_all(numbered(0..10)).await;
    }
    assert_eq!(wait_all_written(&mut conn, 10).await.len(), 10);

    // A clean restart: Mosquitto saves and restores our session (subscriptions included).
    let offset = bridge.log_text().len();
    broker.stop();
    broker.start_again();
    assert!(
        bridge.wait_for_log_after(offset, "session_present=true", Duration::from_secs(30)),
        "no reconnect to the kept session after a clean broker restart; log:\n{}",
        bridge.log_text()
    );
    {
        let mut client = Client::connect(&broker, "restart-publisher-2").await;
        client.publish_all(numbered(10..20)).await;
    }
    assert_all_written(
        &mut conn,
        20,
        &bridge,
        "messages after a clean broker restart are written",
    )
    .await;

    // A crash: the broker may come back without our session, and the bridge resubscribes.
    let offset = bridge.log_text().len();
    broker.kill();
    std::fs::remove_file(broker_persistence(&broker)).ok();
    broker.start_again();
    assert!(
        bridge.wait_for_log_after(offset, "session_present=false", Duration::from_secs(30)),
        "no reconnect after the broker crashed; log:\n{}",
        bridge.log_text()
    );
    assert!(
        bridge.wait_for_log_after(offset, SUBSCRIBED, Duration::from_secs(30)),
        "no resubscription after the broker lost the session; log:\n{}",
        bridge.log_text()
    );
    {
        let mut client = Client::connect(&broker, "restart-publisher-3").await;
        client.publish_all(numbered(20..30)).await;
    }
    assert_all_written(
        &mut conn,
        30,
        &bridge,
        "messages after the broker lost the session are written",
    )
    .await;
}

/// Mosquitto's persistence file in the harness's directory for it.
fn broker_persistence(broker: &Mosquitto) -> std::path::PathBuf {
    broker.dir().join("mosquitto.db")
}

async fn sigterm_mid_stream_exits_0_and_acks_only_what_was_written(protocol: Protocol) {
    const TOTAL: u32 = 3000;
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let mut bridge =
        Bridge::start(&protocol.config(&redis, &broker, "bridge-sigterm", NUMBERED_ROUTE));
    let mut client = Client::connect(&broker, "sigterm-publisher").await;
    let mut conn = connection(&redis);

    // A stream in small batches, still flowing when the SIGTERM lands.
    let publisher = tokio::spawn(async move {
        for start in (0..TOTAL).step_by(50) {
            client.publish_all(numbered(start..start + 50)).await;
        }
    });
    let started = eventually(Duration::from_secs(30), || {
        let n: usize = conn.llen("order").unwrap_or(0);
        (n >= 300).then_some(n)
    })
    .await;
    assert!(started.is_some(), "the bridge did not start writing");
    let status = bridge.terminate(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "log:\n{}", bridge.log_text());
    let at_stop: usize = conn.llen("order").unwrap_or(0);
    tokio::time::timeout(Duration::from_secs(60), publisher)
        .await
        .expect("publisher finishes")
        .expect("publisher task");

    bridge.spawn();
    eventually(CATCH_UP, || {
        let n: usize = conn.llen("order").unwrap_or(0);
        (n >= TOTAL as usize).then_some(n)
    })
    .await;
    // A message acked but not written would be missing; one written but not acked would be
    // pushed twice (redelivered after the restart).
    assert_eq!(
        pushed_numbers(&mut conn),
        (0..TOTAL).collect::<Vec<_>>(),
        "every message written exactly once, in order (written at stop: {at_stop}); log:\n{}",
        bridge.log_text()
    );
}

async fn sigterm_finishes_the_messages_in_flight_before_exiting(protocol: Protocol) {
    let mut redis = Redis::start();
    let broker = Mosquitto::start();
    let mut bridge =
        Bridge::start(&protocol.config(&redis, &broker, "bridge-drain", NUMBERED_ROUTE));
    let mut client = Client::connect(&broker, "drain-publisher").await;

    // Messages in flight: received, waiting for a stalled Redis.
    redis.pause();
    let offset = bridge.log_text().len();
    client.publish_all(numbered(0..100)).await;
    assert!(
        bridge.wait_for_log_after(offset, RETRYING, Duration::from_secs(30)),
        "no message waiting for Redis; log:\n{}",
        bridge.log_text()
    );
    let pid = bridge.pid().expect("running");
    crate::harness::signal(pid, libc::SIGTERM);
    assert!(
        bridge.wait_for_log_after(offset, "shutting down", Duration::from_secs(10)),
        "log:\n{}",
        bridge.log_text()
    );
    // Redis is back well within shutdown_timeout (10 s): the drain finishes and acks them.
    redis.resume();
    let status = bridge.terminate(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "log:\n{}", bridge.log_text());
    let mut conn = connection(&redis);
    let at_exit = written_numbers(&mut conn);
    assert!(
        at_exit.contains(&0),
        "the message in flight at SIGTERM was finished before exit; log:\n{}",
        bridge.log_text()
    );

    bridge.spawn();
    assert_all_written(
        &mut conn,
        100,
        &bridge,
        &format!(
            "the rest is redelivered after the restart (written at exit: {})",
            at_exit.len()
        ),
    )
    .await;
}

async fn what_cannot_finish_within_shutdown_timeout_stays_unacked_for_redelivery(
    protocol: Protocol,
) {
    let mut redis = Redis::start();
    let broker = Mosquitto::start();
    let mut bridge = Bridge::start(&protocol.config(
        &redis,
        &broker,
        "bridge-drain-timeout",
        &format!("[limits]\nshutdown_timeout = \"1s\"\n{NUMBERED_ROUTE}"),
    ));
    let mut client = Client::connect(&broker, "drain-timeout-publisher").await;

    redis.pause();
    let offset = bridge.log_text().len();
    client.publish_all(numbered(0..100)).await;
    assert!(
        bridge.wait_for_log_after(offset, RETRYING, Duration::from_secs(30)),
        "no message waiting for Redis; log:\n{}",
        bridge.log_text()
    );
    // Redis stays stalled: the drain gives up after shutdown_timeout, and exits cleanly.
    let status = bridge.terminate(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "log:\n{}", bridge.log_text());
    assert!(
        bridge.log_text().contains("shutdown_timeout reached"),
        "log:\n{}",
        bridge.log_text()
    );
    redis.resume();

    bridge.spawn();
    let mut conn = connection(&redis);
    assert_all_written(
        &mut conn,
        100,
        &bridge,
        "the unfinished messages are redelivered and written",
    )
    .await;
}

/// The bridge's `inflight_messages` gauge.
async fn inflight(bridge: &Bridge) -> f64 {
    let (_, metrics) = crate::ops::get(crate::ops::http_addr(bridge), "/metrics").await;
    crate::ops::sample(&metrics, "routemq_bridge_inflight_messages")
        .unwrap_or_else(|| panic!("no inflight_messages in:\n{metrics}"))
}

/// Waits (bounded) until the bridge holds at least `n` messages; how many it holds then.
async fn holding_at_least(bridge: &Bridge, n: f64) -> f64 {
    let mut held = 0.0;
    for _ in 0..600 {
        held = inflight(bridge).await;
        if held >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        held >= n,
        "the bridge never held {n} messages; log:\n{}",
        bridge.log_text()
    );
    held
}

async fn a_backlog_beyond_max_inflight_waits_in_the_broker_not_in_the_bridge(protocol: Protocol) {
    let mut redis = Redis::start();
    let broker = Mosquitto::start();
    let bridge = Bridge::start(&protocol.config(
        &redis,
        &broker,
        "bridge-held-back",
        &numbered_route_holding(5),
    ));
    let mut client = Client::connect(&broker, "held-back-publisher").await;

    redis.kill();
    client.publish_all(numbered(0..300)).await;
    // The broker's window (20) is more than max_inflight: the bridge takes 5 (plus at most
    // the rest of one read batch, 9 packets) and leaves the rest unread until some are acked.
    const BOUND: f64 = 5.0 + 9.0;
    let held = holding_at_least(&bridge, 5.0).await;
    // Time is the condition: two keep-alive periods (5 s), during which pings go out and
    // must neither cost the connection nor read more.
    let mut most = held;
    for _ in 0..44 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        most = most.max(inflight(&bridge).await);
    }
    assert!(
        most <= BOUND,
        "the bridge held {most} messages, more than max_inflight = 5 plus one read batch"
    );

    redis.start_again();
    assert_all_written_without_reconnecting(&redis, 300, &bridge, "holding back").await;
}

async fn a_broker_gone_silent_while_held_back_is_noticed_and_nothing_is_lost(protocol: Protocol) {
    let mut redis = Redis::start();
    let broker = Mosquitto::start();
    // The bridge reaches the broker through a proxy that can go silent: no FIN, no RST, no
    // answer — a broker that hangs, a network that stops carrying data.
    let proxy = FaultProxy::start(broker.port());
    let bridge = Bridge::start(
        &protocol
            .config(
                &redis,
                &broker,
                "bridge-silent-broker",
                &numbered_route_holding(5),
            )
            .replace(&broker.url(), &format!("mqtt://127.0.0.1:{}", proxy.port()))
            .replace("keep_alive = \"5s\"", "keep_alive = \"2s\""),
    );
    let mut client = Client::connect(&broker, "silent-broker-publisher").await;
    redis.kill();
    client.publish_all(numbered(0..100)).await;
    holding_at_least(&bridge, 5.0).await;

    let offset = bridge.log_text().len();
    proxy.blackhole(true);
    let silent_since = std::time::Instant::now();
    // Spec §6: noticed within about 1.5 × keep_alive (3 s) while reading is paused; the
    // bound leaves room for a loaded machine. Before, only TCP's retransmission timeout
    // (~15 min) would have noticed.
    assert!(
        bridge.wait_for_log_after(offset, CONNECTION_LOST, Duration::from_secs(8)),
        "a silent broker was not noticed within 8 s while held back; log:\n{}",
        bridge.log_text()
    );
    let noticed = silent_since.elapsed();
    proxy.blackhole(false);
    redis.start_again();
    let mut conn = connection(&redis);
    assert_all_written(
        &mut conn,
        100,
        &bridge,
        &format!("after a silent broker (noticed in {noticed:?})"),
    )
    .await;
}

async fn the_inflight_bound_holds_across_broker_restarts(protocol: Protocol) {
    let mut redis = Redis::start();
    let mut broker = Mosquitto::start();
    let bridge = Bridge::start(&protocol.config(
        &redis,
        &broker,
        "bridge-held-across-restarts",
        &numbered_route_holding(10),
    ));
    let mut client = Client::connect(&broker, "held-across-restarts-publisher").await;
    redis.kill();
    client.publish_all(numbered(0..300)).await;
    drop(client);
    // max_inflight plus at most the rest of one read batch (see the test above).
    const BOUND: f64 = 10.0 + 9.0;
    let mut most = holding_at_least(&bridge, 10.0).await;
    const CONNECTED: &str = "connected to the MQTT broker";
    for restart in 1..=3 {
        let offset = bridge.log_text().len();
        broker.stop();
        broker.start_again();
        assert!(
            bridge.wait_for_log_after(offset, CONNECTED, Duration::from_secs(20)),
            "reconnected after restart {restart}; log:\n{}",
            bridge.log_text()
        );
        // Time is the condition: the broker redelivers what the bridge still holds from
        // the old connection; none of it may be taken on top.
        for _ in 0..12 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            most = most.max(inflight(&bridge).await);
        }
    }
    assert!(
        most <= BOUND,
        "the bridge held {most} messages across reconnects, more than max_inflight = 10 plus \
         one read batch"
    );
    redis.start_again();
    let mut conn = connection(&redis);
    assert_all_written(&mut conn, 300, &bridge, "after the restarts").await;
}

async fn a_restart_into_a_backlog_with_redis_down_becomes_ready_while_held_back(
    protocol: Protocol,
) {
    let mut redis = Redis::start();
    let broker = Mosquitto::start();
    let mut bridge = Bridge::start(&protocol.config(
        &redis,
        &broker,
        "bridge-ready-held-back",
        &numbered_route_holding(5),
    ));
    assert!(bridge.terminate(Duration::from_secs(20)).success());
    // A backlog in the stored session, and no Redis when the bridge comes back: the
    // session's messages arrive before the SUBACK of the bridge's start-up SUBSCRIBE, and
    // reading stops at max_inflight with the SUBACK still unread.
    let mut client = Client::connect(&broker, "ready-held-back-publisher").await;
    client.publish_all(numbered(0..100)).await;
    redis.kill();
    bridge.spawn_unready();
    assert!(
        bridge.wait_for_log(
            "ready: the SUBACK waits behind messages held back",
            Duration::from_secs(30)
        ),
        "the bridge stayed unready; log:\n{}",
        bridge.log_text()
    );

    redis.start_again();
    let mut conn = connection(&redis);
    assert_all_written(
        &mut conn,
        100,
        &bridge,
        "the backlog is written once Redis is back",
    )
    .await;
}

async fn a_redis_stalled_longer_than_keep_alive_does_not_cost_the_mqtt_connection(
    protocol: Protocol,
) {
    let mut redis = Redis::start();
    let broker = Mosquitto::start();
    // max_inflight below the broker's window (20): the bridge is also held back from reading
    // while Redis stalls, and must still keep the connection alive.
    let bridge = Bridge::start(&protocol.config(
        &redis,
        &broker,
        "bridge-slow-redis",
        &numbered_route_holding(10),
    ));
    let mut client = Client::connect(&broker, "slow-redis-publisher").await;

    redis.pause();
    let offset = bridge.log_text().len();
    client.publish_all(numbered(0..100)).await;
    assert!(
        bridge.wait_for_log_after(offset, RETRYING, Duration::from_secs(30)),
        "the bridge never found Redis stalled; log:\n{}",
        bridge.log_text()
    );
    // Time itself is the condition here: stay stalled for two keep-alive periods (5 s each),
    // during which the broker would drop a client that stopped pinging.
    tokio::time::sleep(Duration::from_secs(11)).await;
    redis.resume();

    assert_all_written_without_reconnecting(&redis, 100, &bridge, "a Redis stall").await;
}

async fn a_message_still_processing_holds_back_the_acks_of_later_ones(protocol: Protocol) {
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let mut conn = connection(&redis);
    // Another bridge's claim on the gate's dedup key: the gated message waits for it.
    let _: () = redis::cmd("SET")
        .arg("dedup:gate")
        .arg("lease:another-bridge:0")
        .arg("PX")
        .arg(120_000)
        .query(&mut conn)
        .expect("plant a foreign lease");
    let mut bridge = Bridge::start(&protocol.config(
        &redis,
        &broker,
        "bridge-ack-order",
        &format!(
            r#"
[[routes]]
name = "gated"
topic = "gate/{{id}}"
  [routes.dedup]
  key = "dedup:{{id}}"
  [[routes.actions]]
  op = "set"
  key = "gated:{{id}}"
{NUMBERED_ROUTE}"#
        ),
    ));
    let mut client = Client::connect(&broker, "ack-order-publisher").await;
    let mut batch = vec![("gate/gate".to_string(), b"{}".to_vec())];
    batch.extend(numbered(0..10));
    client.publish_all(batch).await;

    // The later messages, on another topic, are written while the first one waits…
    let len = eventually(Duration::from_secs(30), || {
        let n: usize = conn.llen("order").unwrap_or(0);
        (n >= 10).then_some(n)
    })
    .await;
    assert_eq!(len, Some(10), "log:\n{}", bridge.log_text());
    let gated: Option<String> = conn.get("gated:gate").expect("get");
    assert_eq!(gated, None, "the gated message is still waiting");
    // …but not acked: acks go out in arrival order. A crash now makes the broker redeliver
    // all of them.
    bridge.kill();
    let _: () = conn.del("dedup:gate").expect("lift the foreign lease");
    bridge.spawn();

    let gated = eventually(Duration::from_secs(30), || {
        conn.get::<_, Option<String>>("gated:gate").ok().flatten()
    })
    .await;
    assert_eq!(gated.as_deref(), Some("{}"), "log:\n{}", bridge.log_text());
    eventually(Duration::from_secs(30), || {
        let n: usize = conn.llen("order").unwrap_or(0);
        (n >= 20).then_some(n)
    })
    .await;
    let expected: Vec<u32> = (0..10).chain(0..10).collect();
    assert_eq!(
        pushed_numbers(&mut conn),
        expected,
        "written but unacked behind the gated message, so redelivered; log:\n{}",
        bridge.log_text()
    );
}

async fn a_message_over_max_packet_size_is_dead_lettered_instead_of_wedging_the_session(
    protocol: Protocol,
) {
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let bridge = Bridge::start(&protocol.config(&redis, &broker, "bridge-too-big", NUMBERED_ROUTE));
    let mut client = Client::connect(&broker, "too-big-publisher").await;
    // Default max_packet_size is 1 MiB: the broker (no limit of its own) sends it anyway.
    client
        .publish("load/data", vec![b' '; 2 * 1024 * 1024])
        .await;
    client.publish_all(numbered(0..5)).await;

    let mut conn = connection(&redis);
    assert_all_written(
        &mut conn,
        5,
        &bridge,
        "the messages behind the oversized one flow",
    )
    .await;
    let records: Vec<String> = conn.lrange("dead_letter", 0, -1).expect("dead letter");
    assert_eq!(records.len(), 1, "one dead letter: {records:?}");
    let record: serde_json::Value = serde_json::from_str(&records[0]).expect("JSON record");
    assert_eq!(record["reason"], "payload_too_large", "{record}");
    assert_eq!(record["topic"], "load/data", "{record}");
}

async fn messages_wait_for_a_redis_that_is_down_at_start_up(protocol: Protocol) {
    let mut redis = Redis::start();
    redis.kill();
    let broker = Mosquitto::start();
    let bridge =
        Bridge::start(&protocol.config(&redis, &broker, "bridge-redis-late", NUMBERED_ROUTE));
    let mut client = Client::connect(&broker, "redis-late-publisher").await;
    let offset = bridge.log_text().len();
    client.publish_all(numbered(0..20)).await;
    assert!(
        bridge.wait_for_log_after(offset, RETRYING, Duration::from_secs(30)),
        "log:\n{}",
        bridge.log_text()
    );
    redis.start_again();
    let mut conn = connection(&redis);
    assert_all_written(
        &mut conn,
        20,
        &bridge,
        "every message is written once Redis is up",
    )
    .await;
}

async fn sigterm_while_the_broker_is_gone_still_exits_0(protocol: Protocol) {
    let redis = Redis::start();
    let mut broker = Mosquitto::start();
    let mut bridge =
        Bridge::start(&protocol.config(&redis, &broker, "bridge-no-broker", NUMBERED_ROUTE));
    let offset = bridge.log_text().len();
    broker.kill();
    assert!(
        bridge.wait_for_log_after(offset, CONNECTION_LOST, Duration::from_secs(30)),
        "log:\n{}",
        bridge.log_text()
    );
    let status = bridge.terminate(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "log:\n{}", bridge.log_text());
}

crate::bridge::under_both_protocols!(
    messages_arriving_while_redis_is_down_are_all_written_once_it_is_back,
    kill_9_of_the_bridge_loses_nothing_at_qos_1,
    messages_on_one_topic_are_applied_in_arrival_order,
    a_1_mib_message_is_written_without_a_disconnect,
    the_bridge_reconnects_after_a_broker_restart_with_and_without_its_session,
    sigterm_mid_stream_exits_0_and_acks_only_what_was_written,
    sigterm_finishes_the_messages_in_flight_before_exiting,
    what_cannot_finish_within_shutdown_timeout_stays_unacked_for_redelivery,
    a_backlog_beyond_max_inflight_waits_in_the_broker_not_in_the_bridge,
    a_broker_gone_silent_while_held_back_is_noticed_and_nothing_is_lost,
    the_inflight_bound_holds_across_broker_restarts,
    a_restart_into_a_backlog_with_redis_down_becomes_ready_while_held_back,
    a_redis_stalled_longer_than_keep_alive_does_not_cost_the_mqtt_connection,
    a_message_still_processing_holds_back_the_acks_of_later_ones,
    a_message_over_max_packet_size_is_dead_lettered_instead_of_wedging_the_session,
    messages_wait_for_a_redis_that_is_down_at_start_up,
    sigterm_while_the_broker_is_gone_still_exits_0,
);
