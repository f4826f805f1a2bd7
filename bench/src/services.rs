//! The processes a run needs: a private `redis-server` and `mosquitto` on free loopback
//! ports, each in a temporary directory of its own (never the machine's 6379/1883), and
//! the bridge under test, whose log lines are timestamped as they arrive so the bench can
//! tell when it connected without instrumenting it.
//!
//! Every process is killed and every directory removed when its handle drops, also when the
//! bench fails half-way.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::Res;

const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> Res<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!(
            "routemq-bench-{}-{label}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).map_err(|e| format!("create {}: {e}", path.display()))?;
        Ok(TempDir(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> Res<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// `name` on `PATH` or in the sbin directories (where Debian puts `mosquitto`).
pub fn find_binary(name: &str, package: &str) -> Res<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| format!("`{name}` not found: apt-get install -y {package}").into())
}

fn listening(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Sends `signal` (a `kill` name such as `TERM`) to `pid`.
fn kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status();
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A broker or Redis server.
pub struct Service {
    pub port: u16,
    child: Child,
    dir: TempDir,
}

impl Service {
    fn start(name: &str, binary: &Path, args: &[String], dir: TempDir, port: u16) -> Res<Self> {
        let log = std::fs::File::create(dir.path().join("server.log"))?;
        let child = Command::new(binary)
            .args(args)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("start {}: {e}", binary.display()))?;
        let mut service = Service { port, child, dir };
        let deadline = Instant::now() + START_TIMEOUT;
        // Nothing announces that a server listens: poll its port, bounded.
        while !listening(port) {
            if let Ok(Some(status)) = service.child.try_wait() {
                return Err(format!("{name} exited with {status}: {}", service.log()).into());
            }
            if Instant::now() >= deadline {
                return Err(format!("{name} did not listen on {port} within 15 s").into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(service)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `redis-server` without persistence.
pub fn redis() -> Res<Service> {
    redis_server("redis", &[])
}

/// `redis-server` without persistence on `port` (the spool part starts it only once the
/// bridge has spooled its load).
pub fn redis_on(port: u16) -> Res<Service> {
    redis_server_on("redis-late", &[], port)
}

/// `redis-server` without persistence in a directory of its own, with `extra` arguments.
fn redis_server(label: &str, extra: &[&str]) -> Res<Service> {
    redis_server_on(label, extra, free_port()?)
}

fn redis_server_on(label: &str, extra: &[&str], port: u16) -> Res<Service> {
    let binary = find_binary("redis-server", "redis-server")?;
    let dir = TempDir::new(label)?;
    let (port_arg, dir_arg) = (port.to_string(), dir.path().display().to_string());
    let args: Vec<String> = [
        "--port",
        &port_arg,
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        &dir_arg,
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect();
    Service::start("redis-server", &binary, &args, dir, port)
}

/// A Redis Cluster of `masters` nodes without replicas (`cluster-enabled yes`, slots split by
/// `redis-cli --cluster create`), no persistence; returns once every node says
/// `cluster_state:ok`. Replicas would only add replication CPU to what is measured.
pub fn redis_cluster(masters: usize) -> Res<Vec<Service>> {
    let cli = find_binary("redis-cli", "redis-tools")?;
    let nodes = (0..masters)
        .map(|_| {
            redis_server(
                "redis-cluster",
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                ],
            )
        })
        .collect::<Res<Vec<_>>>()?;
    let mut create = Command::new(&cli);
    create.arg("--cluster").arg("create");
    for node in &nodes {
        create.arg(format!("127.0.0.1:{}", node.port));
    }
    let out = create
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("redis-cli --cluster create: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        )
        .into());
    }
    let deadline = Instant::now() + START_TIMEOUT;
    for node in &nodes {
        loop {
            let info = Command::new(&cli)
                .args(["-p", &node.port.to_string(), "cluster", "info"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            if info.contains("cluster_state:ok") {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!("cluster node {} not ok within 15 s", node.port).into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(nodes)
}

/// `mosquitto` holding persistent sessions in memory, with no cap on queued messages (its
/// default of 1000 per client would drop most of a preloaded queue) and the given in-flight
/// window (`max_inflight_messages`, 20 by default), the same for every subscriber measured.
pub fn mosquitto(max_inflight: u16) -> Res<Service> {
    let binary = find_binary("mosquitto", "mosquitto")?;
    let dir = TempDir::new("mosquitto")?;
    let port = free_port()?;
    let conf = dir.path().join("mosquitto.conf");
    let mut file = std::fs::File::create(&conf)?;
    writeln!(
        file,
        "listener {port} 127.0.0.1\n\
         allow_anonymous true\n\
         persistence false\n\
         max_queued_messages 100000000\n\
         max_queued_bytes 0\n\
         max_inflight_messages {max_inflight}\n\
         log_dest stdout\n\
         log_type error\n\
         log_type warning"
    )?;
    let args = vec!["-c".to_string(), conf.display().to_string()];
    Service::start("mosquitto", &binary, &args, dir, port)
}

/// A running bridge, its stderr read line by line on a thread.
pub struct Bridge {
    child: Child,
    lines: mpsc::Receiver<(Instant, String)>,
    log: Vec<String>,
}

/// RouteMQ's and the bridge's own variables would override the generated config.
fn overrides_config(name: &str) -> bool {
    name.starts_with("REDIS_")
        || name.starts_with("MQTT_")
        || name.starts_with("ROUTEMQ_BRIDGE_")
        || name == "ENABLE_REDIS"
        || name == "RUST_LOG"
        || name == "JOURNAL_STREAM"
}

impl Bridge {
    /// Starts `binary run --config config`; `prefix` (e.g. a profiler) wraps the command.
    pub fn spawn(prefix: &[String], binary: &Path, config: &Path) -> Res<Bridge> {
        let mut command = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(binary);
                c
            }
            None => Command::new(binary),
        };
        command.arg("run").arg("--config").arg(config);
        for (name, _) in std::env::vars_os() {
            if name.to_str().is_some_and(overrides_config) {
                command.env_remove(name);
            }
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("start {}: {e}", binary.display()))?;
        let stderr = child.stderr.take().ok_or("bridge stderr not piped")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        Ok(Bridge {
            child,
            lines: rx,
            log: Vec::new(),
        })
    }

    /// The bridge's pid (under a profiler prefix: the profiler's, which runs it in-process
    /// for valgrind, or as its child for perf — measure footprint without a prefix).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (`STOP`, `CONT`, ...).
    pub fn signal(&self, signal: &str) {
        kill(self.child.id(), signal);
    }

    /// When a log line containing `needle` arrived, waiting at most `timeout`.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Res<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((at, line)) => {
                    let found = line.contains(needle);
                    self.log.push(line);
                    if found {
                        return Ok(at);
                    }
                }
                Err(_) => {
                    self.drain_log();
                    return Err(format!(
                        "the bridge did not log {needle:?} within {timeout:?}; its log:\n{}",
                        self.log.join("\n")
                    )
                    .into());
                }
            }
        }
    }

    fn drain_log(&mut self) {
        while let Ok((_, line)) = self.lines.try_recv() {
            self.log.push(line);
        }
    }

    /// Log lines at warn level or above seen so far.
    pub fn warnings(&mut self) -> Vec<String> {
        self.drain_log();
        self.log
            .iter()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .cloned()
            .collect()
    }

    /// SIGTERM and wait; the exit status, or an error when it would not stop.
    pub fn terminate(mut self, timeout: Duration) -> Res<ExitStatus> {
        kill(self.child.id(), "TERM");
        match wait_with_timeout(&mut self.child, timeout) {
            Some(status) => Ok(status),
            None => Err(format!("the bridge did not exit within {timeout:?} of SIGTERM").into()),
        }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
