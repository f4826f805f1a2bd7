//! Distributed lock (spec §3): a key holding the owner's token with a lease.
//!
//! Acquire is `SET key token NX PX lease`; release and extend are Lua compare-and-delete /
//! compare-and-pexpire on the token, so a holder whose lease already expired can never
//! delete or prolong a lock somebody else took since. [`Lock::acquire_with_timeout`] retries
//! with jittered exponential backoff (5 ms doubling to 100 ms), not a busy spin.
//!
//! There is no release on `Drop`: an async release cannot run from `drop`, and a detached
//! task would race the next acquirer. Callers release explicitly with [`Lock::release`]; the
//! lease expiry is the safety net when a holder crashes or forgets. One key per lock, so
//! Redis Cluster needs no hash tags.

use std::sync::LazyLock;
use std::time::Duration;

use ::redis::Script;

use crate::backoff::Backoff;
use tokio::time::Instant;

use super::error::{Error, Result};
use super::manager::RedisManager;

static RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/lock_release.lua")));
static EXTEND: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/lock_extend.lua")));

/// First retry delay of [`Lock::acquire_with_timeout`].
const RETRY_INITIAL: Duration = Duration::from_millis(5);
/// Largest retry delay of [`Lock::acquire_with_timeout`].
const RETRY_MAX: Duration = Duration::from_millis(100);

/// A held lock. Release it with [`Lock::release`]; dropping it leaves the key to expire at
/// the end of its lease.
///
/// ```no_run
/// use std::time::Duration;
/// use routemq_redis::lock::Lock;
/// # async fn example(redis: &routemq_redis::RedisManager) -> routemq_redis::Result<()> {
/// let lease = Duration::from_secs(10);
/// // Wait up to 2 s for whoever holds it now.
/// match Lock::acquire_with_timeout(redis, "lock:firmware-update", lease, Duration::from_secs(2))
///     .await?
/// {
///     Some(mut lock) => {
///         // ... the work; renew the lease if it runs long:
///         if !lock.extend(lease).await? {
///             // The lease ran out and somebody else may hold it now: stop.
///         }
///         lock.release().await?;
///     }
///     None => println!("somebody else is updating"),
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
#[must_use = "a lock is held until released or until its lease expires"]
pub struct Lock {
    manager: RedisManager,
    key: String,
    token: String,
    lease: Duration,
}

impl Lock {
    /// One attempt to take `key` for `lease` with a fresh owner token (a v4 UUID).
    /// `Ok(None)` when somebody else holds it.
    pub async fn acquire(
        manager: &RedisManager,
        key: &str,
        lease: Duration,
    ) -> Result<Option<Lock>> {
        Self::acquire_as(manager, key, uuid::Uuid::new_v4().to_string(), lease).await
    }

    /// One attempt to take `key` for `lease` with the caller's own `token` (e.g. the dedup
    /// middleware's `lease:<client_id>:<nonce>`). The token must be unique per attempt.
    pub async fn acquire_as(
        manager: &RedisManager,
        key: &str,
        token: String,
        lease: Duration,
    ) -> Result<Option<Lock>> {
        let reply: Option<String> = manager
            .query(&acquire_cmd(key, &token, lease_ms(lease)?))
            .await?;
        Ok(reply.map(|_| Lock {
            manager: manager.clone(),
            key: key.to_string(),
            token,
            lease,
        }))
    }

    /// Takes `key`, retrying with jittered exponential backoff until `timeout` has passed.
    /// `Ok(None)` when it stayed held by somebody else. Transient Redis errors are retried
    /// too (the last one is returned if the time runs out); other errors end at once.
    pub async fn acquire_with_timeout(
        manager: &RedisManager,
        key: &str,
        lease: Duration,
        timeout: Duration,
    ) -> Result<Option<Lock>> {
        let deadline = Instant::now() + timeout;
        let mut backoff = Backoff::new(RETRY_INITIAL, RETRY_MAX);
        loop {
            let last_error = match Self::acquire(manager, key, lease).await {
                Ok(Some(lock)) => return Ok(Some(lock)),
                Ok(None) => None,
                Err(e) if e.is_transient() => Some(e),
                Err(e) => return Err(e),
            };
            let now = Instant::now();
            if now >= deadline {
                return match last_error {
                    Some(e) => Err(e),
                    None => Ok(None),
                };
            }
            let pause = backoff.next_delay().min(deadline - now);
            tokio::time::sleep(pause).await;
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// The owner token stored in the key.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The lease of the last acquire or extend.
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Releases the lock: true when our token was still there and is now deleted, false when
    /// the lease had expired (and possibly somebody else holds the key now, untouched).
    pub async fn release(self) -> Result<bool> {
        compare_and_delete(&self.manager, &self.key, &self.token).await
    }

    /// Renews the lease to `lease` from now: true while the lock is still ours, false when it
    /// had expired (then it is not re-taken; acquire again).
    pub async fn extend(&mut self, lease: Duration) -> Result<bool> {
        let mut invocation = EXTEND.key(&self.key);
        invocation.arg(&self.token).arg(lease_ms(lease)?);
        let extended: i64 = self.manager.run_script(&invocation).await?;
        if extended == 1 {
            self.lease = lease;
        }
        Ok(extended == 1)
    }
}

/// `SET key token NX PX lease_ms`: the one command that takes a lock. Public so a caller
/// can pipeline it with other commands (the dedup claim rides with the rate-limit check).
pub fn acquire_cmd(key: &str, token: &str, lease_ms: u64) -> ::redis::Cmd {
    let mut cmd = ::redis::cmd("SET");
    cmd.arg(key).arg(token).arg("NX").arg("PX").arg(lease_ms);
    cmd
}

/// Deletes `key` only while it holds `expected`, atomically. True when deleted. The
/// building block of [`Lock::release`], public for other owners of token-valued keys (the
/// dedup middleware's lease or `done` marker).
pub async fn compare_and_delete(manager: &RedisManager, key: &str, expected: &str) -> Result<bool> {
    let mut invocation = RELEASE.key(key);
    invocation.arg(expected);
    let deleted: i64 = manager.run_script(&invocation).await?;
    Ok(deleted == 1)
}

/// A lease in whole milliseconds; Redis refuses `PX 0`.
fn lease_ms(lease: Duration) -> Result<u64> {
    let ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
    if ms == 0 {
        return Err(Error::Invalid("lock lease must be at least 1 ms".into()));
    }
    Ok(ms)
}
