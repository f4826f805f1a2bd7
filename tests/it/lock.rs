//! Distributed lock (spec §3) against a real Redis: one holder among contenders, release only
//! by the owner, expiry, extend, and acquire with timeout.

use std::time::Duration;

use routemq_bridge::redis::lock::{compare_and_delete, Lock};

use crate::harness::Redis;

fn holder(redis: &Redis, key: &str) -> Option<String> {
    let mut conn = redis.client().get_connection().expect("connect");
    redis::cmd("GET").arg(key).query(&mut conn).expect("get")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_contenders_exactly_one_holds_the_lock() {
    let redis = Redis::start();
    let (a, b) = (redis.manager().await, redis.manager().await);
    let lease = Duration::from_secs(30);
    let (x, y) = tokio::join!(
        Lock::acquire(&a, "lock:res", lease),
        Lock::acquire(&b, "lock:res", lease)
    );
    let held: Vec<Lock> = [x.expect("redis answers"), y.expect("redis answers")]
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(held.len(), 1, "exactly one holder");
    assert_eq!(holder(&redis, "lock:res").as_deref(), Some(held[0].token()));
}

#[tokio::test]
async fn a_non_owner_release_deletes_nothing() {
    let redis = Redis::start();
    let m = redis.manager().await;
    let lock = Lock::acquire(&m, "lock:res", Duration::from_secs(30))
        .await
        .expect("redis answers")
        .expect("free");
    let deleted = compare_and_delete(&m, "lock:res", "somebody-else")
        .await
        .expect("redis answers");
    assert!(!deleted);
    assert_eq!(holder(&redis, "lock:res").as_deref(), Some(lock.token()));
}

#[tokio::test]
async fn a_holder_whose_lease_expired_cannot_release_the_next_holders_lock() {
    let redis = Redis::start();
    let m = redis.manager().await;
    let first = Lock::acquire(&m, "lock:res", Duration::from_millis(100))
        .await
        .expect("redis answers")
        .expect("free");
    // Expiry frees the lock: the second contender gets it within its timeout.
    let second = Lock::acquire_with_timeout(
        &m,
        "lock:res",
        Duration::from_secs(30),
        Duration::from_secs(5),
    )
    .await
    .expect("redis answers")
    .expect("the expired lease freed the lock");
    assert!(
        !first.release().await.expect("redis answers"),
        "not ours any more"
    );
    assert_eq!(holder(&redis, "lock:res").as_deref(), Some(second.token()));
}

#[tokio::test]
async fn extend_keeps_the_lock_past_its_original_lease() {
    let redis = Redis::start();
    let m = redis.manager().await;
    let mut lock = Lock::acquire(&m, "lock:res", Duration::from_millis(300))
        .await
        .expect("redis answers")
        .expect("free");
    assert!(lock
        .extend(Duration::from_secs(30))
        .await
        .expect("redis answers"));
    // The passing of the original lease is the behaviour under test.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let other = Lock::acquire(&m, "lock:res", Duration::from_secs(1))
        .await
        .expect("redis answers");
    assert!(other.is_none(), "still held after the original lease");
    assert!(lock.release().await.expect("redis answers"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_with_timeout_gets_the_lock_once_the_holder_releases() {
    let redis = Redis::start();
    let m = redis.manager().await;
    let held = Lock::acquire(&m, "lock:res", Duration::from_secs(30))
        .await
        .expect("redis answers")
        .expect("free");
    let waiter = {
        let m = m.clone();
        tokio::spawn(async move {
            Lock::acquire_with_timeout(
                &m,
                "lock:res",
                Duration::from_secs(30),
                Duration::from_secs(10),
            )
            .await
        })
    };
    // Give the waiter time to find the lock held, so the retry path is what gets it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !waiter.is_finished(),
        "the waiter waits while the lock is held"
    );
    assert!(held.release().await.expect("redis answers"));
    let got = tokio::time::timeout(Duration::from_secs(15), waiter)
        .await
        .expect("bounded")
        .expect("task")
        .expect("redis answers");
    let got = got.expect("acquired after the release");
    assert_eq!(holder(&redis, "lock:res").as_deref(), Some(got.token()));
}

#[tokio::test]
async fn acquire_with_timeout_gives_up_while_the_lock_is_held() {
    let redis = Redis::start();
    let m = redis.manager().await;
    let held = Lock::acquire(&m, "lock:res", Duration::from_secs(30))
        .await
        .expect("redis answers")
        .expect("free");
    let got = Lock::acquire_with_timeout(
        &m,
        "lock:res",
        Duration::from_secs(30),
        Duration::from_millis(200),
    )
    .await
    .expect("redis answers");
    assert!(got.is_none());
    assert_eq!(holder(&redis, "lock:res").as_deref(), Some(held.token()));
}
