//! Waiting out Redis trouble that waiting fixes: one retry loop for every caller.
//!
//! A caller that must not give up on a message (a route's stages, the republisher) runs its
//! step again while the error is [`Error::is_transient`] (Redis down, a timeout, a refusal,
//! the connection cap reached), with the jittered [`Backoff`] between attempts, and returns
//! the first success or permanent error. Kept here, beside the errors it classifies, so no
//! caller builds a retry loop of its own; what a retry means to the caller (an event, a log
//! line) is its `on_retry`.

use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use crate::backoff::Backoff;
use crate::error::Error;

/// The first delay between attempts; doubles up to [`MAX_DELAY`].
pub const MIN_DELAY: Duration = Duration::from_millis(50);
/// The longest delay between attempts: short enough that a message moves soon after Redis
/// is back.
pub const MAX_DELAY: Duration = Duration::from_secs(2);

/// Runs `step` until it succeeds or fails for good, calling `on_retry` with each transient
/// error before waiting.
///
/// ```no_run
/// # async fn example(redis: routemq_redis::RedisManager) -> routemq_redis::Result<()> {
/// use routemq_redis::retry::until_ready;
///
/// let value = until_ready(
///     || redis.try_get("greeting"),
///     |e| eprintln!("waiting for redis: {e}"),
/// )
/// .await?;
/// # let _ = value;
/// # Ok(())
/// # }
/// ```
pub async fn until_ready<T, F, Fut>(step: F, on_retry: impl FnMut(&Error)) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    match until_ready_or(std::future::pending::<()>(), step, on_retry).await {
        Some(result) => result,
        None => unreachable!("a pending future never completes"),
    }
}

/// [`until_ready`] that gives up once `deadline` has passed, for work that is worthless
/// late (a message with an expiry): checked before every attempt, never cancelling one in
/// flight, so [`Error::DeadlinePassed`] means nothing was sent after the deadline — and
/// nothing before it may have been applied. Once an attempt ended in a way that may have
/// applied it ([`Error::may_have_applied`]: it timed out), the deadline no longer counts: the step runs until it is settled, because giving up then
/// would call "not done" what may be done (the caller's next attempt finds out, or does it
/// again: at-least-once wins over the deadline).
pub async fn until_ready_by<T, F, Fut>(
    deadline: Option<std::time::Instant>,
    mut step: F,
    mut on_retry: impl FnMut(&Error),
) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    // Atomic rather than a `Cell`: the future must stay `Send` (it is awaited on a runtime).
    let settling = std::sync::atomic::AtomicBool::new(false);
    until_ready(
        || {
            let passed = !settling.load(std::sync::atomic::Ordering::Relaxed)
                && deadline.is_some_and(|d| std::time::Instant::now() >= d);
            // Futures are lazy: an attempt made after the deadline is dropped unsent.
            let attempt = step();
            async move {
                if passed {
                    return Err(Error::DeadlinePassed);
                }
                attempt.await
            }
        },
        |e| {
            if e.may_have_applied() {
                settling.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            on_retry(e)
        },
    )
    .await
}

/// [`until_ready`] that gives up when `stop` completes, during an attempt or a wait: `None`
/// then.
pub async fn until_ready_or<T, F, Fut>(
    stop: impl Future,
    mut step: F,
    mut on_retry: impl FnMut(&Error),
) -> Option<Result<T, Error>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Error>>,
{
    // Pinned once: `stop` is polled across attempts, not restarted for each.
    let mut stop = pin!(stop);
    let mut backoff = Backoff::new(MIN_DELAY, MAX_DELAY);
    loop {
        let result = tokio::select! {
            r = step() => r,
            _ = &mut stop => return None,
        };
        match result {
            Err(e) if e.is_transient() => {
                on_retry(&e);
                tokio::select! {
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                    _ = &mut stop => return None,
                }
            }
            other => return Some(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[tokio::test(start_paused = true)]
    async fn transient_errors_are_retried_until_the_step_succeeds() {
        let attempts = Cell::new(0);
        let retries = Cell::new(0);
        let result = until_ready(
            || {
                attempts.set(attempts.get() + 1);
                let n = attempts.get();
                async move {
                    if n < 3 {
                        Err(Error::Timeout)
                    } else {
                        Ok(n)
                    }
                }
            },
            |_| retries.set(retries.get() + 1),
        )
        .await;
        assert_eq!(result.ok(), Some(3));
        assert_eq!(retries.get(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_error_is_returned_at_once() {
        let attempts = Cell::new(0);
        let result: Result<(), Error> = until_ready(
            || {
                attempts.set(attempts.get() + 1);
                async { Err(Error::Response("WRONGTYPE".into())) }
            },
            |_| panic!("no retry for a permanent error"),
        )
        .await;
        assert!(matches!(result, Err(Error::Response(_))));
        assert_eq!(attempts.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_passed_deadline_ends_the_wait_between_attempts() {
        let attempts = Cell::new(0);
        let deadline = std::time::Instant::now() + Duration::from_millis(200);
        let result: Result<(), Error> = until_ready_by(
            Some(deadline),
            || {
                attempts.set(attempts.get() + 1);
                async { Err(Error::Unavailable("not connected".into())) }
            },
            |_| std::thread::sleep(Duration::from_millis(60)),
        )
        .await;
        assert_eq!(result, Err(Error::DeadlinePassed));
        assert!((2..=5).contains(&attempts.get()), "{}", attempts.get());
    }

    #[tokio::test(start_paused = true)]
    async fn after_an_attempt_that_may_have_applied_the_deadline_no_longer_counts() {
        let attempts = Cell::new(0);
        let deadline = std::time::Instant::now() + Duration::from_millis(100);
        let result = until_ready_by(
            Some(deadline),
            || {
                attempts.set(attempts.get() + 1);
                let n = attempts.get();
                async move {
                    match n {
                        1 => Err(Error::Timeout),
                        2..=3 => Err(Error::Unavailable("not connected".into())),
                        _ => Ok(n),
                    }
                }
            },
            |_| std::thread::sleep(Duration::from_millis(60)),
        )
        .await;
        assert_eq!(result, Ok(4), "settled, not abandoned at the deadline");
    }

    #[tokio::test(start_paused = true)]
    async fn stop_ends_the_wait() {
        let (tx, mut rx) = tokio::sync::watch::channel(false);
        let stop = rx.wait_for(|s| *s);
        let retrying = until_ready_or(
            stop,
            || async { Err::<(), _>(Error::Timeout) },
            |_| {
                let _ = tx.send(true);
            },
        );
        let result = tokio::time::timeout(Duration::from_secs(60), retrying).await;
        assert!(matches!(result, Ok(None)), "stopped, not timed out");
    }
}
