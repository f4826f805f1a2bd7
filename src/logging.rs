//! Logs through `tracing` (spec §8): human text on a terminal, journald-friendly lines under
//! systemd (no timestamps — journald stamps them — and no colours), JSON on request. The
//! level comes from `RUST_LOG` when set, else `[log] level`; it can be changed on reload
//! ([`set_level`]). The format is fixed at start (changing it needs a restart).
//!
//! Secrets stay out of the logs by construction: passwords are [`crate::config::Secret`]s,
//! whose `Debug` and `Display` print `<redacted>`, and the only way to the value is
//! `Secret::expose`, used where a client library takes it and never in a log line.

use std::sync::OnceLock;

use tracing_subscriber::filter::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Registry;

use crate::config::{LogConfig, LogFormat};

/// The handle of the installed subscriber, for [`set_level`].
static HANDLE: OnceLock<LogHandle> = OnceLock::new();

/// Changes the level of the running daemon (SIGHUP), unless `RUST_LOG` pins it or logging
/// was not initialised by [`init`].
pub fn set_level(level: &str) {
    if let Some(handle) = HANDLE.get() {
        handle.set_level(level);
    }
}

/// Changes the level of a running daemon (SIGHUP), unless `RUST_LOG` pins it.
#[derive(Clone)]
pub struct LogHandle {
    filter: reload::Handle<EnvFilter, Registry>,
    pinned: bool,
}

impl LogHandle {
    pub fn set_level(&self, level: &str) {
        if self.pinned {
            tracing::debug!(
                level,
                "RUST_LOG is set and pins the log level; [log] level ignored"
            );
            return;
        }
        match EnvFilter::try_new(level) {
            Ok(filter) => {
                let _ = self.filter.reload(filter);
            }
            Err(e) => tracing::warn!(level, error = %e, "invalid log level; keeping the old one"),
        }
    }
}

fn filter_for(level: &str) -> (EnvFilter, bool) {
    match std::env::var("RUST_LOG") {
        Ok(env) if !env.trim().is_empty() => (
            EnvFilter::try_new(&env).unwrap_or_else(|_| EnvFilter::new("info")),
            true,
        ),
        _ => (
            EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info")),
            false,
        ),
    }
}

/// Installs the global subscriber. Call once, early.
pub fn init(config: &LogConfig) -> LogHandle {
    let (filter, pinned) = filter_for(&config.level);
    let (filter, handle) = reload::Layer::new(filter);
    let under_systemd = std::env::var_os("JOURNAL_STREAM").is_some();
    let format = match config.format {
        LogFormat::Auto if under_systemd => LogFormat::Journald,
        LogFormat::Auto => LogFormat::Text,
        other => other,
    };
    let registry = tracing_subscriber::registry().with(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).try_init(),
        LogFormat::Journald => registry
            .with(fmt.without_time().with_ansi(false).with_target(false))
            .try_init(),
        _ => registry
            .with(fmt.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())))
            .try_init(),
    };
    let handle = LogHandle {
        filter: handle,
        pinned,
    };
    let _ = HANDLE.set(handle.clone());
    handle
}
