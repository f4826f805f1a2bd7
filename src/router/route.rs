//! A compiled route (spec §5): its pattern, payload kind, middleware and actions, all
//! checked and compiled when the config is loaded, so a message only renders.

use std::sync::Arc;

use serde_json::Value;

use super::pattern::{cover, TopicPattern};
use crate::actions::Action;
use crate::middleware::dedup::DedupRule;
use crate::middleware::rate_limit::RateLimitRule;
use crate::middleware::session::Sessions;
use crate::mqtt::Subscription;
use crate::outcome::{Outcome, Reason};
use crate::stage::Step;
use crate::template::Constraint;

/// A message's payload parsed as JSON, once for all the routes it matches (or why not).
pub type ParsedJson = Option<Result<Value, String>>;

/// How a route reads its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PayloadKind {
    /// Parsed as JSON (`{json.*}` available); invalid JSON is `invalid`.
    #[default]
    Json,
    /// UTF-8 text; anything else is `invalid`.
    Text,
    /// Any bytes; `{payload}` alone as a value writes them untouched.
    Bytes,
}

/// One `[[routes]]` entry, compiled.
pub struct Route {
    pub name: String,
    pub pattern: TopicPattern,
    pub qos: u8,
    pub payload: PayloadKind,
    /// `params.<name>` constraints on captured params, checked on every match.
    pub param_checks: Vec<(usize, String, Arc<Constraint>)>,
    pub session: Option<Sessions>,
    pub rate_limit: Option<RateLimitRule>,
    pub dedup: Option<DedupRule>,
    pub actions: Vec<Action>,
    /// One MULTI/EXEC per message (default), or a plain pipeline.
    pub atomic: bool,
    /// MQTT 5: a message whose Message Expiry Interval passed before it could be written
    /// is outcome `invalid` (`expired`), not written late (spec §6.1).
    pub honor_expiry: bool,
    /// This route's metric handles (taken on first use).
    pub metrics: crate::events::RouteMetrics,
}

impl Route {
    /// Whether this route needs Redis for a message that passes its rate limit (a route that
    /// only forwards over MQTT does not, so it keeps flowing while Redis is down).
    pub fn needs_redis(&self) -> bool {
        self.dedup.is_some() || self.actions.iter().any(Action::needs_redis)
    }

    /// Whether a message on this route waits while Redis is down: it writes, dedups, or
    /// reads a session (a rate limit falls back locally and does not wait). What the spool
    /// takes (spec §6.2).
    pub fn waits_for_redis(&self) -> bool {
        self.needs_redis() || self.session.is_some()
    }

    /// What comes before the stages: the payload fits `max_payload` and is what the route
    /// reads (JSON parsed once into `json`, shared by the message's routes; text valid
    /// UTF-8), and every captured param matches its constraint.
    pub fn admit<'m>(
        &self,
        payload: &[u8],
        captures: &[&str],
        max_payload: usize,
        json: &'m mut ParsedJson,
    ) -> Step<Option<&'m Value>> {
        if payload.len() > max_payload {
            return Err(Outcome::invalid(
                Reason::PayloadTooLarge,
                format!("{} bytes, max_payload is {max_payload}", payload.len()),
            ));
        }
        let json = match self.payload {
            PayloadKind::Json => {
                let parsed = json.get_or_insert_with(|| {
                    serde_json::from_slice::<Value>(payload).map_err(|e| e.to_string())
                });
                match parsed {
                    Ok(v) => Some(&*v),
                    Err(e) => return Err(Outcome::invalid(Reason::InvalidJson, e.clone())),
                }
            }
            PayloadKind::Text => {
                if let Err(e) = std::str::from_utf8(payload) {
                    return Err(Outcome::invalid(Reason::InvalidUtf8, e.to_string()));
                }
                None
            }
            PayloadKind::Bytes => None,
        };
        self.check_params(captures)?;
        Ok(json)
    }

    /// Every captured param matches its `params.<name>` constraint.
    pub fn check_params(&self, captures: &[&str]) -> Step<()> {
        for (index, name, re) in &self.param_checks {
            let value = captures.get(*index).copied().unwrap_or("");
            if !re.is_match(value) {
                return Err(Outcome::invalid(
                    Reason::InvalidParam,
                    format!("param `{name}` = {value:?} does not match {}", re.as_str()),
                ));
            }
        }
        Ok(())
    }

    /// Whether this route publishes to MQTT (an `mqtt_publish` action or a rate-limit
    /// reply), so it needs the outgoing connection.
    pub fn publishes(&self) -> bool {
        self.actions.iter().any(|a| !a.needs_redis())
            || self.rate_limit.as_ref().is_some_and(|r| {
                matches!(
                    r.on_exceed,
                    crate::middleware::rate_limit::OnExceed::Reply { .. }
                )
            })
    }
}

/// Every route, in file order, and the subscriptions that cover them.
#[derive(Default)]
pub struct RouteTable {
    pub routes: Vec<Route>,
    pub subscriptions: Vec<Subscription>,
}

impl RouteTable {
    /// Whether any route publishes to MQTT (see [`Route::publishes`]).
    pub fn publishes(&self) -> bool {
        self.routes.iter().any(Route::publishes)
    }

    pub fn new(routes: Vec<Route>) -> RouteTable {
        let filters: Vec<(String, u8)> =
            routes.iter().map(|r| (r.pattern.filter(), r.qos)).collect();
        RouteTable {
            subscriptions: cover(&filters),
            routes,
        }
    }

    /// The routes `topic` matches, in file order, with their captures.
    pub fn matches<'a, 't>(
        &'a self,
        topic: &'t str,
    ) -> impl Iterator<Item = (&'a Route, Vec<&'t str>)> + 'a
    where
        't: 'a,
    {
        self.routes
            .iter()
            .filter_map(move |route| route.pattern.matches(topic).map(|c| (route, c)))
    }
}
