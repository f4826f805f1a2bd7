//! Stream rules: a consumer group read on a connection of its own, XACK after PUBACK.
//!
//! One task per rule, one step at a time, so no entry is ever handled twice at once:
//!
//! 1. make sure the group exists (`XGROUP CREATE … $ MKSTREAM`; again after a Redis
//!    restart forgot it: `NOGROUP`);
//! 2. read a batch: our own pending entries first (`XREADGROUP … 0`, at start and after a
//!    publish was lost), then entries idle longer than `claim_idle` under any consumer
//!    (`XAUTOCLAIM`, every `claim_idle / 2`), else new ones (`XREADGROUP … BLOCK … >`);
//! 3. publish the batch once MQTT is connected, wait for every acknowledgement, then XACK
//!    what was acknowledged. Entries that cannot be published are XACKed and dead-lettered
//!    in one MULTI/EXEC, counted `invalid`.
//!
//! The blocking reads go over a dedicated connection (counted against `max_connections`;
//! on a cluster, to the master of the stream's slot, asked again before each reconnection,
//! so a resharding or a failover that moved the stream is followed) with no response
//! timeout, each bounded by a local deadline of BLOCK + `socket_timeout`, with BLOCK no
//! longer than `socket_timeout`: a dead connection (also a frozen Redis, which
//! TCP keepalive cannot see) is noticed within 2 × `socket_timeout` (spec §6) and opened
//! again. XACK, XAUTOCLAIM and the dead letter go through the manager. `{topic}` is the
//! stream's key; `{field.name}` any field of the entry; the payload is `payload_field`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ::redis::aio::MultiplexedConnection;
use ::redis::Value;
use tokio::sync::watch;

use super::{pause, until_redis, RepublishRule, Shared, Source, FAILED, INVALID, PUBLISHED};
use crate::backoff::Backoff;
use crate::mqtt::publisher::PublishError;
use crate::outcome::Reason;
use crate::redis::Error as RedisError;
use crate::template::Context;

/// One entry's publish on its way: its id, and `Some(true)` once published, `Some(false)`
/// when the broker refused it (done with, as `failed`), `None` when lost with the session.
type Published =
    std::pin::Pin<Box<dyn std::future::Future<Output = (String, Option<bool>)> + Send>>;
/// Entries read (or claimed) at once.
const BATCH: usize = 100;
/// Longest a blocking read waits before the loop looks at claims and stop again.
const MAX_BLOCK: Duration = Duration::from_secs(5);

/// One stream entry; `fields` is `None` for an entry deleted while pending.
struct Entry {
    id: String,
    fields: Option<Vec<(String, Vec<u8>)>>,
}

/// What to read next.
enum Read {
    /// Our own pending entries, from this id on.
    History(String),
    /// Entries idle longer than `claim_idle`, from this cursor on.
    Claim(String),
    /// New entries.
    New,
}

struct Worker {
    shared: Arc<Shared>,
    rule: Arc<RepublishRule>,
    stream: String,
    group: String,
    payload_field: String,
    claim_idle: Duration,
    stop: watch::Receiver<bool>,
}

pub(super) async fn run(
    shared: Arc<Shared>,
    rule: Arc<RepublishRule>,
    stop: watch::Receiver<bool>,
) {
    // A worker dying by a panic stops the daemon (exit 1): its stream would go unread.
    let _lifeline = crate::liveness::Lifeline::new("republish worker");
    let Source::Stream {
        stream,
        group,
        payload_field,
        claim_idle,
    } = &rule.source
    else {
        return;
    };
    let worker = Worker {
        stream: stream.clone(),
        group: group.clone(),
        payload_field: payload_field.clone(),
        claim_idle: *claim_idle,
        shared,
        rule: rule.clone(),
        stop,
    };
    worker.run().await;
}

/// A step did not complete: stop was requested.
struct Stopped;

impl Worker {
    fn claim_every(&self) -> Duration {
        (self.claim_idle / 2).clamp(Duration::from_millis(100), Duration::from_secs(30))
    }

    async fn run(mut self) {
        // The permit counts the blocking connection against max_connections.
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        let (mut client, _permit) = loop {
            match self
                .shared
                .redis
                .dedicated_connection_for_key(&self.stream)
                .await
            {
                Ok(pair) => break pair,
                Err(RedisError::PoolExhausted) => tracing::warn!(
                    rule = %self.rule.name,
                    "every connection allowed by redis.max_connections is in use; retrying"
                ),
                // Sentinel: no master found yet (the sentinels or the master are down).
                Err(e @ RedisError::Unavailable(_)) => {
                    tracing::debug!(rule = %self.rule.name, error = %e, "stream reader: no master yet; retrying")
                }
                Err(e) => {
                    tracing::error!(rule = %self.rule.name, error = %e, "stream republish cannot start");
                    return;
                }
            }
            if !pause(&mut self.stop, backoff.next_delay()).await {
                return;
            }
        };
        let connect_config = self.shared.redis.dedicated_connection_config();
        let mut conn: Option<MultiplexedConnection> = None;
        // Whether the next connection should ask the manager for a client again: on a
        // cluster the stream's node may have changed (resharding, failover) since.
        let mut resolve = false;
        let mut group_ready = false;
        let mut next = Read::History("0".into());
        let mut next_claim = Instant::now();
        // Sentinel: when the manager moved to another master, so does the reader (a blocked
        // read on the old one ends within its block time).
        let mut master = self.shared.redis.master_changes();
        backoff.reset();
        loop {
            if *self.stop.borrow() {
                return;
            }
            if master.has_changed().unwrap_or(false) {
                master.borrow_and_update();
                conn = None;
                resolve = true;
            }
            if !group_ready {
                match self.ensure_group().await {
                    Ok(true) => group_ready = true,
                    Ok(false) => return,
                    Err(e) => {
                        tracing::warn!(rule = %self.rule.name, error = %e, "cannot create the consumer group; retrying");
                        if !pause(&mut self.stop, backoff.next_delay()).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            let connection = match &mut conn {
                Some(c) => c,
                None => {
                    // On a cluster the stream's node, under Sentinel the master, may have
                    // changed since: ask again (a single server gets the same client back).
                    if std::mem::take(&mut resolve) {
                        match self.shared.redis.dedicated_client(Some(&self.stream)).await {
                            Ok(c) => client = c,
                            Err(e) => {
                                tracing::debug!(rule = %self.rule.name, error = %e, "stream reader: keeping the last node")
                            }
                        }
                    }
                    let connect =
                        client.get_multiplexed_async_connection_with_config(&connect_config);
                    let result = tokio::select! {
                        r = connect => r,
                        _ = self.stop.wait_for(|s| *s) => return,
                    };
                    match result {
                        Ok(c) => conn.insert(c),
                        Err(e) => {
                            resolve = true;
                            tracing::debug!(rule = %self.rule.name, error = %e, "stream reader: connect failed; retrying");
                            if !pause(&mut self.stop, backoff.next_delay()).await {
                                return;
                            }
                            continue;
                        }
                    }
                }
            };
            if matches!(next, Read::New) && Instant::now() >= next_claim {
                next = Read::Claim("0-0".into());
            }
            let read = match &next {
                Read::History(from) => self.read_history(connection, from).await,
                Read::Claim(cursor) => self.claim(cursor).await,
                Read::New => self.read_new(connection).await,
            };
            let (entries, following) = match read {
                Ok(Some(r)) => r,
                Ok(None) => return, // stopped
                Err(e) => {
                    if let RedisError::Response(msg) = &e {
                        if msg.contains("NOGROUP") {
                            tracing::info!(rule = %self.rule.name, "consumer group missing (Redis restarted?); creating it again");
                            group_ready = false;
                            next = Read::History("0".into());
                            continue;
                        }
                    }
                    tracing::warn!(rule = %self.rule.name, error = %e, "stream read failed; retrying");
                    if !matches!(next, Read::Claim(_)) {
                        conn = None;
                        resolve = true;
                    }
                    if !pause(&mut self.stop, backoff.next_delay()).await {
                        return;
                    }
                    continue;
                }
            };
            backoff.reset();
            next = match following {
                Some(read) => read,
                None => {
                    if matches!(next, Read::Claim(_)) {
                        next_claim = Instant::now() + self.claim_every();
                    }
                    Read::New
                }
            };
            match self.process(entries).await {
                Ok(true) => {}
                // A publish was lost: read our pending entries again.
                Ok(false) => next = Read::History("0".into()),
                Err(Stopped) => return,
            }
        }
    }

    /// Creates the group at `$` with MKSTREAM unless it exists. `Ok(false)` when stopped.
    async fn ensure_group(&mut self) -> Result<bool, RedisError> {
        let mut cmd = ::redis::cmd("XGROUP");
        cmd.arg("CREATE")
            .arg(&self.stream)
            .arg(&self.group)
            .arg("$")
            .arg("MKSTREAM");
        let redis = self.shared.redis.clone();
        match until_redis(&mut self.stop, || redis.query::<()>(&cmd)).await {
            None => Ok(false),
            Some(Ok(())) => {
                tracing::info!(rule = %self.rule.name, stream = %self.stream, group = %self.group, "consumer group created");
                Ok(true)
            }
            Some(Err(RedisError::Response(msg))) if msg.contains("BUSYGROUP") => Ok(true),
            Some(Err(e)) => Err(e),
        }
    }

    /// Our pending entries after `from`; the next read is more history while a full batch
    /// came back.
    async fn read_history(
        &mut self,
        conn: &mut MultiplexedConnection,
        from: &str,
    ) -> Result<Option<(Vec<Entry>, Option<Read>)>, RedisError> {
        let cmd = self.xreadgroup(None, from);
        let timeout = self.shared.redis.config().socket_timeout;
        let Some(reply) = self.bounded(conn, &cmd, timeout).await? else {
            return Ok(None);
        };
        let entries = read_reply(&reply);
        let following = (entries.len() >= BATCH)
            .then(|| entries.last().map(|e| Read::History(e.id.clone())))
            .flatten();
        Ok(Some((entries, following)))
    }

    /// `XREADGROUP GROUP <group> <consumer> COUNT <batch> [BLOCK ms] STREAMS <stream> <from>`.
    fn xreadgroup(&self, block: Option<Duration>, from: &str) -> ::redis::Cmd {
        let mut cmd = ::redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.group)
            .arg(&self.shared.consumer)
            .arg("COUNT")
            .arg(BATCH);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(block.as_millis() as u64);
        }
        cmd.arg("STREAMS").arg(&self.stream).arg(from);
        cmd
    }

    /// New entries, blocking until some arrive or the block time passes.
    async fn read_new(
        &mut self,
        conn: &mut MultiplexedConnection,
    ) -> Result<Option<(Vec<Entry>, Option<Read>)>, RedisError> {
        let socket_timeout = self.shared.redis.config().socket_timeout;
        // Redis takes BLOCK in whole milliseconds, and BLOCK 0 would wait forever.
        let block = self
            .claim_every()
            .min(MAX_BLOCK)
            .min(socket_timeout)
            .max(Duration::from_millis(1));
        let cmd = self.xreadgroup(Some(block), ">");
        let timeout = block + socket_timeout;
        let Some(reply) = self.bounded(conn, &cmd, timeout).await? else {
            return Ok(None);
        };
        Ok(Some((read_reply(&reply), None)))
    }

    /// Runs `cmd` on the dedicated connection within `timeout`; `None` when stopped.
    async fn bounded(
        &mut self,
        conn: &mut MultiplexedConnection,
        cmd: &::redis::Cmd,
        timeout: Duration,
    ) -> Result<Option<Value>, RedisError> {
        let query = tokio::time::timeout(timeout, cmd.query_async::<Value>(conn));
        tokio::select! {
            r = query => match r {
                Ok(Ok(v)) => Ok(Some(v)),
                Ok(Err(e)) => Err(e.into()),
                Err(_) => Err(RedisError::Timeout),
            },
            _ = self.stop.wait_for(|s| *s) => Ok(None),
        }
    }

    /// Entries pending longer than `claim_idle` under any consumer, taken over.
    async fn claim(
        &mut self,
        cursor: &str,
    ) -> Result<Option<(Vec<Entry>, Option<Read>)>, RedisError> {
        let mut cmd = ::redis::cmd("XAUTOCLAIM");
        cmd.arg(&self.stream)
            .arg(&self.group)
            .arg(&self.shared.consumer)
            .arg(self.claim_idle.as_millis() as u64)
            .arg(cursor)
            .arg("COUNT")
            .arg(BATCH);
        let redis = self.shared.redis.clone();
        let Some(reply) = until_redis(&mut self.stop, || redis.query::<Value>(&cmd)).await else {
            return Ok(None);
        };
        let reply = reply?;
        let Value::Array(items) = &reply else {
            return Err(RedisError::Decode(format!("XAUTOCLAIM answered {reply:?}")));
        };
        let next_cursor = items.first().and_then(text).unwrap_or_else(|| "0-0".into());
        let mut entries = items.get(1).map(entry_list).unwrap_or_default();
        // Redis 7 lists entries deleted while pending apart; they only need an XACK.
        if let Some(Value::Array(deleted)) = items.get(2) {
            entries.extend(
                deleted
                    .iter()
                    .filter_map(text)
                    .map(|id| Entry { id, fields: None }),
            );
        }
        if !entries.is_empty() {
            tracing::info!(rule = %self.rule.name, entries = entries.len(), "claimed entries left pending by a consumer");
        }
        let following = (next_cursor != "0-0").then_some(Read::Claim(next_cursor));
        Ok(Some((entries, following)))
    }

    /// Publishes a batch and XACKs what the broker acknowledged. `Ok(false)` when some
    /// publish was lost (its entry stays pending and is read again).
    async fn process(&mut self, entries: Vec<Entry>) -> Result<bool, Stopped> {
        if entries.is_empty() {
            return Ok(true);
        }
        let mut deleted = Vec::new();
        let mut refused = Vec::new();
        let mut publishes = Vec::new();
        for entry in entries {
            let Some(fields) = entry.fields else {
                deleted.push(entry.id);
                continue;
            };
            let payload = fields
                .iter()
                .find(|(name, _)| *name == self.payload_field)
                .map(|(_, v)| v.as_slice());
            let rendered = match payload {
                None => Err((
                    Reason::MissingField,
                    format!(
                        "entry {}: no field {:?} (fields: {})",
                        entry.id,
                        self.payload_field,
                        fields
                            .iter()
                            .map(|(n, _)| n.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )),
                Some(payload) => {
                    let mut ctx = Context::new(&self.stream, payload);
                    ctx.fields = &fields;
                    self.shared
                        .render(&self.rule, &ctx)
                        .map_err(|(reason, detail)| {
                            (reason, format!("entry {}: {detail}", entry.id))
                        })
                }
            };
            match rendered {
                Ok(r) => publishes.push((entry.id, r)),
                Err((reason, detail)) => {
                    let payload = payload.map(<[u8]>::to_vec).unwrap_or_default();
                    refused.push((entry.id, reason, detail, payload));
                }
            }
        }
        if !deleted.is_empty() {
            tracing::debug!(rule = %self.rule.name, entries = deleted.len(), "acknowledging entries deleted while pending");
            self.xack(&deleted).await?;
        }
        if !refused.is_empty() {
            self.refuse(refused).await?;
        }
        if publishes.is_empty() {
            return Ok(true);
        }

        let mut status = self.shared.mqtt.status();
        tokio::select! {
            r = status.wait_for(|s| s.connected) => if r.is_err() { return Err(Stopped) },
            _ = self.stop.wait_for(|s| *s) => return Err(Stopped),
        }
        let qos = self.rule.qos;
        let mut waiting: Vec<Published> = Vec::with_capacity(publishes.len());
        for (id, rendered) in publishes {
            loop {
                match self.shared.mqtt.publish_tracked(
                    &rendered.topic,
                    qos,
                    self.rule.retain,
                    rendered.payload.clone(),
                    rendered.properties.as_deref(),
                ) {
                    Err(PublishError::TooLarge(why)) => {
                        // Over the broker's Maximum Packet Size: never publishable. Acked
                        // as `failed` like a refusal, not retried for ever (spec §7).
                        tracing::warn!(rule = %self.rule.name, topic = %rendered.topic, "{why}");
                        waiting.push(Box::pin(std::future::ready((id, Some(false)))));
                        break;
                    }
                    Ok(ack) => {
                        let topic = rendered.topic.clone();
                        waiting.push(Box::pin(async move {
                            match ack.await {
                                Ok(Ok(())) => (id, Some(true)),
                                // Refused by the broker (MQTT 5 reason code): publishing it
                                // again would be refused again; acked as `failed`, not
                                // retried for ever (spec §7).
                                Ok(Err(refusal)) => {
                                    crate::events::mqtt_publish_refused(
                                        &topic,
                                        refusal.packet,
                                        &refusal.code.0,
                                    );
                                    (id, Some(false))
                                }
                                Err(_) => (id, None),
                            }
                        }));
                        break;
                    }
                    Err(PublishError::Full) => {
                        if !pause(&mut self.stop, Duration::from_millis(10)).await {
                            return Err(Stopped);
                        }
                    }
                    Err(PublishError::Refused(why)) => {
                        // Only when the MQTT connection is gone for good: leave it pending.
                        self.shared.stats.record(&self.rule.name, FAILED, &why);
                        return Err(Stopped);
                    }
                }
            }
        }
        let results = tokio::select! {
            r = futures_util::future::join_all(waiting) => r,
            _ = self.stop.wait_for(|s| *s) => return Err(Stopped),
        };
        // Published or refused: either way done with (acked); lost: read again.
        let acked: Vec<String> = results
            .iter()
            .filter(|(_, done)| done.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        let all = acked.len() == results.len();
        if !acked.is_empty() {
            self.xack(&acked).await?;
            for (_, done) in &results {
                match done {
                    Some(true) => self.shared.stats.record(&self.rule.name, PUBLISHED, ""),
                    Some(false) => self.shared.stats.record(
                        &self.rule.name,
                        FAILED,
                        "the broker refused the publish",
                    ),
                    None => {}
                }
            }
        }
        if !all {
            tracing::info!(rule = %self.rule.name, lost = results.len() - acked.len(), "publishes lost with the broker's session; their entries are read again");
        }
        Ok(all)
    }

    async fn xack(&mut self, ids: &[String]) -> Result<(), Stopped> {
        let mut cmd = ::redis::cmd("XACK");
        cmd.arg(&self.stream).arg(&self.group).arg(ids);
        let redis = self.shared.redis.clone();
        match until_redis(&mut self.stop, || redis.query::<i64>(&cmd)).await {
            None => Err(Stopped),
            Some(Ok(_)) => Ok(()),
            Some(Err(e)) => {
                // The entries stay pending and come back; nothing is lost.
                self.shared
                    .stats
                    .record(&self.rule.name, FAILED, &format!("XACK: {e}"));
                Ok(())
            }
        }
    }

    /// XACK + dead letter for entries that can never be published, in one MULTI/EXEC.
    async fn refuse(
        &mut self,
        refused: Vec<(String, Reason, String, Vec<u8>)>,
    ) -> Result<(), Stopped> {
        let target = self.shared.dead_letter.clone();
        let mut pipe = ::redis::pipe();
        pipe.atomic();
        for (id, reason, detail, payload) in &refused {
            let record = target.record(&self.stream, &self.rule.name, *reason, detail, payload);
            target.push(&mut pipe, &record);
            pipe.cmd("XACK")
                .arg(&self.stream)
                .arg(&self.group)
                .arg(id)
                .ignore();
        }
        let redis = self.shared.redis.clone();
        match until_redis(&mut self.stop, || redis.query_pipeline::<()>(&pipe)).await {
            None => Err(Stopped),
            Some(Ok(())) => {
                for (_, reason, detail, _) in &refused {
                    crate::events::dead_lettered(*reason);
                    self.shared.stats.record(
                        &self.rule.name,
                        INVALID,
                        &format!("{}: {detail}", reason.as_str()),
                    );
                }
                Ok(())
            }
            Some(Err(e)) => {
                self.shared
                    .stats
                    .record(&self.rule.name, FAILED, &format!("dead letter: {e}"));
                Ok(())
            }
        }
    }
}

/// Entries of an XREADGROUP reply (RESP2 array or RESP3 map of streams); empty on a
/// timeout (nil).
fn read_reply(reply: &Value) -> Vec<Entry> {
    let streams: Vec<&Value> = match reply {
        Value::Array(streams) => streams
            .iter()
            .filter_map(|s| match s {
                Value::Array(pair) => pair.get(1),
                _ => None,
            })
            .collect(),
        Value::Map(pairs) => pairs.iter().map(|(_, v)| v).collect(),
        _ => Vec::new(),
    };
    streams.into_iter().flat_map(entry_list).collect()
}

/// `[[id, [field, value, …] | nil], …]`.
fn entry_list(list: &Value) -> Vec<Entry> {
    let Value::Array(items) = list else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let Value::Array(parts) = item else {
                return None; // Redis 6 puts nil for an entry deleted while pending
            };
            let id = parts.first().and_then(text)?;
            let fields = match parts.get(1) {
                Some(Value::Array(flat)) => Some(
                    flat.chunks(2)
                        .filter_map(|kv| match kv {
                            [k, v] => Some((text(k)?, bytes(v)?)),
                            _ => None,
                        })
                        .collect(),
                ),
                Some(Value::Map(pairs)) => Some(
                    pairs
                        .iter()
                        .filter_map(|(k, v)| Some((text(k)?, bytes(v)?)))
                        .collect(),
                ),
                _ => None,
            };
            Some(Entry { id, fields })
        })
        .collect()
}

fn bytes(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.as_bytes().to_vec()),
        Value::VerbatimString { text, .. } => Some(text.as_bytes().to_vec()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    bytes(v).and_then(|b| String::from_utf8(b).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn xreadgroup_replies_are_read_with_deleted_entries() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("s"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk("1-0"),
                    Value::Array(vec![bulk("payload"), bulk("hi"), bulk("site"), bulk("x")]),
                ]),
                Value::Array(vec![bulk("2-0"), Value::Nil]),
            ]),
        ])]);
        let entries = read_reply(&reply);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].id, "1-0");
        let fields = entries[0].fields.as_ref().unwrap();
        assert_eq!(fields[1], ("site".to_string(), b"x".to_vec()));
        assert!(entries[1].fields.is_none());
        assert!(read_reply(&Value::Nil).is_empty());
    }
}
