//! The Redis manager: one per application, cheap to clone, the one door to Redis.
//!
//! Skeleton core (to be hardened): a lazily connecting `ConnectionManager`, the primitives
//! every method and pattern is built on (`query`, `query_pipeline`, `run_script`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ::redis::aio::ConnectionManager;
use ::redis::{Cmd, FromRedisValue, Pipeline, ScriptInvocation};
use tokio::sync::RwLock;

use super::config::RedisConfig;
use super::error::{Error, Result};

/// Spec §3's `RedisManager`. Clones share one connection and one health state.
#[derive(Clone)]
pub struct RedisManager {
    inner: Arc<Inner>,
}

struct Inner {
    config: RedisConfig,
    conn: RwLock<Option<ConnectionManager>>,
    up: AtomicBool,
}

impl std::fmt::Debug for RedisManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisManager")
            .field("config", &self.inner.config)
            .field("up", &self.inner.up.load(Ordering::Relaxed))
            .finish()
    }
}

impl RedisManager {
    /// A manager for `config`; no I/O until [`RedisManager::initialize`].
    pub fn new(config: RedisConfig) -> Self {
        RedisManager {
            inner: Arc::new(Inner {
                config,
                conn: RwLock::new(None),
                up: AtomicBool::new(false),
            }),
        }
    }

    pub fn config(&self) -> &RedisConfig {
        &self.inner.config
    }

    /// The `redis::Client` for this configuration, for connections of their own (pub/sub,
    /// blocking reads).
    pub fn redis_client(&self) -> Result<::redis::Client> {
        let c = &self.inner.config;
        let url = match &c.url {
            Some(url) => url.expose().to_string(),
            None => format!("redis://{}:{}/{}", c.host, c.port, c.db),
        };
        ::redis::Client::open(url).map_err(|e| Error::Invalid(e.to_string()))
    }

    /// Connect. True when Redis answered.
    pub async fn initialize(&self) -> bool {
        if !self.inner.config.enabled {
            return false;
        }
        let Ok(client) = self.redis_client() else {
            return false;
        };
        match ConnectionManager::new(client).await {
            Ok(cm) => {
                *self.inner.conn.write().await = Some(cm);
                self.inner.up.store(true, Ordering::Relaxed);
                true
            }
            Err(_) => false,
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.config.enabled && self.inner.up.load(Ordering::Relaxed)
    }

    async fn connection(&self) -> Result<ConnectionManager> {
        if !self.inner.config.enabled {
            return Err(Error::Disabled);
        }
        self.inner
            .conn
            .read()
            .await
            .clone()
            .ok_or_else(|| Error::Unavailable("not initialized".into()))
    }

    /// Run one command. The primitive every method is built on.
    pub async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
        let mut conn = self.connection().await?;
        Ok(cmd.query_async(&mut conn).await?)
    }

    /// Run a pipeline (or a MULTI/EXEC transaction when built with `.atomic()`).
    pub async fn query_pipeline<T: FromRedisValue>(&self, pipe: &Pipeline) -> Result<T> {
        let mut conn = self.connection().await?;
        Ok(pipe.query_async(&mut conn).await?)
    }

    /// Run a Lua script (EVALSHA, falling back to EVAL after a Redis restart).
    pub async fn run_script<T: FromRedisValue>(
        &self,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<T> {
        let mut conn = self.connection().await?;
        Ok(invocation.invoke_async(&mut conn).await?)
    }
}
