//! Talking to systemd (spec §9): `Type=notify` readiness, status, reload and stop
//! notifications, and the watchdog.
//!
//! - `READY=1` once MQTT is connected and subscribed, so units ordered after us start when
//!   messages flow; `STATUS=` with counts, refreshed while running (`systemctl status`).
//! - `RELOADING=1` … `READY=1` around a SIGHUP reload; `STOPPING=1` when shutdown begins.
//! - `WATCHDOG=1` every half `WatchdogSec`, but only while every loop's heartbeat is fresh
//!   ([`Liveness`]): a stuck loop stops the pings and systemd restarts the service, while a
//!   merely idle daemon keeps pinging.
//!
//! Outside systemd (`NOTIFY_SOCKET` unset) every call is a no-op. The datagrams are sent
//! with the `sd-notify` crate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::watch;

use crate::liveness::Liveness;

/// How often `STATUS=` is refreshed while running (only sent when it changed).
const STATUS_INTERVAL: Duration = Duration::from_secs(5);

/// Sends notifications to the service manager.
#[derive(Clone, Default)]
pub struct Notifier {
    ready: Arc<AtomicBool>,
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

impl Notifier {
    pub fn new() -> Notifier {
        Notifier::default()
    }

    /// Start-up finished (MQTT subscribed).
    pub fn ready(&self, status: &str) {
        self.ready.store(true, Ordering::Relaxed);
        send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// A reload begins.
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => send(&[NotifyState::Reloading, now]),
            Err(_) => send(&[NotifyState::Reloading]),
        }
    }

    /// A reload ended (applied or refused): back to ready, if we were ready before.
    pub fn reloaded(&self, status: &str) {
        if self.is_ready() {
            send(&[NotifyState::Ready, NotifyState::Status(status)]);
        } else {
            send(&[NotifyState::Status(status)]);
        }
    }

    pub fn status(&self, status: &str) {
        send(&[NotifyState::Status(status)]);
    }

    /// Shutdown begins.
    pub fn stopping(&self) {
        send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }
}

/// Half of `WatchdogSec` when systemd asked for watchdog pings (`WATCHDOG_USEC`), as
/// sd_watchdog_enabled(3) recommends.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|d| d / 2)
}

/// Runs while the daemon is up: feeds the watchdog while every loop is alive and keeps
/// `STATUS=` current. `status` renders the status line. Ends when `stop` turns true.
pub async fn supervise(
    notifier: Notifier,
    liveness: Liveness,
    status: impl Fn() -> String,
    mut stop: watch::Receiver<bool>,
) {
    let watchdog = watchdog_interval();
    // Without a watchdog the first branch never fires: an hour-long tick costs nothing.
    let mut ping = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut refresh = tokio::time::interval(STATUS_INTERVAL);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_status = String::new();
    let mut was_stuck = false;
    loop {
        tokio::select! {
            _ = ping.tick(), if watchdog.is_some() => {
                let stuck = liveness.stuck();
                if stuck.is_empty() {
                    if was_stuck {
                        tracing::info!("every loop is alive again; watchdog pings resume");
                    }
                    send(&[NotifyState::Watchdog]);
                } else if !was_stuck {
                    tracing::error!(
                        stuck = ?stuck,
                        "a loop stopped turning; watchdog pings stop so systemd restarts us"
                    );
                }
                was_stuck = !stuck.is_empty();
            }
            _ = refresh.tick() => {
                let line = status();
                if line != last_status {
                    notifier.status(&line);
                    last_status = line;
                }
            }
            _ = crate::liveness::stopped(&mut stop) => return,
        }
    }
}
