//! Cache-aside (spec §3) against a real Redis: the loader runs once and its value is cached;
//! with Redis down the loader's value is still returned.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use routemq_bridge::redis::cache::get_or_set_json;
use serde_json::{json, Value};

use crate::harness::Redis;

async fn load(calls: &AtomicUsize) -> Result<Value, String> {
    calls.fetch_add(1, Ordering::SeqCst);
    Ok(json!({"name": "sensor", "calls": 1}))
}

#[tokio::test]
async fn loader_is_called_once_then_the_value_comes_from_redis() {
    let redis = Redis::start();
    let m = redis.manager().await;
    let calls = AtomicUsize::new(0);
    let ttl = Duration::from_secs(60);
    let first = get_or_set_json(&m, "cache:dev", ttl, || load(&calls))
        .await
        .expect("loaded");
    let second = get_or_set_json(&m, "cache:dev", ttl, || load(&calls))
        .await
        .expect("cached");
    assert_eq!(first, second);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "second call served from Redis"
    );
    let mut conn = redis.client().get_connection().expect("connect");
    let stored: String = redis::cmd("GET")
        .arg("cache:dev")
        .query(&mut conn)
        .expect("get");
    assert_eq!(serde_json::from_str::<Value>(&stored).expect("json"), first);
    let ttl: i64 = redis::cmd("PTTL")
        .arg("cache:dev")
        .query(&mut conn)
        .expect("pttl");
    assert!(ttl > 0 && ttl <= 60_000, "cached with its ttl, got {ttl}");
}

#[tokio::test]
async fn redis_down_still_returns_the_loader_value() {
    let mut redis = Redis::start();
    let m = redis.manager().await;
    redis.kill();
    let calls = AtomicUsize::new(0);
    let value = tokio::time::timeout(
        Duration::from_secs(15),
        get_or_set_json(&m, "cache:dev", Duration::from_secs(60), || load(&calls)),
    )
    .await
    .expect("bounded")
    .expect("the loader's value");
    assert_eq!(value, json!({"name": "sensor", "calls": 1}));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn loader_error_reaches_the_caller_and_nothing_is_cached() {
    let redis = Redis::start();
    let m = redis.manager().await;
    let result: Result<Value, String> =
        get_or_set_json(&m, "cache:err", Duration::from_secs(60), || async {
            Err("db down".to_string())
        })
        .await;
    assert_eq!(result, Err("db down".to_string()));
    let mut conn = redis.client().get_connection().expect("connect");
    let exists: i64 = redis::cmd("EXISTS")
        .arg("cache:err")
        .query(&mut conn)
        .expect("exists");
    assert_eq!(exists, 0);
}
