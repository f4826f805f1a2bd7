//! The local spool (spec §6.2): carries long Redis outages on local disk instead of in the
//! broker's memory.
//!
//! Without a spool a Redis outage is carried by the broker: the bridge stops acking and
//! the broker queues the rest of the persistent session, in RAM, up to its own limits. With
//! `[spool]`, a message that needs Redis and cannot be written for longer than `after` is
//! appended to a crash-safe file on this gateway and acked only once the append is durable
//! (`fsync` policy): at-least-once holds, "written" then means "durable here". When Redis is
//! back, the spool drains through the routes — middleware evaluated at replay time — in
//! arrival order, paced, while live traffic goes on.
//!
//! Where it sits: between the MQTT source and the routes, as the dispatcher's handler
//! ([`Front`]) — in the topic lanes, so order per topic comes from the lanes themselves: a
//! lane hands its topic's messages over one after the other, whether to the routes or to the
//! spool. Per message the front asks the route table which of the matched routes wait for
//! Redis (actions that write, dedup, a session). Those ("the Redis part") may be spooled;
//! the others (forward-only routes) always run at once, so they never wait for the spool.
//! The republish side (Redis → MQTT) does not pass through here at all.
//!
//! Decisions, and why:
//! - **When to spill.** A watcher follows the Redis manager's state: Redis down or refusing
//!   writes without a break for `after` turns spilling on; Redis up turns it off. Messages
//!   already waiting in a lane for Redis at that moment give up their wait and are spooled
//!   (their Redis part is cancelled; a route of the message that had already written is
//!   written again at replay — at-least-once, and exactly once with `dedup`).
//! - **Who joins the tail.** A message whose topic has messages in the spool is spooled
//!   behind them, whatever Redis's state, so a topic is never written out of order. A topic
//!   with nothing spooled goes straight to Redis once Redis is back, even while other topics
//!   drain: the spool keeps order *per topic* (what spec §6 promises) without making fresh
//!   topics wait for the whole drain — which is what lets live traffic keep its latency
//!   during a drain (the bench measures it). The ledger ([`store::Ledger`]) keeps a count
//!   per spooled topic for this; it is rebuilt from the file at start-up.
//! - **Acks.** A spooled message is finished (its ack released, in arrival order) once its
//!   append is committed as `fsync` says; replayed messages have no ack of their own left.
//!   A record leaves the spool only after its replay reached an outcome on every route, so a
//!   `kill -9` during a drain replays at most the records in flight again.
//! - **Full.** `max_size` counts topic + payload + a fixed overhead per record
//!   (`spool_bytes`); the file itself stays at its high-water mark (SQLite reuses freed
//!   pages). `backpressure` holds the message (unacked, its lane waits) until the drain
//!   makes room; `drop_oldest` deletes the oldest records not yet taken by the replay and
//!   keeps their topic and times for the dead letter, written once Redis is back.
//! - **Dead letters.** A message refused while Redis is down (invalid JSON on a forward
//!   route, an oversized packet) needs Redis for its dead-letter record, and its ack waits
//!   for that record — holding back every later ack. Once spilling, such records are kept
//!   in the spool (the [`Keeper`](crate::dead_letter::Keeper) the engine is given) and
//!   written before the replayed messages when Redis is back. These kept letters (and those
//!   of `drop_oldest`) are not counted in `max_size`/`spool_bytes` — a dropped record's
//!   letter can be larger than the record, so counted together `drop_oldest` could not make
//!   room — but bounded apart: at most `max_size` bytes of letters, the oldest discarded
//!   past it with a warning (as the dead-letter list itself keeps the newest). So the file
//!   holds at most about 2 × `max_size` of both, and "each drop dead-lettered" (spec §6.2)
//!   holds while the drops' letters fit in `max_size`.
//! - **Pacing.** The replay keeps at most [`replay::WINDOW`] messages in flight, each in its
//!   topic's lane of a dispatcher of its own, so a drain is a bounded extra load on Redis
//!   beside live traffic rather than a flood; and it gives way to live traffic: while a live
//!   message is being written to Redis, it dispatches nothing new (bounded by
//!   [`replay::GIVE_WAY`] per record, so a steady live stream slows the drain but cannot stop
//!   it), and while live messages flow it pauses [`replay::PACE`] after each window's worth
//!   of records, leaving the CPU (a gateway's is small) to them. Without live traffic it
//!   drains at full speed.
//! - **MQTT 5.** A record keeps the message's properties (`props`, as
//!   `message::Properties::encode` writes them), so templates read them at replay; the
//!   Message Expiry Interval is reduced by the time spent in the spool, in wall-clock time
//!   (the spool outlives the process), so a message that expired there ends `expired`.
//! - **The store** is SQLite in WAL mode, see [`store`] (and docs/benchmarks.md for the
//!   measurement that chose it).
//!
//! Without `[spool]` none of this is built: the daemon's dispatcher calls the engine
//! directly, as before.

pub mod config;
pub mod replay;
pub mod store;

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{watch, Notify};

use config::OnFull;
pub use config::SpoolConfig;
use store::{lock, Record, SharedLedger, Store, StoreError};

use crate::events;
use crate::mqtt::Inbound;
use crate::outcome::Reason;
use crate::redis::{ConnectionState, RedisManager};
use crate::router::dispatch::Handler;
use crate::router::engine::{Engine, Part};

/// The first wait before a failed append is tried again (doubling up to [`APPEND_RETRY_MAX`]).
const APPEND_RETRY: Duration = Duration::from_millis(100);
const APPEND_RETRY_MAX: Duration = Duration::from_secs(5);

/// Now, in unix milliseconds (the time a record keeps).
pub fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The open spool: its store, what it holds, and whether messages spill into it now.
pub struct Spool {
    config: SpoolConfig,
    store: Store,
    ledger: SharedLedger,
    /// Notified when records leave (backpressure waits on it).
    space: Arc<Notify>,
    /// Notified when a record is appended (the replay waits on it).
    appended: Arc<Notify>,
    spilling: watch::Receiver<bool>,
    /// Live messages being written to Redis right now: the drain gives way to them.
    live: AtomicUsize,
    /// Notified when `live` drops to zero.
    live_done: Notify,
    /// When a live message was last written (ms since `opened`): while live traffic flows,
    /// the drain paces itself.
    last_live: AtomicU64,
    opened: Instant,
}

/// Counts a live message in [`Spool::live`] while it is written.
struct LiveGuard<'a>(&'a Spool);

impl<'a> LiveGuard<'a> {
    fn new(spool: &'a Spool) -> Self {
        spool.live.fetch_add(1, Ordering::AcqRel);
        spool
            .last_live
            .store(spool.opened.elapsed().as_millis() as u64, Ordering::Relaxed);
        LiveGuard(spool)
    }
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.live_done.notify_waiters();
        }
    }
}

/// What `/readyz` and `/metrics` read of the spool.
#[derive(Clone)]
pub struct SpoolStatus {
    ledger: SharedLedger,
    spilling: watch::Receiver<bool>,
}

impl SpoolStatus {
    /// Messages and bytes held.
    pub fn size(&self) -> (u64, u64) {
        let ledger = lock(&self.ledger);
        (ledger.messages, ledger.bytes)
    }

    /// Taking messages Redis cannot (spilling), or holding some.
    pub fn active(&self) -> bool {
        *self.spilling.borrow() || lock(&self.ledger).messages > 0
    }

    /// Spilling: Redis cannot take writes and the spool takes them instead.
    pub fn spilling(&self) -> bool {
        *self.spilling.borrow()
    }
}

impl Spool {
    /// Opens the file (repairing a damaged tail, see [`store`]) and starts watching Redis.
    pub fn open(config: &SpoolConfig, redis: &RedisManager) -> Result<Arc<Spool>, StoreError> {
        let ledger = SharedLedger::default();
        let space = Arc::new(Notify::new());
        let store = Store::open(config, ledger.clone(), space.clone())?;
        // Known at zero from the start, like every series with fixed labels.
        metrics::counter!(events::names::SPOOL_DROPPED).absolute(0);
        metrics::counter!(events::names::SPOOL_REPLAYED).absolute(0);
        let (spill_tx, spilling) = watch::channel(false);
        tokio::spawn(watch_redis(
            redis.state(),
            config.after,
            config.path.clone(),
            spill_tx,
        ));
        let (messages, bytes) = {
            let ledger = lock(&ledger);
            (ledger.messages, ledger.bytes)
        };
        tracing::info!(messages, bytes, "{}", config.describe());
        Ok(Arc::new(Spool {
            config: config.clone(),
            store,
            ledger,
            space,
            appended: Arc::new(Notify::new()),
            spilling,
            live: AtomicUsize::new(0),
            live_done: Notify::new(),
            last_live: AtomicU64::new(0),
            opened: Instant::now(),
        }))
    }

    pub fn status(&self) -> SpoolStatus {
        SpoolStatus {
            ledger: self.ledger.clone(),
            spilling: self.spilling.clone(),
        }
    }

    /// Closes the file cleanly (after the lanes and the drain stopped): the WAL is folded
    /// into the database.
    pub async fn close(&self) {
        self.store.close().await;
    }

    /// Whether live messages were written to Redis within `recent`.
    fn live_recently(&self, recent: Duration) -> bool {
        let last = self.last_live.load(Ordering::Relaxed);
        last != 0 && self.opened.elapsed().as_millis() as u64 <= last + recent.as_millis() as u64
    }

    /// Whether a message on `topic` must go to the spool now: Redis cannot take it, or its
    /// topic has older messages spooled.
    fn must_spool(&self, topic: &str) -> bool {
        *self.spilling.borrow() || lock(&self.ledger).holds(topic)
    }

    /// One message from the MQTT source: its direct routes at once, its Redis part to Redis
    /// or to the spool.
    async fn handle(&self, engine: &Engine, inbound: Inbound) {
        // A message refused before any route (oversized, a bad topic) only writes its
        // dead-letter records, as without a spool (kept in the spool while spilling).
        if inbound.refusal().is_some() {
            return engine.handle(inbound).await;
        }
        let message = &inbound.message;
        let (redis, direct) = engine.parts(&message.topic);
        if !redis {
            return engine.handle(inbound).await;
        }
        if direct {
            engine
                .process_part(message, inbound.received, Part::Direct)
                .await;
        }
        if self.must_spool(&message.topic) {
            return self.append(engine, inbound).await;
        }
        let mut spilling = self.spilling.clone();
        let _live = LiveGuard::new(self);
        let written = tokio::select! {
            biased;
            _ = engine.process_part(message, inbound.received, Part::Redis) => true,
            _ = spilling.wait_for(|s| *s) => false,
        };
        if written {
            inbound.finish();
        } else {
            self.append(engine, inbound).await;
        }
    }

    /// Appends `inbound` to the spool and acks it once durable. With `backpressure`, a full
    /// spool holds it (unacked) until the drain makes room.
    async fn append(&self, engine: &Engine, inbound: Inbound) {
        let message = &inbound.message;
        // Its arrival, not now: a replayed message's MQTT 5 expiry counts from there.
        let received_ms =
            unix_ms() - i64::try_from(inbound.received.elapsed().as_millis()).unwrap_or(0);
        let make_record = || Record {
            topic: message.topic.clone(),
            payload: message.payload.to_vec(),
            qos: message.qos,
            received_ms,
            props: message
                .properties
                .as_deref()
                .filter(|p| !p.is_empty())
                .map(|p| p.encode()),
        };
        let mut record = make_record();
        let size = record.size();
        loop {
            let mut room = pin!(self.space.notified());
            room.as_mut().enable();
            {
                let mut ledger = lock(&self.ledger);
                let full = ledger.messages > 0 && ledger.bytes + size > self.config.max_size;
                if !(full && self.config.on_full == OnFull::Backpressure) {
                    ledger.add(&record.topic, size);
                    break;
                }
            }
            // Bounded, so a missed wake-up costs a second, never the message.
            let _ = tokio::time::timeout(Duration::from_secs(1), room).await;
        }
        self.appended.notify_one();
        let topic = record.topic.clone();
        let mut backoff = APPEND_RETRY;
        loop {
            match self.store.append(record).await {
                Ok(()) => return inbound.finish(),
                Err(e) => {
                    events::spool_store_error("append", &e);
                    store::forget(&self.ledger, &topic, size);
                    // (The lane hands over its topic's messages one at a time: no other
                    // message of it is appended meanwhile.)
                    let alone = !lock(&self.ledger).holds(&topic);
                    if alone {
                        // Not durable here, and nothing of its topic is spooled: the message
                        // waits for Redis as it would without a spool, unacked meanwhile.
                        engine
                            .process_part(message, inbound.received, Part::Redis)
                            .await;
                        return inbound.finish();
                    }
                    // Older messages of its topic wait in the spool: it must follow them, so
                    // it stays unacked and the append is tried again.
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(APPEND_RETRY_MAX);
                    lock(&self.ledger).add(&topic, size);
                    record = make_record();
                }
            }
        }
    }
}

/// Dead-letter records of messages refused while Redis cannot take writes (an invalid
/// payload on any route, an oversized packet) are kept in the spool too, and written when
/// Redis is back: otherwise each would hold its message's ack, and with it every later ack.
impl crate::dead_letter::Keeper for Spool {
    fn spilling(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        let mut spilling = self.spilling.clone();
        Box::pin(async move {
            if spilling.wait_for(|s| *s).await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    }

    fn keep(
        &self,
        reason: Reason,
        record: String,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + '_>> {
        Box::pin(async move {
            match self.store.append_letter(reason.as_str(), record).await {
                Ok(()) => {
                    self.appended.notify_one();
                    true
                }
                Err(e) => {
                    events::spool_store_error("append", &e);
                    false
                }
            }
        })
    }
}

/// Turns spilling on once Redis has been unable to take writes for `after` without a break,
/// and off when Redis is up again.
async fn watch_redis(
    mut state: watch::Receiver<ConnectionState>,
    after: Duration,
    path: std::path::PathBuf,
    spilling: watch::Sender<bool>,
) {
    let _lifeline = crate::liveness::Lifeline::new("spool watch");
    let unwritable =
        |s: &ConnectionState| matches!(s, ConnectionState::Down | ConnectionState::Refusing);
    loop {
        if state.wait_for(unwritable).await.is_err() {
            return;
        }
        let back = tokio::time::timeout(after, state.wait_for(|s| !unwritable(s)))
            .await
            .map(|r| r.is_ok());
        match back {
            Ok(true) => continue,
            Ok(false) => return,
            Err(_) => {
                events::spool_spilling(after, &path);
                let _ = spilling.send(true);
                let back = state.wait_for(|s| !unwritable(s)).await.is_ok();
                let _ = spilling.send(false);
                if !back {
                    return;
                }
            }
        }
    }
}

/// The dispatcher's handler when `[spool]` is configured: every message goes through the
/// spool's front ([`Spool::handle`]).
pub struct Front {
    pub engine: Arc<Engine>,
    pub spool: Arc<Spool>,
}

impl Handler<Inbound> for Front {
    async fn handle(&self, inbound: Inbound) {
        self.spool.handle(&self.engine, inbound).await
    }
}
