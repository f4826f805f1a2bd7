//! Cache-aside (spec §3): read a JSON value from Redis, or compute it with a loader and store
//! it with a TTL.
//!
//! Redis is an optimisation here, never a dependency: when Redis fails (down, disabled, a
//! value that does not decode), the loader still runs and its value is returned. Only the
//! loader's own error reaches the caller. Concurrent misses on one key each run the loader
//! (no stampede protection); wrap the loader in a [`super::lock::Lock`] when that matters.

use std::future::Future;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::commands::SetOptions;
use super::error::Error;
use super::manager::RedisManager;

/// The value at `key` if it holds JSON of type `T`; otherwise `loader()`'s value, which is
/// then stored at `key` for `ttl` (best effort). Values are written as compact JSON, which
/// RouteMQ's `get_json` reads; values RouteMQ's `set_json` wrote are read too.
pub async fn get_or_set_json<T, E, F, Fut>(
    manager: &RedisManager,
    key: &str,
    ttl: Duration,
    loader: F,
) -> Result<T, E>
where
    T: Serialize + DeserializeOwned,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    match manager.try_get_json::<_, T>(key).await {
        Ok(Some(value)) => return Ok(value),
        Ok(None) => {}
        // A value of another shape (older version, another writer): recompute and overwrite
        // it rather than fail forever.
        Err(Error::Decode(e)) => {
            tracing::warn!(key, error = %e, "cache: stored value does not decode; reloading")
        }
        Err(e) => log_failure("read", key, &e),
    }
    let value = loader().await?;
    // At least 1 ms: a zero TTL would be refused, and the value is still worth caching.
    let ttl = ttl.max(Duration::from_millis(1));
    if let Err(e) = manager
        .try_set_json(key, &value, SetOptions::new().px(ttl))
        .await
    {
        log_failure("write", key, &e);
    }
    Ok(value)
}

/// Connection trouble is the manager's to report (rate-limited, so a dead Redis does not
/// flood the log once per lookup); Redis error replies are worth a warning.
fn log_failure(op: &str, key: &str, e: &Error) {
    if e.is_transient() || *e == Error::Disabled {
        tracing::debug!(key, error = %e, "cache {op} failed; using the loader");
    } else {
        tracing::warn!(key, error = %e, "cache {op} failed; using the loader");
    }
}
