//! Redis sides of the bench: seeding sessions, watching a drain progress, counting what
//! arrived (the accounting), and the latency probe.
//!
//! The probe hears Redis itself say that a key was written: keyspace notifications
//! (`notify-keyspace-events K$`) on the message keys, so "visible in Redis" is measured at
//! Redis, not inferred from the bridge's own acks. They are switched on only for the live
//! runs, so the drain runs do not pay for them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;

use crate::Res;

/// Every message writes its own key here: `bench:msg:<device>:<seq>`.
pub const MSG_PREFIX: &str = "bench:msg:";
pub const DEAD_LETTER: &str = "bench:dead_letter";

pub struct Store {
    /// What the bridge's `[redis]` table says: `url = "…"` or `cluster = […]`.
    pub redis_toml: String,
    /// Keys are hash-tagged by device (`{dev-1}`) on a cluster: see [`Store::tag`].
    pub cluster: bool,
    client: redis::Client,
    /// One connection per node (one in all for a single server): flushing, counting,
    /// statistics.
    nodes: Vec<MultiplexedConnection>,
    /// Commands on keys, routed by slot on a cluster.
    keys: KeyConnection,
}

enum KeyConnection {
    Single(MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl KeyConnection {
    async fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> Res<T> {
        Ok(match self {
            KeyConnection::Single(c) => cmd.query_async(c).await?,
            KeyConnection::Cluster(c) => cmd.query_async(c).await?,
        })
    }
}

impl Store {
    pub async fn connect(port: u16) -> Res<Store> {
        let url = format!("redis://127.0.0.1:{port}/0");
        let client = redis::Client::open(url.as_str())?;
        let con = client.get_multiplexed_async_connection().await?;
        Ok(Store {
            redis_toml: format!("url = {url:?}"),
            cluster: false,
            client,
            nodes: vec![con.clone()],
            keys: KeyConnection::Single(con),
        })
    }

    /// A store over the masters of a cluster listening on `ports`.
    pub async fn connect_cluster(ports: &[u16]) -> Res<Store> {
        let urls: Vec<String> = ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect();
        let mut nodes = Vec::new();
        for url in &urls {
            nodes.push(
                redis::Client::open(url.as_str())?
                    .get_multiplexed_async_connection()
                    .await?,
            );
        }
        let keys = redis::cluster::ClusterClient::new(urls.clone())?
            .get_async_connection()
            .await?;
        Ok(Store {
            redis_toml: format!("cluster = {urls:?}"),
            cluster: true,
            client: redis::Client::open(urls[0].as_str())?,
            nodes,
            keys: KeyConnection::Cluster(keys),
        })
    }

    /// A device id as it appears in keys: `{dev-1}` on a cluster (a hash tag, so that a
    /// route's MULTI/EXEC stays in one slot), `dev-1` otherwise.
    pub fn tag(&self, device: &str) -> String {
        if self.cluster {
            format!("{{{device}}}")
        } else {
            device.to_string()
        }
    }

    /// Runs `cmd` on every node.
    async fn on_every_node<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> Res<Vec<T>> {
        let mut replies = Vec::with_capacity(self.nodes.len());
        for node in &mut self.nodes {
            replies.push(cmd.query_async(node).await?);
        }
        Ok(replies)
    }

    pub async fn flush(&mut self) -> Res<()> {
        self.on_every_node::<()>(&redis::cmd("FLUSHALL")).await?;
        Ok(())
    }

    /// A RouteMQ-style JSON session for each device.
    pub async fn seed_sessions(&mut self, devices: u64) -> Res<()> {
        let session = |d: u64| {
            (
                format!("bench:session:dev-{d}"),
                format!(r#"{{"session_id":"s-{d}","user_id":"u-{d}","device":"dev-{d}"}}"#),
            )
        };
        match &mut self.keys {
            KeyConnection::Single(con) => {
                let mut pipe = redis::pipe();
                for d in 0..devices {
                    let (key, value) = session(d);
                    pipe.cmd("SET").arg(key).arg(value).ignore();
                }
                pipe.query_async::<()>(con).await?;
            }
            // A pipeline may not span slots on a cluster: one SET at a time.
            KeyConnection::Cluster(con) => {
                for d in 0..devices {
                    let (key, value) = session(d);
                    redis::cmd("SET")
                        .arg(key)
                        .arg(value)
                        .query_async::<()>(con)
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Zeroes Redis's per-command statistics.
    pub async fn reset_stats(&mut self) -> Res<()> {
        self.on_every_node::<()>(redis::cmd("CONFIG").arg("RESETSTAT"))
            .await?;
        Ok(())
    }

    /// Per command since the last reset, over every node: (name, calls, total µs),
    /// busiest first. Where Redis spends its time, from Redis itself (`INFO commandstats`).
    pub async fn command_stats(&mut self) -> Res<Vec<(String, u64, u64)>> {
        let infos: Vec<String> = self
            .on_every_node(redis::cmd("INFO").arg("commandstats"))
            .await?;
        let mut totals: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
        for info in &infos {
            for line in info.lines() {
                let Some((name, fields)) = line
                    .strip_prefix("cmdstat_")
                    .and_then(|l| l.split_once(':'))
                else {
                    continue;
                };
                let field = |key: &str| {
                    fields
                        .split(',')
                        .find_map(|f| f.strip_prefix(key))
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                let total = totals.entry(name.to_string()).or_default();
                total.0 += field("calls=");
                total.1 += field("usec=");
            }
        }
        let mut stats: Vec<(String, u64, u64)> = totals
            .into_iter()
            .map(|(name, (calls, usec))| (name, calls, usec))
            .collect();
        stats.sort_by_key(|s| std::cmp::Reverse(s.2));
        Ok(stats)
    }

    pub async fn dbsize(&mut self) -> Res<u64> {
        let sizes: Vec<u64> = self.on_every_node(&redis::cmd("DBSIZE")).await?;
        Ok(sizes.into_iter().sum())
    }

    /// Keys matching `pattern`, over every node (SCAN, so Redis is not blocked).
    pub async fn count(&mut self, pattern: &str) -> Res<u64> {
        let mut n = 0;
        for node in &mut self.nodes {
            let mut cursor: u64 = 0;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(node)
                    .await?;
                n += keys.len() as u64;
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(n)
    }

    /// The sum of the integer keys `<prefix><device>` over every device.
    pub async fn sum_counters(&mut self, prefix: &str, devices: u64) -> Res<u64> {
        let keys: Vec<String> = (0..devices)
            .map(|d| format!("{prefix}{}", self.tag(&format!("dev-{d}"))))
            .collect();
        if !self.cluster {
            let values: Vec<Option<u64>> = self.keys.query(redis::cmd("MGET").arg(&keys)).await?;
            return Ok(values.into_iter().flatten().sum());
        }
        let mut sum = 0;
        for key in &keys {
            let value: Option<u64> = self.keys.query(redis::cmd("GET").arg(key)).await?;
            sum += value.unwrap_or(0);
        }
        Ok(sum)
    }

    pub async fn llen(&mut self, key: &str) -> Res<u64> {
        self.keys.query(redis::cmd("LLEN").arg(key)).await
    }

    /// Polls DBSIZE until it reaches `expected`; gives up when it has not moved for
    /// `stall`. Returns when it was reached (or the error with how far it got).
    pub async fn wait_for_keys(&mut self, expected: u64, stall: Duration) -> Res<Instant> {
        self.wait_for(None, expected, stall).await
    }

    /// Like [`Store::wait_for_keys`], counting only the keys matching `pattern` (a SCAN per
    /// check: slower, for when other keys come and go).
    pub async fn wait_for_count(
        &mut self,
        pattern: &str,
        expected: u64,
        stall: Duration,
    ) -> Res<Instant> {
        self.wait_for(Some(pattern), expected, stall).await
    }

    async fn wait_for(
        &mut self,
        pattern: Option<&str>,
        expected: u64,
        stall: Duration,
    ) -> Res<Instant> {
        let mut last = (0, Instant::now());
        loop {
            let n = match pattern {
                Some(pattern) => self.count(pattern).await?,
                None => self.dbsize().await?,
            };
            if n >= expected {
                return Ok(Instant::now());
            }
            if n != last.0 {
                last = (n, Instant::now());
            } else if last.1.elapsed() > stall {
                let which = pattern
                    .map(|p| format!(" matching {p}"))
                    .unwrap_or_default();
                return Err(format!(
                    "Redis holds {n} keys{which} of the {expected} expected and has not moved \
                     for {stall:?}"
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Starts hearing writes of message keys; see [`Probe`].
    pub async fn probe(&mut self, first: u64, count: u64) -> Res<Probe> {
        if self.cluster {
            return Err(
                "the latency probe hears one server: live runs are single-node only".into(),
            );
        }
        self.on_every_node::<()>(
            redis::cmd("CONFIG")
                .arg("SET")
                .arg("notify-keyspace-events")
                .arg("K$"),
        )
        .await?;
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub
            .psubscribe(format!("__keyspace@0__:{MSG_PREFIX}*"))
            .await?;
        let seen = Arc::new(Mutex::new(vec![None; count as usize]));
        let task = {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut stream = pubsub.into_on_message();
                while let Some(msg) = stream.next().await {
                    let at = Instant::now();
                    // __keyspace@0__:bench:msg:<device>:<seq>
                    let seq = msg
                        .get_channel_name()
                        .rsplit(':')
                        .next()
                        .and_then(|s| s.parse::<u64>().ok());
                    if let Some(i) = seq.and_then(|s| s.checked_sub(first)) {
                        if let Ok(mut seen) = seen.lock() {
                            if let Some(slot) = seen.get_mut(i as usize) {
                                slot.get_or_insert(at);
                            }
                        }
                    }
                }
            })
        };
        Ok(Probe { seen, task })
    }
}

/// When each message's key was first written, by sequence number from the probe's `first`.
pub struct Probe {
    seen: Arc<Mutex<Vec<Option<Instant>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Probe {
    /// Messages `from..to` (indexes from `first`) seen so far.
    pub fn seen_in(&self, from: usize, to: usize) -> usize {
        self.seen
            .lock()
            .map(|s| s[from..to].iter().filter(|t| t.is_some()).count())
            .unwrap_or(0)
    }

    /// Waits until all of `from..to` were seen, or `timeout`.
    pub async fn wait_seen(&self, from: usize, to: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.seen_in(from, to) == to - from {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    }

    pub fn times(&self, from: usize, to: usize) -> Vec<Option<Instant>> {
        self.seen
            .lock()
            .map(|s| s[from..to].to_vec())
            .unwrap_or_default()
    }

    pub fn stop(self) {
        self.task.abort();
    }
}
