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
    /// Redis is reachable but refuses for now (`OOM`, `READONLY`, `MISCONF`, `LOADING`, …,
    /// see [`REFUSALS`]): the same command will succeed once it has recovered, so this is a
    /// wait, like an outage (spec §5.3).
    Refused(String),
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
    /// The caller's deadline passed while waiting for Redis
    /// ([`until_ready_by`](crate::retry::until_ready_by)); nothing more was sent.
    DeadlinePassed,
}

impl Error {
    /// The `kind` label of `redis_errors_total` (spec §8); `None` for errors that never
    /// reached Redis.
    pub fn metric_kind(&self) -> Option<&'static str> {
        match self {
            Error::Unavailable(_) => Some("connection"),
            Error::Timeout => Some("timeout"),
            Error::Refused(_) => Some("refused"),
            Error::Response(_) => Some("response"),
            Error::Script(_) => Some("script"),
            _ => None,
        }
    }

    /// True when the command was sent and may have been applied although no answer came
    /// (it timed out). A lost connection is not counted: it is mostly Redis going away,
    /// before or after the command, and cannot tell which; callers that must know (a dedup
    /// claim) look for their own mark instead.
    pub fn may_have_applied(&self) -> bool {
        matches!(self, Error::Timeout)
    }

    /// True when the same command may succeed later (connection trouble, a refusal), false
    /// when it never will (a Redis error reply such as `WRONGTYPE`, a script error, bad data).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Unavailable(_) | Error::Timeout | Error::Refused(_) | Error::PoolExhausted
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Disabled => f.write_str("redis is disabled (ENABLE_REDIS=false)"),
            Error::Unavailable(why) => write!(f, "redis is unavailable: {why}"),
            Error::Timeout => f.write_str("redis did not answer in time"),
            Error::Refused(msg) => write!(f, "redis refuses for now: {msg}"),
            Error::Response(msg) => write!(f, "redis error: {msg}"),
            Error::Script(msg) => write!(f, "redis script error: {msg}"),
            Error::Decode(msg) => write!(f, "unexpected redis value: {msg}"),
            Error::PoolExhausted => f.write_str("redis max_connections reached"),
            Error::Invalid(msg) => write!(f, "invalid redis request: {msg}"),
            Error::DeadlinePassed => f.write_str("gave up waiting for redis: the deadline passed"),
        }
    }
}

impl std::error::Error for Error {}

/// The error codes of a Redis that is healthy but refuses for a while (spec §5.3): memory
/// full, a replica (failover), a failed background save, too few replicas, loading a
/// dataset, a busy script, a master link down, a cluster resharding or down, a cluster slot
/// that moved or is moving (`MOVED`/`ASK` that reach the caller: the cluster client follows
/// them for single commands; a transaction is retried by the manager for a while, see
/// `RedisManager::query_pipeline`). An `EXECABORT` counts as a refusal when a command was
/// refused with one of these while queueing. `UNBLOCKED` is what a blocked command (`WAIT`,
/// `BLPOP`, `XREADGROUP BLOCK`) gets when its master is demoted (`-UNBLOCKED force unblock
/// from blocking operation, instance state changed`): the same command works again on the
/// new master, so it is a wait, never a failure.
pub const REFUSALS: &[&str] = &[
    "OOM",
    "READONLY",
    "MISCONF",
    "NOREPLICAS",
    "LOADING",
    "BUSY",
    "MASTERDOWN",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "MOVED",
    "ASK",
    "UNBLOCKED",
];

/// Whether a Redis error code is one of [`REFUSALS`].
pub fn is_refusal(code: &str) -> bool {
    REFUSALS.contains(&code)
}

/// Whether `e` (a reply, or the replies of a pipeline or an aborted transaction) carries a
/// refusal. Decided on the error codes, not the message text.
fn refused(e: &::redis::RedisError) -> bool {
    if e.code().is_some_and(is_refusal) {
        return true;
    }
    e.clone()
        .into_server_errors()
        .is_some_and(|errors| {
            errors.iter().any(|(_, err)| {
                is_refusal(err.code())
                    // EXEC itself refused: `EXECABORT Transaction discarded because of:
                    // READONLY …` (a failover, or maxmemory crossed, between queueing and
                    // EXEC) names the cause after "because of:".
                    || (err.code() == "EXECABORT"
                        && err.details().is_some_and(|d| {
                            d.split_once("because of:").is_some_and(|(_, cause)| {
                                cause
                                    .split_whitespace()
                                    .next()
                                    .is_some_and(|code| is_refusal(code.trim_start_matches('-')))
                            })
                        }))
            })
        })
        // A script's own error keeps the code of the command that failed inside it
        // (`OOM … script: …`), as the first word of its message.
        || e.detail()
            .and_then(|d| d.split_whitespace().next())
            .is_some_and(is_refusal)
}

impl From<::redis::RedisError> for Error {
    fn from(e: ::redis::RedisError) -> Self {
        use ::redis::{ErrorKind, ServerErrorKind};
        if e.is_timeout() {
            Error::Timeout
        } else if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
            Error::Unavailable(e.to_string())
        } else if refused(&e) {
            Error::Refused(e.to_string())
        } else {
            match e.kind() {
                ErrorKind::UnexpectedReturnType | ErrorKind::Parse => Error::Decode(e.to_string()),
                ErrorKind::Server(ServerErrorKind::NoScript)
                | ErrorKind::Server(ServerErrorKind::NotBusy) => Error::Script(e.to_string()),
                _ if e.to_string().contains("user_script") => Error::Script(e.to_string()),
                _ => Error::Response(e.to_string()),
            }
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    /// The error a connection would return for `reply` (one RESP error line).
    fn reply_error(reply: &str) -> ::redis::RedisError {
        let value = ::redis::parse_redis_value(reply.as_bytes()).expect("a RESP reply");
        match value.extract_error() {
            Err(e) => e,
            Ok(v) => panic!("{reply:?} is no error: {v:?}"),
        }
    }

    #[test]
    fn refusals_are_waits_and_other_replies_are_failures() {
        for reply in [
            "-OOM command not allowed when used memory > 'maxmemory'.\r\n",
            "-READONLY You can't write against a read only replica.\r\n",
            "-MISCONF Redis is configured to save RDB snapshots, but it's currently unable\r\n",
            "-NOREPLICAS Not enough good replicas to write.\r\n",
            "-LOADING Redis is loading the dataset in memory\r\n",
            "-BUSY Redis is busy running a script.\r\n",
            "-MASTERDOWN Link with MASTER is down\r\n",
            "-TRYAGAIN Multiple keys request during rehashing of slot\r\n",
            "-CLUSTERDOWN The cluster is down\r\n",
            "-MOVED 3999 127.0.0.1:6381\r\n",
            "-ASK 3999 127.0.0.1:6381\r\n",
            "-UNBLOCKED force unblock from blocking operation, instance state changed (master -> replica?)\r\n",
            "-EXECABORT Transaction discarded because of: -READONLY You can't write against a read only replica.\r\n",
            "-EXECABORT Transaction discarded because of: OOM command not allowed when used memory > 'maxmemory'.\r\n",
        ] {
            let e = Error::from(reply_error(reply));
            assert!(matches!(e, Error::Refused(_)), "{reply:?} → {e:?}");
            assert!(e.is_transient());
            assert_eq!(e.metric_kind(), Some("refused"));
        }
        for reply in [
            "-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
            "-ERR value is not an integer or out of range\r\n",
            "-NOPERM this user has no permissions to run the 'set' command\r\n",
            "-EXECABORT Transaction discarded because of previous errors.\r\n",
        ] {
            let e = Error::from(reply_error(reply));
            assert!(matches!(e, Error::Response(_)), "{reply:?} → {e:?}");
            assert!(!e.is_transient());
        }
    }
}
