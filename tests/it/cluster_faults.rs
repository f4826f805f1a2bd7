//! The bridge on a Redis Cluster that changes under load (spec §10, §6): a slot migration
//! (`redis-cli --cluster reshard`) and a replica promotion (`CLUSTER FAILOVER`) while 5,000
//! QoS 1 messages of 1,000 devices flow through a route with session, rate limit, dedup and
//! two actions. Nothing may be lost or dead-lettered, and nothing written twice. Nor may the
//! disturbance cost an outage (issue 13): the manager keeps its connection (no reconnection,
//! no "connection lost") and `/readyz` answers 200 throughout. Each test starts a cluster of
//! its own ([`RedisCluster::start`]): it disturbs it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::cluster::ClusterConnection;

use crate::bridge::{Bridge, Client};
use crate::bridge_middleware::latest_http_addr;
use crate::cluster::cluster_config;
use crate::harness::{Mosquitto, RedisCluster};
use crate::ops::{get, get_until, sample};

const DEVICES: usize = 1000;
const PER_DEVICE: usize = 5;
const TOTAL: usize = DEVICES * PER_DEVICE;
/// How long the bridge may take to write the whole load, disturbance included.
const DRAIN: Duration = Duration::from_secs(180);

/// Session, rate limit (a budget that admits everything), dedup and two actions, every key
/// of a device in the device's slot.
const LOAD_ROUTE: &str = r#"
[[routes]]
name = "load"
topic = "sensors/{device_id}/data"
qos = 1
payload = "json"

  [routes.session]
  key = "session:{{{device_id}}}"
  required = true

  [routes.rate_limit]
  key = "rl:{{{device_id}}}"
  strategy = "fixed_window"
  max = 100
  window = "1h"

  [routes.dedup]
  key = "dedup:{{{device_id}}}:{json.seq}"
  ttl = "10m"

  [[routes.actions]]
  op = "set_json"
  key = "sensor:{{{device_id}}}:latest"

  [[routes.actions]]
  op = "rpush"
  key = "sensor:{{{device_id}}}:seqs"
  value = "{json.seq}"
"#;

fn device(i: usize) -> String {
    format!("dev-{i}")
}

/// A cluster of its own, a broker, a bridge running [`LOAD_ROUTE`] (plus `extra`), and the
/// sessions of every device.
pub(crate) struct LoadRig {
    pub cluster: Arc<RedisCluster>,
    pub broker: Mosquitto,
    pub bridge: Bridge,
    pub conn: ClusterConnection,
    client_id: String,
    /// The `/readyz` answers other than 200 seen while [`LoadRig::run`] disturbed the
    /// cluster and the load drained (time since the disturbance started, status, body).
    not_ready: Vec<String>,
}

impl LoadRig {
    pub async fn start(client_id: &str, extra: &str) -> LoadRig {
        let cluster = Arc::new(RedisCluster::start());
        let broker = Mosquitto::start();
        let mut conn = cluster
            .client()
            .get_connection()
            .expect("cluster connection");
        for i in 0..DEVICES {
            let _: () = redis::cmd("SET")
                .arg(format!("session:{{{}}}", device(i)))
                .arg(r#"{"user_id":"u"}"#)
                .query(&mut conn)
                .expect("seed a session");
        }
        let routes = format!("{LOAD_ROUTE}\n{extra}");
        // The manager's debug lines show the transactions sent again while a slot moved.
        let bridge = Bridge::start_with_env(
            &cluster_config(&cluster, &broker, client_id, &routes),
            &[("RUST_LOG", "info,routemq_bridge=debug,routemq_redis=debug")],
        );
        LoadRig {
            cluster,
            broker,
            bridge,
            conn,
            client_id: client_id.to_string(),
            not_ready: Vec::new(),
        }
    }

    /// The route's count of `outcome` now.
    async fn count(&self, outcome: &str) -> f64 {
        let (_, metrics) = get(latest_http_addr(&self.bridge), "/metrics").await;
        sample(
            &metrics,
            &format!(r#"routemq_bridge_messages_total{{route="load",outcome="{outcome}"}}"#),
        )
        .unwrap_or(0.0)
    }

    /// Publishes the load (seq 1 of every device, then seq 2, …) and, once the bridge has
    /// written `start_after` of it, runs `disturb` on a thread of its own. Waits until the
    /// bridge wrote everything and `disturb` finished; returns (the number written when
    /// `disturb` started, when it ended, the time `disturb` took, the time the whole load
    /// took). Meanwhile `/readyz` is polled; its answers other than 200 are kept for
    /// [`LoadRig::assert_no_outage`].
    pub async fn run(
        &mut self,
        start_after: usize,
        disturb: impl FnOnce(&RedisCluster) + Send + 'static,
    ) -> (f64, f64, Duration, Duration) {
        let started = Instant::now();
        let mut publisher =
            Client::connect(&self.broker, &format!("{}-publisher", self.client_id)).await;
        let messages = (1..=PER_DEVICE).flat_map(|seq| {
            (0..DEVICES).map(move |i| {
                (
                    format!("sensors/{}/data", device(i)),
                    format!(r#"{{"seq":{seq},"v":{i}}}"#).into_bytes(),
                )
            })
        });
        let messages: Vec<(String, Vec<u8>)> = messages.collect();
        let publishing = tokio::spawn(async move {
            publisher.publish_all(messages).await;
            publisher
        });
        let deadline = Instant::now() + DRAIN;
        while self.count("written").await < start_after as f64 {
            assert!(
                Instant::now() < deadline,
                "the bridge never wrote {start_after}; log:\n{}",
                self.bridge.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let at_start = self.count("written").await;
        let http = latest_http_addr(&self.bridge);
        let (stop_watch, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let watching = tokio::spawn(async move {
            let t = Instant::now();
            let mut not_ready = Vec::new();
            loop {
                let (code, body) = get(http, "/readyz").await;
                if code != 200 {
                    not_ready.push(format!("{:?}: {code} {}", t.elapsed(), body.trim()));
                }
                tokio::select! {
                    _ = &mut stopped => return not_ready,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        });
        let cluster = Arc::clone(&self.cluster);
        let disturbing = tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            disturb(&cluster);
            t.elapsed()
        });
        let took = tokio::time::timeout(DRAIN, disturbing)
            .await
            .expect("the disturbance ends in time")
            .expect("the disturbance succeeds");
        let at_end = self.count("written").await;
        let _publisher = publishing.await.expect("publisher");
        while self.count("written").await < TOTAL as f64 {
            assert!(
                Instant::now() < deadline,
                "written {} of {TOTAL} after {DRAIN:?}; log tail:\n{}",
                self.count("written").await,
                tail(&self.bridge.log_text(), 60)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = stop_watch.send(());
        self.not_ready = tokio::time::timeout(Duration::from_secs(30), watching)
            .await
            .expect("the /readyz watcher stops")
            .expect("the /readyz watcher");
        (at_start, at_end, took, started.elapsed())
    }

    /// The disturbance cost no outage: the manager never lost its connection (a cluster
    /// client stalled behind its slot refresh times commands out, and the manager then drops
    /// the connection and reconnects) and `/readyz` stayed 200 while it lasted.
    pub async fn assert_no_outage(&self) {
        let (_, metrics) = get(latest_http_addr(&self.bridge), "/metrics").await;
        let reconnects = sample(
            &metrics,
            r#"routemq_bridge_reconnects_total{target="redis"}"#,
        );
        let log = self.bridge.log_text();
        let lost: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("redis connection lost"))
            .collect();
        assert!(
            reconnects == Some(0.0) && lost.is_empty() && self.not_ready.is_empty(),
            "an outage: redis reconnects {reconnects:?}, connection lost {lost:#?}, /readyz not \
             200 {} times (first {:?}, last {:?}); log:\n{}",
            self.not_ready.len(),
            self.not_ready.first(),
            self.not_ready.last(),
            log_counts(&self.bridge, NOTABLE)
        );
    }

    /// Every message written exactly once, nothing else counted, nothing dead-lettered, and
    /// `/readyz` 200.
    pub async fn assert_all_written_once(&mut self) {
        for outcome in [
            "duplicate",
            "rate_limited",
            "unauthorized",
            "invalid",
            "failed",
        ] {
            assert_eq!(
                self.count(outcome).await,
                0.0,
                "{outcome}; log tail:\n{}",
                tail(&self.bridge.log_text(), 60)
            );
        }
        assert_eq!(self.count("written").await, TOTAL as f64);
        let dead: i64 = redis::cmd("LLEN")
            .arg(format!("{}:dead_letter", self.client_id))
            .query(&mut self.conn)
            .expect("LLEN dead letters");
        assert_eq!(dead, 0, "dead letters");
        let expected: Vec<String> = (1..=PER_DEVICE).map(|s| s.to_string()).collect();
        for i in 0..DEVICES {
            let d = device(i);
            let seqs: Vec<String> = redis::cmd("LRANGE")
                .arg(format!("sensor:{{{d}}}:seqs"))
                .arg(0)
                .arg(-1)
                .query(&mut self.conn)
                .expect("LRANGE");
            assert_eq!(seqs, expected, "{d}: each seq once, in order");
            let latest: String = redis::cmd("GET")
                .arg(format!("sensor:{{{d}}}:latest"))
                .query(&mut self.conn)
                .expect("GET latest");
            assert_eq!(latest, format!(r#"{{"seq":{PER_DEVICE},"v":{i}}}"#), "{d}");
        }
        let body = get_until(latest_http_addr(&self.bridge), "/readyz", 200).await;
        assert!(body.contains("\"redis\":\"up\""), "readyz: {body}");
    }
}

/// How many lines of the bridge's log contain each of `needles`, for the test's report.
pub(crate) fn log_counts(bridge: &Bridge, needles: &[&str]) -> String {
    let log = bridge.log_text();
    let counts: Vec<String> = needles
        .iter()
        .map(|n| {
            let mut hits = log.lines().filter(|l| l.contains(n));
            let first = hits.next();
            let count = first.map_or(0, |_| 1 + hits.count());
            match first {
                Some(line) => format!("{n:?}: {count} (first: {line})"),
                None => format!("{n:?}: 0"),
            }
        })
        .collect();
    counts.join("\n")
}

/// What the bridge's log says about the disturbance.
const NOTABLE: &[&str] = &[
    "beginning slot refresh",
    "slot refresh complete",
    "moving slot",
    "connection lost",
    "refuses",
    "message waits and retries",
    "message failed",
];

/// The last `n` lines of `text`.
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_migration_under_load_loses_nothing_and_writes_nothing_twice() {
    let mut rig = LoadRig::start("cluster-reshard", "").await;
    let masters = rig.cluster.masters();
    let (from, to) = (masters[0], masters[1]);
    // redis-cli moves the source's lowest slots: the devices living there are the ones that
    // move, and there must be some.
    const SLOTS: usize = 1200;
    let moving: Vec<u16> = rig.cluster.slots_of(from)[..SLOTS].to_vec();
    let moved_devices: Vec<String> = (0..DEVICES)
        .map(device)
        .filter(|d| moving.contains(&rig.cluster.slot_of(&format!("{{{d}}}"))))
        .collect();
    assert!(
        moved_devices.len() >= 20,
        "only {} devices in the migrated slots",
        moved_devices.len()
    );
    let (at_start, at_end, took, total) = rig
        .run(500, move |cluster| {
            cluster.reshard(from, to, SLOTS as u16);
            cluster.wait_stable();
        })
        .await;
    eprintln!(
        "reshard of {SLOTS} slots ({} devices) took {took:?}, from {at_start} to {at_end} \
         written; the load took {total:?}",
        moved_devices.len()
    );
    assert!(
        at_start < TOTAL as f64,
        "the migration started after the load"
    );
    rig.assert_no_outage().await;
    for d in &moved_devices {
        assert_eq!(rig.cluster.master_of(&format!("{{{d}}}")), to, "{d} moved");
    }
    eprintln!("bridge log: {}", log_counts(&rig.bridge, NOTABLE));
    rig.assert_all_written_once().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_promotion_under_load_loses_nothing_and_writes_nothing_twice() {
    let mut rig = LoadRig::start("cluster-failover", "").await;
    let old_master = rig.cluster.masters()[0];
    // In sync before the load starts, so the promotion itself falls into the load.
    let promoted = rig.cluster.replica_of(old_master);
    let (at_start, at_end, took, total) = rig
        .run(500, move |cluster| {
            cluster.promote(promoted);
            cluster.wait_stable();
        })
        .await;
    eprintln!(
        "failover {old_master} -> {promoted} took {took:?}, from {at_start} to {at_end} \
         written; the load took {total:?}"
    );
    assert!(
        at_start < TOTAL as f64,
        "the failover started after the load"
    );
    rig.assert_no_outage().await;
    assert_eq!(rig.cluster.role(old_master).as_deref(), Some("slave"));
    assert_eq!(rig.cluster.role(promoted).as_deref(), Some("master"));
    eprintln!("bridge log: {}", log_counts(&rig.bridge, NOTABLE));
    rig.assert_all_written_once().await;
}
