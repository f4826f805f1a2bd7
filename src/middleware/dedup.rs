//! De-duplication (spec §5.2): a lock that is safe under at-least-once delivery.
//!
//! The first delivery claims `key` with a lease (`SET NX PX`, value
//! `lease:<client_id>:<nonce>`); its actions and the done mark go into one MULTI/EXEC, so
//! "written" and "marked done" cannot part. If that transaction fails, the claim is deleted
//! again (compare-and-delete, only on our own lease or our own done mark), so the broker's
//! redelivery is processed rather than dropped as a duplicate.
//!
//! **Whose done mark is it?** The mark is `done:<client_id>:<nonce>`, the nonce of this
//! attempt's lease, so a transaction whose reply was lost — a timeout *or* a dropped
//! connection — is resolved exactly when the retry meets the key: our own mark means our
//! write landed ([`Claim::Written`]: not written again, outcome `written`, the forwards go
//! out, spec §6); any other mark means somebody else's write ([`Claim::Duplicate`]). Any
//! value starting with `done` is a done mark; a plain `done` (older bridges) is accepted.
//!
//! **A crash between EXEC and the forwards** (`kill -9`, power loss): the redelivery is a new
//! attempt with a new nonce, so the nonce alone cannot tell it from a true duplicate (the
//! device sending the same message twice, usually with the same payload). A route with
//! `mqtt_publish` forwards therefore writes its mark in two steps: the transaction writes
//! `done:<client_id>:<nonce>:fwd:<digest>` ("written, forwards not yet out", the digest a
//! hash of route, topic and payload), and once the forwards are out [`finish`] rewrites it
//! to the plain mark, before the message is acked. A delivery that meets a `:fwd:` mark with
//! its own digest is the same message whose first attempt died before its forwards went
//! out: `written` again, without writing Redis again, and the forwards are sent (a second
//! copy is what at-least-once allows; a lost forward is not). A finished mark, or another
//! message's digest, is a duplicate, so a device's retransmission is still counted as
//! `duplicate` and not forwarded twice. The price is one more round trip per message, only
//! on routes that have both dedup and forwards. A route without forwards has nothing left
//! to do after EXEC: its redelivery after a crash is reported `duplicate` (its write is in
//! Redis; nothing is lost).
//!
//! **A lease left by an earlier run of this instance.** The nonce of a lease value
//! (`lease:<client_id>:<nonce>`, 32 hex digits) starts with 16 drawn once per process, the
//! run ([`lease_prefix`]); the other 16 are drawn per message.
//! After `kill -9` (or a crash) the broker redelivers what the process had not acked to the
//! restarted process — same client id, same session — and the keys the dead one had
//! claimed but not finished still hold its leases. Waiting them out would hold every ack
//! behind them for up to `lease` (30 s by default): the whole instance stalls after each
//! restart. A lease of our own client id but of another run is therefore taken over
//! (compare-and-delete, then claim) once it has been held for `2 × socket_timeout` (at most
//! the lease): the broker lets one connection per client id hold a session, and distinct
//! client ids per instance are the operator's job (`check` warns about a share group on the
//! default one), so that run is gone — or, in an overlapping restart, kicked off the broker
//! and finishing what it holds, which by then has been written (its done mark is seen) or
//! has timed out. Not at once: a takeover while that run's transaction is still on its way
//! would write the message twice.
//!
//! **Foreign values.** A key held by another worker's lease (`lease:…`, with an expiry) is
//! waited for until it is done (duplicate) or its lease lapses (we claim it). Anything else —
//! neither a lease nor a done mark, with or without a TTL, or a lease without expiry — is
//! not ours to wait for: it fails the message at once (`redis_error`, naming the key) rather
//! than holding the topic, and with it every later ack, for hours.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::backoff::Backoff;
use crate::config::reader::Table;
use crate::outcome::Outcome;
use crate::redis::lock::{acquire_cmd, compare_and_delete};
use crate::redis::{Error, RedisManager, Result};
use crate::stage::{failed, Env, Step};
use crate::template::{read as template, Context, Scope, Target, Template};

/// The value of a key whose message was processed, as older bridges wrote it; every done
/// mark starts with it.
pub const DONE: &str = "done";

/// What a lease value starts with.
const LEASE_PREFIX: &str = "lease:";

/// Separates a done mark from the digest of a message whose forwards are not out yet.
const FORWARDS_PENDING: &str = ":fwd:";

/// A route's `[routes.dedup]`.
#[derive(Clone, Debug)]
pub struct DedupRule {
    pub key: Template,
    /// How long `done` is remembered.
    pub ttl: Duration,
    /// How long a claim holds before another worker may take over.
    pub lease: Duration,
}

impl DedupRule {
    /// Reads `[routes.dedup]`; `None` (errors recorded) when it is unusable.
    pub(crate) fn read(mut d: Table<'_>, scope: &Scope<'_>) -> Option<DedupRule> {
        let key = template(&mut d, "key", Target::Key, scope, None);
        let ttl = d.positive_duration("ttl", Duration::from_secs(3600));
        let lease = d.positive_duration("lease", Duration::from_secs(30));
        d.finish();
        Some(DedupRule {
            key: key?,
            ttl,
            lease,
        })
    }
}

/// Whether this message should be processed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The key is ours: run the actions.
    Ours,
    /// This message's write is already in Redis (a lost reply, or an attempt that died
    /// before its forwards went out): do not write again, but send the forwards.
    Written,
    /// Another message's write: outcome `duplicate`.
    Duplicate,
}

/// How long the nonce of a lease value is, in hex digits: the run, then the message's part.
const NONCE_DIGITS: usize = 32;
/// How many of them are the run, drawn once per process.
const RUN_DIGITS: usize = 16;

/// `lease:<client_id>:<run>`, the start of every lease value this process writes for
/// `client_id`: `<run>` (16 hex digits, the first half of the nonce) is drawn once per call,
/// so one engine (one process) keeps it for its life and a restarted process gets another.
/// [`DedupRule::prepare`] completes the nonce per message.
pub fn lease_prefix(client_id: &str) -> String {
    format!(
        "{LEASE_PREFIX}{client_id}:{:0width$x}",
        rand::random::<u64>(),
        width = RUN_DIGITS
    )
}

/// Whether `s` is `digits` lowercase hex digits.
fn is_hex(s: &str, digits: usize) -> bool {
    s.len() == digits && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The values one attempt at one message puts at its dedup key.
#[derive(Clone, Debug)]
pub struct Marks {
    /// `lease:<client_id>:<nonce>`, the nonce starting with the process's run.
    pub lease: String,
    /// `done:<client_id>:<nonce>`: the finished mark.
    done: String,
    /// What the transaction writes: `done`, or with forwards `done…:fwd:<digest>`.
    written: String,
    /// With forwards: the message's digest, to recognise its own unfinished mark.
    digest: Option<String>,
}

impl Marks {
    /// The marks for the lease value `lease` (`lease:<client_id>:<nonce>`); `forwards`
    /// (route, topic, payload) when the message has `mqtt_publish` forwards.
    pub fn new(lease: String, forwards: Option<(&str, &str, &[u8])>) -> Marks {
        let done = format!(
            "{DONE}:{}",
            lease.strip_prefix(LEASE_PREFIX).unwrap_or(&lease)
        );
        let digest = forwards.map(|(route, topic, payload)| digest(route, topic, payload));
        let written = match &digest {
            Some(d) => format!("{done}{FORWARDS_PENDING}{d}"),
            None => done.clone(),
        };
        Marks {
            lease,
            done,
            written,
            digest,
        }
    }

    /// The mark this attempt's transaction writes.
    pub fn written(&self) -> &str {
        &self.written
    }

    /// Whether the transaction's mark must be rewritten by [`finish`] once the forwards are
    /// out.
    pub fn pending(&self) -> bool {
        self.digest.is_some()
    }

    /// Whether `lease` (a lease value found at the key) was taken by an earlier run of this
    /// instance: our client id, a nonce of another run (a bridge from before runs drew the
    /// whole nonce per message: another run too). Anything else, ours included, is not.
    fn left_by_an_earlier_run(&self, lease: &str) -> bool {
        // `lease:<client_id>:<nonce>`: the nonce is hex, the client id may hold anything
        // (colons too), so the nonce is found from the right.
        let Some((instance, nonce)) = self.lease.rsplit_once(':') else {
            return false;
        };
        if !is_hex(nonce, NONCE_DIGITS) {
            return false;
        }
        let Some(theirs) = lease
            .strip_prefix(instance)
            .and_then(|r| r.strip_prefix(':'))
        else {
            return false;
        };
        is_hex(theirs, NONCE_DIGITS) && theirs[..RUN_DIGITS] != nonce[..RUN_DIGITS]
    }

    /// What a value found at the key means for this message, if it is a done mark.
    fn judge_done(&self, value: &str) -> Option<Claim> {
        if value == self.written || value == self.done {
            return Some(Claim::Written);
        }
        if value != DONE && !value.starts_with("done:") {
            return None;
        }
        let unfinished = value
            .rsplit_once(FORWARDS_PENDING)
            .map(|(_, digest)| digest);
        Some(match (unfinished, &self.digest) {
            (Some(theirs), Some(ours)) if theirs == ours => Claim::Written,
            _ => Claim::Duplicate,
        })
    }
}

/// A digest of the message for one route: the same for every delivery of it, different for
/// another payload, topic or route (two routes may share a dedup key).
fn digest(route: &str, topic: &str, payload: &[u8]) -> String {
    let mut hasher = Sha256::new();
    for part in [route.as_bytes(), topic.as_bytes(), payload] {
        // Length-prefixed, so no two (route, topic, payload) splits hash alike.
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    let hash = hasher.finalize();
    // 128 bits tell messages apart well enough, at half the bytes in Redis.
    hash[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// Claims `key` for this attempt, waiting (with backoff, up to a lease and a bit) while
/// another worker's lease holds it.
pub async fn claim(
    redis: &RedisManager,
    key: &str,
    marks: &Marks,
    lease: Duration,
) -> Result<Claim> {
    let mut backoff = Backoff::new(Duration::from_millis(5), Duration::from_millis(250));
    let started = Instant::now();
    loop {
        let set: Option<String> = redis.query(&claim_cmd(key, &marks.lease, lease)).await?;
        if set.is_some() {
            return Ok(Claim::Ours);
        }
        let current: Option<String> = redis.query(::redis::cmd("GET").arg(key)).await?;
        let Some(current) = current else {
            continue; // freed between our SET and GET: try again at once
        };
        // Our own claim from an earlier attempt at this same message.
        if current == marks.lease {
            return Ok(Claim::Ours);
        }
        if let Some(judged) = marks.judge_done(&current) {
            return Ok(judged);
        }
        if !current.starts_with(LEASE_PREFIX) {
            return Err(Error::Invalid(format!(
                "dedup key {key} holds {:?}: neither a lease nor a done mark",
                current.chars().take(64).collect::<String>()
            )));
        }
        // A lease always expires; one without expiry will never free itself: waiting would
        // hold the topic forever, silently.
        let pttl: i64 = redis.query(::redis::cmd("PTTL").arg(key)).await?;
        if pttl == -2 {
            continue; // freed meanwhile
        }
        if pttl == -1 {
            return Err(Error::Invalid(format!(
                "dedup key {key} holds the lease {:?} without expiry",
                current.chars().take(64).collect::<String>()
            )));
        }
        if marks.left_by_an_earlier_run(&current) {
            // That run is gone or going (see the module doc): take its lease over once it
            // has been held for `takeover_after`, not at once.
            let held = lease.saturating_sub(Duration::from_millis(pttl.unsigned_abs()));
            if held >= takeover_after(redis, lease) {
                if compare_and_delete(redis, key, &current).await? {
                    tracing::debug!(key, "dedup: took over a lease left by an earlier run");
                }
                continue;
            }
        }
        if started.elapsed() > lease * 2 {
            // The holder keeps renewing or the clock is off: treat it as a transient
            // condition so the message waits and is retried, not dropped.
            return Err(Error::Unavailable(format!(
                "dedup key {key} held by another worker for over {lease:?}"
            )));
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// How long a lease of an earlier run of this client id must have been held before it is
/// taken over: `2 × socket_timeout`, at most the lease. The earlier run may still be alive
/// for a moment — the broker hands the session to the newest connection of a client id, so
/// an overlapping restart (or a second copy started by hand) leaves the old process
/// finishing what it holds — and by then every command of its attempt has answered or
/// timed out: its write is in Redis (we then see its done mark) or it gave up.
fn takeover_after(redis: &RedisManager, lease: Duration) -> Duration {
    (redis.config().socket_timeout * 2).min(lease)
}

/// The claim itself: `SET key lease NX PX lease_ms`; a reply of nil means the key is
/// already set (a done mark, or a lease). Also sent in one pipeline with the rate-limit
/// check.
pub fn claim_cmd(key: &str, lease_value: &str, lease: Duration) -> ::redis::Cmd {
    acquire_cmd(key, lease_value, (lease.as_millis() as u64).max(1))
}

/// Adds this attempt's done mark to the message's transaction.
pub fn mark_done(pipe: &mut ::redis::Pipeline, key: &str, marks: &Marks, ttl: Duration) {
    pipe.cmd("SET")
        .arg(key)
        .arg(&marks.written)
        .arg("PX")
        .arg(ttl_ms(ttl))
        .ignore();
}

/// Once the forwards are out: rewrites a `:fwd:` mark to the finished one, so a later
/// delivery of the same payload is a duplicate. `XX`, not compare-and-set: the key changes
/// under us only if its `ttl` ran out in between. If this fails the mark stays unfinished
/// and a retransmission within `ttl` is forwarded once more — at-least-once, not a loss.
pub async fn finish(redis: &RedisManager, key: &str, marks: &Marks, ttl: Duration) -> Result<()> {
    if !marks.pending() {
        return Ok(());
    }
    let _: Option<String> = redis
        .query(
            ::redis::cmd("SET")
                .arg(key)
                .arg(&marks.done)
                .arg("PX")
                .arg(ttl_ms(ttl))
                .arg("XX"),
        )
        .await?;
    Ok(())
}

/// After a failed transaction: delete the key if it still holds our lease or the done mark
/// our transaction may have written, so a redelivery gets processed. Never anybody else's.
pub async fn release(redis: &RedisManager, key: &str, marks: &Marks) -> Result<()> {
    if !compare_and_delete(redis, key, &marks.lease).await? {
        compare_and_delete(redis, key, &marks.written).await?;
    }
    Ok(())
}

/// This message's dedup claim on one route: the key, this attempt's lease and done marks,
/// the lease and how long the mark is kept.
pub struct DedupClaim {
    pub key: String,
    pub marks: Marks,
    pub lease: Duration,
    pub ttl: Duration,
}

impl DedupRule {
    /// Renders this message's claim and adds its done mark to the transaction `pipe` (the
    /// actions are already in it). `lease_prefix` is [`lease_prefix`]'s (a run); `forwarding`
    /// (route, topic, payload) when the message has forwards, so a redelivery after a crash
    /// before they went out still sends them.
    pub fn prepare(
        &self,
        ctx: &Context<'_>,
        lease_prefix: &str,
        forwarding: Option<(&str, &str, &[u8])>,
        pipe: &mut ::redis::Pipeline,
    ) -> Step<DedupClaim> {
        let key = self.key.render(ctx).map_err(|e| Outcome::from_render(&e))?;
        // A random nonce from the thread-local generator: `Uuid::new_v4` asks the kernel (a
        // getrandom syscall) for every message.
        let lease_value = format!(
            "{lease_prefix}{:0width$x}",
            rand::random::<u64>(),
            width = NONCE_DIGITS - RUN_DIGITS
        );
        let marks = Marks::new(lease_value, forwarding);
        mark_done(pipe, &key, &marks, self.ttl);
        Ok(DedupClaim {
            key,
            marks,
            lease: self.lease,
            ttl: self.ttl,
        })
    }
}

impl DedupClaim {
    /// Whether the key holds this message's own done mark: an attempt whose reply was lost
    /// was applied. Asked when the message expired while its write waited, before the
    /// claim is given back.
    async fn found_written(&self, env: &Env<'_>) -> bool {
        let mut get = ::redis::cmd("GET");
        get.arg(&self.key);
        let current = env
            .until_redis(|| env.redis.query::<Option<String>>(&get))
            .await;
        matches!(
            current
                .ok()
                .flatten()
                .and_then(|c| self.marks.judge_done(&c)),
            Some(Claim::Written)
        )
    }

    /// The stage: claims the key (unless `claimed` already, with the rate-limit check) and
    /// writes the transaction with the done mark. `duplicate` when another message's write is
    /// there. A retry after Redis trouble claims again, which finds our own lease if it is
    /// still there — or our own done mark if the transaction was applied and only its reply
    /// was lost (timeout or dropped connection): then the message is written, not a
    /// duplicate, and its forwards go out (spec §6). A transaction that failed for good
    /// gives the key back, so a redelivery is processed, not dropped.
    pub async fn write(&self, env: &Env<'_>, claimed: bool, pipe: &::redis::Pipeline) -> Step<()> {
        let mut holding = claimed;
        let written = env
            .until_redis(|| {
                let skip_claim = std::mem::take(&mut holding);
                async move {
                    if !skip_claim {
                        let epoch = env.redis.epoch();
                        let claimed = claim(env.redis, &self.key, &self.marks, self.lease).await?;
                        if claimed != Claim::Ours {
                            // A write found there (ours: the earlier attempt lost its
                            // connection before its WAIT; another's: maybe a previous run
                            // held in WAIT when it stopped) may not be replicated yet: on
                            // Sentinel it counts, written or duplicate, once replicas have
                            // it — on the connection the claim read it from.
                            env.redis.replicated(epoch).await?;
                        }
                        if claimed != Claim::Ours {
                            return Ok(claimed);
                        }
                    }
                    // With the done mark; on Sentinel, replicated before it counts.
                    env.redis.query_pipeline_durable(pipe).await?;
                    Ok(Claim::Ours)
                }
            })
            .await;
        match written {
            Ok(Claim::Duplicate) => Err(Outcome::Duplicate),
            Ok(Claim::Ours | Claim::Written) => Ok(()),
            Err(e) => {
                let env = env.without_deadline();
                if e == Error::DeadlinePassed && self.found_written(&env).await {
                    // Expired while waiting, but an earlier attempt had landed (its reply
                    // was lost): written, and its forwards go out (spec §6).
                    return Ok(());
                }
                let released = env
                    .until_redis(|| release(env.redis, &self.key, &self.marks))
                    .await;
                if let Err(e) = released {
                    tracing::warn!(route = env.route, error = %e, "could not release a dedup claim; it expires with its lease");
                }
                Err(failed(e))
            }
        }
    }

    /// After the forwards: only now may a later delivery of this payload count as a
    /// duplicate. One attempt: if it fails, the worst is a forward sent twice.
    pub async fn finish(&self, env: &Env<'_>) {
        if let Err(e) = finish(env.redis, &self.key, &self.marks, self.ttl).await {
            tracing::warn!(route = env.route, error = %e, "could not finish a dedup mark; a retransmission may be forwarded again");
        }
    }
}

/// Redis refuses `PX 0`.
fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marks(forwards: Option<(&str, &str, &[u8])>) -> Marks {
        Marks::new("lease:bridge-1:abc".into(), forwards)
    }

    #[test]
    fn the_done_mark_carries_the_lease_nonce() {
        let m = marks(None);
        assert_eq!(m.written, "done:bridge-1:abc");
        assert!(!m.pending());
    }

    #[test]
    fn our_own_mark_is_our_write() {
        let m = marks(None);
        assert_eq!(m.judge_done("done:bridge-1:abc"), Some(Claim::Written));
        let f = marks(Some(("r", "t", b"p")));
        assert_eq!(f.judge_done(&f.written.clone()), Some(Claim::Written));
        assert_eq!(f.judge_done("done:bridge-1:abc"), Some(Claim::Written));
    }

    #[test]
    fn another_mark_or_a_plain_done_is_a_duplicate() {
        let m = marks(Some(("r", "t", b"p")));
        assert_eq!(m.judge_done("done"), Some(Claim::Duplicate));
        assert_eq!(m.judge_done("done:bridge-2:xyz"), Some(Claim::Duplicate));
        let other = marks(Some(("r", "t", b"another payload")));
        assert_eq!(m.judge_done(&other.written), Some(Claim::Duplicate));
    }

    #[test]
    fn an_unfinished_mark_of_the_same_message_is_written_again_with_its_forwards() {
        let m = marks(Some(("r", "t", b"p")));
        let before_crash = Marks::new("lease:bridge-1:old".into(), Some(("r", "t", b"p")));
        assert_eq!(m.judge_done(&before_crash.written), Some(Claim::Written));
        // Without forwards there is nothing left to do: a duplicate.
        assert_eq!(
            marks(None).judge_done(&before_crash.written),
            Some(Claim::Duplicate)
        );
    }

    #[test]
    fn the_digest_tells_routes_topics_and_payloads_apart() {
        let d = digest("r", "t", b"p");
        assert_eq!(d.len(), 32);
        assert_eq!(d, digest("r", "t", b"p"));
        assert_ne!(d, digest("r2", "t", b"p"));
        assert_ne!(d, digest("r", "t2", b"p"));
        assert_ne!(d, digest("r", "t", b"p2"));
        assert_ne!(digest("ab", "c", b""), digest("a", "bc", b""));
    }

    #[test]
    fn the_digest_is_stable_across_versions() {
        // A redelivery after an upgrade must still recognise the mark the old binary wrote.
        assert_eq!(
            digest("tested", "d/a", br#"{"seq":1}"#),
            "348c84092b107a4dd9e8b6bf7546e4ee"
        );
    }

    #[test]
    fn a_lease_of_our_client_id_from_another_run_was_left_by_an_earlier_run() {
        let prefix = lease_prefix("gw:1");
        let ours = Marks::new(format!("{prefix}{:016x}", 7), None);
        let message = |prefix: &str| format!("{prefix}{:016x}", 9);
        assert!(ours.lease.starts_with("lease:gw:1:") && ours.lease.len() == 11 + 32);
        // A restarted process: another run of the same client id.
        assert!(ours.left_by_an_earlier_run(&message(&lease_prefix("gw:1"))));
        // Our own run (another message's attempt in this process): wait as for anyone.
        assert!(!ours.left_by_an_earlier_run(&message(&prefix)));
        // Another instance, even one whose client id starts like ours.
        assert!(!ours.left_by_an_earlier_run(&message(&lease_prefix("gw:2"))));
        assert!(!ours.left_by_an_earlier_run(&message(&lease_prefix("gw:1:0"))));
        assert!(!ours.left_by_an_earlier_run(&message(&lease_prefix("gw"))));
        assert!(!ours.left_by_an_earlier_run("lease:gw:1:not-a-nonce"));
        // Marks whose nonce is not ours to read (foreign formats) never take over.
        assert!(!marks(None).left_by_an_earlier_run(&message(&lease_prefix("bridge-1"))));
    }

    #[test]
    fn neither_a_lease_nor_a_done_mark_is_not_judged_done() {
        let m = marks(None);
        assert_eq!(m.judge_done("something else"), None);
        assert_eq!(m.judge_done("lease:other:1"), None);
        assert_eq!(m.judge_done("doner"), None);
    }
}
