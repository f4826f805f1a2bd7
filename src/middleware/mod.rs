//! Middleware, in the order a message meets it (spec §5.2): session → rate limit → dedup.
//!
//! Each stage lives in its own file with its config (read from its `[routes.*]` table) and
//! one step the engine calls: the step takes the message's template `Context` and returns a
//! [`Step`](crate::stage::Step) — go on (with what the stage found), or the message's outcome
//! on this route. The engine (`router/engine.rs`) only states their order.

pub mod dedup;
pub mod rate_limit;
pub mod session;
