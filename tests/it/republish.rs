//! Redis → MQTT republish (spec §7) against real Redis and Mosquitto, through the library
//! (`RepublishService`, as the daemon runs it) so outcome counts and the subscription's
//! state can be observed; one test drives the real daemon for the wiring.

use std::future::Future;
use std::time::{Duration, Instant};

use redis::Commands;
use routemq_bridge::daemon::config::BridgeConfig;
use routemq_bridge::dead_letter::DeadLetter;
use routemq_bridge::redis::RedisManager;
use routemq_bridge::republish::{RepublishService, Republisher};
use rumqttc::QoS;

use crate::bridge::{config, eventually, Bridge, Client};
use crate::harness::{FaultProxy, Mosquitto, Redis};

/// A pub/sub rule: `commands:<device>` → `devices/<device>/commands`.
const COMMANDS_RULE: &str = r#"
[[republish]]
name = "commands"
source = "pubsub"
channel = "commands:{device_id}"
topic = "devices/{device_id}/commands"
"#;

/// Upper bound of any single wait; reaching it is a failure.
const WAIT: Duration = Duration::from_secs(20);

async fn bounded<F: Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not happen within {WAIT:?}"))
}

/// Runs a blocking harness call (process start/stop) without stalling the runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// The republisher of `rules` (TOML), started as the daemon starts it.
struct Running {
    service: RepublishService,
    _dir: tempfile::TempDir,
}

impl Running {
    async fn start(redis: &Redis, broker: &Mosquitto, client_id: &str, rules: &str) -> Running {
        Running::start_with(&config(redis, broker, client_id, rules)).await
    }

    /// Like [`Running::start`], from a whole config file's text.
    async fn start_with(text: &str) -> Running {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bridge.toml");
        std::fs::write(&path, text).expect("write config");
        let (config, _) = BridgeConfig::compile(&path, &Default::default())
            .unwrap_or_else(|e| panic!("config: {e:?}"));
        let manager = RedisManager::new(config.redis.clone());
        assert!(manager.initialize().await, "redis is up");
        let mut service = RepublishService::new(&config.mqtt, &manager);
        service
            .apply(
                &config.republish_rules,
                DeadLetter {
                    list: "dead_letter".into(),
                    max_len: 100,
                    max_payload: routemq_bridge::dead_letter::DEFAULT_MAX_PAYLOAD,
                },
            )
            .await
            .expect("republish starts");
        Running { service, _dir: dir }
    }

    fn republisher(&self) -> &Republisher {
        self.service.republisher().expect("rules are running")
    }

    fn count(&self, rule: &str, outcome: &str) -> u64 {
        self.republisher().stats().count(rule, outcome)
    }

    async fn pubsub_subscribed(&self) {
        let monitor = self.republisher().pubsub().expect("pub/sub rules run");
        assert!(bounded("pub/sub subscription", monitor.subscribed()).await);
    }
}

/// A test client subscribed to `filter`, proven active by a probe published to
/// `probe_topic` (which `filter` must match) coming back.
async fn listener(broker: &Mosquitto, id: &str, filter: &str, probe_topic: &str) -> Client {
    let mut client = Client::connect(broker, id).await;
    client.subscribe(filter).await;
    client.publish(probe_topic, "probe").await;
    loop {
        let message = client
            .next_message(WAIT)
            .await
            .expect("the probe comes back: the subscription is active");
        if message.topic == probe_topic {
            return client;
        }
    }
}

/// The next message on `topic`, skipping others (probes, retained leftovers).
async fn next_on(client: &mut Client, topic: &str) -> rumqttc::Publish {
    loop {
        let message = client
            .next_message(WAIT)
            .await
            .unwrap_or_else(|| panic!("a message on {topic} within {WAIT:?}"));
        if message.topic == topic {
            return message;
        }
    }
}

fn publish(redis: &Redis, channel: &str, payload: &str) {
    let mut conn = redis.client().get_connection().expect("redis");
    let _: i64 = conn.publish(channel, payload).expect("PUBLISH");
}

/// Publishes `payload` on `channel` until its republished copy arrives on `topic`: nothing
/// says when a (re)started subscriber is listening, and pub/sub keeps nothing for it.
async fn publish_until_republished(
    redis: &Redis,
    client: &mut Client,
    (channel, payload): (&str, &str),
    topic: &str,
    what: &str,
) -> rumqttc::Publish {
    bounded(what, async {
        loop {
            publish(redis, channel, payload);
            if let Some(m) = client.next_message(Duration::from_millis(200)).await {
                if m.topic == topic {
                    return m;
                }
            }
        }
    })
    .await
}

/// Entries of `stream` not yet acknowledged by `group`; `None` while the group is missing.
pub(crate) fn pending(redis: &Redis, stream: &str, group: &str) -> Option<i64> {
    let mut conn = redis.client().get_connection().ok()?;
    let reply: redis::Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query(&mut conn)
        .ok()?;
    match reply {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::Int(n)) => Some(*n),
            _ => None,
        },
        _ => None,
    }
}

/// Waits until the rule's consumer group exists (entries added before are not read).
async fn group_exists(redis: &Redis, stream: &str, group: &str) {
    let found = eventually(WAIT, || pending(redis, stream, group)).await;
    assert!(found.is_some(), "group {group} on {stream} was created");
}

fn xadd(redis: &Redis, stream: &str, fields: &[(&str, &str)]) -> String {
    let mut conn = redis.client().get_connection().expect("redis");
    conn.xadd(stream, "*", fields).expect("XADD")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn literal_and_pattern_channels_reach_their_topics_with_qos_and_retain() {
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let running = Running::start(
        &redis,
        &broker,
        "rp-channels",
        r#"
[[republish]]
name = "all-alerts"
source = "pubsub"
channel = "alerts:all"
topic = "site/alerts"
qos = 0
retain = true

[[republish]]
name = "device-commands"
source = "pubsub"
channel = "commands:{device_id}"
topic = "devices/{device_id}/commands"
qos = 1
payload = "cmd={payload}"
"#,
    )
    .await;
    running.pubsub_subscribed().await;
    let mut client = listener(&broker, "rp-channels-sub", "#", "probe/channels").await;

    publish(&redis, "commands:dev-7", "reboot");
    let command = next_on(&mut client, "devices/dev-7/commands").await;
    assert_eq!(command.payload.as_ref(), b"cmd=reboot");
    assert_eq!(command.qos, QoS::AtLeastOnce);

    publish(&redis, "alerts:all", "fire");
    let alert = next_on(&mut client, "site/alerts").await;
    assert_eq!(alert.payload.as_ref(), b"fire");
    assert_eq!(alert.qos, QoS::AtMostOnce);
    // Live deliveries carry retain = 0 (MQTT-3.3.1-9); a new subscriber sees it retained.
    let mut late = Client::connect(&broker, "rp-channels-late").await;
    late.subscribe("site/alerts").await;
    let retained = next_on(&mut late, "site/alerts").await;
    assert!(retained.retain, "published with the retain flag");
    assert_eq!(retained.payload.as_ref(), b"fire");

    assert_eq!(running.count("device-commands", "published"), 1);
    let published = eventually(WAIT, || {
        (running.count("all-alerts", "published") == 1).then_some(())
    })
    .await;
    assert!(published.is_some(), "the QoS 0 publish is counted");
    running.service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_resubscribes_after_redis_restarts() {
    let mut redis = Redis::start();
    let broker = Mosquitto::start();
    let running = Running::start(&redis, &broker, "rp-redis-restart", COMMANDS_RULE).await;
    running.pubsub_subscribed().await;
    let mut client = listener(
        &broker,
        "rp-redis-restart-sub",
        "devices/#",
        "devices/probe",
    )
    .await;

    blocking(|| {
        redis.kill();
        redis.start_again();
    });
    // Messages published before the subscriber is back are lost (pub/sub keeps nothing):
    // publish until one arrives.
    let arrived = publish_until_republished(
        &redis,
        &mut client,
        ("commands:dev-1", "after-restart"),
        "devices/dev-1/commands",
        "a publish after the Redis restart arrives",
    )
    .await;
    assert_eq!(arrived.payload.as_ref(), b"after-restart");
    let monitor = running.republisher().pubsub().expect("pub/sub runs");
    assert!(monitor.reconnects() >= 1, "the reconnect is counted");
    running.service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_on_a_silently_dead_connection_notices_and_resubscribes() {
    // Spec §6: a Redis gone silent (no FIN, no RST) is noticed within about 2 ×
    // socket_timeout; the proxy keeps the connection open but forwards nothing.
    const SOCKET_TIMEOUT: Duration = Duration::from_secs(1);
    let notice = 2 * SOCKET_TIMEOUT + Duration::from_secs(2); // slack for a loaded CPU
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let proxy = FaultProxy::start(redis.port());
    let text = config(&redis, &broker, "rp-silent-redis", COMMANDS_RULE);
    let shortened = text.replace(r#"socket_timeout = "2s""#, r#"socket_timeout = "1s""#);
    assert_ne!(shortened, text, "the test config sets socket_timeout");
    let running = Running::start_with(&shortened.replace(&redis.url(), &proxy.redis_url())).await;
    running.pubsub_subscribed().await;
    let mut client = listener(&broker, "rp-silent-sub", "devices/#", "devices/probe").await;
    publish(&redis, "commands:dev-1", "before");
    let before = next_on(&mut client, "devices/dev-1/commands").await;
    assert_eq!(before.payload.as_ref(), b"before");
    let monitor = running.republisher().pubsub().expect("pub/sub runs");

    proxy.blackhole(true);
    let silent_since = Instant::now();
    let noticed = eventually(notice, || (!monitor.is_subscribed()).then_some(())).await;
    assert!(
        noticed.is_some(),
        "the dead subscription was not noticed within {notice:?}"
    );
    // Silent for longer than 2 × socket_timeout. After the heal the old connection may
    // carry bytes again; what matters is that the subscriber did not wait on it.
    tokio::time::sleep_until((silent_since + 3 * SOCKET_TIMEOUT).into()).await;
    proxy.blackhole(false);

    let arrived = publish_until_republished(
        &redis,
        &mut client,
        ("commands:dev-2", "after"),
        "devices/dev-2/commands",
        "a publish after the silence arrives",
    )
    .await;
    assert_eq!(arrived.payload.as_ref(), b"after");
    assert!(monitor.reconnects() >= 1, "the subscription was rebuilt");
    running.service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republishing_resumes_after_the_broker_restarts() {
    let redis = Redis::start();
    let mut broker = Mosquitto::start();
    let running = Running::start(&redis, &broker, "rp-broker-restart", COMMANDS_RULE).await;
    running.pubsub_subscribed().await;
    let mut client = listener(&broker, "rp-broker-sub", "devices/#", "devices/probe").await;
    publish(&redis, "commands:dev-1", "before");
    assert_eq!(
        next_on(&mut client, "devices/dev-1/commands")
            .await
            .payload
            .as_ref(),
        b"before"
    );

    blocking(|| {
        broker.stop();
        broker.start_again();
    });
    let mut client = listener(&broker, "rp-broker-sub-2", "devices/#", "devices/probe").await;
    let arrived = publish_until_republished(
        &redis,
        &mut client,
        ("commands:dev-2", "after"),
        "devices/dev-2/commands",
        "a publish after the broker restart arrives",
    )
    .await;
    assert_eq!(arrived.payload.as_ref(), b"after");
    running.service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_pubsub_messages_are_counted_and_later_ones_flow() {
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let running = Running::start(
        &redis,
        &broker,
        "rp-refused",
        r#"
[[republish]]
name = "relay"
source = "pubsub"
channel = "relay:{id}"
topic = "relay/{id}"
allow_topics = ["relay/+"]

[[republish]]
name = "pinned"
source = "pubsub"
channel = "pinned:{id}"
topic = "out/{id}"
allow_topics = ["out/good"]

[[republish]]
name = "raw-channel"
source = "pubsub"
channel = "$SYS/fake"
topic = "{topic}"
"#,
    )
    .await;
    running.pubsub_subscribed().await;
    let mut client = listener(&broker, "rp-refused-sub", "#", "probe/refused").await;

    publish(&redis, "relay:a/b", "slash"); // a captured value with `/`
    publish(&redis, "relay:a+b", "plus"); // … with `+`
    publish(&redis, "$SYS/fake", "dollar"); // renders a `$SYS/...` topic
    publish(&redis, "pinned:bad", "outside"); // outside allow_topics
    let counted = eventually(WAIT, || {
        (running.count("relay", "invalid") == 2
            && running.count("raw-channel", "invalid") == 1
            && running.count("pinned", "invalid") == 1)
            .then_some(())
    })
    .await;
    assert!(counted.is_some(), "each refusal is counted invalid");

    publish(&redis, "relay:ok", "fine");
    publish(&redis, "pinned:good", "fine too");
    // Two rules, two queues: the messages may arrive in either order.
    let mut got = std::collections::BTreeMap::new();
    while got.len() < 2 {
        let message = client
            .next_message(WAIT)
            .await
            .unwrap_or_else(|| panic!("relay/ok and out/good within {WAIT:?}; got {got:?}"));
        if message.topic == "relay/ok" || message.topic == "out/good" {
            got.insert(message.topic.clone(), message.payload.to_vec());
        }
    }
    assert_eq!(got["relay/ok"], b"fine");
    assert_eq!(got["out/good"], b"fine too");
    running.service.shutdown().await;
}

const STREAM_RULE: &str = r#"
[[republish]]
name = "alerts"
source = "stream"
stream = "alerts:out"
topic = "alerts/{field.site}"
retain = true
claim_idle = "500ms"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_entry_is_published_then_acknowledged() {
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let running = Running::start(&redis, &broker, "rp-stream", STREAM_RULE).await;
    group_exists(&redis, "alerts:out", "routemq-bridge").await;
    let mut client = listener(&broker, "rp-stream-sub", "alerts/#", "alerts/probe").await;

    xadd(
        &redis,
        "alerts:out",
        &[("site", "north"), ("payload", "smoke")],
    );
    let message = next_on(&mut client, "alerts/north").await;
    assert_eq!(message.payload.as_ref(), b"smoke");
    assert_eq!(message.qos, QoS::AtLeastOnce);
    let acked = eventually(WAIT, || {
        (pending(&redis, "alerts:out", "routemq-bridge") == Some(0)).then_some(())
    })
    .await;
    assert!(acked.is_some(), "XPENDING drops to 0 after the PUBACK");
    assert_eq!(running.count("alerts", "published"), 1);
    running.service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_rule_recreates_its_group_after_redis_restarts_empty() {
    let mut redis = Redis::start();
    let broker = Mosquitto::start();
    let running = Running::start(&redis, &broker, "rp-stream-redis", STREAM_RULE).await;
    group_exists(&redis, "alerts:out", "routemq-bridge").await;
    let mut client = listener(&broker, "rp-stream-redis-sub", "alerts/#", "alerts/probe").await;

    // The harness's Redis keeps nothing on disk: the stream and its group are gone.
    blocking(|| {
        redis.kill();
        redis.start_again();
    });
    group_exists(&redis, "alerts:out", "routemq-bridge").await;
    xadd(
        &redis,
        "alerts:out",
        &[("site", "south"), ("payload", "back")],
    );
    assert_eq!(
        next_on(&mut client, "alerts/south").await.payload.as_ref(),
        b"back"
    );
    running.service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_entries_stay_pending_while_the_broker_is_down() {
    let redis = Redis::start();
    let mut broker = Mosquitto::start();
    let running = Running::start(&redis, &broker, "rp-stream-down", STREAM_RULE).await;
    group_exists(&redis, "alerts:out", "routemq-bridge").await;

    blocking(|| broker.stop());
    // In one MULTI, so one read takes all three (the worker holds one batch at a time).
    let mut batch = redis::pipe();
    batch.atomic();
    for site in ["s1", "s2", "s3"] {
        batch
            .xadd("alerts:out", "*", &[("site", site), ("payload", site)])
            .ignore();
    }
    let mut conn = redis.client().get_connection().expect("redis");
    let _: () = batch.query(&mut conn).expect("XADD ×3");
    // Read and held unacknowledged while no broker takes them.
    let held = eventually(WAIT, || {
        (pending(&redis, "alerts:out", "routemq-bridge") == Some(3)).then_some(())
    })
    .await;
    assert!(
        held.is_some(),
        "the entries are pending while the broker is down"
    );
    assert_eq!(running.count("alerts", "published"), 0);

    blocking(|| broker.start_again());
    // The rule retains, so a subscriber made after the delivery still sees each topic.
    let mut client = Client::connect(&broker, "rp-stream-down-sub").await;
    client.subscribe("alerts/#").await;
    for site in ["s1", "s2", "s3"] {
        let m = next_on(&mut client, &format!("alerts/{site}")).await;
        assert_eq!(m.payload.as_ref(), site.as_bytes());
    }
    let acked = eventually(WAIT, || {
        (pending(&redis, "alerts:out", "routemq-bridge") == Some(0)).then_some(())
    })
    .await;
    assert!(acked.is_some(), "acknowledged once the broker is back");
    running.service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_left_pending_by_a_dead_consumer_are_claimed() {
    let redis = Redis::start();
    let broker = Mosquitto::start();
    {
        let mut conn = redis.client().get_connection().expect("redis");
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg("alerts:out")
            .arg("routemq-bridge")
            .arg("$")
            .arg("MKSTREAM")
            .query(&mut conn)
            .expect("XGROUP CREATE");
        xadd(
            &redis,
            "alerts:out",
            &[("site", "east"), ("payload", "orphan-1")],
        );
        xadd(
            &redis,
            "alerts:out",
            &[("site", "west"), ("payload", "orphan-2")],
        );
        // Another consumer reads them and dies without acknowledging.
        let _: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("routemq-bridge")
            .arg("dead-consumer")
            .arg("COUNT")
            .arg(10)
            .arg("STREAMS")
            .arg("alerts:out")
            .arg(">")
            .query(&mut conn)
            .expect("XREADGROUP");
    }
    assert_eq!(pending(&redis, "alerts:out", "routemq-bridge"), Some(2));
    let mut client = listener(&broker, "rp-claim-sub", "alerts/#", "alerts/probe").await;
    let running = Running::start(&redis, &broker, "rp-claim", STREAM_RULE).await;

    assert_eq!(
        next_on(&mut client, "alerts/east").await.payload.as_ref(),
        b"orphan-1"
    );
    assert_eq!(
        next_on(&mut client, "alerts/west").await.payload.as_ref(),
        b"orphan-2"
    );
    let acked = eventually(WAIT, || {
        (pending(&redis, "alerts:out", "routemq-bridge") == Some(0)).then_some(())
    })
    .await;
    assert!(acked.is_some(), "claimed entries are acknowledged");
    running.service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpublishable_stream_entries_are_acked_and_dead_lettered() {
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let running = Running::start(
        &redis,
        &broker,
        "rp-stream-refused",
        r#"
[[republish]]
name = "alerts"
source = "stream"
stream = "alerts:out"
topic = "{field.area}/{field.site}"
params."field.area" = '^[$a-z]+$'
allow_topics = ["alerts/+", "$SYS/#"]
"#,
    )
    .await;
    group_exists(&redis, "alerts:out", "routemq-bridge").await;
    let mut client = listener(&broker, "rp-stream-refused-sub", "alerts/#", "alerts/probe").await;

    xadd(&redis, "alerts:out", &[("area", "alerts"), ("site", "x")]); // no payload field
    xadd(
        &redis,
        "alerts:out",
        &[("area", "alerts"), ("site", "a/b"), ("payload", "p")],
    );
    xadd(
        &redis,
        "alerts:out",
        &[("area", "alerts"), ("site", "a+b"), ("payload", "p")],
    );
    xadd(
        &redis,
        "alerts:out",
        &[("area", "$SYS"), ("site", "x"), ("payload", "p")],
    );
    xadd(
        &redis,
        "alerts:out",
        &[("area", "other"), ("site", "x"), ("payload", "p")],
    );
    xadd(
        &redis,
        "alerts:out",
        &[("area", "alerts"), ("site", "ok"), ("payload", "good")],
    );

    assert_eq!(
        next_on(&mut client, "alerts/ok").await.payload.as_ref(),
        b"good"
    );
    let done = eventually(WAIT, || {
        (pending(&redis, "alerts:out", "routemq-bridge") == Some(0)).then_some(())
    })
    .await;
    assert!(
        done.is_some(),
        "refused entries are acknowledged, not retried"
    );
    assert_eq!(running.count("alerts", "invalid"), 5);
    assert_eq!(running.count("alerts", "published"), 1);

    let mut conn = redis.client().get_connection().expect("redis");
    let records: Vec<String> = conn.lrange("dead_letter", 0, -1).expect("LRANGE");
    assert_eq!(records.len(), 5, "{records:#?}");
    let reasons: Vec<String> = records
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_str(r).expect("JSON record");
            assert_eq!(v["route"], "alerts");
            assert_eq!(v["topic"], "alerts:out");
            v["reason"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    assert_eq!(
        reasons.iter().filter(|r| *r == "missing_field").count(),
        1,
        "{reasons:?}"
    );
    assert_eq!(
        reasons.iter().filter(|r| *r == "invalid_param").count(),
        4,
        "{reasons:?}"
    );
    running.service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_republishes_pubsub_messages() {
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let mut client = listener(&broker, "rp-daemon-sub", "devices/#", "devices/probe").await;
    let _bridge = Bridge::start(&config(
        &redis,
        &broker,
        "rp-daemon",
        r#"
[[routes]]
name = "latest"
topic = "sensors/{device_id}/data"
[[routes.actions]]
op = "set"
key = "sensor:{device_id}:latest"

[[republish]]
name = "device-commands"
source = "pubsub"
channel = "commands:{device_id}"
topic = "devices/{device_id}/commands"
"#,
    ));
    // Nothing says when the daemon's subscriber is up: publish until one arrives.
    let arrived = publish_until_republished(
        &redis,
        &mut client,
        ("commands:dev-9", "on"),
        "devices/dev-9/commands",
        "the daemon republishes",
    )
    .await;
    assert_eq!(arrived.payload.as_ref(), b"on");
}
