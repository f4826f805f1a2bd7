//! Actions and templates end to end (spec §5.1, §5.2): the real daemon, one route per test,
//! a message published to the broker, and what lands in Redis (or is published) checked.
//!
//! Also home of [`Rig`], the setup the middleware and outcome tests share: private Redis and
//! Mosquitto, the daemon with the test's routes, a publisher, and a *witness* route listed
//! last that counts every message on the tested topics. Routes of one message run in file
//! order and messages of one topic in arrival order, so once the witness has counted `n`,
//! the tested routes have finished with the first `n` messages — an event to await instead
//! of a sleep, also for messages that must leave nothing behind.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::Commands;
use serde_json::{json, Value};

use crate::bridge::{config, eventually, Bridge, Client};
use crate::harness::{Mosquitto, Redis};

/// How long anything the daemon does may take to show.
pub const WAIT: Duration = Duration::from_secs(10);

/// Private services, the daemon and a publisher.
pub struct Rig {
    pub redis: Redis,
    pub broker: Mosquitto,
    pub bridge: Bridge,
    pub conn: redis::Connection,
    pub client: Client,
}

/// A route listed after the tested ones that counts each message on `topic` in `witness`.
pub fn witness(topic: &str) -> String {
    format!(
        r#"
[[routes]]
name = "witness"
topic = "{topic}"
payload = "bytes"
[[routes.actions]]
op = "incr"
key = "witness"
"#
    )
}

impl Rig {
    /// Starts everything with `routes` (TOML: `[[routes]]` …, other tables allowed).
    pub async fn start(routes: &str) -> Rig {
        Self::start_with(routes, |_| {}).await
    }

    /// Like [`Rig::start`], with `prepare` run on Redis before the daemon starts.
    pub async fn start_with(routes: &str, prepare: impl FnOnce(&mut redis::Connection)) -> Rig {
        let redis = Redis::start();
        let broker = Mosquitto::start();
        let mut conn = redis.client().get_connection().expect("redis connection");
        prepare(&mut conn);
        let bridge = Bridge::start(&config(&redis, &broker, "bridge-under-test", routes));
        let client = Client::connect(&broker, "test-publisher").await;
        Rig {
            redis,
            broker,
            bridge,
            conn,
            client,
        }
    }

    pub async fn publish(&mut self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client.publish(topic, payload).await;
    }

    /// Waits until the witness route has counted `n` messages.
    pub async fn settle(&mut self, n: i64) {
        let conn = &mut self.conn;
        let seen = eventually(WAIT, || {
            conn.get::<_, Option<i64>>("witness")
                .ok()
                .flatten()
                .filter(|v| *v >= n)
        })
        .await;
        assert_eq!(
            seen,
            Some(n),
            "the witness did not count {n} messages; log:\n{}",
            self.bridge.log_text()
        );
    }

    /// Waits until `key` holds a string value and returns its bytes.
    pub async fn value(&mut self, key: &str) -> Vec<u8> {
        let conn = &mut self.conn;
        let value = eventually(WAIT, || conn.get::<_, Option<Vec<u8>>>(key).ok().flatten()).await;
        value.unwrap_or_else(|| panic!("`{key}` was not written; log:\n{}", self.bridge.log_text()))
    }

    /// Waits until `key` holds a string and returns it as text.
    pub async fn text(&mut self, key: &str) -> String {
        String::from_utf8(self.value(key).await).expect("utf-8 value")
    }

    /// The dead-letter records, newest first.
    pub fn dead_letters(&mut self) -> Vec<Value> {
        let raw: Vec<String> = self.conn.lrange("dead_letter", 0, -1).expect("LRANGE");
        raw.iter()
            .map(|r| serde_json::from_str(r).expect("dead-letter record is JSON"))
            .collect()
    }

    pub fn exists(&mut self, key: &str) -> bool {
        self.conn.exists(key).expect("EXISTS")
    }
}

/// A route on `topic` whose only action is `action` (TOML lines of `[[routes.actions]]`),
/// with extra route lines, followed by the witness on the same topic.
fn route(topic: &str, route_lines: &str, action: &str) -> String {
    format!(
        r#"
[[routes]]
name = "tested"
topic = "{topic}"
{route_lines}
[[routes.actions]]
{action}
{witness}"#,
        witness = witness(topic)
    )
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

// ---- set ------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_writes_the_payload_by_default() {
    let mut rig = Rig::start(&route("d/{id}", "", "op = \"set\"\nkey = \"v:{id}\"")).await;
    rig.publish("d/a", r#"{"x": 1}"#).await;
    assert_eq!(rig.text("v:a").await, r#"{"x": 1}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_nx_keeps_the_existing_value_and_the_message_still_counts_written() {
    let mut rig = Rig::start_with(
        &route(
            "d/{id}",
            "",
            "op = \"set\"\nkey = \"v:{id}\"\nnx = true\n[[routes.actions]]\nop = \"incr\"\nkey = \"after:{id}\"",
        ),
        |c| {
            let () = c.set("v:a", "old").expect("SET");
        },
    )
    .await;
    rig.publish("d/a", "1").await;
    rig.publish("d/b", "2").await;
    rig.settle(2).await;
    assert_eq!(rig.text("v:a").await, "old", "NX must not overwrite");
    assert_eq!(rig.text("v:b").await, "2", "NX writes an absent key");
    // The refused NX did not fail the transaction: the next action ran, nothing dead-lettered.
    assert_eq!(rig.text("after:a").await, "1");
    assert!(rig.dead_letters().is_empty(), "{:?}", rig.dead_letters());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_xx_writes_only_an_existing_key() {
    let mut rig = Rig::start_with(
        &route(
            "d/{id}",
            "payload = \"text\"",
            "op = \"set\"\nkey = \"v:{id}\"\nxx = true",
        ),
        |c| {
            let () = c.set("v:a", "old").expect("SET");
        },
    )
    .await;
    rig.publish("d/a", "new").await;
    rig.publish("d/b", "new").await;
    rig.settle(2).await;
    assert_eq!(rig.text("v:a").await, "new");
    assert!(!rig.exists("v:b"), "XX must not create a key");
    assert!(rig.dead_letters().is_empty(), "{:?}", rig.dead_letters());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_with_ex_gives_a_ttl_in_seconds() {
    let mut rig = Rig::start(&route(
        "d/{id}",
        "",
        "op = \"set\"\nkey = \"v:{id}\"\nex = \"1h\"",
    ))
    .await;
    rig.publish("d/a", "1").await;
    rig.value("v:a").await;
    let ttl: i64 = rig.conn.ttl("v:a").expect("TTL");
    assert!((3500..=3600).contains(&ttl), "TTL {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_with_px_gives_a_ttl_in_milliseconds() {
    let mut rig = Rig::start(&route(
        "d/{id}",
        "",
        "op = \"set\"\nkey = \"v:{id}\"\npx = \"90s\"",
    ))
    .await;
    rig.publish("d/a", "1").await;
    rig.value("v:a").await;
    let pttl: i64 = rig.conn.pttl("v:a").expect("PTTL");
    assert!((80_000..=90_000).contains(&pttl), "PTTL {pttl}");
}

// ---- set_json -------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_json_writes_the_payload_as_compact_json() {
    let mut rig = Rig::start(&route("d/{id}", "", "op = \"set_json\"\nkey = \"v:{id}\"")).await;
    rig.publish("d/a", "{ \"t\" : 21.5,\n \"tags\": [ \"x\", 1 ] }")
        .await;
    assert_eq!(rig.text("v:a").await, r#"{"t":21.5,"tags":["x",1]}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_json_and_json_templates_keep_numbers_digits_escapes_and_key_order() {
    let mut rig = Rig::start(&route(
        "d/{id}",
        "",
        r#"op = "set_json"
key = "v:{id}"
[[routes.actions]]
op = "set"
key = "big:{json.big}"
value = "{json.neg}|{json.f}|{json.o}""#,
    ))
    .await;
    let payload = "{ \"z\" : 1 , \"a\" : [ 1.10 , -0.0 , 1E-7 , 1e5 , 2.5E+10 ] ,\n\t\
                   \"big\" : 123456789012345678901234567890 ,\r\n \
                   \"neg\" : -123456789012345678901234567891 , \"f\" : 1.10 ,\n \
                   \"s\" : \"caf\\u00e9 \\ud83d\\ude00 \\\"q\\\" \\\\ \\/  two  spaces\" ,\n \
                   \"o\" : { \"y\" : { } , \"x\" : [ ] , \"w\" : [ { \"v\" : null } ] } }\n";
    rig.publish("d/a", payload).await;
    rig.settle(1).await;
    assert_eq!(
        rig.text("v:a").await,
        "{\"z\":1,\"a\":[1.10,-0.0,1E-7,1e5,2.5E+10],\
         \"big\":123456789012345678901234567890,\
         \"neg\":-123456789012345678901234567891,\"f\":1.10,\
         \"s\":\"caf\\u00e9 \\ud83d\\ude00 \\\"q\\\" \\\\ \\/  two  spaces\",\
         \"o\":{\"y\":{},\"x\":[],\"w\":[{\"v\":null}]}}"
    );
    assert_eq!(
        rig.text("big:123456789012345678901234567890").await,
        r#"-123456789012345678901234567891|1.10|{"y":{},"x":[],"w":[{"v":null}]}"#
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_json_value_table_renders_template_leaves() {
    let mut rig = Rig::start(&route(
        "d/{id}",
        "",
        r#"op = "set_json"
key = "v:{id}"
value = { device = "{id}", temp = "{json.t}", fixed = 3, on = true, nested = { seq = "{json.seq}" }, list = ["{id}", 1] }"#,
    ))
    .await;
    rig.publish("d/a", r#"{"t": 21.5, "seq": 7}"#).await;
    let written: Value = serde_json::from_str(&rig.text("v:a").await).expect("JSON");
    assert_eq!(
        written,
        json!({"device": "a", "temp": "21.5", "fixed": 3, "on": true, "nested": {"seq": "7"}, "list": ["a", 1]})
    );
}

// ---- hset -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hset_writes_the_fields_table() {
    let mut rig = Rig::start(&route(
        "d/{id}",
        "",
        r#"op = "hset"
key = "h:{id}"
fields = { device = "{id}", temp = "{json.t}", raw = "{payload}" }"#,
    ))
    .await;
    rig.publish("d/a", r#"{"t":20}"#).await;
    rig.settle(1).await;
    let hash: std::collections::HashMap<String, String> = rig.conn.hgetall("h:a").expect("HGETALL");
    assert_eq!(hash.get("device").map(String::as_str), Some("a"));
    assert_eq!(hash.get("temp").map(String::as_str), Some("20"));
    assert_eq!(hash.get("raw").map(String::as_str), Some(r#"{"t":20}"#));
    assert_eq!(hash.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hset_fields_json_spreads_the_top_level_with_nested_values_as_compact_json() {
    let mut rig = Rig::start(&route(
        "d/{id}",
        "",
        "op = \"hset\"\nkey = \"h:{id}\"\nfields = \"json\"",
    ))
    .await;
    rig.publish(
        "d/a",
        r#"{"name": "x", "n": 1.5, "ok": false, "nested": {"a": [1, 2]}, "none": null}"#,
    )
    .await;
    rig.settle(1).await;
    let hash: std::collections::HashMap<String, String> = rig.conn.hgetall("h:a").expect("HGETALL");
    let expected: std::collections::HashMap<String, String> = [
        ("name", "x"),
        ("n", "1.5"),
        ("ok", "false"),
        ("nested", r#"{"a":[1,2]}"#),
        ("none", "null"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(hash, expected);
}

// ---- incr -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incr_adds_one_by_default() {
    let mut rig = Rig::start(&route("d/{id}", "", "op = \"incr\"\nkey = \"c:{id}\"")).await;
    rig.publish("d/a", "{}").await;
    rig.publish("d/a", "{}").await;
    rig.settle(2).await;
    assert_eq!(rig.text("c:a").await, "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incr_adds_by() {
    let mut rig = Rig::start(&route(
        "d/{id}",
        "",
        "op = \"incr\"\nkey = \"c:{id}\"\nby = -5",
    ))
    .await;
    rig.publish("d/a", "{}").await;
    rig.publish("d/a", "{}").await;
    rig.settle(2).await;
    assert_eq!(rig.text("c:a").await, "-10");
}

// ---- lpush / rpush --------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lpush_with_max_len_keeps_the_newest() {
    let mut rig = Rig::start(&route(
        "d/{id}",
        "payload = \"text\"",
        "op = \"lpush\"\nkey = \"l:{id}\"\nmax_len = 3",
    ))
    .await;
    for i in 1..=5 {
        rig.publish("d/a", i.to_string()).await;
    }
    rig.settle(5).await;
    let list: Vec<String> = rig.conn.lrange("l:a", 0, -1).expect("LRANGE");
    assert_eq!(list, ["5", "4", "3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpush_with_max_len_keeps_the_newest() {
    let mut rig = Rig::start(&route(
        "d/{id}",
        "payload = \"text\"",
        "op = \"rpush\"\nkey = \"l:{id}\"\nvalue = \"n={payload}\"\nmax_len = 3",
    ))
    .await;
    for i in 1..=5 {
        rig.publish("d/a", i.to_string()).await;
    }
    rig.settle(5).await;
    let list: Vec<String> = rig.conn.lrange("l:a", 0, -1).expect("LRANGE");
    assert_eq!(list, ["n=3", "n=4", "n=5"]);
}

// ---- xadd -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xadd_appends_an_entry_with_the_fields() {
    let mut rig = Rig::start(&route(
        "d/{id}",
        "",
        r#"op = "xadd"
key = "s"
fields = { device = "{id}", data = "{payload}" }"#,
    ))
    .await;
    rig.publish("d/a", r#"{"t":1}"#).await;
    rig.settle(1).await;
    let reply: redis::streams::StreamRangeReply = rig.conn.xrange_all("s").expect("XRANGE");
    assert_eq!(reply.ids.len(), 1);
    let entry = &reply.ids[0];
    assert_eq!(entry.get::<String>("device").as_deref(), Some("a"));
    assert_eq!(entry.get::<String>("data").as_deref(), Some(r#"{"t":1}"#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xadd_max_len_trims_approximately() {
    let mut rig = Rig::start(&route(
        "d/{id}",
        "payload = \"text\"",
        "op = \"xadd\"\nkey = \"s\"\nmax_len = 10\nfields = { n = \"{payload}\" }",
    ))
    .await;
    // Small nodes so that an approximate trim can actually drop whole nodes.
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("stream-node-max-entries")
        .arg("5")
        .query(&mut rig.conn)
        .expect("CONFIG SET");
    let total = 60;
    rig.client
        .publish_all((0..total).map(|i| ("d/a".to_string(), i.to_string().into_bytes())))
        .await;
    rig.settle(total).await;
    let len: i64 = rig.conn.xlen("s").expect("XLEN");
    assert!(
        (10..total).contains(&len),
        "approximate trim keeps at least max_len and drops the old: XLEN {len}"
    );
    // The newest entry is kept.
    let reply: redis::streams::StreamRangeReply = rig
        .conn
        .xrevrange_count("s", "+", "-", 1)
        .expect("XREVRANGE");
    assert_eq!(
        reply.ids[0].get::<String>("n").as_deref(),
        Some((total - 1).to_string().as_str())
    );
}

// ---- zadd -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zadd_scores_the_member_and_max_len_keeps_the_highest() {
    let mut rig = Rig::start(&route(
        "d/{id}",
        "",
        "op = \"zadd\"\nkey = \"z:{id}\"\nscore = \"{json.score}\"\nmember = \"{json.name}\"\nmax_len = 2",
    ))
    .await;
    for (name, score) in [("ann", 5), ("bob", 1), ("cy", 9), ("dee", 3)] {
        rig.publish("d/a", json!({"name": name, "score": score}).to_string())
            .await;
    }
    // A score that is no number: invalid, nothing written, the next message goes on.
    rig.publish("d/a", r#"{"name":"eve","score":"high"}"#).await;
    rig.settle(5).await;
    let board: Vec<(String, f64)> = rig
        .conn
        .zrevrange_withscores("z:a", 0, -1)
        .expect("ZREVRANGE");
    assert_eq!(board, [("cy".to_string(), 9.0), ("ann".to_string(), 5.0)]);
    let dead = rig.dead_letters();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["reason"], "invalid_param");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zadd_scores_now_ms_and_stores_the_payload_by_default() {
    let before = now_ms();
    let mut rig = Rig::start(&route(
        "d/{id}",
        "payload = \"text\"",
        "op = \"zadd\"\nkey = \"z:{id}\"",
    ))
    .await;
    rig.publish("d/a", "reading-1").await;
    rig.settle(1).await;
    let score: Option<f64> = rig.conn.zscore("z:a", "reading-1").expect("ZSCORE");
    let score = score.expect("the payload is the member") as u64;
    assert!(
        (before..=now_ms()).contains(&score),
        "{score} is the time of the write in ms"
    );
}

// ---- publish --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_sends_the_payload_to_the_channel_by_default() {
    let mut rig = Rig::start(&route(
        "d/{id}",
        "",
        "op = \"publish\"\nchannel = \"events:{id}\"",
    ))
    .await;
    let messages = subscribe(&rig.redis, "events:a");
    rig.publish("d/a", r#"{"e":1}"#).await;
    let got = tokio::task::spawn_blocking(move || messages.recv_timeout(WAIT))
        .await
        .expect("join");
    assert_eq!(got.ok().as_deref(), Some(r#"{"e":1}"#));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_sends_the_rendered_message() {
    let mut rig = Rig::start(&route(
        "d/{id}",
        "",
        "op = \"publish\"\nchannel = \"events\"\nmessage = \"{id} says {json.e}\"",
    ))
    .await;
    let messages = subscribe(&rig.redis, "events");
    rig.publish("d/a", r#"{"e":"hi"}"#).await;
    let got = tokio::task::spawn_blocking(move || messages.recv_timeout(WAIT))
        .await
        .expect("join");
    assert_eq!(got.ok().as_deref(), Some("a says hi"));
}

/// Subscribes to `channel` on a thread of its own and returns when the subscription holds;
/// messages arrive on the returned channel.
fn subscribe(redis: &Redis, channel: &str) -> std::sync::mpsc::Receiver<String> {
    let client = redis.client();
    let channel = channel.to_string();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut conn = client.get_connection().expect("redis connection");
        let mut pubsub = conn.as_pubsub();
        pubsub.subscribe(&channel).expect("SUBSCRIBE");
        let _ = pubsub.set_read_timeout(Some(Duration::from_secs(30)));
        let _ = ready_tx.send(());
        while let Ok(msg) = pubsub.get_message() {
            if let Ok(payload) = msg.get_payload::<String>() {
                if tx.send(payload).is_err() {
                    break;
                }
            }
        }
    });
    ready.recv_timeout(WAIT).expect("subscribed in time");
    rx
}

// ---- expire ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expire_with_ex_sets_a_ttl_on_the_key() {
    let mut rig = Rig::start_with(
        &route(
            "d/{id}",
            "",
            "op = \"expire\"\nkey = \"k:{id}\"\nex = \"1h\"",
        ),
        |c| {
            let () = c.set("k:a", "x").expect("SET");
        },
    )
    .await;
    rig.publish("d/a", "{}").await;
    rig.settle(1).await;
    let ttl: i64 = rig.conn.ttl("k:a").expect("TTL");
    assert!((3500..=3600).contains(&ttl), "TTL {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expire_with_px_sets_a_ttl_in_milliseconds() {
    let mut rig = Rig::start_with(
        &route(
            "d/{id}",
            "",
            "op = \"expire\"\nkey = \"k:{id}\"\npx = \"1500ms\"",
        ),
        |c| {
            let () = c.set("k:a", "x").expect("SET");
        },
    )
    .await;
    rig.publish("d/a", "{}").await;
    rig.settle(1).await;
    let pttl: i64 = rig.conn.pttl("k:a").expect("PTTL");
    assert!((1..=1500).contains(&pttl), "PTTL {pttl}");
}

// ---- mqtt_publish ---------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_publish_forwards_the_payload_by_default_at_the_route_qos() {
    let mut rig = Rig::start(&route(
        "d/{id}",
        "qos = 1",
        "op = \"mqtt_publish\"\ntopic = \"out/{id}\"",
    ))
    .await;
    let mut listener = Client::connect(&rig.broker, "listener").await;
    listener.subscribe("out/#").await;
    subscribed(&mut rig, &mut listener, "out/probe").await;
    rig.publish("d/a", r#"{"x":1}"#).await;
    let got = listener.next_message(WAIT).await.expect("a forward");
    assert_eq!(got.topic, "out/a");
    assert_eq!(&got.payload[..], br#"{"x":1}"#);
    assert_eq!(got.qos, rumqttc::QoS::AtLeastOnce);
    assert!(!got.retain);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_publish_renders_payload_qos_and_retain() {
    let mut rig = Rig::start(&route(
        "d/{id}",
        "qos = 1",
        "op = \"mqtt_publish\"\ntopic = \"out/{id}\"\npayload = \"v={json.v}\"\nqos = 0\nretain = true",
    ))
    .await;
    let mut live = Client::connect(&rig.broker, "live").await;
    live.subscribe("out/#").await;
    subscribed(&mut rig, &mut live, "out/probe").await;
    rig.publish("d/a", r#"{"v":7}"#).await;
    let got = live.next_message(WAIT).await.expect("a forward");
    assert_eq!(got.topic, "out/a");
    assert_eq!(&got.payload[..], b"v=7");
    assert_eq!(got.qos, rumqttc::QoS::AtMostOnce);
    // Retained: a subscriber arriving afterwards still gets it, flagged retain.
    let mut late = Client::connect(&rig.broker, "late").await;
    late.subscribe("out/a").await;
    let got = late.next_message(WAIT).await.expect("the retained forward");
    assert_eq!(&got.payload[..], b"v=7");
    assert!(got.retain);
}

/// Waits until `listener`'s subscription is in place: publishes probes to `probe` (which its
/// filter covers) until one comes back.
pub async fn subscribed(rig: &mut Rig, listener: &mut Client, probe: &str) {
    for _ in 0..50 {
        rig.client
            .client
            .publish(probe, rumqttc::QoS::AtMostOnce, false, "probe")
            .await
            .expect("queue probe");
        // Earlier probes may still come in; any of them proves the subscription.
        if let Some(p) = listener.next_message(Duration::from_millis(200)).await {
            assert_eq!(p.topic, probe);
            return;
        }
    }
    panic!("subscription of the listener did not take effect");
}

// ---- templates ------------------------------------------------------------------------

/// Runs one message through `set key = "out" value = <template>` and returns what was
/// written.
async fn render(
    topic_pattern: &str,
    route_lines: &str,
    template: &str,
    topic: &str,
    payload: &[u8],
) -> Vec<u8> {
    let mut rig = Rig::start(&route(
        topic_pattern,
        route_lines,
        &format!(
            "op = \"set\"\nkey = \"out\"\nvalue = {}",
            toml_string(template)
        ),
    ))
    .await;
    rig.publish(topic, payload.to_vec()).await;
    rig.value("out").await
}

fn toml_string(s: &str) -> String {
    serde_json::to_string(s).expect("string")
}

fn text(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).expect("utf-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_name_renders_the_captured_param() {
    let out = render("d/{id}/x", "", "<{id}>", "d/dev-7/x", b"{}").await;
    assert_eq!(text(out), "<dev-7>");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_topic_renders_the_whole_topic() {
    let out = render("d/+/x", "", "{topic}", "d/dev-7/x", b"{}").await;
    assert_eq!(text(out), "d/dev-7/x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_payload_renders_the_payload_text() {
    let out = render(
        "d/{id}",
        "payload = \"text\"",
        "[{payload}]",
        "d/a",
        "héllo".as_bytes(),
    )
    .await;
    assert_eq!(text(out), "[héllo]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_json_path_renders_strings_as_is_and_other_values_compactly() {
    let out = render(
        "d/{id}",
        "",
        "{json.a.b}|{json.a.c}|{json.a}",
        "d/a",
        br#"{"a": {"b": "text", "c": [1, 2]}}"#,
    )
    .await;
    assert_eq!(text(out), r#"text|[1,2]|{"b":"text","c":[1,2]}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_json_array_index_renders_the_item() {
    let out = render(
        "d/{id}",
        "",
        "{json.items.0}-{json.items.1.n}",
        "d/a",
        br#"{"items": ["first", {"n": 2}]}"#,
    )
    .await;
    assert_eq!(text(out), "first-2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_session_field_renders_from_the_session() {
    let mut rig = Rig::start_with(
        &route(
            "d/{id}",
            "session = { key = \"session:{id}\" }",
            "op = \"set\"\nkey = \"out:{id}\"\nvalue = \"{session.user}/{session.level}\"",
        ),
        |c| {
            let () = c
                .set("session:a", r#"{"user": "ann", "level": 3}"#)
                .expect("SET");
        },
    )
    .await;
    rig.publish("d/a", "{}").await;
    assert_eq!(rig.text("out:a").await, "ann/3");
    // No session and not required: the field renders empty.
    rig.publish("d/b", "{}").await;
    assert_eq!(rig.text("out:b").await, "/");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_now_renders_unix_seconds() {
    let before = now_s();
    let out = text(render("d/{id}", "", "{now}", "d/a", b"{}").await);
    let after = now_s();
    let now: u64 = out.parse().expect("a number");
    assert!(
        (before..=after).contains(&now),
        "{now} not in {before}..={after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_now_ms_renders_unix_milliseconds() {
    let before = now_ms();
    let out = text(render("d/{id}", "", "{now_ms}", "d/a", b"{}").await);
    let after = now_ms();
    let now: u64 = out.parse().expect("a number");
    assert!(
        (before..=after).contains(&now),
        "{now} not in {before}..={after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_uuid_renders_a_lowercase_v4_uuid() {
    let out = text(render("d/{id}", "", "{uuid}", "d/a", b"{}").await);
    let re =
        regex::Regex::new("^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
            .expect("regex");
    assert!(re.is_match(&out), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_payload_sha256_renders_lowercase_hex() {
    use sha2::{Digest, Sha256};
    let payload = br#"{"x":1}"#;
    let out = text(render("d/{id}", "", "{payload_sha256}", "d/a", payload).await);
    let expected: String = Sha256::digest(payload)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(out, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_double_braces_are_literal_braces() {
    let out = render("d/{id}", "", "{{{id}}}{{}}", "d/a", b"{}").await;
    assert_eq!(text(out), "{a}{}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_payload_alone_on_a_bytes_route_writes_the_raw_bytes() {
    let payload = [0xff, 0x00, 0xfe, b'a', 0x80];
    let out = render(
        "d/{id}",
        "payload = \"bytes\"",
        "{payload}",
        "d/a",
        &payload,
    )
    .await;
    assert_eq!(out, payload);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_rest_param_captures_the_rest_of_the_topic_into_a_key() {
    let mut rig = Rig::start(&route(
        "files/{path...}",
        "",
        "op = \"set\"\nkey = \"file:{path}\"\nvalue = \"{path}\"",
    ))
    .await;
    rig.publish("files/a/b/c.txt", "{}").await;
    assert_eq!(rig.text("file:a/b/c.txt").await, "a/b/c.txt");
}

// ---- fan-out --------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_matching_two_routes_is_handled_by_both() {
    let mut rig = Rig::start(
        r#"
[[routes]]
name = "first"
topic = "d/{id}/data"
[[routes.actions]]
op = "set"
key = "first:{id}"

[[routes]]
name = "second"
topic = "d/+/data"
payload = "text"
[[routes.actions]]
op = "set"
key = "second"
value = "{topic}"
"#,
    )
    .await;
    rig.publish("d/a/data", "{}").await;
    assert_eq!(rig.text("first:a").await, "{}");
    assert_eq!(rig.text("second").await, "d/a/data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_routes_write_once_per_route_not_once_per_filter() {
    let mut rig = Rig::start(
        r#"
[[routes]]
name = "wide"
topic = "sensors/#"
payload = "text"
[[routes.actions]]
op = "rpush"
key = "wide"
[[routes.actions]]
op = "incr"
key = "wide:count"

[[routes]]
name = "narrow"
topic = "sensors/{id}/data"
payload = "text"
[[routes.actions]]
op = "rpush"
key = "narrow"
"#,
    )
    .await;
    rig.publish("sensors/a/data", "m1").await;
    // A second message as a fence: copies of m1, had the broker sent any, come before it.
    rig.publish("sensors/a/data", "m2").await;
    let conn = &mut rig.conn;
    let done = eventually(WAIT, || {
        let wide: Vec<String> = conn.lrange("wide", 0, -1).ok()?;
        let narrow: Vec<String> = conn.lrange("narrow", 0, -1).ok()?;
        (wide.contains(&"m2".to_string()) && narrow.contains(&"m2".to_string()))
            .then_some((wide, narrow))
    })
    .await;
    let (wide, narrow) = done.expect("both routes saw m2");
    assert_eq!(wide, ["m1", "m2"]);
    assert_eq!(narrow, ["m1", "m2"]);
    assert_eq!(rig.text("wide:count").await, "2");
}
