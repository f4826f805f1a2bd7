//! The broker connection in either protocol: rumqttc's MQTT 3.1.1 client or its MQTT 5 one
//! (`rumqttc::v5`, spec §6.1), behind one [`Client`], one [`EventLoop`] and one [`Event`].
//!
//! rumqttc's two clients are separate types with separate packets. Everything above this
//! file — the source's loop, the ack sequencer, the publish tracker — is written once
//! against what both have in common, in the bridge's own terms: a received [`Message`]
//! with its properties, an [`AckId`], a SUBACK's refused filters, a PUBACK's reason code.
//! What only MQTT 5 has (properties, reason codes, a server DISCONNECT) is simply absent
//! from the 3.1.1 side. So the protocol is decided here, per connection, and nowhere else.

use std::collections::VecDeque;

use bytes::Bytes;
use rumqttc::v5 as five;
use rumqttc::v5::mqttbytes::v5 as packets5;

use crate::message::{Message, Properties};

/// What the bridge needs to ack a received QoS 1/2 message later: its packet id and QoS
/// (topic and payload are not kept twice).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AckId {
    pub pkid: u16,
    pub qos: u8,
}

/// One subscription as sent: the filter (with `$share/…` when scaling out) and its QoS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    pub path: String,
    pub qos: u8,
}

/// Properties of an outgoing publish (MQTT 5 only; the config refuses them under 3.1.1).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutProperties {
    pub content_type: Option<String>,
    /// Message Expiry Interval, seconds.
    pub message_expiry: Option<u32>,
    pub user: Vec<(String, String)>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
}

/// A received publish as the event loop delivered it.
#[derive(Debug)]
pub struct Received {
    pub message: Message,
    /// `None` at QoS 0.
    pub ack: Option<AckId>,
    /// Our rumqttc patch (Change 5): the real size of a publish over `max_packet_size`,
    /// of which only the first 1 KiB was kept.
    pub oversized: Option<usize>,
    /// Our rumqttc patch (Change 6) or MQTT 5's byte topic: the topic as received when it
    /// is not UTF-8 (`message.topic` is then a lossy rendering).
    pub raw_topic: Option<Bytes>,
}

/// A broker's failure reason code (MQTT 5: 0x80 and above), named as the spec names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReasonCode(pub String);

/// What the event loop reports, in the bridge's terms.
#[derive(Debug)]
pub enum Event {
    ConnAck {
        session_present: bool,
        /// The broker's Maximum Packet Size (MQTT 5), if it said one.
        max_packet_size: Option<u32>,
    },
    /// A SUBACK: per filter of its SUBSCRIBE, in order, `None` if granted or the refusal.
    SubAck {
        pkid: u16,
        codes: Vec<Option<ReasonCode>>,
    },
    Publish(Box<Received>),
    /// PUBACK (QoS 1) or PUBREC (QoS 2) with a failure code, or PUBACK/PUBCOMP success:
    /// `refused` is `Some` when the broker refused the publish.
    PubAck {
        pkid: u16,
        packet: &'static str,
        refused: Option<ReasonCode>,
    },
    /// PUBCOMP: a QoS 2 publish is done.
    PubComp {
        pkid: u16,
    },
    /// The broker sent DISCONNECT (MQTT 5), with its reason.
    Disconnect {
        reason: String,
    },
    OutgoingPublish(u16),
    OutgoingAwaitAck(u16),
    OutgoingSubscribe(u16),
    OutgoingDisconnect,
    Other,
}

/// Why the connection ended (rumqttc's error, as text: both protocols log it the same way).
#[derive(Debug)]
pub struct ConnectionError(pub String);

impl std::fmt::Display for ConnectionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a request could not be queued.
#[derive(Debug)]
pub enum RequestError {
    /// The request channel is full (or the loop is gone: the caller tells them apart).
    Full,
    /// Anything else rumqttc refused, as text.
    Refused(String),
}

/// The client half: what other tasks queue to the event loop. Cheap to clone.
#[derive(Clone)]
pub enum Client {
    V4(rumqttc::AsyncClient),
    V5(five::AsyncClient),
}

/// The event loop half; polled by one task only.
pub enum EventLoop {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<five::EventLoop>),
}

fn qos4(level: u8) -> rumqttc::QoS {
    super::qos(level)
}

fn qos5(level: u8) -> five::mqttbytes::QoS {
    match level {
        0 => five::mqttbytes::QoS::AtMostOnce,
        1 => five::mqttbytes::QoS::AtLeastOnce,
        _ => five::mqttbytes::QoS::ExactlyOnce,
    }
}

impl Client {
    /// Acks a received message (manual acks: only once it reached its outcome).
    pub async fn ack(&self, id: AckId) -> Result<(), String> {
        match self {
            Client::V4(client) => {
                let mut publish = rumqttc::Publish::new("", qos4(id.qos), Vec::new());
                publish.pkid = id.pkid;
                client.ack(&publish).await.map_err(text)
            }
            Client::V5(client) => {
                let mut publish = packets5::Publish::new("", qos5(id.qos), Vec::new(), None);
                publish.pkid = id.pkid;
                client.ack(&publish).await.map_err(text)
            }
        }
    }

    /// Queues a publish without waiting. `properties` are sent only under MQTT 5.
    pub fn try_publish(
        &self,
        topic: &str,
        qos: u8,
        retain: bool,
        payload: Vec<u8>,
        properties: Option<&OutProperties>,
    ) -> Result<(), RequestError> {
        match self {
            Client::V4(client) => client
                .try_publish(topic, qos4(qos), retain, payload)
                .map_err(request_error4),
            Client::V5(client) => match properties {
                Some(p) => client.try_publish_with_properties(
                    topic,
                    qos5(qos),
                    retain,
                    payload,
                    publish_properties(p),
                ),
                None => client.try_publish(topic, qos5(qos), retain, payload),
            }
            .map_err(request_error5),
        }
    }

    pub async fn subscribe_many(&self, filters: Vec<Filter>) -> Result<(), String> {
        match self {
            Client::V4(client) => client.subscribe_many(filters4(filters)).await.map_err(text),
            Client::V5(client) => client.subscribe_many(filters5(filters)).await.map_err(text),
        }
    }

    /// Queues a SUBSCRIBE without waiting (fails when the request channel is full).
    pub fn try_subscribe_many(&self, filters: Vec<Filter>) -> Result<(), RequestError> {
        match self {
            Client::V4(client) => client
                .try_subscribe_many(filters4(filters))
                .map_err(request_error4),
            Client::V5(client) => client
                .try_subscribe_many(filters5(filters))
                .map_err(request_error5),
        }
    }

    pub async fn unsubscribe(&self, path: String) -> Result<(), String> {
        match self {
            Client::V4(client) => client.unsubscribe(path).await.map_err(text),
            Client::V5(client) => client.unsubscribe(path).await.map_err(text),
        }
    }

    pub async fn disconnect(&self) -> Result<(), String> {
        match self {
            Client::V4(client) => client.disconnect().await.map_err(text),
            Client::V5(client) => client.disconnect().await.map_err(text),
        }
    }
}

fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn filters4(filters: Vec<Filter>) -> impl Iterator<Item = rumqttc::SubscribeFilter> {
    filters
        .into_iter()
        .map(|f| rumqttc::SubscribeFilter::new(f.path, qos4(f.qos)))
}

fn filters5(filters: Vec<Filter>) -> impl Iterator<Item = packets5::Filter> {
    filters
        .into_iter()
        .map(|f| packets5::Filter::new(f.path, qos5(f.qos)))
}

/// rumqttc says `TryRequest` when its request channel is full (or the loop is gone).
fn request_error4(e: rumqttc::ClientError) -> RequestError {
    match e {
        rumqttc::ClientError::TryRequest(_) => RequestError::Full,
        e => RequestError::Refused(e.to_string()),
    }
}

fn request_error5(e: five::ClientError) -> RequestError {
    match e {
        five::ClientError::TryRequest(_) => RequestError::Full,
        e => RequestError::Refused(e.to_string()),
    }
}

fn publish_properties(p: &OutProperties) -> packets5::PublishProperties {
    packets5::PublishProperties {
        content_type: p.content_type.clone(),
        message_expiry_interval: p.message_expiry,
        user_properties: p.user.clone(),
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone(),
        ..Default::default()
    }
}

impl EventLoop {
    /// The next event; `Err` when the connection ended (the next poll reconnects).
    pub async fn poll(&mut self) -> Result<Event, ConnectionError> {
        match self {
            EventLoop::V4(el) => el
                .poll()
                .await
                .map(event4)
                .map_err(|e| ConnectionError(e.to_string())),
            EventLoop::V5(el) => el
                .poll()
                .await
                .map(event5)
                .map_err(|e| ConnectionError(connection_error5(&e))),
        }
    }

    /// Our rumqttc patch (Change 2): read nothing while `paused`.
    pub fn pause_reading(&mut self, paused: bool) {
        match self {
            EventLoop::V4(el) => el.pause_reading(paused),
            EventLoop::V5(el) => el.pause_reading(paused),
        }
    }

    /// Whether rumqttc can take requests: no packet-id collision and its outgoing window
    /// not full (only reading PUBACKs frees it otherwise).
    pub fn can_write(&self) -> bool {
        match self {
            EventLoop::V4(el) => {
                el.state.collision.is_none() && el.state.inflight() < el.mqtt_options.inflight()
            }
            EventLoop::V5(el) => {
                // The broker's Receive Maximum or our upper limit, whichever is smaller.
                el.state.collision.is_none()
                    && el.state.inflight() < el.state.max_outgoing_inflight()
            }
        }
    }

    /// How many new publishes (no packet id yet) rumqttc moved to its `pending` at a
    /// connection loss: it drops them when the broker kept no session.
    pub fn pending_new_publishes(&self) -> usize {
        match self {
            EventLoop::V4(el) => count_new(
                &el.pending,
                |r| matches!(r, rumqttc::Request::Publish(p) if p.pkid == 0),
            ),
            EventLoop::V5(el) => count_new(
                &el.pending,
                |r| matches!(r, five::Request::Publish(p) if p.pkid == 0),
            ),
        }
    }
}

fn count_new<R>(pending: &VecDeque<R>, new: impl Fn(&R) -> bool) -> usize {
    pending.iter().filter(|r| new(r)).count()
}

fn event4(event: rumqttc::Event) -> Event {
    use rumqttc::Packet;
    match event {
        rumqttc::Event::Incoming(packet) => match packet {
            Packet::ConnAck(ack) => Event::ConnAck {
                session_present: ack.session_present,
                max_packet_size: None,
            },
            Packet::SubAck(ack) => Event::SubAck {
                pkid: ack.pkid,
                codes: ack
                    .return_codes
                    .iter()
                    .map(|c| match c {
                        rumqttc::SubscribeReasonCode::Success(_) => None,
                        rumqttc::SubscribeReasonCode::Failure => Some(ReasonCode("failure".into())),
                    })
                    .collect(),
            },
            Packet::Publish(publish) => {
                let ack = (publish.qos != rumqttc::QoS::AtMostOnce).then_some(AckId {
                    pkid: publish.pkid,
                    qos: publish.qos as u8,
                });
                Event::Publish(Box::new(Received {
                    message: Message {
                        topic: publish.topic,
                        payload: publish.payload,
                        qos: publish.qos as u8,
                        properties: None,
                    },
                    ack,
                    oversized: publish.oversized,
                    raw_topic: publish.raw_topic,
                }))
            }
            Packet::PubAck(ack) => Event::PubAck {
                pkid: ack.pkid,
                packet: "puback",
                refused: None,
            },
            Packet::PubComp(comp) => Event::PubComp { pkid: comp.pkid },
            _ => Event::Other,
        },
        rumqttc::Event::Outgoing(outgoing) => outgoing_event(outgoing),
    }
}

fn outgoing_event(outgoing: rumqttc::Outgoing) -> Event {
    use rumqttc::Outgoing;
    match outgoing {
        Outgoing::Publish(pkid) => Event::OutgoingPublish(pkid),
        Outgoing::AwaitAck(pkid) => Event::OutgoingAwaitAck(pkid),
        Outgoing::Subscribe(pkid) => Event::OutgoingSubscribe(pkid),
        Outgoing::Disconnect => Event::OutgoingDisconnect,
        _ => Event::Other,
    }
}

fn event5(event: five::Event) -> Event {
    use packets5::Packet;
    match event {
        five::Event::Incoming(packet) => match packet {
            Packet::ConnAck(ack) => Event::ConnAck {
                session_present: ack.session_present,
                max_packet_size: ack.properties.as_ref().and_then(|p| p.max_packet_size),
            },
            Packet::SubAck(ack) => Event::SubAck {
                pkid: ack.pkid,
                codes: ack
                    .return_codes
                    .iter()
                    .map(|c| match c {
                        packets5::SubscribeReasonCode::Success(_) => None,
                        refused => Some(ReasonCode(snake_case(&format!("{refused:?}")))),
                    })
                    .collect(),
            },
            Packet::Publish(publish) => Event::Publish(Box::new(received5(publish))),
            Packet::PubAck(ack) => Event::PubAck {
                pkid: ack.pkid,
                packet: "puback",
                refused: match ack.reason {
                    packets5::PubAckReason::Success
                    | packets5::PubAckReason::NoMatchingSubscribers => None,
                    refused => Some(ReasonCode(snake_case(&format!("{refused:?}")))),
                },
            },
            // A PUBREC refusing the publish ends its QoS 2 flow: no PUBCOMP will come.
            Packet::PubRec(rec) => match rec.reason {
                packets5::PubRecReason::Success | packets5::PubRecReason::NoMatchingSubscribers => {
                    Event::Other
                }
                refused => Event::PubAck {
                    pkid: rec.pkid,
                    packet: "pubrec",
                    refused: Some(ReasonCode(snake_case(&format!("{refused:?}")))),
                },
            },
            Packet::PubComp(comp) => Event::PubComp { pkid: comp.pkid },
            Packet::Disconnect(disconnect) => Event::Disconnect {
                reason: disconnect_reason(&disconnect),
            },
            _ => Event::Other,
        },
        five::Event::Outgoing(outgoing) => outgoing_event(outgoing),
    }
}

fn received5(publish: packets5::Publish) -> Received {
    let qos = publish.qos as u8;
    let ack = (qos > 0).then_some(AckId {
        pkid: publish.pkid,
        qos,
    });
    let (topic, raw_topic) = match String::from_utf8(publish.topic.to_vec()) {
        Ok(topic) => (topic, None),
        Err(_) => (
            String::from_utf8_lossy(&publish.topic).into_owned(),
            Some(publish.topic.clone()),
        ),
    };
    let properties = publish.properties.map(|p| Properties {
        content_type: p.content_type,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data,
        user: p.user_properties,
        message_expiry: p.message_expiry_interval,
    });
    Received {
        message: Message {
            topic,
            payload: publish.payload,
            qos,
            properties: properties.filter(|p| !p.is_empty()).map(Box::new),
        },
        ack,
        oversized: publish.oversized,
        raw_topic: raw_topic.or(publish.raw_topic),
    }
}

fn disconnect_reason(disconnect: &packets5::Disconnect) -> String {
    let code = snake_case(&format!("{:?}", disconnect.reason_code));
    match disconnect
        .properties
        .as_ref()
        .and_then(|p| p.reason_string.as_deref())
    {
        Some(why) => format!("{code}: {why}"),
        None => code,
    }
}

fn connection_error5(e: &five::ConnectionError) -> String {
    match e {
        five::ConnectionError::ConnectionRefused(code) => format!(
            "connection refused by the broker: {}",
            snake_case(&format!("{code:?}"))
        ),
        e => e.to_string(),
    }
}

/// `NotAuthorized` → `not_authorized`: rumqttc's reason-code names as MQTT 5 spells them,
/// for log lines and the `code` label.
pub fn snake_case(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else if c.is_ascii_alphanumeric() || c == '_' {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_codes_are_named_as_mqtt_5_spells_them() {
        assert_eq!(snake_case("NotAuthorized"), "not_authorized");
        assert_eq!(
            snake_case(&format!(
                "{:?}",
                packets5::SubscribeReasonCode::QuotaExceeded
            )),
            "quota_exceeded"
        );
    }

    #[test]
    fn mqtt5_properties_reach_the_message() {
        let mut publish = packets5::Publish::new(
            "a/b",
            qos5(1),
            "x",
            Some(packets5::PublishProperties {
                content_type: Some("application/json".into()),
                user_properties: vec![("tenant".into(), "t1".into())],
                message_expiry_interval: Some(5),
                ..Default::default()
            }),
        );
        publish.pkid = 7;
        let received = received5(publish);
        assert_eq!(received.ack, Some(AckId { pkid: 7, qos: 1 }));
        let p = received.message.properties();
        assert_eq!(p.content_type.as_deref(), Some("application/json"));
        assert_eq!(p.user("tenant"), Some("t1"));
        assert_eq!(p.message_expiry, Some(5));
    }

    #[test]
    fn a_v5_topic_that_is_not_utf8_is_kept_as_received() {
        let mut publish = packets5::Publish::new("", qos5(0), "x", None);
        publish.topic = Bytes::from_static(b"a/\xff");
        let received = received5(publish);
        assert_eq!(received.message.topic, "a/\u{fffd}");
        assert_eq!(received.raw_topic.as_deref(), Some(&b"a/\xff"[..]));
    }
}
