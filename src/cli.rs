//! What each subcommand does (spec §2), kept out of `main.rs` so it stays wiring only.

use std::path::Path;

use crate::config::ConfigErrors;
use crate::daemon::config::BridgeConfig;
use crate::republish::Source;
use crate::router::route::RouteTable;
use crate::template::Context;

/// Exit code: clean stop.
pub const OK: u8 = 0;
/// Exit code: runtime failure (or `match` found no route).
pub const FAILURE: u8 = 1;
/// Exit code: bad config or usage.
pub const BAD_CONFIG: u8 = 2;

fn load(path: &Path) -> Result<(BridgeConfig, RouteTable), u8> {
    let env = crate::config::process_env();
    BridgeConfig::compile(path, &env).map_err(|errors| {
        report(path, &errors);
        BAD_CONFIG
    })
}

fn report(path: &Path, errors: &ConfigErrors) {
    eprintln!(
        "{}: {} error{} in the configuration:",
        path.display(),
        errors.len(),
        if errors.len() == 1 { "" } else { "s" }
    );
    for error in errors.iter() {
        eprintln!("  {error}");
    }
}

/// `run`: the daemon.
pub fn run(path: &Path) -> u8 {
    let (config, routes) = match load(path) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let _log = crate::logging::init(&config.log);
    // One thread: a gateway bridge waits on I/O, and the work per message is a few
    // microseconds, so worker threads buy no throughput; they cost cross-thread wakeups
    // (futex, context switches: most of the kernel time in the profile) and a malloc
    // arena and stack each (docs/benchmarks.md). Keep-alive is not starved: every task
    // yields at its next await, and the MQTT event loop is one of them.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return FAILURE;
        }
    };
    let loaded = crate::daemon::Loaded {
        config,
        routes,
        path: path.to_path_buf(),
    };
    match runtime.block_on(crate::daemon::run(loaded)) {
        Ok(()) => OK,
        Err(e) => {
            tracing::error!(error = %e, "routemq-bridge stopped");
            eprintln!("routemq-bridge: {e}");
            FAILURE
        }
    }
}

/// `check` and `match` print reports that are often piped into `head` or `less`: like any
/// Unix filter they should end quietly when the reader goes away, instead of Rust's default
/// (SIGPIPE ignored, so `println!` panics on the broken pipe). The daemon keeps the default.
fn quiet_on_broken_pipe() {
    // SAFETY: restoring a signal's default disposition before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// `check`: validate and print the route table.
pub fn check(path: &Path) -> u8 {
    quiet_on_broken_pipe();
    let (config, routes) = match load(path) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    println!("{}: configuration OK", path.display());
    for warning in &config.warnings {
        eprintln!("warning: {warning}");
    }
    let protocol = match config.mqtt.protocol {
        crate::mqtt::config::Protocol::V311 => "MQTT 3.1.1".to_string(),
        crate::mqtt::config::Protocol::V5 => format!(
            "MQTT 5, session expiry {}",
            humantime::format_duration(config.mqtt.session_expiry)
        ),
    };
    println!(
        "mqtt {} as {:?} ({protocol}); redis {}",
        config.mqtt.url,
        config.mqtt.client_id,
        if config.redis.enabled {
            "enabled"
        } else {
            "disabled"
        }
    );
    if let Some(sentinel) = &config.redis.sentinel {
        let nodes: Vec<String> = sentinel
            .nodes
            .iter()
            .map(|n| crate::config::redact_url(n.expose()))
            .collect();
        println!(
            "redis sentinel: master {:?} via [{}]{}{}; wait_replicas {}",
            sentinel.master,
            nodes.join(", "),
            sentinel
                .username
                .as_ref()
                .map(|u| format!(", sentinel username {u:?}"))
                .unwrap_or_default(),
            if sentinel.password.is_some() {
                ", sentinel password ***"
            } else {
                ""
            },
            sentinel.wait_replicas
        );
    }
    match &config.spool {
        Some(spool) => println!("{}", spool.describe()),
        None => println!("spool: none (a Redis outage is carried by the broker's queue)"),
    }
    println!("{} route(s):", routes.routes.len());
    for route in &routes.routes {
        let middleware: Vec<&str> = [
            route.session.as_ref().map(|_| "session"),
            route.rate_limit.as_ref().map(|_| "rate_limit"),
            route.dedup.as_ref().map(|_| "dedup"),
        ]
        .into_iter()
        .flatten()
        .collect();
        let actions: Vec<String> = route.actions.iter().map(|a| a.describe()).collect();
        println!(
            "  {:<20} {:<32} filter {:<24} qos {}  middleware [{}]  actions [{}]",
            route.name,
            route.pattern.as_str(),
            route.pattern.filter(),
            route.qos,
            middleware.join(", "),
            actions.join(", ")
        );
    }
    println!("subscriptions:");
    for sub in &routes.subscriptions {
        let filter = if config.mqtt.share_group.is_empty() {
            sub.filter.clone()
        } else {
            format!("$share/{}/{}", config.mqtt.share_group, sub.filter)
        };
        println!("  {filter} (qos {})", sub.qos);
    }
    println!("{} republish rule(s):", config.republish_rules.len());
    for rule in &config.republish_rules {
        let from = match &rule.source {
            Source::PubSub { channel, .. } => format!("channel {}", channel.as_str()),
            Source::Stream { stream, group, .. } => format!("stream {stream} (group {group})"),
        };
        println!(
            "  {:<20} {:<7} {:<40} -> topic {} qos {}{}",
            rule.name,
            rule.source_name(),
            from,
            rule.topic.source(),
            rule.qos,
            if rule.retain { " retain" } else { "" }
        );
    }
    OK
}

/// `match`: which routes a topic matches, their captures and rendered keys.
pub fn matches(path: &Path, topic: &str, payload: Option<&str>) -> u8 {
    quiet_on_broken_pipe();
    let (_, routes) = match load(path) {
        Ok(loaded) => loaded,
        Err(code) => return code,
    };
    let payload = payload.unwrap_or("");
    let json = match serde_json::from_str::<serde_json::Value>(payload) {
        Ok(json) => Some(json),
        Err(e) => {
            if !payload.is_empty() {
                println!("payload is not JSON ({e}): JSON routes would refuse it as invalid_json");
            }
            None
        }
    };
    let mut found = false;
    for (route, captures) in routes.matches(topic) {
        found = true;
        println!("route {:?} ({})", route.name, route.pattern);
        for (name, value) in route.pattern.params().zip(&captures) {
            println!("  param {name} = {value:?}");
        }
        // What the daemon checks before any stage (the payload's JSON is reported above).
        if let Err(outcome) = route.check_params(&captures) {
            println!("  refused before its stages: {outcome}");
        }
        let mut ctx = Context::new(topic, payload.as_bytes());
        ctx.params = &captures;
        ctx.json = json.as_ref();
        // A key that cannot render here (a `{session.*}` field, a missing `{json.*}`) shows
        // why in angle brackets instead of hiding the route.
        let render = |key: &crate::template::Template| match key.render(&ctx) {
            Ok(k) => k,
            Err(e) => format!("<{e}>"),
        };
        if let Some(session) = &route.session {
            println!("  session: {}", render(&session.rule().key));
        }
        if let Some(rule) = &route.rate_limit {
            println!("  rate_limit: {}", render(&rule.key));
        }
        if let Some(rule) = &route.dedup {
            println!("  dedup: {}", render(&rule.key));
        }
        for (i, action) in route.actions.iter().enumerate() {
            let rendered = match &action.key {
                Some(key) => render(key),
                None => action.describe(),
            };
            println!("  actions[{i}] {}: {rendered}", action.describe());
        }
    }
    if !found {
        println!("no route matches {topic:?}");
        return FAILURE;
    }
    OK
}
