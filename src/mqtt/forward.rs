//! Forwards — `mqtt_publish` actions and rate-limit replies: publishing on the bridge's
//! outgoing MQTT connection, confirmed (spec §6: the incoming message is acked only after
//! the broker acknowledged each QoS 1/2 forward).

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;

use super::publisher::{MqttPublisher, PublishError};
use super::wire::OutProperties;
use crate::backoff::Backoff;
use crate::events;

/// A forward rendered with a message's other actions, sent once Redis has the rest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MqttOut {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5 properties.
    pub properties: Option<Box<OutProperties>>,
}

/// The outgoing connection forwards go out on. The publisher is swapped in when a reload
/// brings the first publishing route.
pub struct Forwarder {
    publisher: ArcSwapOption<MqttPublisher>,
    /// `mqtt.max_packet_size`: a forward larger than this could never be sent.
    max_packet_size: usize,
}

impl Forwarder {
    pub fn new(publisher: Option<MqttPublisher>, max_packet_size: usize) -> Forwarder {
        Forwarder {
            publisher: ArcSwapOption::new(publisher.map(Arc::new)),
            max_packet_size,
        }
    }

    /// Uses `publisher` from now on.
    pub fn set_publisher(&self, publisher: MqttPublisher) {
        self.publisher.store(Some(Arc::new(publisher)));
    }

    /// Publishes `out` and, at QoS 1/2, waits until the broker acknowledged it. A publish
    /// lost with the broker's session, or not taken while rumqttc's queue is full, is sent
    /// again with backoff, for as long as it takes (shutdown is bounded by
    /// `shutdown_timeout`: the message then stays unacked and is redelivered). `Err` only for
    /// a forward that can never be sent: it is the message's outcome (`failed`).
    pub async fn send(&self, out: MqttOut) -> Result<(), String> {
        let Some(publisher) = self.publisher.load_full() else {
            return Err("no outgoing MQTT connection for mqtt_publish".to_string());
        };
        check_size(&out, self.max_packet_size)?;
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            let queued = publisher.publish_tracked(
                &out.topic,
                out.qos,
                out.retain,
                out.payload.clone(),
                out.properties.as_deref(),
            );
            match queued {
                Ok(acked) => {
                    match acked.await {
                        Ok(Ok(())) => return Ok(()),
                        // Refused by the broker (MQTT 5 reason code, e.g. not authorized):
                        // sending it again would be refused again.
                        Ok(Err(refusal)) => {
                            events::mqtt_publish_refused(
                                &out.topic,
                                refusal.packet,
                                &refusal.code.0,
                            );
                            return Err(format!("forward to {:?}: {refusal}", out.topic));
                        }
                        Err(_) => {}
                    }
                    // Lost with the broker's session (or the loop restarted): send again.
                    events::forward_retry(&out.topic);
                }
                Err(PublishError::Full) => {}
                Err(PublishError::Refused(_)) if publisher.client_closed() => {
                    // The outgoing connection's loop is gone: the daemon is stopping (or
                    // exits 1 for it). No outcome: the message stays unacked and is
                    // redelivered, as anything unfinished at a stop (spec §6).
                    return std::future::pending().await;
                }
                Err(PublishError::Refused(why) | PublishError::TooLarge(why)) => return Err(why),
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// Publishes `out` once, without waiting for the broker: for what is best effort (a
    /// rate-limit reply tells a device why; its message's outcome is `rate_limited` either
    /// way, and must not wait for the broker).
    pub fn post(&self, out: MqttOut) -> Result<(), String> {
        let publisher = self
            .publisher
            .load_full()
            .ok_or_else(|| "no outgoing MQTT connection".to_string())?;
        check_size(&out, self.max_packet_size)?;
        publisher
            .publish_tracked(
                &out.topic,
                out.qos,
                out.retain,
                out.payload,
                out.properties.as_deref(),
            )
            .map(drop)
            .map_err(|e| e.to_string())
    }
}

/// A forward that can never be sent: a topic longer than MQTT allows, or a packet over
/// `mqtt.max_packet_size`.
fn check_size(out: &MqttOut, max_packet_size: usize) -> Result<(), String> {
    if out.topic.len() > usize::from(u16::MAX) {
        return Err(format!(
            "forward topic is {} bytes, over MQTT's 65535",
            out.topic.len()
        ));
    }
    // A PUBLISH is its topic, its payload and at most 9 bytes of header and packet id.
    let size = out.topic.len() + out.payload.len() + 9;
    if size > max_packet_size {
        return Err(format!(
            "forward to {:?} is {size} bytes, over mqtt.max_packet_size ({max_packet_size})",
            out.topic
        ));
    }
    Ok(())
}
