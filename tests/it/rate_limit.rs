//! Rate limiting (spec §5.2) against a real Redis: exact limits under concurrency, also
//! across two managers (two bridges sharing Redis), RouteMQ's fixed-window key, a sliding
//! window that slides, token-bucket bursts, and the fallbacks when Redis is down.

use std::time::{Duration, SystemTime};

use routemq_bridge::redis::rate_limit::{
    fixed_window_key, Decision, Fallback, Limit, RateLimiter, Strategy,
};
use routemq_bridge::redis::Error;

use crate::harness::Redis;

const STRATEGIES: [Strategy; 3] = [
    Strategy::SlidingWindow,
    Strategy::FixedWindow,
    Strategy::TokenBucket,
];

fn five_per_minute(strategy: Strategy) -> Limit {
    Limit::new(strategy, 5, Duration::from_secs(60))
}

/// Fires `n` concurrent checks of `key` spread over `limiters`; returns how many were allowed.
async fn concurrent_allowed(
    limiters: &[std::sync::Arc<RateLimiter>],
    key: &str,
    limit: &Limit,
    n: usize,
) -> usize {
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let limiter = std::sync::Arc::clone(&limiters[i % limiters.len()]);
            let key = key.to_string();
            let limit = limit.clone();
            tokio::spawn(async move { limiter.try_check(&key, &limit).await })
        })
        .collect();
    let mut allowed = 0;
    for task in tasks {
        let decision = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("check answers in time")
            .expect("task")
            .expect("redis decides");
        assert_eq!(decision.fallback, None, "redis decided");
        if decision.allowed {
            allowed += 1;
        }
    }
    allowed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_requests_admit_exactly_max_for_every_strategy() {
    let redis = Redis::start();
    let limiter = std::sync::Arc::new(RateLimiter::new(redis.manager().await));
    for strategy in STRATEGIES {
        let key = format!("rate_limit:test:{strategy:?}");
        let allowed = concurrent_allowed(
            std::slice::from_ref(&limiter),
            &key,
            &five_per_minute(strategy),
            50,
        )
        .await;
        assert_eq!(allowed, 5, "{strategy:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_bridges_sharing_redis_admit_exactly_max_together() {
    let redis = Redis::start();
    let a = std::sync::Arc::new(RateLimiter::new(redis.manager().await));
    let b = std::sync::Arc::new(RateLimiter::new(redis.manager().await));
    for strategy in STRATEGIES {
        let key = format!("rate_limit:shared:{strategy:?}");
        let allowed = concurrent_allowed(
            &[a.clone(), b.clone()],
            &key,
            &five_per_minute(strategy),
            50,
        )
        .await;
        assert_eq!(allowed, 5, "{strategy:?}");
    }
}

#[tokio::test]
async fn fixed_window_counts_on_routemq_key_and_shares_its_budget() {
    let redis = Redis::start();
    let limiter = RateLimiter::new(redis.manager().await);
    let mut conn = redis.client().get_connection().expect("connect");
    let window = Duration::from_secs(60);
    let limit = Limit::new(Strategy::FixedWindow, 5, window);
    // A window boundary between computing the key and checking would split the count; such
    // an attempt is retried.
    for _ in 0..3 {
        let key = fixed_window_key("rate_limit:topic:devices/a/data", window, SystemTime::now());
        // RouteMQ's RateLimitMiddleware has already counted three requests in this window.
        let _: i64 = redis::cmd("INCRBY")
            .arg(&key)
            .arg(3)
            .query(&mut conn)
            .expect("incr");
        let decisions: Vec<bool> = {
            let mut v = Vec::new();
            for _ in 0..3 {
                let d = limiter
                    .try_check("rate_limit:topic:devices/a/data", &limit)
                    .await
                    .expect("redis decides");
                v.push(d.allowed);
            }
            v
        };
        let after = fixed_window_key("rate_limit:topic:devices/a/data", window, SystemTime::now());
        if after != key {
            continue;
        }
        assert_eq!(
            decisions,
            [true, true, false],
            "3 by RouteMQ + 2 by us = max 5"
        );
        let count: i64 = redis::cmd("GET").arg(&key).query(&mut conn).expect("get");
        assert_eq!(
            count, 6,
            "INCR on every request, denied ones too (as RouteMQ)"
        );
        let ttl: i64 = redis::cmd("PTTL").arg(&key).query(&mut conn).expect("pttl");
        assert!(
            ttl > 0 && ttl <= 61_000,
            "expiry window + 1 s, got {ttl} ms"
        );
        return;
    }
    panic!("three window boundaries in a row");
}

#[tokio::test]
async fn sliding_window_admits_again_once_the_window_has_passed() {
    let redis = Redis::start();
    let limiter = RateLimiter::new(redis.manager().await);
    let limit = Limit::new(Strategy::SlidingWindow, 2, Duration::from_millis(300));
    assert!(
        limiter
            .try_check("slide", &limit)
            .await
            .expect("check")
            .allowed
    );
    assert!(
        limiter
            .try_check("slide", &limit)
            .await
            .expect("check")
            .allowed
    );
    let denied = limiter.try_check("slide", &limit).await.expect("check");
    assert!(!denied.allowed);
    assert!(
        denied.retry_after > Duration::ZERO && denied.retry_after <= Duration::from_millis(300),
        "retry_after {:?}",
        denied.retry_after
    );
    // The passing of time is the behaviour under test.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let again = limiter.try_check("slide", &limit).await.expect("check");
    assert!(again.allowed, "the window slid past the first two requests");
    assert_eq!(again.remaining, 1);
}

#[tokio::test]
async fn token_bucket_admits_its_burst_then_limits() {
    let redis = Redis::start();
    let limiter = RateLimiter::new(redis.manager().await);
    let limit = Limit::new(Strategy::TokenBucket, 5, Duration::from_secs(60)).with_burst(8);
    let mut allowed = 0;
    let mut last = None;
    for _ in 0..20 {
        let d = limiter.try_check("bucket", &limit).await.expect("check");
        if d.allowed {
            allowed += 1;
        }
        last = Some(d);
    }
    assert_eq!(allowed, 8, "the burst");
    let last = last.expect("checked");
    assert!(!last.allowed);
    // One request per window / max = 12 s on average.
    assert!(
        last.retry_after > Duration::from_secs(11) && last.retry_after <= Duration::from_secs(12),
        "retry_after {:?}",
        last.retry_after
    );
}

/// Runs `n` concurrent checks of `key` with `fallback`; returns the decisions. Concurrent so
/// that a manager slow to report "down" costs its delay once, not once per check.
async fn concurrent_fallback_checks(
    limiter: &RateLimiter,
    key: &str,
    limit: &Limit,
    fallback: Fallback,
    n: usize,
) -> Vec<Decision> {
    let checks = (0..n).map(|_| limiter.check(key, limit, fallback));
    tokio::time::timeout(
        Duration::from_secs(60),
        futures_util::future::join_all(checks),
    )
    .await
    .expect("the fallback decides in bounded time")
    .into_iter()
    .map(|d| d.expect("the fallback decides"))
    .collect()
}

#[tokio::test]
async fn redis_down_local_fallback_admits_exactly_max() {
    let mut redis = Redis::start();
    let limiter = RateLimiter::new(redis.manager().await);
    redis.kill();
    let rounds = STRATEGIES.map(|strategy| {
        let limiter = &limiter;
        async move {
            let limit = five_per_minute(strategy);
            let key = format!("rate_limit:down:{strategy:?}");
            let decisions =
                concurrent_fallback_checks(limiter, &key, &limit, Fallback::Local, 20).await;
            (strategy, decisions)
        }
    });
    for (strategy, decisions) in futures_util::future::join_all(rounds).await {
        assert!(decisions
            .iter()
            .all(|d| d.fallback == Some(Fallback::Local)));
        let allowed = decisions.iter().filter(|d| d.allowed).count();
        assert_eq!(allowed, 5, "{strategy:?}");
    }
}

#[tokio::test]
async fn redis_down_allow_fallback_admits_everything() {
    let mut redis = Redis::start();
    let limiter = RateLimiter::new(redis.manager().await);
    redis.kill();
    let limit = five_per_minute(Strategy::SlidingWindow);
    let decisions = concurrent_fallback_checks(&limiter, "k", &limit, Fallback::Allow, 20).await;
    assert!(decisions
        .iter()
        .all(|d| d.allowed && d.fallback == Some(Fallback::Allow)));
}

#[tokio::test]
async fn redis_down_deny_fallback_refuses_everything() {
    let mut redis = Redis::start();
    let limiter = RateLimiter::new(redis.manager().await);
    redis.kill();
    let limit = five_per_minute(Strategy::FixedWindow);
    let decisions = concurrent_fallback_checks(&limiter, "k", &limit, Fallback::Deny, 20).await;
    assert!(decisions
        .iter()
        .all(|d| !d.allowed && d.fallback == Some(Fallback::Deny)));
}

#[tokio::test]
async fn a_redis_error_reply_is_reported_not_hidden_by_the_fallback() {
    let redis = Redis::start();
    let limiter = RateLimiter::new(redis.manager().await);
    let mut conn = redis.client().get_connection().expect("connect");
    let _: () = redis::cmd("SET")
        .arg("not-a-zset")
        .arg("x")
        .query(&mut conn)
        .expect("set");
    let result = limiter
        .check(
            "not-a-zset",
            &five_per_minute(Strategy::SlidingWindow),
            Fallback::Allow,
        )
        .await;
    assert!(
        matches!(result, Err(Error::Response(_)) | Err(Error::Script(_))),
        "WRONGTYPE surfaces: {result:?}"
    );
}
