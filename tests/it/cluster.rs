//! The bridge on a real Redis Cluster (spec §10): hash-tagged atomic routes, dedup and rate
//! limits writing across masters, and `check` refusing an atomic route whose keys may land in
//! different slots. Every test shares [`RedisCluster::shared`] under a key prefix of its own
//! (`c1:` …), with a Mosquitto and a bridge of its own.

use std::collections::BTreeSet;

use redis::cluster::ClusterConnection;

use crate::bridge::{Bridge, Client};
use crate::bridge_middleware::latest_http_addr;
use crate::harness::{Mosquitto, RedisCluster};

/// The bridge's config for the shared cluster and `broker`, followed by `routes`.
pub(crate) fn cluster_config(
    cluster: &RedisCluster,
    broker: &Mosquitto,
    client_id: &str,
    routes: &str,
) -> String {
    format!(
        r#"[mqtt]
url = "{mqtt}"
client_id = "{client_id}"
keep_alive = "5s"
reconnect_max_delay = "1s"

[redis]
{seeds}
socket_timeout = "2s"

[http]
listen = "127.0.0.1:0"

[dead_letter]
redis_list = "{client_id}:dead_letter"

{routes}
"#,
        mqtt = broker.url(),
        seeds = cluster.toml_seeds(),
    )
}

/// A broker, a bridge with `routes` on the shared cluster, a publisher and a cluster
/// connection to read what the bridge wrote.
struct ClusterRig {
    cluster: &'static RedisCluster,
    _broker: Mosquitto,
    bridge: Bridge,
    client: Client,
    conn: ClusterConnection,
}

impl ClusterRig {
    async fn start(client_id: &str, routes: &str) -> ClusterRig {
        let cluster = RedisCluster::shared();
        let broker = Mosquitto::start();
        let bridge = Bridge::start(&cluster_config(cluster, &broker, client_id, routes));
        let client = Client::connect(&broker, &format!("{client_id}-publisher")).await;
        let conn = cluster
            .client()
            .get_connection()
            .expect("cluster connection");
        ClusterRig {
            cluster,
            _broker: broker,
            bridge,
            client,
            conn,
        }
    }

    fn query<T: redis::FromRedisValue>(&mut self, cmd: &mut redis::Cmd) -> T {
        cmd.query(&mut self.conn).expect("query the cluster")
    }

    /// Polls /metrics until route `route` counted each (outcome, value), or WAIT passes;
    /// the values last seen, in order.
    async fn outcomes_until(&self, route: &str, expected: &[(&str, f64)]) -> Vec<Option<f64>> {
        crate::bridge_middleware::outcomes_at(latest_http_addr(&self.bridge), route, expected).await
    }

    /// Asserts route `route` counted exactly `expected` (outcome, value) pairs.
    async fn assert_outcomes(&self, route: &str, expected: &[(&str, f64)]) {
        let seen = self.outcomes_until(route, expected).await;
        let wanted: Vec<Option<f64>> = expected.iter().map(|(_, v)| Some(*v)).collect();
        assert_eq!(
            seen,
            wanted,
            "outcomes of {route} {expected:?}; log:\n{}",
            self.bridge.log_text()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hash_tagged_atomic_route_writes_devices_on_every_master() {
    let mut rig = ClusterRig::start(
        "cluster-c1",
        r#"
[[routes]]
name = "c1"
topic = "c1/{id}"
[[routes.actions]]
op = "set"
key = "c1:{{{id}}}:latest"
[[routes.actions]]
op = "rpush"
key = "c1:{{{id}}}:history"
"#,
    )
    .await;
    let devices: Vec<String> = (0..12).map(|i| format!("d{i}")).collect();
    let masters: BTreeSet<u16> = devices
        .iter()
        .map(|d| rig.cluster.master_of(&format!("c1:{{{d}}}:latest")))
        .collect();
    assert!(masters.len() >= 2, "the devices' keys all on {masters:?}");
    let messages = devices.iter().flat_map(|d| {
        (1..=2).map(move |seq| {
            (
                format!("c1/{d}"),
                format!(r#"{{"seq":{seq}}}"#).into_bytes(),
            )
        })
    });
    rig.client.publish_all(messages).await;
    rig.assert_outcomes("c1", &[("written", 24.0)]).await;
    for d in &devices {
        let latest: String = rig.query(redis::cmd("GET").arg(format!("c1:{{{d}}}:latest")));
        assert_eq!(latest, r#"{"seq":2}"#, "{d}");
        let history: Vec<String> = rig.query(
            redis::cmd("LRANGE")
                .arg(format!("c1:{{{d}}}:history"))
                .arg(0)
                .arg(-1),
        );
        assert_eq!(history, [r#"{"seq":1}"#, r#"{"seq":2}"#], "{d}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dedup_route_on_a_cluster_writes_a_redelivery_once() {
    let mut rig = ClusterRig::start(
        "cluster-c2",
        r#"
[[routes]]
name = "c2"
topic = "c2/{id}"
dedup = { key = "c2:dedup:{{{id}}}:{json.seq}", ttl = "10m" }
[[routes.actions]]
op = "incr"
key = "c2:{{{id}}}:count"
"#,
    )
    .await;
    for d in ["a", "b", "c", "d"] {
        for seq in [1, 1, 2] {
            rig.client
                .publish(&format!("c2/{d}"), format!(r#"{{"seq":{seq}}}"#))
                .await;
        }
    }
    rig.assert_outcomes("c2", &[("written", 8.0), ("duplicate", 4.0)])
        .await;
    for d in ["a", "b", "c", "d"] {
        let count: i64 = rig.query(redis::cmd("GET").arg(format!("c2:{{{d}}}:count")));
        assert_eq!(count, 2, "{d}: seq 1 once, seq 2 once");
        let mark: String = rig.query(redis::cmd("GET").arg(format!("c2:dedup:{{{d}}}:1")));
        assert!(mark.starts_with("done:cluster-c2:"), "{d}: {mark}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_route_on_a_cluster_admits_exactly_its_budget() {
    let mut rig = ClusterRig::start(
        "cluster-c3",
        r#"
[[routes]]
name = "c3"
topic = "c3/{id}"
rate_limit = { key = "c3:rl:{id}", strategy = "fixed_window", max = 5, window = "1h" }
[[routes.actions]]
op = "incr"
key = "c3:{id}:count"
"#,
    )
    .await;
    let messages = (0..10).map(|i| ("c3/a".to_string(), format!(r#"{{"i":{i}}}"#).into_bytes()));
    rig.client.publish_all(messages).await;
    rig.assert_outcomes("c3", &[("written", 5.0), ("rate_limited", 5.0)])
        .await;
    let count: i64 = rig.query(redis::cmd("GET").arg("c3:a:count"));
    assert_eq!(count, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_and_a_dedup_whose_keys_lie_in_different_slots_work_on_a_cluster() {
    // Spec §10: "single-key scripts (rate limits) and locks work anywhere" — the rate-limit
    // key has no hash tag, the dedup key and the action share one.
    let mut rig = ClusterRig::start(
        "cluster-c4",
        r#"
[[routes]]
name = "c4"
topic = "c4/{id}"
rate_limit = { key = "c4:rl:{id}", strategy = "fixed_window", max = 100, window = "1h" }
dedup = { key = "c4:dedup:{{{id}}}:{json.seq}", ttl = "10m" }
[[routes.actions]]
op = "incr"
key = "c4:{{{id}}}:count"
"#,
    )
    .await;
    for seq in [1, 1, 2] {
        rig.client
            .publish("c4/a", format!(r#"{{"seq":{seq}}}"#))
            .await;
    }
    rig.assert_outcomes("c4", &[("written", 2.0), ("duplicate", 1.0)])
        .await;
    let count: i64 = rig.query(redis::cmd("GET").arg("c4:{a}:count"));
    assert_eq!(count, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_atomic_route_writes_keys_in_different_slots_on_a_cluster() {
    // Spec §10: "`atomic = false` routes may span slots (one pipeline per node)".
    let mut rig = ClusterRig::start(
        "cluster-c5",
        r#"
[[routes]]
name = "c5"
topic = "c5/{id}"
atomic = false
[[routes.actions]]
op = "set"
key = "c5:latest:{id}"
[[routes.actions]]
op = "incr"
key = "c5:count:{id}"
"#,
    )
    .await;
    // A device whose two keys the cluster serves from different masters.
    let id = (0..100)
        .map(|i| format!("d{i}"))
        .find(|id| {
            rig.cluster.master_of(&format!("c5:latest:{id}"))
                != rig.cluster.master_of(&format!("c5:count:{id}"))
        })
        .expect("some device has its keys on two masters");
    let (latest, count) = (format!("c5:latest:{id}"), format!("c5:count:{id}"));
    rig.client.publish(&format!("c5/{id}"), "{}").await;
    rig.assert_outcomes("c5", &[("written", 1.0)]).await;
    let value: String = rig.query(redis::cmd("GET").arg(&latest));
    assert_eq!(value, "{}");
    let n: i64 = rig.query(redis::cmd("GET").arg(&count));
    assert_eq!(n, 1);
}

#[test]
fn check_refuses_an_atomic_route_without_a_shared_hash_tag_on_a_cluster() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = |key_prefix: &str| {
        format!(
            r#"[mqtt]
url = "mqtt://127.0.0.1:1883"
client_id = "cluster-check"

[redis]
cluster = ["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"]

[[routes]]
name = "sensor-data"
topic = "sensors/{{device_id}}/data"
[[routes.actions]]
op = "set"
key = "sensor:{key_prefix}:latest"
[[routes.actions]]
op = "rpush"
key = "sensor:{key_prefix}:history"
"#
        )
    };
    let path = dir.path().join("untagged.toml");
    std::fs::write(&path, config("{device_id}")).expect("write config");
    let out = crate::bridge_cli::run(&["check", "--config", &path.display().to_string()]);
    let stderr = crate::bridge_cli::text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    for needle in [
        "routes[0].atomic",
        "\"sensor-data\"",
        "\"sensor:{{{device_id}}}:latest\"",
        "atomic = false",
    ] {
        assert!(stderr.contains(needle), "{needle} missing from: {stderr}");
    }

    let path = dir.path().join("tagged.toml");
    std::fs::write(&path, config("{{{device_id}}}")).expect("write config");
    let out = crate::bridge_cli::run(&["check", "--config", &path.display().to_string()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        crate::bridge_cli::text(&out.stderr)
    );
}
