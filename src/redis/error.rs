//! Why a Redis call did not give an answer: the `Result` form of every manager method says
//! which of these happened, so a caller can tell "missing" from "failed".

use std::fmt;

/// The error of the `Result`-returning (`try_*`) methods of the manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Redis is switched off (`ENABLE_REDIS=false`).
    Disabled,
    /// Not connected: Redis is down or unreachable; the manager is reconnecting.
    Unavailable(String),
    /// The command got no answer within `socket_timeout`.
    Timeout,
    /// Redis answered with an error (e.g. `WRONGTYPE …`); retrying will not help.
    Response(String),
    /// A Lua script failed.
    Script(String),
    /// The answer could not be read as the requested type (e.g. invalid JSON).
    Decode(String),
    /// Every connection `max_connections` allows is in use.
    PoolExhausted,
    /// A bad argument from the caller (e.g. an invalid URL).
    Invalid(String),
}

impl Error {
    /// The `kind` label of `redis_errors_total` (spec §8); `None` for errors that never
    /// reached Redis.
    pub fn metric_kind(&self) -> Option<&'static str> {
        match self {
            Error::Unavailable(_) => Some("connection"),
            Error::Timeout => Some("timeout"),
            Error::Response(_) => Some("response"),
            Error::Script(_) => Some("script"),
            _ => None,
        }
    }

    /// True when the same command may succeed later (connection trouble), false when it
    /// never will (a Redis error reply, bad data).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Unavailable(_) | Error::Timeout | Error::PoolExhausted
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Disabled => f.write_str("redis is disabled (ENABLE_REDIS=false)"),
            Error::Unavailable(why) => write!(f, "redis is unavailable: {why}"),
            Error::Timeout => f.write_str("redis did not answer in time"),
            Error::Response(msg) => write!(f, "redis error: {msg}"),
            Error::Script(msg) => write!(f, "redis script error: {msg}"),
            Error::Decode(msg) => write!(f, "unexpected redis value: {msg}"),
            Error::PoolExhausted => f.write_str("redis max_connections reached"),
            Error::Invalid(msg) => write!(f, "invalid redis request: {msg}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<::redis::RedisError> for Error {
    fn from(e: ::redis::RedisError) -> Self {
        use ::redis::{ErrorKind, ServerErrorKind};
        if e.is_timeout() {
            Error::Timeout
        } else if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
            Error::Unavailable(e.to_string())
        } else {
            match e.kind() {
                ErrorKind::UnexpectedReturnType | ErrorKind::Parse => Error::Decode(e.to_string()),
                ErrorKind::Server(ServerErrorKind::NoScript)
                | ErrorKind::Server(ServerErrorKind::NotBusy) => Error::Script(e.to_string()),
                ErrorKind::Server(ServerErrorKind::BusyLoading)
                | ErrorKind::Server(ServerErrorKind::TryAgain)
                | ErrorKind::Server(ServerErrorKind::ClusterDown)
                | ErrorKind::Server(ServerErrorKind::MasterDown) => {
                    Error::Unavailable(e.to_string())
                }
                _ if e.to_string().contains("user_script") => Error::Script(e.to_string()),
                _ => Error::Response(e.to_string()),
            }
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
