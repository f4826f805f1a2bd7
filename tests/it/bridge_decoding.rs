//! Packets the bridge's MQTT decoder cannot take as they are (spec §6, "bounds hold"): a
//! publish over `max_packet_size`, and a topic that is not UTF-8. Each is refused as one
//! message — outcome `invalid`, a dead-letter record, an ack — and the session moves on, in
//! bounded memory: nothing here may cost a reconnect or the whole packet in RAM.

use std::io::ErrorKind;
use std::time::Duration;

use bytes::BytesMut;
use redis::Commands;
use rumqttc::{Codec, Packet, Publish, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Decoder;

use crate::bridge::{config, eventually, Bridge, Client};
use crate::harness::{Mosquitto, Redis};

const WAIT: Duration = Duration::from_secs(60);

/// A route writing `msg:<n>` for every JSON message `{"n":…}` on `big/<id>`.
const ROUTE: &str = r#"
[[routes]]
name = "numbered"
topic = "big/{id}"
[[routes.actions]]
op = "set"
key = "msg:{json.n}"
"#;

fn connection(redis: &Redis) -> redis::Connection {
    redis
        .client()
        .get_connection_with_timeout(Duration::from_secs(5))
        .expect("redis connection")
}

/// A line of `/proc/<pid>/status` (`VmHWM`, `VmRSS`), in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

async fn wait_for_key(conn: &mut redis::Connection, key: &str, bridge: &Bridge) {
    let found = eventually(WAIT, || conn.exists::<_, bool>(key).ok()?.then_some(())).await;
    assert!(
        found.is_some(),
        "{key} not written; log:\n{}",
        bridge.log_text()
    );
}

fn dead_letters(conn: &mut redis::Connection) -> Vec<serde_json::Value> {
    let records: Vec<String> = conn.lrange("dead_letter", 0, -1).expect("dead letter");
    records
        .iter()
        .map(|r| serde_json::from_str(r).expect("each record is JSON"))
        .collect()
}

/// What the vendored decoder makes of `stream` arriving `chunk` bytes at a time, and the
/// most it ever buffered.
fn decode_in_chunks(stream: &[u8], chunk: usize, max_incoming: usize) -> (Vec<Packet>, usize) {
    let mut codec = Codec::new(max_incoming, max_incoming);
    let mut buffer = BytesMut::new();
    let mut packets = Vec::new();
    let mut most = 0;
    for piece in stream.chunks(chunk) {
        buffer.extend_from_slice(piece);
        most = most.max(buffer.len());
        while let Some(packet) = codec.decode(&mut buffer).expect("decodes") {
            packets.push(packet);
        }
    }
    assert!(buffer.is_empty(), "{} bytes left undecoded", buffer.len());
    (packets, most)
}

fn encoded(topic: &str, pkid: u16, payload: Vec<u8>) -> Vec<u8> {
    let mut publish = Publish::new(topic, QoS::AtLeastOnce, payload);
    publish.pkid = pkid;
    let mut out = BytesMut::new();
    publish.write(&mut out).expect("encode");
    out.to_vec()
}

/// The decoder keeps the head of a publish over its limit and drops the rest as it comes,
/// whatever sizes the socket reads happen to have (the next packet may start mid-read).
#[test]
fn the_decoder_skips_an_oversized_publish_whatever_the_read_sizes() {
    const LIMIT: usize = 4096;
    let mut big = vec![b'y'; 200_000];
    big[0] = b'<';
    let mut stream = encoded("t/before", 1, b"a".to_vec());
    stream.extend(encoded("t/big", 2, big));
    stream.extend(encoded("t/after", 3, b"c".to_vec()));
    for chunk in [1, 2, 3, 7, 64, 1000, 1027, 4096, 65_536] {
        let (packets, most) = decode_in_chunks(&stream, chunk, LIMIT);
        let publishes: Vec<&Publish> = packets
            .iter()
            .map(|p| match p {
                Packet::Publish(p) => p,
                other => panic!("not a publish: {other:?}"),
            })
            .collect();
        let seen: Vec<(&str, u16, Option<usize>, usize)> = publishes
            .iter()
            .map(|p| (p.topic.as_str(), p.pkid, p.oversized, p.payload.len()))
            .collect();
        assert_eq!(
            seen,
            [
                ("t/before", 1, None, 1),
                ("t/big", 2, Some(200_000), 1024),
                ("t/after", 3, None, 1)
            ],
            "reads of {chunk} bytes"
        );
        assert!(publishes[1].payload.starts_with(b"<yyy"));
        assert!(
            most <= chunk + 2048,
            "reads of {chunk} bytes buffered {most} bytes"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_mib_message_is_skipped_as_it_streams_in_and_dead_lettered() {
    let redis = Redis::start();
    // The harness's Mosquitto has no message size limit of its own: it forwards 64 MiB.
    let broker = Mosquitto::start();
    let bridge = Bridge::start(&config(&redis, &broker, "bridge-64mib", ROUTE));
    let pid = bridge.pid().expect("bridge running");
    let mut client = Client::connect_with(&broker, "publisher-64mib", |o| {
        o.set_max_packet_size(65 * 1024 * 1024, 65 * 1024 * 1024);
    })
    .await;
    let mut conn = connection(&redis);

    // Idle, but warm: one message went the whole way.
    client.publish("big/warm", br#"{"n":0}"#.to_vec()).await;
    wait_for_key(&mut conn, "msg:0", &bridge).await;
    let idle = status_kib(pid, "VmHWM").max(status_kib(pid, "VmRSS"));

    let mut huge = vec![b'x'; 64 * 1024 * 1024];
    huge[..7].copy_from_slice(b"{\"n\":99");
    client.publish("big/huge", huge).await;
    client.publish("big/next", br#"{"n":1}"#.to_vec()).await;

    wait_for_key(&mut conn, "msg:1", &bridge).await;
    let peak = status_kib(pid, "VmHWM");
    assert!(
        peak < idle + 8 * 1024,
        "peak RSS {peak} KiB, idle {idle} KiB: the packet was held in memory"
    );
    let records = dead_letters(&mut conn);
    assert_eq!(records.len(), 1, "one dead letter: {records:?}");
    let record = &records[0];
    assert_eq!(record["reason"], "payload_too_large", "{record}");
    assert_eq!(record["topic"], "big/huge", "{record}");
    assert_eq!(record["route"], "numbered", "{record}");
    assert_eq!(record["truncated"], true, "{record}");
    let kept = record["payload"].as_str().expect("payload kept as text");
    assert_eq!(kept.len(), 1024, "the first 1 KiB is kept");
    assert!(kept.starts_with("{\"n\":99xxx"), "{kept}");
    assert!(
        record["detail"]
            .as_str()
            .is_some_and(|d| d.contains(&(64 * 1024 * 1024).to_string())),
        "the detail gives the real size: {record}"
    );
    assert!(
        !bridge.log_text().contains("MQTT connection lost"),
        "skipping the packet cost no reconnect; log:\n{}",
        bridge.log_text()
    );
}

/// At QoS 2 the skipped message takes the whole PUBREC/PUBREL/PUBCOMP flow: the broker is
/// done with it, and does not deliver it again to the same session after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_qos2_message_is_acked_and_not_redelivered_after_a_restart() {
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let route = ROUTE.replace("topic = \"big/{id}\"", "topic = \"big/{id}\"\nqos = 2");
    let mut bridge = Bridge::start(&config(&redis, &broker, "bridge-oversized-qos2", &route));
    let client = Client::connect(&broker, "publisher-oversized-qos2").await;
    let mut conn = connection(&redis);

    // Over the bridge's default max_packet_size of 1 MiB.
    for (topic, payload) in [
        ("big/huge", vec![b'x'; 2 * 1024 * 1024]),
        ("big/next", br#"{"n":1}"#.to_vec()),
    ] {
        client
            .client
            .publish(topic, QoS::ExactlyOnce, false, payload)
            .await
            .expect("queue publish");
    }
    wait_for_key(&mut conn, "msg:1", &bridge).await;
    let status = bridge.terminate(Duration::from_secs(30));
    assert!(status.success(), "log:\n{}", bridge.log_text());

    bridge.spawn();
    client
        .client
        .publish("big/after", QoS::ExactlyOnce, false, br#"{"n":2}"#.to_vec())
        .await
        .expect("queue publish");
    wait_for_key(&mut conn, "msg:2", &bridge).await;
    let records = dead_letters(&mut conn);
    assert_eq!(records.len(), 1, "dead-lettered once: {records:?}");
    assert_eq!(records[0]["reason"], "payload_too_large", "{}", records[0]);
}

// A fake broker, speaking just enough MQTT 3.1.1 on loopback for the bridge to subscribe and
// receive: real brokers refuse to forward a topic that is not UTF-8 (Mosquitto rejects such
// a PUBLISH from its client), so only raw bytes can put one in front of the bridge's decoder,
// which is what is tested here.

/// One MQTT packet: its first byte and its body (after the remaining length).
async fn read_packet(stream: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let first = stream.read_u8().await?;
    let mut len = 0usize;
    for shift in [0, 7, 14, 21] {
        let byte = stream.read_u8().await?;
        len |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            let mut body = vec![0; len];
            stream.read_exact(&mut body).await?;
            return Ok((first, body));
        }
    }
    Err(ErrorKind::InvalidData.into())
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut len = body.len();
    loop {
        let byte = (len % 128) as u8;
        len /= 128;
        out.push(if len > 0 { byte | 0x80 } else { byte });
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

fn publish_qos1(topic: &[u8], pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic);
    body.extend_from_slice(&pkid.to_be_bytes());
    body.extend_from_slice(payload);
    packet(0x32, &body)
}

/// The next packet that is not a PINGREQ (answered), within [`WAIT`].
async fn next_packet(stream: &mut TcpStream, bridge: &Bridge) -> (u8, Vec<u8>) {
    loop {
        let read = tokio::time::timeout(WAIT, read_packet(stream)).await;
        match read {
            Ok(Ok((0xc0, _))) => stream
                .write_all(&[0xd0, 0x00])
                .await
                .expect("write PINGRESP"),
            Ok(Ok(packet)) => return packet,
            Ok(Err(e)) => panic!(
                "the bridge dropped the connection ({e}); log:\n{}",
                bridge.log_text()
            ),
            Err(_) => panic!("nothing from the bridge; log:\n{}", bridge.log_text()),
        }
    }
}

/// A lax broker passes on a topic that is not UTF-8 (MQTT-1.5.3-1 forbids it). The broker
/// here is the fake one above, on purpose: Mosquitto drops a client that publishes such a
/// topic, so only raw bytes can put one in front of the bridge's decoder — which is what is
/// under test, not the integration. It must get a PUBACK for that message and for the valid
/// one behind it, on the same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_that_is_not_utf8_is_acked_and_dead_lettered() {
    let redis = Redis::start();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    // The bridge's config, pointing at the fake broker instead of a Mosquitto.
    let text = format!(
        r#"[mqtt]
url = "mqtt://127.0.0.1:{port}"
client_id = "bridge-not-utf8"
keep_alive = "5s"
reconnect_max_delay = "1s"

[redis]
url = "{redis}"
socket_timeout = "2s"

[http]
listen = "127.0.0.1:0"

[dead_letter]
redis_list = "dead_letter"

{ROUTE}
"#,
        redis = redis.url()
    );
    let bridge = Bridge::start_unready(&text);
    let (mut stream, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .expect("the bridge connects in time")
        .expect("accept");

    let (first, _) = next_packet(&mut stream, &bridge).await;
    assert_eq!(first >> 4, 1, "CONNECT first");
    stream
        .write_all(&[0x20, 0x02, 0x00, 0x00])
        .await
        .expect("CONNACK");
    let (first, body) = next_packet(&mut stream, &bridge).await;
    assert_eq!(first, 0x82, "SUBSCRIBE next");
    // SUBACK granting QoS 1 to each filter (2-byte length, filter, QoS byte).
    let mut suback = body[..2].to_vec();
    let mut at = 2;
    while at + 2 <= body.len() {
        let len = usize::from(u16::from_be_bytes([body[at], body[at + 1]]));
        at += 2 + len + 1;
        suback.push(0x01);
    }
    stream
        .write_all(&packet(0x90, &suback))
        .await
        .expect("SUBACK");

    let mut both = publish_qos1(b"big/\xff\xfe", 1, br#"{"n":98}"#);
    both.extend(publish_qos1(b"big/ok", 2, br#"{"n":1}"#));
    stream.write_all(&both).await.expect("PUBLISH");

    for pkid in [1u16, 2] {
        let (first, body) = next_packet(&mut stream, &bridge).await;
        assert_eq!(
            (first, body),
            (0x40, pkid.to_be_bytes().to_vec()),
            "PUBACK {pkid}, in arrival order; log:\n{}",
            bridge.log_text()
        );
    }
    let mut conn = connection(&redis);
    wait_for_key(&mut conn, "msg:1", &bridge).await;
    assert!(
        !conn.exists::<_, bool>("msg:98").expect("exists"),
        "the message was not processed"
    );
    let records = dead_letters(&mut conn);
    assert_eq!(records.len(), 1, "one dead letter: {records:?}");
    let record = &records[0];
    assert_eq!(record["reason"], "invalid_utf8", "{record}");
    assert_eq!(record["route"], "numbered", "{record}");
    assert_eq!(record["topic"], "big/\u{fffd}\u{fffd}", "{record}");
    assert_eq!(record["payload"], r#"{"n":98}"#, "{record}");
    assert!(
        record["detail"]
            .as_str()
            .is_some_and(|d| d.contains("YmlnL//+")),
        "the detail holds the topic as received, in base64: {record}"
    );
}
