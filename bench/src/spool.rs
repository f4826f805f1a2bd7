//! The spool part (`--parts spool`, spec §6.2): the bridge spools N messages while its Redis
//! is not there yet, then Redis starts and the spool drains while live traffic on other
//! topics goes on; the live p99 during the drain is compared with the same traffic after
//! it, in the same run.
//!
//! Live messages use devices the spooled load does not (`dev-<devices>` and up), so they go
//! straight to Redis during the drain (a topic with messages spooled would join the spool's
//! tail, to keep its order), and start once the drain has (first record replayed). Only
//! live messages sent while the drain ran count for the "during" figure; the run reports
//! how many that were.

use std::time::{Duration, Instant};

use crate::report::SpoolRow;
use crate::store::{Store, DEAD_LETTER, MSG_PREFIX};
use crate::{mqtt, percentile, services, Bench, Res, RouteKind};

/// `GET path` on the bridge's HTTP endpoint: the body.
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(
        &([127, 0, 0, 1], port).into(),
        Duration::from_secs(1),
    )
    .ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    Some(body)
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Scrapes `/metrics` every 20 ms until `check` holds; when it did.
async fn wait_metrics(port: u16, timeout: Duration, check: impl Fn(&str) -> bool) -> Res<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(text) = http_get(port, "/metrics") {
            if check(&text) {
                return Ok(Instant::now());
            }
        }
        if Instant::now() > deadline {
            return Err("the bridge's metrics did not get there in time".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const SPOOL_MESSAGES: &str = "routemq_bridge_spool_messages";
const REPLAYED: &str = "routemq_bridge_spool_replayed_total";
const INFLIGHT: &str = "routemq_bridge_inflight_messages";

impl Bench {
    pub(crate) async fn spool(&mut self) -> Res<SpoolRow> {
        let (n, devices) = (self.args.messages, self.args.devices);
        let rate = self.args.spool_rate;
        let live = rate * self.args.live_seconds;
        let redis_port = services::free_port()?;
        let client_id = "bench-spool";
        mqtt::create_session(self.broker.port, client_id, mqtt::FILTER).await?;
        let (config, http) = self.write_config(
            client_id,
            "",
            &format!("url = \"redis://127.0.0.1:{redis_port}/0\""),
            &format!(
                "\n[spool]\npath = \"{spool}\"\nafter = \"1s\"\nfsync = \"{fsync}\"\n{routes}",
                fsync = self.args.spool_fsync,
                spool = self.dir.path().join("spool.db").display(),
                routes = RouteKind::OneSet.route_toml("sliding_window", false),
            ),
        )?;
        let mut bridge = self.spawn_bridge(&config, "spool")?;
        bridge.wait_for_log("subscribed", Duration::from_secs(15))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !http_get(http, "/readyz").is_some_and(|b| b.contains(r#""spool":"active""#)) {
            if Instant::now() > deadline {
                return Err("the bridge did not start spooling".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // Append: N messages published (each PUBACKed by the broker) until all are in the
        // spool and acked by the bridge.
        let started = Instant::now();
        mqtt::preload(self.broker.port, 0, n, devices).await?;
        let spooled = wait_metrics(http, Duration::from_secs(600), |m| {
            metric(m, SPOOL_MESSAGES) == Some(n as f64) && metric(m, INFLIGHT) == Some(0.0)
        })
        .await?;
        let append_s = spooled.duration_since(started).as_secs_f64();
        let spool_file_bytes = std::fs::metadata(self.dir.path().join("spool.db"))
            .map(|m| m.len())
            .unwrap_or(0);

        // Drain, with live traffic on fresh topics meanwhile. The live traffic starts once
        // the drain has: before the bridge notices Redis is back, live messages are spooled
        // too, and their topics would then (rightly) wait for the drain.
        let mut publisher = mqtt::Paced::connect(self.broker.port).await?;
        let redis = services::redis_on(redis_port)?;
        let mut store = Store::connect(redis_port).await?;
        let probe = store.probe(n, 2 * live).await?;
        let drain_start = wait_metrics(http, Duration::from_secs(60), |m| {
            metric(m, REPLAYED).is_some_and(|r| r > 0.0)
        })
        .await?;
        let watch = tokio::spawn(wait_metrics(http, Duration::from_secs(600), |m| {
            metric(m, SPOOL_MESSAGES) == Some(0.0)
        }));
        let during = publisher
            .run_offset(n, live, rate, devices, devices)
            .await?;
        let drain_end = watch.await??;
        let after = publisher
            .run_offset(n + live, live, rate, devices, devices)
            .await?;
        let mut problems = Vec::new();
        if !probe
            .wait_seen(0, 2 * live as usize, Duration::from_secs(30))
            .await
        {
            problems.push(format!(
                "only {} of {} live messages became visible",
                probe.seen_in(0, 2 * live as usize),
                2 * live
            ));
        }
        publisher
            .wait_acked(2 * live, Duration::from_secs(30))
            .await?;
        publisher.close().await?;
        let seen = probe.times(0, 2 * live as usize);
        probe.stop();
        let latencies =
            |sent: &[Instant], seen: &[Option<Instant>], keep: &dyn Fn(Instant) -> bool| {
                let mut l: Vec<Duration> = sent
                    .iter()
                    .zip(seen)
                    .filter(|(s, _)| keep(**s))
                    .filter_map(|(s, v)| v.map(|v| v.saturating_duration_since(*s)))
                    .collect();
                l.sort();
                l
            };
        let overlapping = latencies(&during, &seen[..live as usize], &|s| {
            s >= drain_start && s <= drain_end
        });
        let baseline = latencies(&after, &seen[live as usize..], &|_| true);

        let accounted = store.count(&format!("{MSG_PREFIX}*")).await?;
        if accounted != n + 2 * live {
            problems.push(format!(
                "{accounted} message keys in Redis for {} published",
                n + 2 * live
            ));
        }
        let dead = store.llen(DEAD_LETTER).await?;
        if dead > 0 {
            problems.push(format!("{dead} dead letters"));
        }
        problems.extend(bridge.warnings().into_iter().filter(|w| {
            // Expected here: Redis is not there at first, then the spool takes over.
            !w.contains("waiting for Redis")
                && !w.contains("Redis cannot take writes")
                && !w.contains("routemq_redis")
        }));
        let status = bridge.terminate(Duration::from_secs(20))?;
        if !status.success() {
            problems.push(format!("the bridge exited with {status}"));
        }
        let left = self.leftover(client_id).await?;
        if left > 0 {
            problems.push(format!("{left} messages left unacked in the broker"));
        }
        drop(redis);
        let drain_s = drain_end.duration_since(drain_start).as_secs_f64();
        Ok(SpoolRow {
            messages: n,
            fsync: self.args.spool_fsync.clone(),
            append_s,
            append_rate: n as f64 / append_s,
            spool_file_bytes,
            drain_s,
            replay_rate: n as f64 / drain_s,
            live_rate: rate,
            during_count: overlapping.len() as u64,
            during_p50_ms: percentile(&overlapping, 50.0),
            during_p99_ms: percentile(&overlapping, 99.0),
            baseline_p50_ms: percentile(&baseline, 50.0),
            baseline_p99_ms: percentile(&baseline, 99.0),
            accounted: accounted == n + 2 * live,
            problems,
        })
    }
}
