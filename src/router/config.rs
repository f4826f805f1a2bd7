//! Reading `[[routes]]` (spec §4, §5): every key checked, every template compiled, every
//! error reported with its key path (`routes[3].actions[0].key`) in the same pass as the rest
//! of the config, so `check` lists them all at once.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use figment::value::Value;

use super::pattern::TopicPattern;
use super::route::{PayloadKind, Route, RouteTable};
use super::template::{Constraint, Scope, Target, Template};
use crate::actions::{Action, Expiry, HashFields, JsonTemplate, Op};
use crate::config::reader::{found, Errors, Table};
use crate::config::RawTable;
use crate::middleware::dedup::DedupRule;
use crate::middleware::rate_limit::{OnExceed, RateLimitRule};
use crate::middleware::session::{SessionFormat, SessionRule, Sessions};
use crate::redis::rate_limit::{Fallback, Limit, Strategy};

/// What the templates of one route may refer to.
#[derive(Clone)]
struct RouteScope {
    params: Vec<String>,
    rest_param: Option<String>,
    json: bool,
    session: bool,
    constraints: Vec<(String, Arc<Constraint>)>,
}

impl RouteScope {
    fn scope(&self) -> Scope<'_> {
        Scope {
            params: &self.params,
            rest_param: self.rest_param.as_deref(),
            json: self.json,
            session: self.session,
            fields: false,
            constraints: &self.constraints,
        }
    }
}

/// Compiles the template at `key`; `None` (error recorded) when absent and required, or bad.
/// Republish rules read theirs with it too.
pub(crate) fn template(
    t: &mut Table<'_>,
    key: &str,
    target: Target,
    scope: &Scope<'_>,
    default: Option<&str>,
) -> Option<Template> {
    let source = match t.opt_string(key) {
        Some(s) => s,
        None if t.has(key) => return None, // wrong type, already reported
        None => match default {
            Some(d) => d.to_string(),
            None => {
                t.error(key, "is required");
                return None;
            }
        },
    };
    match Template::compile(&source, target, scope) {
        Ok(template) => Some(template),
        Err(message) => {
            t.error(key, message);
            None
        }
    }
}

fn qos(t: &mut Table<'_>, key: &str, default: u8) -> u8 {
    t.parse::<u64, _>(key, |q| {
        u8::try_from(q)
            .ok()
            .filter(|q| *q <= 2)
            .ok_or_else(|| format!("expected 0, 1 or 2, found {q}"))
    })
    .unwrap_or(default)
}

fn choice<T: Copy>(t: &mut Table<'_>, key: &str, options: &[(&str, T)], default: T) -> T {
    t.parse::<String, _>(key, |s| {
        options
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                let names: Vec<String> = options.iter().map(|(n, _)| format!("{n:?}")).collect();
                format!("expected one of {}, found {s:?}", names.join(", "))
            })
    })
    .unwrap_or(default)
}

/// Reads every route; errors go to `errors`. `redis_enabled` = false refuses routes that
/// need Redis.
pub fn read_routes(raw: &[RawTable], redis_enabled: bool, errors: &Errors) -> RouteTable {
    let mut names = HashSet::new();
    let mut routes = Vec::new();
    for table in raw {
        let mut t = table.reader(errors);
        if let Some(route) = read_route(&mut t, &mut names) {
            if !redis_enabled && (route.needs_redis() || route.session.is_some()) {
                t.error(
                    "actions",
                    "this route needs Redis, but redis.enabled is false (ENABLE_REDIS)",
                );
            }
            routes.push(route);
        }
        t.finish();
    }
    RouteTable::new(routes)
}

fn read_route(t: &mut Table<'_>, names: &mut HashSet<String>) -> Option<Route> {
    let name = t.opt_string("name");
    match &name {
        None if !t.has("name") => t.error("name", "is required"),
        Some(n) if n.is_empty() => t.error("name", "may not be empty"),
        Some(n) if !names.insert(n.clone()) => {
            t.error("name", format!("another route is already named {n:?}"))
        }
        _ => {}
    }
    let pattern = match t.opt_string("topic") {
        Some(topic) => match TopicPattern::parse(&topic) {
            Ok(p) => Some(p),
            Err(e) => {
                t.error("topic", e.to_string());
                None
            }
        },
        None => {
            if !t.has("topic") {
                t.error("topic", "is required");
            }
            None
        }
    };
    let route_qos = qos(t, "qos", 1);
    let payload = choice(
        t,
        "payload",
        &[
            ("json", PayloadKind::Json),
            ("text", PayloadKind::Text),
            ("bytes", PayloadKind::Bytes),
        ],
        PayloadKind::Json,
    );
    let atomic = t.bool("atomic", true);
    let params: Vec<String> = pattern
        .as_ref()
        .map(|p| p.params().map(str::to_string).collect())
        .unwrap_or_default();
    let rest_param = pattern
        .as_ref()
        .and_then(|p| params.iter().find(|n| p.is_rest_param(n)).cloned());
    let has_session = t.has("session");

    // params.<name> constraints.
    let mut constraints = Vec::new();
    let mut param_checks = Vec::new();
    if let Some(mut p) = t.opt_table("params") {
        for key in p.keys() {
            let Some(source) = p.opt_string(&key) else {
                continue;
            };
            let known = params.contains(&key)
                || (key.starts_with("json.") && payload == PayloadKind::Json)
                || (key.starts_with("session.") && has_session);
            if !known {
                p.error(
                    &key,
                    format!(
                        "not a captured param of the topic (captured: {}), nor a json.* or session.* field",
                        if params.is_empty() { "none".to_string() } else { params.join(", ") }
                    ),
                );
                continue;
            }
            match Constraint::new(&source) {
                Ok(re) => {
                    let re = Arc::new(re);
                    if let Some(index) = params.iter().position(|n| *n == key) {
                        param_checks.push((index, key.clone(), re.clone()));
                    }
                    constraints.push((key, re));
                }
                Err(e) => p.error(&key, e),
            }
        }
        p.finish();
    }

    let scope = RouteScope {
        params,
        rest_param,
        json: payload == PayloadKind::Json,
        session: has_session,
        constraints,
    };

    let session = t.opt_table("session").and_then(|mut s| {
        // The session key is rendered before the session exists.
        let key_scope = RouteScope {
            session: false,
            ..scope.clone()
        };
        let key = template(&mut s, "key", Target::Key, &key_scope.scope(), None);
        let required = s.bool("required", false);
        let cache_ttl = s.duration("cache_ttl", Duration::from_secs(5));
        let touch = s.opt_duration("touch");
        let format = choice(
            &mut s,
            "format",
            &[("json", SessionFormat::Json), ("hash", SessionFormat::Hash)],
            SessionFormat::Json,
        );
        s.finish();
        Some(Sessions::new(SessionRule {
            key: key?,
            required,
            cache_ttl,
            touch,
            format,
        }))
    });

    let rate_limit = t.opt_table("rate_limit").and_then(|mut r| {
        // RouteMQ's default key, so both share one budget.
        let key = template(
            &mut r,
            "key",
            Target::Key,
            &scope.scope(),
            Some("rate_limit:topic:{topic}"),
        );
        let strategy = choice(
            &mut r,
            "strategy",
            &[
                ("sliding_window", Strategy::SlidingWindow),
                ("fixed_window", Strategy::FixedWindow),
                ("token_bucket", Strategy::TokenBucket),
            ],
            Strategy::SlidingWindow,
        );
        let max = if r.has("max") {
            r.parse::<u64, _>("max", |m| {
                u32::try_from(m)
                    .ok()
                    .filter(|m| *m >= 1)
                    .ok_or_else(|| format!("expected 1 to {}, found {m}", u32::MAX))
            })
        } else {
            r.error("max", "is required");
            None
        };
        let window = if r.has("window") {
            Some(r.positive_duration("window", Duration::from_secs(60)))
        } else {
            r.error("window", "is required");
            None
        };
        let burst = if r.has("burst") {
            if strategy != Strategy::TokenBucket {
                r.error("burst", "only token_bucket has a burst");
            }
            r.parse::<u64, _>("burst", |b| {
                u32::try_from(b)
                    .ok()
                    .filter(|b| *b >= 1)
                    .ok_or_else(|| format!("expected at least 1, found {b}"))
            })
        } else {
            None
        };
        let on_exceed_reply = choice(
            &mut r,
            "on_exceed",
            &[("drop", false), ("reply", true)],
            false,
        );
        let on_exceed = if on_exceed_reply {
            let topic = template(&mut r, "reply_topic", Target::Topic, &scope.scope(), None);
            let reply_qos = qos(&mut r, "reply_qos", 0);
            topic.map(|topic| OnExceed::Reply {
                topic,
                qos: reply_qos,
            })
        } else {
            for key in ["reply_topic", "reply_qos"] {
                if r.has(key) {
                    r.ignore(key);
                    r.error(key, "only used with on_exceed = \"reply\"");
                }
            }
            Some(OnExceed::Drop)
        };
        let fallback = choice(
            &mut r,
            "fallback",
            &[
                ("local", Fallback::Local),
                ("allow", Fallback::Allow),
                ("deny", Fallback::Deny),
            ],
            Fallback::Local,
        );
        r.finish();
        let mut limit = Limit::new(strategy, max?, window?);
        if let Some(b) = burst {
            limit = limit.with_burst(b);
        }
        Some(RateLimitRule {
            key: key?,
            limit,
            on_exceed: on_exceed?,
            fallback,
        })
    });

    let dedup = t.opt_table("dedup").and_then(|mut d| {
        let key = template(&mut d, "key", Target::Key, &scope.scope(), None);
        let ttl = d.positive_duration("ttl", Duration::from_secs(3600));
        let lease = d.positive_duration("lease", Duration::from_secs(30));
        d.finish();
        Some(DedupRule {
            key: key?,
            ttl,
            lease,
        })
    });

    let mut actions = Vec::new();
    let mut actions_ok = true;
    for mut a in t.tables("actions") {
        match read_action(&mut a, &scope, route_qos) {
            Some(action) => actions.push(action),
            None => actions_ok = false,
        }
        a.finish();
    }
    if !t.has("actions") {
        t.error("actions", "a route needs at least one action");
    }

    if !actions_ok {
        return None;
    }
    Some(Route {
        name: name?,
        pattern: pattern?,
        qos: route_qos,
        payload,
        param_checks,
        session,
        rate_limit,
        dedup,
        actions,
        atomic,
        metrics: Default::default(),
    })
}

const OPS: &[&str] = &[
    "set",
    "set_json",
    "hset",
    "incr",
    "lpush",
    "rpush",
    "xadd",
    "publish",
    "expire",
    "mqtt_publish",
];

fn read_action(a: &mut Table<'_>, scope: &RouteScope, route_qos: u8) -> Option<Action> {
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
        Some(template(a, "key", Target::Key, &scope.scope(), None))
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
    let value = |a: &mut Table<'_>, key: &str| {
        template(a, key, Target::Value, &scope.scope(), Some("{payload}"))
    };
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
        "xadd" => {
            let max_len = max_len(a);
            let fields = field_templates(a, scope)?;
            Op::Xadd { fields, max_len }
        }
        "publish" => {
            let channel = template(a, "channel", Target::Channel, &scope.scope(), None);
            let message = template(
                a,
                "message",
                Target::Value,
                &scope.scope(),
                Some("{payload}"),
            );
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
            let topic = template(a, "topic", Target::Topic, &scope.scope(), None);
            let payload = value(a, "payload");
            let qos = qos(a, "qos", route_qos);
            let retain = a.bool("retain", false);
            Op::MqttPublish {
                topic: topic?,
                payload: payload?,
                qos,
                retain,
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
fn field_templates(a: &mut Table<'_>, scope: &RouteScope) -> Option<Vec<(String, Template)>> {
    if !a.has("fields") {
        a.error("fields", "is required (a table of field = template)");
        return None;
    }
    let mut f = a.opt_table("fields")?;
    let mut out = Vec::new();
    let mut ok = true;
    for name in f.keys() {
        match template(&mut f, &name, Target::Value, &scope.scope(), None) {
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
    scope: &RouteScope,
) -> Option<JsonTemplate> {
    Some(match value {
        Value::String(_, s) => match Template::compile(s, Target::Value, &scope.scope()) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BridgeConfig;
    use crate::router::template::{Context, RenderError};

    /// Compiles `toml`; the `(path, message)` of every error, or the routes.
    fn compile(toml: &str) -> Result<RouteTable, Vec<(String, String)>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("bridge.toml");
        std::fs::write(&path, toml).expect("write config");
        BridgeConfig::compile(&path, &Default::default())
            .map(|(_, routes)| routes)
            .map_err(|e| {
                e.into_vec()
                    .into_iter()
                    .map(|e| (e.path, e.message))
                    .collect()
            })
    }

    const UNANCHORED: &str = r#"
[[routes]]
name = "sensor-data"
topic = "sensors/{device_id}/data"
params.device_id = "[a-z0-9]+"
params."json.id" = "[0-9]+"
[[routes.actions]]
op = "set"
key = "sensor:{device_id}:latest"
[[routes.actions]]
op = "set"
key = "id:{json.id}"
"#;

    #[test]
    fn a_constraint_matches_the_whole_param_as_if_anchored() {
        let routes = compile(UNANCHORED).expect("valid");
        let route = &routes.routes[0];
        let (_, name, re) = &route.param_checks[0];
        assert_eq!(name, "device_id");
        assert!(re.is_match("abc1"));
        for bad in ["ab:c*", ":abc", "abc*", "a b", ""] {
            assert!(!re.is_match(bad), "{bad:?} passed the constraint");
        }

        // The same constraint guards the templates: a key never holds `ab:c*`.
        let key = route.actions[0].key.as_ref().expect("key");
        let mut ctx = Context::new("sensors/ab:c*/data", b"{}");
        ctx.params = &["ab:c*"];
        assert!(matches!(
            key.render(&ctx),
            Err(RenderError::InvalidParam { .. })
        ));
        ctx.params = &["abc1"];
        assert_eq!(key.render(&ctx).as_deref(), Ok("sensor:abc1:latest"));

        // And `params."json.*"` constraints on payload values.
        let key = route.actions[1].key.as_ref().expect("key");
        for (id, ok) in [("12", true), ("1:2", false), ("x12", false)] {
            let json = serde_json::json!({ "id": id });
            let mut ctx = Context::new("sensors/abc1/data", b"{}");
            ctx.json = Some(&json);
            assert_eq!(key.render(&ctx).is_ok(), ok, "{id:?}");
        }
    }

    #[test]
    fn a_constraint_shows_as_the_operator_wrote_it() {
        let routes = compile(UNANCHORED).expect("valid");
        assert_eq!(routes.routes[0].param_checks[0].2.as_str(), "[a-z0-9]+");

        let errors = compile(
            r#"
[[routes]]
name = "r"
topic = "d/{id}"
params.id = "[a-z"
[[routes.actions]]
op = "incr"
key = "c:{id}"
"#,
        )
        .err()
        .expect("invalid");
        let (path, message) = &errors[0];
        assert_eq!(path, "routes[0].params.id");
        assert!(message.contains("[a-z"), "{message}");
        assert!(!message.contains("(?:"), "{message}");
    }
}
