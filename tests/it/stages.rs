//! Each stage of spec §5.2 called on its own, as the engine calls it, against a real Redis:
//! the session, the rate limit (with and without the dedup claim riding on it), dedup's
//! branches, and the actions' render and write. The end-to-end tests (`bridge_*`) show the
//! stages together through the daemon; these pin each stage's promise where it is kept, so a
//! broken branch names itself rather than showing up as a wrong outcome three stages later.

use std::time::Duration;

use routemq_bridge::actions::{self, Action, Op};
use routemq_bridge::middleware::dedup::{DedupClaim, DedupRule};
use routemq_bridge::middleware::rate_limit::{OnExceed, RateLimitRule};
use routemq_bridge::middleware::session::{CacheResult, SessionFormat, SessionRule, Sessions};
use routemq_bridge::mqtt::forward::Forwarder;
use routemq_bridge::outcome::{Outcome, Reason};
use routemq_bridge::redis::rate_limit::{Fallback, Limit, RateLimiter, Strategy};
use routemq_bridge::redis::RedisManager;
use routemq_bridge::stage::Env;
use routemq_bridge::template::{Context, Scope, Target, Template};
use serde_json::{json, Value};

use crate::harness::Redis;

/// Every test's bound: a stage that hangs fails its test instead of the run.
const BOUND: Duration = Duration::from_secs(10);

/// `lease:<client_id>:`, as the engine builds it but without the run that starts its nonce
/// (`dedup::lease_prefix`): no lease found here is ever an earlier run's.
const LEASE_PREFIX: &str = "lease:stages-test:";

/// A Redis of its own and what an [`Env`] borrows.
struct Stage {
    redis: Redis,
    manager: RedisManager,
    limiter: RateLimiter,
    forwarder: Forwarder,
}

impl Stage {
    async fn start() -> Stage {
        let redis = Redis::start();
        let manager = redis.manager().await;
        Stage {
            limiter: RateLimiter::new(manager.clone()),
            manager,
            redis,
            // No stage here sends a forward: no MQTT connection is needed.
            forwarder: Forwarder::new(None, 1 << 20),
        }
    }

    fn env(&self) -> Env<'_> {
        Env {
            redis: &self.manager,
            limiter: &self.limiter,
            forwarder: &self.forwarder,
            route: "stages",
            deadline: None,
        }
    }

    fn conn(&self) -> redis::Connection {
        self.redis.client().get_connection().expect("connect")
    }

    fn get(&self, key: &str) -> Option<String> {
        redis::cmd("GET")
            .arg(key)
            .query(&mut self.conn())
            .expect("get")
    }

    fn run(&self, cmd: &mut redis::Cmd) {
        let _: redis::Value = cmd.query(&mut self.conn()).expect("command");
    }
}

/// The scope of a route on `devices/{id}/data` with a JSON payload and a session.
fn template(source: &str, target: Target) -> Template {
    let params = ["id".to_string()];
    let scope = Scope {
        params: &params,
        rest_param: None,
        json: true,
        session: true,
        fields: false,
        properties: false,
        constraints: &[],
    };
    Template::compile(source, target, &scope).expect("template compiles")
}

const TOPIC: &str = "devices/dev-1/data";
const PARAMS: &[&str] = &["dev-1"];

/// The context of a message from `dev-1` with `payload` (parsed as `json`).
fn context<'a>(payload: &'a [u8], json: &'a Value) -> Context<'a> {
    let mut ctx = Context::new(TOPIC, payload);
    ctx.params = PARAMS;
    ctx.json = Some(json);
    ctx
}

/// Runs a stage with the test's bound.
async fn bounded<T>(stage: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(BOUND, stage)
        .await
        .expect("the stage finished within its bound")
}

// ---------------------------------------------------------------------------------------
// Session

fn sessions(format: SessionFormat, required: bool) -> Sessions {
    Sessions::new(SessionRule {
        key: template("session:{id}", Target::Key),
        required,
        cache_ttl: Duration::from_secs(60),
        touch: None,
        format,
    })
}

#[tokio::test]
async fn session_a_present_json_session_feeds_the_fields() {
    let stage = Stage::start().await;
    stage.run(
        redis::cmd("SET")
            .arg("session:dev-1")
            .arg(r#"{"user_id": "u1", "tier": "gold"}"#),
    );
    let json = json!({});
    let mut ctx = context(b"{}", &json);
    let fields = bounded(sessions(SessionFormat::Json, true).step(&stage.env(), &ctx))
        .await
        .expect("a session is there")
        .expect("its fields");
    assert_eq!(fields.get("user_id"), Some(&json!("u1")));
    // What the engine does next: the fields feed `{session.*}`.
    ctx.session = Some(&fields);
    let rendered = template("user:{session.user_id}:{session.tier}", Target::Key)
        .render(&ctx)
        .expect("renders");
    assert_eq!(rendered, "user:u1:gold");
}

#[tokio::test]
async fn session_format_hash_reads_a_redis_hash() {
    let stage = Stage::start().await;
    stage.run(
        redis::cmd("HSET")
            .arg("session:dev-1")
            .arg("user_id")
            .arg("u2")
            .arg("site")
            .arg("berlin"),
    );
    let json = json!({});
    let ctx = context(b"{}", &json);
    let fields = bounded(sessions(SessionFormat::Hash, true).step(&stage.env(), &ctx))
        .await
        .expect("a session is there")
        .expect("its fields");
    let expected: serde_json::Map<String, Value> =
        serde_json::from_value(json!({"user_id": "u2", "site": "berlin"})).expect("a map");
    assert_eq!(*fields, expected);
}

#[tokio::test]
async fn session_missing_and_required_is_unauthorized() {
    let stage = Stage::start().await;
    let json = json!({});
    let ctx = context(b"{}", &json);
    let verdict = bounded(sessions(SessionFormat::Json, true).step(&stage.env(), &ctx)).await;
    assert_eq!(verdict, Err(Outcome::Unauthorized));
}

#[tokio::test]
async fn session_missing_and_not_required_goes_on_without_one() {
    let stage = Stage::start().await;
    let json = json!({});
    let ctx = context(b"{}", &json);
    let verdict = bounded(sessions(SessionFormat::Json, false).step(&stage.env(), &ctx)).await;
    assert_eq!(verdict, Ok(None));
}

#[tokio::test]
async fn session_cache_answers_the_second_read_without_redis() {
    let stage = Stage::start().await;
    let json = json!({});
    let ctx = context(b"{}", &json);
    let sessions = sessions(SessionFormat::Json, true);
    stage.run(
        redis::cmd("SET")
            .arg("session:dev-1")
            .arg(r#"{"user_id": "u1"}"#),
    );
    let first = bounded(sessions.step(&stage.env(), &ctx))
        .await
        .expect("a session");
    // Gone from Redis, but still within `cache_ttl`: the cache answers.
    stage.run(redis::cmd("DEL").arg("session:dev-1"));
    let second = bounded(sessions.step(&stage.env(), &ctx))
        .await
        .expect("still a session, from the cache");
    assert_eq!(second, first);
    let (_, result) = bounded(sessions.load(&stage.manager, "session:dev-1"))
        .await
        .expect("answered");
    assert_eq!(result, CacheResult::Hit);

    // A miss is remembered too: the session created meanwhile is not seen within
    // `cache_ttl`, so a flood from an unknown device costs one read.
    let json = json!({});
    let mut other = context(b"{}", &json);
    other.params = &["dev-2"];
    assert_eq!(
        bounded(sessions.step(&stage.env(), &other)).await,
        Err(Outcome::Unauthorized)
    );
    stage.run(
        redis::cmd("SET")
            .arg("session:dev-2")
            .arg(r#"{"user_id": "u2"}"#),
    );
    assert_eq!(
        bounded(sessions.step(&stage.env(), &other)).await,
        Err(Outcome::Unauthorized),
        "the miss was cached"
    );
    let (fields, result) = bounded(sessions.load(&stage.manager, "session:dev-2"))
        .await
        .expect("answered");
    assert_eq!((fields, result), (None, CacheResult::NegativeHit));
}

// ---------------------------------------------------------------------------------------
// Rate limit

fn rate_limit(max: u32) -> RateLimitRule {
    RateLimitRule {
        key: template("rl:{id}", Target::Key),
        limit: Limit::new(Strategy::SlidingWindow, max, Duration::from_secs(60)),
        on_exceed: OnExceed::Drop,
        fallback: Fallback::Deny,
    }
}

/// A dedup rule keyed by the payload's `seq`, with a long lease and `done` kept an hour.
fn dedup_rule() -> DedupRule {
    DedupRule {
        key: template("dedup:{id}:{json.seq}", Target::Key),
        ttl: Duration::from_secs(3600),
        lease: Duration::from_secs(30),
    }
}

#[tokio::test]
async fn rate_limit_under_the_limit_goes_on() {
    let stage = Stage::start().await;
    let json = json!({});
    let ctx = context(b"{}", &json);
    let rule = rate_limit(2);
    for _ in 0..2 {
        assert_eq!(
            bounded(rule.step(&stage.env(), &ctx, None)).await,
            Ok(false),
            "admitted, no claim made"
        );
    }
}

#[tokio::test]
async fn rate_limit_over_the_limit_is_rate_limited() {
    let stage = Stage::start().await;
    let json = json!({});
    let ctx = context(b"{}", &json);
    let rule = rate_limit(1);
    assert_eq!(
        bounded(rule.step(&stage.env(), &ctx, None)).await,
        Ok(false)
    );
    assert_eq!(
        bounded(rule.step(&stage.env(), &ctx, None)).await,
        Err(Outcome::RateLimited)
    );
}

/// Loads the limit's script, as the first message after a Redis (re)start does: until it is
/// loaded, the pipelined check fails with `NOSCRIPT` and the claim is made separately.
async fn load_script(stage: &Stage, rule: &RateLimitRule) {
    stage
        .limiter
        .try_check("rl:warm-up", &rule.limit)
        .await
        .expect("the script loads");
}

#[tokio::test]
async fn rate_limit_with_a_dedup_rider_claims_in_the_same_round_trip() {
    let stage = Stage::start().await;
    let rule = rate_limit(10);
    load_script(&stage, &rule).await;
    let json = json!({"seq": 1});
    let ctx = context(br#"{"seq":1}"#, &json);
    let mut pipe = redis::pipe();
    let claim = dedup_rule()
        .prepare(&ctx, LEASE_PREFIX, None, &mut pipe)
        .expect("claim rendered");
    let claimed = bounded(rule.step(&stage.env(), &ctx, Some(&claim))).await;
    assert_eq!(claimed, Ok(true), "the claim rode with the check");
    assert_eq!(
        stage.get("dedup:dev-1:1").as_deref(),
        Some(claim.marks.lease.as_str()),
        "the key holds our lease"
    );
}

#[tokio::test]
async fn rate_limit_gives_the_rider_claim_back_when_it_refuses() {
    let stage = Stage::start().await;
    let rule = rate_limit(1);
    load_script(&stage, &rule).await;
    let (first, second) = (json!({"seq": 1}), json!({"seq": 2}));
    let ctx1 = context(br#"{"seq":1}"#, &first);
    let ctx2 = context(br#"{"seq":2}"#, &second);
    let mut pipe = redis::pipe();
    let claim1 = dedup_rule()
        .prepare(&ctx1, LEASE_PREFIX, None, &mut pipe)
        .expect("claim rendered");
    let claim2 = dedup_rule()
        .prepare(&ctx2, LEASE_PREFIX, None, &mut pipe)
        .expect("claim rendered");
    assert_eq!(
        bounded(rule.step(&stage.env(), &ctx1, Some(&claim1))).await,
        Ok(true)
    );
    assert_eq!(
        bounded(rule.step(&stage.env(), &ctx2, Some(&claim2))).await,
        Err(Outcome::RateLimited)
    );
    // A redelivery of the refused message must not wait for a lease nobody holds.
    assert_eq!(stage.get("dedup:dev-1:2"), None, "the claim was given back");
    assert_eq!(
        stage.get("dedup:dev-1:1").as_deref(),
        Some(claim1.marks.lease.as_str()),
        "the admitted message keeps its claim"
    );
}

// ---------------------------------------------------------------------------------------
// Dedup

/// An `incr` of `count:{id}`: how many times the transaction was applied.
fn counting() -> Vec<Action> {
    vec![Action {
        op: Op::Incr { by: 1 },
        key: Some(template("count:{id}", Target::Key)),
        expiry: None,
    }]
}

/// The engine's render: the actions, the dedup done mark, one transaction.
fn prepare(ctx: &Context<'_>, actions: &[Action]) -> (DedupClaim, redis::Pipeline) {
    prepare_as(LEASE_PREFIX, ctx, actions)
}

/// [`prepare`] with the leases of `lease_prefix` (`lease:<client_id>:<run>`).
fn prepare_as(
    lease_prefix: &str,
    ctx: &Context<'_>,
    actions: &[Action],
) -> (DedupClaim, redis::Pipeline) {
    let mut writes = actions::render(actions, ctx).expect("actions render");
    let claim = dedup_rule()
        .prepare(ctx, lease_prefix, None, &mut writes.pipe)
        .expect("claim renders");
    actions::seal(&mut writes.pipe, true);
    (claim, writes.pipe)
}

/// Returns once the claimer asked how long a lease it found still holds: it does so only
/// when it is going to wait for it — the event that it is waiting, not a guess at how long
/// that takes.
async fn until_waiting_for_a_lease(stage: &Stage) {
    while calls(&stage.manager, "pttl").await == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn count(stage: &Stage) -> Option<i64> {
    redis::cmd("GET")
        .arg("count:dev-1")
        .query(&mut stage.conn())
        .expect("get")
}

#[tokio::test]
async fn dedup_claimed_a_fresh_key_writes_and_marks_done() {
    let stage = Stage::start().await;
    let json = json!({"seq": 1});
    let ctx = context(br#"{"seq":1}"#, &json);
    let (claim, pipe) = prepare(&ctx, &counting());
    assert_eq!(
        bounded(claim.write(&stage.env(), false, &pipe)).await,
        Ok(())
    );
    assert_eq!(count(&stage), Some(1));
    assert_eq!(
        stage.get("dedup:dev-1:1").as_deref(),
        Some(claim.marks.written())
    );
    let pttl: i64 = redis::cmd("PTTL")
        .arg("dedup:dev-1:1")
        .query(&mut stage.conn())
        .expect("pttl");
    assert!(
        pttl > 3_500_000 && pttl <= 3_600_000,
        "the mark is kept for ttl, got {pttl}"
    );
}

#[tokio::test]
async fn dedup_done_by_another_message_is_a_duplicate_and_writes_nothing() {
    let stage = Stage::start().await;
    stage.run(
        redis::cmd("SET")
            .arg("dedup:dev-1:1")
            .arg("done:other-bridge:0123"),
    );
    let json = json!({"seq": 1});
    let ctx = context(br#"{"seq":1}"#, &json);
    let (claim, pipe) = prepare(&ctx, &counting());
    assert_eq!(
        bounded(claim.write(&stage.env(), false, &pipe)).await,
        Err(Outcome::Duplicate)
    );
    assert_eq!(count(&stage), None, "nothing written");
    assert_eq!(
        stage.get("dedup:dev-1:1").as_deref(),
        Some("done:other-bridge:0123"),
        "their mark untouched"
    );
}

/// How many times Redis has run `command` (lower case), from `INFO commandstats`.
async fn calls(manager: &RedisManager, command: &str) -> u64 {
    let info: String = manager
        .query(redis::cmd("INFO").arg("commandstats"))
        .await
        .expect("INFO");
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn dedup_leased_by_another_waits_for_the_lease_to_lapse_then_claims() {
    let stage = Stage::start().await;
    // Another worker holds the key (it died, say): a lease with a minute left.
    stage.run(
        redis::cmd("SET")
            .arg("dedup:dev-1:1")
            .arg("lease:other-bridge:0123")
            .arg("PX")
            .arg(60_000),
    );
    let json = json!({"seq": 1});
    let ctx = context(br#"{"seq":1}"#, &json);
    let (claim, pipe) = prepare(&ctx, &counting());
    let env = stage.env();
    let lease_lapses = async {
        until_waiting_for_a_lease(&stage).await;
        assert_eq!(count(&stage), None, "nothing written under their lease");
        assert_eq!(
            stage.get("dedup:dev-1:1").as_deref(),
            Some("lease:other-bridge:0123")
        );
        // The lease lapses by expiry, as a dead worker's does; now rather than in a minute.
        stage.run(redis::cmd("PEXPIRE").arg("dedup:dev-1:1").arg(1));
    };
    let (written, ()) =
        bounded(async { tokio::join!(claim.write(&env, false, &pipe), lease_lapses) }).await;
    assert_eq!(written, Ok(()));
    assert_eq!(count(&stage), Some(1));
    assert_eq!(
        stage.get("dedup:dev-1:1").as_deref(),
        Some(claim.marks.written())
    );
}

#[tokio::test]
async fn dedup_a_lease_of_an_earlier_run_is_taken_over_only_once_held_for_two_socket_timeouts() {
    use routemq_bridge::middleware::dedup::lease_prefix;
    let stage = Stage::start().await;
    let lease = dedup_rule().lease;
    // An earlier run of our client id holds the key, just claimed: it may be a process the
    // broker has just kicked off, its transaction still on its way.
    let theirs = format!("{}{:016x}", lease_prefix("stages-run"), 7);
    stage.run(
        redis::cmd("SET")
            .arg("dedup:dev-1:1")
            .arg(&theirs)
            .arg("PX")
            .arg(lease.as_millis() as u64),
    );
    let json = json!({"seq": 1});
    let ctx = context(br#"{"seq":1}"#, &json);
    let (claim, pipe) = prepare_as(&lease_prefix("stages-run"), &ctx, &counting());
    let env = stage.env();
    let held_long_enough = async {
        // Waiting, not taking it over at once.
        until_waiting_for_a_lease(&stage).await;
        assert_eq!(count(&stage), None, "nothing written under a fresh lease");
        assert_eq!(stage.get("dedup:dev-1:1").as_deref(), Some(theirs.as_str()));
        // Now as if it had been held for 2 × socket_timeout and a second: taken over, long
        // before it would lapse.
        let held = stage.manager.config().socket_timeout * 2 + Duration::from_secs(1);
        let left = lease.saturating_sub(held).max(Duration::from_secs(5));
        stage.run(
            redis::cmd("PEXPIRE")
                .arg("dedup:dev-1:1")
                .arg(left.as_millis() as u64),
        );
    };
    let (written, ()) =
        bounded(async { tokio::join!(claim.write(&env, false, &pipe), held_long_enough) }).await;
    assert_eq!(written, Ok(()));
    assert_eq!(count(&stage), Some(1));
    assert_eq!(
        stage.get("dedup:dev-1:1").as_deref(),
        Some(claim.marks.written())
    );
}

#[tokio::test]
async fn dedup_a_foreign_value_that_is_no_lease_fails_at_once() {
    let stage = Stage::start().await;
    stage.run(
        redis::cmd("SET")
            .arg("dedup:dev-1:1")
            .arg("somebody else's value")
            .arg("PX")
            .arg(60_000),
    );
    let json = json!({"seq": 1});
    let ctx = context(br#"{"seq":1}"#, &json);
    let (claim, pipe) = prepare(&ctx, &counting());
    // The value holds for a minute: waiting for it would break the test's bound.
    let verdict = bounded(claim.write(&stage.env(), false, &pipe)).await;
    let Err(Outcome::Failed { detail }) = verdict else {
        panic!("expected failed, got {verdict:?}");
    };
    assert!(detail.contains("dedup:dev-1:1"), "names the key: {detail}");
    assert_eq!(count(&stage), None, "nothing written");
    assert_eq!(
        stage.get("dedup:dev-1:1").as_deref(),
        Some("somebody else's value"),
        "not ours to delete"
    );
}

#[tokio::test]
async fn dedup_lost_reply_finds_its_own_done_mark_and_does_not_write_twice() {
    let stage = Stage::start().await;
    let json = json!({"seq": 1});
    let ctx = context(br#"{"seq":1}"#, &json);
    let (claim, pipe) = prepare(&ctx, &counting());
    // The transaction reached Redis and was applied; only its reply never came back.
    let _: () = bounded(stage.manager.query_pipeline(&pipe))
        .await
        .expect("applied");
    // The retry claims again (not `claimed`: it cannot know its lease is still there).
    assert_eq!(
        bounded(claim.write(&stage.env(), false, &pipe)).await,
        Ok(()),
        "our own write: written, not a duplicate"
    );
    assert_eq!(
        count(&stage),
        Some(1),
        "the transaction was not applied twice"
    );
    assert_eq!(
        stage.get("dedup:dev-1:1").as_deref(),
        Some(claim.marks.written())
    );
}

#[tokio::test]
async fn dedup_a_failed_transaction_releases_the_claim_and_fails() {
    let stage = Stage::start().await;
    // `incr` of a list: WRONGTYPE inside the transaction, whose done mark still lands (Redis
    // does not roll back), so the release must take back the mark as well as the lease.
    stage.run(redis::cmd("RPUSH").arg("count:dev-1").arg("x"));
    let json = json!({"seq": 1});
    let ctx = context(br#"{"seq":1}"#, &json);
    let (claim, pipe) = prepare(&ctx, &counting());
    let verdict = bounded(claim.write(&stage.env(), false, &pipe)).await;
    assert!(
        matches!(&verdict, Err(Outcome::Failed { detail }) if detail.contains("WRONGTYPE")),
        "expected failed (WRONGTYPE), got {verdict:?}"
    );
    assert_eq!(
        stage.get("dedup:dev-1:1"),
        None,
        "the key was given back, so a redelivery is processed"
    );
}

#[tokio::test]
async fn dedup_finish_turns_a_pending_forwards_mark_into_a_finished_one() {
    let stage = Stage::start().await;
    let json = json!({"seq": 1});
    let payload = br#"{"seq":1}"#;
    let ctx = context(payload, &json);
    let forwarding = Some(("stages", TOPIC, &payload[..]));
    let prepare_forwarding = || {
        let mut writes = actions::render(&counting(), &ctx).expect("actions render");
        let claim = dedup_rule()
            .prepare(&ctx, LEASE_PREFIX, forwarding, &mut writes.pipe)
            .expect("claim renders");
        actions::seal(&mut writes.pipe, true);
        (claim, writes.pipe)
    };
    let (claim, pipe) = prepare_forwarding();
    assert!(claim.marks.pending());
    assert_eq!(
        bounded(claim.write(&stage.env(), false, &pipe)).await,
        Ok(())
    );
    assert_eq!(
        stage.get("dedup:dev-1:1").as_deref(),
        Some(claim.marks.written())
    );

    // The attempt died before its forwards went out: the redelivery (a new attempt, a new
    // nonce) is this message, written again without writing Redis again.
    let (redelivery, pipe) = prepare_forwarding();
    assert_eq!(
        bounded(redelivery.write(&stage.env(), false, &pipe)).await,
        Ok(())
    );
    assert_eq!(count(&stage), Some(1));

    // Once the forwards are out, the same payload again is a duplicate.
    bounded(redelivery.finish(&stage.env())).await;
    let finished = stage.get("dedup:dev-1:1").expect("a mark");
    assert!(
        finished.starts_with("done:") && !finished.contains(":fwd:"),
        "finished: {finished}"
    );
    let (again, pipe) = prepare_forwarding();
    assert_eq!(
        bounded(again.write(&stage.env(), false, &pipe)).await,
        Err(Outcome::Duplicate)
    );
    assert_eq!(count(&stage), Some(1));
}

// ---------------------------------------------------------------------------------------
// Actions

#[tokio::test]
async fn actions_render_of_a_bad_template_is_invalid() {
    let json = json!({"seq": 1});
    let ctx = context(br#"{"seq":1}"#, &json);
    let actions = [Action {
        op: Op::Set {
            value: template("{payload}", Target::Value),
            nx: false,
            xx: false,
        },
        // The payload has no `site`.
        key: Some(template("site:{json.site}", Target::Key)),
        expiry: None,
    }];
    let Err(outcome) = actions::render(&actions, &ctx) else {
        panic!("rendered a key from a missing field");
    };
    assert!(
        matches!(
            outcome,
            Outcome::Invalid {
                reason: Reason::MissingField,
                ..
            }
        ),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn actions_write_of_a_wrongtype_pipeline_is_failed() {
    let stage = Stage::start().await;
    stage.run(redis::cmd("RPUSH").arg("count:dev-1").arg("x"));
    let json = json!({"seq": 1});
    let ctx = context(br#"{"seq":1}"#, &json);
    let writes = actions::render(&counting(), &ctx).expect("actions render");
    let verdict = bounded(actions::write(&stage.env(), &writes.pipe)).await;
    assert!(
        matches!(&verdict, Err(Outcome::Failed { detail }) if detail.contains("WRONGTYPE")),
        "expected failed (WRONGTYPE), got {verdict:?}"
    );
}
