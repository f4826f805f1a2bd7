//! Sessions (spec §3), as RouteMQ's `SessionManager` keeps them: a JSON document at
//! `session:{id}` with an expiry. The bridge and a RouteMQ app read each other's sessions:
//! we write compact JSON (which Python's `json.loads` reads) and read whatever Python's
//! `json.dumps` wrote (spaces after separators, `\uXXXX` escapes).
//!
//! Every operation has a `try_*` form returning [`Result`] (to tell "no session" from "Redis
//! failed") and a sentinel form in the seed's style (`None` / `false` on error, logged).
//! A session is one key, so Redis Cluster needs no hash tags.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::commands::SetOptions;
use super::error::{Error, Result};
use super::manager::RedisManager;

/// RouteMQ's key prefix: sessions live at `session:{id}`.
pub const DEFAULT_PREFIX: &str = "session:";

/// RouteMQ's session lifetime (`ex=86400`).
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// Sessions under one key prefix. Cheap to clone.
#[derive(Clone, Debug)]
pub struct SessionManager {
    manager: RedisManager,
    prefix: String,
}

impl SessionManager {
    /// Sessions at RouteMQ's `session:{id}`.
    pub fn new(manager: RedisManager) -> SessionManager {
        Self::with_prefix(manager, DEFAULT_PREFIX)
    }

    pub fn with_prefix(manager: RedisManager, prefix: impl Into<String>) -> SessionManager {
        SessionManager {
            manager,
            prefix: prefix.into(),
        }
    }

    /// The Redis key of session `id`.
    pub fn key(&self, id: &str) -> String {
        format!("{}{id}", self.prefix)
    }

    /// Writes session `id` (replacing any previous one) expiring after `ttl`.
    pub async fn try_create<T: Serialize + ?Sized>(
        &self,
        id: &str,
        data: &T,
        ttl: Duration,
    ) -> Result<()> {
        check_ttl(ttl)?;
        self.manager
            .try_set_json(self.key(id), data, SetOptions::new().px(ttl))
            .await?;
        Ok(())
    }

    /// Reads session `id`: `Ok(None)` when there is none; `Error::Decode` when the key holds
    /// something that is not JSON of type `T`.
    pub async fn try_get<T: DeserializeOwned>(&self, id: &str) -> Result<Option<T>> {
        self.manager.try_get_json(self.key(id)).await
    }

    /// Slides the expiry of session `id` to `ttl` from now. False when there is no session.
    pub async fn try_touch(&self, id: &str, ttl: Duration) -> Result<bool> {
        // A zero TTL would delete the session (EXPIRE 0): refuse it, as `create` does.
        check_ttl(ttl)?;
        self.manager.try_expire(self.key(id), ttl).await
    }

    /// Deletes session `id`. False when there was none.
    pub async fn try_delete(&self, id: &str) -> Result<bool> {
        Ok(self.manager.try_delete(self.key(id)).await? > 0)
    }

    /// [`SessionManager::try_create`], false on error (logged).
    pub async fn create<T: Serialize + ?Sized>(&self, id: &str, data: &T, ttl: Duration) -> bool {
        self.try_create(id, data, ttl)
            .await
            .map_err(|e| log_failure("create", &e))
            .is_ok()
    }

    /// [`SessionManager::try_get`], `None` when missing, unreadable or on error (logged).
    pub async fn get<T: DeserializeOwned>(&self, id: &str) -> Option<T> {
        self.try_get(id)
            .await
            .map_err(|e| log_failure("get", &e))
            .ok()
            .flatten()
    }

    /// [`SessionManager::try_touch`], false when missing or on error (logged).
    pub async fn touch(&self, id: &str, ttl: Duration) -> bool {
        self.try_touch(id, ttl)
            .await
            .map_err(|e| log_failure("touch", &e))
            .unwrap_or(false)
    }

    /// [`SessionManager::try_delete`], false when missing or on error (logged).
    pub async fn delete(&self, id: &str) -> bool {
        self.try_delete(id)
            .await
            .map_err(|e| log_failure("delete", &e))
            .unwrap_or(false)
    }
}

/// Connection trouble is the manager's to report (rate-limited); here only what it cannot
/// know: which session operation failed, and data errors.
fn log_failure(op: &str, e: &Error) {
    if e.is_transient() || *e == Error::Disabled {
        tracing::debug!(error = %e, "session {op} failed");
    } else {
        tracing::warn!(error = %e, "session {op} failed");
    }
}

fn check_ttl(ttl: Duration) -> Result<()> {
    if ttl.as_millis() == 0 {
        return Err(Error::Invalid("session ttl must be at least 1 ms".into()));
    }
    Ok(())
}
