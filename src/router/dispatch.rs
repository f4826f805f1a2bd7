//! Per-topic order with concurrency across topics (spec §6).
//!
//! Two messages on one topic are applied in arrival order (so a "latest" key holds the
//! latest), while different topics proceed at once and a topic stuck waiting for Redis holds
//! up only itself. Each topic with work gets one task that drains that topic's queue and
//! exits when it is empty, so idle topics cost nothing and the number of tasks is bounded by
//! the in-flight bound. The map's lock is never held across an await.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use futures_util::FutureExt;
use tokio_util::task::TaskTracker;

/// A message with the topic its order is kept within.
pub trait Ordered: Send + 'static {
    fn order_key(&self) -> &str;
}

impl Ordered for crate::mqtt::Inbound {
    fn order_key(&self) -> &str {
        &self.publish.topic
    }
}

/// Processes one message; messages of one topic are never handled concurrently.
pub trait Handler<M>: Send + Sync + 'static {
    fn handle(&self, message: M) -> impl Future<Output = ()> + Send;
}

type Queues<M> = Arc<Mutex<HashMap<String, VecDeque<M>>>>;

/// Hands each message to its topic's lane.
pub struct Dispatcher<M, H> {
    handler: Arc<H>,
    queues: Queues<M>,
    tasks: TaskTracker,
}

impl<M: Ordered, H: Handler<M>> Dispatcher<M, H> {
    pub fn new(handler: Arc<H>) -> Self {
        Dispatcher {
            handler,
            queues: Arc::new(Mutex::new(HashMap::new())),
            tasks: TaskTracker::new(),
        }
    }

    /// Queues `message` behind its topic's earlier messages, or starts a lane for it.
    pub fn dispatch(&self, message: M) {
        let key = {
            let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
            // Looked up by `&str`: the key is copied only when a lane starts, not for every
            // message queued behind a running one.
            if let Some(queue) = queues.get_mut(message.order_key()) {
                queue.push_back(message);
                return;
            }
            let key = message.order_key().to_string();
            queues.insert(key.clone(), VecDeque::new());
            key
        };
        let handler = self.handler.clone();
        let queues = self.queues.clone();
        self.tasks.spawn(async move {
            let mut next = Some(message);
            while let Some(message) = next {
                // A panic is a bug, but it must not silence the topic: the lane goes on with
                // the next message. The panicking message is left unacked (the broker
                // redelivers it after a reconnect), which holds back later acks until then.
                if AssertUnwindSafe(handler.handle(message))
                    .catch_unwind()
                    .await
                    .is_err()
                {
                    tracing::error!(topic = %key, "BUG: message handler panicked; the topic goes on");
                }
                let mut queues = queues.lock().unwrap_or_else(|p| p.into_inner());
                next = queues.get_mut(&key).and_then(VecDeque::pop_front);
                if next.is_none() {
                    queues.remove(&key);
                }
            }
        });
    }

    /// Topics with work right now.
    pub fn active_topics(&self) -> usize {
        self.queues.lock().map(|q| q.len()).unwrap_or(0)
    }

    /// Waits until every lane has drained (after the source stopped receiving).
    pub async fn drained(&self) {
        self.tasks.close();
        self.tasks.wait().await;
        self.tasks.reopen();
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
    }

    impl Ordered for Msg {
        fn order_key(&self) -> &str {
            self.topic
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
        });
        for n in 2..=50 {
            d.dispatch(Msg {
                topic: "a",
                n,
                gate: None,
            });
        }
        d.dispatch(Msg {
            topic: "b",
            n: 1,
            gate: None,
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

    #[tokio::test]
    async fn a_panicking_handler_does_not_silence_its_topic() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let d = Dispatcher::new(Arc::new(Recorder(tx)));
        d.dispatch(Msg {
            topic: "a",
            n: 0,
            gate: None,
        });
        d.dispatch(Msg {
            topic: "a",
            n: 1,
            gate: None,
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
