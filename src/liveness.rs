//! Liveness of the daemon's long-running loops, for `/healthz` and the systemd watchdog.
//!
//! A process can be alive while one of its loops is stuck (a deadlock, a blocking call on
//! an async thread). So each loop that must keep turning owns a [`Heartbeat`] and bumps it
//! every round; [`Liveness`] knows how old each heartbeat may get before its loop counts as
//! stuck. `/healthz` answers 503 and the watchdog stops pinging systemd as soon as one is
//! stale, and systemd restarts the service.
//!
//! A heartbeat is one atomic store, so loops can beat on every round at no cost. The type
//! lives in the Redis crate, whose health task beats one too; it is re-exported here.
//!
//! A loop that turns does not prove that messages move: a lane can hang on one message
//! while every loop beats. So [`Liveness::watch_with`] also takes checks of progress (the
//! daemon's: the oldest message held is not older than a bound while Redis and the broker
//! are up), and a task that moves messages holds a [`Lifeline`]: if it dies by a panic, the
//! daemon hears of it ([`task_died`]) and exits 1 so systemd restarts it (spec §6).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use routemq_redis::heartbeat::now_ms;
pub use routemq_redis::heartbeat::Heartbeat;

/// Set while a task is on one unit of work (e.g. the ack path handing one ack to the
/// client), so a task blocked inside one can be told from one idle between them. Two
/// atomic stores per unit.
#[derive(Clone, Debug, Default)]
pub struct Busy(Arc<AtomicU64>);

impl Busy {
    pub fn new() -> Busy {
        Busy::default()
    }

    /// A unit of work begins.
    pub fn start(&self) {
        self.0.store(now_ms(), Ordering::Relaxed);
    }

    /// It ended.
    pub fn done(&self) {
        self.0.store(0, Ordering::Relaxed);
    }

    /// Since when the task is on its current unit; `None` while idle.
    pub fn since(&self) -> Option<Instant> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            started => {
                let age = Duration::from_millis(now_ms().saturating_sub(started));
                Instant::now().checked_sub(age)
            }
        }
    }
}

struct Watched {
    name: &'static str,
    heartbeat: Heartbeat,
    max_age: Duration,
}

/// A check of progress: `true` while the part it watches is stuck.
type Check = Box<dyn Fn() -> bool + Send + Sync>;

/// The loops that must keep turning, and how long each may stay silent.
#[derive(Clone, Default)]
pub struct Liveness {
    loops: Arc<Mutex<Vec<Watched>>>,
    checks: Arc<Mutex<Vec<(&'static str, Check)>>>,
}

impl Liveness {
    pub fn new() -> Liveness {
        Liveness::default()
    }

    /// Watches `heartbeat` from now on; a loop that has not beaten yet counts as just
    /// started.
    pub fn watch(&self, name: &'static str, heartbeat: Heartbeat, max_age: Duration) {
        if heartbeat.age().is_none() {
            heartbeat.beat();
        }
        let mut loops = self.loops.lock().unwrap_or_else(|p| p.into_inner());
        loops.push(Watched {
            name,
            heartbeat,
            max_age,
        });
    }

    /// Watches a part whose progress `stuck` judges (e.g. the oldest message held).
    pub fn watch_with(&self, name: &'static str, stuck: impl Fn() -> bool + Send + Sync + 'static) {
        let mut checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        checks.push((name, Box::new(stuck)));
    }

    /// The loops whose heartbeat is older than allowed, and the parts that make no
    /// progress (empty: all alive).
    pub fn stuck(&self) -> Vec<&'static str> {
        let mut stuck: Vec<&'static str> = {
            let loops = self.loops.lock().unwrap_or_else(|p| p.into_inner());
            loops
                .iter()
                .filter(|w| w.heartbeat.age().is_none_or(|age| age > w.max_age))
                .map(|w| w.name)
                .collect()
        };
        let checks = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        stuck.extend(checks.iter().filter(|(_, check)| check()).map(|(n, _)| *n));
        stuck
    }
}

/// Which task that moves messages died, once one did (`None` while all live).
fn deaths() -> &'static watch::Sender<Option<&'static str>> {
    static DEATHS: OnceLock<watch::Sender<Option<&'static str>>> = OnceLock::new();
    DEATHS.get_or_init(|| watch::Sender::new(None))
}

/// Held by a task that moves messages (MQTT loop, lanes, ack path, republish workers) for
/// as long as it runs. Dropped while its task unwinds from a panic, it reports the task dead:
/// such a task is not restarted in place, because what it held (a connection's state, the
/// order of acks) died with it; the process is, by systemd.
pub struct Lifeline(&'static str);

impl Lifeline {
    pub fn new(task: &'static str) -> Lifeline {
        Lifeline(task)
    }
}

impl Drop for Lifeline {
    fn drop(&mut self) {
        if std::thread::panicking() {
            deaths().send_replace(Some(self.0));
        }
    }
}

/// Resolves with the name of the first task that moves messages to die.
pub async fn task_died() -> &'static str {
    let mut deaths = deaths().subscribe();
    loop {
        if let Some(task) = *deaths.borrow_and_update() {
            return task;
        }
        if deaths.changed().await.is_err() {
            // The sender lives in a static: never dropped.
            std::future::pending::<()>().await;
        }
    }
}

/// Resolves once `stop` turns true (or its sender is gone): the daemon's one stop signal,
/// as the tasks around the message path (HTTP, watchdog, metrics upkeep) wait for it.
pub async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    // The borrow `wait_for` returns is dropped here, so callers' futures stay `Send`.
    let _ = stop.wait_for(|stopped| *stopped).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_that_stops_beating_is_reported_stuck() {
        let liveness = Liveness::new();
        let fresh = Heartbeat::new();
        let silent = Heartbeat::new();
        liveness.watch("fresh", fresh.clone(), Duration::from_secs(60));
        liveness.watch("silent", silent.clone(), Duration::ZERO);
        std::thread::sleep(Duration::from_millis(5));
        fresh.beat();
        assert_eq!(liveness.stuck(), vec!["silent"]);
    }

    #[test]
    fn a_part_without_progress_is_reported_stuck() {
        let liveness = Liveness::new();
        let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stalled.clone();
        liveness.watch_with("lanes", move || flag.load(Ordering::Relaxed));
        assert!(liveness.stuck().is_empty());
        stalled.store(true, Ordering::Relaxed);
        assert_eq!(liveness.stuck(), vec!["lanes"]);
    }

    #[test]
    fn busy_tells_since_when_and_idle() {
        let busy = Busy::new();
        assert_eq!(busy.since(), None);
        let before = Instant::now();
        busy.start();
        let since = busy.since().expect("busy");
        assert!(since <= Instant::now() && since + Duration::from_millis(5) >= before);
        busy.done();
        assert_eq!(busy.since(), None);
    }

    #[tokio::test]
    async fn a_task_dying_by_a_panic_is_reported_and_a_clean_end_is_not() {
        let clean = tokio::spawn(async {
            let _lifeline = Lifeline::new("clean");
        });
        clean.await.expect("ends cleanly");
        let died = tokio::spawn(async {
            let _lifeline = Lifeline::new("test task");
            panic!("injected");
        });
        assert!(died.await.is_err());
        let name = tokio::time::timeout(Duration::from_secs(5), task_died())
            .await
            .expect("reported");
        assert_eq!(name, "test task");
    }
}
