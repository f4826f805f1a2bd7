//! The dead letter (spec §5.3): `invalid` and `failed` messages are kept in a Redis list,
//! newest first, one JSON record per route, so nothing fails silently and an operator can
//! look at what was refused and why.
//!
//! A record is written before its message is acked (the engine retries a refused or failed
//! write like any other), and keeps at most `[dead_letter] max_payload` bytes of the
//! payload, so a flood of large bad messages cannot fill Redis — which would then refuse
//! every write (`OOM`).

use std::future::Future;
use std::pin::Pin;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::config::reader::{Size, Table};
use crate::outcome::Reason;

/// Payloads above this are cut in the record (`"truncated": true`) for `payload_too_large`.
pub const TRUNCATE_AT: usize = 1024;

/// The default of `[dead_letter] max_payload`.
pub const DEFAULT_MAX_PAYLOAD: usize = 64 * 1024;

/// Somewhere to keep dead-letter records while Redis cannot take them: the local spool
/// (spec §6.2). Without one, a record waits for Redis, and so does its message's ack — and,
/// acks leaving in arrival order, every later message's: during a long outage one invalid
/// message would hold back everything the spool took.
pub trait Keeper: Send + Sync {
    /// Resolves once records should be kept rather than waited for.
    fn spilling(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
    /// Keeps `record` until Redis is back; `false` when it could not (the caller waits for
    /// Redis then).
    fn keep(
        &self,
        reason: Reason,
        record: String,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + '_>>;
}

/// Where refused messages are recorded (`[dead_letter]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    pub list: String,
    /// How many records the list keeps, newest first.
    pub max_len: u64,
    /// How much of a payload a record keeps.
    pub max_payload: usize,
}

impl DeadLetter {
    /// The record for one refused message on one route.
    pub fn record(
        &self,
        topic: &str,
        route: &str,
        reason: Reason,
        detail: &str,
        payload: &[u8],
    ) -> String {
        record(topic, route, reason, detail, payload, self.max_payload)
    }

    /// The record of a message of which only `head` was kept (an oversized publish skipped
    /// as it streamed in): `"truncated": true` whatever `head`'s length.
    pub fn record_of_head(
        &self,
        topic: &str,
        route: &str,
        reason: Reason,
        detail: &str,
        head: &[u8],
    ) -> String {
        build(topic, route, reason, detail, head, self.max_payload, true)
    }

    /// Adds the LPUSH + LTRIM of `record` to `pipe`.
    pub fn push(&self, pipe: &mut ::redis::Pipeline, record: &str) {
        push(pipe, &self.list, self.max_len, record);
    }
}

/// The record for one refused message on one route, keeping at most `max_payload` bytes of
/// its payload (at most [`TRUNCATE_AT`] for `payload_too_large`).
pub fn record(
    topic: &str,
    route: &str,
    reason: Reason,
    detail: &str,
    payload: &[u8],
    max_payload: usize,
) -> String {
    build(topic, route, reason, detail, payload, max_payload, false)
}

/// [`record`], with `cut_before` when `payload` is already only a part of the message's.
fn build(
    topic: &str,
    route: &str,
    reason: Reason,
    detail: &str,
    payload: &[u8],
    max_payload: usize,
    cut_before: bool,
) -> String {
    let ts_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let limit = if reason == Reason::PayloadTooLarge {
        TRUNCATE_AT.min(max_payload)
    } else {
        max_payload
    };
    let cut_here = payload.len() > limit;
    let truncated = cut_here || cut_before;
    let payload = if cut_here {
        &payload[..cut_at(payload, limit)]
    } else {
        payload
    };
    let mut record = json!({
        "ts_ms": ts_ms,
        "topic": topic,
        "route": route,
        "reason": reason.as_str(),
        "detail": detail,
    });
    if let Value::Object(map) = &mut record {
        match std::str::from_utf8(payload) {
            Ok(text) => map.insert("payload".into(), Value::String(text.to_string())),
            Err(_) => map.insert(
                "payload_b64".into(),
                Value::String(base64::engine::general_purpose::STANDARD.encode(payload)),
            ),
        };
        if truncated {
            map.insert("truncated".into(), Value::Bool(true));
        }
    }
    record.to_string()
}

/// Where to cut a payload over `limit`: a text payload on the last character boundary at or
/// before it, so the record still shows text rather than base64 of a cut character; other
/// bytes at exactly `limit`.
fn cut_at(payload: &[u8], limit: usize) -> usize {
    if std::str::from_utf8(payload).is_err() {
        return limit;
    }
    // A UTF-8 character starts at any byte that is not a continuation byte (0b10xx_xxxx).
    (0..=limit)
        .rev()
        .find(|&i| payload.get(i).is_none_or(|b| (*b as i8) >= -0x40))
        .unwrap_or(0)
}

/// LPUSH + LTRIM of `record` onto `list`, keeping the newest `max_len`.
pub fn push(pipe: &mut ::redis::Pipeline, list: &str, max_len: u64, record: &str) {
    pipe.cmd("LPUSH").arg(list).arg(record).ignore();
    let last = i64::try_from(max_len.max(1)).unwrap_or(i64::MAX) - 1;
    pipe.cmd("LTRIM").arg(list).arg(0).arg(last).ignore();
}

/// `[dead_letter]`: where `invalid` and `failed` messages are kept (LPUSH + LTRIM).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetterConfig {
    pub redis_list: String,
    /// How many records are kept, newest first.
    pub max_len: u64,
    /// How much of a payload a record keeps (spec §5.3).
    pub max_payload: u64,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        DeadLetterConfig {
            redis_list: "routemq-bridge:dead_letter".to_string(),
            max_len: 10_000,
            max_payload: DEFAULT_MAX_PAYLOAD as u64,
        }
    }
}

impl DeadLetterConfig {
    pub(crate) fn read(mut t: Table<'_>) -> DeadLetterConfig {
        let d = DeadLetterConfig::default();
        let redis_list = t.non_empty_string("redis_list", &d.redis_list);
        let max_len = t.at_least("max_len", 1, d.max_len);
        let max_payload = t
            .parse("max_payload", |n: Size| Ok::<_, String>(n.0))
            .unwrap_or(d.max_payload);
        t.finish();
        DeadLetterConfig {
            redis_list,
            max_len,
            max_payload,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_payloads_are_base64_and_large_ones_truncated() {
        let rec: Value = serde_json::from_str(&record(
            "t",
            "r",
            Reason::InvalidUtf8,
            "d",
            &[0xff, 0xfe],
            64,
        ))
        .unwrap();
        assert_eq!(rec["payload_b64"], "//4=");
        assert_eq!(rec["reason"], "invalid_utf8");
        let big = vec![b'x'; 5000];
        let rec: Value = serde_json::from_str(&record(
            "t",
            "r",
            Reason::PayloadTooLarge,
            "d",
            &big,
            64 * 1024,
        ))
        .unwrap();
        assert_eq!(rec["payload"].as_str().unwrap().len(), TRUNCATE_AT);
        assert_eq!(rec["truncated"], true);
    }

    #[test]
    fn large_text_payloads_are_cut_on_a_character_boundary() {
        // Byte 1024 is the second byte of an `é`.
        let text = format!("x{}", "é".repeat(1000));
        let rec: Value = serde_json::from_str(&record(
            "t",
            "r",
            Reason::PayloadTooLarge,
            "d",
            text.as_bytes(),
            DEFAULT_MAX_PAYLOAD,
        ))
        .unwrap();
        let cut = rec["payload"].as_str().expect("still text");
        assert_eq!(cut.len(), TRUNCATE_AT - 1);
        assert!(text.starts_with(cut));
        assert_eq!(rec["truncated"], true);
    }

    #[test]
    fn any_record_keeps_at_most_max_payload() {
        let big = vec![b'x'; 5000];
        let rec: Value =
            serde_json::from_str(&record("t", "r", Reason::InvalidJson, "d", &big, 100)).unwrap();
        assert_eq!(rec["payload"].as_str().unwrap().len(), 100);
        assert_eq!(rec["truncated"], true);
        let binary = vec![0xff; 5000];
        let rec: Value =
            serde_json::from_str(&record("t", "r", Reason::InvalidUtf8, "d", &binary, 100))
                .unwrap();
        assert_eq!(rec["payload_b64"].as_str().unwrap().len(), 136); // 100 bytes in base64
        let small: Value =
            serde_json::from_str(&record("t", "r", Reason::InvalidJson, "d", b"abc", 100)).unwrap();
        assert_eq!(small["payload"], "abc");
        assert!(small.get("truncated").is_none());
    }
}
