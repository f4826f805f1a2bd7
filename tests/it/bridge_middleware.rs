//! Middleware end to end (spec §5.2): sessions (required, JSON and hash formats, the cache,
//! touch), rate limits (each strategy, the reply, the fallbacks while Redis is down) and
//! dedup, through the real daemon.

use std::time::{Duration, Instant};

use redis::Commands;
use routemq_bridge::middleware::dedup::Marks;
use serde_json::Value;

use crate::bridge::{config, eventually, Bridge, Client};
use crate::bridge_actions::{subscribed, witness, Rig, WAIT};
use crate::harness::{FaultProxy, Mosquitto, Redis};
use crate::ops::{get, sample};

/// A route on `d/{id}` with `middleware` (TOML lines of the route) that counts each message
/// it lets through in `out:{id}` and remembers the last payload in `last:{id}`; then the
/// witness.
fn counted(middleware: &str) -> String {
    format!(
        r#"
[[routes]]
name = "tested"
topic = "d/{{id}}"
{middleware}
[[routes.actions]]
op = "incr"
key = "out:{{id}}"
[[routes.actions]]
op = "set"
key = "last:{{id}}"
{witness}"#,
        witness = witness("d/{id}")
    )
}

fn count(rig: &mut Rig, key: &str) -> i64 {
    rig.conn
        .get::<_, Option<i64>>(key)
        .expect("GET")
        .unwrap_or(0)
}

// ---- session --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_required_session_that_is_missing_makes_the_message_unauthorized() {
    let mut rig = Rig::start(&counted(
        "session = { key = \"session:{id}\", required = true }",
    ))
    .await;
    rig.publish("d/a", "{}").await;
    rig.settle(1).await;
    assert!(
        !rig.exists("out:a"),
        "nothing is written for an unauthorized message"
    );
    assert!(
        rig.dead_letters().is_empty(),
        "unauthorized is not dead-lettered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_required_session_that_exists_lets_the_message_through_with_its_fields() {
    let mut rig = Rig::start_with(
        r#"
[[routes]]
name = "tested"
topic = "d/{id}"
session = { key = "session:{id}", required = true }
[[routes.actions]]
op = "set"
key = "out:{id}"
value = "{session.user}"
"#,
        |c| {
            let () = c.set("session:a", r#"{"user":"ann"}"#).expect("SET");
        },
    )
    .await;
    rig.publish("d/a", "{}").await;
    assert_eq!(rig.text("out:a").await, "ann");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_session_as_routemq_writes_it_is_read() {
    // Python's json.dumps: spaces after separators, non-ASCII as \u escapes.
    let mut rig = Rig::start_with(
        r#"
[[routes]]
name = "tested"
topic = "d/{id}"
session = { key = "session:{id}", required = true }
[[routes.actions]]
op = "set"
key = "out:{id}"
value = "{session.name}|{session.user_id}|{session.meta}"
"#,
        |c| {
            let () = c
                .set(
                    "session:a",
                    r#"{"name": "Ren\u00e9e", "user_id": 42, "meta": {"k": [1, 2]}}"#,
                )
                .expect("SET");
        },
    )
    .await;
    rig.publish("d/a", "{}").await;
    assert_eq!(rig.text("out:a").await, r#"Renée|42|{"k":[1,2]}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hash_session_is_read_with_format_hash() {
    let mut rig = Rig::start_with(
        r#"
[[routes]]
name = "tested"
topic = "d/{id}"
session = { key = "session:{id}", required = true, format = "hash" }
[[routes.actions]]
op = "set"
key = "out:{id}"
value = "{session.user}/{session.role}"
"#,
        |c| {
            let () = c
                .hset_multiple("session:a", &[("user", "ann"), ("role", "admin")])
                .expect("HSET");
        },
    )
    .await;
    rig.publish("d/a", "{}").await;
    assert_eq!(rig.text("out:a").await, "ann/admin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_created_after_a_miss_is_seen_only_after_cache_ttl() {
    let cache_ttl = Duration::from_secs(2);
    let mut rig = Rig::start(&counted(
        "session = { key = \"session:{id}\", required = true, cache_ttl = \"2s\" }",
    ))
    .await;
    let started = Instant::now();
    rig.publish("d/a", "{}").await;
    rig.settle(1).await;
    assert!(!rig.exists("out:a"));
    let () = rig.conn.set("session:a", r#"{"u":1}"#).expect("SET");
    // The miss is cached: a message right away is still unauthorized.
    rig.publish("d/a", "{}").await;
    rig.settle(2).await;
    assert!(
        !rig.exists("out:a") || started.elapsed() >= cache_ttl,
        "the negative cache entry was ignored"
    );
    // Keep sending until one gets through: that happens only once the miss expired.
    let mut sent = 2;
    let deadline = Instant::now() + WAIT;
    while !rig.exists("out:a") {
        assert!(Instant::now() < deadline, "the new session was never seen");
        tokio::time::sleep(Duration::from_millis(100)).await;
        rig.publish("d/a", "{}").await;
        sent += 1;
        rig.settle(sent).await;
    }
    assert!(
        started.elapsed() >= cache_ttl,
        "seen after {:?}, before cache_ttl",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn touch_slides_the_session_expiry_at_most_once_per_cache_ttl() {
    let mut rig = Rig::start_with(
        &counted(
            "session = { key = \"session:{id}\", required = true, touch = \"1h\", cache_ttl = \"1h\" }",
        ),
        |c| {
            let () = redis::cmd("SET")
                .arg("session:a")
                .arg(r#"{"u":1}"#)
                .arg("PX")
                .arg(10_000)
                .query(c)
                .expect("SET");
        },
    )
    .await;
    rig.publish("d/a", "{}").await;
    rig.settle(1).await;
    let pttl: i64 = rig.conn.pttl("session:a").expect("PTTL");
    assert!(pttl > 3_500_000, "touched to 1h: PTTL {pttl}");
    // Within cache_ttl the session comes from the cache: no second touch.
    let _: bool = rig.conn.pexpire("session:a", 10_000).expect("PEXPIRE");
    rig.publish("d/a", "{}").await;
    rig.settle(2).await;
    assert_eq!(count(&mut rig, "out:a"), 2);
    let pttl: i64 = rig.conn.pttl("session:a").expect("PTTL");
    assert!(
        pttl <= 10_000,
        "touched again within cache_ttl: PTTL {pttl}"
    );
}

// ---- rate limit -----------------------------------------------------------------------

async fn admits_exactly_max(strategy: &str, window: &str) {
    let mut rig = Rig::start(&counted(&format!(
        "rate_limit = {{ key = \"rl:{{id}}\", strategy = \"{strategy}\", max = 3, window = \"{window}\" }}"
    )))
    .await;
    rig.client
        .publish_all((0..7).map(|i| ("d/a".to_string(), i.to_string().into_bytes())))
        .await;
    rig.settle(7).await;
    assert_eq!(count(&mut rig, "out:a"), 3, "exactly max of 7 are written");
    assert_eq!(
        rig.text("last:a").await,
        "2",
        "the first three are the ones written"
    );
    assert!(
        rig.dead_letters().is_empty(),
        "rate_limited is not dead-lettered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sliding_window_admits_exactly_max_per_window() {
    admits_exactly_max("sliding_window", "1h").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_window_admits_exactly_max_per_window() {
    // A day-long window: the test cannot straddle a window boundary except at midnight UTC.
    admits_exactly_max("fixed_window", "24h").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_bucket_admits_exactly_its_burst() {
    admits_exactly_max("token_bucket", "1h").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_bucket_admits_a_burst_beyond_max() {
    let mut rig = Rig::start(&counted(
        "rate_limit = { key = \"rl:{id}\", strategy = \"token_bucket\", max = 1, window = \"1h\", burst = 4 }",
    ))
    .await;
    rig.client
        .publish_all((0..7).map(|i| ("d/a".to_string(), i.to_string().into_bytes())))
        .await;
    rig.settle(7).await;
    assert_eq!(count(&mut rig, "out:a"), 4, "a burst of 4 from an idle key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_window_counts_in_routemqs_key() {
    let mut rig = Rig::start(&counted(
        "rate_limit = { key = \"rl:{id}\", strategy = \"fixed_window\", max = 3, window = \"24h\" }",
    ))
    .await;
    rig.publish("d/a", "1").await;
    rig.settle(1).await;
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let key = format!("rl:a:{}", now_s / 86_400);
    assert_eq!(count(&mut rig, &key), 1, "INCR on <key>:<unix_s / window>");
    let ttl: i64 = rig.conn.ttl(&key).expect("TTL");
    assert!(
        (86_000..=86_401).contains(&ttl),
        "expiry window + 1 s: TTL {ttl}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_limit_with_on_exceed_reply_publishes_the_json_error() {
    let mut rig = Rig::start(&counted(
        r#"rate_limit = { key = "rl:{id}", max = 1, window = "1h", on_exceed = "reply", reply_topic = "replies/{id}" }"#,
    ))
    .await;
    let mut listener = Client::connect(&rig.broker, "listener").await;
    listener.subscribe("replies/#").await;
    subscribed(&mut rig, &mut listener, "replies/probe").await;
    rig.publish("d/a", "1").await;
    rig.publish("d/a", "2").await;
    let reply = listener.next_message(WAIT).await.expect("a reply");
    assert_eq!(reply.topic, "replies/a");
    assert_eq!(
        reply.qos,
        rumqttc::QoS::AtMostOnce,
        "reply_qos defaults to 0"
    );
    let body: Value = serde_json::from_slice(&reply.payload).expect("JSON reply");
    assert_eq!(body["error"], "rate_limit_exceeded");
    assert_eq!(body["limit"], 1);
    assert_eq!(body["window_s"].as_f64(), Some(3600.0));
    let retry = body["retry_after_ms"]
        .as_u64()
        .expect("integer retry_after_ms");
    assert!((1..=3_600_000).contains(&retry), "retry_after_ms {retry}");
    assert_eq!(
        body.as_object().map(|o| o.len()),
        Some(4),
        "exactly the four fields: {body}"
    );
    assert_eq!(count(&mut rig, "out:a"), 1);
}

/// A forward-only route limited to 2 per hour with `fallback`, Redis stopped, 5 messages:
/// how many were forwarded. A second forward-only route (after it, so later for each
/// message) tells when all 5 went through.
async fn forwards_while_redis_is_down(fallback: &str) -> usize {
    let routes = format!(
        r#"
[[routes]]
name = "limited"
topic = "d/{{id}}"
rate_limit = {{ key = "rl:{{id}}", max = 2, window = "1h", fallback = "{fallback}" }}
[[routes.actions]]
op = "mqtt_publish"
topic = "out/{{id}}"

[[routes]]
name = "seen"
topic = "d/{{id}}"
payload = "bytes"
[[routes.actions]]
op = "mqtt_publish"
topic = "seen/{{id}}"
"#
    );
    let mut rig = Rig::start(&routes).await;
    let mut listener = Client::connect(&rig.broker, "listener").await;
    listener.subscribe("out/#").await;
    listener.subscribe("seen/#").await;
    subscribed(&mut rig, &mut listener, "out/probe").await;
    subscribed(&mut rig, &mut listener, "seen/probe").await;
    rig.redis.stop();
    let total = 5;
    rig.client
        .publish_all((0..total).map(|i| ("d/a".to_string(), format!("{{\"n\":{i}}}").into_bytes())))
        .await;
    let mut seen = 0;
    let mut forwarded = 0;
    while seen < total {
        let message = listener.next_message(WAIT).await.unwrap_or_else(|| {
            panic!(
                "only {seen} of {total} messages went through; log:\n{}",
                rig.bridge.log_text()
            )
        });
        match message.topic.as_str() {
            "seen/a" => seen += 1,
            "out/a" => forwarded += 1,
            // A late probe of `subscribed`.
            t if t.ends_with("/probe") => {}
            other => panic!("unexpected topic {other}"),
        }
    }
    forwarded
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_fallback_local_forwards_up_to_the_limit() {
    assert_eq!(forwards_while_redis_is_down("local").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_fallback_allow_forwards_everything() {
    assert_eq!(forwards_while_redis_is_down("allow").await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_fallback_deny_forwards_nothing() {
    assert_eq!(forwards_while_redis_is_down("deny").await, 0);
}

// ---- dedup ----------------------------------------------------------------------------

/// Waits for `key` to hold a done mark of the bridge under test (`done:<client_id>:<nonce>`,
/// so a retry can tell its own write from another's).
pub async fn assert_done(rig: &mut Rig, key: &str) {
    let mark = rig.text(key).await;
    assert!(
        mark.starts_with("done:bridge-under-test:"),
        "{key} holds {mark:?}, not our done mark"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_dedup_key_twice_is_a_duplicate_written_once() {
    let mut rig = Rig::start(&counted(
        "dedup = { key = \"dedup:{id}:{json.seq}\", ttl = \"10m\" }",
    ))
    .await;
    rig.publish("d/a", r#"{"seq":1}"#).await;
    rig.publish("d/a", r#"{"seq":1}"#).await;
    rig.publish("d/a", r#"{"seq":2}"#).await;
    rig.settle(3).await;
    assert_eq!(count(&mut rig, "out:a"), 2, "seq 1 once, seq 2 once");
    assert_done(&mut rig, "dedup:a:1").await;
    let pttl: i64 = rig.conn.pttl("dedup:a:1").expect("PTTL");
    assert!(
        (500_000..=600_000).contains(&pttl),
        "done kept for ttl: {pttl}"
    );
    assert!(
        rig.dead_letters().is_empty(),
        "duplicate is not dead-lettered"
    );
}

// With both a rate limit and dedup, the check and the claim share one round trip; these
// pin down what that must not change.

const LIMIT_AND_DEDUP: &str =
    "rate_limit = { key = \"rl:{id}\", strategy = \"fixed_window\", max = 2, window = \"24h\" }\n\
     dedup = { key = \"dedup:{id}:{json.seq}\", lease = \"30s\" }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_rate_limit_and_dedup_a_duplicate_is_written_once() {
    let mut rig = Rig::start(&counted(LIMIT_AND_DEDUP)).await;
    rig.publish("d/a", r#"{"seq":1}"#).await;
    rig.publish("d/a", r#"{"seq":1}"#).await;
    rig.settle(2).await;
    assert_eq!(count(&mut rig, "out:a"), 1, "seq 1 written once");
    assert_done(&mut rig, "dedup:a:1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_refused_by_the_rate_limit_leaves_no_dedup_claim_behind() {
    let mut rig = Rig::start(&counted(LIMIT_AND_DEDUP)).await;
    for seq in 1..=3 {
        rig.publish("d/a", format!(r#"{{"seq":{seq}}}"#)).await;
    }
    rig.settle(3).await;
    assert_eq!(count(&mut rig, "out:a"), 2, "max = 2 of 3 written");
    assert_done(&mut rig, "dedup:a:2").await;
    assert!(
        !rig.exists("dedup:a:3"),
        "the limited message's claim is given back, so a redelivery is not held up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_rate_limit_and_dedup_messages_still_flow_after_redis_forgets_its_scripts() {
    let mut rig = Rig::start(&counted(LIMIT_AND_DEDUP)).await;
    rig.publish("d/a", r#"{"seq":1}"#).await;
    rig.settle(1).await;
    // As after a Redis restart: the next check in the shared round trip gets NOSCRIPT.
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query(&mut rig.conn)
        .expect("SCRIPT FLUSH");
    rig.publish("d/a", r#"{"seq":2}"#).await;
    rig.settle(2).await;
    assert_eq!(count(&mut rig, "out:a"), 2, "seq 2 written after the flush");
    assert_done(&mut rig, "dedup:a:2").await;
    assert!(rig.dead_letters().is_empty(), "nothing failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedup_key_leased_by_another_is_claimed_once_the_lease_expires() {
    let mut rig = Rig::start_with(
        &counted("dedup = { key = \"dedup:{id}:{json.seq}\", lease = \"30s\" }"),
        |c| {
            let () = redis::cmd("SET")
                .arg("dedup:a:1")
                .arg("lease:other-bridge:abc")
                .arg("PX")
                .arg(1500)
                .query(c)
                .expect("SET");
        },
    )
    .await;
    rig.publish("d/a", r#"{"seq":1}"#).await;
    rig.settle(1).await;
    assert_eq!(
        count(&mut rig, "out:a"),
        1,
        "processed after the lease lapsed"
    );
    assert_done(&mut rig, "dedup:a:1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedup_key_leased_by_another_that_becomes_done_is_a_duplicate() {
    let mut rig = Rig::start_with(
        &counted("dedup = { key = \"dedup:{id}:{json.seq}\", lease = \"30s\" }"),
        |c| {
            let () = redis::cmd("SET")
                .arg("dedup:a:1")
                .arg("lease:other-bridge:abc")
                .arg("PX")
                .arg(60_000)
                .query(c)
                .expect("SET");
        },
    )
    .await;
    rig.publish("d/a", r#"{"seq":1}"#).await;
    // Whether the bridge already waits on the other's lease or meets the key only now…
    let () = redis::cmd("SET")
        .arg("dedup:a:1")
        .arg("done")
        .arg("PX")
        .arg(60_000)
        .query(&mut rig.conn)
        .expect("SET done");
    // …and once the other finished, the message is a duplicate.
    rig.settle(1).await;
    assert_eq!(count(&mut rig, "out:a"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_constraint_is_enforced_where_the_field_lands_in_a_key() {
    let mut rig = Rig::start(&counted(
        "params.\"json.seq\" = \"^[0-9]+$\"\ndedup = { key = \"dedup:{json.seq}\" }",
    ))
    .await;
    rig.publish("d/a", r#"{"seq":"x1"}"#).await;
    rig.publish("d/a", r#"{"seq":7}"#).await;
    rig.settle(2).await;
    assert_eq!(count(&mut rig, "out:a"), 1);
    let records = rig.dead_letters();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["reason"], "invalid_param");
}

/// A dedup key already holding a foreign value, set by `foreign`, and two messages: the
/// first fails at once (`redis_error`, naming the key), the second goes through, and the
/// foreign value is left alone.
async fn foreign_value_fails_at_once(foreign: impl FnOnce(&mut redis::Connection)) {
    let mut rig = Rig::start_with(
        &counted("dedup = { key = \"dedup:{id}:{json.seq}\" }"),
        foreign,
    )
    .await;
    rig.publish("d/a", r#"{"seq":1}"#).await;
    rig.publish("d/a", r#"{"seq":2}"#).await;
    // Within WAIT, not however long the value lives.
    rig.settle(2).await;
    assert_eq!(count(&mut rig, "out:a"), 1, "seq 2 went through");
    let records = rig.dead_letters();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["reason"], "redis_error");
    assert!(
        records[0]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("dedup:a:1")),
        "{}",
        records[0]
    );
    assert_eq!(
        rig.text("dedup:a:1").await,
        "something else",
        "a foreign value is left alone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedup_key_holding_a_foreign_value_without_expiry_fails_instead_of_waiting_forever() {
    foreign_value_fails_at_once(|c| {
        let () = c.set("dedup:a:1", "something else").expect("SET");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedup_key_holding_a_foreign_value_with_a_ttl_fails_at_once_and_the_topic_flows() {
    foreign_value_fails_at_once(|c| {
        let () = redis::cmd("SET")
            .arg("dedup:a:1")
            .arg("something else")
            .arg("PX")
            .arg(3_600_000)
            .query(c)
            .expect("SET");
    })
    .await;
}

// ---- dedup and forwards under faults (spec §6: a write whose reply was lost counts as
// written and its forwards go out) ---------------------------------------------------------

/// A dedup route on `d/{id}` that appends each message to `list:{id}` and forwards it to
/// `out/{id}`, then the witness.
fn dedup_and_forward() -> String {
    format!(
        r#"
[[routes]]
name = "tested"
topic = "d/{{id}}"
qos = 1
dedup = {{ key = "dedup:{{id}}:{{json.seq}}", ttl = "10m" }}
[[routes.actions]]
op = "rpush"
key = "list:{{id}}"
[[routes.actions]]
op = "mqtt_publish"
topic = "out/{{id}}"
{witness}"#,
        witness = witness("d/{id}")
    )
}

/// A [`Rig`] whose daemon reaches Redis through a [`FaultProxy`], with `prepare` run on
/// Redis first, and a listener subscribed to `out/#`.
async fn behind_a_proxy(
    routes: &str,
    prepare: impl FnOnce(&mut redis::Connection),
) -> (Rig, FaultProxy, Client) {
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let proxy = FaultProxy::start(redis.port());
    let mut conn = redis.client().get_connection().expect("redis connection");
    prepare(&mut conn);
    let through_proxy = config(&redis, &broker, "bridge-under-test", routes)
        .replace(&redis.url(), &proxy.redis_url());
    let bridge = Bridge::start(&through_proxy);
    let client = Client::connect(&broker, "test-publisher").await;
    let mut rig = Rig {
        redis,
        broker,
        bridge,
        conn,
        client,
    };
    let mut listener = Client::connect(&rig.broker, "listener").await;
    listener.subscribe("out/#").await;
    subscribed(&mut rig, &mut listener, "out/probe").await;
    (rig, proxy, listener)
}

/// Polls /metrics until route `route` shows each (outcome, value) or WAIT passes; the
/// values last seen, in order.
async fn outcomes_until(rig: &Rig, route: &str, expected: &[(&str, f64)]) -> Vec<Option<f64>> {
    outcomes_at(latest_http_addr(&rig.bridge), route, expected).await
}

/// [`outcomes_until`] for the bridge serving /metrics at `addr`.
pub(crate) async fn outcomes_at(
    addr: std::net::SocketAddr,
    route: &str,
    expected: &[(&str, f64)],
) -> Vec<Option<f64>> {
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, metrics) = get(addr, "/metrics").await;
        let seen: Vec<Option<f64>> = expected
            .iter()
            .map(|(outcome, _)| {
                sample(
                    &metrics,
                    &format!(
                        r#"routemq_bridge_messages_total{{route="{route}",outcome="{outcome}"}}"#
                    ),
                )
            })
            .collect();
        let wanted: Vec<Option<f64>> = expected.iter().map(|(_, v)| Some(*v)).collect();
        if seen == wanted || Instant::now() > deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The HTTP address of the process last started (after a restart the log holds both).
pub(crate) fn latest_http_addr(bridge: &Bridge) -> std::net::SocketAddr {
    let log = bridge.log_text();
    let needle = "http listening on ";
    let start = log
        .rfind(needle)
        .expect("the bridge logged its HTTP address")
        + needle.len();
    let addr: String = log[start..]
        .chars()
        .take_while(|c| !c.is_whitespace())
        .collect();
    addr.parse().expect("an address")
}

/// The next forward's payload, or a failure naming what was expected.
async fn next_forward(listener: &mut Client, expected: &str) -> String {
    let got = listener
        .next_message(WAIT)
        .await
        .unwrap_or_else(|| panic!("no forward (expected {expected})"));
    assert_eq!(got.topic, "out/a");
    String::from_utf8(got.payload.to_vec()).expect("utf-8 forward")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedup_transaction_whose_reply_is_lost_with_the_connection_is_written_and_forwarded() {
    let (mut rig, proxy, mut listener) = behind_a_proxy(&dedup_and_forward(), |_| {}).await;
    // The transaction reaches Redis; its reply is lost with the connection.
    proxy.drop_after_request(b"EXEC");
    rig.publish("d/a", r#"{"seq":1}"#).await;
    rig.settle(1).await;
    assert_eq!(proxy.fired(), 1, "the fault happened");
    assert_eq!(next_forward(&mut listener, "seq 1").await, r#"{"seq":1}"#);
    let list: Vec<String> = rig.conn.lrange("list:a", 0, -1).expect("LRANGE");
    assert_eq!(list, vec![r#"{"seq":1}"#.to_string()], "written once");

    // A retransmission of seq 1 is still a duplicate, not forwarded: the next forward the
    // listener sees is seq 2's (forwards leave in order).
    rig.publish("d/a", r#"{"seq":1}"#).await;
    rig.publish("d/a", r#"{"seq":2}"#).await;
    rig.settle(3).await;
    assert_eq!(next_forward(&mut listener, "seq 2").await, r#"{"seq":2}"#);
    let len: i64 = rig.conn.llen("list:a").expect("LLEN");
    assert_eq!(len, 2);
    let outcomes = outcomes_until(&rig, "tested", &[("written", 2.0), ("duplicate", 1.0)]).await;
    assert_eq!(outcomes, vec![Some(2.0), Some(1.0)]);
    assert!(rig.dead_letters().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedup_transaction_whose_reply_timed_out_is_written_and_forwarded() {
    let (mut rig, proxy, mut listener) = behind_a_proxy(&dedup_and_forward(), |_| {}).await;
    // Held past the bridge's socket_timeout (2 s): a timeout first, then the drop.
    proxy.stall_then_drop_after_request(b"EXEC", Duration::from_secs(3));
    rig.publish("d/a", r#"{"seq":1}"#).await;
    rig.settle(1).await;
    assert_eq!(proxy.fired(), 1, "the fault happened");
    assert_eq!(next_forward(&mut listener, "seq 1").await, r#"{"seq":1}"#);
    let len: i64 = rig.conn.llen("list:a").expect("LLEN");
    assert_eq!(len, 1, "written once");
    let outcomes = outcomes_until(&rig, "tested", &[("written", 1.0)]).await;
    assert_eq!(outcomes, vec![Some(1.0)]);
    let (_, metrics) = get(latest_http_addr(&rig.bridge), "/metrics").await;
    let timeouts = sample(
        &metrics,
        r#"routemq_bridge_redis_errors_total{kind="timeout"}"#,
    );
    assert!(
        timeouts.is_some_and(|n| n >= 1.0),
        "the bridge saw a timeout: {timeouts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_after_a_crash_between_the_write_and_the_forwards_sends_the_forwards() {
    let message = r#"{"seq":1}"#;
    // What `kill -9` right after EXEC leaves behind: the write, and the mark of a
    // transaction whose forwards had not gone out.
    let before_crash = Marks::new(
        "lease:bridge-under-test:dead".to_string(),
        Some(("tested", "d/a", message.as_bytes())),
    );
    let (mut rig, _proxy, mut listener) = behind_a_proxy(&dedup_and_forward(), |c| {
        let _: i64 = c.rpush("list:a", message).expect("RPUSH");
        let () = redis::cmd("SET")
            .arg("dedup:a:1")
            .arg(before_crash.written())
            .arg("PX")
            .arg(600_000)
            .query(c)
            .expect("SET");
    })
    .await;
    rig.publish("d/a", message).await;
    rig.settle(1).await;
    assert_eq!(next_forward(&mut listener, "seq 1").await, message);
    let len: i64 = rig.conn.llen("list:a").expect("LLEN");
    assert_eq!(len, 1, "not written again");
    let outcomes = outcomes_until(&rig, "tested", &[("written", 1.0)]).await;
    assert_eq!(outcomes, vec![Some(1.0)]);
    let mark = rig.text("dedup:a:1").await;
    assert!(
        mark.starts_with("done:bridge-under-test:") && !mark.contains(":fwd:"),
        "finished once the forwards are out: {mark}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_killed_between_the_write_and_the_forwards_forwards_after_the_restart() {
    let (mut rig, proxy, mut listener) = behind_a_proxy(&dedup_and_forward(), |_| {}).await;
    // The transaction is applied; its reply is held while the bridge waits for it…
    proxy.stall_then_drop_after_request(b"EXEC", Duration::from_secs(60));
    rig.publish("d/a", r#"{"seq":1}"#).await;
    let conn = &mut rig.conn;
    let applied = eventually(WAIT, || {
        conn.llen::<_, i64>("list:a")
            .ok()
            .filter(|n| *n == 1)
            .filter(|_| proxy.fired() == 1)
    })
    .await;
    assert_eq!(applied, Some(1), "the transaction reached Redis");
    // …and the bridge dies before its forward. The broker redelivers to the new process.
    rig.bridge.kill();
    rig.bridge.spawn();
    rig.settle(1).await;
    assert_eq!(next_forward(&mut listener, "seq 1").await, r#"{"seq":1}"#);
    let len: i64 = rig.conn.llen("list:a").expect("LLEN");
    assert_eq!(len, 1, "not written again");
    let outcomes = outcomes_until(&rig, "tested", &[("written", 1.0)]).await;
    assert_eq!(outcomes, vec![Some(1.0)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_mark_of_the_same_message_is_a_duplicate_and_not_forwarded() {
    let (mut rig, _proxy, mut listener) = behind_a_proxy(&dedup_and_forward(), |c| {
        let () = redis::cmd("SET")
            .arg("dedup:a:1")
            .arg("done:other-bridge:abc")
            .arg("PX")
            .arg(600_000)
            .query(c)
            .expect("SET");
    })
    .await;
    rig.publish("d/a", r#"{"seq":1}"#).await;
    rig.publish("d/a", r#"{"seq":2}"#).await;
    rig.settle(2).await;
    assert_eq!(next_forward(&mut listener, "seq 2").await, r#"{"seq":2}"#);
    let list: Vec<String> = rig.conn.lrange("list:a", 0, -1).expect("LRANGE");
    assert_eq!(list, vec![r#"{"seq":2}"#.to_string()]);
    let outcomes = outcomes_until(&rig, "tested", &[("written", 1.0), ("duplicate", 1.0)]).await;
    assert_eq!(outcomes, vec![Some(1.0), Some(1.0)]);
}
