//! Reading `[[routes.actions]]` (spec §5.2): every op's keys, checked and compiled into an
//! [`Action`] when the config is loaded. A new op is a name in [`OPS`], its reading here,
//! and its variant and rendering in `mod.rs`.

use std::time::Duration;

use figment::value::Value;

use super::{Action, Expiry, HashFields, JsonTemplate, Op};
use crate::config::reader::{found, Table};
use crate::mqtt::properties::PropertyTemplates;
use crate::template::{read as template, Scope, Target, Template};

/// Every op an action may name.
pub const OPS: &[&str] = &[
    "set",
    "set_json",
    "hset",
    "incr",
    "lpush",
    "rpush",
    "xadd",
    "zadd",
    "publish",
    "expire",
    "mqtt_publish",
];

pub(crate) fn read_action(a: &mut Table<'_>, scope: &Scope<'_>, route_qos: u8) -> Option<Action> {
    let op_name = match a.opt_string("op") {
        Some(op) if OPS.contains(&op.as_str()) => op,
        Some(op) => {
            a.error(
                "op",
                format!("unknown op {op:?}; one of {}", OPS.join(", ")),
            );
            return None;
        }
        None => {
            if !a.has("op") {
                a.error("op", "is required");
            }
            return None;
        }
    };
    let has_key = !matches!(op_name.as_str(), "publish" | "mqtt_publish");
    let key = if has_key {
        Some(template(a, "key", Target::Key, scope, None))
    } else {
        None
    };
    let expiry = match (a.has("ex"), a.has("px")) {
        (true, true) => {
            a.ignore("ex");
            a.ignore("px");
            a.error("px", "give ex or px, not both");
            None
        }
        (true, false) => Some(Expiry::from_ex(
            a.positive_duration("ex", Duration::from_secs(1)),
        )),
        (false, true) => Some(Expiry::from_px(
            a.positive_duration("px", Duration::from_secs(1)),
        )),
        (false, false) => None,
    };
    if !has_key && expiry.is_some() {
        a.error("ex", "publish and mqtt_publish write no key to expire");
    }
    let value =
        |a: &mut Table<'_>, key: &str| template(a, key, Target::Value, scope, Some("{payload}"));
    let max_len = |a: &mut Table<'_>| a.has("max_len").then(|| a.at_least("max_len", 1u64, 1));
    let op = match op_name.as_str() {
        "set" => {
            let value = value(a, "value");
            let nx = a.bool("nx", false);
            let xx = a.bool("xx", false);
            if nx && xx {
                a.error("xx", "nx and xx exclude each other");
            }
            Op::Set {
                value: value?,
                nx,
                xx,
            }
        }
        "set_json" => {
            let value = match a.value("value") {
                None => {
                    if !scope.json {
                        a.error("value", "set_json without a value writes the JSON payload: the route needs payload = \"json\"");
                        return None;
                    }
                    None
                }
                Some(v) => Some(json_template(a, v, "value", scope)?),
            };
            Op::SetJson { value }
        }
        "hset" => {
            let fields = match a.value("fields") {
                Some(Value::String(_, s)) if s == "json" => {
                    if !scope.json {
                        a.error("fields", "fields = \"json\" needs payload = \"json\"");
                        return None;
                    }
                    HashFields::Json
                }
                Some(Value::Dict(..)) => HashFields::Templates(field_templates(a, scope)?),
                Some(other) => {
                    a.error(
                        "fields",
                        format!("expected a table or \"json\", found {}", found(other)),
                    );
                    return None;
                }
                None => {
                    a.error("fields", "is required");
                    return None;
                }
            };
            Op::Hset { fields }
        }
        "incr" => {
            let by = a.get::<i64>("by").unwrap_or(1);
            Op::Incr { by }
        }
        "lpush" | "rpush" => {
            let value = value(a, "value")?;
            let max_len = max_len(a);
            if op_name == "lpush" {
                Op::Lpush { value, max_len }
            } else {
                Op::Rpush { value, max_len }
            }
        }
        "zadd" => {
            let score = template(a, "score", Target::Value, scope, Some("{now_ms}"));
            let member = value(a, "member");
            let max_len = max_len(a);
            Op::Zadd {
                score: score?,
                member: member?,
                max_len,
            }
        }
        "xadd" => {
            let max_len = max_len(a);
            let fields = field_templates(a, scope)?;
            Op::Xadd { fields, max_len }
        }
        "publish" => {
            let channel = template(a, "channel", Target::Channel, scope, None);
            let message = template(a, "message", Target::Value, scope, Some("{payload}"));
            Op::Publish {
                channel: channel?,
                message: message?,
            }
        }
        "expire" => {
            if expiry.is_none() {
                a.error("ex", "expire needs ex or px");
            }
            Op::Expire
        }
        _ => {
            let topic = template(a, "topic", Target::Topic, scope, None);
            let payload = value(a, "payload");
            let qos = a.qos("qos", route_qos);
            let retain = a.bool("retain", false);
            // A route's scope has properties exactly when the bridge speaks MQTT 5.
            let properties = PropertyTemplates::read(a, scope, scope.properties).map(Box::new);
            Op::MqttPublish {
                topic: topic?,
                payload: payload?,
                qos,
                retain,
                properties,
            }
        }
    };
    let key = match key {
        Some(k) => Some(k?),
        None => None,
    };
    Some(Action { op, key, expiry })
}

/// `fields = { name = "template", … }` of hset / xadd.
fn field_templates(a: &mut Table<'_>, scope: &Scope<'_>) -> Option<Vec<(String, Template)>> {
    if !a.has("fields") {
        a.error("fields", "is required (a table of field = template)");
        return None;
    }
    let mut f = a.opt_table("fields")?;
    let mut out = Vec::new();
    let mut ok = true;
    for name in f.keys() {
        match template(&mut f, &name, Target::Value, scope, None) {
            Some(t) => out.push((name, t)),
            None => ok = false,
        }
    }
    f.finish();
    if out.is_empty() && ok {
        a.error("fields", "needs at least one field");
        ok = false;
    }
    ok.then_some(out)
}

/// A `set_json` value: tables, arrays and literals, with string leaves as templates.
fn json_template(
    a: &Table<'_>,
    value: &Value,
    path: &str,
    scope: &Scope<'_>,
) -> Option<JsonTemplate> {
    Some(match value {
        Value::String(_, s) => match Template::compile(s, Target::Value, scope) {
            Ok(t) => JsonTemplate::Text(t),
            Err(message) => {
                a.error(path, message);
                return None;
            }
        },
        Value::Char(_, c) => JsonTemplate::Literal(serde_json::Value::String(c.to_string())),
        Value::Bool(_, b) => JsonTemplate::Literal(serde_json::Value::Bool(*b)),
        Value::Num(_, n) => {
            let json = if let Some(i) = n.to_i128().and_then(|i| i64::try_from(i).ok()) {
                serde_json::Value::from(i)
            } else {
                n.to_f64()
                    .and_then(serde_json::Number::from_f64)
                    .map(serde_json::Value::Number)
                    .unwrap_or(serde_json::Value::Null)
            };
            JsonTemplate::Literal(json)
        }
        Value::Empty(..) => JsonTemplate::Literal(serde_json::Value::Null),
        Value::Array(_, items) => {
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                out.push(json_template(a, item, &format!("{path}[{i}]"), scope)?);
            }
            JsonTemplate::Array(out)
        }
        Value::Dict(_, dict) => {
            let mut out = Vec::new();
            for (k, v) in dict {
                out.push((
                    k.clone(),
                    json_template(a, v, &format!("{path}.{k}"), scope)?,
                ));
            }
            JsonTemplate::Object(out)
        }
    })
}
