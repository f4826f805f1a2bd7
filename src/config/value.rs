//! Conversions of one config value into a typed value, with a message for the operator when
//! it does not fit: strings, secrets, booleans, integers, floats, durations, sizes, lists.
//!
//! Kept apart from the [`Table`](super::reader::Table) reader because they know nothing of
//! tables, key paths or error collection: a conversion sees one value and says what it
//! expected. Strings (as every environment variable is) are parsed into numbers, booleans and
//! so on, so a variable and a TOML key accept the same things.

use std::time::Duration;

use figment::value::{Num, Value};

use super::Secret;

/// Conversion of one config value, with a message for the operator when it does not fit.
/// Strings (as every environment variable is) are parsed into numbers, booleans and so on.
pub trait FromValue: Sized {
    fn from_value(value: &Value) -> Result<Self, String>;
}

/// What was found, for messages: the value itself for scalars.
pub fn found(value: &Value) -> String {
    match value {
        Value::String(_, s) => format!("{s:?}"),
        Value::Char(_, c) => format!("{:?}", c.to_string()),
        Value::Bool(_, b) => format!("boolean {b}"),
        Value::Num(_, n) => format!("number {}", num_text(n)),
        Value::Empty(..) => "nothing".to_string(),
        Value::Dict(..) => "a table".to_string(),
        Value::Array(..) => "an array".to_string(),
    }
}

/// What kind of value was found, without the value (for secrets).
fn kind(value: &Value) -> &'static str {
    match value {
        Value::String(..) | Value::Char(..) => "a string",
        Value::Bool(..) => "a boolean",
        Value::Num(..) => "a number",
        Value::Empty(..) => "nothing",
        Value::Dict(..) => "a table",
        Value::Array(..) => "an array",
    }
}

fn num_int(n: &Num) -> Option<i128> {
    n.to_i128()
        .or_else(|| n.to_u128().and_then(|u| i128::try_from(u).ok()))
}

fn num_text(n: &Num) -> String {
    match (num_int(n), n.to_f64()) {
        (Some(i), _) => i.to_string(),
        (None, Some(f)) => format!("{f:?}"),
        (None, None) => format!("{n:?}"),
    }
}

impl FromValue for String {
    fn from_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::String(_, s) => Ok(s.clone()),
            Value::Char(_, c) => Ok(c.to_string()),
            other => Err(format!("expected a string, found {}", found(other))),
        }
    }
}

impl FromValue for Secret {
    fn from_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::String(_, s) => Ok(Secret::new(s.clone())),
            Value::Char(_, c) => Ok(Secret::new(c.to_string())),
            // Never echo what was found: it may be the secret.
            Value::Num(..) => Err("expected a string, found a number (quote it)".to_string()),
            other => Err(format!("expected a string, found {}", kind(other))),
        }
    }
}

/// `true/false/1/0/yes/no/on/off` in any case, as the seed's `ENABLE_REDIS` accepts.
pub fn parse_bool(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

impl FromValue for bool {
    fn from_value(value: &Value) -> Result<Self, String> {
        let parsed = match value {
            Value::Bool(_, b) => Some(*b),
            Value::String(_, s) => parse_bool(s),
            Value::Num(_, n) => match num_int(n) {
                Some(0) => Some(false),
                Some(1) => Some(true),
                _ => None,
            },
            _ => None,
        };
        parsed.ok_or_else(|| {
            format!(
                "expected a boolean (true/false, yes/no, on/off, 1/0), found {}",
                found(value)
            )
        })
    }
}

fn integer(value: &Value) -> Result<i128, String> {
    match value {
        Value::Num(_, n) => num_int(n),
        Value::String(_, s) => s.trim().parse::<i128>().ok(),
        _ => None,
    }
    .ok_or_else(|| format!("expected an integer, found {}", found(value)))
}

macro_rules! integer_from_value {
    ($($t:ty),*) => {$(
        impl FromValue for $t {
            fn from_value(value: &Value) -> Result<Self, String> {
                let n = integer(value)?;
                <$t>::try_from(n).map_err(|_| {
                    format!(
                        "expected an integer from {} to {}, found {n}",
                        <$t>::MIN,
                        <$t>::MAX
                    )
                })
            }
        }
    )*};
}

integer_from_value!(u16, u32, u64, usize, i64, i128);

impl FromValue for f64 {
    fn from_value(value: &Value) -> Result<Self, String> {
        let parsed = match value {
            Value::Num(_, n) => n.to_f64().or_else(|| num_int(n).map(|i| i as f64)),
            Value::String(_, s) => s.trim().parse::<f64>().ok(),
            _ => None,
        };
        parsed
            .filter(|f| f.is_finite())
            .ok_or_else(|| format!("expected a number, found {}", found(value)))
    }
}

/// The longest duration any key takes. Far beyond any sane timeout, TTL or lease, and far
/// below what overflows where durations are used: doubled in backoff, added to `Instant`s,
/// sent to Redis as milliseconds (`PX`) in a `u64`.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

impl FromValue for Duration {
    fn from_value(value: &Value) -> Result<Self, String> {
        let duration = duration_from_value(value)?;
        if duration > MAX_DURATION {
            return Err(format!(
                "must be at most 10 years ({}), found {}",
                humantime::format_duration(MAX_DURATION),
                humantime::format_duration(duration)
            ));
        }
        Ok(duration)
    }
}

fn duration_from_value(value: &Value) -> Result<Duration, String> {
    let expected = || {
        format!(
            "expected a duration such as \"250ms\", \"30s\", \"1h 30m\" or a number of \
             seconds, found {}",
            found(value)
        )
    };
    let seconds = |s: f64| Duration::try_from_secs_f64(s).map_err(|_| expected());
    match value {
        Value::Num(_, n) => match (num_int(n), n.to_f64()) {
            (Some(i), _) => seconds(i as f64),
            (None, Some(f)) => seconds(f),
            (None, None) => Err(expected()),
        },
        Value::String(_, s) => {
            let s = s.trim();
            match s.parse::<f64>() {
                Ok(f) => seconds(f),
                Err(_) => humantime::parse_duration(s).map_err(|_| expected()),
            }
        }
        _ => Err(expected()),
    }
}

/// A size in bytes: `"256KiB"`, `"1MiB"`, `"1MB"`, or a number of bytes.
fn size_from_value(value: &Value) -> Result<u64, String> {
    let expected = || {
        format!(
            "expected a size such as \"256KiB\", \"1MiB\" or a number of bytes, found {}",
            found(value)
        )
    };
    match value {
        Value::Num(_, n) => num_int(n)
            .and_then(|i| u64::try_from(i).ok())
            .ok_or_else(expected),
        Value::String(_, s) => s
            .trim()
            .parse::<bytesize::ByteSize>()
            .map(|b| b.0)
            .map_err(|_| expected()),
        _ => Err(expected()),
    }
}

/// A size in bytes, for `parse` checks on sizes (`t.parse("max", |s: Size| ...)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub u64);

impl FromValue for Size {
    fn from_value(value: &Value) -> Result<Self, String> {
        size_from_value(value).map(Size)
    }
}

impl FromValue for Vec<String> {
    fn from_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::Array(_, items) => items
                .iter()
                .enumerate()
                .map(|(i, item)| match item {
                    Value::String(_, s) => Ok(s.clone()),
                    other => Err(format!(
                        "expected a list of strings, item {i} is {}",
                        found(other)
                    )),
                })
                .collect(),
            Value::String(_, s) => Ok(s
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()),
            other => Err(format!(
                "expected a list of strings, found {}",
                found(other)
            )),
        }
    }
}
