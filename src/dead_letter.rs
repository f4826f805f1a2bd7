//! The dead letter (spec §5.3): `invalid` and `failed` messages are kept in a Redis list,
//! newest first, one JSON record per route, so nothing fails silently and an operator can
//! look at what was refused and why.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::outcome::Reason;

/// Payloads above this are cut in the record (`"truncated": true`) for `payload_too_large`.
pub const TRUNCATE_AT: usize = 1024;

/// The record for one refused message on one route.
pub fn record(topic: &str, route: &str, reason: Reason, detail: &str, payload: &[u8]) -> String {
    let ts_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let truncated = reason == Reason::PayloadTooLarge && payload.len() > TRUNCATE_AT;
    let payload = if truncated {
        &payload[..TRUNCATE_AT]
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

/// LPUSH + LTRIM of `record` onto `list`, keeping the newest `max_len`.
pub fn push(pipe: &mut ::redis::Pipeline, list: &str, max_len: u64, record: &str) {
    pipe.cmd("LPUSH").arg(list).arg(record).ignore();
    let last = i64::try_from(max_len.max(1)).unwrap_or(i64::MAX) - 1;
    pipe.cmd("LTRIM").arg(list).arg(0).arg(last).ignore();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_payloads_are_base64_and_large_ones_truncated() {
        let rec: Value =
            serde_json::from_str(&record("t", "r", Reason::InvalidUtf8, "d", &[0xff, 0xfe]))
                .unwrap();
        assert_eq!(rec["payload_b64"], "//4=");
        assert_eq!(rec["reason"], "invalid_utf8");
        let big = vec![b'x'; 5000];
        let rec: Value =
            serde_json::from_str(&record("t", "r", Reason::PayloadTooLarge, "d", &big)).unwrap();
        assert_eq!(rec["payload"].as_str().unwrap().len(), TRUNCATE_AT);
        assert_eq!(rec["truncated"], true);
    }
}
