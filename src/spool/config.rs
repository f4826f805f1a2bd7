//! `[spool]` (spec §6.2): where the spool lives, how large it may grow, what happens when it
//! is full, and how often it reaches the disk. Read beside the code that uses it, validated
//! when the config loads, every error naming its key path (`spool.max_size`, …).
//!
//! The section's presence turns the spool on: without `[spool]` (and without any
//! `ROUTEMQ_BRIDGE_SPOOL__*` variable) nothing of it runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::reader::{Size, Table};

/// The file name of the spool under `$STATE_DIRECTORY` when `path` is not given.
pub const DEFAULT_FILE: &str = "spool.db";

/// What to do with a new message when the spool holds `max_size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFull {
    /// Stop acking: the message waits (unacked), the broker holds the rest.
    Backpressure,
    /// Make room by dropping the oldest spooled messages; each is counted and its topic and
    /// arrival time are dead-lettered once Redis is back.
    DropOldest,
}

/// When a spooled message reaches the disk (fsync).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsync {
    /// Before its ack: nothing acked is lost on power loss. Appends arriving together share
    /// one fsync (group commit).
    Always,
    /// At most `batch_window` after its ack: up to that much of acked messages is at risk
    /// on power loss (never on a crash of the process: the write is in the kernel already).
    Batch,
}

/// `[spool]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpoolConfig {
    /// The SQLite file; `-wal` and `-shm` files sit beside it.
    pub path: PathBuf,
    /// Bytes of spooled messages (topic + payload + a fixed overhead per record) at most.
    pub max_size: u64,
    pub on_full: OnFull,
    pub fsync: Fsync,
    pub batch_window: Duration,
    /// How long Redis must have been unable to take writes before messages spill.
    pub after: Duration,
}

impl SpoolConfig {
    pub const DEFAULT_MAX_SIZE: u64 = 256 * 1024 * 1024;
    pub const DEFAULT_BATCH_WINDOW: Duration = Duration::from_millis(50);
    pub const DEFAULT_AFTER: Duration = Duration::from_secs(5);

    /// Reads `[spool]`; `state_directory` is systemd's `$STATE_DIRECTORY` (the first of its
    /// entries is the default home of the file).
    pub(crate) fn read(mut t: Table<'_>, state_directory: Option<&str>) -> Option<SpoolConfig> {
        let path = t.path_buf("path");
        let path = match path {
            Some(path) => Some(path),
            None if t.has("path") => None, // its error is recorded
            None => match default_path(state_directory) {
                Some(path) => Some(path),
                None => {
                    t.error(
                        "path",
                        "required when $STATE_DIRECTORY is not set (systemd sets it from the \
                         unit's StateDirectory=, and the spool then lives in spool.db there); \
                         give a file on local, persistent storage",
                    );
                    None
                }
            },
        };
        let max_size = t
            .parse("max_size", |n: Size| {
                if n.0 < 64 * 1024 {
                    Err(format!("must be at least \"64KiB\", found {} bytes", n.0))
                } else {
                    Ok(n.0)
                }
            })
            .unwrap_or(Self::DEFAULT_MAX_SIZE);
        let on_full = t.choice(
            "on_full",
            &[
                ("backpressure", OnFull::Backpressure),
                ("drop_oldest", OnFull::DropOldest),
            ],
            OnFull::Backpressure,
        );
        let fsync = t.choice(
            "fsync",
            &[("always", Fsync::Always), ("batch", Fsync::Batch)],
            Fsync::Batch,
        );
        let batch_window = t.positive_duration("batch_window", Self::DEFAULT_BATCH_WINDOW);
        let after = t.duration("after", Self::DEFAULT_AFTER);
        t.finish();
        Some(SpoolConfig {
            path: path?,
            max_size,
            on_full,
            fsync,
            batch_window,
            after,
        })
    }

    /// One line for `check` and the start-up log.
    pub fn describe(&self) -> String {
        format!(
            "spool {} (max_size {} bytes, on_full {}, fsync {}{}, after {})",
            self.path.display(),
            self.max_size,
            match self.on_full {
                OnFull::Backpressure => "backpressure",
                OnFull::DropOldest => "drop_oldest",
            },
            match self.fsync {
                Fsync::Always => "always",
                Fsync::Batch => "batch",
            },
            match self.fsync {
                Fsync::Always => String::new(),
                Fsync::Batch => format!(" every {}", humantime::format_duration(self.batch_window)),
            },
            humantime::format_duration(self.after)
        )
    }
}

/// `spool.db` in the first entry of `$STATE_DIRECTORY` (systemd may list several, `:`
/// separated, when the unit names several directories).
fn default_path(state_directory: Option<&str>) -> Option<PathBuf> {
    let first = state_directory?.split(':').next()?;
    (!first.is_empty()).then(|| Path::new(first).join(DEFAULT_FILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_path_is_the_first_state_directory() {
        assert_eq!(
            default_path(Some("/var/lib/routemq-bridge:/var/lib/other")),
            Some(PathBuf::from("/var/lib/routemq-bridge/spool.db"))
        );
        assert_eq!(default_path(Some("")), None);
        assert_eq!(default_path(None), None);
    }
}
