//! Per-topic order with concurrency across topics (spec §6).
//!
//! Two messages on one topic are applied in arrival order (so a "latest" key holds the
//! latest), while different topics proceed at once and a topic stuck waiting for Redis holds
//! up only itself. A topic with work has one lane: a task that drains that topic's queue.
//! A lane whose queue ran dry waits a moment ([`LANE_IDLE`]) for another topic to take up
//! before it exits, so a steady stream of messages over many topics reuses lanes instead of
//! spawning a task (and moving its multi-KiB future into a fresh allocation) per message.
//! Idle topics cost nothing, and the number of lanes is bounded by the in-flight bound. The
//! lock is never held across an await.
//!
//! Each topic with work remembers when the message its lane is on arrived, under the lock
//! the lane takes anyway between messages, so [`Dispatcher::oldest`] tells the watchdog how
//! long the oldest message held has waited: a lane hung on one message shows there, while
//! every loop still turns (spec §6).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;

/// How long a lane without work waits for another topic before it exits.
pub const LANE_IDLE: Duration = Duration::from_millis(250);

/// A message with the topic its order is kept within.
pub trait Ordered: Send + 'static {
    fn order_key(&self) -> &str;
    /// When it arrived: how long it has been held.
    fn received(&self) -> Instant;
}

impl Ordered for crate::mqtt::Inbound {
    fn order_key(&self) -> &str {
        &self.message.topic
    }

    fn received(&self) -> Instant {
        self.received
    }
}

/// A topic with work: when the message its lane is on arrived, and what waits behind it
/// (younger, so the lane's message is the topic's oldest).
struct Topic<M> {
    since: Instant,
    queue: VecDeque<M>,
}

/// Processes one message; messages of one topic are never handled concurrently.
pub trait Handler<M>: Send + Sync + 'static {
    fn handle(&self, message: M) -> impl Future<Output = ()> + Send;
}

/// A topic and its first message, handed to a lane.
type Work<M> = (String, M);

struct Lanes<M> {
    /// Every topic that has a lane, with the queue behind the message the lane is handling.
    queues: HashMap<String, Topic<M>>,
    /// Lanes waiting for a topic, the most recently idle last.
    idle: Vec<oneshot::Sender<Work<M>>>,
    /// Shutting down: lanes exit when their topic is done instead of waiting for another.
    closing: bool,
}

type Shared<M> = Arc<Mutex<Lanes<M>>>;

fn lock<M>(shared: &Shared<M>) -> MutexGuard<'_, Lanes<M>> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// Hands each message to its topic's lane.
pub struct Dispatcher<M, H> {
    handler: Arc<H>,
    lanes: Shared<M>,
    tasks: TaskTracker,
}

impl<M: Ordered, H: Handler<M>> Dispatcher<M, H> {
    pub fn new(handler: Arc<H>) -> Self {
        Dispatcher {
            handler,
            lanes: Arc::new(Mutex::new(Lanes {
                queues: HashMap::new(),
                idle: Vec::new(),
                closing: false,
            })),
            tasks: TaskTracker::new(),
        }
    }

    /// Queues `message` behind its topic's earlier messages, or gives the topic a lane: an
    /// idle one if there is one, else a new task.
    pub fn dispatch(&self, message: M) {
        let work = {
            let mut lanes = lock(&self.lanes);
            // Looked up by `&str`: the key is copied only when a lane takes the topic, not
            // for every message queued behind a running one.
            if let Some(topic) = lanes.queues.get_mut(message.order_key()) {
                topic.queue.push_back(message);
                return;
            }
            let key = message.order_key().to_string();
            lanes.queues.insert(
                key.clone(),
                Topic {
                    since: message.received(),
                    queue: VecDeque::new(),
                },
            );
            let mut work = (key, message);
            while let Some(lane) = lanes.idle.pop() {
                // A lane that gave up waiting has closed its end: the work comes back.
                match lane.send(work) {
                    Ok(()) => return,
                    Err(back) => work = back,
                }
            }
            work
        };
        let handler = self.handler.clone();
        let lanes = self.lanes.clone();
        self.tasks.spawn(lane(handler, lanes, work));
    }

    /// Topics with work right now.
    pub fn active_topics(&self) -> usize {
        lock(&self.lanes).queues.len()
    }

    /// Lanes running, busy or idle.
    pub fn lanes(&self) -> usize {
        self.tasks.len()
    }

    /// A handle telling when the oldest message held arrived (`None`: nothing held), for
    /// the watchdog. Walks the topics with work, at most `max_inflight` of them.
    pub fn oldest(&self) -> impl Fn() -> Option<Instant> + Send + Sync + 'static {
        let lanes = self.lanes.clone();
        move || lock(&lanes).queues.values().map(|t| t.since).min()
    }

    /// Waits until every lane has drained (after the source stopped receiving).
    pub async fn drained(&self) {
        {
            let mut lanes = lock(&self.lanes);
            lanes.closing = true;
            // Dropping their senders ends the idle lanes' wait.
            lanes.idle.clear();
        }
        self.tasks.close();
        self.tasks.wait().await;
        self.tasks.reopen();
        lock(&self.lanes).closing = false;
    }
}

/// One lane: drains its topic's queue, then waits up to [`LANE_IDLE`] for another topic.
async fn lane<M: Ordered, H: Handler<M>>(handler: Arc<H>, lanes: Shared<M>, work: Work<M>) {
    // Lanes move messages: one dying by a panic of its own code stops the daemon (exit 1).
    let _lifeline = crate::liveness::Lifeline::new("lane");
    let (mut key, first) = work;
    let mut next = Some(first);
    loop {
        while let Some(message) = next {
            // A panic is a bug, but it must not silence the topic: the lane goes on with
            // the next message. (The engine catches its own panics and finishes the
            // message as `internal_error`; this is for any other handler.)
            if AssertUnwindSafe(handler.handle(message))
                .catch_unwind()
                .await
                .is_err()
            {
                tracing::error!(topic = %key, "BUG: message handler panicked; the topic goes on");
            }
            let mut lanes = lock(&lanes);
            next = match lanes.queues.get_mut(&key) {
                Some(topic) => {
                    let next = topic.queue.pop_front();
                    if let Some(message) = &next {
                        topic.since = message.received();
                    }
                    next
                }
                None => None,
            };
            if next.is_none() {
                lanes.queues.remove(&key);
            }
        }
        let (give, mut take) = oneshot::channel();
        {
            let mut lanes = lock(&lanes);
            if lanes.closing {
                return;
            }
            lanes.idle.push(give);
        }
        let work = match tokio::time::timeout(LANE_IDLE, &mut take).await {
            Ok(Ok(work)) => work,
            Ok(Err(_)) => return, // shutting down
            Err(_) => {
                // Work sent just as the wait ended is in the channel: take it, else no
                // sender can succeed any more (it gets its work back and looks elsewhere).
                take.close();
                match take.try_recv() {
                    Ok(work) => work,
                    Err(_) => {
                        lock(&lanes).idle.retain(|lane| !lane.is_closed());
                        return;
                    }
                }
            }
        };
        key = work.0;
        next = Some(work.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::sync::{mpsc, Notify};

    struct Msg {
        topic: &'static str,
        n: u32,
        gate: Option<Arc<Notify>>,
        at: Instant,
    }

    impl Ordered for Msg {
        fn order_key(&self) -> &str {
            self.topic
        }

        fn received(&self) -> Instant {
            self.at
        }
    }

    struct Recorder(mpsc::UnboundedSender<(&'static str, u32)>);

    impl Handler<Msg> for Recorder {
        async fn handle(&self, m: Msg) {
            if let Some(gate) = m.gate {
                gate.notified().await;
            }
            if m.n == 0 {
                panic!("a handler bug");
            }
            let _ = self.0.send((m.topic, m.n));
        }
    }

    #[tokio::test]
    async fn one_topic_in_order_other_topics_not_held_up() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let d = Dispatcher::new(Arc::new(Recorder(tx)));
        let gate = Arc::new(Notify::new());
        d.dispatch(Msg {
            topic: "a",
            n: 1,
            gate: Some(gate.clone()),
            at: Instant::now(),
        });
        for n in 2..=50 {
            d.dispatch(Msg {
                topic: "a",
                n,
                gate: None,
                at: Instant::now(),
            });
        }
        d.dispatch(Msg {
            topic: "b",
            n: 1,
            gate: None,
            at: Instant::now(),
        });
        // "b" finishes while "a" is still blocked on its first message.
        let first = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap();
        assert_eq!(first, Some(("b", 1)));
        gate.notify_one();
        for n in 1..=50 {
            let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap();
            assert_eq!(got, Some(("a", n)));
        }
        tokio::time::timeout(Duration::from_secs(5), d.drained())
            .await
            .unwrap();
        assert_eq!(d.active_topics(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_lane_takes_up_the_next_topic_then_exits_when_none_comes() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let d = Dispatcher::new(Arc::new(Recorder(tx)));
        for (topic, n) in [("a", 1), ("b", 2), ("c", 3)] {
            d.dispatch(Msg {
                topic,
                n,
                gate: None,
                at: Instant::now(),
            });
            let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .unwrap();
            assert_eq!(got, Some((topic, n)));
            // Let the lane finish: it stays, idle, and handles "b" and "c" too.
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            assert_eq!(d.lanes(), 1);
        }
        tokio::time::sleep(LANE_IDLE * 2).await;
        assert_eq!(d.lanes(), 0, "an idle lane exits after LANE_IDLE");
        assert_eq!(d.active_topics(), 0);
    }

    #[tokio::test]
    async fn the_oldest_message_held_is_the_one_a_hung_lane_is_on() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let d = Dispatcher::new(Arc::new(Recorder(tx)));
        let oldest = d.oldest();
        assert_eq!(oldest(), None, "nothing held");
        let gate = Arc::new(Notify::new());
        let hung_since = Instant::now();
        d.dispatch(Msg {
            topic: "a",
            n: 1,
            gate: Some(gate.clone()),
            at: hung_since,
        });
        d.dispatch(Msg {
            topic: "b",
            n: 2,
            gate: None,
            at: Instant::now(),
        });
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap();
        assert_eq!(got, Some(("b", 2)));
        assert_eq!(
            oldest(),
            Some(hung_since),
            "the hung message, not the ones that flow"
        );
        gate.notify_one();
        tokio::time::timeout(Duration::from_secs(5), d.drained())
            .await
            .unwrap();
        assert_eq!(oldest(), None);
    }

    #[tokio::test]
    async fn a_panicking_handler_does_not_silence_its_topic() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let d = Dispatcher::new(Arc::new(Recorder(tx)));
        d.dispatch(Msg {
            topic: "a",
            n: 0,
            gate: None,
            at: Instant::now(),
        });
        d.dispatch(Msg {
            topic: "a",
            n: 1,
            gate: None,
            at: Instant::now(),
        });
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap();
        assert_eq!(got, Some(("a", 1)));
        tokio::time::timeout(Duration::from_secs(5), d.drained())
            .await
            .unwrap();
        assert_eq!(d.active_topics(), 0);
    }
}
