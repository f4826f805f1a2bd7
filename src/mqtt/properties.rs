//! Properties of what the bridge publishes under MQTT 5 (spec §6.1): `content_type`,
//! `message_expiry`, `user_properties`, `response_topic` and `correlation_data` on an
//! `mqtt_publish` action or a republish rule, read and compiled here once for both, and
//! rendered per message into [`OutProperties`].
//!
//! The keys exist only with `mqtt.protocol = "5"`; under 3.1.1 each is a config error that
//! says so (3.1.1 has no properties: a forward would silently lose them).

use crate::config::reader::Table;
use crate::template::{self, Context, RenderError, Scope, Target, Template};

use super::wire::OutProperties;

/// The keys this module reads, for a reader that lists what a table may hold.
pub const KEYS: [&str; 5] = [
    "content_type",
    "message_expiry",
    "user_properties",
    "response_topic",
    "correlation_data",
];

/// Compiled property templates of one action or rule.
#[derive(Clone, Debug, Default)]
pub struct PropertyTemplates {
    content_type: Option<Template>,
    /// Seconds.
    message_expiry: Option<u32>,
    user: Vec<(String, Template)>,
    /// A topic: its message-controlled values are checked as in any topic.
    response_topic: Option<Template>,
    /// Sent as the rendered text's bytes; exactly `{prop.correlation_data}` passes the
    /// received bytes through unchanged (and sends none when the message had none).
    correlation_data: Option<Template>,
}

impl PropertyTemplates {
    /// Reads the property keys of `t`; `None` when it has none (or on an error, recorded).
    /// `mqtt5`: whether the bridge speaks MQTT 5.
    pub(crate) fn read(t: &mut Table<'_>, scope: &Scope<'_>, mqtt5: bool) -> Option<Self> {
        let present: Vec<&str> = KEYS.iter().copied().filter(|k| t.has(k)).collect();
        if present.is_empty() {
            return None;
        }
        if !mqtt5 {
            for key in present {
                t.ignore(key);
                t.error(
                    key,
                    "publish properties exist only in MQTT 5: set mqtt.protocol = \"5\" or \
                     remove it",
                );
            }
            return None;
        }
        let mut p = PropertyTemplates {
            content_type: opt_template(t, "content_type", Target::Value, scope),
            response_topic: opt_template(t, "response_topic", Target::Topic, scope),
            correlation_data: opt_template(t, "correlation_data", Target::Value, scope),
            ..PropertyTemplates::default()
        };
        if let Some(expiry) = t.opt_duration("message_expiry") {
            match u32::try_from(expiry.as_secs()) {
                Ok(s) if s > 0 && expiry.subsec_nanos() == 0 => p.message_expiry = Some(s),
                _ => t.error(
                    "message_expiry",
                    "must be whole seconds from 1 to 4294967295",
                ),
            }
        }
        if let Some(mut u) = t.opt_table("user_properties") {
            for name in u.keys() {
                if let Some(template) = template::read(&mut u, &name, Target::Value, scope, None) {
                    p.user.push((name, template));
                }
            }
            u.finish();
        }
        Some(p)
    }

    /// The properties for one message.
    pub fn render(&self, ctx: &Context<'_>) -> Result<OutProperties, RenderError> {
        let render = |t: &Option<Template>| t.as_ref().map(|t| t.render(ctx)).transpose();
        let mut user = Vec::with_capacity(self.user.len());
        for (name, template) in &self.user {
            user.push((name.clone(), template.render(ctx)?));
        }
        Ok(OutProperties {
            content_type: render(&self.content_type)?,
            message_expiry: self.message_expiry,
            user,
            response_topic: render(&self.response_topic)?,
            correlation_data: match &self.correlation_data {
                // Passed through as the bytes received, not their base64 text: a reply
                // must carry the requester's correlation data unchanged.
                // A request without correlation data gets a reply without it, rather than
                // failing the route.
                Some(t) if t.source() == "{prop.correlation_data}" => {
                    ctx.properties.and_then(|p| p.correlation_data.clone())
                }
                Some(t) => Some(bytes::Bytes::from(t.render(ctx)?)),
                None => None,
            },
        })
    }
}

fn opt_template(
    t: &mut Table<'_>,
    key: &str,
    target: Target,
    scope: &Scope<'_>,
) -> Option<Template> {
    if !t.has(key) {
        return None;
    }
    template::read(t, key, target, scope, None)
}
