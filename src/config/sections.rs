//! The small sections of the config file: `[http]`, `[limits]`, `[log]`.
//!
//! Each is a few scalars with defaults from the spec's example (§4); they live together
//! because none has code of its own large enough to sit beside.

use std::net::SocketAddr;
use std::time::Duration;

use figment::value::Value;

use super::reader::{found, FromValue, Size, Table};

/// `[http]`: where `/metrics`, `/healthz` and `/readyz` are served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpConfig {
    pub listen: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9883)),
        }
    }
}

impl HttpConfig {
    pub(crate) fn read(mut t: Table<'_>) -> HttpConfig {
        let d = HttpConfig::default();
        let listen = t
            .parse("listen", |s: String| {
                s.trim().parse::<SocketAddr>().map_err(|_| {
                    format!(
                        "expected an address and port such as \"127.0.0.1:9883\" or \
                         \"[::]:9883\", found {s:?}"
                    )
                })
            })
            .unwrap_or(d.listen);
        t.finish();
        HttpConfig { listen }
    }
}

/// `[limits]`: how much the bridge holds at once, and how long it may take to stop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Messages received but not yet acked, all routes together.
    pub max_inflight: usize,
    /// Larger payloads end in outcome `invalid` (`payload_too_large`).
    pub max_payload: u64,
    /// On SIGTERM, how long in-flight messages may take before we disconnect anyway.
    pub shutdown_timeout: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_inflight: 1000,
            max_payload: 256 * 1024,
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

impl LimitsConfig {
    pub(crate) fn read(mut t: Table<'_>) -> LimitsConfig {
        let d = LimitsConfig::default();
        let max_inflight = t.at_least("max_inflight", 1, d.max_inflight);
        let max_payload = t
            .parse("max_payload", |n: Size| {
                if n.0 == 0 {
                    Err("must be larger than 0 bytes".to_string())
                } else {
                    Ok(n.0)
                }
            })
            .unwrap_or(d.max_payload);
        let shutdown_timeout = t.duration("shutdown_timeout", d.shutdown_timeout);
        t.finish();
        LimitsConfig {
            max_inflight,
            max_payload,
            shutdown_timeout,
        }
    }
}

/// `[log] format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Text on a terminal; journald style when `JOURNAL_STREAM` says we run under systemd.
    #[default]
    Auto,
    Text,
    /// No timestamps (journald adds them), level prefixes journald understands.
    Journald,
    Json,
}

impl FromValue for LogFormat {
    fn from_value(value: &Value) -> Result<Self, String> {
        let text = match value {
            Value::String(_, s) => s.trim().to_ascii_lowercase(),
            _ => String::new(),
        };
        match text.as_str() {
            "auto" => Ok(LogFormat::Auto),
            "text" => Ok(LogFormat::Text),
            "journald" => Ok(LogFormat::Journald),
            "json" => Ok(LogFormat::Json),
            _ => Err(format!(
                "expected one of \"auto\", \"text\", \"journald\", \"json\", found {}",
                found(value)
            )),
        }
    }
}

/// `[log]`. `RUST_LOG`, when set, overrides `level` (applied where logging starts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// A `tracing` filter: `info`, or directives like `info,routemq_bridge=debug`.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_string(),
            format: LogFormat::Auto,
        }
    }
}

impl LogConfig {
    pub(crate) fn read(mut t: Table<'_>) -> LogConfig {
        let d = LogConfig::default();
        let level = t
            .parse("level", |level: String| {
                tracing_subscriber::EnvFilter::builder()
                    .parse(&level)
                    .map(|_| level.clone())
                    .map_err(|e| {
                        format!(
                            "expected a level (error, warn, info, debug, trace) or tracing \
                             filter directives, found {level:?} ({e})"
                        )
                    })
            })
            .unwrap_or(d.level);
        let format = t.get("format").unwrap_or(d.format);
        t.finish();
        LogConfig { level, format }
    }
}
