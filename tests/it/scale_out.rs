//! Several bridges in one share group (spec §10): three daemons with the same `share_group`
//! and distinct client ids, one Mosquitto, one Redis. They split the topic space through
//! `$share/<group>/<filter>`; the budgets of a rate limit are global because they live in
//! Redis; a member killed with `kill -9` and restarted loses nothing, and with `dedup`
//! nothing is written twice.
//!
//! What the broker does for a member that died, seen with Mosquitto 2.0.11 (its
//! `subs__shared_process` hands each message to the next member in turn, connected or
//! not): the dead member's persistent session keeps what was in flight to it and what was
//! queued for it, *and* it keeps receiving its turn of new messages while it is away.
//! Nothing moves to the other members; all of it is delivered when the member comes back
//! with the same client id (the in-flight ones again, marked DUP). So a member that never
//! comes back strands its share until its session expires (`persistent_client_expiration`),
//! and `max_queued_messages` bounds what it can hold meanwhile. The kill tests check the
//! attribution: each member writes what it handled to a list of its own.
//!
//! Each test starts five processes and pushes thousands of messages through three debug
//! builds on a small machine: they take turns ([`ONE_GROUP_AT_A_TIME`]) and wait on counts
//! with generous, bounded deadlines.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use redis::Commands;

use crate::bridge::{config, eventually, Bridge, Client};
use crate::bridge_middleware::latest_http_addr;
use crate::harness::{FaultProxy, Mosquitto, Redis};
use crate::ops::{get, sample};

/// How many bridges share the group.
const INSTANCES: usize = 3;

/// The share group, in every bridge's `[mqtt]` table.
const GROUP: &str = "scale";

/// How long a group may take to drain what was published (three debug builds, a broker,
/// Redis and the publisher on two shared cores).
const DRAIN: Duration = Duration::from_secs(240);

/// Three bridges at a time are enough for two cores: the tests of this module never overlap.
static ONE_GROUP_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One broker, one Redis and [`INSTANCES`] bridges in share group [`GROUP`], client ids
/// `scale-0`, `scale-1`, … Each bridge's config comes from `routes(client_id)`.
struct Group {
    _redis: Redis,
    broker: Mosquitto,
    bridges: Vec<Bridge>,
    conn: redis::Connection,
    /// Between one bridge and Redis, when the test asked for it.
    proxy: Option<FaultProxy>,
}

impl Group {
    fn start(routes: impl Fn(&str) -> String) -> Group {
        Group::start_with_proxy(routes, None)
    }

    /// Like [`Group::start`]; bridge `through` (if any) reaches Redis through a
    /// [`FaultProxy`] (`Group::proxy`).
    fn start_with_proxy(routes: impl Fn(&str) -> String, through: Option<usize>) -> Group {
        let redis = Redis::start();
        let broker = Mosquitto::start();
        let proxy = through.map(|_| FaultProxy::start(redis.port()));
        let bridges = (0..INSTANCES)
            .map(|i| {
                let id = client_id(i);
                let mut text = config(&redis, &broker, &id, &routes(&id)).replacen(
                    "[mqtt]\n",
                    &format!("[mqtt]\nshare_group = \"{GROUP}\"\n"),
                    1,
                );
                if let (Some(proxy), Some(true)) = (&proxy, through.map(|t| t == i)) {
                    text = text.replace(&redis.url(), &proxy.redis_url());
                }
                Bridge::start(&text)
            })
            .collect();
        let conn = redis
            .client()
            .get_connection()
            .expect("test connection to redis");
        Group {
            _redis: redis,
            broker,
            bridges,
            conn,
            proxy,
        }
    }

    /// `series` (a full Prometheus series, labels included) on every running bridge, in
    /// bridge order; 0 for a bridge that is not running or has not counted it yet.
    async fn per_bridge(&self, series: &str) -> Vec<f64> {
        let mut values = Vec::with_capacity(self.bridges.len());
        for bridge in &self.bridges {
            if bridge.pid().is_none() {
                values.push(0.0);
                continue;
            }
            let (_, metrics) = get(latest_http_addr(bridge), "/metrics").await;
            values.push(sample(&metrics, series).unwrap_or(0.0));
        }
        values
    }

    /// Polls until `done` holds for the per-bridge values of `series`, within [`DRAIN`];
    /// the values last seen.
    async fn until(&self, series: &str, done: impl Fn(&[f64]) -> bool) -> Vec<f64> {
        let deadline = Instant::now() + DRAIN;
        loop {
            let seen = self.per_bridge(series).await;
            if done(&seen) || Instant::now() >= deadline {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn dead_letters(&mut self) -> usize {
        self.conn.llen("dead_letter").expect("LLEN dead_letter")
    }

    /// Every bridge's log, for a failure message.
    fn logs(&self) -> String {
        self.bridges
            .iter()
            .enumerate()
            .map(|(i, b)| format!("--- {}:\n{}", client_id(i), b.log_text()))
            .collect()
    }
}

fn client_id(i: usize) -> String {
    format!("scale-{i}")
}

fn written(route: &str) -> String {
    outcome(route, "written")
}

fn outcome(route: &str, outcome: &str) -> String {
    format!(r#"routemq_bridge_messages_total{{route="{route}",outcome="{outcome}"}}"#)
}

fn total(values: &[f64]) -> u64 {
    values.iter().sum::<f64>() as u64
}

/// The device topics of the tests: `sensors/d000/data` … `sensors/d299/data`.
const DEVICES: usize = 300;

fn device(d: usize) -> String {
    format!("d{d:03}")
}

/// `per_device` messages on each of the [`DEVICES`] topics, interleaved (every device's
/// seq 0, then every device's seq 1, …); message `i` of the whole stream carries `"i"`.
fn stream(per_device: usize) -> Vec<(String, Vec<u8>)> {
    (0..per_device)
        .flat_map(|seq| (0..DEVICES).map(move |d| (seq, d)))
        .enumerate()
        .map(|(i, (seq, d))| {
            (
                format!("sensors/{}/data", device(d)),
                format!(r#"{{"seq":{seq},"i":{i},"v":21.5}}"#).into_bytes(),
            )
        })
        .collect()
}

/// Every device list `dev:<device>`, read in one pipeline: the seqs in list order.
fn device_lists(conn: &mut redis::Connection) -> BTreeMap<String, Vec<u64>> {
    let mut pipe = redis::pipe();
    for d in 0..DEVICES {
        pipe.lrange(format!("dev:{}", device(d)), 0, -1);
    }
    let lists: Vec<Vec<String>> = pipe.query(conn).expect("LRANGE every device list");
    (0..DEVICES)
        .zip(lists)
        .map(|(d, items)| {
            let seqs = items
                .iter()
                .map(|s| s.parse().expect("a seq"))
                .collect::<Vec<u64>>();
            (device(d), seqs)
        })
        .collect()
}

/// Asserts that every device list holds each seq of `0..per_device` exactly once.
fn assert_each_written_once(conn: &mut redis::Connection, per_device: usize, what: &str) {
    let expected: Vec<u64> = (0..per_device as u64).collect();
    for (device, mut seqs) in device_lists(conn) {
        seqs.sort_unstable();
        assert_eq!(seqs, expected, "{what}: device {device}");
    }
}

/// The route of the throughput test: each message's seq appended to its device's list.
fn data_route(_client_id: &str) -> String {
    r#"
[[routes]]
name = "data"
topic = "sensors/{device_id}/data"
qos = 1
payload = "json"
[[routes.actions]]
op = "rpush"
key = "dev:{device_id}"
value = "{json.seq}"
"#
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_bridges_in_one_share_group_write_30000_messages_over_300_topics_each_taking_a_share()
{
    const PER_DEVICE: usize = 100;
    const TOTAL: u64 = (PER_DEVICE * DEVICES) as u64;
    let _turn = ONE_GROUP_AT_A_TIME.lock().await;
    let mut group = Group::start(data_route);
    let mut publisher = Client::connect(&group.broker, "scale-publisher").await;

    let started = Instant::now();
    publisher.publish_all(stream(PER_DEVICE)).await;
    let published = started.elapsed();
    let shares = group.until(&written("data"), |w| total(w) >= TOTAL).await;
    let drained = started.elapsed();
    assert_eq!(
        total(&shares),
        TOTAL,
        "all written within {DRAIN:?} (per bridge {shares:?}); logs:\n{}",
        group.logs()
    );
    eprintln!(
        "scale_out: {TOTAL} messages over {DEVICES} topics: published in {published:.1?}, \
         written in {drained:.1?} ({:.0} msg/s); share per bridge {shares:?}",
        TOTAL as f64 / drained.as_secs_f64()
    );
    assert!(
        shares.iter().all(|&n| n > 0.0),
        "every bridge took a share: {shares:?}"
    );
    assert_each_written_once(
        &mut group.conn,
        PER_DEVICE,
        "the group wrote each message once",
    );
    assert_eq!(group.dead_letters(), 0, "nothing dead-lettered");
    for bad in ["invalid", "failed"] {
        let seen = group.per_bridge(&outcome("data", bad)).await;
        assert_eq!(total(&seen), 0, "no {bad} outcome: {seen:?}");
    }
}

/// Two routes that share one global budget each across the group: `max` per a window far
/// longer than the test (so the fixed window's key cannot roll over mid-test), the excess
/// dropped. Every admitted message is appended to `admitted:<strategy>`.
fn budget_routes(max: u64) -> impl Fn(&str) -> String {
    move |_client_id: &str| {
        ["fixed_window", "sliding_window"]
            .iter()
            .map(|strategy| {
                format!(
                    r#"
[[routes]]
name = "{strategy}"
topic = "budget/{strategy}/{{device_id}}"
qos = 1
rate_limit = {{ key = "budget:{strategy}", strategy = "{strategy}", max = {max}, window = "3650d", on_exceed = "drop" }}
[[routes.actions]]
op = "rpush"
key = "admitted:{strategy}"
value = "{{device_id}}:{{json.seq}}"
"#
                )
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_and_a_sliding_window_budget_admit_exactly_their_max_across_three_bridges() {
    const MAX: u64 = 300;
    const PER_STRATEGY: u64 = 3000;
    const TOPICS: u64 = 30;
    let _turn = ONE_GROUP_AT_A_TIME.lock().await;
    let mut group = Group::start(budget_routes(MAX));
    let mut publisher = Client::connect(&group.broker, "budget-publisher").await;

    // Both routes' messages interleaved, so the three bridges spend both budgets at once.
    let messages = (0..PER_STRATEGY).flat_map(|n| {
        ["fixed_window", "sliding_window"].map(|strategy| {
            (
                format!("budget/{strategy}/t{}", n % TOPICS),
                format!(r#"{{"seq":{n}}}"#).into_bytes(),
            )
        })
    });
    publisher.publish_all(messages).await;

    for strategy in ["fixed_window", "sliding_window"] {
        let limited = outcome(strategy, "rate_limited");
        let written_series = written(strategy);
        let deadline = Instant::now() + DRAIN;
        let (admitted, refused) = loop {
            let admitted = group.per_bridge(&written_series).await;
            let refused = group.per_bridge(&limited).await;
            if total(&admitted) + total(&refused) >= PER_STRATEGY || Instant::now() >= deadline {
                break (admitted, refused);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        eprintln!(
            "scale_out: {strategy} budget {MAX}: admitted per bridge {admitted:?}, \
             rate-limited per bridge {refused:?}"
        );
        assert_eq!(
            (total(&admitted), total(&refused)),
            (MAX, PER_STRATEGY - MAX),
            "{strategy}: exactly the budget admitted across the group, the rest rate-limited \
             (per bridge: admitted {admitted:?}, refused {refused:?}); logs:\n{}",
            group.logs()
        );
        let received = group
            .per_bridge(&format!(
                r#"routemq_bridge_messages_received_total{{route="{strategy}"}}"#
            ))
            .await;
        assert!(
            received.iter().all(|&n| n > 0.0),
            "{strategy}: every bridge handled part of the stream: {received:?}"
        );
        let list: usize = group
            .conn
            .llen(format!("admitted:{strategy}"))
            .expect("LLEN");
        assert_eq!(list as u64, MAX, "{strategy}: written exactly the budget");
    }
    assert_eq!(group.dead_letters(), 0, "nothing dead-lettered");
}

/// The route of the kill tests: the device list, plus `by:<client_id>` naming what each
/// member wrote (in the same transaction), so the test can tell where messages went.
fn attributed_route(dedup: bool) -> impl Fn(&str) -> String {
    move |client_id: &str| {
        // A lease far longer than the test may take to drain after the restart: waiting
        // out the dead run's leases would fail it.
        let dedup = if dedup {
            r#"dedup = { key = "dedup:{device_id}:{json.seq}", ttl = "10m", lease = "5m" }"#
        } else {
            ""
        };
        format!(
            r#"
[[routes]]
name = "data"
topic = "sensors/{{device_id}}/data"
qos = 1
{dedup}
[[routes.actions]]
op = "rpush"
key = "dev:{{device_id}}"
value = "{{json.seq}}"
[[routes.actions]]
op = "rpush"
key = "by:{client_id}"
value = "{{json.i}}"
"#
        )
    }
}

/// The stream indexes each member wrote (`by:<client_id>`), in bridge order.
fn attributed(conn: &mut redis::Connection) -> Vec<Vec<u64>> {
    let mut pipe = redis::pipe();
    for i in 0..INSTANCES {
        pipe.lrange(format!("by:{}", client_id(i)), 0, -1);
    }
    let lists: Vec<Vec<u64>> = pipe.query(conn).expect("LRANGE by:*");
    lists
}

/// How long the restarted member may take to catch up: far less than a dedup lease.
const AFTER_RESTART: Duration = Duration::from_secs(90);

/// Kills member 1 of a group running `attributed_route(dedup)` once it has written a
/// little of the first half of the stream, publishes the second half while it is dead,
/// restarts it (same client id, persistent session) and waits until every message was
/// written at least once. With dedup, member 1 is killed while it holds a claim (its
/// `SET NX` reached Redis, the reply is held back by a proxy), so its restart meets a
/// lease of its dead run. Returns the group and what member 1 had written at the kill.
async fn kill_9_one_member_mid_stream(dedup: bool, per_device: usize) -> (Group, Vec<u64>) {
    let total_messages = per_device * DEVICES;
    let mut group = Group::start_with_proxy(attributed_route(dedup), dedup.then_some(1));
    let mut publisher = Client::connect(&group.broker, "kill-publisher").await;
    let messages = stream(per_device);
    let (first, second) = messages.split_at(total_messages / 2);

    // Mid-stream: member 1 is frozen (or, with dedup, its next claim held) as soon as it has
    // written some of its share, while the first half is still being published, so the rest
    // of its share waits for it however fast it drains on this machine.
    let victim = client_id(1);
    let stop_victim = async {
        let deadline = Instant::now() + DRAIN;
        loop {
            let n: usize = group.conn.llen(format!("by:{victim}")).unwrap_or(0);
            if n >= 100 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{victim} did not start writing; logs:\n{}",
                group.logs()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        match &group.proxy {
            Some(proxy) => proxy.stall_then_drop_after_request(
                format!("lease:{victim}:").as_bytes(),
                Duration::from_secs(600),
            ),
            // A SIGSTOPped process takes SIGKILL like any other.
            None => crate::harness::signal(
                group.bridges[1].pid().expect("member 1 runs"),
                libc::SIGSTOP,
            ),
        }
    };
    tokio::join!(publisher.publish_all(first.to_vec()), stop_victim);
    if let Some(proxy) = &group.proxy {
        let holding = eventually(DRAIN, || (proxy.fired() > 0).then_some(())).await;
        assert!(holding.is_some(), "{victim} claimed no dedup key");
    }
    group.bridges[1].kill();
    let at_kill = attributed(&mut group.conn).swap_remove(1);
    assert!(
        at_kill.len() < total_messages / INSTANCES / 2,
        "killed mid-stream: {victim} had written {} of its ~{} of the first half",
        at_kill.len(),
        total_messages / INSTANCES / 2
    );

    // Published while it is dead: its turn of these waits in its session.
    publisher.publish_all(second.to_vec()).await;
    let bridge = &mut group.bridges[1];
    let offset = bridge.log_text().len();
    bridge.spawn_unready();
    assert!(
        bridge.wait_for_log_after(offset, "session_present=true", DRAIN),
        "{victim} came back to its kept session; log:\n{}",
        bridge.log_text()
    );

    let restarted = Instant::now();
    let all_seen = eventually(AFTER_RESTART, || {
        let seen: BTreeSet<u64> = attributed(&mut group.conn).into_iter().flatten().collect();
        (seen.len() == total_messages).then_some(())
    })
    .await;
    let seen: BTreeSet<u64> = attributed(&mut group.conn).into_iter().flatten().collect();
    assert!(
        all_seen.is_some(),
        "nothing lost: {} of {total_messages} written within {AFTER_RESTART:?} of the \
         restart; missing e.g. {:?}; logs:\n{}",
        seen.len(),
        (0..total_messages as u64)
            .filter(|i| !seen.contains(i))
            .take(10)
            .collect::<Vec<_>>(),
        group.logs()
    );
    eprintln!(
        "scale_out: kill -9 (dedup: {dedup}): everything written {:.1?} after the restart",
        restarted.elapsed()
    );
    (group, at_kill)
}

/// What the broker did with the killed member's messages, for the test's output: where
/// each index went, by its turn in Mosquitto's round robin (index mod 3 while all three
/// were subscribed before the stream began).
fn describe_redelivery(group: &mut Group, at_kill: &[u64]) -> String {
    let by = attributed(&mut group.conn);
    let turns: Vec<BTreeSet<u64>> = by
        .iter()
        .map(|list| list.iter().map(|i| i % INSTANCES as u64).collect())
        .collect();
    let before: BTreeSet<u64> = at_kill.iter().copied().collect();
    let after = &by[1][at_kill.len()..];
    let written_twice = after.iter().filter(|i| before.contains(i)).count();
    let after_restart = after.len();
    format!(
        "written per member {:?}; round-robin turns per member {turns:?}; the killed member \
         wrote {} before the kill and {after_restart} after its restart, {written_twice} of \
         them again",
        by.iter().map(Vec::len).collect::<Vec<_>>(),
        at_kill.len(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_member_and_its_restart_lose_nothing_and_dedup_writes_each_once() {
    const PER_DEVICE: usize = 30;
    let _turn = ONE_GROUP_AT_A_TIME.lock().await;
    let (mut group, at_kill) = kill_9_one_member_mid_stream(true, PER_DEVICE).await;

    let by = attributed(&mut group.conn);
    let written: usize = by.iter().map(Vec::len).sum();
    assert_eq!(
        written,
        PER_DEVICE * DEVICES,
        "with dedup each message is written once: {}",
        describe_redelivery(&mut group, &at_kill)
    );
    assert_each_written_once(&mut group.conn, PER_DEVICE, "dedup across the group");
    // The restarted member got its session back: what it had not acked, what was queued
    // for it and its turn of what came while it was dead.
    let restarted = group
        .per_bridge(r#"routemq_bridge_messages_received_total{route="data"}"#)
        .await;
    assert!(
        restarted[1] > 0.0,
        "the restarted member received its session's messages: {restarted:?}"
    );
    let duplicates = group.per_bridge(&outcome("data", "duplicate")).await;
    eprintln!(
        "scale_out: kill -9 with dedup: {}; duplicates seen per bridge after the restart \
         {duplicates:?}",
        describe_redelivery(&mut group, &at_kill)
    );
    assert_eq!(group.dead_letters(), 0, "nothing dead-lettered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_one_member_and_its_restart_lose_nothing_without_dedup() {
    const PER_DEVICE: usize = 30;
    let _turn = ONE_GROUP_AT_A_TIME.lock().await;
    let (mut group, at_kill) = kill_9_one_member_mid_stream(false, PER_DEVICE).await;

    // At least once: every seq of every device is there (a redelivery may add a copy).
    for (device, seqs) in device_lists(&mut group.conn) {
        let distinct: BTreeSet<u64> = seqs.into_iter().collect();
        assert_eq!(
            distinct,
            (0..PER_DEVICE as u64).collect(),
            "device {device}: nothing lost"
        );
    }
    eprintln!(
        "scale_out: kill -9 without dedup: {}",
        describe_redelivery(&mut group, &at_kill)
    );
    assert_eq!(group.dead_letters(), 0, "nothing dead-lettered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_broker_lost_every_session_the_group_resubscribes_shared_and_still_splits() {
    let _turn = ONE_GROUP_AT_A_TIME.lock().await;
    let mut group = Group::start(data_route);
    let mut publisher = Client::connect(&group.broker, "lost-publisher").await;
    publisher.publish_all(stream(1)).await;
    let written_once = group
        .until(&written("data"), |w| total(w) >= DEVICES as u64)
        .await;
    assert_eq!(total(&written_once), DEVICES as u64, "{written_once:?}");

    // A broker crash before it saved anything: it comes back knowing no session.
    let offsets: Vec<usize> = group.bridges.iter().map(|b| b.log_text().len()).collect();
    drop(publisher);
    group.broker.kill();
    let _ = std::fs::remove_file(group.broker.dir().join("mosquitto.db"));
    group.broker.start_again();
    for (bridge, offset) in group.bridges.iter().zip(offsets) {
        assert!(
            bridge.wait_for_log_after(offset, crate::bridge::SUBSCRIBED, DRAIN),
            "every member subscribed again; log:\n{}",
            bridge.log_text()
        );
        assert!(
            bridge.log_text()[offset..].contains("session_present=false"),
            "the broker had lost the session; log:\n{}",
            bridge.log_text()
        );
    }

    // Subscribed again as members of the group, not each to the whole topic space: every
    // message is still written once.
    let mut publisher = Client::connect(&group.broker, "lost-publisher-2").await;
    publisher.publish_all(stream(2).split_off(DEVICES)).await;
    let shares = group
        .until(&written("data"), |w| total(w) >= 2 * DEVICES as u64)
        .await;
    assert_each_written_once(&mut group.conn, 2, "after the resubscription");
    assert_eq!(total(&shares), 2 * DEVICES as u64, "{shares:?}");
}
