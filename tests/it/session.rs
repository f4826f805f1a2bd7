//! Sessions (spec §3) against a real Redis: RouteMQ's `session:{id}` JSON, its lifecycle,
//! and documents written by Python's `json.dumps`.

use std::time::Duration;

use routemq_bridge::redis::session::SessionManager;
use serde::{Deserialize, Serialize};

use crate::harness::Redis;

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Session {
    user_id: String,
    created_at: f64,
    name: String,
    tags: Vec<String>,
}

fn pttl(redis: &Redis, key: &str) -> i64 {
    let mut conn = redis.client().get_connection().expect("connect");
    redis::cmd("PTTL").arg(key).query(&mut conn).expect("pttl")
}

#[tokio::test]
async fn session_is_created_read_touched_and_deleted_at_session_id() {
    let redis = Redis::start();
    let sessions = SessionManager::new(redis.manager().await);
    let session = Session {
        user_id: "u1".into(),
        created_at: 1_700_000_000.5,
        name: "gw".into(),
        tags: vec!["a".into()],
    };
    sessions
        .try_create("dev-1", &session, Duration::from_secs(60))
        .await
        .expect("created");
    let ttl = pttl(&redis, "session:dev-1");
    assert!(
        ttl > 0 && ttl <= 60_000,
        "at session:{{id}} with its ttl, got {ttl}"
    );
    assert_eq!(
        sessions.try_get::<Session>("dev-1").await.expect("read"),
        Some(session)
    );

    assert!(sessions
        .try_touch("dev-1", Duration::from_secs(3600))
        .await
        .expect("touched"));
    assert!(
        pttl(&redis, "session:dev-1") > 60_000,
        "expiry slid forward"
    );

    assert!(sessions.try_delete("dev-1").await.expect("deleted"));
    assert_eq!(
        sessions.try_get::<Session>("dev-1").await.expect("read"),
        None
    );
    assert!(!sessions
        .try_touch("dev-1", Duration::from_secs(60))
        .await
        .expect("answered"));
    assert!(!sessions.delete("dev-1").await, "nothing left to delete");
}

#[tokio::test]
async fn session_written_by_python_json_dumps_is_read() {
    let redis = Redis::start();
    let sessions = SessionManager::new(redis.manager().await);
    let mut conn = redis.client().get_connection().expect("connect");
    // Exactly what `json.dumps(session_data)` produces: spaces after separators, non-ASCII
    // escaped.
    let python = r#"{"user_id": "u1", "created_at": 1700000000.25, "name": "Caf\u00e9", "tags": ["a", "b"]}"#;
    let _: () = redis::cmd("SET")
        .arg("session:py")
        .arg(python)
        .arg("EX")
        .arg(86400)
        .query(&mut conn)
        .expect("set");
    let read: Option<Session> = sessions.get("py").await;
    assert_eq!(
        read,
        Some(Session {
            user_id: "u1".into(),
            created_at: 1_700_000_000.25,
            name: "Café".into(),
            tags: vec!["a".into(), "b".into()],
        })
    );
}

#[tokio::test]
async fn sentinel_forms_report_failure_when_redis_is_down() {
    let mut redis = Redis::start();
    let sessions = SessionManager::with_prefix(redis.manager().await, "sess:");
    assert!(
        sessions
            .create("x", &serde_json::json!({"a": 1}), Duration::from_secs(60))
            .await
    );
    assert_eq!(sessions.key("x"), "sess:x");
    redis.kill();
    // Concurrent, so a manager slow to report "down" costs its delay once.
    let empty = serde_json::json!({});
    let (get, create, try_get) = tokio::join!(
        sessions.get::<serde_json::Value>("x"),
        sessions.create("y", &empty, Duration::from_secs(60)),
        sessions.try_get::<serde_json::Value>("x"),
    );
    assert_eq!(get, None);
    assert!(!create);
    assert!(
        try_get.is_err(),
        "the Result form tells failed from missing"
    );
}
