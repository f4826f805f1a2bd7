//! Reading `[[routes]]` (spec §4, §5): every key checked, every template compiled, every
//! error reported with its key path (`routes[3].actions[0].key`) in the same pass as the rest
//! of the config, so `check` lists them all at once.

use std::collections::HashSet;
use std::sync::Arc;

use super::pattern::TopicPattern;
use super::route::{PayloadKind, Route, RouteTable};
use crate::actions::read_action;
use crate::config::reader::{Errors, Table};
use crate::config::RawTable;
use crate::middleware::dedup::DedupRule;
use crate::middleware::rate_limit::RateLimitRule;
use crate::middleware::session::Sessions;
use crate::template::{Constraint, Scope, Template};

/// What the templates of one route may refer to.
#[derive(Clone)]
struct RouteScope {
    params: Vec<String>,
    rest_param: Option<String>,
    json: bool,
    session: bool,
    /// Messages arrive over MQTT 5: `{prop.*}` and `{user.*}` exist.
    properties: bool,
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
            properties: self.properties,
            constraints: &self.constraints,
        }
    }
}

/// What the rest of the config decides about every route.
#[derive(Clone, Copy, Debug)]
pub struct RouteEnv {
    /// `redis.enabled` = false refuses routes that need Redis.
    pub redis_enabled: bool,
    /// `[redis] cluster` set: atomic routes whose keys may land in different slots are
    /// refused (spec §10).
    pub cluster: bool,
    /// `mqtt.protocol = "5"`: properties (`{prop.*}`, `{user.*}`) and `honor_expiry` exist
    /// (spec §6.1); under 3.1.1 they are config errors that say so.
    pub mqtt5: bool,
}

/// Reads every route; errors go to `errors`.
pub fn read_routes(raw: &[RawTable], env: RouteEnv, errors: &Errors) -> RouteTable {
    let RouteEnv {
        redis_enabled,
        cluster,
        mqtt5,
    } = env;
    let mut names = HashSet::new();
    let mut routes = Vec::new();
    for table in raw {
        let mut t = table.reader(errors);
        if let Some(route) = read_route(&mut t, &mut names, mqtt5) {
            if !redis_enabled && (route.needs_redis() || route.session.is_some()) {
                t.error(
                    "actions",
                    "this route needs Redis, but redis.enabled is false (ENABLE_REDIS)",
                );
            }
            if cluster && route.atomic {
                if let Some(message) = cross_slot(&route) {
                    t.error("atomic", message);
                }
            }
            routes.push(route);
        }
        t.finish();
    }
    RouteTable::new(routes)
}

/// Why an atomic route cannot run on Redis Cluster, with the fix: its MULTI/EXEC (actions
/// and dedup done mark) must stay in one slot, which is proven only when every key template
/// carries the same hash tag, or there is only one key template. `None` when it is proven.
fn cross_slot(route: &Route) -> Option<String> {
    let keys: Vec<&Template> = route
        .actions
        .iter()
        .filter_map(|a| a.key.as_ref())
        .chain(route.dedup.as_ref().map(|d| &d.key))
        .collect();
    if keys.len() <= 1 {
        return None;
    }
    let tags: Vec<Option<String>> = keys.iter().map(|k| k.hash_tag()).collect();
    if tags[0].is_some() && tags.iter().all(|t| *t == tags[0]) {
        return None;
    }
    // The fix: one tag for all, the first tag already written, else the first key's first
    // placeholder (`{device_id}` → `{{{device_id}}}`).
    let tag = tags
        .iter()
        .flatten()
        .next()
        .cloned()
        .or_else(|| keys.iter().find_map(|k| k.first_placeholder()));
    let fixed: Vec<String> = keys
        .iter()
        .map(|k| match &tag {
            Some(tag) if k.hash_tag().as_ref() == Some(tag) => k.source().to_string(),
            Some(tag) if k.hash_tag().is_none() && k.source().contains(tag.as_str()) => k
                .source()
                .replacen(tag.as_str(), &format!("{{{{{tag}}}}}"), 1),
            Some(tag) => format!("{{{{{tag}}}}}:{}", k.source()),
            None => k.source().to_string(),
        })
        .collect();
    let written: Vec<String> = keys.iter().map(|k| format!("{:?}", k.source())).collect();
    let fixed: Vec<String> = fixed.iter().map(|k| format!("{k:?}")).collect();
    Some(format!(
        "route {name:?} is atomic (one MULTI/EXEC), but with redis.cluster its keys {written} \
         cannot be proven to share a slot: give every key (actions and dedup) the same hash \
         tag, written with doubled braces, e.g. {fixed} (`sensor:{{{{{{device_id}}}}}}:latest` \
         renders `sensor:{{d1}}:latest`), or set `atomic = false` if the writes may land apart",
        name = route.name,
        written = written.join(", "),
        fixed = fixed.join(", "),
    ))
}

fn read_route(t: &mut Table<'_>, names: &mut HashSet<String>, mqtt5: bool) -> Option<Route> {
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
    let route_qos = t.qos("qos", 1);
    let payload = t.choice(
        "payload",
        &[
            ("json", PayloadKind::Json),
            ("text", PayloadKind::Text),
            ("bytes", PayloadKind::Bytes),
        ],
        PayloadKind::Json,
    );
    let atomic = t.bool("atomic", true);
    let honor_expiry = t.bool("honor_expiry", true);
    if t.has("honor_expiry") && !mqtt5 {
        t.error(
            "honor_expiry",
            "message expiry exists only in MQTT 5: set mqtt.protocol = \"5\" or remove it",
        );
    }
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
                || (key.starts_with("session.") && has_session)
                || ((key.starts_with("user.") || key.starts_with("prop.")) && mqtt5);
            if !known {
                p.error(
                    &key,
                    format!(
                        "not a captured param of the topic (captured: {}), nor a json.*, session.* (with a session), \
                         user.* or prop.* (with mqtt.protocol = \"5\") field",
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
        properties: mqtt5,
        constraints,
    };

    // The session key is rendered before the session exists.
    let key_scope = RouteScope {
        session: false,
        ..scope.clone()
    };
    let session = t
        .opt_table("session")
        .and_then(|s| Sessions::read(s, &key_scope.scope()));
    let rate_limit = t
        .opt_table("rate_limit")
        .and_then(|r| RateLimitRule::read(r, &scope.scope()));
    let dedup = t
        .opt_table("dedup")
        .and_then(|d| DedupRule::read(d, &scope.scope()));

    let mut actions = Vec::new();
    let mut actions_ok = true;
    for mut a in t.tables("actions") {
        match read_action(&mut a, &scope.scope(), route_qos) {
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
        honor_expiry: honor_expiry && mqtt5,
        metrics: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::{Context, RenderError};

    /// Compiles `toml`; the `(path, message)` of every error, or the routes.
    fn compile(toml: &str) -> Result<RouteTable, Vec<(String, String)>> {
        compile_for(toml, false)
    }

    /// Like [`compile`], for a bridge on Redis Cluster when `cluster`.
    fn compile_for(toml: &str, cluster: bool) -> Result<RouteTable, Vec<(String, String)>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("bridge.toml");
        std::fs::write(&path, toml).expect("write config");
        crate::config::load(&path, &Default::default(), |mut root, errors| {
            let env = RouteEnv {
                redis_enabled: true,
                cluster,
                mqtt5: false,
            };
            let routes = read_routes(&root.raw_tables("routes"), env, errors);
            root.finish();
            routes
        })
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

    /// One route on `d/{id}` (JSON payload) with `lines` (actions, dedup, atomic).
    fn cluster_route(lines: &str) -> String {
        format!("[[routes]]\nname = \"r\"\ntopic = \"d/{{id}}\"\n{lines}\n")
    }

    const UNTAGGED: &str = "[[routes.actions]]\nop = \"set\"\nkey = \"sensor:{id}:latest\"\n\
                            [[routes.actions]]\nop = \"rpush\"\nkey = \"sensor:{id}:history\"\n";

    #[test]
    fn on_a_cluster_an_atomic_route_whose_keys_may_span_slots_is_refused_with_the_fix() {
        let errors = compile_for(&cluster_route(UNTAGGED), true)
            .err()
            .expect("refused");
        assert_eq!(errors.len(), 1, "{errors:?}");
        let (path, message) = &errors[0];
        assert_eq!(path, "routes[0].atomic");
        for needle in [
            "\"r\"",
            "hash tag",
            "\"sensor:{{{id}}}:latest\"",
            "\"sensor:{{{id}}}:history\"",
            "atomic = false",
        ] {
            assert!(message.contains(needle), "{needle} missing from: {message}");
        }
        // Without a cluster, and with `atomic = false`, the same route is fine.
        compile_for(&cluster_route(UNTAGGED), false).expect("single node");
        compile_for(&cluster_route(&format!("atomic = false\n{UNTAGGED}")), true)
            .expect("non-atomic routes may span slots");
    }

    #[test]
    fn on_a_cluster_keys_sharing_one_hash_tag_are_accepted() {
        let tagged = "dedup = { key = \"dedup:{{{id}}}:{json.seq}\" }\n\
                      [[routes.actions]]\nop = \"set\"\nkey = \"sensor:{{{id}}}:latest\"\n\
                      [[routes.actions]]\nop = \"rpush\"\nkey = \"{{{id}}}:history\"\n";
        compile_for(&cluster_route(tagged), true).expect("one tag");
        let single = "[[routes.actions]]\nop = \"set\"\nkey = \"sensor:{id}\"\n";
        compile_for(&cluster_route(single), true).expect("one key is one slot");
        let literal = "[[routes.actions]]\nop = \"set\"\nkey = \"{{site}}:{id}\"\n\
                       [[routes.actions]]\nop = \"incr\"\nkey = \"{{site}}:count\"\n";
        compile_for(&cluster_route(literal), true).expect("a literal tag is a tag");
    }

    #[test]
    fn on_a_cluster_the_dedup_key_counts_and_tags_must_be_equal() {
        // The done mark is written in the MULTI/EXEC: an untagged dedup key spans slots.
        let dedup_apart = "dedup = { key = \"dedup:{id}:{json.seq}\" }\n\
                           [[routes.actions]]\nop = \"set\"\nkey = \"sensor:{{{id}}}\"\n";
        let errors = compile_for(&cluster_route(dedup_apart), true)
            .err()
            .expect("refused");
        assert!(
            errors[0].1.contains("\"dedup:{{{id}}}:{json.seq}\""),
            "{errors:?}"
        );
        for refused in [
            // Different tags.
            "[[routes.actions]]\nop = \"set\"\nkey = \"a:{{{id}}}\"\n\
             [[routes.actions]]\nop = \"set\"\nkey = \"b:{{{json.x}}}\"\n",
            // An empty tag is no tag: Redis hashes the whole key.
            "[[routes.actions]]\nop = \"set\"\nkey = \"a:{{}}:{id}\"\n\
             [[routes.actions]]\nop = \"set\"\nkey = \"b:{{}}:{id}\"\n",
            // A fresh uuid per key is not one value.
            "[[routes.actions]]\nop = \"set\"\nkey = \"a:{{{uuid}}}\"\n\
             [[routes.actions]]\nop = \"set\"\nkey = \"b:{{{uuid}}}\"\n",
        ] {
            assert!(
                compile_for(&cluster_route(refused), true).is_err(),
                "{refused}"
            );
        }
    }
}
