//! The engine: what happens to one message, route by route (spec §5, §6).
//!
//! For each route the topic matches, in file order: payload checks → session → render the
//! actions → rate limit → dedup claim → one pipeline (MULTI/EXEC) with the actions and the
//! done-mark → forwards over MQTT. A route with both a rate limit and dedup sends the check
//! and the claim in one round trip (a claim for a message the limit then refuses is given
//! back), so such a message costs two round trips, not three. The message is finished — and so acked, in arrival
//! order — only when every matched route has its outcome.
//!
//! Redis trouble that waiting fixes (down, timeout) never becomes an outcome: the step is
//! retried with backoff until Redis is back, the message stays unacked meanwhile, and a
//! route that does not need Redis (a pure MQTT forward) is not held up. Permanent trouble
//! (WRONGTYPE, a bad payload) becomes `failed`/`invalid` and a dead-letter record.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use futures_util::FutureExt;
use serde_json::Value;

use super::dispatch::Handler;
use super::route::{PayloadKind, Route, RouteTable};
use crate::actions::{ApplyError, MqttOut};
use crate::backoff::Backoff;
use crate::dead_letter::DeadLetter;
use crate::events;
use crate::middleware::dedup::{self, Claim};
use crate::middleware::rate_limit::{reply_payload, OnExceed, RateLimitRule};
use crate::mqtt::source::{MqttPublisher, PublishError};
use crate::mqtt::{qos, Inbound};
use crate::outcome::{Outcome, Reason};
use crate::redis::lock::compare_and_delete;
use crate::redis::rate_limit::{Decision, PreparedCheck, RateLimiter};
use crate::redis::{Error as RedisError, RedisManager};
use crate::template::Context;

/// What a message writes, rendered: the pipeline (actions, then the `done` mark), the MQTT
/// forwards, and the dedup claim.
struct Writes {
    pipe: ::redis::Pipeline,
    forwards: Vec<MqttOut>,
    dedup: Option<DedupClaim>,
}

/// This message's dedup claim: the key, this attempt's lease and done mark, the lease and
/// how long the mark is kept.
struct DedupClaim {
    key: String,
    marks: dedup::Marks,
    lease: Duration,
    ttl: Duration,
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

/// Processes messages; shared by every topic lane of the dispatcher.
pub struct Engine {
    table: ArcSwap<RouteTable>,
    redis: RedisManager,
    limiter: RateLimiter,
    /// The outgoing MQTT connection that forwards and rate-limit replies go out on; `None`
    /// while no route publishes.
    publisher: ArcSwapOption<MqttPublisher>,
    /// `mqtt.max_packet_size`: a forward larger than this could never be sent.
    max_packet_size: usize,
    max_payload: ArcSwap<usize>,
    dead_letter: ArcSwap<DeadLetter>,
    /// `lease:<client_id>:`; a nonce per message completes a dedup lease value.
    lease_prefix: String,
}

impl Engine {
    pub fn new(
        table: RouteTable,
        redis: RedisManager,
        publisher: Option<MqttPublisher>,
        client_id: &str,
        max_packet_size: usize,
        max_payload: usize,
        dead_letter: DeadLetter,
    ) -> Engine {
        Engine {
            table: ArcSwap::from_pointee(table),
            limiter: RateLimiter::new(redis.clone()),
            redis,
            publisher: ArcSwapOption::new(publisher.map(Arc::new)),
            max_packet_size,
            max_payload: ArcSwap::from_pointee(max_payload),
            dead_letter: ArcSwap::from_pointee(dead_letter),
            lease_prefix: format!("lease:{client_id}:"),
        }
    }

    /// Swaps in a new route table and limits (SIGHUP); messages in flight finish on the
    /// table they started with. `publisher` is the outgoing connection, when the new routes
    /// publish.
    pub fn reload(
        &self,
        table: RouteTable,
        publisher: Option<MqttPublisher>,
        max_payload: usize,
        dead_letter: DeadLetter,
    ) {
        if let Some(publisher) = publisher {
            self.publisher.store(Some(Arc::new(publisher)));
        }
        self.table.store(Arc::new(table));
        self.max_payload.store(Arc::new(max_payload));
        self.dead_letter.store(Arc::new(dead_letter));
    }

    pub fn routes(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    /// Runs `step` until it succeeds or fails for good; waits out transient Redis trouble.
    async fn until_redis<T, F, Fut>(&self, route: &str, mut step: F) -> Result<T, RedisError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            match step().await {
                Err(e) if e.is_transient() => {
                    events::redis_retry(route, &e);
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                other => return other,
            }
        }
    }

    /// One message through every route it matches.
    pub async fn process(&self, topic: &str, payload: &[u8], received: Instant) {
        let table = self.table.load_full();
        let mut json: Option<Result<Value, String>> = None;
        let mut matched = false;
        for (route, captures) in table.matches(topic) {
            matched = true;
            events::message_received(route);
            // A panic is a bug of ours; caught per route, it is this route's outcome
            // (`internal_error`, dead-lettered) and the message still finishes and is acked,
            // instead of holding back every later ack (spec §5.3).
            let outcome = AssertUnwindSafe(async {
                crate::fault::in_handler(payload).await;
                self.run_route(route, topic, payload, &captures, &mut json)
                    .await
            })
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| Outcome::Internal {
                detail: panic_message(panic.as_ref()),
            });
            if let Some((reason, detail)) = outcome.dead_letter() {
                self.record_dead_letter(route, topic, payload, reason, detail)
                    .await;
            }
            events::message_outcome(route, topic, &outcome, received);
        }
        if !matched {
            events::unrouted(topic);
        }
    }

    /// A message the MQTT source already knows is `invalid` (over `max_packet_size`, or a
    /// topic that is not UTF-8; [`Inbound::refusal`]): every route it matches ends so, with
    /// its dead-letter record, without running. An oversized message's `payload` is its
    /// first 1 KiB only: its record says `"truncated": true`.
    pub async fn refuse(
        &self,
        topic: &str,
        payload: &[u8],
        (reason, detail): (Reason, &str),
        received: Instant,
    ) {
        let table = self.table.load_full();
        let mut matched = false;
        for (route, _) in table.matches(topic) {
            matched = true;
            events::message_received(route);
            let target = self.dead_letter.load_full();
            let mut record = target.record(topic, &route.name, reason, detail, payload);
            if reason == Reason::PayloadTooLarge {
                record = marked_truncated(record);
            }
            self.write_dead_letter(route, &target, reason, record).await;
            events::message_outcome(route, topic, &Outcome::invalid(reason, detail), received);
        }
        if !matched {
            events::unrouted(topic);
        }
    }

    /// A QoS 0 message dropped beyond `max_inflight`: outcome `overflow` on every route it
    /// matches, so the drop shows in `messages_total` like any other outcome.
    pub fn overflow(&self, topic: &str, received: Instant) {
        let table = self.table.load();
        let mut matched = false;
        for (route, _) in table.matches(topic) {
            matched = true;
            events::message_received(route);
            events::message_outcome(route, topic, &Outcome::Overflow, received);
        }
        if !matched {
            events::unrouted(topic);
        }
    }

    async fn run_route(
        &self,
        route: &Route,
        topic: &str,
        payload: &[u8],
        captures: &[&str],
        json_cache: &mut Option<Result<Value, String>>,
    ) -> Outcome {
        let max_payload = **self.max_payload.load();
        if payload.len() > max_payload {
            return Outcome::invalid(
                Reason::PayloadTooLarge,
                format!("{} bytes, max_payload is {max_payload}", payload.len()),
            );
        }
        let json = match route.payload {
            PayloadKind::Json => {
                let parsed = json_cache.get_or_insert_with(|| {
                    serde_json::from_slice::<Value>(payload).map_err(|e| e.to_string())
                });
                match parsed {
                    Ok(v) => Some(&*v),
                    Err(e) => return Outcome::invalid(Reason::InvalidJson, e.clone()),
                }
            }
            PayloadKind::Text => {
                if let Err(e) = std::str::from_utf8(payload) {
                    return Outcome::invalid(Reason::InvalidUtf8, e.to_string());
                }
                None
            }
            PayloadKind::Bytes => None,
        };
        for (index, name, re) in &route.param_checks {
            let value = captures.get(*index).copied().unwrap_or("");
            if !re.is_match(value) {
                return Outcome::invalid(
                    Reason::InvalidParam,
                    format!("param `{name}` = {value:?} does not match {}", re.as_str()),
                );
            }
        }
        let mut ctx = Context {
            topic,
            payload,
            params: captures,
            json,
            session: None,
            fields: &[],
            now: SystemTime::now(),
        };

        // Session.
        let session;
        if let Some(sessions) = &route.session {
            let key = match sessions.rule().key.render(&ctx) {
                Ok(k) => k,
                Err(e) => return Outcome::invalid(Reason::from_render(&e), e.to_string()),
            };
            let loaded = self
                .until_redis(&route.name, || sessions.load(&self.redis, &key))
                .await;
            match loaded {
                Ok((fields, result)) => {
                    events::session_cache(result.label());
                    if fields.is_none() && sessions.rule().required {
                        return Outcome::Unauthorized;
                    }
                    session = fields;
                }
                Err(e) => {
                    return Outcome::Failed {
                        detail: e.to_string(),
                    }
                }
            }
            ctx.session = session.as_deref();
        }

        // Actions and the dedup key, rendered before anything is written. They are rendered
        // ahead of the rate-limit check so the dedup claim can travel with it; a render error
        // still becomes the outcome only after the check (a limited message stays
        // `rate_limited`, as when the check came first).
        let rendered = self.render_writes(route, &ctx);

        // Rate limit; with dedup, the claim goes in the same round trip.
        let mut claimed = false;
        if let Some(rule) = &route.rate_limit {
            let key = match rule.key.render(&ctx) {
                Ok(k) => k,
                Err(e) => return Outcome::invalid(Reason::from_render(&e), e.to_string()),
            };
            let claim = match &rendered {
                Ok(Writes {
                    dedup: Some(dedup), ..
                }) => Some(dedup),
                _ => None,
            };
            let (checked, tried) = match claim {
                Some(claim) => self.check_and_claim(&key, rule, claim).await,
                None => (
                    self.limiter.check(&key, &rule.limit, rule.fallback).await,
                    Tried::No,
                ),
            };
            if tried == Tried::Ours && matches!(checked, Ok(ref d) if d.allowed) {
                claimed = true;
            } else if matches!(tried, Tried::Ours | Tried::Unknown) {
                if let Some(claim) = claim {
                    self.drop_claim(route, claim).await;
                }
            }
            match checked {
                Ok(decision) if decision.allowed => {}
                Ok(decision) => {
                    if let OnExceed::Reply {
                        topic: reply,
                        qos: reply_qos,
                    } = &rule.on_exceed
                    {
                        match reply.render(&ctx) {
                            Ok(reply_topic) => {
                                let reply = MqttOut {
                                    topic: reply_topic,
                                    payload: reply_payload(&decision).into_bytes(),
                                    qos: *reply_qos,
                                    retain: false,
                                };
                                // The message's outcome is `rate_limited` either way.
                                if let Err(e) = self.forward(reply).await {
                                    tracing::warn!(route = %route.name, error = %e, "rate-limit reply not sent");
                                }
                            }
                            Err(e) => {
                                tracing::warn!(route = %route.name, error = %e, "rate-limit reply topic")
                            }
                        }
                    }
                    return Outcome::RateLimited;
                }
                Err(e) => {
                    return Outcome::Failed {
                        detail: e.to_string(),
                    }
                }
            }
        }

        let Writes {
            mut pipe,
            forwards,
            dedup,
        } = match rendered {
            Ok(writes) => writes,
            Err(outcome) => return outcome,
        };
        // One command is atomic by itself: MULTI/EXEC around it would triple Redis's work
        // and the bytes on the wire for nothing (the common one-`set` route).
        if route.atomic && pipe.len() > 1 {
            pipe.atomic();
        }
        if route.needs_redis() {
            let (dedup_ref, pipe_ref) = (&dedup, &pipe);
            // The claim made with the rate-limit check counts for the first attempt only: a
            // retry (after Redis trouble) claims again, which finds our own lease if it is
            // still there — or our own done mark if the transaction was applied and only
            // its reply was lost (timeout or dropped connection): then the message is
            // written, not a duplicate, and its forwards go out (spec §6).
            let mut holding = claimed;
            let written = self
                .until_redis(&route.name, || {
                    let skip_claim = std::mem::take(&mut holding);
                    async move {
                        if let (false, Some(claim)) = (skip_claim, dedup_ref) {
                            let claimed =
                                dedup::claim(&self.redis, &claim.key, &claim.marks, claim.lease)
                                    .await?;
                            if claimed != Claim::Ours {
                                return Ok(claimed);
                            }
                        }
                        self.redis.query_pipeline::<()>(pipe_ref).await?;
                        Ok(Claim::Ours)
                    }
                })
                .await;
            match written {
                Ok(Claim::Duplicate) => return Outcome::Duplicate,
                Ok(Claim::Ours | Claim::Written) => {}
                Err(e) => {
                    if let Some(claim) = &dedup {
                        let released = self
                            .until_redis(&route.name, || {
                                dedup::release(&self.redis, &claim.key, &claim.marks)
                            })
                            .await;
                        if let Err(e) = released {
                            tracing::warn!(route = %route.name, error = %e, "could not release a dedup claim; it expires with its lease");
                        }
                    }
                    return Outcome::Failed {
                        detail: e.to_string(),
                    };
                }
            }
        }
        for out in forwards {
            if let Err(detail) = self.forward(out).await {
                return Outcome::Failed { detail };
            }
        }
        // Only now may a later delivery of this payload count as a duplicate (see
        // `middleware::dedup`). One attempt: if it fails, the worst is a forward sent twice.
        if let Some(claim) = dedup.as_ref().filter(|c| c.marks.pending()) {
            if let Err(e) = dedup::finish(&self.redis, &claim.key, &claim.marks, claim.ttl).await {
                tracing::warn!(route = %route.name, error = %e, "could not finish a dedup mark; a retransmission may be forwarded again");
            }
        }
        Outcome::Written
    }

    /// Renders a route's actions into one pipeline (plus its MQTT forwards) and, with dedup,
    /// the `done` mark and this message's claim; a render error is the outcome.
    fn render_writes(&self, route: &Route, ctx: &Context<'_>) -> Result<Writes, Outcome> {
        let mut pipe = ::redis::pipe();
        let mut forwards = Vec::new();
        for action in &route.actions {
            match action.apply(&mut pipe, ctx) {
                Ok(Some(out)) => forwards.push(out),
                Ok(None) => {}
                Err(ApplyError::Render(e)) => {
                    return Err(Outcome::invalid(Reason::from_render(&e), e.to_string()))
                }
                Err(ApplyError::NotJson(detail)) => {
                    return Err(Outcome::invalid(Reason::InvalidJson, detail))
                }
            }
        }
        let dedup = match &route.dedup {
            Some(rule) => match rule.key.render(ctx) {
                Ok(key) => {
                    // A random nonce from the thread-local generator: `Uuid::new_v4` asks
                    // the kernel (a getrandom syscall) for every message.
                    let lease_value =
                        format!("{}{:032x}", self.lease_prefix, rand::random::<u128>());
                    // With forwards, the mark also names the message, so a redelivery after
                    // a crash before the forwards still sends them.
                    let forwarding =
                        (!forwards.is_empty()).then_some((&*route.name, ctx.topic, ctx.payload));
                    let marks = dedup::Marks::new(lease_value, forwarding);
                    dedup::mark_done(&mut pipe, &key, &marks, rule.ttl);
                    Some(DedupClaim {
                        key,
                        marks,
                        lease: rule.lease,
                        ttl: rule.ttl,
                    })
                }
                Err(e) => return Err(Outcome::invalid(Reason::from_render(&e), e.to_string())),
            },
            None => None,
        };
        Ok(Writes {
            pipe,
            forwards,
            dedup,
        })
    }

    /// The rate-limit check and the dedup claim (`SET NX PX`) in one pipeline: one round
    /// trip instead of two for a route with both. Anything but a clean answer to both (the
    /// script missing after a Redis restart, Redis down, a wrong type) falls back to the
    /// separate check, which loads the script and applies the route's fallback; the claim
    /// is then `Unknown` and is made again (finding our own lease) before the transaction.
    async fn check_and_claim(
        &self,
        key: &str,
        rule: &RateLimitRule,
        claim: &DedupClaim,
    ) -> (Result<Decision, RedisError>, Tried) {
        let separately = || self.limiter.check(key, &rule.limit, rule.fallback);
        let Ok(check) = PreparedCheck::new(key, &rule.limit) else {
            return (separately().await, Tried::No);
        };
        let mut pipe = ::redis::pipe();
        pipe.add_command(dedup::claim_cmd(
            &claim.key,
            &claim.marks.lease,
            claim.lease,
        ));
        check.add_to(&mut pipe);
        match self
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

    /// Gives back a claim made with a rate-limit check that then refused the message (or
    /// failed), so a redelivery is not made to wait for the lease. Only our own lease is
    /// deleted, never a `done`. One attempt: if Redis does not answer, the lease expires by
    /// itself, and a limited message must not wait for Redis.
    async fn drop_claim(&self, route: &Route, claim: &DedupClaim) {
        if let Err(e) = compare_and_delete(&self.redis, &claim.key, &claim.marks.lease).await {
            tracing::debug!(route = %route.name, error = %e, "could not release a dedup claim; it expires with its lease");
        }
    }

    /// Publishes `out` on the outgoing connection and, at QoS 1/2, waits until the broker
    /// acknowledged it (spec §6: the incoming message is acked only after its forwards
    /// were). A publish lost with the broker's session, or not taken while rumqttc's queue
    /// is full, is sent again with backoff, for as long as it takes (shutdown is bounded by
    /// `shutdown_timeout`: the message then stays unacked and is redelivered). `Err` only
    /// for a forward that can never be sent: it is the message's outcome (`failed`).
    async fn forward(&self, out: MqttOut) -> Result<(), String> {
        let Some(publisher) = self.publisher.load_full() else {
            return Err("no outgoing MQTT connection for mqtt_publish".to_string());
        };
        // A PUBLISH is its topic, its payload and at most 9 bytes of header and packet id.
        let size = out.topic.len() + out.payload.len() + 9;
        if size > self.max_packet_size {
            return Err(format!(
                "forward to {:?} is {size} bytes, over mqtt.max_packet_size ({})",
                out.topic, self.max_packet_size
            ));
        }
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            let queued = publisher.publish_tracked(
                &out.topic,
                qos(out.qos),
                out.retain,
                out.payload.clone(),
            );
            match queued {
                Ok(acked) => {
                    if acked.await.is_ok() {
                        return Ok(());
                    }
                    // Lost with the broker's session (or the loop restarted): send again.
                    events::forward_retry(&out.topic);
                }
                Err(PublishError::Full) => {}
                Err(PublishError::Refused(why)) => return Err(why),
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    async fn record_dead_letter(
        &self,
        route: &Route,
        topic: &str,
        payload: &[u8],
        reason: Reason,
        detail: &str,
    ) {
        let target = self.dead_letter.load_full();
        let record = target.record(topic, &route.name, reason, detail, payload);
        self.write_dead_letter(route, &target, reason, record).await;
    }

    async fn write_dead_letter(
        &self,
        route: &Route,
        target: &DeadLetter,
        reason: Reason,
        record: String,
    ) {
        let mut pipe = ::redis::pipe();
        target.push(&mut pipe, &record);
        let result = self
            .until_redis(&route.name, || self.redis.query_pipeline::<()>(&pipe))
            .await;
        match result {
            Ok(()) => events::dead_lettered(reason),
            Err(e) => {
                // Not the record: it holds the device's payload, which is no log's business.
                tracing::error!(route = %route.name, reason = reason.as_str(), error = %e, "could not write the dead letter")
            }
        }
    }
}

/// `record` with `"truncated": true`: for a payload the record keeps whole only because it
/// was already cut before (an oversized message's first 1 KiB).
fn marked_truncated(record: String) -> String {
    match serde_json::from_str::<Value>(&record) {
        Ok(Value::Object(mut map)) => {
            map.insert("truncated".into(), Value::Bool(true));
            Value::Object(map).to_string()
        }
        _ => record,
    }
}

/// What a caught panic said, for the dead-letter record's `detail`.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let message = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    format!("the bridge panicked while handling this message: {message}")
}

impl Handler<Inbound> for Engine {
    async fn handle(&self, inbound: Inbound) {
        // `process` catches a panic per route; one outside a route (in its dead-letter
        // write, say) is caught here, so the message is still finished and acked rather
        // than holding back every later ack until a reconnect.
        let publish = &inbound.publish;
        let handled = match inbound.refusal() {
            Some(refusal) => {
                AssertUnwindSafe(self.refuse(
                    &publish.topic,
                    &publish.payload,
                    refusal,
                    inbound.received,
                ))
                .catch_unwind()
                .await
            }
            None => {
                AssertUnwindSafe(self.process(&publish.topic, &publish.payload, inbound.received))
                    .catch_unwind()
                    .await
            }
        };
        if let Err(panic) = handled {
            tracing::error!(
                topic = %inbound.publish.topic,
                error = %panic_message(panic.as_ref()),
                "BUG: a panic outside a route's handling; the message is acked without its outcome"
            );
        }
        inbound.finish();
    }
}
