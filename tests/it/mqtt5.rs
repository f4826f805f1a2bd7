//! What MQTT 5 adds (spec §6.1), end to end against Mosquitto speaking MQTT 5: properties
//! in (templates, message expiry), properties out (forwards and republish), and the
//! broker's reason codes (a refused subscription, checked under 3.1.1 too). The delivery
//! promises themselves are `bridge_delivery`'s, run under both protocols.
//!
//! The test client here is rumqttc's v5 client, so it can send and see properties.

use std::time::Duration;

use bytes::Bytes;
use redis::Commands;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use serde_json::Value;

use crate::bridge::{eventually, Bridge, Protocol};
use crate::harness::{Mosquitto, Redis};
use crate::ops::{get_until, http_addr};

const WAIT: Duration = Duration::from_secs(30);

/// An MQTT 5 test client whose event loop runs in its own task.
struct Client5 {
    client: AsyncClient,
    acks: tokio::sync::watch::Receiver<u64>,
    messages: tokio::sync::mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::Publish>,
}

impl Client5 {
    async fn connect(broker: &Mosquitto, client_id: &str) -> Client5 {
        let mut options = MqttOptions::new(client_id, "127.0.0.1", broker.port());
        options.set_keep_alive(Duration::from_secs(5));
        let (client, eventloop) = AsyncClient::new(options, 100);
        let (ack_tx, acks) = tokio::sync::watch::channel(0);
        let (msg_tx, messages) = tokio::sync::mpsc::unbounded_channel();
        let (connected_tx, connected) = tokio::sync::oneshot::channel();
        tokio::spawn(drive(eventloop, ack_tx, msg_tx, connected_tx));
        tokio::time::timeout(Duration::from_secs(10), connected)
            .await
            .expect("test client connects in time")
            .expect("test client event loop alive");
        Client5 {
            client,
            acks,
            messages,
        }
    }

    /// Publishes at QoS 1 with `properties` and waits for the PUBACK.
    async fn publish(&mut self, topic: &str, payload: &str, properties: PublishProperties) {
        let target = *self.acks.borrow() + 1;
        self.client
            .publish_with_properties(
                topic,
                QoS::AtLeastOnce,
                false,
                payload.to_string(),
                properties,
            )
            .await
            .expect("queue publish");
        tokio::time::timeout(WAIT, self.acks.wait_for(|a| *a >= target))
            .await
            .expect("PUBACK in time")
            .expect("event loop alive");
    }

    async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
    }

    async fn next_message(&mut self) -> rumqttc::v5::mqttbytes::v5::Publish {
        tokio::time::timeout(WAIT, self.messages.recv())
            .await
            .expect("a message in time")
            .expect("event loop alive")
    }
}

async fn drive(
    mut eventloop: EventLoop,
    acks: tokio::sync::watch::Sender<u64>,
    messages: tokio::sync::mpsc::UnboundedSender<rumqttc::v5::mqttbytes::v5::Publish>,
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

fn v5_config(redis: &Redis, broker: &Mosquitto, client_id: &str, rest: &str) -> String {
    Protocol::V5.config(redis, broker, client_id, rest)
}

fn dead_letters(conn: &mut redis::Connection) -> Vec<Value> {
    let records: Vec<String> = conn.lrange("dead_letter", 0, -1).expect("dead letter");
    records
        .iter()
        .map(|r| serde_json::from_str(r).expect("each record is JSON"))
        .collect()
}

/// The first dead-letter record, once there is one.
async fn first_dead_letter(conn: &mut redis::Connection, bridge: &Bridge) -> Value {
    eventually(WAIT, || dead_letters(conn).into_iter().next())
        .await
        .unwrap_or_else(|| panic!("no dead letter; log:\n{}", bridge.log_text()))
}

/// Asserts that `/metrics` holds the sample `line` (series and value).
async fn assert_metric(addr: std::net::SocketAddr, line: &str) {
    let metrics = crate::ops::get(addr, "/metrics").await.1;
    assert!(metrics.contains(line), "no {line:?} in:\n{metrics}");
}

fn user(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_property_and_the_content_type_reach_a_redis_hash_and_a_bad_one_is_invalid() {
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let bridge = Bridge::start(&v5_config(
        &redis,
        &broker,
        "mqtt5-props-in",
        r#"
[[routes]]
name = "meta"
topic = "sensors/{id}/data"
params."user.tenant" = "[a-z]+"
[[routes.actions]]
op = "hset"
key = "meta:{user.tenant}:{id}"
fields = { ct = "{prop.content_type}", tenant = "{user.tenant}", reply = "{prop.response_topic}", corr = "{prop.correlation_data}" }
"#,
    ));
    let mut client = Client5::connect(&broker, "mqtt5-props-in-publisher").await;
    client
        .publish(
            "sensors/d1/data",
            r#"{"t":1}"#,
            PublishProperties {
                content_type: Some("application/json".into()),
                user_properties: user(&[("tenant", "acme"), ("trace", "x")]),
                response_topic: Some("replies/d1".into()),
                correlation_data: Some(Bytes::from_static(b"abc")),
                ..Default::default()
            },
        )
        .await;
    // A tenant that would smuggle a `:` into the key breaks its constraint.
    client
        .publish(
            "sensors/d2/data",
            r#"{"t":2}"#,
            PublishProperties {
                user_properties: user(&[("tenant", "ev:il")]),
                content_type: Some("application/json".into()),
                ..Default::default()
            },
        )
        .await;

    let mut conn = redis.client().get_connection().expect("redis");
    let hash = eventually(WAIT, || {
        let h: std::collections::HashMap<String, String> =
            conn.hgetall("meta:acme:d1").unwrap_or_default();
        (!h.is_empty()).then_some(h)
    })
    .await
    .unwrap_or_else(|| panic!("meta:acme:d1 not written; log:\n{}", bridge.log_text()));
    assert_eq!(hash["ct"], "application/json");
    assert_eq!(hash["tenant"], "acme");
    assert_eq!(hash["reply"], "replies/d1");
    assert_eq!(hash["corr"], "YWJj", "correlation data in base64");

    let record = first_dead_letter(&mut conn, &bridge).await;
    assert_eq!(record["reason"], "invalid_param", "{record}");
    assert_eq!(record["topic"], "sensors/d2/data", "{record}");
    assert!(
        record["detail"]
            .as_str()
            .unwrap_or("")
            .contains("user.tenant"),
        "{record}"
    );
    let keys: Vec<String> = conn.keys("meta:*").expect("keys");
    assert_eq!(keys, vec!["meta:acme:d1".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_expired_while_redis_was_down_is_invalid_unless_the_route_opts_out() {
    let mut redis = Redis::start();
    let broker = Mosquitto::start();
    let bridge = Bridge::start(&v5_config(
        &redis,
        &broker,
        "mqtt5-expiry",
        r#"
[[routes]]
name = "honours"
topic = "expiring/{id}"
payload = "text"
[[routes.actions]]
op = "set"
key = "honoured:{id}"

[[routes]]
name = "ignores"
topic = "expiring/{id}"
payload = "text"
honor_expiry = false
[[routes.actions]]
op = "set"
key = "ignored:{id}"
"#,
    ));
    let addr = http_addr(&bridge);
    let mut client = Client5::connect(&broker, "mqtt5-expiry-publisher").await;

    redis.kill();
    let offset = bridge.log_text().len();
    let published = std::time::Instant::now();
    client
        .publish(
            "expiring/e1",
            "stale soon",
            PublishProperties {
                message_expiry_interval: Some(1),
                ..Default::default()
            },
        )
        .await;
    assert!(
        bridge.wait_for_log_after(offset, "redis unavailable; message waits and retries", WAIT),
        "the message never waited for Redis; log:\n{}",
        bridge.log_text()
    );
    // The outage must outlast the expiry: that is the condition under test, not a wait
    // for an event.
    tokio::time::sleep(Duration::from_millis(1500).saturating_sub(published.elapsed())).await;
    redis.start_again();

    let mut conn = redis.client().get_connection().expect("redis");
    let ignored = eventually(WAIT, || {
        conn.get::<_, Option<String>>("ignored:e1").ok().flatten()
    })
    .await;
    assert_eq!(
        ignored.as_deref(),
        Some("stale soon"),
        "honor_expiry = false writes it late"
    );
    let record = first_dead_letter(&mut conn, &bridge).await;
    assert_eq!(record["reason"], "expired", "{record}");
    assert_eq!(record["route"], "honours", "{record}");
    assert_eq!(
        conn.get::<_, Option<String>>("honoured:e1").expect("get"),
        None,
        "an expired message is not written"
    );
    assert_metric(
        addr,
        r#"routemq_bridge_messages_total{route="honours",outcome="invalid"} 1"#,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_and_a_republish_carry_their_properties() {
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let bridge = Bridge::start(&v5_config(
        &redis,
        &broker,
        "mqtt5-props-out",
        r#"
[[routes]]
name = "forward"
topic = "in/{id}"
payload = "text"
[[routes.actions]]
op = "mqtt_publish"
topic = "out/{id}"
content_type = "text/plain"
message_expiry = "60s"
user_properties = { tenant = "{user.tenant}", via = "bridge" }
response_topic = "replies/{id}"
correlation_data = "{prop.correlation_data}"

[[republish]]
name = "alerts"
source = "stream"
stream = "alerts:out"
topic = "alerts/{field.site}"
content_type = "application/json"
message_expiry = "30s"
user_properties = { site = "{field.site}" }
response_topic = "acks/{field.site}"
correlation_data = "{field.id}"
"#,
    ));
    let mut subscriber = Client5::connect(&broker, "mqtt5-props-out-subscriber").await;
    subscriber.subscribe("out/#").await;
    subscriber.subscribe("alerts/#").await;
    let mut client = Client5::connect(&broker, "mqtt5-props-out-publisher").await;
    client
        .publish(
            "in/d1",
            "hello",
            PublishProperties {
                user_properties: user(&[("tenant", "acme")]),
                correlation_data: Some(Bytes::from_static(b"\x00\x01req")),
                ..Default::default()
            },
        )
        .await;

    let forward = subscriber.next_message().await;
    assert_eq!(&forward.topic[..], b"out/d1");
    assert_eq!(&forward.payload[..], b"hello");
    let p = forward.properties.expect("the forward carries properties");
    assert_eq!(p.content_type.as_deref(), Some("text/plain"));
    assert!(
        p.message_expiry_interval
            .is_some_and(|s| (1..=60).contains(&s)),
        "{p:?}"
    );
    assert!(
        p.user_properties
            .contains(&("tenant".into(), "acme".into())),
        "{p:?}"
    );
    assert!(
        p.user_properties.contains(&("via".into(), "bridge".into())),
        "{p:?}"
    );
    assert_eq!(p.response_topic.as_deref(), Some("replies/d1"));
    assert_eq!(
        p.correlation_data.as_deref(),
        Some(&b"\x00\x01req"[..]),
        "the requester's correlation data, unchanged"
    );

    let mut conn = redis.client().get_connection().expect("redis");
    // The rule's group is created at `$` when the bridge starts: add once it exists.
    let group_ready = eventually(WAIT, || {
        let groups: redis::Value = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg("alerts:out")
            .query(&mut conn)
            .ok()?;
        matches!(groups, redis::Value::Array(ref g) if !g.is_empty()).then_some(())
    })
    .await;
    assert!(
        group_ready.is_some(),
        "no consumer group; log:\n{}",
        bridge.log_text()
    );
    let _: String = conn
        .xadd(
            "alerts:out",
            "*",
            &[
                ("site", "north"),
                ("id", "a-17"),
                ("payload", "{\"level\":3}"),
            ],
        )
        .expect("XADD");
    let alert = subscriber.next_message().await;
    assert_eq!(&alert.topic[..], b"alerts/north");
    let p = alert.properties.expect("the republish carries properties");
    assert_eq!(p.content_type.as_deref(), Some("application/json"));
    assert!(
        p.message_expiry_interval
            .is_some_and(|s| (1..=30).contains(&s)),
        "{p:?}"
    );
    assert_eq!(p.user_properties, user(&[("site", "north")]));
    assert_eq!(p.response_topic.as_deref(), Some("acks/north"));
    assert_eq!(p.correlation_data.as_deref(), Some(&b"a-17"[..]));
}

/// A Mosquitto whose ACL refuses anonymous clients every subscription and publish under
/// `secret/`.
/// Mosquitto 2.0.11's `acl_file` grants every SUBSCRIBE and filters only delivery (its
/// subscribe check is a FIXME there), so the ACL is its dynamic-security plugin's, which
/// refuses the SUBSCRIBE itself: 0x87 not authorized under MQTT 5, 0x80 under 3.1.1.
fn broker_refusing_secret(dir: &std::path::Path) -> Mosquitto {
    let config = dir.join("dynsec.json");
    std::fs::write(
        &config,
        r#"{
  "defaultACLAccess": {"publishClientSend": true, "publishClientReceive": true, "subscribe": true, "unsubscribe": true},
  "clients": [],
  "groups": [{"groupname": "anonymous", "roles": [{"rolename": "anonymous"}]}],
  "roles": [{"rolename": "anonymous", "acls": [
    {"acltype": "subscribePattern", "topic": "secret/#", "allow": false, "priority": 1},
    {"acltype": "publishClientSend", "topic": "secret/#", "allow": false, "priority": 1}
  ]}],
  "anonymousGroup": "anonymous"
}"#,
    )
    .expect("write dynsec.json");
    let plugin = ["/usr/lib/x86_64-linux-gnu", "/usr/lib", "/usr/local/lib"]
        .iter()
        .map(|d| std::path::Path::new(d).join("mosquitto_dynamic_security.so"))
        .find(|p| p.exists())
        .expect("mosquitto_dynamic_security.so (Debian's mosquitto package ships it)");
    Mosquitto::start_with(&format!(
        "plugin {}\nplugin_opt_config_file {}\n",
        plugin.display(),
        config.display()
    ))
}

async fn a_subscription_the_acl_refuses_is_named_readyz_is_503_and_the_other_routes_run(
    protocol: Protocol,
) {
    let redis = Redis::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = broker_refusing_secret(dir.path());
    let bridge = Bridge::start(&protocol.config(
        &redis,
        &broker,
        "mqtt5-acl",
        r#"
[[routes]]
name = "allowed"
topic = "sensors/{id}/data"
payload = "text"
[[routes.actions]]
op = "set"
key = "allowed:{id}"

[[routes]]
name = "forbidden"
topic = "secret/{id}"
payload = "text"
[[routes.actions]]
op = "set"
key = "secret:{id}"
"#,
    ));
    let addr = http_addr(&bridge);
    assert!(
        bridge.wait_for_log("the MQTT broker refused the subscription", WAIT),
        "no error for the refused filter; log:\n{}",
        bridge.log_text()
    );
    let log = bridge.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("refused the subscription"))
        .unwrap_or_default();
    assert!(
        line.contains("secret/+"),
        "the error names the filter: {line}"
    );
    let code = match protocol {
        Protocol::V5 => "not_authorized",
        Protocol::V311 => "failure",
    };
    assert!(line.contains(code), "and the reason: {line}");

    let body = get_until(addr, "/readyz", 503).await;
    assert_eq!(
        body,
        r#"{"ready":false,"mqtt":"down","redis":"up","refused":["secret/+"]}"#
    );

    let mut client = Client5::connect(&broker, "mqtt5-acl-publisher").await;
    client
        .publish("sensors/s1/data", "fine", PublishProperties::default())
        .await;
    let mut conn = redis.client().get_connection().expect("redis");
    let written = eventually(WAIT, || {
        conn.get::<_, Option<String>>("allowed:s1").ok().flatten()
    })
    .await;
    assert_eq!(written.as_deref(), Some("fine"), "the other route runs");
    assert_metric(
        addr,
        &format!(r#"routemq_bridge_mqtt_reason_codes_total{{packet="suback",code="{code}"}} 1"#),
    )
    .await;
}

crate::bridge::under_both_protocols!(
    a_subscription_the_acl_refuses_is_named_readyz_is_503_and_the_other_routes_run,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_over_the_brokers_maximum_packet_size_fails_alone_and_the_rest_flow() {
    let redis = Redis::start();
    // The broker's Maximum Packet Size, told in its CONNACK.
    let broker = Mosquitto::start_with("max_packet_size 2000\n");
    let bridge = Bridge::start(&v5_config(
        &redis,
        &broker,
        "mqtt5-broker-max",
        r#"
[[routes]]
name = "triple"
topic = "in/{id}"
payload = "text"
[[routes.actions]]
op = "mqtt_publish"
topic = "out/{id}"
payload = "{payload}{payload}{payload}"
"#,
    ));
    let mut subscriber = Client5::connect(&broker, "mqtt5-broker-max-subscriber").await;
    subscriber.subscribe("out/#").await;
    let mut client = Client5::connect(&broker, "mqtt5-broker-max-publisher").await;
    client
        .publish("in/big", &"x".repeat(800), PublishProperties::default())
        .await;
    client
        .publish("in/small", "ok", PublishProperties::default())
        .await;

    let forward = subscriber.next_message().await;
    assert_eq!(
        &forward.topic[..],
        b"out/small",
        "the small forward went out"
    );
    let mut conn = redis.client().get_connection().expect("redis");
    let record = first_dead_letter(&mut conn, &bridge).await;
    assert_eq!(record["topic"], "in/big", "{record}");
    assert!(
        record["detail"]
            .as_str()
            .unwrap_or("")
            .contains("Maximum Packet Size"),
        "{record}"
    );
    assert!(
        !bridge.log_text().contains("MQTT connection lost"),
        "the outgoing connection was not dropped; log:\n{}",
        bridge.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_the_broker_refuses_is_failed_with_its_reason_code_and_counted() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = broker_refusing_secret(dir.path());
    let bridge = Bridge::start(&v5_config(
        &redis,
        &broker,
        "mqtt5-puback",
        r#"
[[routes]]
name = "leak"
topic = "sensors/{id}/data"
payload = "text"
[[routes.actions]]
op = "mqtt_publish"
topic = "secret/{id}"
"#,
    ));
    let addr = http_addr(&bridge);
    let mut client = Client5::connect(&broker, "mqtt5-puback-publisher").await;
    client
        .publish("sensors/s1/data", "psst", PublishProperties::default())
        .await;
    let mut conn = redis.client().get_connection().expect("redis");
    let record = first_dead_letter(&mut conn, &bridge).await;
    assert_eq!(record["topic"], "sensors/s1/data", "{record}");
    assert!(
        record["detail"]
            .as_str()
            .unwrap_or("")
            .contains("not_authorized"),
        "{record}"
    );
    assert!(
        bridge
            .log_text()
            .lines()
            .any(|l| l.contains("refused a publish") && l.contains("secret/s1")),
        "the refusal is logged with its topic; log:\n{}",
        bridge.log_text()
    );
    assert_metric(
        addr,
        r#"routemq_bridge_mqtt_reason_codes_total{packet="puback",code="not_authorized"} 1"#,
    )
    .await;
    assert_metric(
        addr,
        r#"routemq_bridge_messages_total{route="leak",outcome="failed"} 1"#,
    )
    .await;
}

/// A dedup transaction that reached Redis but whose reply timed out after the message's
/// expiry must not be dead-lettered as `expired` (it was written), its done
/// mark must stay, and its forward must go out (spec §6: a write whose reply was lost and
/// that turns out to have been applied counts as written). Failed before the deadline
/// stopped counting after a timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiring_dedup_write_whose_reply_timed_out_is_written_not_expired() {
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let proxy = crate::harness::FaultProxy::start(redis.port());
    let config = v5_config(
        &redis,
        &broker,
        "mqtt5-expiry-lost-reply",
        r#"
[[routes]]
name = "tested"
topic = "d/{id}"
qos = 1
payload = "text"
dedup = { key = "dedup:{id}", ttl = "10m" }
[[routes.actions]]
op = "rpush"
key = "list:{id}"
[[routes.actions]]
op = "mqtt_publish"
topic = "out/{id}"
"#,
    )
    .replace(&redis.url(), &proxy.redis_url());
    let bridge = Bridge::start(&config);
    let mut listener = Client5::connect(&broker, "lost-reply-listener").await;
    listener.subscribe("out/#").await;
    let mut client = Client5::connect(&broker, "lost-reply-publisher").await;
    // The EXEC reaches Redis; its reply is held past socket_timeout (2 s), which is past
    // the message's expiry (1 s).
    proxy.stall_then_drop_after_request(b"EXEC", Duration::from_secs(3));
    client
        .publish(
            "d/a",
            "m1",
            PublishProperties {
                message_expiry_interval: Some(1),
                ..Default::default()
            },
        )
        .await;
    let mut conn = redis.client().get_connection().expect("redis");
    let applied = eventually(WAIT, || {
        conn.llen::<_, i64>("list:a").ok().filter(|n| *n == 1)
    })
    .await;
    assert_eq!(applied, Some(1), "the transaction reached Redis");
    assert_eq!(proxy.fired(), 1, "the fault happened");
    // The forward is the event that ends the message's handling when it is right.
    let forwarded = tokio::time::timeout(Duration::from_secs(10), listener.next_message())
        .await
        .ok();
    let record = dead_letters(&mut conn).into_iter().next();
    let mark: Option<String> = conn.get("dedup:a").expect("GET");
    assert!(
        record.is_none() && mark.is_some() && forwarded.is_some(),
        "written to Redis, yet dead letter {record:?}, dedup mark {mark:?}, forward {:?}; log:\n{}",
        forwarded.map(|p| p.topic),
        bridge.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_the_protocol_is_refused_and_the_running_routes_stay() {
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let route = r#"
[[routes]]
name = "plain"
topic = "t/{id}"
payload = "text"
[[routes.actions]]
op = "set"
key = "plain:{id}"
"#;
    let base = Protocol::V311.config(&redis, &broker, "mqtt5-reload", route);
    let bridge = Bridge::start(&base);
    // Valid for MQTT 5, but the running connection speaks 3.1.1: `{user.tenant}` would
    // never be found there.
    let v5 = Protocol::V5
        .apply(&base)
        .replace("key = \"plain:{id}\"", "key = \"plain:{user.tenant}:{id}\"");
    let offset = bridge.reload_with(&v5);
    assert!(
        bridge.wait_for_log_after(offset, "configuration reload refused", WAIT),
        "reload refused:\n{}",
        bridge.log_text()
    );
    assert!(
        bridge.log_text()[offset..].contains("mqtt.protocol"),
        "the key is named:\n{}",
        bridge.log_text()
    );
    let mut client = Client5::connect(&broker, "mqtt5-reload-publisher").await;
    client
        .publish("t/a", "kept", PublishProperties::default())
        .await;
    let mut conn = redis.client().get_connection().expect("redis");
    let written = eventually(WAIT, || {
        conn.get::<_, Option<String>>("plain:a").ok().flatten()
    })
    .await;
    assert_eq!(
        written.as_deref(),
        Some("kept"),
        "the running route still works"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_survive_the_spool_and_expiry_counts_the_time_spooled() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start();
    let broker = Mosquitto::start();
    let bridge = Bridge::start(&v5_config(
        &redis,
        &broker,
        "mqtt5-spool",
        &format!(
            r#"
[spool]
path = "{}"
after = "1s"

[[routes]]
name = "meta"
topic = "sensors/{{id}}/data"
[[routes.actions]]
op = "hset"
key = "meta:{{user.tenant}}:{{id}}"
fields = {{ ct = "{{prop.content_type}}" }}

[[routes]]
name = "honours"
topic = "expiring/{{id}}"
payload = "text"
[[routes.actions]]
op = "set"
key = "honoured:{{id}}"
"#,
            dir.path().join("spool.db").display()
        ),
    ));
    let addr = http_addr(&bridge);
    redis.stop();
    crate::spool::spilling(addr).await;
    let mut client = Client5::connect(&broker, "mqtt5-spool-publisher").await;
    let published = std::time::Instant::now();
    client
        .publish(
            "sensors/d1/data",
            r#"{"t":1}"#,
            PublishProperties {
                content_type: Some("application/json".into()),
                user_properties: user(&[("tenant", "acme")]),
                ..Default::default()
            },
        )
        .await;
    for (id, expiry) in [("e1", 1), ("e2", 600)] {
        client
            .publish(
                &format!("expiring/{id}"),
                id,
                PublishProperties {
                    message_expiry_interval: Some(expiry),
                    ..Default::default()
                },
            )
            .await;
    }
    crate::spool::spooled(addr, 3).await;
    // The time spooled must outlast e1's expiry: that is the condition under test, not a
    // wait for an event.
    tokio::time::sleep(Duration::from_millis(2100).saturating_sub(published.elapsed())).await;
    redis.start_again();

    let mut conn = redis.client().get_connection().expect("redis");
    let hash = eventually(WAIT, || {
        let h: std::collections::HashMap<String, String> =
            conn.hgetall("meta:acme:d1").unwrap_or_default();
        (!h.is_empty()).then_some(h)
    })
    .await
    .unwrap_or_else(|| panic!("meta:acme:d1 not written; log:\n{}", bridge.log_text()));
    assert_eq!(
        hash["ct"], "application/json",
        "properties kept in the spool"
    );
    let e2 = eventually(WAIT, || {
        conn.get::<_, Option<String>>("honoured:e2").ok().flatten()
    })
    .await;
    assert_eq!(e2.as_deref(), Some("e2"), "not expired: written");
    let record = first_dead_letter(&mut conn, &bridge).await;
    assert_eq!(record["reason"], "expired", "{record}");
    assert_eq!(record["topic"], "expiring/e1", "{record}");
    assert_eq!(
        conn.get::<_, Option<String>>("honoured:e1").expect("get"),
        None,
        "expired while spooled: not written"
    );
}

/// A message that waited for Redis in its lane before the spool took it keeps its expiry
/// counted from its arrival, not from when it was spooled: spooled about `after` (3 s) after
/// it arrived with a 4 s expiry, it has expired when the drain reaches it 4.3 s after its
/// arrival (counted from the spooling, it would have had 2 or 3 s left, and been written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spooled_message_expiry_counts_from_its_arrival_not_from_its_spooling() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start();
    let broker = Mosquitto::start();
    let bridge = Bridge::start(&v5_config(
        &redis,
        &broker,
        "mqtt5-spool-arrival",
        &format!(
            r#"
[spool]
path = "{}"
after = "3s"

[[routes]]
name = "honours"
topic = "expiring/{{id}}"
payload = "text"
[[routes.actions]]
op = "set"
key = "honoured:{{id}}"
"#,
            dir.path().join("spool.db").display()
        ),
    ));
    let addr = http_addr(&bridge);
    let mut client = Client5::connect(&broker, "mqtt5-spool-arrival-publisher").await;
    redis.stop();
    let published = std::time::Instant::now();
    client
        .publish(
            "expiring/e3",
            "e3",
            PublishProperties {
                message_expiry_interval: Some(4),
                ..Default::default()
            },
        )
        .await;
    crate::spool::spooled(addr, 1).await;
    assert!(
        published.elapsed() >= Duration::from_secs(2),
        "spooled {:?} after it arrived: it did not wait for Redis in its lane first",
        published.elapsed()
    );
    // The time since its arrival must outlast its expiry, the time since its spooling must
    // not: that is the condition under test, not a wait for an event.
    tokio::time::sleep(Duration::from_millis(4300).saturating_sub(published.elapsed())).await;
    redis.start_again();

    let mut conn = redis.client().get_connection().expect("redis");
    let record = first_dead_letter(&mut conn, &bridge).await;
    assert_eq!(record["reason"], "expired", "{record}");
    assert_eq!(record["topic"], "expiring/e3", "{record}");
    assert_eq!(
        conn.get::<_, Option<String>>("honoured:e3").expect("get"),
        None,
        "expired counted from its arrival: not written"
    );
}
