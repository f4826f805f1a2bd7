//! The Redis manager of spec §3 against a real `redis-server`: the seed's methods and their
//! sentinels, the `try_` forms, JSON shared with RouteMQ (Python), recovery, timeouts,
//! credentials and the connection bound.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use redis::Commands;
use routemq_bridge::config::Secret;
use routemq_bridge::redis::{ConnectionState, Error, RedisConfig, RedisManager, SetOptions};
use serde::{Deserialize, Serialize};

use crate::harness::Redis;

/// Upper bound of any single wait in these tests; reaching it is a failure, not a delay.
const WAIT: Duration = Duration::from_secs(15);

fn config_for(redis: &Redis) -> RedisConfig {
    RedisConfig {
        host: "127.0.0.1".into(),
        port: redis.port(),
        socket_timeout: Duration::from_secs(2),
        socket_connect_timeout: Duration::from_secs(2),
        ..RedisConfig::default()
    }
}

async fn bounded<F: Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {WAIT:?}"))
}

async fn connected(config: RedisConfig) -> RedisManager {
    let manager = RedisManager::new(config);
    assert!(
        bounded("initialize", manager.initialize()).await,
        "initialize() must succeed against a running Redis"
    );
    manager
}

async fn wait_for_state(manager: &RedisManager, wanted: ConnectionState) {
    let mut state = manager.state();
    bounded("state change", state.wait_for(|s| *s == wanted))
        .await
        .expect("the manager is alive");
}

/// Runs a blocking harness call (process start/stop) without stalling the runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[tokio::test]
async fn set_with_ex_expires_in_whole_seconds() {
    let redis = Redis::start();
    let m = connected(config_for(&redis)).await;
    assert!(
        m.set("k", "v", SetOptions::new().ex(Duration::from_secs(60)))
            .await
    );
    let ttl = m.ttl("k").await;
    assert!((1..=60).contains(&ttl), "ttl {ttl}");
    assert_eq!(m.get("k").await.as_deref(), Some("v"));
}

#[tokio::test]
async fn set_with_px_expires_in_milliseconds() {
    let redis = Redis::start();
    let m = connected(config_for(&redis)).await;
    assert!(
        m.set("k", "v", SetOptions::new().px(Duration::from_millis(5000)))
            .await
    );
    let pttl: i64 = redis.client().pttl("k").expect("pttl");
    assert!((1..=5000).contains(&pttl), "pttl {pttl}");
}

#[tokio::test]
async fn set_nx_refused_is_ok_false_not_an_error_and_sentinel_false() {
    let redis = Redis::start();
    let m = connected(config_for(&redis)).await;
    assert_eq!(
        m.try_set("k", "first", SetOptions::new().nx()).await,
        Ok(true)
    );
    assert_eq!(
        m.try_set("k", "second", SetOptions::new().nx()).await,
        Ok(false)
    );
    assert!(!m.set("k", "third", SetOptions::new().nx()).await);
    assert_eq!(m.get("k").await.as_deref(), Some("first"));
}

#[tokio::test]
async fn set_xx_writes_only_an_existing_key() {
    let redis = Redis::start();
    let m = connected(config_for(&redis)).await;
    assert_eq!(m.try_set("k", "v", SetOptions::new().xx()).await, Ok(false));
    assert_eq!(m.get("k").await, None);
    assert!(m.set("k", "v1", SetOptions::new()).await);
    assert!(m.set("k", "v2", SetOptions::new().xx()).await);
    assert_eq!(m.get("k").await.as_deref(), Some("v2"));
}

#[tokio::test]
async fn get_tells_missing_from_failed() {
    let redis = Redis::start();
    let m = connected(config_for(&redis)).await;
    assert_eq!(m.try_get("missing").await, Ok(None));
    assert_eq!(m.hset("h", "f", "v").await, 1);
    // GET on a hash: Redis refuses with WRONGTYPE; the sentinel hides it, try_ does not.
    assert!(matches!(m.try_get("h").await, Err(Error::Response(e)) if e.contains("WRONGTYPE")));
    assert_eq!(m.get("h").await, None);
}

#[tokio::test]
async fn ttl_is_minus_one_without_expiry_and_minus_two_when_missing() {
    let redis = Redis::start();
    let m = connected(config_for(&redis)).await;
    assert!(m.set("persistent", "v", SetOptions::new()).await);
    assert_eq!(m.ttl("persistent").await, -1);
    assert_eq!(m.ttl("missing").await, -2);
    assert_eq!(m.try_ttl("missing").await, Ok(-2));
}

#[tokio::test]
async fn delete_of_several_keys_counts_those_that_existed() {
    let redis = Redis::start();
    let m = connected(config_for(&redis)).await;
    for k in ["a", "b", "c"] {
        assert!(m.set(k, "1", SetOptions::new()).await);
    }
    assert_eq!(m.delete(&["a", "b", "missing"]).await, 2);
    assert_eq!(m.delete("c").await, 1);
    assert_eq!(m.delete(Vec::<String>::new()).await, 0);
    assert!(!m.exists("a").await && !m.exists("c").await);
}

#[tokio::test]
async fn exists_tells_present_from_missing() {
    let redis = Redis::start();
    let m = connected(config_for(&redis)).await;
    assert!(!m.exists("k").await);
    assert!(m.set("k", "v", SetOptions::new()).await);
    assert!(m.exists("k").await);
    assert_eq!(m.try_exists("other").await, Ok(false));
}

#[tokio::test]
async fn expire_sets_an_expiry_on_an_existing_key_only() {
    let redis = Redis::start();
    let m = connected(config_for(&redis)).await;
    assert!(!m.expire("missing", Duration::from_secs(30)).await);
    assert!(m.set("k", "v", SetOptions::new()).await);
    assert!(m.expire("k", Duration::from_secs(30)).await);
    let ttl = m.ttl("k").await;
    assert!((1..=30).contains(&ttl), "ttl {ttl}");
    assert!(m.expire("k", Duration::from_millis(2500)).await);
    let pttl: i64 = redis.client().pttl("k").expect("pttl");
    assert!((1..=2500).contains(&pttl), "pttl {pttl}");
}

#[tokio::test]
async fn incr_adds_the_amount() {
    let redis = Redis::start();
    let m = connected(config_for(&redis)).await;
    assert_eq!(m.incr("n", 1).await, Some(1));
    assert_eq!(m.incr("n", 41).await, Some(42));
    assert_eq!(m.incr("n", -2).await, Some(40));
    assert!(m.set("text", "abc", SetOptions::new()).await);
    assert_eq!(m.incr("text", 1).await, None);
    assert!(matches!(
        m.try_incr("text", 1).await,
        Err(Error::Response(_))
    ));
}

#[tokio::test]
async fn hset_of_one_field_and_of_a_mapping_counts_new_fields() {
    let redis = Redis::start();
    let m = connected(config_for(&redis)).await;
    assert_eq!(m.hset("h", "a", "1").await, 1);
    assert_eq!(m.hset("h", "a", "2").await, 0, "an update adds no field");
    assert_eq!(
        m.hset_many("h", &[("a", "3"), ("b", "4"), ("c", "5")])
            .await,
        2
    );
    let mut map = BTreeMap::new();
    map.insert("d", 6);
    map.insert("e", 7);
    assert_eq!(m.hset_many("h", &map).await, 2);
    assert_eq!(m.hset_many("h", BTreeMap::<String, String>::new()).await, 0);
    let all: BTreeMap<String, String> = redis.client().hgetall("h").expect("hgetall");
    assert_eq!(all.len(), 5);
    assert_eq!(all["a"], "3");
}

#[tokio::test]
async fn hget_reads_a_field_and_none_when_missing() {
    let redis = Redis::start();
    let m = connected(config_for(&redis)).await;
    assert_eq!(m.hset("h", "f", "v").await, 1);
    assert_eq!(m.hget("h", "f").await.as_deref(), Some("v"));
    assert_eq!(m.hget("h", "nope").await, None);
    assert_eq!(m.try_hget("missing", "f").await, Ok(None));
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Reading {
    a: i64,
    b: Vec<i64>,
    s: String,
}

#[tokio::test]
async fn get_json_reads_a_typed_value_and_decode_errors_are_told_apart() {
    let redis = Redis::start();
    let m = connected(config_for(&redis)).await;
    let value = Reading {
        a: 1,
        b: vec![1, 2],
        s: "café".into(),
    };
    assert!(m.set_json("j", &value, SetOptions::new()).await);
    assert_eq!(m.get_json::<_, Reading>("j").await, Some(value));
    assert_eq!(m.try_get_json::<_, Reading>("missing").await, Ok(None));
    assert!(m.set("bad", "not json", SetOptions::new()).await);
    assert!(matches!(
        m.try_get_json::<_, Reading>("bad").await,
        Err(Error::Decode(_))
    ));
    assert_eq!(m.get_json::<_, Reading>("bad").await, None);
}

/// What `python3 -c <script>` prints, given `stdin`.
fn python(script: &str, stdin: &[u8]) -> (bool, String) {
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is installed");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(stdin)
        .expect("write to python");
    let out = child.wait_with_output().expect("python3 runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test]
async fn get_json_reads_json_written_by_routemq_python_json_dumps() {
    let redis = Redis::start();
    let m = connected(config_for(&redis)).await;
    let mut sync = redis.client();
    // Exactly what RouteMQ's set_json stores: json.dumps with its default separators and
    // ASCII escapes.
    let _: () = sync
        .set("literal", r#"{"a": 1, "b": [1, 2], "s": "caf\u00e9"}"#)
        .expect("set");
    let expected = Reading {
        a: 1,
        b: vec![1, 2],
        s: "café".into(),
    };
    assert_eq!(m.get_json::<_, Reading>("literal").await, Some(expected));

    // And straight from Python, including a character outside the BMP (a surrogate pair).
    let (ok, dumped) = python(
        r#"import json; print(json.dumps({"a": 2, "b": [], "s": "\u00e9\U0001F600"}), end="")"#,
        b"",
    );
    assert!(ok, "python json.dumps failed");
    assert!(dumped.contains(r"\ud83d\ude00"), "{dumped}");
    let _: () = sync.set("python", &dumped).expect("set");
    let got: Option<Reading> = m.get_json("python").await;
    assert_eq!(got.map(|r| r.s), Some("é😀".to_string()));
}

#[tokio::test]
async fn json_we_write_is_what_python_json_loads_accepts() {
    let redis = Redis::start();
    let m = connected(config_for(&redis)).await;
    let value =
        serde_json::json!({"a": 1, "b": [1, 2.5, null, true], "s": "café 😀", "n": {"x": "\"q\""}});
    assert!(m.set_json("j", &value, SetOptions::new()).await);
    let raw: Vec<u8> = redis.client().get("j").expect("get");
    assert!(!raw.contains(&b'\n'), "compact output");
    let (ok, reparsed) = python(
        "import json,sys; d = json.loads(sys.stdin.buffer.read().decode('utf-8')); \
         print(json.dumps(d, sort_keys=True, ensure_ascii=False, separators=(',', ':')), end='')",
        &raw,
    );
    assert!(
        ok,
        "json.loads rejected {:?}",
        String::from_utf8_lossy(&raw)
    );
    let back: serde_json::Value = serde_json::from_str(&reparsed).expect("python's output");
    assert_eq!(back, value);
}

#[tokio::test]
async fn disabled_manager_returns_sentinels_and_try_forms_say_disabled() {
    let redis = Redis::start();
    let m = RedisManager::new(RedisConfig {
        enabled: false,
        ..config_for(&redis)
    });
    assert!(!m.initialize().await);
    assert!(!m.is_enabled());
    assert_eq!(*m.state().borrow(), ConnectionState::Disabled);
    assert!(m.get_client().is_none());

    assert_eq!(m.get("k").await, None);
    assert!(!m.set("k", "v", SetOptions::new()).await);
    assert_eq!(m.delete(&["a", "b"]).await, 0);
    assert!(!m.exists("k").await);
    assert!(!m.expire("k", Duration::from_secs(1)).await);
    assert_eq!(m.ttl("k").await, -2);
    assert_eq!(m.incr("k", 1).await, None);
    assert_eq!(m.hset("h", "f", "v").await, 0);
    assert_eq!(m.hset_many("h", &[("f", "v")]).await, 0);
    assert_eq!(m.hget("h", "f").await, None);
    assert!(!m.set_json("j", &1, SetOptions::new()).await);
    assert_eq!(m.get_json::<_, i64>("j").await, None);

    assert_eq!(m.try_get("k").await, Err(Error::Disabled));
    assert_eq!(
        m.try_set("k", "v", SetOptions::new()).await,
        Err(Error::Disabled)
    );
    assert_eq!(m.try_delete(&["a", "b"]).await, Err(Error::Disabled));
    assert_eq!(m.try_exists("k").await, Err(Error::Disabled));
    assert_eq!(
        m.try_expire("k", Duration::from_secs(1)).await,
        Err(Error::Disabled)
    );
    assert_eq!(m.try_ttl("k").await, Err(Error::Disabled));
    assert_eq!(m.try_incr("k", 1).await, Err(Error::Disabled));
    assert_eq!(m.try_hset("h", "f", "v").await, Err(Error::Disabled));
    assert_eq!(
        m.try_hset_many("h", &[("f", "v")]).await,
        Err(Error::Disabled)
    );
    assert_eq!(m.try_hget("h", "f").await, Err(Error::Disabled));
    assert_eq!(
        m.try_set_json("j", &1, SetOptions::new()).await,
        Err(Error::Disabled)
    );
    assert_eq!(m.try_get_json::<_, i64>("j").await, Err(Error::Disabled));
    assert_eq!(
        m.query::<String>(&redis::cmd("PING")).await,
        Err(Error::Disabled)
    );
    assert!(matches!(
        m.dedicated_connection().await,
        Err(Error::Disabled)
    ));

    // Nothing reached Redis.
    let keys: Vec<String> = redis.client().keys("*").expect("keys");
    assert!(keys.is_empty(), "{keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_initialize_comes_up_without_another_initialize() {
    let mut redis = Redis::start();
    blocking(|| redis.kill());
    let m = RedisManager::new(config_for(&redis));
    assert!(!bounded("initialize", m.initialize()).await);
    assert!(!m.is_enabled());
    assert!(matches!(m.try_get("k").await, Err(Error::Unavailable(_))));

    blocking(|| redis.start_again());
    wait_for_state(&m, ConnectionState::Up).await;
    assert!(m.is_enabled());
    assert!(m.set("k", "v", SetOptions::new()).await);
    assert_eq!(m.get("k").await.as_deref(), Some("v"));
    assert_eq!(m.reconnects(), 0, "the first connection is not a reconnect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_use_gives_sentinels_then_recovers() {
    let mut redis = Redis::start();
    let m = connected(config_for(&redis)).await;
    assert!(m.set("k", "v", SetOptions::new()).await);

    blocking(|| redis.kill());
    // Whether a call finds the dead socket or the health task got there first, every
    // method answers with its sentinel, quickly, without panicking.
    let sentinels = async {
        assert_eq!(m.get("k").await, None);
        assert!(!m.set("k", "v2", SetOptions::new()).await);
        assert_eq!(m.ttl("k").await, -2);
        assert_eq!(m.incr("n", 1).await, None);
        assert_eq!(m.delete("k").await, 0);
    };
    bounded("calls while Redis is down", sentinels).await;
    let err = m.try_get("k").await.expect_err("redis is down");
    assert!(err.is_transient(), "{err:?}");
    wait_for_state(&m, ConnectionState::Down).await;

    blocking(|| redis.start_again());
    wait_for_state(&m, ConnectionState::Up).await;
    assert!(m.set("k", "back", SetOptions::new()).await);
    assert_eq!(m.get("k").await.as_deref(), Some("back"));
    assert!(m.reconnects() >= 1, "reconnects = {}", m.reconnects());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_timeout_bounds_a_call_to_a_blocked_redis() {
    let redis = Redis::start_with(&["--enable-debug-command", "yes"]);
    let m = connected(RedisConfig {
        socket_timeout: Duration::from_millis(300),
        ..config_for(&redis)
    })
    .await;
    // DEBUG SLEEP blocks the whole server: this very command gets no answer in time.
    let sleep = redis::cmd("DEBUG").arg("SLEEP").arg(2).clone();
    assert_eq!(
        bounded("blocked call", m.query::<()>(&sleep)).await,
        Err(Error::Timeout)
    );
    // The timeout marked the connection down: the next call fails fast instead of queueing
    // behind the blocked server.
    assert!(matches!(m.try_get("k").await, Err(Error::Unavailable(_))));
    wait_for_state(&m, ConnectionState::Up).await;
    assert!(m.set("k", "v", SetOptions::new()).await);
}

/// Protects `redis` with a password after start-up (the harness's readiness probe sends an
/// unauthenticated PING, so `--requirepass` on the command line would never look ready).
fn require_password(redis: &Redis, password: &str) {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg(password)
        .query(&mut redis.client())
        .expect("config set requirepass");
}

#[tokio::test]
async fn password_authenticates_the_default_user() {
    let redis = Redis::start();
    require_password(&redis, "0123456");
    let m = connected(RedisConfig {
        password: Some(Secret::new("0123456")),
        ..config_for(&redis)
    })
    .await;
    assert!(m.set("k", "v", SetOptions::new()).await);

    let wrong = RedisManager::new(RedisConfig {
        password: Some(Secret::new("wrong")),
        ..config_for(&redis)
    });
    assert!(!bounded("initialize", wrong.initialize()).await);
    assert_eq!(wrong.get("k").await, None);
    wrong.disconnect().await;
}

#[tokio::test]
async fn acl_username_and_password_authenticate() {
    let redis = Redis::start();
    let mut admin = redis.client();
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "bridge", "on", ">s3cret", "~*", "&*", "+@all"])
        .query(&mut admin)
        .expect("acl setuser bridge");
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "default", "off"])
        .query(&mut admin)
        .expect("acl setuser default off");
    let m = connected(RedisConfig {
        username: Some("bridge".into()),
        password: Some(Secret::new("s3cret")),
        ..config_for(&redis)
    })
    .await;
    let whoami: String = m
        .query(redis::cmd("ACL").arg("WHOAMI"))
        .await
        .expect("acl whoami");
    assert_eq!(whoami, "bridge");

    // The URL form gets the same credentials.
    let via_url = connected(RedisConfig {
        url: Some(Secret::new(format!("redis://127.0.0.1:{}/0", redis.port()))),
        username: Some("bridge".into()),
        password: Some(Secret::new("s3cret")),
        ..config_for(&redis)
    })
    .await;
    assert!(via_url.set("k", "v", SetOptions::new()).await);

    let anonymous = RedisManager::new(config_for(&redis));
    assert!(!bounded("initialize", anonymous.initialize()).await);
    anonymous.disconnect().await;
}

#[tokio::test]
async fn max_connections_exhausted_gives_pool_exhausted() {
    let redis = Redis::start();
    let m = connected(RedisConfig {
        max_connections: 3,
        ..config_for(&redis)
    })
    .await;
    // One of the three is the command connection.
    let (client, first) = m.dedicated_connection().await.expect("first dedicated");
    let (_, second) = m.dedicated_connection().await.expect("second dedicated");
    assert!(matches!(
        m.dedicated_connection().await,
        Err(Error::PoolExhausted)
    ));
    // Commands still work: they share the command connection.
    assert!(m.set("k", "v", SetOptions::new()).await);
    // The client it hands out works.
    let mut conn = bounded(
        "dedicated connect",
        client.get_multiplexed_async_connection_with_config(&m.dedicated_connection_config()),
    )
    .await
    .expect("dedicated connection");
    let v: String = redis::cmd("GET")
        .arg("k")
        .query_async(&mut conn)
        .await
        .expect("get");
    assert_eq!(v, "v");
    drop(first);
    assert!(
        m.dedicated_connection().await.is_ok(),
        "a dropped permit is given back"
    );
    drop(second);
}

#[tokio::test]
async fn password_is_not_in_the_debug_output() {
    let redis = Redis::start();
    require_password(&redis, "hunter2-pw");
    let m = connected(RedisConfig {
        url: Some(Secret::new(format!(
            "redis://:hunter2-pw@127.0.0.1:{}",
            redis.port()
        ))),
        password: Some(Secret::new("hunter2-pw")),
        ..config_for(&redis)
    })
    .await;
    let debug = format!("{m:?} {:?} {:?}", m.config(), m.get_client());
    assert!(!debug.contains("hunter2"), "{debug}");
    assert!(debug.contains("redacted"), "{debug}");
}

#[tokio::test]
async fn get_client_runs_pipelines_and_transactions() {
    let redis = Redis::start();
    let m = connected(config_for(&redis)).await;
    let mut conn = m.get_client().expect("connected");
    let (a, b): (i64, i64) = redis::pipe()
        .atomic()
        .incr("x", 1)
        .incr("x", 2)
        .query_async(&mut conn)
        .await
        .expect("transaction");
    assert_eq!((a, b), (1, 3));
    let mut pipe = redis::pipe();
    pipe.set("y", "1").ignore().get("y");
    let (y,): (String,) = m.query_pipeline(&pipe).await.expect("pipeline");
    assert_eq!(y, "1");
}

#[tokio::test]
async fn disconnect_stops_reconnecting_and_initialize_starts_again() {
    let redis = Redis::start();
    let m = connected(config_for(&redis)).await;
    m.disconnect().await;
    assert!(!m.is_enabled());
    assert!(m.get_client().is_none());
    assert!(matches!(m.try_get("k").await, Err(Error::Unavailable(_))));
    // Nothing brings it back by itself: the health task is gone.
    let mut state = m.state();
    let came_back = tokio::time::timeout(
        Duration::from_millis(1500),
        state.wait_for(|s| *s == ConnectionState::Up),
    )
    .await;
    assert!(came_back.is_err(), "disconnected manager reconnected");
    assert!(bounded("initialize", m.initialize()).await);
    assert!(m.set("k", "v", SetOptions::new()).await);
}

/// Collects everything a `tracing` subscriber writes, for asserting on log lines.
#[derive(Clone, Default)]
struct LogBuffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuffer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log buffer")).into_owned()
    }
}

#[tokio::test]
async fn warnings_are_rate_limited_not_one_per_call() {
    let logs = LogBuffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .finish();
    // current_thread runtime: the manager's tasks run on this thread and log here too.
    let _guard = tracing::subscriber::set_default(subscriber);

    let mut redis = Redis::start();
    redis.kill();
    let m = RedisManager::new(config_for(&redis));
    assert!(!m.initialize().await);
    for _ in 0..200 {
        assert_eq!(m.get("k").await, None);
    }
    let text = logs.text();
    let failures = text.matches("redis GET failed").count();
    assert_eq!(
        failures, 1,
        "one warning for 200 failed calls, got:\n{text}"
    );
    assert!(text.lines().count() <= 3, "log flooded:\n{text}");
}

#[tokio::test]
async fn run_script_survives_a_script_cache_flush() {
    let redis = Redis::start();
    let m = connected(config_for(&redis)).await;
    let script = redis::Script::new("return redis.call('INCRBY', KEYS[1], ARGV[1])");
    let first: i64 = m.run_script(script.key("n").arg(5)).await.expect("script");
    assert_eq!(first, 5);
    // After a Redis restart the script cache is empty: EVALSHA fails, EVAL must follow.
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query(&mut redis.client())
        .expect("script flush");
    let second: i64 = m
        .run_script(script.key("n").arg(1))
        .await
        .expect("script after flush");
    assert_eq!(second, 6);
    let bad = redis::Script::new("return redis.call('NOPE')");
    assert!(matches!(
        m.run_script::<()>(&bad.prepare_invoke()).await,
        Err(Error::Script(_))
    ));
}

#[test]
fn the_process_wide_default_manager_is_built_once_from_the_environment() {
    let first = RedisManager::global();
    let second = RedisManager::global();
    assert!(std::ptr::eq(first, second));
    let expected = RedisConfig::from_env().unwrap_or_default();
    assert_eq!(first.config(), &expected);
}
