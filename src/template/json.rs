//! JSON as the device sent it (spec §5.1, §5.2): `set_json` stores the payload with only
//! insignificant whitespace removed, and `{json.*}` values (and `hset fields = "json"`'s
//! nested values) keep their numbers' digits and their objects' key order.
//!
//! Two mechanisms, chosen by exactness and by cost on the hot path (every message of a JSON
//! route is parsed once, in the engine):
//!
//! - **The whole payload** (`set_json` without `value`) is not re-serialised at all:
//!   [`compact`] copies the already-validated payload bytes and drops the whitespace between
//!   tokens. That is exact — numbers, key order, duplicate keys and escapes (`\u00e9`, `\/`)
//!   stay byte for byte as received — and cheaper than serialising the parsed value.
//! - **Parts of the payload** come from the parsed `serde_json::Value`, built with serde_json's
//!   `preserve_order` (objects keep the order received) and `arbitrary_precision` (a number
//!   keeps its text, so `123456789012345678901` and `…902` stay two ids, `1.10` stays `1.10`,
//!   `-0.0` stays `-0.0`). serde_json still normalises two things when it writes a part back:
//!   the exponent marker (`1E5` → `1e+5`, `1E-7` → `1e-7`: the same digits and value) and
//!   string escapes (`"caf\u00e9"` → `"café"`: the same string). Neither can make two
//!   different values render the same.
//!
//! Measured per message for a 100-byte sensor payload with 7 fields (release build, best of
//! three runs on the shared 2-core machine; the `json_cost` test below reproduces them):
//!
//! | per message                                  | before  | after   |
//! |----------------------------------------------|---------|---------|
//! | parse into `Value`                           | 0.37 µs | 0.65 µs |
//! | parse + store with `set_json` + `{json.seq}` | 0.74 µs | 0.82 µs |
//!
//! "Before" is default serde_json re-serialising the payload, "after" both features and
//! [`compact`] (~0.07 µs, where re-serialising took ~0.25 µs). Each feature adds ~0.1 µs to
//! the parse (`preserve_order` hashes keys into an `IndexMap`, `arbitrary_precision` keeps
//! each number's text in a `String`). At the 5k messages/s of spec §11 the worst case, a
//! route that parses but does not use `set_json`, costs ~0.15 % of one core.
//!
//! The features are crate-wide (Cargo unifies them): a program using this crate as the Redis
//! library gets them too. serde cannot buffer an `arbitrary_precision` number, so a number
//! inside an `#[serde(untagged)]`, internally tagged or `#[serde(flatten)]` type read with
//! `get_json` fails to decode (serde-rs/json#559); such a field should be a
//! `serde_json::Number` or `Value`. Nothing in this crate deserialises such a type. Also
//! crate-wide: JSON the bridge writes itself (dead-letter records, rate-limit replies, the
//! bench's results) lists its keys in the order the code names them, no longer sorted.

use std::borrow::Cow;
use std::fmt::Write as _;

use serde_json::Value;

/// The JSON text `raw` without insignificant whitespace, every other byte as it was.
///
/// `raw` must be valid JSON (the engine has parsed it); given anything else it still returns
/// without panicking, just not anything meaningful.
pub fn compact(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut in_string = false;
    let mut escaped = false;
    for &byte in raw {
        if in_string {
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
            out.push(byte);
        } else {
            match byte {
                // The four whitespace bytes of RFC 8259; inside strings they are data.
                b' ' | b'\t' | b'\n' | b'\r' => {}
                b'"' => {
                    in_string = true;
                    out.push(byte);
                }
                _ => out.push(byte),
            }
        }
    }
    out
}

/// Strings as they are, everything else as compact JSON (spec §5.1); actions spread JSON
/// the same way.
pub(crate) fn json_text(value: &Value) -> Cow<'_, str> {
    match value {
        Value::String(s) => Cow::Borrowed(s),
        other => Cow::Owned(other.to_string()),
    }
}

/// [`json_text`], appended to `out` without an intermediate copy.
pub(crate) fn push_json_text(out: &mut String, value: &Value) {
    match value {
        Value::String(s) => out.push_str(s),
        other => {
            let _ = write!(out, "{other}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compact_str(raw: &str) -> String {
        String::from_utf8(compact(raw.as_bytes())).expect("UTF-8 in, UTF-8 out")
    }

    #[test]
    fn whitespace_inside_strings_is_data() {
        assert_eq!(
            compact_str("{ \"a b\" : \" x \\t y \" }"),
            "{\"a b\":\" x \\t y \"}"
        );
    }

    #[test]
    fn an_escaped_quote_does_not_end_the_string_but_an_escaped_backslash_does_not_escape() {
        assert_eq!(
            compact_str(r#"[ "a\" , b" , "c\\" , "d\\\" e" , 1 ]"#),
            r#"["a\" , b","c\\","d\\\" e",1]"#
        );
    }

    #[test]
    fn escapes_and_non_ascii_stay_as_written() {
        let raw = r#"{ "e" : "caf\u00e9 café \ud83d\ude00 😀 \/ \b\f\n\r\t" }"#;
        assert_eq!(
            compact_str(raw),
            r#"{"e":"caf\u00e9 café \ud83d\ude00 😀 \/ \b\f\n\r\t"}"#
        );
    }

    #[test]
    fn compact_text_is_the_same_json_value() {
        for raw in [
            "{ \"z\" : [ 1 , 2.50 , -0.0 , 1E-7 ] , \"a\" : { } , \"s\" : \" \\\" \" }",
            "\r\n[ [ ] , { \"k\" : null } ]\t",
        ] {
            let before: Value = serde_json::from_str(raw).expect("JSON");
            let after: Value = serde_json::from_slice(&compact(raw.as_bytes())).expect("JSON");
            assert_eq!(before, after, "{raw}");
        }
    }

    #[test]
    fn parts_keep_digits_and_key_order() {
        let v: Value = serde_json::from_str(
            r#"{"z":1,"big":-123456789012345678901234567890,"f":1.10,"o":{"y":[-0.0,2.50],"x":{}}}"#,
        )
        .expect("JSON");
        assert_eq!(
            json_text(&v),
            r#"{"z":1,"big":-123456789012345678901234567890,"f":1.10,"o":{"y":[-0.0,2.50],"x":{}}}"#
        );
        assert_eq!(json_text(&v["big"]), "-123456789012345678901234567890");
        // The normalisations the module doc owns up to: same digits, same value.
        let v: Value = serde_json::from_str(r#"[1E5, 1E-7, "caf\u00e9"]"#).expect("JSON");
        assert_eq!(json_text(&v), r#"[1e+5,1e-7,"café"]"#);
    }

    #[test]
    fn numbers_still_read_as_numbers() {
        // What the rest of the crate asks of numbers still works with arbitrary_precision.
        let v: Value =
            serde_json::from_str(r#"{"i": 42, "f": 3600.0, "big": 123456789012345678901}"#)
                .expect("JSON");
        assert_eq!(v["i"].as_u64(), Some(42));
        assert_eq!(v["i"].as_i64(), Some(42));
        assert_eq!(v["f"].as_f64(), Some(3600.0));
        assert_eq!(v["big"].as_u64(), None);
        assert!(v["big"].as_f64().is_some());
        assert_eq!(
            serde_json::json!({"w": 1.5, "n": 7}).to_string(),
            r#"{"w":1.5,"n":7}"#
        );
    }

    /// Per-message cost of the JSON work on the hot path, for the module doc's figures:
    /// `cargo test --release --lib json_cost -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn json_cost() {
        use std::hint::black_box;
        use std::time::Instant;
        let payload: &[u8] = br#"{"device":"sensor-042","seq":18273,"ts":1733011200123,"temp":21.37,"hum":48.2,"bat":3.71,"ok":true}"#;
        let n = 1_000_000u32;
        let time = |name: &str, f: &mut dyn FnMut()| {
            for _ in 0..n / 10 {
                f();
            }
            let start = Instant::now();
            for _ in 0..n {
                f();
            }
            let ns = start.elapsed().as_nanos() as f64 / f64::from(n);
            println!("{name:<40} {ns:7.0} ns/message");
        };
        time("parse", &mut || {
            black_box(serde_json::from_slice::<Value>(black_box(payload)).ok());
        });
        time("parse + compact + {json.seq}", &mut || {
            let v: Value = serde_json::from_slice(black_box(payload)).unwrap_or_default();
            let stored = compact(payload);
            let mut key = String::from("dedup:sensor-042:");
            push_json_text(&mut key, &v["seq"]);
            black_box((stored, key));
        });
        time("parse + to_string + {json.seq}", &mut || {
            let v: Value = serde_json::from_slice(black_box(payload)).unwrap_or_default();
            let stored = v.to_string();
            let mut key = String::from("dedup:sensor-042:");
            push_json_text(&mut key, &v["seq"]);
            black_box((stored, key));
        });
        time("compact", &mut || {
            black_box(compact(black_box(payload)));
        });
    }
}
