//! Rate-limit middleware (spec §5.2): one atomic Lua check per message through the
//! manager's [`RateLimiter`](crate::redis::rate_limit::RateLimiter); over the limit the
//! message is `rate_limited`, and with `on_exceed = "reply"` the device is told why.
//!
//! On a route with dedup, the dedup claim rides with the check (one round trip instead of
//! two; a claim for a message the limit then refuses is given back).

use std::time::Duration;

use super::dedup::{claim_cmd, DedupClaim};
use crate::config::reader::Table;
use crate::mqtt::forward::MqttOut;
use crate::outcome::Outcome;
use crate::redis::lock::compare_and_delete;
use crate::redis::rate_limit::{Decision, Fallback, Limit, PreparedCheck, Strategy};
use crate::redis::Error as RedisError;
use crate::stage::{failed, Env, Step};
use crate::template::{read as template, Context, Scope, Target, Template};

/// What happens to a message over the limit.
#[derive(Clone, Debug)]
pub enum OnExceed {
    Drop,
    /// Publish the JSON error to `topic` at `qos`.
    Reply {
        topic: Template,
        qos: u8,
    },
}

/// A route's `[routes.rate_limit]`.
#[derive(Clone, Debug)]
pub struct RateLimitRule {
    pub key: Template,
    pub limit: Limit,
    pub on_exceed: OnExceed,
    pub fallback: Fallback,
}

impl RateLimitRule {
    /// Reads `[routes.rate_limit]`; `None` (errors recorded) when it is unusable.
    pub(crate) fn read(mut r: Table<'_>, scope: &Scope<'_>) -> Option<RateLimitRule> {
        // RouteMQ's default key, so both share one budget.
        let key = template(
            &mut r,
            "key",
            Target::Key,
            scope,
            Some("rate_limit:topic:{topic}"),
        );
        let strategy = r.choice(
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
        let on_exceed_reply = r.choice("on_exceed", &[("drop", false), ("reply", true)], false);
        let on_exceed = if on_exceed_reply {
            let topic = template(&mut r, "reply_topic", Target::Topic, scope, None);
            let reply_qos = r.qos("reply_qos", 0);
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
        let fallback = r.choice(
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
    }
}

/// What became of a claim sent with the rate-limit check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tried {
    /// No claim was sent.
    No,
    /// `SET NX` took the key: the claim is ours.
    Ours,
    /// The key was already set (`done`, or another worker's lease): claimed again later,
    /// which tells which.
    Taken,
    /// The pipeline failed: the claim may or may not have been made.
    Unknown,
}

impl RateLimitRule {
    /// The stage: `rate_limited` over the limit (after the reply, with `on_exceed =
    /// "reply"`). With `rider`, the dedup claim goes in the same round trip: `Ok(true)` when
    /// it was made and is ours, so the write need not claim again.
    pub async fn step(
        &self,
        env: &Env<'_>,
        ctx: &Context<'_>,
        rider: Option<&DedupClaim>,
    ) -> Step<bool> {
        let key = self.key.render(ctx).map_err(|e| Outcome::from_render(&e))?;
        let (checked, tried) = match rider {
            Some(claim) => self.check_and_claim(env, &key, claim).await,
            None => (
                env.limiter.check(&key, &self.limit, self.fallback).await,
                Tried::No,
            ),
        };
        let allowed = matches!(checked, Ok(ref d) if d.allowed);
        if let Some(claim) =
            rider.filter(|_| matches!(tried, Tried::Unknown) || (tried == Tried::Ours && !allowed))
        {
            drop_claim(env, claim).await;
        }
        let decision = checked.map_err(failed)?;
        if !decision.allowed {
            self.reply(env, ctx, &decision).await;
            return Err(Outcome::RateLimited);
        }
        Ok(tried == Tried::Ours)
    }

    /// With `on_exceed = "reply"`, tells the device why (spec §5.2), best effort: queued once,
    /// not waited for. The message's outcome is `rate_limited` either way.
    async fn reply(&self, env: &Env<'_>, ctx: &Context<'_>, decision: &Decision) {
        let OnExceed::Reply { topic, qos } = &self.on_exceed else {
            return;
        };
        let sent = match topic.render(ctx) {
            Ok(topic) => {
                let reply = MqttOut {
                    topic,
                    payload: reply_payload(decision).into_bytes(),
                    qos: *qos,
                    retain: false,
                    properties: None,
                };
                env.forwarder.post(reply)
            }
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = sent {
            tracing::warn!(route = env.route, error = %e, "rate-limit reply not sent");
        }
    }

    /// The rate-limit check and the dedup claim (`SET NX PX`) in one pipeline: one round
    /// trip instead of two for a route with both. Anything but a clean answer to both (the
    /// script missing after a Redis restart, Redis down, a wrong type) falls back to the
    /// separate check, which loads the script and applies the route's fallback; the claim
    /// is then `Unknown` and is made again (finding our own lease) before the transaction.
    async fn check_and_claim(
        &self,
        env: &Env<'_>,
        key: &str,
        claim: &DedupClaim,
    ) -> (Result<Decision, RedisError>, Tried) {
        let separately = || env.limiter.check(key, &self.limit, self.fallback);
        let Ok(check) = PreparedCheck::new(key, &self.limit) else {
            return (separately().await, Tried::No);
        };
        let mut pipe = ::redis::pipe();
        pipe.add_command(claim_cmd(&claim.key, &claim.marks.lease, claim.lease));
        check.add_to(&mut pipe);
        match env
            .redis
            .query_pipeline::<(Option<String>, ::redis::Value)>(&pipe)
            .await
        {
            Ok((set, reply)) => {
                let tried = if set.is_some() {
                    Tried::Ours
                } else {
                    Tried::Taken
                };
                (check.decision(reply), tried)
            }
            Err(_) => (separately().await, Tried::Unknown),
        }
    }
}

/// Gives back a claim made with a rate-limit check that then refused the message (or
/// failed), so a redelivery is not made to wait for the lease. Only our own lease is
/// deleted, never a `done`. One attempt: if Redis does not answer, the lease expires by
/// itself, and a limited message must not wait for Redis.
async fn drop_claim(env: &Env<'_>, claim: &DedupClaim) {
    if let Err(e) = compare_and_delete(env.redis, &claim.key, &claim.marks.lease).await {
        tracing::debug!(route = env.route, error = %e, "could not release a dedup claim; it expires with its lease");
    }
}

/// The reply of spec §5.2:
/// `{"error":"rate_limit_exceeded","limit":…,"window_s":…,"retry_after_ms":…}`.
pub fn reply_payload(decision: &Decision) -> String {
    serde_json::json!({
        "error": "rate_limit_exceeded",
        "limit": decision.limit,
        "window_s": decision.window.as_secs_f64(),
        "retry_after_ms": decision.retry_after.as_millis() as u64,
    })
    .to_string()
}
