//! Talking to systemd (spec §9): `Type=notify` readiness, status, reload and stop
//! notifications, and the watchdog.
//!
//! - `READY=1` once MQTT is connected and subscribed, so units ordered after us start when
//!   messages flow; `STATUS=` with counts, refreshed while running (`systemctl status`).
//! - `RELOADING=1` … `READY=1` around a SIGHUP reload; `STOPPING=1` when shutdown begins.
//! - `WATCHDOG=1` every half `WatchdogSec`, but only while every loop's heartbeat is fresh
//!   and the message path makes progress ([`Liveness`]): a stuck loop or a message stuck
//!   with Redis and the broker up stops the pings and systemd restarts the service, while a
//!   merely idle daemon, or one whose messages wait out an outage, keeps pinging.
//!
//! The protocol is one datagram of `KEY=value` lines to the socket in `NOTIFY_SOCKET`
//! (a path, or `@name` in the abstract namespace). The `sd-notify` crate writes the lines
//! ([`NotifyState`], `MONOTONIC_USEC` included) and reads `WATCHDOG_USEC`/`WATCHDOG_PID`;
//! the datagram itself we send here, because its `notify` neither reaches an abstract
//! socket nor sends without blocking. Outside systemd (`NOTIFY_SOCKET` unset) every call is
//! a no-op. Sends never block the runtime: should systemd not keep up, a notification is
//! dropped, and the next one carries the news.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::sync::watch;

use crate::liveness::Liveness;

/// How often `STATUS=` is refreshed while running (only sent when it changed).
const STATUS_INTERVAL: Duration = Duration::from_secs(5);

/// Where notifications go.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    Path(PathBuf),
    /// `@name`: a socket in Linux's abstract namespace.
    Abstract(Vec<u8>),
}

impl Target {
    fn parse(socket: &str) -> Option<Target> {
        match socket.strip_prefix('@') {
            Some(name) => Some(Target::Abstract(name.as_bytes().to_vec())),
            None if socket.starts_with('/') => Some(Target::Path(socket.into())),
            None => None,
        }
    }

    fn send(&self, message: &str) -> std::io::Result<()> {
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        match self {
            Target::Path(path) => socket.send_to(message.as_bytes(), path)?,
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(message.as_bytes(), &addr)?
            }
        };
        Ok(())
    }
}

/// Sends notifications to the service manager.
#[derive(Clone, Debug, Default)]
pub struct Notifier {
    target: Option<Target>,
    ready: Arc<AtomicBool>,
}

impl Notifier {
    /// Notifies the socket systemd named in `NOTIFY_SOCKET`; a no-op without it.
    pub fn from_env() -> Notifier {
        let target = std::env::var("NOTIFY_SOCKET")
            .ok()
            .and_then(|s| Target::parse(&s));
        Notifier {
            target,
            ready: Arc::default(),
        }
    }

    /// Notifies the datagram socket at `path` (tests, or a supervisor of one's own).
    pub fn to_socket(path: impl Into<PathBuf>) -> Notifier {
        Notifier {
            target: Some(Target::Path(path.into())),
            ready: Arc::default(),
        }
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        let Some(target) = &self.target else { return };
        let message: String = states.iter().map(|state| format!("{state}\n")).collect();
        if let Err(e) = target.send(&message) {
            tracing::debug!(error = %e, "sd_notify failed");
        }
    }

    /// Start-up finished (MQTT subscribed).
    pub fn ready(&self, status: &str) {
        self.ready.store(true, Ordering::Relaxed);
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// A reload begins. systemd (`Type=notify-reload`) pairs `RELOADING=1` with the
    /// monotonic clock's `MONOTONIC_USEC`.
    pub fn reloading(&self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    /// A reload ended (applied or refused): back to ready, if we were ready before.
    pub fn reloaded(&self, status: &str) {
        if self.is_ready() {
            self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
        } else {
            self.send(&[NotifyState::Status(status)]);
        }
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    /// The watchdog ping.
    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    /// Shutdown begins.
    pub fn stopping(&self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }
}

/// How often to ping the watchdog: half of `WatchdogSec` (`WATCHDOG_USEC`), as
/// sd_watchdog_enabled(3) recommends; `None` when systemd did not ask for pings, or asked
/// another process (`WATCHDOG_PID`).
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
        .filter(|period| !period.is_zero())
        .map(|period| period / 2)
}

/// Runs while the daemon is up: pings the watchdog every `watchdog` (when set) while every
/// loop is alive, and keeps `STATUS=` current. `status` renders the status line. Ends when
/// `stop` turns true.
pub async fn supervise(
    notifier: Notifier,
    liveness: Liveness,
    watchdog: Option<Duration>,
    status: impl Fn() -> String,
    mut stop: watch::Receiver<bool>,
) {
    // Without a watchdog the ping branch is disabled; the hour-long period is never used.
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
                    notifier.watchdog();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::liveness::Heartbeat;

    #[test]
    fn notify_socket_is_a_path_or_an_abstract_name() {
        assert_eq!(
            Target::parse("/run/systemd/notify"),
            Some(Target::Path("/run/systemd/notify".into()))
        );
        assert_eq!(
            Target::parse("@/org/freedesktop/systemd1/notify/1"),
            Some(Target::Abstract(
                b"/org/freedesktop/systemd1/notify/1".to_vec()
            ))
        );
        assert_eq!(Target::parse("relative"), None);
    }

    async fn recv(socket: &tokio::net::UnixDatagram) -> String {
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(10), socket.recv(&mut buf))
            .await
            .expect("a notification in time")
            .expect("recv");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[tokio::test]
    async fn each_notification_is_one_datagram_of_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let socket = tokio::net::UnixDatagram::bind(&path).expect("bind");
        let notifier = Notifier::to_socket(&path);
        notifier.ready("1 routes");
        assert_eq!(recv(&socket).await, "READY=1\nSTATUS=1 routes\n");
        notifier.reloading();
        let reloading = recv(&socket).await;
        let usec = reloading
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .and_then(|rest| rest.strip_suffix('\n'))
            .unwrap_or_else(|| panic!("RELOADING with MONOTONIC_USEC: {reloading:?}"));
        assert!(usec.parse::<u64>().is_ok(), "{usec:?} is microseconds");
        notifier.reloaded("2 routes");
        assert_eq!(recv(&socket).await, "READY=1\nSTATUS=2 routes\n");
        notifier.watchdog();
        assert_eq!(recv(&socket).await, "WATCHDOG=1\n");
        notifier.stopping();
        assert_eq!(recv(&socket).await, "STOPPING=1\nSTATUS=stopping\n");
    }

    #[tokio::test]
    async fn a_stuck_loop_stops_the_watchdog_pings_until_it_beats_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let socket = tokio::net::UnixDatagram::bind(&path).expect("bind");
        let heartbeat = Heartbeat::new();
        let liveness = Liveness::new();
        liveness.watch("test", heartbeat.clone(), Duration::from_millis(50));
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(supervise(
            Notifier::to_socket(&path),
            liveness,
            Some(Duration::from_millis(10)),
            || "status".to_string(),
            stop_rx,
        ));
        // Pings while the loop is fresh (the status line comes too, in either order).
        while recv(&socket).await != "WATCHDOG=1\n" {}

        // The loop stops beating: once its heartbeat is stale, the pings stop. Drain what
        // was sent before it went stale, then nothing may come while it stays stale.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut buf = [0u8; 64];
        while socket.try_recv(&mut buf).is_ok() {}
        let silent = tokio::time::timeout(Duration::from_millis(300), socket.recv(&mut buf)).await;
        assert!(silent.is_err(), "no ping while a loop is stuck");

        heartbeat.beat();
        assert_eq!(recv(&socket).await, "WATCHDOG=1\n", "pings resume");
        let _ = stop_tx.send(true);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("supervise ends on stop")
            .expect("no panic");
    }
}
