//! The result of a run: one table for the terminal, the same as JSON for the record, and
//! the spec §11 targets checked against it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::procstat::mib;
use crate::Res;

/// Spec §11.
const MIN_ONE_SET_RATIO: f64 = 0.8;
const MIN_FULL_RATIO: f64 = 0.5;
const MAX_P99_MS: f64 = 2.0;
const TARGET_RATE: u64 = 5000;
const MAX_LOAD_RSS_MIB: f64 = 16.0;
const MAX_IDLE_RSS_MIB: f64 = 10.0;
/// "Idle CPU ≈ 0": under 1 % of one core.
const MAX_IDLE_CPU_SHARE: f64 = 0.01;

/// CPU seconds the rest of the system spent during a drain.
#[derive(Clone, Copy, Debug, Default)]
pub struct OthersCpu {
    pub broker_s: f64,
    pub redis_s: f64,
    /// The bench process itself, for (a), where it is the subscriber.
    pub subscriber_s: Option<f64>,
}

impl OthersCpu {
    pub fn since(&self, earlier: &OthersCpu) -> OthersCpu {
        OthersCpu {
            broker_s: self.broker_s - earlier.broker_s,
            redis_s: self.redis_s - earlier.redis_s,
            subscriber_s: self
                .subscriber_s
                .zip(earlier.subscriber_s)
                .map(|(a, b)| a - b),
        }
    }
}

pub struct DrainRow {
    pub name: String,
    pub short: String,
    pub messages: u64,
    /// How fast the load generator filled the queue (PUBACKed), for context.
    pub preload_rate: f64,
    pub seconds: f64,
    pub rate: f64,
    /// The bridge's CPU seconds (b, c).
    pub cpu_s: Option<f64>,
    pub others: OthersCpu,
    /// Redis's own account of the drain: (command, calls, total µs).
    pub redis_commands: Vec<(String, u64, u64)>,
    pub peak_rss_kib: Option<u64>,
    pub hwm_kib: Option<u64>,
    /// Messages received (a) or message keys in Redis (b, c).
    pub accounted: u64,
    pub dead_letters: u64,
    pub left_in_broker: u64,
    pub outcomes: Option<BTreeMap<String, u64>>,
    pub exit_ok: bool,
    pub problems: Vec<String>,
}

impl DrainRow {
    fn accounted_for(&self) -> bool {
        let outcomes_ok = self.outcomes.as_ref().is_none_or(|o| {
            o.is_empty() || (o.len() == 1 && o.get("written") == Some(&self.messages))
        });
        self.accounted == self.messages
            && self.dead_letters == 0
            && self.left_in_broker == 0
            && outcomes_ok
            && self.exit_ok
            && self.problems.is_empty()
    }
}

pub struct LiveRow {
    pub route: String,
    pub rate: u64,
    pub achieved_rate: f64,
    pub sent: u64,
    pub seen: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub peak_rss_kib: u64,
    pub cpu_s: f64,
}

/// `--parts spool`: the spool's append and replay rates, and live latency during its drain.
pub struct SpoolRow {
    pub messages: u64,
    /// The spool's `fsync` policy.
    pub fsync: String,
    pub append_s: f64,
    pub append_rate: f64,
    pub spool_file_bytes: u64,
    pub drain_s: f64,
    pub replay_rate: f64,
    pub live_rate: u64,
    /// Live messages sent while the drain ran, and their latencies.
    pub during_count: u64,
    pub during_p50_ms: f64,
    pub during_p99_ms: f64,
    /// The same traffic after the drain.
    pub baseline_p50_ms: f64,
    pub baseline_p99_ms: f64,
    pub accounted: bool,
    pub problems: Vec<String>,
}

/// Spec §6.2 / issue 15: live p99 during a drain within this factor of p99 without one.
pub const MAX_DRAIN_P99_FACTOR: f64 = 3.0;

pub struct IdleRow {
    pub when: String,
    pub rss_kib: u64,
    pub cpu_s: f64,
    pub window_s: f64,
}

pub struct Report {
    pub messages: u64,
    pub devices: u64,
    pub broker_inflight: u16,
    pub machine: String,
    pub drain: Vec<DrainRow>,
    pub live: Vec<LiveRow>,
    pub idle: Vec<IdleRow>,
    pub spool: Option<SpoolRow>,
    pub problems: Vec<String>,
    pub wall_s: f64,
    /// 1-minute load average at the start and end of the run.
    pub load_start: String,
    pub load_end: String,
}

fn check(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

impl Report {
    pub fn new(messages: u64, devices: u64, broker_inflight: u16, machine: String) -> Report {
        Report {
            messages,
            devices,
            broker_inflight,
            machine,
            drain: Vec::new(),
            live: Vec::new(),
            idle: Vec::new(),
            spool: None,
            problems: Vec::new(),
            wall_s: 0.0,
            load_start: String::new(),
            load_end: String::new(),
        }
    }

    fn baseline(&self) -> Option<f64> {
        self.drain.iter().find(|d| d.short == "a").map(|d| d.rate)
    }

    fn ratio(&self, short: &str) -> Option<f64> {
        let base = self.baseline()?;
        self.drain
            .iter()
            .find(|d| d.short == short)
            .map(|d| d.rate / base)
    }

    pub fn all_accounted(&self) -> bool {
        self.drain.iter().all(DrainRow::accounted_for)
            && self.live.iter().all(|l| l.seen == l.sent)
            && self
                .spool
                .as_ref()
                .is_none_or(|s| s.accounted && s.problems.is_empty())
            && self.problems.is_empty()
    }

    /// Each §11 target with its measured value; `None` when this run did not measure it.
    fn targets(&self) -> Vec<(String, Option<bool>, String)> {
        let mut t = Vec::new();
        for (short, min) in [("b", MIN_ONE_SET_RATIO), ("c", MIN_FULL_RATIO)] {
            let r = self.ratio(short);
            t.push((
                format!("({short})/(a) drain ratio >= {min}"),
                r.map(|r| r >= min),
                r.map(|r| format!("{r:.2}")).unwrap_or_default(),
            ));
        }
        for row in self.live.iter().filter(|l| l.rate == TARGET_RATE) {
            t.push((
                format!(
                    "({}) p99 <= {MAX_P99_MS} ms at {TARGET_RATE} msg/s",
                    row.route
                ),
                Some(row.p99_ms <= MAX_P99_MS),
                format!("{:.2} ms", row.p99_ms),
            ));
            t.push((
                format!(
                    "({}) RSS <= {MAX_LOAD_RSS_MIB} MiB at {TARGET_RATE} msg/s",
                    row.route
                ),
                Some(mib(row.peak_rss_kib) <= MAX_LOAD_RSS_MIB),
                format!("{:.1} MiB", mib(row.peak_rss_kib)),
            ));
        }
        for idle in self.idle.iter().filter(|i| i.window_s > 0.0) {
            t.push((
                format!("{} idle RSS <= {MAX_IDLE_RSS_MIB} MiB", idle.when),
                Some(mib(idle.rss_kib) <= MAX_IDLE_RSS_MIB),
                format!("{:.1} MiB", mib(idle.rss_kib)),
            ));
            t.push((
                format!("{} idle CPU ~ 0", idle.when),
                Some(idle.cpu_s <= MAX_IDLE_CPU_SHARE * idle.window_s),
                format!("{:.2} s in {:.0} s", idle.cpu_s, idle.window_s),
            ));
        }
        if let Some(s) = &self.spool {
            t.push((
                format!("spool: live p99 during a drain <= {MAX_DRAIN_P99_FACTOR} x without"),
                Some(s.during_p99_ms <= MAX_DRAIN_P99_FACTOR * s.baseline_p99_ms),
                format!(
                    "{:.2} ms vs {:.2} ms ({:.1} x)",
                    s.during_p99_ms,
                    s.baseline_p99_ms,
                    s.during_p99_ms / s.baseline_p99_ms
                ),
            ));
        }
        t.push((
            "every message accounted for".into(),
            Some(self.all_accounted()),
            String::new(),
        ));
        t
    }

    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\nrouteMQ-bridge benchmark: {} QoS 1 messages over {} devices, mosquitto \
             max_inflight_messages {}\nmachine: {}\n",
            self.messages, self.devices, self.broker_inflight, self.machine
        );
        if !self.drain.is_empty() {
            let _ = writeln!(
                s,
                "{:<48} {:>9} {:>6} {:>6} {:>25} {:>9} {:>9}  accounted",
                "drain of a preloaded queue",
                "msg/s",
                "ratio",
                "secs",
                "CPU µs/msg sub+mqtt+redis",
                "peak RSS",
                "preload/s"
            );
            for d in &self.drain {
                let ratio = self.baseline().map(|b| d.rate / b).unwrap_or(0.0);
                let accounted = format!(
                    "{}/{} {}, {} dead, {} left in broker{}",
                    d.accounted,
                    d.messages,
                    if d.short == "a" { "received" } else { "keys" },
                    d.dead_letters,
                    d.left_in_broker,
                    match &d.outcomes {
                        Some(o) if !o.is_empty() => format!(", outcomes {o:?}"),
                        _ => String::new(),
                    }
                );
                let per_msg = |s: f64| s * 1e6 / d.messages as f64;
                let subscriber = d.cpu_s.or(d.others.subscriber_s).unwrap_or(0.0);
                let cpu = format!(
                    "{:.1}+{:.1}+{:.1}",
                    per_msg(subscriber),
                    per_msg(d.others.broker_s),
                    per_msg(d.others.redis_s)
                );
                let _ = writeln!(
                    s,
                    "{:<48} {:>9.0} {:>6.2} {:>6.2} {:>25} {:>9} {:>9.0}  {}",
                    d.name,
                    d.rate,
                    ratio,
                    d.seconds,
                    cpu,
                    d.peak_rss_kib
                        .map(|k| format!("{:.1} MiB", mib(k)))
                        .unwrap_or("-".into()),
                    d.preload_rate,
                    accounted
                );
                if !d.redis_commands.is_empty() {
                    let per_msg: Vec<String> = d
                        .redis_commands
                        .iter()
                        .filter(|(_, calls, _)| *calls >= d.messages / 10)
                        .map(|(name, calls, usec)| {
                            format!(
                                "{name} {:.1}x{:.1}µs",
                                *calls as f64 / d.messages as f64,
                                *usec as f64 / (*calls).max(1) as f64
                            )
                        })
                        .collect();
                    let _ = writeln!(s, "    redis per message: {}", per_msg.join(", "));
                }
                for p in d.problems.iter().take(3) {
                    let _ = writeln!(s, "    problem: {p}");
                }
                if d.problems.len() > 3 {
                    let _ = writeln!(
                        s,
                        "    ... and {} more problems (see the JSON)",
                        d.problems.len() - 3
                    );
                }
            }
            s.push('\n');
        }
        if !self.live.is_empty() {
            let _ = writeln!(
                s,
                "{:<6} {:>7} {:>9} {:>7} {:>7} {:>8} {:>8} {:>8} {:>9} {:>6}",
                "live",
                "rate",
                "achieved",
                "sent",
                "seen",
                "p50 ms",
                "p99 ms",
                "max ms",
                "peak RSS",
                "CPU s"
            );
            for l in &self.live {
                let _ = writeln!(
                    s,
                    "({})    {:>7} {:>9.0} {:>7} {:>7} {:>8.2} {:>8.2} {:>8.2} {:>5.1} MiB {:>6.2}",
                    l.route,
                    l.rate,
                    l.achieved_rate,
                    l.sent,
                    l.seen,
                    l.p50_ms,
                    l.p99_ms,
                    l.max_ms,
                    mib(l.peak_rss_kib),
                    l.cpu_s
                );
            }
            s.push('\n');
        }
        for i in &self.idle {
            let _ = writeln!(
                s,
                "{:<40} RSS {:>5.1} MiB   CPU {:.2} s{}",
                i.when,
                mib(i.rss_kib),
                i.cpu_s,
                if i.window_s > 0.0 {
                    format!(" in {:.0} s", i.window_s)
                } else {
                    " (lifetime)".into()
                }
            );
        }
        if let Some(sp) = &self.spool {
            let _ = writeln!(
                s,
                "\nspool (spec §6.2, fsync = {:?}): {} messages appended in {:.1} s ({:.0} msg/s, file {:.1} MiB), \
                 replayed in {:.1} s ({:.0} msg/s)\n  live at {} msg/s on other topics: during \
                 the drain ({} messages) p50 {:.2} ms p99 {:.2} ms; after it p50 {:.2} ms p99 \
                 {:.2} ms",
                sp.fsync,
                sp.messages,
                sp.append_s,
                sp.append_rate,
                sp.spool_file_bytes as f64 / (1024.0 * 1024.0),
                sp.drain_s,
                sp.replay_rate,
                sp.live_rate,
                sp.during_count,
                sp.during_p50_ms,
                sp.during_p99_ms,
                sp.baseline_p50_ms,
                sp.baseline_p99_ms
            );
            for p in &sp.problems {
                let _ = writeln!(s, "problem (spool): {p}");
            }
        }
        for p in &self.problems {
            let _ = writeln!(s, "problem: {p}");
        }
        let _ = writeln!(s, "\nspec §11 targets:");
        for (name, ok, value) in self.targets() {
            let _ = writeln!(
                s,
                "  {:<7} {:<52} {}",
                ok.map(check).unwrap_or("n/a"),
                name,
                value
            );
        }
        let _ = writeln!(
            s,
            "(run took {:.0} s; load average {} at the start, {} at the end)",
            self.wall_s, self.load_start, self.load_end
        );
        s
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "messages": self.messages,
            "devices": self.devices,
            "broker_max_inflight_messages": self.broker_inflight,
            "machine": self.machine,
            "unix_time": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            "wall_s": self.wall_s,
            "load_average_start": self.load_start,
            "load_average_end": self.load_end,
            "drain": self.drain.iter().map(|d| json!({
                "name": d.name,
                "id": d.short,
                "messages": d.messages,
                "rate_msg_s": d.rate,
                "ratio_to_a": self.baseline().map(|b| d.rate / b),
                "seconds": d.seconds,
                "preload_rate_msg_s": d.preload_rate,
                "cpu_s": d.cpu_s,
                "subscriber_process_cpu_s": d.others.subscriber_s,
                "broker_cpu_s": d.others.broker_s,
                "redis_cpu_s": d.others.redis_s,
                "redis_commands": d.redis_commands.iter().map(|(name, calls, usec)| json!({
                    "command": name, "calls": calls, "usec": usec,
                })).collect::<Vec<_>>(),
                "peak_rss_kib": d.peak_rss_kib,
                "vm_hwm_kib": d.hwm_kib,
                "accounted": d.accounted,
                "dead_letters": d.dead_letters,
                "left_in_broker": d.left_in_broker,
                "outcomes": d.outcomes,
                "clean_exit": d.exit_ok,
                "problems": d.problems,
            })).collect::<Vec<_>>(),
            "live": self.live.iter().map(|l| json!({
                "route": l.route,
                "rate_msg_s": l.rate,
                "achieved_rate_msg_s": l.achieved_rate,
                "sent": l.sent,
                "seen": l.seen,
                "p50_ms": l.p50_ms,
                "p99_ms": l.p99_ms,
                "max_ms": l.max_ms,
                "peak_rss_kib": l.peak_rss_kib,
                "cpu_s": l.cpu_s,
            })).collect::<Vec<_>>(),
            "idle": self.idle.iter().map(|i| json!({
                "when": i.when,
                "rss_kib": i.rss_kib,
                "cpu_s": i.cpu_s,
                "window_s": i.window_s,
            })).collect::<Vec<_>>(),
            "spool": self.spool.as_ref().map(|s| json!({
                "messages": s.messages,
                "fsync": s.fsync,
                "append_s": s.append_s,
                "append_rate_msg_s": s.append_rate,
                "spool_file_bytes": s.spool_file_bytes,
                "drain_s": s.drain_s,
                "replay_rate_msg_s": s.replay_rate,
                "live_rate_msg_s": s.live_rate,
                "during_drain_messages": s.during_count,
                "during_drain_p50_ms": s.during_p50_ms,
                "during_drain_p99_ms": s.during_p99_ms,
                "after_drain_p50_ms": s.baseline_p50_ms,
                "after_drain_p99_ms": s.baseline_p99_ms,
                "accounted": s.accounted,
                "problems": s.problems,
            })),
            "targets": self.targets().into_iter().map(|(name, ok, value)| json!({
                "target": name, "met": ok, "value": value,
            })).collect::<Vec<_>>(),
            "all_accounted": self.all_accounted(),
            "problems": self.problems,
        })
    }

    /// Writes `<dir>/bench-<unix time>.json` and `<dir>/latest.json`.
    pub fn write_json(&self, dir: &Path) -> Res<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let text = serde_json::to_string_pretty(&self.to_json())?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let path = dir.join(format!("bench-{stamp}.json"));
        std::fs::write(&path, &text)?;
        std::fs::write(dir.join("latest.json"), &text)?;
        Ok(path)
    }
}
