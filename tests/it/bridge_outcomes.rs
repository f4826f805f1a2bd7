//! Outcomes and the dead letter end to end (spec §5.3): each way a message can be refused
//! gives its record in the dead-letter list, and the topic keeps flowing afterwards.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use redis::Commands;
use serde_json::Value;

use crate::bridge_actions::{Rig, WAIT};
use crate::bridge_middleware::assert_done;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// Waits for the one dead-letter record and checks the fields every record has.
async fn the_dead_letter(rig: &mut Rig, topic: &str, reason: &str, since_ms: u64) -> Value {
    let conn = &mut rig.conn;
    let found = crate::bridge::eventually(WAIT, || {
        let n: usize = conn.llen("dead_letter").ok()?;
        (n > 0).then_some(())
    })
    .await;
    assert!(
        found.is_some(),
        "nothing was dead-lettered; log:\n{}",
        rig.bridge.log_text()
    );
    let records = rig.dead_letters();
    assert_eq!(records.len(), 1, "one record: {records:?}");
    let record = records.into_iter().next().expect("one record");
    assert_eq!(record["topic"], topic, "{record}");
    assert_eq!(record["route"], "tested", "{record}");
    assert_eq!(record["reason"], reason, "{record}");
    assert!(
        record["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{record}"
    );
    let ts = record["ts_ms"].as_u64().expect("ts_ms is an integer");
    assert!((since_ms..=now_ms()).contains(&ts), "ts_ms {ts}");
    record
}

/// A route on `d/{id}` with extra `route_lines` writing `value` to `out:{id}`.
fn tested(route_lines: &str, value: &str) -> String {
    format!(
        r#"
[[routes]]
name = "tested"
topic = "d/{{id}}"
{route_lines}
[[routes.actions]]
op = "set"
key = "out:{{id}}"
value = {value:?}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_json_is_dead_lettered_and_the_topic_keeps_flowing() {
    let mut rig = Rig::start(&tested("", "{json.t}")).await;
    let since = now_ms();
    rig.publish("d/a", "{not json").await;
    rig.publish("d/a", r#"{"t":2}"#).await;
    assert_eq!(rig.text("out:a").await, "2");
    let record = the_dead_letter(&mut rig, "d/a", "invalid_json", since).await;
    assert_eq!(record["payload"], "{not json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_over_max_payload_is_dead_lettered_cut_to_1_kib() {
    let mut rig = Rig::start(&format!(
        "[limits]\nmax_payload = \"2KiB\"\n{}",
        tested("payload = \"text\"", "{payload}")
    ))
    .await;
    let since = now_ms();
    let big = "x".repeat(5000);
    rig.publish("d/a", big.clone()).await;
    rig.publish("d/a", "small").await;
    assert_eq!(rig.text("out:a").await, "small");
    let record = the_dead_letter(&mut rig, "d/a", "payload_too_large", since).await;
    assert_eq!(record["payload"].as_str(), Some(&big[..1024]));
    assert_eq!(record["truncated"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_at_max_payload_is_processed() {
    let mut rig = Rig::start(&format!(
        "[limits]\nmax_payload = \"2KiB\"\n{}",
        tested("payload = \"text\"", "{payload}")
    ))
    .await;
    let exact = "y".repeat(2048);
    rig.publish("d/a", exact.clone()).await;
    assert_eq!(rig.text("out:a").await, exact);
    assert!(rig.dead_letters().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_on_a_text_route_is_dead_lettered_as_base64() {
    let mut rig = Rig::start(&tested("payload = \"text\"", "{payload}")).await;
    let since = now_ms();
    let bad = vec![0xff, 0xfe, b'a'];
    rig.publish("d/a", bad.clone()).await;
    rig.publish("d/a", "fine").await;
    assert_eq!(rig.text("out:a").await, "fine");
    let record = the_dead_letter(&mut rig, "d/a", "invalid_utf8", since).await;
    let b64 = record["payload_b64"].as_str().expect("payload_b64");
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("base64"),
        bad
    );
    assert!(record.get("payload").is_none(), "{record}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_param_breaking_its_constraint_is_dead_lettered() {
    let mut rig = Rig::start(&tested("params.id = \"^[a-z]+$\"", "{payload}")).await;
    let since = now_ms();
    rig.publish("d/A1", "{}").await;
    rig.publish("d/ok", "{}").await;
    assert_eq!(rig.text("out:ok").await, "{}");
    let record = the_dead_letter(&mut rig, "d/A1", "invalid_param", since).await;
    assert!(
        record["detail"].as_str().is_some_and(|d| d.contains("id")),
        "{record}"
    );
    assert!(!rig.exists("out:A1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanchored_constraint_still_refuses_a_param_it_matches_only_in_part() {
    let mut rig = Rig::start(
        r#"
[[routes]]
name = "tested"
topic = "sensors/{device_id}/data"
params.device_id = "[a-z0-9]+"
[[routes.actions]]
op = "set"
key = "sensor:{device_id}:latest"
"#,
    )
    .await;
    let since = now_ms();
    // `*` is an ordinary character in a published topic level.
    rig.publish("sensors/ab:c*/data", "{}").await;
    rig.publish("sensors/abc1/data", "{}").await;
    assert_eq!(rig.text("sensor:abc1:latest").await, "{}");
    let record = the_dead_letter(&mut rig, "sensors/ab:c*/data", "invalid_param", since).await;
    assert!(
        record["detail"]
            .as_str()
            .is_some_and(|d| d.contains("[a-z0-9]+") && !d.contains("(?:")),
        "the operator's pattern, as written: {record}"
    );
    assert!(!rig.exists("sensor:ab:c*:latest"));
    let keys: Vec<String> = rig.conn.keys("sensor:*").expect("KEYS");
    assert_eq!(keys, ["sensor:abc1:latest"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsafe_json_value_in_a_key_is_dead_lettered_as_invalid_param() {
    let mut rig = Rig::start(
        r#"
[[routes]]
name = "tested"
topic = "d/{id}"
[[routes.actions]]
op = "set"
key = "out:{json.k}"
"#,
    )
    .await;
    let since = now_ms();
    rig.publish("d/a", r#"{"k":"x:*"}"#).await;
    rig.publish("d/a", r#"{"k":"good"}"#).await;
    assert_eq!(rig.text("out:good").await, r#"{"k":"good"}"#);
    the_dead_letter(&mut rig, "d/a", "invalid_param", since).await;
    let keys: Vec<String> = rig.conn.keys("out:*").expect("KEYS");
    assert_eq!(keys, ["out:good"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_field_missing_from_the_payload_is_dead_lettered() {
    let mut rig = Rig::start(&tested("", "{json.t}")).await;
    let since = now_ms();
    rig.publish("d/a", r#"{"x":1}"#).await;
    rig.publish("d/a", r#"{"t":3}"#).await;
    assert_eq!(rig.text("out:a").await, "3");
    let record = the_dead_letter(&mut rig, "d/a", "missing_field", since).await;
    assert!(
        record["detail"]
            .as_str()
            .is_some_and(|d| d.contains("json.t")),
        "{record}"
    );
    assert_eq!(record["payload"], r#"{"x":1}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrongtype_fails_the_message_with_redis_quoted_and_the_topic_keeps_flowing() {
    let mut rig = Rig::start_with(
        r#"
[[routes]]
name = "tested"
topic = "d/{id}"
[[routes.actions]]
op = "lpush"
key = "l:{json.k}"
"#,
        |c| {
            let () = c.set("l:bad", "a string").expect("SET");
        },
    )
    .await;
    let since = now_ms();
    rig.publish("d/a", r#"{"k":"bad"}"#).await;
    rig.publish("d/a", r#"{"k":"good"}"#).await;
    let conn = &mut rig.conn;
    let good = crate::bridge::eventually(WAIT, || {
        let l: Vec<String> = conn.lrange("l:good", 0, -1).ok()?;
        (!l.is_empty()).then_some(l)
    })
    .await;
    assert_eq!(good, Some(vec![r#"{"k":"good"}"#.to_string()]));
    let record = the_dead_letter(&mut rig, "d/a", "redis_error", since).await;
    assert!(
        record["detail"]
            .as_str()
            .is_some_and(|d| d.contains("WRONGTYPE")),
        "detail quotes Redis: {record}"
    );
    assert_eq!(rig.text("l:bad").await, "a string");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_message_whose_first_attempt_failed_is_processed_not_a_duplicate() {
    let mut rig = Rig::start_with(
        r#"
[[routes]]
name = "tested"
topic = "d/{id}"
dedup = { key = "dedup:{id}:{json.seq}", ttl = "10m" }
[[routes.actions]]
op = "rpush"
key = "list:{id}"
"#,
        |c| {
            let () = c.set("list:a", "a string").expect("SET");
        },
    )
    .await;
    let since = now_ms();
    let message = r#"{"seq":1}"#;
    rig.publish("d/a", message).await;
    the_dead_letter(&mut rig, "d/a", "redis_error", since).await;
    assert!(!rig.exists("dedup:a:1"), "no `done` (nor lease) left");
    // The operator fixes the key; the same message comes again (same dedup key).
    let _: i64 = rig.conn.del("list:a").expect("DEL");
    rig.publish("d/a", message).await;
    let conn = &mut rig.conn;
    let list = crate::bridge::eventually(WAIT, || {
        let l: Vec<String> = conn.lrange("list:a", 0, -1).ok()?;
        (!l.is_empty()).then_some(l)
    })
    .await;
    assert_eq!(list, Some(vec![message.to_string()]));
    assert_done(&mut rig, "dedup:a:1").await;
    // And now it is a duplicate.
    rig.publish("d/a", message).await;
    rig.publish("d/a", r#"{"seq":2}"#).await;
    let conn = &mut rig.conn;
    let list = crate::bridge::eventually(WAIT, || {
        let l: Vec<String> = conn.lrange("list:a", 0, -1).ok()?;
        (l.len() >= 2).then_some(l)
    })
    .await;
    assert_eq!(
        list,
        Some(vec![message.to_string(), r#"{"seq":2}"#.to_string()])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrongtype_fails_the_message_on_a_non_atomic_route_too() {
    let mut rig = Rig::start_with(
        r#"
[[routes]]
name = "tested"
topic = "d/{id}"
atomic = false
dedup = { key = "dedup:{json.k}" }
[[routes.actions]]
op = "lpush"
key = "l:{json.k}"
"#,
        |c| {
            let () = c.set("l:bad", "a string").expect("SET");
        },
    )
    .await;
    let since = now_ms();
    rig.publish("d/a", r#"{"k":"bad"}"#).await;
    let record = the_dead_letter(&mut rig, "d/a", "redis_error", since).await;
    assert!(
        record["detail"]
            .as_str()
            .is_some_and(|d| d.contains("WRONGTYPE")),
        "detail quotes Redis: {record}"
    );
    assert!(!rig.exists("dedup:bad"), "the dedup claim is released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_invalid_on_two_routes_gives_one_record_per_route() {
    let mut rig = Rig::start(
        r#"
[[routes]]
name = "first"
topic = "d/{id}"
[[routes.actions]]
op = "set"
key = "first:{id}"

[[routes]]
name = "second"
topic = "d/+"
[[routes.actions]]
op = "set"
key = "second"
"#,
    )
    .await;
    rig.publish("d/a", "{nope").await;
    let conn = &mut rig.conn;
    let two = crate::bridge::eventually(WAIT, || {
        let n: usize = conn.llen("dead_letter").ok()?;
        (n >= 2).then_some(n)
    })
    .await;
    assert_eq!(two, Some(2), "log:\n{}", rig.bridge.log_text());
    let mut routes: Vec<String> = rig
        .dead_letters()
        .iter()
        .map(|r| {
            assert_eq!(r["reason"], "invalid_json");
            r["route"].as_str().expect("route").to_string()
        })
        .collect();
    routes.sort();
    assert_eq!(routes, ["first", "second"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_text_payload_is_cut_on_a_character_boundary_and_stays_text() {
    let mut rig = Rig::start(&format!(
        "[limits]\nmax_payload = \"2KiB\"\n{}",
        tested("payload = \"text\"", "{payload}")
    ))
    .await;
    let since = now_ms();
    // One ASCII byte, then two-byte characters: byte 1024 falls inside a character.
    let big = format!("x{}", "é".repeat(2000));
    rig.publish("d/a", big.clone()).await;
    let record = the_dead_letter(&mut rig, "d/a", "payload_too_large", since).await;
    let payload = record["payload"]
        .as_str()
        .expect("text payload, not base64");
    assert!(big.starts_with(payload));
    assert!((1023..=1024).contains(&payload.len()), "{}", payload.len());
    assert_eq!(record["truncated"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_field_missing_from_the_session_is_dead_lettered() {
    let mut rig = Rig::start_with(
        &tested(
            "session = { key = \"session:{id}\", required = true }",
            "{session.role}",
        ),
        |c| {
            let () = c.set("session:a", r#"{"user":"ann"}"#).expect("SET");
            let () = c
                .set("session:b", r#"{"user":"bob","role":"admin"}"#)
                .expect("SET");
        },
    )
    .await;
    let since = now_ms();
    rig.publish("d/a", "{}").await;
    rig.publish("d/b", "{}").await;
    assert_eq!(rig.text("out:b").await, "admin");
    let record = the_dead_letter(&mut rig, "d/a", "missing_field", since).await;
    assert!(
        record["detail"]
            .as_str()
            .is_some_and(|d| d.contains("session.role")),
        "{record}"
    );
    assert!(!rig.exists("out:a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_message_is_not_forwarded_over_mqtt() {
    let mut rig = Rig::start_with(
        r#"
[[routes]]
name = "tested"
topic = "d/{id}"
[[routes.actions]]
op = "lpush"
key = "l:{json.k}"
[[routes.actions]]
op = "mqtt_publish"
topic = "out/{json.k}"
"#,
        |c| {
            let () = c.set("l:bad", "a string").expect("SET");
        },
    )
    .await;
    let mut listener = crate::bridge::Client::connect(&rig.broker, "listener").await;
    listener.subscribe("out/#").await;
    crate::bridge_actions::subscribed(&mut rig, &mut listener, "out/probe").await;
    rig.publish("d/a", r#"{"k":"bad"}"#).await;
    rig.publish("d/a", r#"{"k":"good"}"#).await;
    // Messages of one topic are handled in order: the first forward to arrive tells.
    let first = loop {
        let m = listener.next_message(WAIT).await.expect("a forward");
        if m.topic != "out/probe" {
            break m;
        }
    };
    assert_eq!(first.topic, "out/good");
    assert_eq!(rig.dead_letters().len(), 1);
}
