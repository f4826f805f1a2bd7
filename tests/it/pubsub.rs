//! Pub/sub (spec §3, §6) against a real Redis: a literal subscription receives
//! `publish_json`, and a pattern subscription keeps receiving after Redis restarts.

use std::time::Duration;

use routemq_bridge::redis::pubsub::{publish, publish_json, Subscriber};
use serde_json::json;

use crate::harness::Redis;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn literal_subscription_receives_publish_json() {
    let redis = Redis::start();
    let m = redis.manager().await;
    let mut sub = Subscriber::start(&m, vec!["commands:dev-1".into()], vec![]);
    assert!(tokio::time::timeout(WAIT, sub.subscribed())
        .await
        .expect("bounded"));
    let receivers = publish_json(&m, "commands:dev-1", &json!({"cmd": "reboot", "n": 1}))
        .await
        .expect("published");
    assert_eq!(receivers, 1);
    let msg = tokio::time::timeout(WAIT, sub.recv())
        .await
        .expect("bounded")
        .expect("message");
    assert_eq!(msg.channel, "commands:dev-1");
    assert_eq!(msg.pattern, None);
    assert_eq!(msg.payload, br#"{"cmd":"reboot","n":1}"#);
    assert_eq!(sub.reconnects(), 0);
    sub.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pattern_subscription_keeps_receiving_after_redis_restarts() {
    let mut redis = Redis::start();
    let m = redis.manager().await;
    let mut sub = Subscriber::start(&m, vec![], vec!["events:*".into()]);
    assert!(tokio::time::timeout(WAIT, sub.subscribed())
        .await
        .expect("bounded"));
    publish(&m, "events:a", b"before").await.expect("published");
    let msg = tokio::time::timeout(WAIT, sub.recv())
        .await
        .expect("bounded")
        .expect("message");
    assert_eq!(msg.payload, b"before");

    redis.kill();
    redis.start_again();

    // Messages published before the subscriber is back are lost (pub/sub semantics), so keep
    // publishing until one arrives.
    let received = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let _ = publish(&m, "events:b", b"after").await;
            if let Ok(Some(msg)) =
                tokio::time::timeout(Duration::from_millis(200), sub.recv()).await
            {
                return msg;
            }
        }
    })
    .await
    .expect("a message arrives after the restart");
    assert_eq!(received.channel, "events:b");
    assert_eq!(received.pattern.as_deref(), Some("events:*"));
    assert_eq!(received.payload, b"after");
    assert!(sub.reconnects() >= 1, "reconnects: {}", sub.reconnects());
    assert!(sub.is_subscribed());
}

#[tokio::test]
async fn dropping_the_subscription_unsubscribes() {
    let redis = Redis::start();
    let m = redis.manager().await;
    let sub = Subscriber::start(&m, vec!["ch".into()], vec![]);
    assert!(tokio::time::timeout(WAIT, sub.subscribed())
        .await
        .expect("bounded"));
    assert_eq!(publish(&m, "ch", b"x").await.expect("published"), 1);
    drop(sub);
    // No event tells us Redis noticed the closed connection: poll, bounded.
    let gone = tokio::time::timeout(WAIT, async {
        while publish(&m, "ch", b"x").await.expect("published") != 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(gone.is_ok(), "the subscription's connection closed");
}
