//! Redis → MQTT republish (spec §7) on a Redis Cluster (spec §10): a stream rule whose stream
//! lives on another node than the first seed, pub/sub and stream rules that keep flowing
//! after the first seed's master dies, and a pattern rule (`PSUBSCRIBE`) that receives what
//! is published on any node.

use std::time::{Duration, Instant};

use crate::bridge::{Bridge, Client};
use crate::cluster::cluster_config;
use crate::cluster_faults::{log_counts, tail};
use crate::harness::{Mosquitto, RedisCluster};

/// Upper bound of any single wait; reaching it is a failure.
const WAIT: Duration = Duration::from_secs(30);

/// A republish-only bridge (it subscribes nothing over MQTT), started and past "republish
/// started".
fn start_bridge(config: &str) -> Bridge {
    let bridge = Bridge::start_unready(config);
    assert!(
        bridge.wait_for_log("republish started", WAIT),
        "republish did not start; log:\n{}",
        bridge.log_text()
    );
    bridge
}

/// [`start_bridge`] for rules with a stream: returns once its consumer group exists.
fn start_bridge_with_stream(config: &str) -> Bridge {
    let bridge = start_bridge(config);
    assert!(
        bridge.wait_for_log("consumer group created", WAIT),
        "{}",
        bridge.log_text()
    );
    bridge
}

/// An MQTT client subscribed to `filter` on `broker`.
async fn listener(broker: &Mosquitto, id: &str, filter: &str) -> Client {
    let mut client = Client::connect(broker, id).await;
    client.subscribe(filter).await;
    client
}

/// The payloads received on `client` until `done` says enough, or WAIT passes.
async fn receive_until(
    client: &mut Client,
    mut done: impl FnMut(&[(String, String)]) -> bool,
) -> Vec<(String, String)> {
    let deadline = Instant::now() + WAIT;
    let mut got = Vec::new();
    while !done(&got) {
        let left = deadline.saturating_duration_since(Instant::now());
        match client.next_message(left).await {
            Some(m) => got.push((
                m.topic.clone(),
                String::from_utf8_lossy(&m.payload).into_owned(),
            )),
            None => break,
        }
    }
    got
}

/// Runs `send` every 100 ms until `client` receives a message on `topic` (the rule is live:
/// a subscription or a reader is in place), within WAIT. Returns how many were sent.
async fn until_flowing(client: &mut Client, topic: &str, mut send: impl FnMut(usize)) -> usize {
    let deadline = Instant::now() + WAIT;
    let mut sent = 0;
    loop {
        send(sent);
        sent += 1;
        if let Some(m) = client.next_message(Duration::from_millis(100)).await {
            if m.topic == topic {
                return sent;
            }
        }
        assert!(
            Instant::now() < deadline,
            "nothing arrived on {topic} within {WAIT:?}"
        );
    }
}

fn publish_on(cluster: &RedisCluster, port: u16, channel: &str, payload: &str) -> i64 {
    let mut conn = cluster
        .node(port)
        .client()
        .get_connection_with_timeout(Duration::from_secs(2))
        .expect("connect to a node");
    redis::cmd("PUBLISH")
        .arg(channel)
        .arg(payload)
        .query(&mut conn)
        .expect("PUBLISH")
}

fn xadd(cluster: &RedisCluster, stream: &str, payload: &str) {
    let mut conn = cluster
        .client()
        .get_connection()
        .expect("cluster connection");
    let _: String = redis::cmd("XADD")
        .arg(stream)
        .arg("*")
        .arg("payload")
        .arg(payload)
        .query(&mut conn)
        .expect("XADD");
}

/// A stream key whose master is not the node on `port`.
fn stream_not_on(cluster: &RedisCluster, prefix: &str, port: u16) -> String {
    (0..100)
        .map(|i| format!("{prefix}:{i}"))
        .find(|k| cluster.master_of(k) != port)
        .expect("some key lives elsewhere")
}

/// A stream key whose master is the node on `port`.
fn stream_on(cluster: &RedisCluster, prefix: &str, port: u16) -> String {
    (0..200)
        .map(|i| format!("{prefix}:{i}"))
        .find(|k| cluster.master_of(k) == port)
        .expect("some key lives there")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_rule_reads_a_stream_that_lives_on_another_node_than_the_first_seed() {
    let cluster = RedisCluster::shared();
    let first_seed = cluster.nodes()[0].port();
    let stream = stream_not_on(cluster, "c6:alerts", first_seed);
    let broker = Mosquitto::start();
    let mut out = listener(&broker, "c6-listener", "c6/out").await;
    let rules = format!(
        r#"
[[republish]]
name = "c6"
source = "stream"
stream = "{stream}"
topic = "c6/out"
"#
    );
    let bridge = start_bridge(&cluster_config(cluster, &broker, "cluster-c6", &rules));
    // The group starts at `$`: entries added before it exists are not the rule's.
    assert!(
        bridge.wait_for_log("consumer group created", WAIT),
        "{}",
        bridge.log_text()
    );
    for i in 0..5 {
        xadd(cluster, &stream, &format!("m{i}"));
    }
    let got = receive_until(&mut out, |got| got.len() >= 5).await;
    let payloads: Vec<&str> = got.iter().map(|(_, p)| p.as_str()).collect();
    assert_eq!(
        payloads,
        ["m0", "m1", "m2", "m3", "m4"],
        "stream {stream} on {}; log tail:\n{}",
        cluster.master_of(&stream),
        tail(&bridge.log_text(), 30)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_rule_on_a_cluster_receives_what_is_published_on_any_node() {
    // Non-sharded pub/sub on a cluster: every PUBLISH is broadcast to every node over the
    // cluster bus, so the one PSUBSCRIBE the bridge holds on one node sees them all.
    let cluster = RedisCluster::shared();
    let broker = Mosquitto::start();
    let mut out = listener(&broker, "c8-listener", "c8/+/commands").await;
    let rules = r#"
[[republish]]
name = "c8"
source = "pubsub"
channel = "c8:cmd:{device_id}"
topic = "c8/{device_id}/commands"
"#;
    let bridge = start_bridge(&cluster_config(cluster, &broker, "cluster-c8", rules));
    let first = cluster.nodes()[0].port();
    until_flowing(&mut out, "c8/probe/commands", |_| {
        publish_on(cluster, first, "c8:cmd:probe", "probe");
    })
    .await;
    let ports: Vec<u16> = cluster.nodes().iter().map(|n| n.port()).collect();
    for port in &ports {
        publish_on(
            cluster,
            *port,
            &format!("c8:cmd:n{port}"),
            &format!("from {port}"),
        );
    }
    let got = receive_until(&mut out, |got| {
        got.iter().filter(|(t, _)| !t.contains("probe")).count() >= ports.len()
    })
    .await;
    let mut from: Vec<String> = got
        .into_iter()
        .filter(|(t, _)| !t.contains("probe"))
        .map(|(t, p)| format!("{t} {p}"))
        .collect();
    from.sort();
    let mut expected: Vec<String> = ports
        .iter()
        .map(|p| format!("c8/n{p}/commands from {p}"))
        .collect();
    expected.sort();
    assert_eq!(
        from,
        expected,
        "log tail:\n{}",
        tail(&bridge.log_text(), 30)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_and_stream_rules_keep_flowing_after_the_first_seed_dies() {
    let mut cluster = RedisCluster::start();
    let first_seed = cluster.nodes()[0].port();
    assert_eq!(
        cluster.role(first_seed).as_deref(),
        Some("master"),
        "redis-cli made the first node a master"
    );
    // The stream lives on the first seed: after it dies, on its promoted replica.
    let stream = stream_on(&cluster, "c9:alerts", first_seed);
    let replica = cluster.replica_of(first_seed);
    let broker = Mosquitto::start();
    let mut out = listener(&broker, "c9-listener", "c9/#").await;
    let rules = format!(
        r#"
[[republish]]
name = "c9-pubsub"
source = "pubsub"
channel = "c9:commands"
topic = "c9/commands"

[[republish]]
name = "c9-stream"
source = "stream"
stream = "{stream}"
topic = "c9/alerts"
"#
    );
    let bridge = start_bridge_with_stream(&cluster_config(&cluster, &broker, "cluster-c9", &rules));
    let other = cluster.nodes()[1].port();
    until_flowing(&mut out, "c9/commands", |i| {
        publish_on(&cluster, other, "c9:commands", &format!("before {i}"));
    })
    .await;
    xadd(&cluster, &stream, "before");
    let got = receive_until(&mut out, |got| got.iter().any(|(t, _)| t == "c9/alerts")).await;
    assert!(
        got.iter().any(|(t, p)| t == "c9/alerts" && p == "before"),
        "{got:?}"
    );

    let killed = Instant::now();
    cluster.node_mut(first_seed).kill();
    // The cluster promotes the replica after cluster-node-timeout (2 s).
    tokio::task::block_in_place(|| {
        cluster.wait_master(replica, WAIT);
        cluster.wait_ok();
    });
    let promoted = killed.elapsed();

    let sent = until_flowing(&mut out, "c9/commands", |i| {
        publish_on(&cluster, other, "c9:commands", &format!("after {i}"));
    })
    .await;
    let pubsub_back = killed.elapsed();
    xadd(&cluster, &stream, "after");
    let got = receive_until(&mut out, |got| {
        got.iter().any(|(t, p)| t == "c9/alerts" && p == "after")
    })
    .await;
    assert!(
        got.iter().any(|(t, p)| t == "c9/alerts" && p == "after"),
        "the stream rule did not follow the failover: {got:?}; log tail:\n{}",
        tail(&bridge.log_text(), 40)
    );
    eprintln!(
        "first seed killed; replica promoted and cluster ok after {promoted:?}, pub/sub \
         flowing again after {pubsub_back:?} ({sent} publishes), stream after {:?}\n{}",
        killed.elapsed(),
        log_counts(
            &bridge,
            &[
                "pub/sub connection lost",
                "reconnected and resubscribed",
                "stream read failed"
            ]
        )
    );
}

/// The ports of the running nodes holding a pub/sub subscriber (`CLIENT LIST TYPE pubsub`).
fn subscriber_nodes(cluster: &RedisCluster) -> Vec<u16> {
    cluster
        .nodes()
        .iter()
        .filter(|n| n.is_running())
        .filter(|n| {
            let Ok(mut conn) = n
                .client()
                .get_connection_with_timeout(Duration::from_secs(1))
            else {
                return false;
            };
            let list: String = redis::cmd("CLIENT")
                .arg("LIST")
                .arg("TYPE")
                .arg("pubsub")
                .query(&mut conn)
                .unwrap_or_default();
            !list.trim().is_empty()
        })
        .map(|n| n.port())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pubsub_rule_resubscribes_on_another_node_when_its_node_dies() {
    let mut cluster = RedisCluster::start();
    let broker = Mosquitto::start();
    let mut out = listener(&broker, "c10-listener", "c10/#").await;
    let rules = r#"
[[republish]]
name = "c10"
source = "pubsub"
channel = "c10:commands"
topic = "c10/commands"
"#;
    let bridge = start_bridge(&cluster_config(&cluster, &broker, "cluster-c10", rules));
    let ports: Vec<u16> = cluster.nodes().iter().map(|n| n.port()).collect();
    // Published on a node that stays up; the broadcast reaches the subscriber's node.
    until_flowing(&mut out, "c10/commands", |i| {
        publish_on(&cluster, ports[5], "c10:commands", &format!("before {i}"));
    })
    .await;
    let held = subscriber_nodes(&cluster);
    let [node] = held[..] else {
        panic!("the bridge's subscriber is on one node, not {held:?}");
    };
    let (publish_port, replica) = if cluster.role(node).as_deref() == Some("master") {
        let replica = cluster.replica_of(node);
        let other = *ports
            .iter()
            .find(|p| **p != node && **p != replica)
            .expect("a third node");
        (other, Some(replica))
    } else {
        (
            *ports.iter().find(|p| **p != node).expect("another node"),
            None,
        )
    };
    let killed = Instant::now();
    cluster.node_mut(node).kill();
    tokio::task::block_in_place(|| {
        if let Some(replica) = replica {
            cluster.wait_master(replica, WAIT);
        }
        cluster.wait_ok();
    });
    let sent = until_flowing(&mut out, "c10/commands", |i| {
        publish_on(
            &cluster,
            publish_port,
            "c10:commands",
            &format!("after {i}"),
        );
    })
    .await;
    let now_held = subscriber_nodes(&cluster);
    assert_eq!(now_held.len(), 1, "{now_held:?}");
    assert_ne!(now_held[0], node);
    eprintln!(
        "subscriber's node {node} ({}) killed; flowing again on {} after {:?} ({sent} \
         publishes)\n{}",
        if replica.is_some() {
            "master"
        } else {
            "replica"
        },
        now_held[0],
        killed.elapsed(),
        log_counts(
            &bridge,
            &["pub/sub connection lost", "reconnected and resubscribed"]
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_rule_follows_its_stream_when_a_resharding_moves_it() {
    let cluster = RedisCluster::start();
    // From the first seed (where a reader that always used the first seed would stay) to
    // another master.
    let from = cluster.nodes()[0].port();
    assert_eq!(cluster.role(from).as_deref(), Some("master"));
    let to = *cluster
        .masters()
        .iter()
        .find(|p| **p != from)
        .expect("another master");
    // redis-cli moves the source's lowest slots first: a stream in the first 100 moves.
    const SLOTS: u16 = 100;
    let moving: Vec<u16> = cluster.slots_of(from)[..usize::from(SLOTS)].to_vec();
    let stream = (0..100_000)
        .map(|i| format!("c11:alerts:{i}"))
        .find(|k| moving.contains(&cluster.slot_of(k)))
        .expect("some key in the migrated slots");
    let broker = Mosquitto::start();
    let mut out = listener(&broker, "c11-listener", "c11/out").await;
    let rules = format!(
        r#"
[[republish]]
name = "c11"
source = "stream"
stream = "{stream}"
topic = "c11/out"
"#
    );
    let bridge =
        start_bridge_with_stream(&cluster_config(&cluster, &broker, "cluster-c11", &rules));
    xadd(&cluster, &stream, "before");
    let got = receive_until(&mut out, |got| !got.is_empty()).await;
    assert_eq!(got.first().map(|(_, p)| p.as_str()), Some("before"));

    tokio::task::block_in_place(|| {
        cluster.reshard(from, to, SLOTS);
        cluster.wait_stable();
    });
    assert_eq!(cluster.master_of(&stream), to, "the stream moved");
    let moved = Instant::now();
    for i in 0..3 {
        xadd(&cluster, &stream, &format!("after {i}"));
    }
    let got = receive_until(&mut out, |got| got.len() >= 3).await;
    let payloads: Vec<&str> = got.iter().map(|(_, p)| p.as_str()).collect();
    assert_eq!(
        payloads,
        ["after 0", "after 1", "after 2"],
        "log tail:\n{}",
        tail(&bridge.log_text(), 30)
    );
    eprintln!(
        "stream {stream} moved {from} -> {to}; read again after {:?}\n{}",
        moved.elapsed(),
        log_counts(&bridge, &["stream read failed"])
    );
}
