//! Session middleware (spec §5.2): the session at `key` (JSON as RouteMQ's SessionManager
//! writes it, or a Redis hash with `format = "hash"`) feeds `{session.*}`, and `required`
//! drops messages of devices without one.
//!
//! A device sends many messages per session, so a local read-through cache (`cache_ttl`,
//! default 5 s) spares Redis a round trip per message; misses are cached for the same time
//! (negative caching), so a flood from an unknown device costs one read per `cache_ttl`.
//! `touch` slides the session's expiry on each Redis read, which the cache limits to once
//! per `cache_ttl` per session.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use super::{failed, Env, Step};
use crate::config::reader::Table;
use crate::events;
use crate::outcome::Outcome;
use crate::redis::{RedisManager, Result};
use crate::template::{read as template, Context, Scope, Target, Template};

/// How the session is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SessionFormat {
    #[default]
    Json,
    Hash,
}

/// A route's `[routes.session]`.
#[derive(Clone, Debug)]
pub struct SessionRule {
    pub key: Template,
    pub required: bool,
    pub cache_ttl: Duration,
    pub touch: Option<Duration>,
    pub format: SessionFormat,
}

/// A session's fields, shared between the cache and the messages using it.
pub type Fields = Arc<Map<String, Value>>;

/// Whether the answer came from the cache: the `result` label of
/// `session_cache_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheResult {
    Hit,
    Miss,
    NegativeHit,
}

impl CacheResult {
    pub fn label(self) -> &'static str {
        match self {
            CacheResult::Hit => "hit",
            CacheResult::Miss => "miss",
            CacheResult::NegativeHit => "negative_hit",
        }
    }
}

impl Sessions {
    /// Reads `[routes.session]`; `None` (errors recorded) when it is unusable. The key is
    /// rendered before the session exists: `key_scope` has no `{session.*}`.
    pub(crate) fn read(mut s: Table<'_>, key_scope: &Scope<'_>) -> Option<Sessions> {
        let key = template(&mut s, "key", Target::Key, key_scope, None);
        let required = s.bool("required", false);
        let cache_ttl = s.duration("cache_ttl", Duration::from_secs(5));
        let touch = s.opt_duration("touch");
        let format = s.choice(
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
    }
}

/// Sessions per cache at most; beyond it the least recently used go.
const CACHE_CAPACITY: usize = 10_000;

#[derive(Clone)]
struct Entry {
    fetched: Instant,
    fields: Option<Fields>,
}

/// The session stage of one route, with its cache.
pub struct Sessions {
    rule: SessionRule,
    cache: quick_cache::sync::Cache<String, Entry>,
}

impl Sessions {
    pub fn new(rule: SessionRule) -> Self {
        Sessions {
            rule,
            cache: quick_cache::sync::Cache::new(CACHE_CAPACITY),
        }
    }

    pub fn rule(&self) -> &SessionRule {
        &self.rule
    }

    /// The stage: this message's session (`None` when there is none and it is not
    /// required), or `unauthorized` when it is required and missing.
    pub async fn step(&self, env: &Env<'_>, ctx: &Context<'_>) -> Step<Option<Fields>> {
        let key = self
            .rule
            .key
            .render(ctx)
            .map_err(|e| Outcome::from_render(&e))?;
        let (fields, result) = env
            .until_redis(|| self.load(env.redis, &key))
            .await
            .map_err(failed)?;
        events::session_cache(result.label());
        if fields.is_none() && self.rule.required {
            return Err(Outcome::Unauthorized);
        }
        Ok(fields)
    }

    /// The session at `key` (rendered by the caller), from the cache when fresh.
    pub async fn load(
        &self,
        redis: &RedisManager,
        key: &str,
    ) -> Result<(Option<Fields>, CacheResult)> {
        if let Some(entry) = self.cache.get(key) {
            if entry.fetched.elapsed() < self.rule.cache_ttl {
                let result = if entry.fields.is_some() {
                    CacheResult::Hit
                } else {
                    CacheResult::NegativeHit
                };
                return Ok((entry.fields, result));
            }
        }
        let fields = self.fetch(redis, key).await?;
        if !self.rule.cache_ttl.is_zero() {
            self.cache.insert(
                key.to_string(),
                Entry {
                    fetched: Instant::now(),
                    fields: fields.clone(),
                },
            );
        }
        Ok((fields, CacheResult::Miss))
    }

    async fn fetch(&self, redis: &RedisManager, key: &str) -> Result<Option<Fields>> {
        let mut pipe = ::redis::pipe();
        match self.rule.format {
            SessionFormat::Json => pipe.cmd("GET").arg(key),
            SessionFormat::Hash => pipe.cmd("HGETALL").arg(key),
        };
        if let Some(touch) = self.rule.touch {
            pipe.cmd("PEXPIRE")
                .arg(key)
                .arg(touch.as_millis() as u64)
                .ignore();
        }
        let fields = match self.rule.format {
            SessionFormat::Json => {
                let (raw,): (Option<String>,) = redis.query_pipeline(&pipe).await?;
                // A session that is not a JSON object is treated as no session: RouteMQ
                // always writes objects, anything else was written by someone else.
                raw.and_then(|text| match serde_json::from_str::<Value>(&text) {
                    Ok(Value::Object(map)) => Some(map),
                    _ => None,
                })
            }
            SessionFormat::Hash => {
                let (pairs,): (Vec<(String, String)>,) = redis.query_pipeline(&pipe).await?;
                (!pairs.is_empty()).then(|| {
                    pairs
                        .into_iter()
                        .map(|(k, v)| (k, Value::String(v)))
                        .collect()
                })
            }
        };
        Ok(fields.map(Arc::new))
    }
}
