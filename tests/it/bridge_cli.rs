//! The command line (spec §2): `check`, `match`, `--version`, and `run`'s exit codes — the
//! real binary, with a clean environment so no variable of the machine leaks into a config.

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tempfile::TempDir;

use crate::harness::{free_port, signal, wait_with_timeout};

const BINARY: &str = env!("CARGO_BIN_EXE_routemq-bridge");

/// The binary with every variable the loader reads removed.
fn command() -> Command {
    let mut cmd = Command::new(BINARY);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("ROUTEMQ_BRIDGE_")
            || name.starts_with("REDIS_")
            || name.starts_with("MQTT_")
            || name == "ENABLE_REDIS"
            || name == "CREDENTIALS_DIRECTORY"
        {
            cmd.env_remove(&*name);
        }
    }
    cmd.env_remove("JOURNAL_STREAM").stdin(Stdio::null());
    cmd
}

/// Runs the binary to completion (bounded) and returns its output.
pub(crate) fn run(args: &[&str]) -> Output {
    run_with_env(args, &[])
}

/// Like [`run`], with the variables `env` set.
fn run_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut child = command()
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start routemq-bridge");
    // The outputs are small: read them after exit, within a bound.
    let status = wait_with_timeout(&mut child, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("routemq-bridge {args:?} did not exit within 20 s"));
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    if let Some(mut out) = child.stdout.take() {
        std::io::Read::read_to_end(&mut out, &mut stdout).ok();
    }
    if let Some(mut err) = child.stderr.take() {
        std::io::Read::read_to_end(&mut err, &mut stderr).ok();
    }
    Output {
        status,
        stdout,
        stderr,
    }
}

pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

struct Files(TempDir);

impl Files {
    fn new() -> Files {
        Files(
            tempfile::Builder::new()
                .prefix("routemq-bridge-cli-")
                .tempdir()
                .expect("tempdir"),
        )
    }

    fn write(&self, name: &str, contents: &str) -> String {
        let path = self.0.path().join(name);
        std::fs::write(&path, contents).expect("write config");
        path.display().to_string()
    }
}

const GOOD: &str = r##"
[mqtt]
url = "mqtt://127.0.0.1:1883"
client_id = "cli-test"

[[routes]]
name = "sensor-data"
topic = "sensors/{device_id}/data"
qos = 1
payload = "json"

  [routes.rate_limit]
  key = "rate_limit:device:{device_id}"
  max = 100
  window = "60s"

  [routes.dedup]
  key = "dedup:{device_id}:{json.seq}"
  ttl = "10m"

  [[routes.actions]]
  op = "set_json"
  key = "sensor:{device_id}:latest"
  ex = "1h"

  [[routes.actions]]
  op = "rpush"
  key = "log:{device_id}"

[[routes]]
name = "everything"
topic = "#"
payload = "bytes"

  [[routes.actions]]
  op = "incr"
  key = "count"
"##;

#[test]
fn check_prints_the_route_table_and_exits_0() {
    let files = Files::new();
    let path = files.write("bridge.toml", GOOD);
    let out = run(&["check", "--config", &path]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let line = stdout
        .lines()
        .find(|l| l.contains("sensor-data"))
        .unwrap_or_else(|| panic!("no line for the route in:\n{stdout}"));
    for part in [
        "sensors/{device_id}/data",
        "sensors/+/data",
        "rate_limit",
        "dedup",
        "set_json",
        "rpush",
    ] {
        assert!(line.contains(part), "{part:?} missing from {line:?}");
    }
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("everything") && l.contains("incr")),
        "the second route is listed:\n{stdout}"
    );
}

#[test]
fn check_reports_every_error_with_file_and_key_path_and_exits_2() {
    let files = Files::new();
    let path = files.write(
        "broken.toml",
        r#"
[mqtt]
url = "mqtt://127.0.0.1:1883"
bogus = 1

[redis]
port = 99999

[[routes]]
name = "unknown-param"
topic = "sensors/{device_id}/data"
  [[routes.actions]]
  op = "set"
  key = "sensor:{device}:latest"

[[routes]]
name = "payload-in-key"
topic = "x/{id}"
  [[routes.actions]]
  op = "set"
  key = "k:{payload}"

[[routes]]
name = "no-topic"
  [[routes.actions]]
  op = "set"
  key = "k"
"#,
    );
    let out = run(&["check", "--config", &path]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    for (key, what) in [
        ("mqtt.bogus", "unknown key"),
        ("redis.port", "99999"),
        ("routes[0].actions[0].key", "{device}"),
        ("routes[1].actions[0].key", "{payload}"),
        ("routes[2].topic", "required"),
    ] {
        let line = stderr
            .lines()
            .find(|l| l.contains(&format!("{path}: {key}:")))
            .unwrap_or_else(|| panic!("no error naming {path}: {key} in:\n{stderr}"));
        assert!(line.contains(what), "{line:?} does not say {what:?}");
    }
}

#[test]
fn a_toml_syntax_error_exits_2_naming_the_line() {
    let files = Files::new();
    let path = files.write("syntax.toml", "[mqtt]\nurl = \"mqtt://x\"\nclient_id = \n");
    let out = run(&["check", "--config", &path]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains(&path), "names the file: {stderr}");
    assert!(stderr.contains("line 3"), "names the line: {stderr}");
}

#[test]
fn match_shows_route_params_and_rendered_keys() {
    let files = Files::new();
    let path = files.write("bridge.toml", GOOD);
    let out = run(&[
        "match",
        "--config",
        &path,
        "sensors/dev-1/data",
        "--payload",
        r#"{"seq":7}"#,
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    for part in [
        "sensor-data",
        "device_id",
        "dev-1",
        "sensor:dev-1:latest",
        "log:dev-1",
        "rate_limit:device:dev-1",
        "dedup:dev-1:7",
        "everything",
        "count",
    ] {
        assert!(stdout.contains(part), "{part:?} missing from:\n{stdout}");
    }
}

#[test]
fn match_says_when_a_param_breaks_its_constraint() {
    let files = Files::new();
    let path = files.write(
        "bridge.toml",
        r#"
[[routes]]
name = "strict"
topic = "sensors/{id}/data"
params.id = "[a-z0-9]+"
  [[routes.actions]]
  op = "set"
  key = "k:{id}"
"#,
    );
    let out = run(&["match", "--config", &path, "sensors/ab:c*/data"]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("refused before its stages") && stdout.contains("invalid_param"),
        "stdout: {stdout}"
    );
}

#[test]
fn match_without_a_matching_route_exits_1() {
    let files = Files::new();
    let path = files.write(
        "bridge.toml",
        r#"
[[routes]]
name = "only"
topic = "sensors/{id}/data"
  [[routes.actions]]
  op = "set"
  key = "k:{id}"
"#,
    );
    let out = run(&["match", "--config", &path, "other/topic"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("no route matches"),
        "stdout: {}",
        text(&out.stdout)
    );
}

#[test]
fn version_prints_name_and_version() {
    let out = run(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(text(&out.stdout).trim(), "routemq-bridge 0.1.0");
}

#[test]
fn a_missing_config_exits_2() {
    let files = Files::new();
    let missing = files.0.path().join("nope.toml").display().to_string();
    for sub in ["check", "run"] {
        let out = run(&[sub, "--config", &missing]);
        assert_eq!(out.status.code(), Some(2), "{sub}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains(&missing), "{sub} names the file");
    }
    // The default subcommand is `run`, and the path may come from the environment.
    let out = {
        let mut child = command()
            .env("ROUTEMQ_BRIDGE_CONFIG", &missing)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start");
        let status = wait_with_timeout(&mut child, Duration::from_secs(20)).expect("exits");
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            std::io::Read::read_to_string(&mut e, &mut stderr).ok();
        }
        (status, stderr)
    };
    assert_eq!(out.0.code(), Some(2), "{}", out.1);
    assert!(
        out.1.contains(&missing),
        "names the file from the environment"
    );
}

#[test]
fn run_with_a_bad_config_exits_2() {
    let files = Files::new();
    let path = files.write("bad.toml", "[limits]\nmax_inflight = \"lots\"\n");
    let out = run(&["run", "--config", &path]);
    assert_eq!(out.status.code(), Some(2), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stderr).contains("limits.max_inflight"));
}

#[test]
fn an_unknown_argument_exits_2() {
    assert_eq!(run(&["--no-such-flag"]).status.code(), Some(2));
}

/// `routemq-bridge run --config path` at log level info, and its stderr line by line.
fn run_reading_stderr(path: &str) -> (std::process::Child, mpsc::Receiver<String>) {
    let mut child = command()
        .args(["run", "--config", path])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start routemq-bridge");
    let (tx, lines) = mpsc::channel();
    let stderr = child.stderr.take().expect("stderr");
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, lines)
}

/// Waits until a line of `lines` contains `needle`.
fn wait_line(lines: &mpsc::Receiver<String>, needle: &str, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
}

#[test]
fn a_broker_that_never_answers_is_retried_and_sigterm_still_exits_0() {
    let files = Files::new();
    let mqtt_port = free_port();
    let redis_port = free_port();
    let path = files.write(
        "bridge.toml",
        &format!(
            r#"
[mqtt]
url = "mqtt://127.0.0.1:{mqtt_port}"
client_id = "cli-never"
reconnect_max_delay = "200ms"

[redis]
url = "redis://127.0.0.1:{redis_port}"

[http]
listen = "127.0.0.1:0"

[[routes]]
name = "r"
topic = "a/{{id}}"
  [[routes.actions]]
  op = "set"
  key = "k:{{id}}"
"#
        ),
    );
    let (mut child, lines) = run_reading_stderr(&path);
    // Two failed attempts: it retries instead of giving up (or crashing).
    for attempt in 1..=2 {
        assert!(
            wait_line(&lines, "MQTT connection lost", Duration::from_secs(20)),
            "attempt {attempt} not logged"
        );
    }
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "still running"
    );
    signal(child.id(), libc::SIGTERM);
    let status = wait_with_timeout(&mut child, Duration::from_secs(20))
        .expect("exits within 20 s of SIGTERM");
    assert_eq!(status.code(), Some(0));
}

// ---- warnings (spec §10): a config that loads but likely does not do what was meant ----

/// A config with `mqtt` and `redis` as the bodies of those tables, and one route.
fn scaled(mqtt: &str, redis: &str) -> String {
    format!(
        r#"
[mqtt]
url = "mqtt://127.0.0.1:1883"
{mqtt}

[redis]
{redis}

[[routes]]
name = "r"
topic = "a/{{id}}"
  [[routes.actions]]
  op = "set"
  key = "k:{{{{{{id}}}}}}"
"#
    )
}

/// `check` on `config` with `env`: exit code, stdout, stderr.
fn check_with_env(config: &str, env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let files = Files::new();
    let path = files.write("bridge.toml", config);
    let out = run_with_env(&["check", "--config", &path], env);
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn check_warns_when_a_share_group_runs_with_the_default_client_id() {
    let (code, stdout, stderr) = check_with_env(&scaled("share_group = \"bridges\"", ""), &[]);
    assert_eq!(code, Some(0), "a warning is not an error: {stderr}");
    assert!(stdout.contains("configuration OK"), "{stdout}");
    let warning = stderr
        .lines()
        .find(|l| l.starts_with("warning:") && l.contains("mqtt.client_id"))
        .unwrap_or_else(|| panic!("no client_id warning in:\n{stderr}"));
    for part in [
        "share_group",
        "operator's job",
        "MQTT_CLIENT_ID",
        "[mqtt] client_id",
    ] {
        assert!(warning.contains(part), "{part:?} missing from {warning:?}");
    }

    // The same through RouteMQ's variable for the group.
    let (code, _, stderr) = check_with_env(&scaled("", ""), &[("MQTT_GROUP_NAME", "bridges")]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("warning:") && stderr.contains("mqtt.client_id"),
        "{stderr}"
    );
}

#[test]
fn check_does_not_warn_when_each_instance_has_its_own_client_id() {
    for (mqtt, env) in [
        ("share_group = \"bridges\"\nclient_id = \"gw-1\"", &[][..]),
        (
            "share_group = \"bridges\"",
            &[("MQTT_CLIENT_ID", "gw-2")][..],
        ),
        ("", &[][..]),
    ] {
        let (code, _, stderr) = check_with_env(&scaled(mqtt, ""), env);
        assert_eq!(code, Some(0), "{stderr}");
        assert!(!stderr.contains("warning:"), "{mqtt:?} {env:?}: {stderr}");
    }
}

#[test]
fn check_warns_that_host_port_and_url_are_not_used_beside_a_cluster() {
    let cluster = r#"cluster = ["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"]"#;
    let (code, _, stderr) = check_with_env(&scaled("", cluster), &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        !stderr.contains("warning:"),
        "the seed list alone: {stderr}"
    );

    let (code, _, stderr) = check_with_env(
        &scaled("", &format!("{cluster}\nhost = \"redis.lan\"")),
        &[("REDIS_URL", "redis://:hunter2@single:6379")],
    );
    assert_eq!(code, Some(0), "a warning is not an error: {stderr}");
    for key in ["redis.host", "redis.url"] {
        assert!(
            stderr.lines().any(|l| l.starts_with("warning:")
                && l.contains(&format!(
                    "{key}: is set but redis.cluster is used for data connections"
                ))),
            "no warning for {key} in:\n{stderr}"
        );
    }
    assert!(
        stderr.contains("environment variable REDIS_URL: redis.url"),
        "the variable is named: {stderr}"
    );
    assert!(
        !stderr.contains("hunter2"),
        "no secret in the output: {stderr}"
    );
}

#[test]
fn run_logs_the_config_warnings_at_start_up() {
    let files = Files::new();
    // Nobody listens on either port: the warning comes before any connection.
    let config = format!(
        r#"
[mqtt]
url = "mqtt://127.0.0.1:{mqtt}"
share_group = "bridges"
reconnect_max_delay = "200ms"

[redis]
url = "redis://127.0.0.1:{redis}"

[http]
listen = "127.0.0.1:0"
"#,
        mqtt = free_port(),
        redis = free_port()
    );
    let path = files.write("bridge.toml", &config);
    let (mut child, lines) = run_reading_stderr(&path);
    let logged = wait_line(&lines, "config warning", Duration::from_secs(20));
    signal(child.id(), libc::SIGTERM);
    let status = wait_with_timeout(&mut child, Duration::from_secs(20))
        .expect("exits within 20 s of SIGTERM");
    assert!(
        logged,
        "the share_group/client_id warning is logged at start-up"
    );
    assert_eq!(status.code(), Some(0));
}
