//! The engine: what happens to one message, route by route (spec §5, §6).
//!
//! For each route the topic matches, in file order, the stages of spec §5.2 — admission
//! (payload and params) → session → rate limit → dedup and the actions in one transaction →
//! forwards — each in its own module (`middleware/`, `actions/`); [`Engine::stages`] states
//! their order and nothing else. The message is finished — and so acked, in arrival order —
//! only when every matched route has its outcome, and its dead-letter record (if any) is in
//! Redis.
//!
//! Redis trouble that waiting fixes (down, timeout, a refusal) never becomes an outcome: the
//! step is retried with backoff until Redis is back, the message stays unacked meanwhile, and
//! a route that does not need Redis (a pure MQTT forward) is not held up. Permanent trouble
//! (WRONGTYPE, a bad payload) becomes `failed`/`invalid` and a dead-letter record.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use futures_util::FutureExt;

use super::dispatch::Handler;
use super::route::{ParsedJson, Route, RouteTable};
use crate::actions;
use crate::dead_letter::DeadLetter;
use crate::events;
use crate::message::Message;
use crate::mqtt::forward::Forwarder;
use crate::mqtt::publisher::MqttPublisher;
use crate::mqtt::Inbound;
use crate::outcome::{Outcome, Reason};
use crate::redis::rate_limit::RateLimiter;
use crate::redis::RedisManager;
use crate::stage::{Env, Step};
use crate::template::Context;

/// Which routes of a message [`Engine::process_part`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The routes that do not wait for Redis (forward-only): never spooled.
    Direct,
    /// The routes that wait for Redis ([`Route::waits_for_redis`]).
    Redis,
}

/// Processes messages; shared by every topic lane of the dispatcher.
pub struct Engine {
    table: ArcSwap<RouteTable>,
    redis: RedisManager,
    limiter: RateLimiter,
    /// The outgoing MQTT connection that forwards and rate-limit replies go out on.
    forwarder: Forwarder,
    max_payload: ArcSwap<usize>,
    dead_letter: ArcSwap<DeadLetter>,
    /// `lease:<client_id>:<run>`; the rest of the nonce, per message, completes a dedup
    /// lease value.
    lease_prefix: String,
    /// With `[spool]`: keeps dead-letter records while Redis cannot take them.
    keeper: OnceLock<Arc<dyn crate::dead_letter::Keeper>>,
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
            forwarder: Forwarder::new(publisher, max_packet_size),
            max_payload: ArcSwap::from_pointee(max_payload),
            dead_letter: ArcSwap::from_pointee(dead_letter),
            lease_prefix: crate::middleware::dedup::lease_prefix(client_id),
            keeper: OnceLock::new(),
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
            self.forwarder.set_publisher(publisher);
        }
        self.table.store(Arc::new(table));
        self.max_payload.store(Arc::new(max_payload));
        self.dead_letter.store(Arc::new(dead_letter));
    }

    /// Dead-letter records go to `keeper` while it spills, instead of waiting for Redis.
    pub fn set_keeper(&self, keeper: Arc<dyn crate::dead_letter::Keeper>) {
        let _ = self.keeper.set(keeper);
    }

    pub fn routes(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    /// What the stages of the route named `route` share (`"spool"` for the records the
    /// spool kept).
    fn env<'a>(&'a self, route: &'a str) -> Env<'a> {
        Env {
            redis: &self.redis,
            limiter: &self.limiter,
            forwarder: &self.forwarder,
            route,
            deadline: None,
        }
    }

    /// One message through every route it matches.
    pub async fn process(&self, message: &Message, received: Instant) {
        if !self.run_routes(message, received, |_| true).await {
            events::unrouted(&message.topic);
        }
    }

    /// Which of the routes `topic` matches wait for Redis, and which do not: `(redis,
    /// direct)` (spec §6.2: the spool takes only the former).
    pub fn parts(&self, topic: &str) -> (bool, bool) {
        let table = self.table.load();
        let (mut redis, mut direct) = (false, false);
        for (route, _) in table.matches(topic) {
            if route.waits_for_redis() {
                redis = true;
            } else {
                direct = true;
            }
        }
        (redis, direct)
    }

    /// One message through the routes of `part` that it matches (the spool's front and its
    /// replay). Whether it matched any route at all; `unrouted` is the caller's to count.
    pub async fn process_part(&self, message: &Message, received: Instant, part: Part) -> bool {
        let redis = part == Part::Redis;
        self.run_routes(message, received, |route| route.waits_for_redis() == redis)
            .await
    }

    /// One message through the routes it matches that `runs` selects, in file order (the
    /// JSON parsed once for all of them). Whether it matched any route at all.
    async fn run_routes(
        &self,
        message: &Message,
        received: Instant,
        runs: impl Fn(&Route) -> bool,
    ) -> bool {
        let table = self.table.load_full();
        let mut json: ParsedJson = None;
        let mut matched = false;
        for (route, captures) in table.matches(&message.topic) {
            matched = true;
            if runs(route) {
                self.one_route(route, &captures, message, &mut json, received)
                    .await;
            }
        }
        matched
    }

    /// One route's stages, its outcome counted and dead-lettered.
    async fn one_route(
        &self,
        route: &Route,
        captures: &[&str],
        message: &Message,
        json: &mut ParsedJson,
        received: Instant,
    ) {
        let (topic, payload) = (message.topic.as_str(), &message.payload[..]);
        events::message_received(&route.name, &route.metrics);
        // A panic is a bug of ours; caught per route, it is this route's outcome
        // (`internal_error`, dead-lettered) and the message still finishes and is acked,
        // instead of holding back every later ack (spec §5.3).
        let outcome = AssertUnwindSafe(async {
            crate::fault::in_handler(payload).await;
            self.run_route(route, message, received, captures, json)
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
        events::message_outcome(&route.name, &route.metrics, topic, &outcome, received);
    }

    /// Writes a dead-letter record the spool kept while Redis was down (spec §6.2),
    /// waiting for Redis; counted now, when it is in Redis.
    pub async fn push_dead_letter(&self, reason: Reason, record: &str) {
        let target = self.dead_letter.load_full();
        let mut pipe = ::redis::pipe();
        target.push(&mut pipe, record);
        match self
            .env("spool")
            .until_redis(|| self.redis.query_pipeline::<()>(&pipe))
            .await
        {
            Ok(()) => events::dead_lettered(reason),
            Err(e) => {
                tracing::error!(reason = reason.as_str(), error = %e, "could not write the dead letter")
            }
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
            events::message_received(&route.name, &route.metrics);
            let target = self.dead_letter.load_full();
            // An oversized message arrives as its first 1 KiB only.
            let record = if reason == Reason::PayloadTooLarge {
                target.record_of_head(topic, &route.name, reason, detail, payload)
            } else {
                target.record(topic, &route.name, reason, detail, payload)
            };
            self.write_dead_letter(route, &target, reason, record).await;
            events::message_outcome(
                &route.name,
                &route.metrics,
                topic,
                &Outcome::invalid(reason, detail),
                received,
            );
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
            events::message_received(&route.name, &route.metrics);
            events::message_outcome(
                &route.name,
                &route.metrics,
                topic,
                &Outcome::Overflow,
                received,
            );
        }
        if !matched {
            events::unrouted(topic);
        }
    }

    async fn run_route(
        &self,
        route: &Route,
        message: &Message,
        received: Instant,
        captures: &[&str],
        json: &mut ParsedJson,
    ) -> Outcome {
        match self.stages(route, message, received, captures, json).await {
            Ok(()) => Outcome::Written,
            Err(outcome) => outcome,
        }
    }

    /// Spec §5.2 in order: each stage goes on or ends the route with its outcome.
    async fn stages(
        &self,
        route: &Route,
        message: &Message,
        received: Instant,
        captures: &[&str],
        json: &mut ParsedJson,
    ) -> Step<()> {
        let (topic, payload) = (message.topic.as_str(), &message.payload[..]);
        let mut env = self.env(&route.name);
        if route.honor_expiry {
            // Waiting for Redis ends at the expiry (spec §6.1): checked before each attempt.
            env.deadline = message.expires(received);
            if env.deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(crate::stage::expired());
            }
        }
        let json = route.admit(payload, captures, **self.max_payload.load(), json)?;
        let mut ctx = Context {
            topic,
            payload,
            params: captures,
            json,
            session: None,
            fields: &[],
            properties: message.properties.as_deref(),
            now: SystemTime::now(),
        };
        let session = match &route.session {
            Some(sessions) => sessions.step(&env, &ctx).await?,
            None => None,
        };
        ctx.session = session.as_deref();
        // Actions and the dedup claim are rendered before anything is written, so the claim
        // can ride with the rate-limit check; a render error still counts only after the
        // check (a limited message stays `rate_limited`).
        let rendered = self.render(route, &ctx);
        let claimed = match &route.rate_limit {
            Some(limit) => {
                let rider = rendered.as_ref().ok().and_then(|(_, claim)| claim.as_ref());
                limit.step(&env, &ctx, rider).await?
            }
            None => false,
        };
        let (writes, claim) = rendered?;
        if route.needs_redis() {
            match &claim {
                Some(claim) => claim.write(&env, claimed, &writes.pipe).await?,
                None => actions::write(&env, &writes.pipe).await?,
            }
        }
        actions::forward(&env, writes.forwards).await?;
        if let Some(claim) = &claim {
            claim.finish(&env).await;
        }
        Ok(())
    }

    /// A route's actions rendered into one pipeline, with the dedup done mark and this
    /// message's claim when the route has dedup.
    fn render(
        &self,
        route: &Route,
        ctx: &Context<'_>,
    ) -> Step<(
        actions::Writes,
        Option<crate::middleware::dedup::DedupClaim>,
    )> {
        let mut writes = actions::render(&route.actions, ctx)?;
        let claim = match &route.dedup {
            Some(rule) => {
                let forwarding =
                    (!writes.forwards.is_empty()).then_some((&*route.name, ctx.topic, ctx.payload));
                Some(rule.prepare(ctx, &self.lease_prefix, forwarding, &mut writes.pipe)?)
            }
            None => None,
        };
        actions::seal(&mut writes.pipe, route.atomic);
        Ok((writes, claim))
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
        let env = self.env(&route.name);
        let write = env.until_redis(|| self.redis.query_pipeline::<()>(&pipe));
        let result = match self.keeper.get() {
            None => write.await,
            // With a spool, a record that waits for Redis longer than the spool's `after`
            // is kept there instead, so its message can be acked (spec §6.2).
            Some(keeper) => {
                tokio::select! {
                    biased;
                    result = write => result,
                    () = keeper.spilling() => {
                        if keeper.keep(reason, record.clone()).await {
                            return;
                        }
                        env.until_redis(|| self.redis.query_pipeline::<()>(&pipe)).await
                    }
                }
            }
        };
        match result {
            Ok(()) => events::dead_lettered(reason),
            Err(e) => {
                // Not the record: it holds the device's payload, which is no log's business.
                tracing::error!(route = %route.name, reason = reason.as_str(), error = %e, "could not write the dead letter")
            }
        }
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
        let message = &inbound.message;
        let handled = match inbound.refusal() {
            Some(refusal) => {
                AssertUnwindSafe(self.refuse(
                    &message.topic,
                    &message.payload,
                    refusal,
                    inbound.received,
                ))
                .catch_unwind()
                .await
            }
            None => {
                AssertUnwindSafe(self.process(message, inbound.received))
                    .catch_unwind()
                    .await
            }
        };
        if let Err(panic) = handled {
            tracing::error!(
                topic = %inbound.message.topic,
                error = %panic_message(panic.as_ref()),
                "BUG: a panic outside a route's handling; the message is acked without its outcome"
            );
        }
        inbound.finish();
    }
}
