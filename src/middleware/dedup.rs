//! De-duplication (spec §5.2): a lock that is safe under at-least-once delivery.
//!
//! The first delivery claims `key` with a lease (`SET NX PX`, value
//! `lease:<client_id>:<nonce>`); its actions and the `done` mark go into one MULTI/EXEC, so
//! "written" and "marked done" cannot part. If that transaction fails, the claim is deleted
//! again (compare-and-delete, only if it is still ours), so the broker's redelivery is
//! processed rather than dropped as a duplicate. A key another worker holds is waited for
//! until it is `done` (duplicate) or its lease lapses (we claim it); a value without expiry
//! is no lease and fails the message (`redis_error`) rather than holding the topic forever.

use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::redis::lock::{acquire_cmd, compare_and_delete};
use crate::redis::{RedisManager, Result};
use crate::router::template::Template;

/// The value of a key whose message was processed.
pub const DONE: &str = "done";

/// A route's `[routes.dedup]`.
#[derive(Clone, Debug)]
pub struct DedupRule {
    pub key: Template,
    /// How long `done` is remembered.
    pub ttl: Duration,
    /// How long a claim holds before another worker may take over.
    pub lease: Duration,
}

/// Whether this message should be processed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    Ours,
    Duplicate,
}

/// Claims `key` for `lease_value`, waiting (with backoff, up to a lease and a bit) while
/// another worker holds it.
pub async fn claim(
    redis: &RedisManager,
    key: &str,
    lease_value: &str,
    lease: Duration,
) -> Result<Claim> {
    let mut backoff = Backoff::new(Duration::from_millis(5), Duration::from_millis(250));
    let started = Instant::now();
    loop {
        let set: Option<String> = redis.query(&claim_cmd(key, lease_value, lease)).await?;
        if set.is_some() {
            return Ok(Claim::Ours);
        }
        let current: Option<String> = redis.query(::redis::cmd("GET").arg(key)).await?;
        match current.as_deref() {
            Some(DONE) => return Ok(Claim::Duplicate),
            // Our own claim from an earlier attempt at this same message.
            Some(v) if v == lease_value => return Ok(Claim::Ours),
            // Freed between our SET and GET: try again at once.
            None => continue,
            Some(other) => {
                // A lease always expires; a value without expiry is not a lease and will
                // never free itself: waiting would hold the topic forever, silently.
                let pttl: i64 = redis.query(::redis::cmd("PTTL").arg(key)).await?;
                if pttl == -2 {
                    continue; // freed meanwhile
                }
                if pttl == -1 {
                    return Err(crate::redis::Error::Invalid(format!(
                        "dedup key {key} holds {:?} without expiry: neither a lease nor `done`",
                        other.chars().take(64).collect::<String>()
                    )));
                }
                if started.elapsed() > lease * 2 {
                    // The holder keeps renewing or the clock is off: treat it as a
                    // transient condition so the message waits and is retried, not dropped.
                    return Err(crate::redis::Error::Unavailable(format!(
                        "dedup key {key} held by another worker for over {lease:?}"
                    )));
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// The claim itself: `SET key lease_value NX PX lease`; a reply of nil means the key is
/// already set (`done`, or a lease). Also sent in one pipeline with the rate-limit check.
pub fn claim_cmd(key: &str, lease_value: &str, lease: Duration) -> ::redis::Cmd {
    acquire_cmd(key, lease_value, (lease.as_millis() as u64).max(1))
}

/// Adds the `done` mark to the message's transaction.
pub fn mark_done(pipe: &mut ::redis::Pipeline, key: &str, ttl: Duration) {
    pipe.cmd("SET")
        .arg(key)
        .arg(DONE)
        .arg("PX")
        .arg((ttl.as_millis() as u64).max(1))
        .ignore();
}

/// After a failed transaction: delete the key if it still holds our lease or the `done` our
/// transaction may have written, so a redelivery gets processed.
pub async fn release(redis: &RedisManager, key: &str, lease_value: &str) -> Result<()> {
    if !compare_and_delete(redis, key, lease_value).await? {
        compare_and_delete(redis, key, DONE).await?;
    }
    Ok(())
}
