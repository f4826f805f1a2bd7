//! Publishing with acknowledgement tracking, for the republisher (spec §7).
//!
//! [`MqttPublisher::publish_tracked`] returns a receiver that completes when the broker
//! acknowledged the publish (PUBACK for QoS 1, PUBCOMP for QoS 2; QoS 0 once written), so a
//! stream entry is XACKed only then (spec §7). rumqttc only reports packet ids, so the
//! [`Tracker`] correlates by order: a waiter joins a FIFO under the same lock that queues the
//! publish, and rumqttc takes requests in order, so each `Outgoing::Publish(pkid)` whose pkid
//! is not already waiting for its ack belongs to the FIFO's head (a pkid already waiting is a
//! retransmission after a reconnect; `AwaitAck` is a packet-id collision, written later).
//! `Incoming::PubAck/PubComp` completes the waiter of that pkid. When the broker did not keep
//! our session, rumqttc drops what it had in flight and what it had queued at the connection
//! loss (its `pending`); their waiters are dropped too, so callers see an error and retry.
//! The correlation is exact only if *every* publish on the connection is tracked: the
//! republisher therefore uses a connection of its own, and the untracked
//! [`MqttSource::client`](super::source::MqttSource::client) must not be mixed with `publish_tracked` on one source.
//!
//! Kept apart from the source because it is another job on another connection: the source
//! receives, this publishes and waits; they share only the event loop that feeds the
//! [`Tracker`] (`MqttSource::publisher` hands out the handle).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{oneshot, watch};

use super::wire::{Client, ConnectionError, Event, OutProperties, ReasonCode, RequestError};
use super::MqttStatus;

/// The broker refused a publish (MQTT 5: a PUBACK or PUBREC with a failure reason code):
/// sending it again will not help.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// `puback` or `pubrec`.
    pub packet: &'static str,
    pub code: ReasonCode,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the broker refused it ({} {})", self.packet, self.code.0)
    }
}

/// Completes when the broker acknowledged a publish (`Ok(Ok(()))`) or refused it
/// (`Ok(Err(_))`); fails when it was lost with the session or the loop ended.
pub type Acked = oneshot::Receiver<Result<(), Refusal>>;
type Waiter = oneshot::Sender<Result<(), Refusal>>;

/// A poisoned lock only means a thread panicked while holding it; the tracker's data is
/// still usable (at worst a waiter completes late or not at all, as on a lost session).
pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Publishes whose acknowledgement someone waits for; see the module doc.
#[derive(Default)]
pub(super) struct Tracker {
    /// Waiters of publishes queued to rumqttc and not yet written, in queue order.
    queued: VecDeque<Waiter>,
    /// Written QoS 1/2 publishes waiting for PUBACK/PUBCOMP, by packet id.
    written: HashMap<u16, Waiter>,
    /// A publish rumqttc holds back because its packet id is still in flight.
    collided: Option<(u16, Waiter)>,
    /// How many of `queued` sat in rumqttc's `pending` at the last connection loss: those
    /// are dropped with it when the broker did not keep the session; the rest of `queued`
    /// were still in the request channel and survive.
    in_pending: usize,
}

impl Tracker {
    /// `pending_new` is, after a connection loss, how many new publishes rumqttc moved to
    /// its `pending` ([`EventLoop::pending_new_publishes`](super::wire::EventLoop::pending_new_publishes)).
    pub(super) fn observe(&mut self, event: &Result<Event, ConnectionError>, pending_new: usize) {
        match event {
            Ok(Event::OutgoingPublish(pkid)) => {
                if *pkid != 0 && self.written.contains_key(pkid) {
                    return; // a retransmission
                }
                let waiter = match self.collided.take() {
                    Some((p, waiter)) if p == *pkid => Some(waiter),
                    other => {
                        self.collided = other;
                        self.pop()
                    }
                };
                if let Some(waiter) = waiter {
                    if *pkid == 0 {
                        let _ = waiter.send(Ok(())); // QoS 0: written is all there is
                    } else {
                        self.written.insert(*pkid, waiter);
                    }
                }
            }
            Ok(Event::OutgoingAwaitAck(pkid)) => {
                if let Some(waiter) = self.pop() {
                    self.collided = Some((*pkid, waiter));
                }
            }
            Ok(Event::PubAck {
                pkid,
                packet,
                refused,
            }) => {
                let result = match refused {
                    Some(code) => Err(Refusal {
                        packet,
                        code: code.clone(),
                    }),
                    None => Ok(()),
                };
                // A PUBREC that did not refuse is no completion: PUBCOMP is.
                if refused.is_some() || *packet == "puback" {
                    self.complete(*pkid, result);
                }
            }
            Ok(Event::PubComp { pkid }) => self.complete(*pkid, Ok(())),
            Ok(Event::ConnAck {
                session_present, ..
            }) => {
                if !session_present {
                    // rumqttc cleared its pending requests and in-flight publishes.
                    self.written.clear();
                    self.collided = None;
                    let lost = self.in_pending.min(self.queued.len());
                    self.queued.drain(..lost);
                }
                self.in_pending = 0;
            }
            Ok(_) => {}
            Err(_) => {
                // New publishes (no packet id yet) that rumqttc moved to `pending`.
                self.in_pending = pending_new.min(self.queued.len());
            }
        }
    }

    fn pop(&mut self) -> Option<Waiter> {
        let waiter = self.queued.pop_front();
        self.in_pending = self.in_pending.saturating_sub(1);
        waiter
    }

    fn complete(&mut self, pkid: u16, result: Result<(), Refusal>) {
        if let Some(waiter) = self.written.remove(&pkid) {
            let _ = waiter.send(result);
        }
    }

    pub(super) fn clear(&mut self) {
        *self = Tracker::default();
    }
}

/// A PUBLISH's size on the wire, at most: fixed header (≤ 5), topic (2 + length), packet
/// id (2), properties (length ≤ 4 + each property) and payload.
fn packet_size(topic: &str, payload: usize, properties: Option<&OutProperties>) -> usize {
    let string = |s: &Option<String>| s.as_ref().map_or(0, |s| 3 + s.len());
    // The property length (up to 4 bytes) is counted even without properties: MQTT 5 has
    // it always, and over-counting by a few bytes only refuses a publish a little early.
    let properties = 4 + properties.map_or(0, |p| {
        string(&p.content_type)
            + string(&p.response_topic)
            + p.correlation_data.as_ref().map_or(0, |d| 3 + d.len())
            + p.message_expiry.map_or(0, |_| 5)
            + p.user
                .iter()
                .map(|(k, v)| 5 + k.len() + v.len())
                .sum::<usize>()
    });
    5 + 2 + topic.len() + 2 + properties + payload
}

/// Publishing with acknowledgement tracking, for the republisher (spec §7). Clones share
/// one connection.
#[derive(Clone)]
pub struct MqttPublisher {
    client: Client,
    tracker: Arc<Mutex<Tracker>>,
    status: watch::Receiver<MqttStatus>,
    /// The broker's Maximum Packet Size (MQTT 5 CONNACK; 0 = none said).
    broker_max: Arc<AtomicU32>,
}

/// Why a publish could not be queued.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// rumqttc's request queue is full: try again shortly.
    #[error("the MQTT request queue is full")]
    Full,
    /// The topic is not a valid topic name, or the event loop has ended.
    #[error("MQTT publish refused: {0}")]
    Refused(String),
    /// Larger than the broker's Maximum Packet Size (MQTT 5): it would never be taken.
    #[error("MQTT publish refused: {0}")]
    TooLarge(String),
}

impl MqttPublisher {
    pub(super) fn new(
        client: Client,
        tracker: Arc<Mutex<Tracker>>,
        status: watch::Receiver<MqttStatus>,
        broker_max: Arc<AtomicU32>,
    ) -> MqttPublisher {
        MqttPublisher {
            client,
            tracker,
            status,
            broker_max,
        }
    }

    /// Queues a publish; the receiver completes once the broker acknowledged it (QoS 1/2)
    /// or it was written (QoS 0), and fails if it was lost with the session or the loop
    /// ended — then publish again. `properties` go out under MQTT 5 only.
    pub fn publish_tracked(
        &self,
        topic: &str,
        qos: u8,
        retain: bool,
        payload: Vec<u8>,
        properties: Option<&OutProperties>,
    ) -> Result<Acked, PublishError> {
        if topic.is_empty() || topic.contains(['+', '#', '\0']) {
            return Err(PublishError::Refused(format!(
                "{topic:?} is not a topic name"
            )));
        }
        let broker_max = self.broker_max.load(Ordering::Relaxed);
        let size = packet_size(topic, payload.len(), properties);
        if broker_max != 0 && size > broker_max as usize {
            return Err(PublishError::TooLarge(format!(
                "a publish to {topic:?} of {size} bytes is over the broker's Maximum Packet \
                 Size ({broker_max})"
            )));
        }
        let (tx, rx) = oneshot::channel();
        // One lock around both steps keeps the FIFO in the request channel's order.
        let mut tracker = lock(&self.tracker);
        tracker.queued.push_back(tx);
        match self
            .client
            .try_publish(topic, qos, retain, payload, properties)
        {
            Ok(()) => Ok(rx),
            Err(e) => {
                tracker.queued.pop_back();
                match e {
                    RequestError::Full if !self.client_closed() => Err(PublishError::Full),
                    RequestError::Full => Err(PublishError::Refused("the MQTT loop ended".into())),
                    RequestError::Refused(why) => Err(PublishError::Refused(why)),
                }
            }
        }
    }

    /// Whether the connection's event loop has ended (the daemon is stopping, or the loop
    /// died): nothing published from now on can go out.
    pub fn client_closed(&self) -> bool {
        // try_publish fails with TryRequest both when full and when the loop is gone;
        // a closed status channel tells the second apart.
        self.status.has_changed().is_err()
    }

    /// The connection's status, to hold publishes while it is down.
    pub fn status(&self) -> watch::Receiver<MqttStatus> {
        self.status.clone()
    }
}

#[cfg(test)]
mod tracker_tests {
    use super::*;

    type Observed = Result<Event, ConnectionError>;

    fn written(pkid: u16) -> Observed {
        Ok(Event::OutgoingPublish(pkid))
    }

    fn puback(pkid: u16) -> Observed {
        Ok(Event::PubAck {
            pkid,
            packet: "puback",
            refused: None,
        })
    }

    fn connack(session_present: bool) -> Observed {
        Ok(Event::ConnAck {
            session_present,
            max_packet_size: None,
        })
    }

    fn lost() -> Observed {
        Err(ConnectionError("network timeout".into()))
    }

    fn queue(tracker: &mut Tracker) -> Acked {
        let (tx, rx) = oneshot::channel();
        tracker.queued.push_back(tx);
        rx
    }

    #[test]
    fn a_publish_completes_on_its_own_puback_not_before() {
        let mut t = Tracker::default();
        let mut first = queue(&mut t);
        let mut second = queue(&mut t);
        t.observe(&written(1), 0);
        t.observe(&written(2), 0);
        assert!(first.try_recv().is_err() && second.try_recv().is_err());
        t.observe(&puback(2), 0);
        assert!(second.try_recv() == Ok(Ok(())));
        assert!(first.try_recv().is_err());
        // A retransmission keeps its waiter; the ack still completes it.
        t.observe(&written(1), 0);
        t.observe(&puback(1), 0);
        assert!(first.try_recv() == Ok(Ok(())));
    }

    #[test]
    fn a_refused_publish_completes_with_the_reason_code() {
        let mut t = Tracker::default();
        let mut rx = queue(&mut t);
        t.observe(&written(3), 0);
        t.observe(
            &Ok(Event::PubAck {
                pkid: 3,
                packet: "puback",
                refused: Some(ReasonCode("not_authorized".into())),
            }),
            0,
        );
        assert_eq!(
            rx.try_recv(),
            Ok(Err(Refusal {
                packet: "puback",
                code: ReasonCode("not_authorized".into())
            }))
        );
    }

    #[test]
    fn qos0_publishes_complete_when_written() {
        let mut t = Tracker::default();
        let mut rx = queue(&mut t);
        t.observe(&written(0), 0);
        assert!(rx.try_recv() == Ok(Ok(())));
    }

    #[test]
    fn a_lost_session_fails_what_rumqttc_dropped_and_keeps_the_rest() {
        let mut t = Tracker::default();
        let mut in_flight = queue(&mut t);
        t.observe(&written(1), 0);
        let mut moved = queue(&mut t); // moved to rumqttc's pending at the loss
        let mut late = queue(&mut t); // still in the request channel
        t.observe(&lost(), 1);
        t.observe(&connack(false), 0);
        assert!(matches!(
            in_flight.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert!(matches!(
            moved.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        // The survivor is the next one written.
        t.observe(&written(1), 0);
        t.observe(&puback(1), 0);
        assert!(late.try_recv() == Ok(Ok(())));
    }

    #[test]
    fn a_kept_session_keeps_every_waiter() {
        let mut t = Tracker::default();
        let mut in_flight = queue(&mut t);
        t.observe(&written(1), 0);
        let mut moved = queue(&mut t);
        t.observe(&lost(), 1);
        t.observe(&connack(true), 0);
        t.observe(&written(1), 0); // retransmitted
        t.observe(&written(2), 0); // the moved one
        t.observe(&puback(1), 0);
        t.observe(&puback(2), 0);
        assert!(in_flight.try_recv() == Ok(Ok(())));
        assert!(moved.try_recv() == Ok(Ok(())));
    }
}
