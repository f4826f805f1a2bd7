//! Pub/sub rules: one subscriber for all of them, a bounded queue and a sender per rule.
//!
//! The receiving task never waits on MQTT: it renders each message for every rule whose
//! channel matches and pushes it to that rule's queue, dropping the oldest beyond
//! `max_pending` (`overflow`). Each rule's sender publishes while MQTT is connected, with
//! up to [`WINDOW`] publishes awaiting their acknowledgement; one lost with the broker's
//! session goes back to the front of the queue. `{topic}` is the channel.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use super::{RepublishRule, Shared, Source, FAILED, INVALID, OVERFLOW, PUBLISHED};
use crate::mqtt::publisher::PublishError;
use crate::redis::pubsub::{Message, Monitor, Subscriber};
use crate::template::Context;

/// Publishes of one rule awaiting their acknowledgement at once.
const WINDOW: usize = 64;

/// Messages of one rule waiting for MQTT.
struct Outbox {
    queue: Mutex<VecDeque<super::Rendered>>,
    ready: Notify,
    max_pending: usize,
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<super::Rendered>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `item`; the oldest that no longer fits is returned, to be counted.
    fn push(&self, item: super::Rendered) -> Option<super::Rendered> {
        let dropped = {
            let mut queue = self.lock();
            queue.push_back(item);
            (queue.len() > self.max_pending)
                .then(|| queue.pop_front())
                .flatten()
        };
        self.ready.notify_one();
        dropped
    }

    /// Puts back a publish that was lost, ahead of the rest.
    fn push_front(&self, item: super::Rendered) -> Option<super::Rendered> {
        let mut queue = self.lock();
        queue.push_front(item);
        (queue.len() > self.max_pending)
            .then(|| queue.pop_back())
            .flatten()
    }
}

pub(super) fn spawn(
    shared: Arc<Shared>,
    rules: Vec<Arc<RepublishRule>>,
    stop: watch::Receiver<bool>,
) -> (Vec<JoinHandle<()>>, Monitor) {
    let mut channels = Vec::new();
    let mut globs = Vec::new();
    for rule in &rules {
        if let Source::PubSub { channel, .. } = &rule.source {
            match channel.literal() {
                Some(c) if !channels.contains(&c) => channels.push(c),
                Some(_) => {}
                None => {
                    let glob = channel.glob();
                    if !globs.contains(&glob) {
                        globs.push(glob);
                    }
                }
            }
        }
    }
    let subscription = Subscriber::start(&shared.redis, channels, globs);
    let monitor = subscription.monitor();
    let mut tasks = Vec::new();
    let mut routed = Vec::new();
    for rule in rules {
        let max_pending = match &rule.source {
            Source::PubSub { max_pending, .. } => *max_pending,
            Source::Stream { .. } => continue,
        };
        let outbox = Arc::new(Outbox {
            queue: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
            max_pending,
        });
        tasks.push(tokio::spawn(send(
            shared.clone(),
            rule.clone(),
            outbox.clone(),
            stop.clone(),
        )));
        routed.push((rule, outbox));
    }
    let mut stop_rx = stop;
    tasks.push(tokio::spawn(async move {
        let _lifeline = crate::liveness::Lifeline::new("republish worker");
        let mut subscription = subscription;
        loop {
            let message = tokio::select! {
                m = subscription.recv() => m,
                _ = stop_rx.wait_for(|s| *s) => None,
            };
            let Some(message) = message else { break };
            for (rule, outbox) in &routed {
                receive(&shared, rule, outbox, &message);
            }
        }
        subscription.stop().await;
    }));
    (tasks, monitor)
}

/// Renders `message` for `rule` if its channel matches, and queues it.
fn receive(shared: &Shared, rule: &RepublishRule, outbox: &Outbox, message: &Message) {
    let Source::PubSub { channel, .. } = &rule.source else {
        return;
    };
    let captures = match (channel.literal(), message.pattern.as_deref()) {
        (Some(literal), None) if literal == message.channel => Vec::new(),
        (None, Some(glob)) if glob == channel.glob() => match channel.matches(&message.channel) {
            Some(captures) => captures,
            None => {
                // The glob's `*` also matches `:`; a capture does not.
                let detail = format!(
                    "channel {:?} does not match {:?}",
                    message.channel,
                    channel.as_str()
                );
                shared.stats.record(&rule.name, INVALID, &detail);
                return;
            }
        },
        _ => return,
    };
    let mut ctx = Context::new(&message.channel, &message.payload);
    ctx.params = &captures;
    match shared.render(rule, &ctx) {
        Ok(rendered) => {
            if outbox.push(rendered).is_some() {
                shared
                    .stats
                    .record(&rule.name, OVERFLOW, "max_pending reached; oldest dropped");
            }
        }
        Err((reason, detail)) => {
            let detail = format!("{} ({detail})", reason.as_str());
            shared.stats.record(&rule.name, INVALID, &detail);
        }
    }
}

/// Publishes `rule`'s queue while MQTT is connected.
async fn send(
    shared: Arc<Shared>,
    rule: Arc<RepublishRule>,
    outbox: Arc<Outbox>,
    mut stop: watch::Receiver<bool>,
) {
    // A worker dying by a panic stops the daemon (exit 1): its queue would go unsent.
    let _lifeline = crate::liveness::Lifeline::new("republish worker");
    let mut status = shared.mqtt.status();
    let mut inflight = FuturesUnordered::new();
    loop {
        let mut full = false;
        while status.borrow().connected && inflight.len() < WINDOW {
            let Some(item) = outbox.lock().pop_front() else {
                break;
            };
            let payload = item.payload.clone();
            match shared.mqtt.publish_tracked(
                &item.topic,
                rule.qos,
                rule.retain,
                payload,
                item.properties.as_deref(),
            ) {
                Ok(ack) => inflight.push(async move { (ack.await, item) }),
                Err(PublishError::Full) => {
                    outbox.push_front(item);
                    full = true;
                    break;
                }
                Err(PublishError::Refused(why) | PublishError::TooLarge(why)) => {
                    shared.stats.record(&rule.name, FAILED, &why)
                }
            }
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            Some((acked, item)) = inflight.next(), if !inflight.is_empty() => {
                if let Ok(Err(refusal)) = &acked {
                    // Refused by the broker (MQTT 5 reason code): never published.
                    crate::events::mqtt_publish_refused(&item.topic, refusal.packet, &refusal.code.0);
                    shared.stats.record(&rule.name, FAILED, &refusal.to_string());
                } else if acked.is_ok() {
                    shared.stats.record(&rule.name, PUBLISHED, "");
                } else if outbox.push_front(item).is_some() {
                    // Lost with the broker's session: publish again.
                    shared.stats.record(&rule.name, OVERFLOW, "max_pending reached; newest dropped");
                }
            }
            _ = outbox.ready.notified() => {}
            changed = status.changed() => if changed.is_err() {
                break; // the MQTT connection is gone for good
            },
            _ = tokio::time::sleep(Duration::from_millis(10)), if full => {}
        }
    }
    let held = outbox.lock().len() + inflight.len();
    if held > 0 {
        tracing::info!(rule = %rule.name, held, "republish stopped with pub/sub messages still held; they are dropped");
    }
}
