//! Reading `[[republish]]` (spec §4, §7): every key checked, every template compiled, errors
//! reported with their key path (`republish[1].topic`) in the same pass as the rest of the
//! config, so `check` lists them all at once.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::channel::ChannelPattern;
use crate::config::reader::{Errors, Table};
use crate::config::RawTable;
use crate::mqtt::properties::PropertyTemplates;
use crate::template::read as template;
use crate::template::{Constraint, Scope, Target, Template};

/// Default consumer group of stream rules.
pub const DEFAULT_GROUP: &str = "routemq-bridge";
/// Default stream field holding the payload.
pub const DEFAULT_PAYLOAD_FIELD: &str = "payload";
/// Default idle time after which a pending entry is claimed.
pub const DEFAULT_CLAIM_IDLE: Duration = Duration::from_secs(60);
/// Default number of pub/sub messages held per rule while MQTT is down.
pub const DEFAULT_MAX_PENDING: usize = 10_000;

/// Where a rule's messages come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// Redis pub/sub: SUBSCRIBE a literal channel, PSUBSCRIBE one with captures.
    PubSub {
        channel: ChannelPattern,
        /// Messages held while MQTT is down; beyond it the oldest are dropped (`overflow`).
        max_pending: usize,
    },
    /// A Redis stream read through a consumer group.
    Stream {
        stream: String,
        group: String,
        payload_field: String,
        claim_idle: Duration,
    },
}

/// One `[[republish]]` entry, compiled.
#[derive(Clone, Debug)]
pub struct RepublishRule {
    pub name: String,
    pub source: Source,
    pub topic: Template,
    pub payload: Template,
    pub qos: u8,
    pub retain: bool,
    /// MQTT filters the rendered topic must match; empty = any topic.
    pub allow_topics: Vec<String>,
    /// MQTT 5 publish properties (a stream rule maps entry fields into them with
    /// `{field.*}` templates).
    pub properties: Option<PropertyTemplates>,
}

impl RepublishRule {
    /// `pubsub` or `stream`, for `check` and logs.
    pub fn source_name(&self) -> &'static str {
        match self.source {
            Source::PubSub { .. } => "pubsub",
            Source::Stream { .. } => "stream",
        }
    }
}

/// Reads every rule; errors go to `errors`. Republishing needs Redis: with `redis_enabled`
/// false any rule is an error.
pub fn read_republish(
    raw: &[RawTable],
    redis_enabled: bool,
    mqtt5: bool,
    errors: &Errors,
) -> Vec<RepublishRule> {
    let mut names = HashSet::new();
    let mut rules = Vec::new();
    for table in raw {
        let mut t = table.reader(errors);
        if !redis_enabled {
            t.error(
                "source",
                "republishing reads Redis, but redis.enabled is false (ENABLE_REDIS)",
            );
        }
        if let Some(rule) = read_rule(&mut t, &mut names, mqtt5) {
            rules.push(rule);
        }
        t.finish();
    }
    rules
}

/// With `[mqtt] share_group` set, every instance of the group runs every rule. A stream
/// rule's consumer group splits the entries between them (consumer name = client id), but
/// Redis hands each pub/sub message to every subscriber: a `pubsub` rule would publish it
/// once per instance. Warned about rather than refused: the operator may give the rule to
/// one instance of the group only. `rules` are `raw` as [`read_republish`] read them.
pub fn warn_pubsub_in_share_group(raw: &[RawTable], rules: &[RepublishRule], errors: &Errors) {
    if raw.len() != rules.len() {
        return; // some rule did not read: the load fails with its errors anyway
    }
    for (table, rule) in raw.iter().zip(rules) {
        if let Source::PubSub { .. } = rule.source {
            table.reader(errors).warn(
                "source",
                "\"pubsub\" while mqtt.share_group is set: every instance of the group \
                 subscribes, so each Redis message is published to MQTT once per instance; \
                 use source = \"stream\" (its consumer group splits the entries), or keep \
                 this rule on one instance of the group only",
            );
        }
    }
}

fn read_rule(t: &mut Table<'_>, names: &mut HashSet<String>, mqtt5: bool) -> Option<RepublishRule> {
    let name = t.opt_string("name");
    match &name {
        None if !t.has("name") => t.error("name", "is required"),
        Some(n) if n.is_empty() => t.error("name", "may not be empty"),
        Some(n) if !names.insert(n.clone()) => t.error(
            "name",
            format!("another republish rule is already named {n:?}"),
        ),
        _ => {}
    }
    let source_kind = t.parse::<String, _>("source", |s| match s.as_str() {
        "pubsub" | "stream" => Ok(s),
        other => Err(format!(
            "expected \"pubsub\" or \"stream\", found {other:?}"
        )),
    });
    if source_kind.is_none() && !t.has("source") {
        t.error("source", "is required (\"pubsub\" or \"stream\")");
    }
    let is_stream = source_kind.as_deref() == Some("stream");

    // Keys that belong to the other kind of source are errors, not silently ignored.
    let foreign: &[&str] = match source_kind.as_deref() {
        Some("pubsub") => &["stream", "group", "payload_field", "claim_idle"],
        Some("stream") => &["channel", "max_pending"],
        _ => &[],
    };
    for key in foreign {
        if t.has(key) {
            t.ignore(key);
            t.error(
                key,
                format!(
                    "not a key of source = {:?} rules",
                    source_kind.as_deref().unwrap_or("")
                ),
            );
        }
    }

    let channel = if source_kind.as_deref() == Some("pubsub") {
        match t.opt_string("channel") {
            Some(c) => match ChannelPattern::parse(&c) {
                Ok(p) => Some(p),
                Err(e) => {
                    t.error("channel", e);
                    None
                }
            },
            None => {
                if !t.has("channel") {
                    t.error("channel", "is required for source = \"pubsub\"");
                }
                None
            }
        }
    } else {
        None
    };
    let params: Vec<String> = channel
        .as_ref()
        .map(|c| c.params().map(str::to_string).collect())
        .unwrap_or_default();

    // params.<name> constraints: channel captures, or field.* for streams.
    let mut constraints = Vec::new();
    if let Some(mut p) = t.opt_table("params") {
        for key in p.keys() {
            let Some(source) = p.opt_string(&key) else {
                continue;
            };
            let known = params.contains(&key) || (is_stream && key.starts_with("field."));
            if !known {
                let what = if is_stream {
                    "not a field.* of the stream entries".to_string()
                } else {
                    format!(
                        "not a param the channel captures (captured: {})",
                        if params.is_empty() {
                            "none".to_string()
                        } else {
                            params.join(", ")
                        }
                    )
                };
                p.error(&key, what);
                continue;
            }
            match Constraint::new(&source) {
                Ok(re) => constraints.push((key, Arc::new(re))),
                Err(e) => p.error(&key, e),
            }
        }
        p.finish();
    }
    let scope = Scope {
        params: &params,
        rest_param: None,
        json: false,
        session: false,
        fields: is_stream,
        properties: false,
        constraints: &constraints,
    };
    let properties = PropertyTemplates::read(t, &scope, mqtt5);

    let topic = template(t, "topic", Target::Topic, &scope, None);
    if let Some(topic) = &topic {
        if let Err(e) = check_topic_literals(topic.source()) {
            t.error("topic", e);
        }
    }
    let payload = template(t, "payload", Target::Value, &scope, Some("{payload}"));
    let qos = t
        .parse::<u64, _>("qos", |q| {
            u8::try_from(q)
                .ok()
                .filter(|q| *q <= 2)
                .ok_or_else(|| format!("expected 0, 1 or 2, found {q}"))
        })
        .unwrap_or(1);
    let retain = t.bool("retain", false);
    let allow_topics = t.string_list("allow_topics");
    for (i, filter) in allow_topics.iter().enumerate() {
        if let Err(e) = check_filter(filter) {
            t.error("allow_topics", format!("entry {i}: {e}"));
        }
    }

    let source = match source_kind.as_deref() {
        Some("pubsub") => {
            let max_pending = t.at_least("max_pending", 1usize, DEFAULT_MAX_PENDING);
            Source::PubSub {
                channel: channel?,
                max_pending,
            }
        }
        Some("stream") => {
            let stream = match t.opt_string("stream") {
                Some(s) if s.is_empty() => {
                    t.error("stream", "may not be empty");
                    None
                }
                Some(s) => Some(s),
                None => {
                    if !t.has("stream") {
                        t.error("stream", "is required for source = \"stream\"");
                    }
                    None
                }
            };
            let group = t.non_empty_string("group", DEFAULT_GROUP);
            let payload_field = t.non_empty_string("payload_field", DEFAULT_PAYLOAD_FIELD);
            let claim_idle = t.positive_duration("claim_idle", DEFAULT_CLAIM_IDLE);
            Source::Stream {
                stream: stream?,
                group,
                payload_field,
                claim_idle,
            }
        }
        _ => return None,
    };
    Some(RepublishRule {
        name: name?,
        source,
        topic: topic?,
        payload: payload?,
        qos,
        retain,
        allow_topics,
        properties,
    })
}

/// The literal parts of a topic template may hold no wildcard, NUL or leading `$`: such a
/// rule could never publish, so it is a config error rather than a stream of `invalid`.
fn check_topic_literals(source: &str) -> Result<(), String> {
    let literal: String = {
        // Strip `{...}` placeholders; `{{`/`}}` stand for braces, harmless here.
        let mut out = String::new();
        let mut depth = false;
        for c in source.chars() {
            match c {
                '{' => depth = !depth,
                '}' => depth = false,
                c if !depth => out.push(c),
                _ => {}
            }
        }
        out
    };
    if literal.contains(['+', '#']) {
        return Err("a topic may not contain the wildcards `+` or `#`".into());
    }
    if literal.contains('\0') {
        return Err("a topic may not contain NUL".into());
    }
    if source.starts_with('$') {
        return Err("a topic may not start with `$` (broker-reserved topics)".into());
    }
    Ok(())
}

/// An MQTT subscription filter: `+` and `#` stand alone in their level, `#` only last.
pub fn check_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("an empty filter matches nothing".into());
    }
    if filter.contains('\0') {
        return Err("a filter may not contain NUL".into());
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains(['+', '#']) && level.len() > 1 {
            return Err(format!(
                "{filter:?}: `+` and `#` must stand alone in their level"
            ));
        }
        if *level == "#" && i != levels.len() - 1 {
            return Err(format!("{filter:?}: `#` may only be the last level"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compiles `toml`; the `(path, message)` of every error, or the rules.
    fn compile(toml: &str) -> Result<Vec<RepublishRule>, Vec<(String, String)>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("bridge.toml");
        std::fs::write(&path, toml).expect("write config");
        crate::config::load(&path, &Default::default(), |mut root, errors| {
            let enabled = crate::config::redis::read(root.table("redis")).enabled;
            let rules = read_republish(&root.raw_tables("republish"), enabled, false, errors);
            root.finish();
            rules
        })
        .map_err(|e| {
            e.into_vec()
                .into_iter()
                .map(|e| (e.path, e.message))
                .collect()
        })
    }

    #[test]
    fn the_spec_examples_compile_with_their_defaults() {
        let rules = compile(
            r#"
[[republish]]
name = "device-commands"
source = "pubsub"
channel = "commands:{device_id}"
topic = "devices/{device_id}/commands"
qos = 1

[[republish]]
name = "alerts"
source = "stream"
stream = "alerts:out"
topic = "alerts/{field.site}"
"#,
        )
        .expect("valid");
        assert_eq!(rules.len(), 2);
        match &rules[0].source {
            Source::PubSub {
                channel,
                max_pending,
            } => {
                assert_eq!(channel.glob(), "commands:*");
                assert_eq!(*max_pending, DEFAULT_MAX_PENDING);
            }
            other => panic!("{other:?}"),
        }
        match &rules[1].source {
            Source::Stream {
                group,
                payload_field,
                claim_idle,
                ..
            } => {
                assert_eq!(group, DEFAULT_GROUP);
                assert_eq!(payload_field, DEFAULT_PAYLOAD_FIELD);
                assert_eq!(*claim_idle, DEFAULT_CLAIM_IDLE);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(rules[1].qos, 1);
        assert!(rules[1].payload.is_raw_payload());
    }

    #[test]
    fn every_rule_error_is_reported_with_its_key_path() {
        let errors = compile(
            r#"
[[republish]]
name = "a"
source = "pubsub"
channel = "commands:{device_id}"
topic = "devices/{unknown}/x"
payload = "{field.x}"
group = "g"
allow_topics = ["a/#/b"]

[[republish]]
name = "a"
source = "stream"
topic = "$SYS/{field.site}"
params.device_id = "x"

[[republish]]
source = "kafka"
topic = "t"
"#,
        )
        .expect_err("invalid");
        let has =
            |path: &str, needle: &str| errors.iter().any(|(p, m)| p == path && m.contains(needle));
        assert!(has("republish[0].topic", "unknown"), "{errors:#?}");
        assert!(has("republish[0].payload", "stream entries"), "{errors:#?}");
        assert!(has("republish[0].group", "pubsub"), "{errors:#?}");
        assert!(
            has("republish[0].allow_topics", "last level"),
            "{errors:#?}"
        );
        assert!(has("republish[1].name", "already named"), "{errors:#?}");
        assert!(has("republish[1].stream", "required"), "{errors:#?}");
        assert!(has("republish[1].topic", "`$`"), "{errors:#?}");
        assert!(has("republish[1].params.device_id", "field"), "{errors:#?}");
        assert!(has("republish[2].name", "required"), "{errors:#?}");
        assert!(has("republish[2].source", "kafka"), "{errors:#?}");
    }

    #[test]
    fn a_channel_param_constraint_matches_the_whole_value() {
        let rules = compile(
            r#"
[[republish]]
name = "commands"
source = "pubsub"
channel = "commands:{device_id}"
params.device_id = "[a-z0-9]+"
topic = "devices/{device_id}/commands"
"#,
        )
        .expect("valid");
        let mut ctx = crate::template::Context::new("", b"");
        ctx.params = &["ab/other"];
        assert!(rules[0].topic.render(&ctx).is_err(), "a `/` got through");
        ctx.params = &["ab1"];
        assert_eq!(
            rules[0].topic.render(&ctx).as_deref(),
            Ok("devices/ab1/commands")
        );
    }

    #[test]
    fn republishing_without_redis_is_a_config_error() {
        let errors = compile(
            r#"
[redis]
enabled = false

[[republish]]
name = "a"
source = "pubsub"
channel = "c"
topic = "t"
"#,
        )
        .expect_err("invalid");
        assert!(errors
            .iter()
            .any(|(p, m)| p == "republish[0].source" && m.contains("redis")));
    }

    #[test]
    fn filters_follow_mqtt_rules() {
        assert!(check_filter("devices/+/commands").is_ok());
        assert!(check_filter("alerts/#").is_ok());
        assert!(check_filter("a/#/b").is_err());
        assert!(check_filter("a/b+").is_err());
        assert!(check_filter("").is_err());
    }

    #[test]
    fn topic_literals_may_not_hold_wildcards_or_dollar() {
        assert!(check_topic_literals("devices/{id}/commands").is_ok());
        assert!(check_topic_literals("devices/+/commands").is_err());
        assert!(check_topic_literals("$SYS/{id}").is_err());
        assert!(check_topic_literals("a/{{x}}").is_ok());
    }
}
