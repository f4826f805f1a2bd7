//! The local spool (spec §6.2) against the real daemon, Redis and Mosquitto: a long Redis
//! outage spooled, acked and replayed in order; `kill -9` while spooling and while
//! draining; a damaged file; a full spool under both `on_full` policies; forward-only
//! routes flowing while the spool fills.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use redis::Commands;

use crate::bridge::{config, eventually, Bridge, Client};
use crate::harness::{Mosquitto, Redis};
use crate::ops::{get, get_until, http_addr, sample};

const WAIT: Duration = Duration::from_secs(60);

/// A route that appends each message to a list per device: the list holds the order in
/// which the messages were written.
const LIST_ROUTE: &str = r#"
[[routes]]
name = "list"
topic = "spool/{device}/data"
payload = "text"
[[routes.actions]]
op = "rpush"
key = "list:{device}"
"#;

/// [`LIST_ROUTE`] with `dedup` on the payload's sequence number (`<device>/<n>`), whose
/// lease is short so a claim left by a killed bridge expires quickly.
const DEDUP_ROUTE: &str = r#"
[[routes]]
name = "list"
topic = "spool/{device}/data"
payload = "text"
dedup = { key = "dedup:{device}:{payload_sha256}", lease = "2s", ttl = "10m" }
[[routes.actions]]
op = "rpush"
key = "list:{device}"
"#;

/// Another process's connection to the spool in `dir`, holding its write lock (an open
/// `BEGIN IMMEDIATE`) until it rolls back or is dropped: the bridge's writes then fail with
/// SQLITE_BUSY after its 5 s busy timeout, while its reads go on (WAL).
fn hold_write_lock(dir: &Path) -> rusqlite::Connection {
    let other = rusqlite::Connection::open(dir.join("spool.db")).expect("open the spool");
    other
        .execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    other
}

/// `[spool]` in `dir`, spilling after one second, with `more` keys.
fn spool_section(dir: &Path, more: &str) -> String {
    format!(
        "[spool]\npath = \"{}\"\nafter = \"1s\"\n{more}\n",
        dir.join("spool.db").display()
    )
}

fn payload(device: usize, n: usize) -> String {
    format!("{device}/{n}")
}

/// `(topic, payload)` for `per_topic` messages on each of `topics` devices, interleaved.
fn messages(topics: usize, per_topic: std::ops::Range<usize>) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for n in per_topic {
        for d in 0..topics {
            out.push((format!("spool/d{d}/data"), payload(d, n).into_bytes()));
        }
    }
    out
}

/// One scrape's value of `series`.
async fn metric(addr: SocketAddr, series: &str) -> Option<f64> {
    sample(&get(addr, "/metrics").await.1, series)
}

/// Scrapes until `check` holds for the metrics text; the last text.
async fn metrics_until(addr: SocketAddr, what: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, text) = get(addr, "/metrics").await;
        if check(&text) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {WAIT:?}; metrics:\n{}",
            text.lines()
                .filter(|l| l.contains("spool") || l.contains("inflight"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const SPOOL_MESSAGES: &str = "routemq_bridge_spool_messages";
const INFLIGHT: &str = "routemq_bridge_inflight_messages";

/// Waits until the spool holds `n` messages and nothing is in flight (every one of them
/// committed and acked).
pub(crate) async fn spooled(addr: SocketAddr, n: usize) {
    metrics_until(addr, &format!("{n} spooled and acked"), |m| {
        sample(m, SPOOL_MESSAGES) == Some(n as f64) && sample(m, INFLIGHT) == Some(0.0)
    })
    .await;
}

/// The list of device `d`, as written.
fn list(conn: &mut redis::Connection, d: usize) -> Vec<String> {
    conn.lrange(format!("list:d{d}"), 0, -1).expect("LRANGE")
}

/// Waits until every device's list holds `per_topic` entries, then checks each holds
/// exactly its messages, once each, in order.
async fn all_written_once_in_order(redis: &Redis, topics: usize, per_topic: usize) {
    let mut conn = redis.client().get_connection().expect("redis");
    let complete = eventually(Duration::from_secs(120), || {
        (0..topics)
            .all(|d| {
                conn.llen::<_, usize>(format!("list:d{d}"))
                    .is_ok_and(|n| n >= per_topic)
            })
            .then_some(())
    })
    .await;
    for d in 0..topics {
        let got = list(&mut conn, d);
        let want: Vec<String> = (0..per_topic).map(|n| payload(d, n)).collect();
        assert!(
            got == want,
            "device {d}: {} entries (complete: {}), want {per_topic} in order; first \
             difference at {:?}",
            got.len(),
            complete.is_some(),
            got.iter().zip(&want).position(|(a, b)| a != b)
        );
    }
}

/// Waits until `/readyz` says the spool takes what Redis cannot; its body.
pub(crate) async fn spilling(addr: SocketAddr) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (code, body) = get(addr, "/readyz").await;
        if code == 200 && body.contains(r#""redis":"down","spool":"active""#) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz still {code} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn broker() -> Mosquitto {
    Mosquitto::start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_outage_is_spooled_acked_and_replayed_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start();
    let broker = broker();
    let bridge = Bridge::start(&config(
        &redis,
        &broker,
        "spool-outage",
        &format!("{}{LIST_ROUTE}", spool_section(dir.path(), "")),
    ));
    let addr = http_addr(&bridge);
    assert_eq!(
        get_until(addr, "/readyz", 200).await,
        r#"{"ready":true,"mqtt":"up","redis":"up","spool":"idle"}"#
    );

    redis.stop();
    // Once Redis has been down for `after`, the spool takes over and the bridge stays ready.
    assert_eq!(
        spilling(addr).await,
        r#"{"ready":true,"mqtt":"up","redis":"down","spool":"active"}"#
    );

    let (topics, per_topic) = (200, 100);
    let mut publisher = Client::connect(&broker, "spool-outage-publisher").await;
    publisher.publish_all(messages(topics, 0..per_topic)).await;
    spooled(addr, topics * per_topic).await;
    // Every message was acked to the broker: the session holds nothing for us any more. A
    // clean restart shows it — the spool is still there, and the broker would redeliver
    // anything unacked before a marker published after the restart (nothing is spooled
    // twice: no dedup on this route).
    let mut bridge = bridge;
    assert!(bridge.terminate(WAIT).success());
    bridge.spawn();
    let addr = http_addr_after_restart(&bridge);
    spilling(addr).await;
    publisher
        .publish_all([("spool/marker/data".to_string(), b"marker".to_vec())])
        .await;
    spooled(addr, topics * per_topic + 1).await;
    assert!(
        metric(addr, "routemq_bridge_spool_bytes")
            .await
            .unwrap_or(0.0)
            > (topics * per_topic) as f64
    );

    redis.start_again();
    all_written_once_in_order(&redis, topics, per_topic).await;
    let m = metrics_until(addr, "spool drained", |m| {
        sample(m, SPOOL_MESSAGES) == Some(0.0)
    })
    .await;
    // The marker too; counted since the restart.
    assert_eq!(
        sample(&m, "routemq_bridge_spool_replayed_total"),
        Some((topics * per_topic + 1) as f64)
    );
    assert_eq!(sample(&m, "routemq_bridge_spool_dropped_total"), Some(0.0));
    // Clean under `promtool check metrics` with the spool's series (skipped loudly without it).
    crate::ops::promtool_check_metrics(&m);
    assert_eq!(
        sample(
            &m,
            r#"routemq_bridge_messages_total{route="list",outcome="written"}"#
        ),
        Some((topics * per_topic + 1) as f64)
    );
    assert_eq!(
        get_until(addr, "/readyz", 200).await,
        r#"{"ready":true,"mqtt":"up","redis":"up","spool":"idle"}"#
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_spooling_and_while_draining_loses_nothing_and_dedup_writes_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start();
    let broker = broker();
    let mut bridge = Bridge::start(&config(
        &redis,
        &broker,
        "spool-kill",
        &format!("{}{DEDUP_ROUTE}", spool_section(dir.path(), "")),
    ));
    let addr = http_addr(&bridge);
    redis.stop();
    spilling(addr).await;

    let (topics, per_topic) = (20, 200);
    let mut publisher = Client::connect(&broker, "spool-kill-publisher").await;
    publisher
        .publish_all(messages(topics, 0..per_topic / 2))
        .await;
    // Killed while it spools: part of the first half is in the spool, the rest with the
    // broker (acked or not).
    metrics_until(addr, "spooling under way", |m| {
        sample(m, SPOOL_MESSAGES).is_some_and(|n| n >= 100.0)
    })
    .await;
    bridge.kill();
    bridge.spawn();
    let addr = http_addr_after_restart(&bridge);
    publisher
        .publish_all(messages(topics, per_topic / 2..per_topic))
        .await;
    // Redeliveries of what was spooled but not yet acked are spooled again: at least all.
    metrics_until(addr, "everything spooled", |m| {
        sample(m, SPOOL_MESSAGES).is_some_and(|n| n >= (topics * per_topic) as f64)
            && sample(m, INFLIGHT) == Some(0.0)
    })
    .await;

    redis.start_again();
    let mut conn = redis.client().get_connection().expect("redis");
    // Killed while it drains.
    eventually(WAIT, || {
        (0..topics)
            .map(|d| conn.llen::<_, usize>(format!("list:d{d}")).unwrap_or(0))
            .sum::<usize>()
            .ge(&(topics * per_topic / 4))
            .then_some(())
    })
    .await
    .expect("the drain started");
    bridge.kill();
    bridge.spawn();
    all_written_once_in_order(&redis, topics, per_topic).await;
    let addr = http_addr_after_restart(&bridge);
    metrics_until(addr, "spool drained", |m| {
        sample(m, SPOOL_MESSAGES) == Some(0.0)
    })
    .await;
    assert_eq!(
        (0..topics).map(|d| list(&mut conn, d).len()).sum::<usize>(),
        topics * per_topic,
        "nothing written twice"
    );
}

/// The HTTP address the process spawned last logged.
fn http_addr_after_restart(bridge: &Bridge) -> SocketAddr {
    let log = bridge.log_text();
    let needle = "http listening on ";
    let start = log.rfind(needle).expect("http address logged") + needle.len();
    let addr: String = log[start..]
        .chars()
        .take_while(|c| !c.is_whitespace())
        .collect();
    addr.parse().expect("address")
}

fn wal_of(path: &Path) -> PathBuf {
    PathBuf::from(format!("{}-wal", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_last_record_in_the_wal_is_cut_with_a_warning_and_the_rest_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let mut redis = Redis::start();
    let broker = broker();
    // `always`: every commit is its own run of frames in the WAL, and nothing is
    // checkpointed before the kill.
    let mut bridge = Bridge::start(&config(
        &redis,
        &broker,
        "spool-torn",
        &format!(
            "{}{LIST_ROUTE}",
            spool_section(dir.path(), "fsync = \"always\"")
        ),
    ));
    let addr = http_addr(&bridge);
    redis.stop();
    spilling(addr).await;
    let mut publisher = Client::connect(&broker, "spool-torn-publisher").await;
    publisher.publish_all(messages(1, 0..49)).await;
    spooled(addr, 49).await;
    // The last record, in a commit of its own.
    publisher.publish_all(messages(1, 49..50)).await;
    spooled(addr, 50).await;
    bridge.kill();

    // Tear the last frame (the last record's commit) in the middle.
    let wal = wal_of(&path);
    let len = std::fs::metadata(&wal).expect("the WAL is there").len();
    let file = std::fs::OpenOptions::new().write(true).open(&wal).unwrap();
    file.set_len(len - 100).unwrap();
    drop(file);

    redis.start_again();
    let offset = bridge.log_text().len();
    bridge.spawn();
    assert!(
        bridge.wait_for_log_after(offset, "a frame cut short", WAIT),
        "no warning about the torn WAL; log:\n{}",
        &bridge.log_text()[offset..]
    );
    all_written_once_in_order(&redis, 1, 49).await;
    // The torn record is gone (never replayed half), and the bridge runs on.
    let addr = http_addr_after_restart(&bridge);
    metrics_until(addr, "drained", |m| sample(m, SPOOL_MESSAGES) == Some(0.0)).await;
    let mut conn = redis.client().get_connection().expect("redis");
    assert_eq!(
        list(&mut conn, 0).len(),
        49,
        "the torn record is not replayed"
    );
    publisher.publish_all(messages(1, 50..51)).await;
    eventually(WAIT, || (list(&mut conn, 0).len() == 50).then_some(()))
        .await
        .expect("the bridge goes on after the repair");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbled_last_page_is_salvaged_with_a_warning_and_the_rest_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let mut redis = Redis::start();
    let broker = broker();
    let mut bridge = Bridge::start(&config(
        &redis,
        &broker,
        "spool-garbled",
        &format!("{}{LIST_ROUTE}", spool_section(dir.path(), "")),
    ));
    let addr = http_addr(&bridge);
    redis.stop();
    spilling(addr).await;
    let mut publisher = Client::connect(&broker, "spool-garbled-publisher").await;
    // 200-byte payloads: about 17 records to a 4 KiB page.
    let n = 1000;
    let pad = "p".repeat(200);
    publisher
        .publish_all((0..n).map(|i| {
            (
                "spool/d0/data".to_string(),
                format!("{}{pad}", payload(0, i)).into_bytes(),
            )
        }))
        .await;
    spooled(addr, n).await;
    // A clean stop folds the WAL into the database file.
    assert!(bridge.terminate(WAIT).success());
    assert!(
        !wal_of(&path).exists(),
        "the WAL is folded in at a clean stop"
    );

    // Garble the file's last page.
    let bytes = std::fs::read(&path).unwrap();
    let page = 4096;
    assert!(bytes.len() >= 3 * page, "{} bytes", bytes.len());
    let mut damaged = bytes.clone();
    let from = bytes.len() - page;
    for (i, b) in damaged[from..].iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37).wrapping_add(11);
    }
    std::fs::write(&path, damaged).unwrap();

    redis.start_again();
    let offset = bridge.log_text().len();
    bridge.spawn();
    assert!(
        bridge.wait_for_log_after(offset, "the database file is damaged", WAIT),
        "no warning about the damaged page; log:\n{}",
        &bridge.log_text()[offset..]
    );
    let addr = http_addr_after_restart(&bridge);
    metrics_until(addr, "drained", |m| sample(m, SPOOL_MESSAGES) == Some(0.0)).await;
    let mut conn = redis.client().get_connection().expect("redis");
    let got = list(&mut conn, 0);
    // What was readable is replayed, in order, each once: the records of the garbled page
    // (the newest) are missing, nothing else.
    let want: Vec<String> = (0..got.len())
        .map(|i| format!("{}{pad}", payload(0, i)))
        .collect();
    assert_eq!(got, want, "a prefix, in order");
    assert!(
        got.len() >= n - 20 && got.len() < n,
        "{} of {n} replayed: one page's worth lost",
        got.len()
    );
    // The bridge runs on (no crash loop): a new message still goes through.
    publisher
        .publish_all([("spool/d1/data".to_string(), b"after".to_vec())])
        .await;
    eventually(WAIT, || (list(&mut conn, 1) == ["after"]).then_some(()))
        .await
        .expect("the bridge goes on after the repair");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_with_backpressure_stops_acking_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start();
    let broker = broker();
    let bridge = Bridge::start(&config(
        &redis,
        &broker,
        "spool-backpressure",
        &format!(
            "{}{LIST_ROUTE}",
            spool_section(
                dir.path(),
                "max_size = \"64KiB\"\non_full = \"backpressure\""
            )
        ),
    ));
    let addr = http_addr(&bridge);
    redis.stop();
    spilling(addr).await;
    let (topics, per_topic) = (10, 20);
    let pad = "x".repeat(1000);
    let mut publisher = Client::connect(&broker, "spool-backpressure-publisher").await;
    let all: Vec<(String, Vec<u8>)> = messages(topics, 0..per_topic)
        .into_iter()
        .map(|(t, p)| (t, [p, pad.as_bytes().to_vec()].concat()))
        .collect();
    let size = "spool/d0/data".len() + all[0].1.len() + 32;
    let fit = 64 * 1024 / size;
    publisher.publish_all(all.clone()).await;
    // The spool fills up to max_size and then holds the next message unacked.
    let m = metrics_until(addr, "spool full, a message held", |m| {
        sample(m, SPOOL_MESSAGES) == Some(fit as f64)
            && sample(m, INFLIGHT).is_some_and(|n| n >= 1.0)
    })
    .await;
    assert!(sample(&m, "routemq_bridge_spool_bytes").unwrap() <= 65536.0);
    assert_eq!(sample(&m, "routemq_bridge_spool_dropped_total"), Some(0.0));
    redis.start_again();
    // Every message, spooled or held by the broker, lands once, in order per topic.
    let mut want = Vec::new();
    let mut conn = redis.client().get_connection().expect("redis");
    let complete = eventually(Duration::from_secs(120), || {
        (0..topics)
            .all(|d| {
                conn.llen::<_, usize>(format!("list:d{d}"))
                    .is_ok_and(|n| n >= per_topic)
            })
            .then_some(())
    })
    .await;
    assert!(complete.is_some(), "not every message arrived");
    for d in 0..topics {
        want.clear();
        for n in 0..per_topic {
            want.push(format!("{}{pad}", payload(d, n)));
        }
        assert_eq!(list(&mut conn, d), want, "device {d}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_with_drop_oldest_counts_and_dead_letters_the_drops() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start();
    let broker = broker();
    let bridge = Bridge::start(&config(
        &redis,
        &broker,
        "spool-drop",
        &format!(
            "{}{LIST_ROUTE}",
            spool_section(
                dir.path(),
                "max_size = \"64KiB\"\non_full = \"drop_oldest\""
            )
        ),
    ));
    let addr = http_addr(&bridge);
    redis.stop();
    spilling(addr).await;
    let n = 200;
    let pad = "x".repeat(1000);
    let mut publisher = Client::connect(&broker, "spool-drop-publisher").await;
    let all: Vec<(String, Vec<u8>)> = messages(1, 0..n)
        .into_iter()
        .map(|(t, p)| (t, [p, pad.as_bytes().to_vec()].concat()))
        .collect();
    let size = "spool/d0/data".len() + all[0].1.len() + 32;
    let fit = 64 * 1024 / size;
    publisher.publish_all(all).await;
    let m = metrics_until(addr, "every message taken, the oldest dropped", |m| {
        sample(m, SPOOL_MESSAGES) == Some(fit as f64) && sample(m, INFLIGHT) == Some(0.0)
    })
    .await;
    let dropped = n - fit;
    assert_eq!(
        sample(&m, "routemq_bridge_spool_dropped_total"),
        Some(dropped as f64)
    );

    redis.start_again();
    let mut conn = redis.client().get_connection().expect("redis");
    // The newest `fit` are written, in order.
    eventually(Duration::from_secs(60), || {
        (list(&mut conn, 0).len() >= fit).then_some(())
    })
    .await
    .expect("the kept messages are replayed");
    let want: Vec<String> = (dropped..n)
        .map(|i| format!("{}{pad}", payload(0, i)))
        .collect();
    assert_eq!(list(&mut conn, 0), want);
    // Each dropped one has its dead-letter record: topic and times, reason spool_full.
    let records: Vec<String> = eventually(Duration::from_secs(30), || {
        let records: Vec<String> = conn.lrange("dead_letter", 0, -1).ok()?;
        (records.len() >= dropped).then_some(records)
    })
    .await
    .expect("dead letters of the drops");
    assert_eq!(records.len(), dropped);
    for record in &records {
        let v: serde_json::Value = serde_json::from_str(record).unwrap();
        assert_eq!(v["reason"], "spool_full", "{record}");
        assert_eq!(v["topic"], "spool/d0/data", "{record}");
        assert!(
            v["detail"]
                .as_str()
                .unwrap()
                .contains("received at unix ms"),
            "{record}"
        );
    }
    let m = metrics_until(addr, "dead letters counted", |m| {
        sample(
            m,
            r#"routemq_bridge_dead_letters_total{reason="spool_full"}"#,
        ) == Some(dropped as f64)
    })
    .await;
    assert_eq!(sample(&m, SPOOL_MESSAGES), Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_only_route_keeps_flowing_while_the_spool_fills() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start();
    let broker = broker();
    // One topic, two routes: a forward that needs no Redis, and a write that does.
    let routes = r#"
[[routes]]
name = "forward"
topic = "spool/{device}/data"
payload = "text"
[[routes.actions]]
op = "mqtt_publish"
topic = "out/{device}"

[[routes]]
name = "list"
topic = "spool/{device}/data"
payload = "text"
[[routes.actions]]
op = "rpush"
key = "list:{device}"
"#;
    let bridge = Bridge::start(&config(
        &redis,
        &broker,
        "spool-forward",
        &format!("{}{routes}", spool_section(dir.path(), "")),
    ));
    let addr = http_addr(&bridge);
    let mut subscriber = Client::connect(&broker, "spool-forward-subscriber").await;
    subscriber.subscribe("out/#").await;
    redis.stop();
    spilling(addr).await;
    let (topics, per_topic) = (5, 40);
    let mut publisher = Client::connect(&broker, "spool-forward-publisher").await;
    publisher.publish_all(messages(topics, 0..per_topic)).await;
    let mut forwarded = 0;
    while forwarded < topics * per_topic {
        subscriber
            .next_message(WAIT)
            .await
            .expect("every forward arrives while Redis is down");
        forwarded += 1;
    }
    spooled(addr, topics * per_topic).await;
    let m = metrics_until(addr, "forwards counted", |_| true).await;
    assert_eq!(
        sample(
            &m,
            r#"routemq_bridge_messages_total{route="forward",outcome="written"}"#
        ),
        Some((topics * per_topic) as f64)
    );
    redis.start_again();
    all_written_once_in_order(&redis, topics, per_topic).await;
}

#[test]
fn check_prints_the_spool_and_names_the_key_of_a_bad_value() {
    let redis_and_broker =
        "[mqtt]\nurl = \"mqtt://127.0.0.1:1\"\n[redis]\nurl = \"redis://127.0.0.1:1\"\n";
    let (code, out) = crate::bridge::check_config(&format!(
        "{redis_and_broker}[spool]\npath = \"/tmp/x/spool.db\"\nmax_size = \"1MiB\"\non_full = \"drop_oldest\"\nfsync = \"always\"\n"
    ));
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("spool /tmp/x/spool.db (max_size 1048576 bytes, on_full drop_oldest, fsync always, after 5s)"),
        "{out}"
    );
    let (code, out) = crate::bridge::check_config(&format!(
        "{redis_and_broker}[spool]\npath = \"/tmp/x/spool.db\"\non_full = \"block\"\nbatch_window = \"0s\"\nmax_size = 10\n"
    ));
    assert_ne!(code, Some(0), "{out}");
    for key in ["spool.on_full", "spool.batch_window", "spool.max_size"] {
        assert!(out.contains(key), "{key} in:\n{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_refused_during_the_outage_does_not_hold_back_the_acks_of_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start();
    let broker = broker();
    // A forward route that reads JSON: an invalid payload is dead-lettered, which needs Redis.
    let routes = format!(
        r#"
[[routes]]
name = "forward"
topic = "json/{{device}}"
[[routes.actions]]
op = "mqtt_publish"
topic = "out/{{device}}"
{LIST_ROUTE}"#
    );
    let bridge = Bridge::start(&config(
        &redis,
        &broker,
        "spool-refused",
        &format!("{}{routes}", spool_section(dir.path(), "")),
    ));
    let addr = http_addr(&bridge);
    redis.stop();
    spilling(addr).await;
    let mut publisher = Client::connect(&broker, "spool-refused-publisher").await;
    publisher
        .publish_all([("json/d9".to_string(), b"not json".to_vec())])
        .await;
    publisher.publish_all(messages(3, 0..10)).await;
    // Everything after the invalid message is spooled and acked: its dead-letter record was
    // kept in the spool instead of waiting for Redis.
    spooled(addr, 30).await;

    redis.start_again();
    all_written_once_in_order(&redis, 3, 10).await;
    let mut conn = redis.client().get_connection().expect("redis");
    let records: Vec<String> = eventually(WAIT, || {
        let records: Vec<String> = conn.lrange("dead_letter", 0, -1).ok()?;
        (!records.is_empty()).then_some(records)
    })
    .await
    .expect("the kept dead-letter record is written once Redis is back");
    assert_eq!(records.len(), 1, "{records:?}");
    let v: serde_json::Value = serde_json::from_str(&records[0]).unwrap();
    assert_eq!(v["reason"], "invalid_json");
    assert_eq!(v["topic"], "json/d9");
    assert_eq!(v["route"], "forward");
    assert_eq!(v["payload"], "not json");
}

/// A second outage after a drain that emptied the spool is replayed in arrival order too:
/// ids only grow (AUTOINCREMENT: SQLite would otherwise hand out ids from 1 again once the
/// table is empty), and the drain's cursor starts over once the spool is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_outage_after_a_full_drain_is_replayed_in_arrival_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start();
    let broker = broker();
    let bridge = Bridge::start(&config(
        &redis,
        &broker,
        "spool-twice",
        &format!("{}{LIST_ROUTE}", spool_section(dir.path(), "")),
    ));
    let addr = http_addr(&bridge);
    get_until(addr, "/readyz", 200).await;
    let topics = 2;
    let mut publisher = Client::connect(&broker, "spool-twice-publisher").await;

    // Outage 1: 2 x 20 records (ids 1..=40), drained completely.
    redis.stop();
    spilling(addr).await;
    publisher.publish_all(messages(topics, 0..20)).await;
    spooled(addr, topics * 20).await;
    redis.start_again();
    all_written_once_in_order(&redis, topics, 20).await;
    metrics_until(addr, "first drain done", |m| {
        sample(m, SPOOL_MESSAGES) == Some(0.0)
    })
    .await;

    // Outage 2 (Redis restarts empty: no persistence in the harness): 2 x 50 records.
    redis.stop();
    spilling(addr).await;
    publisher.publish_all(messages(topics, 20..70)).await;
    spooled(addr, topics * 50).await;
    redis.start_again();
    let mut conn = redis.client().get_connection().expect("redis");
    eventually(Duration::from_secs(60), || {
        (0..topics)
            .all(|d| list(&mut conn, d).len() >= 50)
            .then_some(())
    })
    .await
    .expect("second drain");
    for d in 0..topics {
        let want: Vec<String> = (20..70).map(|n| payload(d, n)).collect();
        assert_eq!(list(&mut conn, d), want, "device {d}: arrival order");
    }
}

/// `drop_oldest` still bounds the spool after an earlier drain: it drops only records the
/// replay has not taken (`id > Ledger::replay_cursor`), which holds for the next outage's
/// records only while ids keep growing and the cursor is reset once the spool is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_oldest_still_bounds_the_spool_after_an_earlier_drain() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start();
    let broker = broker();
    let bridge = Bridge::start(&config(
        &redis,
        &broker,
        "spool-drop-twice",
        &format!(
            "{}{LIST_ROUTE}",
            spool_section(
                dir.path(),
                "max_size = \"64KiB\"\non_full = \"drop_oldest\""
            )
        ),
    ));
    let addr = http_addr(&bridge);
    get_until(addr, "/readyz", 200).await;
    let mut publisher = Client::connect(&broker, "spool-drop-twice-publisher").await;

    // Outage 1: 300 small records, drained.
    redis.stop();
    spilling(addr).await;
    publisher.publish_all(messages(3, 0..100)).await;
    spooled(addr, 300).await;
    redis.start_again();
    all_written_once_in_order(&redis, 3, 100).await;
    metrics_until(addr, "first drain done", |m| {
        sample(m, SPOOL_MESSAGES) == Some(0.0)
    })
    .await;

    // Outage 2: 200 records of ~1 KiB on one topic; 64 KiB hold about 60.
    redis.stop();
    spilling(addr).await;
    let n = 200;
    let pad = "x".repeat(1000);
    let all: Vec<(String, Vec<u8>)> = messages(1, 100..100 + n)
        .into_iter()
        .map(|(t, p)| (t, [p, pad.as_bytes().to_vec()].concat()))
        .collect();
    publisher.publish_all(all).await;
    let m = metrics_until(addr, "every message taken", |m| {
        let held = sample(m, SPOOL_MESSAGES).unwrap_or(0.0);
        let dropped = sample(m, "routemq_bridge_spool_dropped_total").unwrap_or(0.0);
        held + dropped >= n as f64 && sample(m, INFLIGHT) == Some(0.0)
    })
    .await;
    let bytes = sample(&m, "routemq_bridge_spool_bytes").unwrap_or(0.0);
    assert!(
        bytes <= (64 * 1024) as f64,
        "spool_bytes {bytes} > max_size 65536; spool_messages {:?}, dropped {:?}",
        sample(&m, SPOOL_MESSAGES),
        sample(&m, "routemq_bridge_spool_dropped_total")
    );
}

/// A record whose topic bytes are garbled into invalid UTF-8 (damage `PRAGMA quick_check`
/// does not see) does not stop the start — which would be a crash loop: it goes to the kept
/// dead letters (`internal_error`) and the other records stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_with_a_garbled_topic_does_not_stop_the_start() {
    use routemq_bridge::spool::config::{Fsync, OnFull};
    use routemq_bridge::spool::store::{SharedLedger, Store};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let config = routemq_bridge::spool::SpoolConfig {
        path: path.clone(),
        max_size: 1 << 20,
        on_full: OnFull::Backpressure,
        fsync: Fsync::Always,
        batch_window: Duration::from_millis(50),
        after: Duration::from_secs(1),
    };
    {
        let ledger = SharedLedger::default();
        let store = Store::open(&config, ledger, Default::default()).expect("first open");
        for n in 0..3 {
            store
                .append(routemq_bridge::spool::store::Record {
                    topic: "spool/d0/data".into(),
                    payload: format!("{n}").into_bytes(),
                    qos: 1,
                    received_ms: 0,
                    props: None,
                })
                .await
                .expect("append");
        }
        store.close().await;
    }
    // The damage: the middle record's topic bytes garbled (same length, same page layout).
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute(
            "UPDATE messages SET topic = CAST(x'ff706f6f6c2f64302f64617461' AS TEXT) WHERE id = 2",
            [],
        )
        .unwrap();
    }
    let ledger = SharedLedger::default();
    let opened = Store::open(&config, ledger.clone(), Default::default());
    let store = match opened {
        Ok(store) => store,
        Err(e) => panic!("a garbled topic stops the spool from opening (a crash loop): {e}"),
    };
    {
        let ledger = routemq_bridge::spool::store::lock(&ledger);
        assert_eq!((ledger.messages, ledger.letters), (2, 1));
    }
    let read = store.read(0, 10).await.expect("read");
    let payloads: Vec<&[u8]> = read.iter().map(|s| &s.record.payload[..]).collect();
    assert_eq!(payloads, vec![&b"0"[..], &b"2"[..]]);
    let letters = store.take_letters(10).await.expect("letters");
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].reason, "internal_error");
}

/// A spool file locked by another process at open ("database is locked": an operator's
/// `sqlite3` session) is not damage: the open fails naming `spool.path` and the file, with
/// its acked records, is left as it is (never moved aside). The same holds for a full disk,
/// an I/O error or a permission problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_file_at_open_fails_the_start_and_is_not_set_aside() {
    use routemq_bridge::spool::config::{Fsync, OnFull};
    use routemq_bridge::spool::store::{lock, SharedLedger, Store};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let config = routemq_bridge::spool::SpoolConfig {
        path: path.clone(),
        max_size: 1 << 20,
        on_full: OnFull::Backpressure,
        fsync: Fsync::Always,
        batch_window: Duration::from_millis(50),
        after: Duration::from_secs(1),
    };
    {
        let store =
            Store::open(&config, SharedLedger::default(), Default::default()).expect("first open");
        for n in 0..3 {
            store
                .append(routemq_bridge::spool::store::Record {
                    topic: "spool/d0/data".into(),
                    payload: format!("{n}").into_bytes(),
                    qos: 1,
                    received_ms: 0,
                    props: None,
                })
                .await
                .expect("append");
        }
        store.close().await;
    }
    // Another process holds the file (an operator's `sqlite3` session, as the store's
    // module doc suggests, or a second bridge on the same path): "database is locked".
    let other = rusqlite::Connection::open(&path).unwrap();
    other
        .execute_batch("PRAGMA locking_mode = EXCLUSIVE; BEGIN EXCLUSIVE;")
        .unwrap();
    let ledger = SharedLedger::default();
    let opened = Store::open(&config, ledger.clone(), Default::default());
    let held = lock(&ledger).messages;
    let aside: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("corrupt"))
        .collect();
    let error = opened
        .err()
        .map(|e| e.to_string())
        .unwrap_or_else(|| panic!("the open of a locked file succeeded with {held} of 3 records"));
    assert!(error.contains("spool.path"), "{error}");
    assert!(aside.is_empty(), "moved aside: {aside:?}");
    // Once the other process lets go, the next start finds every record.
    drop(other);
    let ledger = SharedLedger::default();
    Store::open(&config, ledger.clone(), Default::default()).expect("open once free");
    assert_eq!(lock(&ledger).messages, 3);
}

/// A delete that fails (here the file's write lock is held by another process for a while)
/// is retried with backoff: the records it names are not replayed again meanwhile, so each
/// message is written once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_records_whose_delete_failed_are_not_replayed_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start();
    let broker = broker();
    let bridge = Bridge::start(&config(
        &redis,
        &broker,
        "spool-delete-fails",
        &format!("{}{LIST_ROUTE}", spool_section(dir.path(), "")),
    ));
    let addr = http_addr(&bridge);
    get_until(addr, "/readyz", 200).await;
    let mut publisher = Client::connect(&broker, "spool-delete-fails-publisher").await;
    redis.stop();
    spilling(addr).await;
    publisher.publish_all(messages(2, 0..20)).await;
    spooled(addr, 40).await;

    // Another process takes the write lock: the drain still reads (WAL), its deletes fail
    // (SQLITE_BUSY after the 5 s busy timeout).
    let other = hold_write_lock(dir.path());
    let offset = bridge.log_text().len();
    redis.start_again();
    // Two failed deletes: time enough for the drain to replay everything again if it forgot
    // what it had replayed.
    let failed_twice = eventually(Duration::from_secs(60), || {
        let log = bridge.log_text();
        (log.get(offset..)
            .unwrap_or("")
            .matches("the store failed")
            .count()
            >= 2)
            .then_some(())
    })
    .await;
    assert!(
        failed_twice.is_some(),
        "no failed delete:\n{}",
        bridge.log_text()
    );
    other.execute_batch("ROLLBACK").unwrap();
    drop(other);
    metrics_until(addr, "drained", |m| sample(m, SPOOL_MESSAGES) == Some(0.0)).await;
    all_written_once_in_order(&redis, 2, 20).await;
    let mut conn = redis.client().get_connection().expect("redis");
    for d in 0..2 {
        assert_eq!(
            list(&mut conn, d).len(),
            20,
            "device {d}: written more than once"
        );
    }
}

/// A message whose append fails (here the file's write lock is held by another process for
/// a while) while older messages of its topic are spooled is not sent past them: it stays
/// unacked and its append is tried again, so it is spooled behind them once the file is free
/// and the topic is replayed in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_append_behind_spooled_messages_of_its_topic_is_retried_not_sent_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start();
    let broker = broker();
    let bridge = Bridge::start(&config(
        &redis,
        &broker,
        "spool-append-fails",
        &format!("{}{LIST_ROUTE}", spool_section(dir.path(), "")),
    ));
    let addr = http_addr(&bridge);
    get_until(addr, "/readyz", 200).await;
    let mut publisher = Client::connect(&broker, "spool-append-fails-publisher").await;
    redis.stop();
    spilling(addr).await;
    publisher.publish_all(messages(1, 0..10)).await;
    spooled(addr, 10).await;

    // Another process takes the write lock: the next append fails (SQLITE_BUSY after the
    // 5 s busy timeout).
    let other = hold_write_lock(dir.path());
    let offset = bridge.log_text().len();
    publisher.publish_all(messages(1, 10..11)).await;
    assert!(
        bridge.wait_for_log_after(offset, "the store failed", WAIT),
        "no failed append:\n{}",
        bridge.log_text()
    );
    other.execute_batch("ROLLBACK").unwrap();
    drop(other);
    // Spooled behind the others once the file is free (not waiting for Redis on its own).
    spooled(addr, 11).await;
    redis.start_again();
    all_written_once_in_order(&redis, 1, 11).await;
}
