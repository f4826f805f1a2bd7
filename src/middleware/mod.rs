//! Middleware, in the order a message meets it (spec §5.2): session → rate limit → dedup.
//! Each stage lives in its own file with its config type.

pub mod dedup;
pub mod rate_limit;
pub mod session;
