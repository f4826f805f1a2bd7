//! A received MQTT message as the bridge sees it, whichever protocol brought it: topic,
//! payload, QoS and — under MQTT 5 (spec §6.1) — its properties.
//!
//! A leaf of its own, below both the MQTT source that fills it and the router and templates
//! that read it, so neither has to know rumqttc's 3.1.1 or 5 packet types: the protocol
//! stays inside `mqtt`, and a message can be stored and replayed (the spool) without them.

use std::time::{Duration, Instant};

use bytes::Bytes;

/// One message received from the broker.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Message {
    /// The topic as received (a lossy rendering when it was not UTF-8; see
    /// `mqtt::Inbound::refusal`).
    pub topic: String,
    pub payload: Bytes,
    /// 0, 1 or 2.
    pub qos: u8,
    /// MQTT 5 properties; `None` under 3.1.1 and for a message that carried none.
    pub properties: Option<Box<Properties>>,
}

impl Message {
    /// The message's properties, empty when it has none.
    pub fn properties(&self) -> &Properties {
        static NONE: Properties = Properties {
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user: Vec::new(),
            message_expiry: None,
        };
        self.properties.as_deref().unwrap_or(&NONE)
    }

    /// When the message expires (its Message Expiry Interval counted from `received`, as
    /// the broker already took off what it spent queued), if it does.
    pub fn expires(&self, received: Instant) -> Option<Instant> {
        let seconds = self.properties.as_ref()?.message_expiry?;
        received.checked_add(Duration::from_secs(u64::from(seconds)))
    }
}

/// The MQTT 5 properties of a PUBLISH that the bridge reads (spec §6.1): they feed the
/// `{prop.*}` and `{user.NAME}` templates, and the expiry decides outcome `expired`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Properties {
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    /// Binary; templates see it in base64.
    pub correlation_data: Option<Bytes>,
    /// User properties in the order received; a name may repeat (templates take the first).
    pub user: Vec<(String, String)>,
    /// Message Expiry Interval, seconds, as delivered.
    pub message_expiry: Option<u32>,
}

impl Properties {
    /// True when nothing is set: such a message needs no properties at all.
    pub fn is_empty(&self) -> bool {
        *self == Properties::default()
    }

    /// The properties as bytes for storage (the spool): compact JSON, the correlation data
    /// in base64. [`Properties::decode`] reads it back.
    pub fn encode(&self) -> Vec<u8> {
        use base64::Engine as _;
        let mut map = serde_json::Map::new();
        let mut put = |key: &str, value: serde_json::Value| {
            map.insert(key.to_string(), value);
        };
        if let Some(v) = &self.content_type {
            put("content_type", v.as_str().into());
        }
        if let Some(v) = &self.response_topic {
            put("response_topic", v.as_str().into());
        }
        if let Some(v) = &self.correlation_data {
            put(
                "correlation_data",
                base64::engine::general_purpose::STANDARD.encode(v).into(),
            );
        }
        if !self.user.is_empty() {
            let pairs: Vec<serde_json::Value> = self
                .user
                .iter()
                .map(|(k, v)| serde_json::json!([k, v]))
                .collect();
            put("user", pairs.into());
        }
        if let Some(v) = self.message_expiry {
            put("message_expiry", v.into());
        }
        serde_json::Value::Object(map).to_string().into_bytes()
    }

    /// What [`Properties::encode`] wrote; `None` when `bytes` is not that.
    pub fn decode(bytes: &[u8]) -> Option<Properties> {
        use base64::Engine as _;
        let value: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        let map = value.as_object()?;
        let text = |key: &str| map.get(key).and_then(|v| v.as_str()).map(str::to_string);
        let correlation_data = match map.get("correlation_data") {
            Some(v) => Some(Bytes::from(
                base64::engine::general_purpose::STANDARD
                    .decode(v.as_str()?)
                    .ok()?,
            )),
            None => None,
        };
        let mut user = Vec::new();
        if let Some(pairs) = map.get("user") {
            for pair in pairs.as_array()? {
                match pair.as_array()?.as_slice() {
                    [k, v] => user.push((k.as_str()?.to_string(), v.as_str()?.to_string())),
                    _ => return None,
                }
            }
        }
        let message_expiry = match map.get("message_expiry") {
            Some(v) => Some(u32::try_from(v.as_u64()?).ok()?),
            None => None,
        };
        Some(Properties {
            content_type: text("content_type"),
            response_topic: text("response_topic"),
            correlation_data,
            user,
            message_expiry,
        })
    }

    /// The first user property called `name`.
    pub fn user(&self, name: &str) -> Option<&str> {
        self.user
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_without_expiry_never_expires() {
        let now = Instant::now();
        assert_eq!(Message::default().expires(now), None);
        let with = Message {
            properties: Some(Box::new(Properties {
                message_expiry: Some(2),
                ..Properties::default()
            })),
            ..Message::default()
        };
        assert_eq!(with.expires(now), Some(now + Duration::from_secs(2)));
    }

    #[test]
    fn properties_read_back_what_was_stored() {
        let p = Properties {
            content_type: Some("application/json".into()),
            response_topic: Some("r/1".into()),
            correlation_data: Some(Bytes::from_static(b"\x00\xffid")),
            user: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
            message_expiry: Some(30),
        };
        assert_eq!(Properties::decode(&p.encode()), Some(p));
        assert_eq!(
            Properties::decode(&Properties::default().encode()),
            Some(Properties::default())
        );
        assert_eq!(Properties::decode(b"not json"), None);
        assert_eq!(Properties::decode(br#"{"user":[["only one"]]}"#), None);
    }

    #[test]
    fn the_first_user_property_of_a_name_wins() {
        let p = Properties {
            user: vec![("a".into(), "1".into()), ("a".into(), "2".into())],
            ..Properties::default()
        };
        assert_eq!(p.user("a"), Some("1"));
        assert_eq!(p.user("b"), None);
    }
}
