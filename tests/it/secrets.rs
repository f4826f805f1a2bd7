//! No secret in any output (spec §8). One distinctive password is placed in every secret
//! slot — URL userinfo (`[mqtt] url`, `[redis] url`, `redis.cluster` and
//! `redis.sentinel.nodes`), `password`, `password_file` (also the sentinels'), systemd
//! credentials, RouteMQ's variables and our own — and everything the
//! bridge says is collected: config errors of `check`, `match` and `run`, their reports on a
//! good config, the daemon's log at trace level (our lines and those of rumqttc and redis-rs)
//! and stdout, a rejected reload, `/readyz`, `/metrics`, the dead letter, `Debug` of the
//! loaded config. Then one assertion: the password is nowhere. One test, so that a new slot
//! or a new output is one more line here, not a new test that someone forgets.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use redis::Commands;
use tempfile::TempDir;

use crate::bridge::{config, eventually, Bridge, Client};
use crate::harness::{mosquitto_password_file, wait_with_timeout, Mosquitto, Redis};
use crate::ops::{get, get_until, http_addr};

/// The password of the bridge's Redis and MQTT users in every slot.
const SECRET: &str = "S3cr3t-Pa55";
/// The MQTT user the test publishes as (its password is not under test).
const PUBLISHER: (&str, &str) = ("publisher", "publisher-pw");
/// In a payload whose dead-letter record cannot be written: the log line of that failure
/// names route, reason and error, never the record.
const PAYLOAD_MARK: &str = "Pay10ad-Mark";

const WAIT: Duration = Duration::from_secs(20);

/// A JSON route: a payload that is not JSON is `invalid` and dead-lettered; a key of the
/// wrong type makes the write `failed`, with Redis' error as the record's detail. The
/// forward and the republish rule open the bridge's second MQTT connection and a dedicated
/// Redis connection, both with the credentials.
const ROUTE: &str = r#"
[[routes]]
name = "secret-route"
topic = "s/{device}/data"
payload = "json"
[[routes.actions]]
op = "rpush"
key = "k:{device}"
[[routes.actions]]
op = "mqtt_publish"
topic = "fwd/{device}"
payload = "{payload}"
qos = 1

[[republish]]
name = "secret-republish"
source = "pubsub"
channel = "events"
topic = "out/events"
"#;

/// Everything the bridge said, labelled by where it came from.
#[derive(Default)]
struct Seen(Vec<(String, String)>);

impl Seen {
    fn add(&mut self, label: impl Into<String>, text: impl Into<String>) {
        self.0.push((label.into(), text.into()));
    }

    /// Fails with every output (and line) that holds the secret.
    fn assert_no_secret(&self) {
        let leaks: Vec<String> = self
            .0
            .iter()
            .filter(|(_, text)| text.contains(SECRET))
            .map(|(label, text)| {
                let lines: Vec<&str> = text.lines().filter(|l| l.contains(SECRET)).collect();
                format!("--- {label}:\n{}", lines.join("\n"))
            })
            .collect();
        assert!(
            leaks.is_empty(),
            "the password leaked into {} output(s):\n{}",
            leaks.len(),
            leaks.join("\n")
        );
    }
}

/// Runs the binary to completion (bounded) with only `env` from the loader's variables,
/// and records its stdout and stderr. Returns the exit code.
fn run_binary(seen: &mut Seen, label: &str, args: &[&str], env: &[(&str, String)]) -> i32 {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_routemq-bridge"));
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
    let mut child = cmd
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("RUST_LOG", "trace")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start routemq-bridge");
    // A config meant to be broken that is not would make `run` run: the bound ends it.
    let status = wait_with_timeout(&mut child, Duration::from_secs(20));
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut out) = child.stdout.take() {
        std::io::Read::read_to_string(&mut out, &mut stdout).ok();
    }
    if let Some(mut err) = child.stderr.take() {
        std::io::Read::read_to_string(&mut err, &mut stderr).ok();
    }
    let code = status
        .and_then(|s| s.code())
        .unwrap_or_else(|| panic!("{label}: {args:?} did not exit within 20 s:\n{stderr}"));
    seen.add(format!("{label}: {args:?} stdout"), stdout);
    seen.add(format!("{label}: {args:?} stderr"), stderr);
    code
}

/// `check` and `match` on `toml` with `env`, and `run` when it is broken: exit 2 on a
/// broken config (the errors were printed), 0 on a good one.
fn run_commands(seen: &mut Seen, dir: &Path, case: &Case) {
    let label = case.label;
    let path = dir.join(format!("{label}.toml"));
    std::fs::write(&path, &case.toml).expect("write config");
    let path = path.display().to_string();
    let expected = if case.good { 0 } else { 2 };
    for args in [
        vec!["check", "--config", &path],
        vec![
            "match",
            "--config",
            &path,
            "s/d1/data",
            "--payload",
            r#"{"a":1}"#,
        ],
    ] {
        let code = run_binary(seen, label, &args, &case.env);
        assert_eq!(code, expected, "{label}: {args:?} exit code");
    }
    if !case.good {
        let code = run_binary(seen, label, &["run", "--config", &path], &case.env);
        assert_eq!(code, 2, "{label}: run exit code");
    }
}

/// A config and variables for `check`, `match` and `run`.
struct Case {
    label: &'static str,
    toml: String,
    env: Vec<(&'static str, String)>,
    good: bool,
}

impl Case {
    fn broken(label: &'static str, toml: String, env: Vec<(&'static str, String)>) -> Case {
        Case {
            label,
            toml,
            env,
            good: false,
        }
    }
}

fn write(dir: &Path, name: &str, contents: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write file");
    path.display().to_string()
}

/// Config errors and reports: every slot, in the file and in each layer of variables.
fn config_outputs(seen: &mut Seen) {
    let dir = TempDir::new().expect("tempdir");
    let dir = dir.path();
    // `echo secret > file` leaves a newline: the bridge trims it, and must not print it.
    let pw_file = write(dir, "password", &format!("{SECRET}\n"));
    let credentials = dir.join("credentials");
    std::fs::create_dir(&credentials).expect("credentials dir");
    for name in ["mqtt_password", "redis_password", "redis-password-file"] {
        write(&credentials, name, &format!("{SECRET}\n"));
    }
    let credentials = credentials.display().to_string();
    let var = |k: &'static str, v: &str| (k, v.replace("PW", SECRET));

    let cases = vec![
        // URLs with userinfo and a bad port, a password in two places at once, a password
        // of the wrong type, cluster nodes with a password.
        Case::broken(
            "file-urls",
            format!(
                r#"[mqtt]
url = "mqtt://bridge:{SECRET}@127.0.0.1:notaport"
username = "bridge"
password = "{SECRET}"
password_file = "{pw_file}"
[redis]
url = "redis://:{SECRET}@127.0.0.1:notaport"
password = ["{SECRET}"]
cluster = ["redis://:{SECRET}@127.0.0.1:7001", "redis://:{SECRET}@127.0.0.1:notaport"]
{ROUTE}"#
            ),
            vec![],
        ),
        // Userinfo without a scheme, or before a stray `://`.
        Case::broken(
            "file-odd-urls",
            format!(
                r#"[mqtt]
url = "bridge:{SECRET}@127.0.0.1:1883"
[redis]
url = "redis:{SECRET}@127.0.0.1://x"
cluster = ["{SECRET}@127.0.0.1:7000"]
{ROUTE}"#
            ),
            vec![],
        ),
        // A well-formed URL, but the bridge takes MQTT credentials only from their keys.
        Case::broken(
            "file-mqtt-url-with-userinfo",
            format!("[mqtt]\nurl = \"mqtts://bridge:{SECRET}@127.0.0.1:8883\"\n{ROUTE}"),
            vec![],
        ),
        Case::broken(
            "routemq-variables",
            format!("[mqtt]\nkeep_alive = \"forever\"\n{ROUTE}"),
            vec![
                var("MQTT_BROKER", "mqtt://bridge:PW@127.0.0.1"),
                var("MQTT_USERNAME", "bridge"),
                var("MQTT_PASSWORD", "PW"),
                var("REDIS_PASSWORD", "PW"),
                var("REDIS_URL", "redis://:PW@127.0.0.1:notaport"),
            ],
        ),
        Case::broken(
            "routemq-broker-with-userinfo",
            ROUTE.to_string(),
            vec![
                var("MQTT_BROKER", "bridge:PW@127.0.0.1"),
                var("MQTT_PORT", "1883"),
            ],
        ),
        Case::broken(
            "bridge-variables",
            ROUTE.to_string(),
            vec![
                var(
                    "ROUTEMQ_BRIDGE_MQTT__URL",
                    "mqtt://bridge:PW@127.0.0.1:notaport",
                ),
                var("ROUTEMQ_BRIDGE_MQTT__PASSWORD", "PW"),
                var(
                    "ROUTEMQ_BRIDGE_REDIS__URL",
                    "redis://:PW@127.0.0.1:notaport",
                ),
                var("ROUTEMQ_BRIDGE_REDIS__PASSWORD", "PW"),
                var("ROUTEMQ_BRIDGE_REDIS__PASSWORD_FILE", &pw_file),
                var(
                    "ROUTEMQ_BRIDGE_REDIS__CLUSTER",
                    "redis://:PW@127.0.0.1:notaport",
                ),
            ],
        ),
        // systemd credentials, a `password_file` relative to them, and an error to print.
        Case::broken(
            "credentials",
            format!(
                "[mqtt]\nurl = \"mqtt://127.0.0.1:notaport\"\nusername = \"bridge\"\n\
                 [redis]\npassword_file = \"redis-password-file\"\n{ROUTE}"
            ),
            vec![("CREDENTIALS_DIRECTORY", credentials)],
        ),
        Case::broken(
            "toml-syntax-error",
            format!("[mqtt]\npassword = \"{SECRET}\n{ROUTE}"),
            vec![],
        ),
        // Sentinel: node URLs with a password (one unparsable), the sentinels' password,
        // a missing master name; and the same slots through variables.
        Case::broken(
            "sentinel",
            format!(
                r#"[redis.sentinel]
nodes = ["redis://:{SECRET}@127.0.0.1:26379", "redis://:{SECRET}@127.0.0.1:notaport"]
password = "{SECRET}"
{ROUTE}"#
            ),
            vec![
                var("ROUTEMQ_BRIDGE_REDIS__SENTINEL__PASSWORD", "PW"),
                var("ROUTEMQ_BRIDGE_REDIS__SENTINEL__USERNAME", "u"),
            ],
        ),
        // A good Sentinel config with a secret in every slot of its own.
        Case {
            label: "good-sentinel",
            toml: format!(
                r#"[redis]
url = "redis://:{SECRET}@127.0.0.1:6390"
[redis.sentinel]
master = "mymaster"
nodes = ["redis://:{SECRET}@127.0.0.1:26379"]
password_file = "{pw_file}"
{ROUTE}"#
            ),
            env: vec![var("ROUTEMQ_BRIDGE_REDIS__PASSWORD", "PW")],
            good: true,
        },
        // A good config with a secret in every slot: `check` and `match` report on it.
        Case {
            label: "good",
            toml: format!(
                r#"[mqtt]
username = "bridge"
password_file = "{pw_file}"
[redis]
url = "redis://:{SECRET}@127.0.0.1:6390"
cluster = ["redis://:{SECRET}@127.0.0.1:7000"]
{ROUTE}"#
            ),
            env: vec![
                var("MQTT_PASSWORD", "PW"),
                var("ROUTEMQ_BRIDGE_REDIS__PASSWORD", "PW"),
            ],
            good: true,
        },
    ];
    for case in &cases {
        run_commands(seen, dir, case);
    }

    // `Debug` of what the library loads, good and bad.
    for Case { label, env, .. } in &cases {
        let path = dir.join(format!("{label}.toml"));
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let loaded = routemq_bridge::daemon::config::BridgeConfig::compile(&path, &env);
        match loaded {
            Ok((config, _)) => {
                seen.add(
                    format!("{label}: Debug of the config"),
                    format!("{config:?}"),
                );
                let manager = routemq_bridge::redis::RedisManager::new(config.redis);
                seen.add(
                    format!("{label}: Debug of the manager"),
                    format!("{manager:?}"),
                );
            }
            Err(errors) => {
                seen.add(
                    format!("{label}: Debug of the errors"),
                    format!("{errors:?}"),
                );
            }
        }
    }
}

/// A broker that knows `bridge` with the secret and the publisher.
fn broker_with_passwords(dir: &Path) -> Mosquitto {
    let file = dir.join("mosquitto-passwords");
    mosquitto_password_file(&file, &[("bridge", SECRET), PUBLISHER]);
    Mosquitto::start_with(&format!(
        "allow_anonymous false\npassword_file {}\n",
        file.display()
    ))
}

fn redis_connection(redis: &Redis) -> redis::Connection {
    redis::Client::open(format!("redis://:{SECRET}@127.0.0.1:{}", redis.port()))
        .expect("url")
        .get_connection()
        .expect("connect to the test redis with its password")
}

/// A daemon started at trace level, subscribed, ready, with one dead letter written.
struct Run {
    label: String,
    bridge: Bridge,
    addr: std::net::SocketAddr,
    publisher: Client,
}

async fn start_run(
    seen: &mut Seen,
    label: &str,
    broker: &Mosquitto,
    conn: &mut redis::Connection,
    toml: &str,
    env: &[(&str, String)],
) -> Run {
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.push(("RUST_LOG", "trace"));
    let bridge = Bridge::start_with_env(toml, &env);
    let addr = http_addr(&bridge);
    let ready = get_until(addr, "/readyz", 200).await;
    seen.add(format!("{label}: /readyz"), ready);
    let publisher = Client::connect_with(broker, &format!("{label}-publisher"), |o| {
        o.set_credentials(PUBLISHER.0, PUBLISHER.1);
    })
    .await;
    let mut run = Run {
        label: label.to_string(),
        bridge,
        addr,
        publisher,
    };
    // A written message and its forward, over the second connection.
    run.publisher.subscribe("fwd/#").await;
    run.publisher
        .publish("s/d1/data", b"{\"v\":1}".to_vec())
        .await;
    let forward = run.publisher.next_message(WAIT).await;
    assert!(
        forward.is_some_and(|p| p.topic == "fwd/d1"),
        "{label}: no forward; log:\n{}",
        run.bridge.log_text()
    );
    run.dead_letter(conn, "s/d1/data", b"not json").await;
    run
}

impl Run {
    /// Publishes `payload` to `topic` and waits until one more dead letter is in Redis.
    async fn dead_letter(&mut self, conn: &mut redis::Connection, topic: &str, payload: &[u8]) {
        let before: usize = conn.llen("dead_letter").expect("LLEN");
        self.publisher.publish(topic, payload.to_vec()).await;
        eventually(WAIT, || {
            (conn.llen::<_, usize>("dead_letter").ok()? > before).then_some(())
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "{}: no dead letter for {topic}; log:\n{}",
                self.label,
                self.bridge.log_text()
            )
        });
    }

    /// `/metrics`, SIGTERM, and the whole log into `seen`.
    async fn finish(mut self, seen: &mut Seen, conn: &mut redis::Connection) {
        let label = &self.label;
        let (_, metrics) = get(self.addr, "/metrics").await;
        seen.add(format!("{label}: /metrics"), metrics);
        let records: Vec<String> = conn.lrange("dead_letter", 0, -1).expect("LRANGE");
        seen.add(format!("{label}: dead letters"), records.join("\n"));
        assert!(
            self.bridge.terminate(WAIT).success(),
            "{label}: exit status"
        );
        seen.add(
            format!("{label}: log (stdout and stderr)"),
            self.bridge.log_text(),
        );
    }
}

/// The daemon with the secret in each slot, against a Redis and a broker that need it.
async fn daemon_outputs(seen: &mut Seen) {
    let dir = TempDir::new().expect("tempdir");
    let dir = dir.path();
    let redis = Redis::start_with(&["--requirepass", SECRET]);
    let broker = broker_with_passwords(dir);
    let mut conn = redis_connection(&redis);
    let base = |client_id: &str, mqtt_lines: &str| {
        config(&redis, &broker, client_id, ROUTE).replacen(
            "[mqtt]\n",
            &format!("[mqtt]\n{mqtt_lines}\n"),
            1,
        )
    };
    let redis_url = redis.url();
    let with_userinfo = |toml: String| {
        toml.replace(
            &format!("url = \"{redis_url}\""),
            &format!("url = \"redis://:{SECRET}@127.0.0.1:{}\"", redis.port()),
        )
    };

    // In the file: `password`, and the Redis URL's userinfo.
    let toml = with_userinfo(base(
        "secrets-file",
        &format!("username = \"bridge\"\npassword = \"{SECRET}\""),
    ));
    let mut run = start_run(seen, "file", &broker, &mut conn, &toml, &[]).await;
    // WRONGTYPE: outcome `failed`, its record's detail quotes Redis' error.
    let _: () = conn.set("k:wrongtype", "not a list").expect("SET");
    run.dead_letter(&mut conn, "s/wrongtype/data", b"{\"v\":1}")
        .await;
    // The dead-letter list holds a string: a record cannot be written. The error is
    // logged with route, reason and error, not the record (whose payload is the device's).
    let records: Vec<String> = conn.lrange("dead_letter", 0, -1).expect("LRANGE");
    seen.add(
        "file: dead letters before the list broke",
        records.join("\n"),
    );
    let offset = run.bridge.log_text().len();
    let _: () = conn.del("dead_letter").expect("DEL");
    let _: () = conn.set("dead_letter", "not a list").expect("SET");
    run.publisher
        .publish("s/d2/data", format!("not json {PAYLOAD_MARK}").into_bytes())
        .await;
    assert!(
        run.bridge.wait_for_log_after(offset, "dead letter", WAIT),
        "the failed dead-letter write is logged; log:\n{}",
        run.bridge.log_text()
    );
    let failure = run.bridge.log_text()[offset..].to_string();
    let line = failure
        .lines()
        .find(|l| l.contains("dead letter"))
        .expect("just seen");
    assert!(
        line.contains("secret-route")
            && line.contains("invalid_json")
            && line.contains("WRONGTYPE"),
        "the line names route, reason and error: {line}"
    );
    assert!(
        !failure.contains(PAYLOAD_MARK),
        "the record's payload is logged:\n{failure}"
    );
    let _: () = conn.del("dead_letter").expect("DEL");
    // A reload refused for a URL with a password: its errors are logged.
    let bad = toml.replace(
        &format!("url = \"{}\"", broker.url()),
        &format!("url = \"mqtt://bridge:{SECRET}@127.0.0.1:notaport\""),
    );
    let offset = run.bridge.reload_with(&bad);
    assert!(
        run.bridge
            .wait_for_log_after(offset, "reload refused", WAIT),
        "the reload is refused; log:\n{}",
        run.bridge.log_text()
    );
    run.finish(seen, &mut conn).await;

    // RouteMQ's variables.
    let toml = base("secrets-routemq-env", "");
    let env = [
        ("MQTT_USERNAME", "bridge".to_string()),
        ("MQTT_PASSWORD", SECRET.to_string()),
        ("REDIS_PASSWORD", SECRET.to_string()),
    ];
    let run = start_run(seen, "routemq-env", &broker, &mut conn, &toml, &env).await;
    run.finish(seen, &mut conn).await;

    // Our variables: a password and a Redis URL with userinfo.
    let env = [
        ("ROUTEMQ_BRIDGE_MQTT__USERNAME", "bridge".to_string()),
        ("ROUTEMQ_BRIDGE_MQTT__PASSWORD", SECRET.to_string()),
        (
            "ROUTEMQ_BRIDGE_REDIS__URL",
            format!("redis://:{SECRET}@127.0.0.1:{}", redis.port()),
        ),
    ];
    let toml = base("secrets-bridge-env", "");
    let run = start_run(seen, "bridge-env", &broker, &mut conn, &toml, &env).await;
    run.finish(seen, &mut conn).await;

    // `password_file` for both, and systemd credentials for both.
    let file = write(dir, "password", &format!("{SECRET}\n"));
    let toml = base(
        "secrets-password-file",
        &format!("username = \"bridge\"\npassword_file = \"{file}\""),
    )
    .replacen(
        "[redis]\n",
        &format!("[redis]\npassword_file = \"{file}\"\n"),
        1,
    );
    let run = start_run(seen, "password-file", &broker, &mut conn, &toml, &[]).await;
    run.finish(seen, &mut conn).await;
    let credentials = dir.join("credentials");
    std::fs::create_dir(&credentials).expect("credentials dir");
    write(&credentials, "mqtt_password", SECRET);
    write(&credentials, "redis_password", SECRET);
    let env = [("CREDENTIALS_DIRECTORY", credentials.display().to_string())];
    let toml = base("secrets-credentials", "username = \"bridge\"");
    let run = start_run(seen, "credentials", &broker, &mut conn, &toml, &env).await;
    run.finish(seen, &mut conn).await;

    // Wrong passwords (holding the secret): Redis and the broker refuse them, and the
    // refusals are logged, retried, and shown by /readyz and /metrics.
    let wrong = format!("{SECRET}-wrong");
    let toml = base(
        "secrets-refused",
        &format!("username = \"bridge\"\npassword = \"{wrong}\""),
    )
    .replacen(
        "[redis]\n",
        &format!("[redis]\npassword = \"{wrong}\"\n"),
        1,
    );
    let mut bridge = Bridge::start_unready_with_env(&toml, &[("RUST_LOG", "trace")]);
    for needle in ["NotAuthorized", "AuthenticationFailed"] {
        assert!(
            bridge.wait_for_log(needle, WAIT),
            "refused: no {needle:?} in the log:\n{}",
            bridge.log_text()
        );
    }
    let addr = http_addr(&bridge);
    for path in ["/readyz", "/metrics"] {
        let (_, body) = get(addr, path).await;
        seen.add(format!("refused: {path}"), body);
    }
    assert!(bridge.terminate(WAIT).success(), "refused: exit status");
    seen.add("refused: log (stdout and stderr)", bridge.log_text());

    // A Redis Cluster (one node holding every slot) whose seed URL carries the password:
    // the cluster client of redis-rs logs at debug and trace.
    let cluster = Redis::start_with(&["--requirepass", SECRET, "--cluster-enabled", "yes"]);
    let mut cluster_conn = redis_connection(&cluster);
    let _: () = redis::cmd("CLUSTER")
        .arg("ADDSLOTSRANGE")
        .arg(0)
        .arg(16383)
        .query(&mut cluster_conn)
        .expect("CLUSTER ADDSLOTSRANGE");
    eventually(WAIT, || {
        let info: String = redis::cmd("CLUSTER")
            .arg("INFO")
            .query(&mut cluster_conn)
            .ok()?;
        info.contains("cluster_state:ok").then_some(())
    })
    .await
    .expect("the one-node cluster is ok");
    let toml = base(
        "secrets-cluster",
        &format!("username = \"bridge\"\npassword = \"{SECRET}\""),
    )
    .replace(
        &format!("url = \"{redis_url}\""),
        &format!(
            "cluster = [\"redis://:{SECRET}@127.0.0.1:{}\"]",
            cluster.port()
        ),
    );
    let run = start_run(seen, "cluster", &broker, &mut cluster_conn, &toml, &[]).await;
    run.finish(seen, &mut cluster_conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_in_any_secret_slot_appears_in_no_output() {
    let mut seen = Seen::default();
    config_outputs(&mut seen);
    daemon_outputs(&mut seen).await;
    assert!(
        seen.0.iter().any(|(_, text)| text.contains("TRACE")),
        "the daemon logged at trace level"
    );
    seen.assert_no_secret();
}
