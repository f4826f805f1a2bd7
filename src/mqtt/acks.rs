//! The ack sequencer: acknowledgements go to the broker in the order the messages arrived
//! (MQTT-4.6.0-2), whatever order their processing finished in.
//!
//! The event loop registers each QoS 1/2 message as it arrives and gets a [`Ticket`]; the
//! worker that processed it calls [`Ticket::done`]. Only the run of finished messages at the
//! head of the queue is acked, so one slow message holds back the acks behind it — never the
//! processing. A reconnect starts a new epoch: tickets of the old connection no longer ack
//! anything, because the broker redelivers what we had not acked and a stray ack could
//! confirm a redelivered copy before we processed it.
//!
//! The sequencer is a mutex, not a task: registering and finishing are a few pointer moves;
//! the acks it releases go to the [`AckForwarder`], whose task hands them to rumqttc.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{mpsc, oneshot};

use super::wire::{AckId, Client};
use crate::liveness::Busy;

/// Where acks go: the [`AckForwarder`] in the daemon; tests record them.
pub trait AckSink: Send + Sync + 'static {
    /// Called in ack order, under the sequencer's lock: must not block.
    fn ack(&self, id: AckId, epoch: u64);

    /// The sequencer moved to a new connection's epoch (acks of older epochs are void).
    fn new_epoch(&self, _epoch: u64) {}
}

enum Forward {
    Ack(AckId, u64),
    Flush(oneshot::Sender<()>),
}

/// Hands finished acks to rumqttc in order, from a task of its own that may wait when the
/// client's request channel is full — the sequencer cannot (it runs under a lock) and the
/// event loop's task must never await its own client. Its queue is bounded by what can be
/// in flight (`max_inflight` plus the broker's window, at most 65,535 packet ids), so it does
/// not fill in practice; if it ever did, the message would stay unacked and be redelivered.
///
/// Acks of an older epoch are dropped on the way out: after a reconnect the broker may have
/// forgotten those packet ids (no session) and reused them for messages we have not seen.
pub struct AckForwarder {
    tx: mpsc::Sender<Forward>,
    epoch: Arc<AtomicU64>,
    /// Set while one ack is being handed to rumqttc: the watchdog's view of the ack path.
    busy: Busy,
}

impl AckForwarder {
    /// Starts the forwarding task for `client`.
    pub fn spawn(client: Client, capacity: usize) -> AckForwarder {
        let (tx, mut rx) = mpsc::channel::<Forward>(capacity.max(1));
        let epoch = Arc::new(AtomicU64::new(0));
        let current = epoch.clone();
        let busy = Busy::new();
        let on_ack = busy.clone();
        tokio::spawn(async move {
            let _lifeline = crate::liveness::Lifeline::new("ack path");
            while let Some(forward) = rx.recv().await {
                match forward {
                    Forward::Ack(id, epoch) => {
                        if epoch != current.load(Ordering::Acquire) {
                            continue;
                        }
                        on_ack.start();
                        if let Err(e) = client.ack(id).await {
                            // The event loop is gone (shutdown): redelivered later.
                            tracing::debug!(error = %e, pkid = id.pkid, "MQTT ack not sent");
                        }
                        on_ack.done();
                    }
                    Forward::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        AckForwarder { tx, epoch, busy }
    }

    /// Set while an ack is on its way into rumqttc's request queue; one stuck there for long
    /// while the broker is connected means the ack path is stuck.
    pub fn busy(&self) -> Busy {
        self.busy.clone()
    }

    /// Waits until every ack handed over before this call is in the client's request
    /// queue, so a DISCONNECT queued afterwards leaves after them.
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Forward::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

impl AckSink for AckForwarder {
    fn ack(&self, id: AckId, epoch: u64) {
        if let Err(e) = self.tx.try_send(Forward::Ack(id, epoch)) {
            tracing::warn!(error = %e, pkid = id.pkid, "MQTT ack queue full; the message will be redelivered");
        }
    }

    fn new_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::Release);
    }
}

struct Entry {
    id: AckId,
    done: bool,
}

struct Queue {
    epoch: u64,
    /// Sequence number of `entries[0]`.
    head: u64,
    entries: VecDeque<Entry>,
}

/// Orders acks; cheap to clone.
#[derive(Clone)]
pub struct AckSequencer {
    queue: Arc<Mutex<Queue>>,
    sink: Arc<dyn AckSink>,
}

/// One registered message's claim on an ack. Dropping it without [`Ticket::done`] leaves the
/// message unacked (it will be redelivered), and so holds back the acks after it.
pub struct Ticket {
    epoch: u64,
    seq: u64,
    sequencer: AckSequencer,
}

impl AckSequencer {
    pub fn new(sink: Arc<dyn AckSink>) -> Self {
        AckSequencer {
            queue: Arc::new(Mutex::new(Queue {
                epoch: 0,
                head: 0,
                entries: VecDeque::new(),
            })),
            sink,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic elsewhere while holding this lock cannot leave the queue half-updated in a
        // way that matters more than losing the acks: keep going with what is there.
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers a message that needs an ack (QoS 1 or 2), in arrival order.
    pub fn register(&self, id: AckId) -> Ticket {
        let mut q = self.lock();
        let seq = q.head + q.entries.len() as u64;
        q.entries.push_back(Entry { id, done: false });
        Ticket {
            epoch: q.epoch,
            seq,
            sequencer: self.clone(),
        }
    }

    /// A new connection: forget what the old one was waiting for.
    pub fn reset(&self) {
        let mut q = self.lock();
        q.epoch += 1;
        q.head += q.entries.len() as u64;
        q.entries.clear();
        self.sink.new_epoch(q.epoch);
    }

    /// Messages registered and not yet acked.
    pub fn pending(&self) -> usize {
        self.lock().entries.len()
    }

    fn finish(&self, epoch: u64, seq: u64) {
        let mut q = self.lock();
        if q.epoch != epoch || seq < q.head {
            return;
        }
        let index = (seq - q.head) as usize;
        match q.entries.get_mut(index) {
            Some(entry) => entry.done = true,
            None => return,
        }
        // Sent under the lock, so two finishing workers cannot interleave their runs; the
        // sink only queues the ack (`try_send`), it never waits.
        while q.entries.front().is_some_and(|e| e.done) {
            if let Some(entry) = q.entries.pop_front() {
                self.sink.ack(entry.id, q.epoch);
            }
            q.head += 1;
        }
    }
}

impl Ticket {
    /// Every route reached its outcome: the message may be acked once all before it are.
    pub fn done(self) {
        self.sequencer.finish(self.epoch, self.seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<u16>>);

    impl AckSink for Recorder {
        fn ack(&self, id: AckId, _epoch: u64) {
            self.0.lock().unwrap().push(id.pkid);
        }
    }

    fn publish(pkid: u16) -> AckId {
        AckId { pkid, qos: 1 }
    }

    #[test]
    fn acks_go_out_in_arrival_order_when_processing_finishes_out_of_order() {
        let recorder = Arc::new(Recorder::default());
        let seq = AckSequencer::new(recorder.clone());
        let t1 = seq.register(publish(1));
        let t2 = seq.register(publish(2));
        let t3 = seq.register(publish(3));
        t3.done();
        t2.done();
        assert!(recorder.0.lock().unwrap().is_empty(), "1 is not done yet");
        t1.done();
        assert_eq!(*recorder.0.lock().unwrap(), vec![1, 2, 3]);
        assert_eq!(seq.pending(), 0);
    }

    #[test]
    fn an_unfinished_message_holds_back_later_acks() {
        let recorder = Arc::new(Recorder::default());
        let seq = AckSequencer::new(recorder.clone());
        let t1 = seq.register(publish(1));
        let t2 = seq.register(publish(2));
        t2.done();
        drop(t1);
        assert!(recorder.0.lock().unwrap().is_empty());
        assert_eq!(seq.pending(), 2);
    }

    #[test]
    fn tickets_of_an_old_connection_ack_nothing() {
        let recorder = Arc::new(Recorder::default());
        let seq = AckSequencer::new(recorder.clone());
        let old = seq.register(publish(1));
        seq.reset();
        let new = seq.register(publish(1));
        old.done();
        assert!(recorder.0.lock().unwrap().is_empty());
        new.done();
        assert_eq!(*recorder.0.lock().unwrap(), vec![1]);
    }
}
