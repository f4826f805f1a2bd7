//! Driving the real daemon in tests: the `routemq-bridge` binary started against a private
//! Redis and Mosquitto with a config the test writes, plus an MQTT test client that
//! publishes at QoS 1 and waits for every PUBACK.

#![allow(dead_code)] // each test module uses a different part

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tempfile::TempDir;

use crate::harness::{signal, wait_with_timeout, Mosquitto, Redis};

/// The log line of the MQTT source when the broker granted the cover (other lines, such as a
/// reload's summary, may contain the bare word).
pub const SUBSCRIBED: &str = "mqtt::source: subscribed";

/// How long the daemon may take to connect and subscribe.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The `[mqtt]`, `[redis]`, `[limits]` and `[dead_letter]` tables for private services,
/// followed by `rest` (routes, republish rules, overrides).
pub fn config(redis: &Redis, broker: &Mosquitto, client_id: &str, rest: &str) -> String {
    config_on(
        &format!("url = \"{}\"\nsocket_timeout = \"2s\"\n", redis.url()),
        broker,
        client_id,
        rest,
    )
}

/// [`config`] with `redis` as the body of the `[redis]` table (a cluster's seeds, a
/// Sentinel's sub-table after the table's own keys, …).
pub fn config_on(redis: &str, broker: &Mosquitto, client_id: &str, rest: &str) -> String {
    format!(
        r#"[mqtt]
url = "{mqtt}"
client_id = "{client_id}"
keep_alive = "5s"
reconnect_max_delay = "1s"

[redis]
{redis}
[http]
listen = "127.0.0.1:0"

[dead_letter]
redis_list = "dead_letter"

{rest}
"#,
        mqtt = broker.url(),
    )
}

/// The MQTT protocol the bridge speaks in a test: suites that promise the same under both
/// (spec §6.1) take it as a parameter and run twice ([`under_both_protocols!`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    V311,
    V5,
}

impl Protocol {
    /// [`config`] for a bridge speaking this protocol.
    pub fn config(self, redis: &Redis, broker: &Mosquitto, client_id: &str, rest: &str) -> String {
        self.apply(&config(redis, broker, client_id, rest))
    }

    /// `config` (made by [`config`] or [`config_on`]) with `[mqtt] protocol` set.
    pub fn apply(self, config: &str) -> String {
        match self {
            Protocol::V311 => config.to_string(),
            Protocol::V5 => config.replacen("[mqtt]\n", "[mqtt]\nprotocol = \"5\"\n", 1),
        }
    }
}

/// Runs each `async fn name(protocol: Protocol)` of the calling module as two tests,
/// `v3_1_1::name` and `v5::name`.
macro_rules! under_both_protocols {
    ($($name:ident),* $(,)?) => {
        mod v3_1_1 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::bridge::Protocol::V311).await
                }
            )*
        }
        mod v5 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::bridge::Protocol::V5).await
                }
            )*
        }
    };
}
pub(crate) use under_both_protocols;

/// The log the daemon writes, shared with the thread reading its stderr.
#[derive(Default)]
struct Log {
    text: Mutex<String>,
    grew: Condvar,
}

impl Log {
    /// Appends every line `pipe` yields, from a thread of its own.
    fn collect(self: &Arc<Self>, pipe: impl std::io::Read + Send + 'static) {
        let log = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let mut text = log.text.lock().unwrap_or_else(|p| p.into_inner());
                text.push_str(&line);
                text.push('\n');
                log.grew.notify_all();
            }
        });
    }
}

/// A running daemon.
pub struct Bridge {
    child: Option<Child>,
    dir: TempDir,
    config: PathBuf,
    log: Arc<Log>,
    /// Extra environment for the process (e.g. `NOTIFY_SOCKET`, `RUST_LOG`).
    env: Vec<(String, String)>,
    /// Where the log of the process last spawned starts.
    spawned_at: usize,
}

impl Bridge {
    /// Starts the daemon with `config` and waits until it subscribed.
    pub fn start(config: &str) -> Bridge {
        Self::start_with_env(config, &[])
    }

    /// Like [`Bridge::start`], with extra environment variables (they win over the
    /// defaults, e.g. `RUST_LOG`).
    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Bridge {
        let bridge = Bridge::start_unready_with_env(config, env);
        bridge.wait_subscribed();
        bridge
    }

    /// Starts the daemon with `config` without waiting for anything: for a bridge that is
    /// not expected to subscribe (refused credentials, a failed TLS handshake).
    pub fn start_unready(config: &str) -> Bridge {
        Self::start_unready_with_env(config, &[])
    }

    /// Like [`Bridge::start_unready`], with extra environment variables.
    pub fn start_unready_with_env(config: &str, env: &[(&str, &str)]) -> Bridge {
        let dir = tempfile::Builder::new()
            .prefix("routemq-bridge-test-")
            .tempdir()
            .expect("tempdir");
        let path = dir.path().join("bridge.toml");
        std::fs::write(&path, config).expect("write config");
        let mut bridge = Bridge {
            child: None,
            dir,
            config: path,
            log: Arc::new(Log::default()),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            spawned_at: 0,
        };
        bridge.spawn_unready();
        bridge
    }

    /// (Re)starts the process with the same config and waits until it subscribed.
    pub fn spawn(&mut self) {
        self.spawn_unready();
        self.wait_subscribed();
    }

    /// (Re)starts the process with the same config; returns at once.
    pub fn spawn_unready(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut child = Command::new(env!("CARGO_BIN_EXE_routemq-bridge"))
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info,routemq_bridge=debug")
            .env_remove("JOURNAL_STREAM")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start routemq-bridge");
        // Before the pipes are read: a fast start can log "subscribed" before the length
        // taken after `collect` would be, and a wait from there would never see it.
        self.spawned_at = self.log_text().len();
        // The daemon logs to stderr and prints nothing on stdout; stdout is kept anyway,
        // so a test that greps "everything it said" (secrets) sees both.
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        self.log.collect(stdout);
        self.log.collect(stderr);
        self.child = Some(child);
    }

    /// Waits until the process last spawned logged "subscribed".
    fn wait_subscribed(&self) {
        let offset = self.spawned_at;
        assert!(
            self.wait_for_log_after(offset, SUBSCRIBED, READY_TIMEOUT),
            "bridge did not subscribe within {READY_TIMEOUT:?}; log:\n{}",
            self.log_text()
        );
    }

    pub fn log_text(&self) -> String {
        self.log
            .text
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits (bounded) until the log, from byte `offset` on, contains `needle`.
    pub fn wait_for_log_after(&self, offset: usize, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut text = self.log.text.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if text.get(offset..).is_some_and(|t| t.contains(needle)) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            text = self
                .log
                .grew
                .wait_timeout(text, deadline - now)
                .map(|(t, _)| t)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        self.wait_for_log_after(0, needle, timeout)
    }

    /// Replaces the config file with `config` and sends SIGHUP; returns the log offset from
    /// which the reload's lines appear.
    pub fn reload_with(&self, config: &str) -> usize {
        std::fs::write(&self.config, config).expect("write config");
        let offset = self.log_text().len();
        signal(self.pid().expect("running"), libc::SIGHUP);
        offset
    }

    /// SIGTERM, and the exit status (bounded wait).
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(child.id(), libc::SIGTERM);
        wait_with_timeout(&mut child, timeout).unwrap_or_else(|| {
            panic!(
                "bridge did not exit within {timeout:?} of SIGTERM; log:\n{}",
                self.log_text()
            )
        })
    }

    /// Waits (bounded) for the process to exit by itself: its status, or `None` if it was
    /// still running at the deadline (it is killed then).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take().expect("running");
        wait_with_timeout(&mut child, timeout)
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn config_path(&self) -> &PathBuf {
        &self.config
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An MQTT test client whose event loop runs in its own task.
pub struct Client {
    pub client: AsyncClient,
    acks: tokio::sync::watch::Receiver<u64>,
    messages: tokio::sync::mpsc::UnboundedReceiver<rumqttc::Publish>,
}

impl Client {
    /// Connects with a clean session to `broker` and waits for the ConnAck.
    pub async fn connect(broker: &Mosquitto, client_id: &str) -> Client {
        Client::connect_with(broker, client_id, |_| {}).await
    }

    /// Like [`Client::connect`], with `configure` adjusting the options (e.g. credentials).
    pub async fn connect_with(
        broker: &Mosquitto,
        client_id: &str,
        configure: impl FnOnce(&mut MqttOptions),
    ) -> Client {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", broker.port());
        options.set_keep_alive(Duration::from_secs(5));
        options.set_max_packet_size(4 * 1024 * 1024, 4 * 1024 * 1024);
        options.set_inflight(100);
        configure(&mut options);
        let (client, eventloop) = AsyncClient::new(options, 1000);
        let (ack_tx, acks) = tokio::sync::watch::channel(0);
        let (msg_tx, messages) = tokio::sync::mpsc::unbounded_channel();
        let (connected_tx, connected) = tokio::sync::oneshot::channel();
        tokio::spawn(drive(eventloop, ack_tx, msg_tx, connected_tx));
        tokio::time::timeout(Duration::from_secs(10), connected)
            .await
            .expect("test client connects in time")
            .expect("test client event loop alive");
        Client {
            client,
            acks,
            messages,
        }
    }

    /// Publishes each `(topic, payload)` at QoS 1 and waits until the broker acked them all.
    pub async fn publish_all(&mut self, messages: impl IntoIterator<Item = (String, Vec<u8>)>) {
        let before = *self.acks.borrow();
        let mut n = 0u64;
        for (topic, payload) in messages {
            self.client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .expect("queue publish");
            n += 1;
        }
        let target = before + n;
        tokio::time::timeout(
            Duration::from_secs(60),
            self.acks.wait_for(|a| *a >= target),
        )
        .await
        .expect("broker acked every publish in time")
        .expect("test client event loop alive");
    }

    pub async fn publish(&mut self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.publish_all([(topic.to_string(), payload.into())])
            .await;
    }

    pub async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
    }

    /// The next message received, within `timeout`.
    pub async fn next_message(&mut self, timeout: Duration) -> Option<rumqttc::Publish> {
        tokio::time::timeout(timeout, self.messages.recv())
            .await
            .ok()
            .flatten()
    }
}

async fn drive(
    mut eventloop: EventLoop,
    acks: tokio::sync::watch::Sender<u64>,
    messages: tokio::sync::mpsc::UnboundedSender<rumqttc::Publish>,
    connected: tokio::sync::oneshot::Sender<()>,
) {
    let mut connected = Some(connected);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                if let Some(tx) = connected.take() {
                    let _ = tx.send(());
                }
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => acks.send_modify(|a| *a += 1),
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let _ = messages.send(p);
            }
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Polls `check` until it returns `Some`, within `timeout`: for state that lands in Redis,
/// where no event tells the test it arrived.
pub async fn eventually<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `routemq-bridge check` on `config` (without the environment's `JOURNAL_STREAM`,
/// `REDIS_HOST` and `REDIS_URL`, which would change what it says): the exit code and what
/// it printed on stdout and stderr.
pub fn check_config(config: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bridge.toml");
    std::fs::write(&path, config).expect("write config");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_routemq-bridge"))
        .arg("check")
        .arg("--config")
        .arg(&path)
        .env_remove("JOURNAL_STREAM")
        .env_remove("REDIS_HOST")
        .env_remove("REDIS_URL")
        .output()
        .expect("run routemq-bridge check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), text)
}
