//! The drain: spooled messages back through their routes once Redis is up (spec §6.2).
//!
//! One task reads the spool in id order (arrival order) and hands each record to its
//! topic's lane in a dispatcher of its own, so one topic is replayed in order while
//! different topics proceed at once. At most [`WINDOW`] records are in flight: that bound is
//! the pacing — a drain adds a bounded load to Redis beside live traffic, which keeps its
//! latency (the bench measures p99 of live messages during a drain). A record is deleted
//! only after its replay reached an outcome on every route (deletes are batched; a failed
//! delete is retried with backoff before anything more is read, so a record known replayed
//! is never dispatched again by this process), so a crash during a drain replays at most
//! the records in flight (or not yet deleted) again: at-least-once, and
//! with `dedup` exactly once. Before the records go the dead-letter records the spool kept
//! (drops of `on_full = "drop_oldest"`, messages refused while Redis was down).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use super::store::{lock, Stored};
use super::Spool;
use crate::events;
use crate::message::{Message, Properties};
use crate::outcome::Reason;
use crate::redis::ConnectionState;
use crate::router::dispatch::{Dispatcher, Handler, Ordered};
use crate::router::engine::{Engine, Part};

/// Records replayed at once, all topics together.
pub const WINDOW: usize = 8;

/// How long the drain waits, at most, for live messages to be written before it dispatches
/// its next record.
pub const GIVE_WAY: Duration = Duration::from_millis(2);

/// While live messages flow (one written within [`LIVE_RECENT`]), the drain pauses this
/// long after each [`WINDOW`] records it dispatched.
pub const PACE: Duration = Duration::from_millis(1);

/// How recent a live message must be for the drain to pace itself.
const LIVE_RECENT: Duration = Duration::from_millis(200);

/// Records read from the file at a time.
const READ_BATCH: usize = 256;

/// Replayed records are deleted in groups of this many (or when the reading pauses).
const DELETE_BATCH: usize = 64;

/// The first wait before a failed delete is tried again (doubling up to
/// [`DELETE_RETRY_MAX`]).
const DELETE_RETRY: Duration = Duration::from_millis(100);
const DELETE_RETRY_MAX: Duration = Duration::from_secs(5);

/// How long the drain waits for an append in flight to be committed before reading again.
const IDLE_POLL: Duration = Duration::from_millis(50);

/// A record on its way through the routes again.
struct Replayed {
    stored: Stored,
    started: Instant,
    _permit: OwnedSemaphorePermit,
    finished: mpsc::UnboundedSender<i64>,
}

impl Ordered for Replayed {
    fn order_key(&self) -> &str {
        &self.stored.record.topic
    }

    fn received(&self) -> Instant {
        self.started
    }
}

struct Replayer {
    engine: Arc<Engine>,
}

impl Handler<Replayed> for Replayer {
    async fn handle(&self, message: Replayed) {
        let record = &message.stored.record;
        // Acked when it was spooled: no ack ticket of its own.
        let replayed = Message {
            topic: record.topic.clone(),
            payload: record.payload.clone().into(),
            qos: record.qos,
            properties: properties(record),
        };
        let matched = self
            .engine
            .process_part(&replayed, message.started, Part::Redis)
            .await;
        if !matched {
            events::unrouted(&record.topic);
        }
        events::spool_replayed(1);
        let _ = message.finished.send(message.stored.id);
    }
}

/// A spooled record's MQTT 5 properties, its Message Expiry Interval reduced by the time it
/// spent in the spool — as a broker does with what it held — so a message that expired
/// while spooled ends `invalid` (`expired`) at replay instead of being written late (spec
/// §6.1). Counted in wall-clock time: the spool outlives the process, and a reboot.
fn properties(record: &super::store::Record) -> Option<Box<Properties>> {
    let mut properties = Properties::decode(record.props.as_deref()?)?;
    if let Some(expiry) = properties.message_expiry {
        let spooled_s = (super::unix_ms() - record.received_ms).max(0) / 1000;
        let left = i64::from(expiry) - spooled_s;
        properties.message_expiry = Some(u32::try_from(left.max(0)).unwrap_or(0));
    }
    Some(Box::new(properties))
}

/// Drains the spool whenever Redis is up and it holds something, until `stop`.
pub async fn run(
    spool: Arc<Spool>,
    engine: Arc<Engine>,
    mut redis: watch::Receiver<ConnectionState>,
    mut stop: watch::Receiver<bool>,
) {
    // The drain moves messages: its death by a panic stops the daemon (exit 1), rather than
    // leaving the spool to fill for ever.
    let _lifeline = crate::liveness::Lifeline::new("spool drain");
    let lanes = Dispatcher::new(Arc::new(Replayer {
        engine: engine.clone(),
    }));
    let window = Arc::new(Semaphore::new(WINDOW));
    let (finished_tx, mut finished) = mpsc::unbounded_channel();
    let mut done: Vec<i64> = Vec::new();
    let mut cursor = 0i64;
    let mut draining = false;
    let mut dispatched = 0usize;
    loop {
        // Wait for Redis and for work.
        let ready = async {
            loop {
                let up = matches!(*redis.borrow(), ConnectionState::Up);
                let work = {
                    let ledger = lock(&spool.ledger);
                    ledger.messages > 0 || ledger.letters > 0
                };
                if up && work {
                    return true;
                }
                let appended = spool.appended.notified();
                tokio::select! {
                    changed = redis.changed() => if changed.is_err() { return false },
                    _ = appended => {}
                    _ = tokio::time::sleep(IDLE_POLL * 20) => {}
                }
            }
        };
        let ready = tokio::select! {
            ready = ready => ready,
            _ = crate::liveness::stopped(&mut stop) => false,
        };
        if !ready {
            break;
        }
        if !draining {
            draining = true;
            events::spool_draining(lock(&spool.ledger).messages);
        }
        push_letters(&spool, &engine).await;
        let batch = match spool.store.read(cursor, READ_BATCH).await {
            Ok(batch) => batch,
            Err(e) => {
                events::spool_store_error("read", &e);
                tokio::time::sleep(IDLE_POLL * 20).await;
                continue;
            }
        };
        if batch.is_empty() {
            // Everything read is in flight or done: let it finish, delete it (retried until
            // it is deleted), and look again from the start.
            let all = window.clone().acquire_many_owned(WINDOW as u32).await;
            collect(&mut finished, &mut done);
            delete_retrying(&spool, &mut done, &mut stop).await;
            drop(all);
            let (messages, dropped) = {
                let mut ledger = lock(&spool.ledger);
                if ledger.messages == 0 {
                    // Empty: the next outage's records are read from the start.
                    ledger.replay_cursor = 0;
                }
                (ledger.messages, ledger.letters)
            };
            if messages == 0 {
                cursor = 0;
            }
            if messages == 0 && dropped == 0 {
                draining = false;
                events::spool_drained();
            } else {
                cursor = 0;
                let _ = tokio::time::timeout(IDLE_POLL, spool.appended.notified()).await;
            }
            continue;
        }
        for stored in batch {
            let permit = tokio::select! {
                permit = window.clone().acquire_owned() => permit,
                _ = crate::liveness::stopped(&mut stop) => break,
            };
            let Ok(permit) = permit else { break };
            give_way(&spool).await;
            dispatched += 1;
            if dispatched % WINDOW == 0 && spool.live_recently(LIVE_RECENT) {
                tokio::time::sleep(PACE).await;
            }
            cursor = stored.id;
            lanes.dispatch(Replayed {
                stored,
                started: Instant::now(),
                _permit: permit,
                finished: finished_tx.clone(),
            });
            collect(&mut finished, &mut done);
            if done.len() >= DELETE_BATCH {
                delete_retrying(&spool, &mut done, &mut stop).await;
            }
        }
    }
    // Stopping: what is in flight finishes (bounded by the daemon's shutdown_timeout);
    // what is deleted of it need not be replayed again.
    lanes.drained().await;
    collect(&mut finished, &mut done);
    let _ = delete(&spool, &mut done).await;
}

/// Waits (at most [`GIVE_WAY`]) while live messages are being written.
async fn give_way(spool: &Spool) {
    if spool.live.load(std::sync::atomic::Ordering::Acquire) == 0 {
        return;
    }
    let idle = spool.live_done.notified();
    tokio::pin!(idle);
    idle.as_mut().enable();
    if spool.live.load(std::sync::atomic::Ordering::Acquire) > 0 {
        let _ = tokio::time::timeout(GIVE_WAY, idle).await;
    }
}

fn collect(finished: &mut mpsc::UnboundedReceiver<i64>, done: &mut Vec<i64>) {
    while let Ok(id) = finished.try_recv() {
        done.push(id);
    }
}

/// Deletes the replayed records `done`. On failure they stay in `done` (and in the file):
/// false.
async fn delete(spool: &Spool, done: &mut Vec<i64>) -> bool {
    if done.is_empty() {
        return true;
    }
    match spool.store.delete(done.clone()).await {
        Ok(()) => {
            done.clear();
            true
        }
        Err(e) => {
            events::spool_store_error("delete", &e);
            false
        }
    }
}

/// [`delete`], tried again with backoff until it succeeds (or the drain stops), before
/// anything more is read: ids known replayed are never dispatched again, and the drain does
/// not run ahead of what it could delete. Stopped with ids left, they are replayed again
/// after the restart (at-least-once).
async fn delete_retrying(spool: &Spool, done: &mut Vec<i64>, stop: &mut watch::Receiver<bool>) {
    let mut backoff = DELETE_RETRY;
    while !delete(spool, done).await {
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = crate::liveness::stopped(stop) => return,
        }
        backoff = (backoff * 2).min(DELETE_RETRY_MAX);
    }
}

/// Writes the dead-letter records kept while Redis was down (drops of `drop_oldest`,
/// messages refused meanwhile).
async fn push_letters(spool: &Spool, engine: &Engine) {
    if lock(&spool.ledger).letters == 0 {
        return;
    }
    loop {
        let letters = match spool.store.take_letters(DELETE_BATCH).await {
            Ok(letters) if !letters.is_empty() => letters,
            Ok(_) => return,
            Err(e) => {
                events::spool_store_error("read", &e);
                return;
            }
        };
        for letter in &letters {
            let reason = Reason::parse(&letter.reason).unwrap_or(Reason::InternalError);
            engine.push_dead_letter(reason, &letter.record).await;
        }
        if let Err(e) = spool
            .store
            .forget_letters(letters.iter().map(|l| l.id).collect())
            .await
        {
            events::spool_store_error("delete", &e);
            return;
        }
    }
}
