//! How the daemon connects to the broker (spec §4 `[mqtt]`, §10): username and password
//! (inline or from `password_file`), `mqtts://` with a private CA and a client certificate,
//! shared subscriptions (`share_group`), and what `clean_session = true` gives up.
//!
//! A bridge that cannot connect — refused credentials, a failed TLS handshake — must keep
//! retrying without crashing and still exit 0 on SIGTERM: on a gateway the broker's
//! configuration is often fixed after the bridge was started.
//!
//! That `clean_session = false` (the default) keeps what is published while the bridge is
//! stopped is proven in `bridge_delivery.rs` (SIGTERM mid-stream, and `kill -9`).

use std::collections::BTreeSet;
use std::time::Duration;

use redis::Commands;

use crate::bridge::{check_config, config, eventually, Bridge, Client, SUBSCRIBED};
use crate::harness::{free_port, mosquitto_password_file, Mosquitto, Pki, Redis};

/// How long a bridge may take to write what was published (debug build, shared CPU).
const WRITTEN: Duration = Duration::from_secs(30);

/// How long a bridge that cannot connect may take to log its first failed attempts.
const RETRIED: Duration = Duration::from_secs(20);

/// The log line of the MQTT source for every failed connection attempt.
const CONNECTION_LOST: &str = "MQTT connection lost";

/// A route pushing every message on `mqtt/data` onto the Redis list `list`.
fn route_to(list: &str) -> String {
    format!(
        r#"
[[routes]]
name = "collect"
topic = "mqtt/data"
[[routes.actions]]
op = "rpush"
key = "{list}"
"#
    )
}

/// `config` with `lines` added to its `[mqtt]` table.
fn with_mqtt(config: String, lines: &str) -> String {
    config.replacen("[mqtt]\n", &format!("[mqtt]\n{lines}\n"), 1)
}

/// `config` with the broker URL replaced by `url`.
fn with_url(config: String, broker: &Mosquitto, url: &str) -> String {
    config.replacen(
        &format!("url = \"{}\"", broker.url()),
        &format!("url = \"{url}\""),
        1,
    )
}

fn numbered(range: std::ops::Range<u32>) -> Vec<(String, Vec<u8>)> {
    range
        .map(|n| {
            (
                "mqtt/data".to_string(),
                format!(r#"{{"n":{n}}}"#).into_bytes(),
            )
        })
        .collect()
}

/// The message numbers pushed onto `list`, in list order.
fn pushed(conn: &mut redis::Connection, list: &str) -> Vec<u32> {
    let items: Vec<String> = conn.lrange(list, 0, -1).unwrap_or_default();
    items
        .iter()
        .map(|item| {
            let v: serde_json::Value = serde_json::from_str(item).expect("pushed JSON");
            v["n"].as_u64().expect("n") as u32
        })
        .collect()
}

/// Waits until `list` holds at least `count` items; returns its numbers then.
async fn wait_pushed(conn: &mut redis::Connection, list: &str, count: usize) -> Vec<u32> {
    eventually(WRITTEN, || {
        (conn.llen::<_, usize>(list).unwrap_or(0) >= count).then_some(())
    })
    .await;
    pushed(conn, list)
}

fn connection(redis: &Redis) -> redis::Connection {
    redis
        .client()
        .get_connection()
        .expect("test connection to redis")
}

/// Waits until `needle` was logged twice: the bridge failed, and then tried again.
fn wait_for_retry(bridge: &Bridge, needle: &str) {
    assert!(
        bridge.wait_for_log(needle, RETRIED),
        "no {needle:?} in the log; log:\n{}",
        bridge.log_text()
    );
    let first = bridge.log_text().find(needle).expect("just seen");
    assert!(
        bridge.wait_for_log_after(first + needle.len(), needle, RETRIED),
        "the bridge did not try again after {needle:?}; log:\n{}",
        bridge.log_text()
    );
}

/// A broker that refuses anonymous clients, knowing `bridge`/`bridge-secret` and
/// `publisher`/`publisher-secret`. The returned directory holds the password file.
fn broker_with_passwords() -> (Mosquitto, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("passwords");
    mosquitto_password_file(
        &file,
        &[
            ("bridge", "bridge-secret"),
            ("publisher", "publisher-secret"),
        ],
    );
    let broker = Mosquitto::start_with(&format!(
        "allow_anonymous false\npassword_file {}\n",
        file.display()
    ));
    (broker, dir)
}

async fn authenticated_publisher(broker: &Mosquitto) -> Client {
    Client::connect_with(broker, "auth-publisher", |options| {
        options.set_credentials("publisher", "publisher-secret");
    })
    .await
}

/// Starts a bridge with `credentials` in `[mqtt]` and proves that it writes what is
/// published.
async fn assert_an_authenticated_bridge_writes(credentials: &str) {
    let redis = Redis::start();
    let (broker, _passwords) = broker_with_passwords();
    let _bridge = Bridge::start(&with_mqtt(
        config(&redis, &broker, "bridge-auth", &route_to("got")),
        credentials,
    ));
    let mut publisher = authenticated_publisher(&broker).await;
    publisher.publish_all(numbered(0..5)).await;
    let mut conn = connection(&redis);
    assert_eq!(wait_pushed(&mut conn, "got", 5).await, vec![0, 1, 2, 3, 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_with_the_right_username_and_password_writes_messages() {
    assert_an_authenticated_bridge_writes("username = \"bridge\"\npassword = \"bridge-secret\"")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mqtt_password_can_come_from_password_file() {
    let secrets = tempfile::tempdir().expect("tempdir");
    let file = secrets.path().join("mqtt-password");
    // A trailing newline, as `echo secret > file` leaves it: not part of the password.
    std::fs::write(&file, "bridge-secret\n").expect("write password file");
    assert_an_authenticated_bridge_writes(&format!(
        "username = \"bridge\"\npassword_file = \"{}\"",
        file.display()
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_are_retried_without_crashing_and_sigterm_exits_0() {
    let redis = Redis::start();
    let (broker, _passwords) = broker_with_passwords();
    let mut bridge = Bridge::start_unready(&with_mqtt(
        config(&redis, &broker, "bridge-bad-auth", &route_to("got")),
        "username = \"bridge\"\npassword = \"wrong\"",
    ));
    // Mosquitto answers a bad password with CONNACK "not authorized" (MQTT 3.1.1 code 5).
    wait_for_retry(&bridge, "Connection refused");
    assert!(
        bridge.log_text().contains("NotAuthorized"),
        "the log names the reason; log:\n{}",
        bridge.log_text()
    );
    assert!(
        !bridge.log_text().contains(SUBSCRIBED),
        "a refused bridge cannot have subscribed; log:\n{}",
        bridge.log_text()
    );
    // The password is a secret: never logged, not even when it is refused.
    assert!(
        !bridge.log_text().contains("wrong\""),
        "log:\n{}",
        bridge.log_text()
    );
    let status = bridge.terminate(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "log:\n{}", bridge.log_text());
}

/// A broker with a TLS listener for `pki` (client certificate required) next to the
/// harness's plain one, which the test publisher uses. Returns the TLS port.
fn broker_with_tls(pki: &Pki) -> (Mosquitto, u16) {
    let tls_port = free_port();
    let broker = Mosquitto::start_with(&pki.mosquitto_listener(tls_port));
    (broker, tls_port)
}

/// A bridge config for `mqtts://<host>:<tls_port>` pushing onto `list`, with `tls` lines in
/// `[mqtt]`.
fn tls_config(
    redis: &Redis,
    broker: &Mosquitto,
    (host, tls_port): (&str, u16),
    list: &str,
    tls: &str,
) -> String {
    with_mqtt(
        with_url(
            config(
                redis,
                broker,
                &format!("bridge-tls-{list}"),
                &route_to(list),
            ),
            broker,
            &format!("mqtts://{host}:{tls_port}"),
        ),
        tls,
    )
}

/// `[mqtt]` lines for `ca_file` and the client certificate and key.
fn tls_files(ca: &Pki, client: &Pki) -> String {
    format!(
        "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
        ca.ca_cert().display(),
        client.client_cert().display(),
        client.client_key().display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_with_a_private_ca_and_a_client_certificate_writes_messages() {
    let pki = Pki::generate();
    let redis = Redis::start();
    let (broker, tls_port) = broker_with_tls(&pki);
    // The server certificate names the broker by DNS name and by IP address.
    let files = tls_files(&pki, &pki);
    let _by_name = Bridge::start(&tls_config(
        &redis,
        &broker,
        ("localhost", tls_port),
        "by-name",
        &files,
    ));
    let _by_ip = Bridge::start(&tls_config(
        &redis,
        &broker,
        ("127.0.0.1", tls_port),
        "by-ip",
        &files,
    ));
    let mut publisher = Client::connect(&broker, "tls-publisher").await;
    publisher.publish_all(numbered(0..5)).await;
    let mut conn = connection(&redis);
    assert_eq!(
        wait_pushed(&mut conn, "by-name", 5).await,
        vec![0, 1, 2, 3, 4]
    );
    assert_eq!(
        wait_pushed(&mut conn, "by-ip", 5).await,
        vec![0, 1, 2, 3, 4]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_without_the_required_client_certificate_is_retried_and_sigterm_exits_0() {
    let pki = Pki::generate();
    let redis = Redis::start();
    let (broker, tls_port) = broker_with_tls(&pki);
    let mut bridge = Bridge::start_unready(&tls_config(
        &redis,
        &broker,
        ("localhost", tls_port),
        "got",
        &format!("ca_file = \"{}\"", pki.ca_cert().display()),
    ));
    wait_for_retry(&bridge, CONNECTION_LOST);
    assert!(
        !bridge.log_text().contains(SUBSCRIBED),
        "the broker requires a client certificate; log:\n{}",
        bridge.log_text()
    );
    let status = bridge.terminate(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "log:\n{}", bridge.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_refuses_a_server_certificate_from_another_ca() {
    let pki = Pki::generate();
    let stranger = Pki::generate();
    let redis = Redis::start();
    let (broker, tls_port) = broker_with_tls(&pki);
    let mut bridge = Bridge::start_unready(&tls_config(
        &redis,
        &broker,
        ("localhost", tls_port),
        "got",
        &tls_files(&stranger, &pki),
    ));
    wait_for_retry(&bridge, CONNECTION_LOST);
    let log = bridge.log_text();
    assert!(
        log.contains("invalid peer certificate") && !log.contains(SUBSCRIBED),
        "the server's certificate is not signed by ca_file; log:\n{log}"
    );
    let status = bridge.terminate(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "log:\n{}", bridge.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridges_in_one_share_group_split_the_messages_each_written_once() {
    const TOTAL: u32 = 200;
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let group = "share_group = \"bridges\"";
    let _a = Bridge::start(&with_mqtt(
        config(&redis, &broker, "bridge-share-a", &route_to("got:a")),
        group,
    ));
    let _b = Bridge::start(&with_mqtt(
        config(&redis, &broker, "bridge-share-b", &route_to("got:b")),
        group,
    ));
    let mut publisher = Client::connect(&broker, "share-publisher").await;
    publisher.publish_all(numbered(0..TOTAL)).await;

    let mut conn = connection(&redis);
    eventually(WRITTEN, || {
        let a: usize = conn.llen("got:a").unwrap_or(0);
        let b: usize = conn.llen("got:b").unwrap_or(0);
        (a + b >= TOTAL as usize).then_some(())
    })
    .await;
    let (a, b) = (pushed(&mut conn, "got:a"), pushed(&mut conn, "got:b"));
    let mut all: Vec<u32> = a.iter().chain(&b).copied().collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (0..TOTAL).collect::<Vec<_>>(),
        "every message written exactly once by the group (a: {}, b: {})",
        a.len(),
        b.len()
    );
    assert!(
        !a.is_empty() && !b.is_empty(),
        "both bridges took a share (a: {}, b: {})",
        a.len(),
        b.len()
    );
    let overlap: BTreeSet<&u32> = a.iter().filter(|n| b.contains(n)).collect();
    assert!(overlap.is_empty(), "written by both: {overlap:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_clean_session_true_messages_published_while_stopped_are_not_delivered() {
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let mut bridge = Bridge::start(&with_mqtt(
        config(&redis, &broker, "bridge-clean", &route_to("got")),
        "clean_session = true",
    ));
    let mut publisher = Client::connect(&broker, "clean-publisher").await;
    let mut conn = connection(&redis);
    publisher.publish_all(numbered(0..1)).await;
    assert_eq!(wait_pushed(&mut conn, "got", 1).await, vec![0]);

    let status = bridge.terminate(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "log:\n{}", bridge.log_text());
    // Nobody holds a session for the bridge now: the broker drops these.
    publisher.publish_all(numbered(1..11)).await;
    bridge.spawn();
    // A broker that had kept the session would deliver 1..=10 before anything newer.
    publisher.publish_all(numbered(11..12)).await;
    assert_eq!(
        wait_pushed(&mut conn, "got", 2).await,
        vec![0, 11],
        "with clean_session = true what is published while the bridge is away is lost; log:\n{}",
        bridge.log_text()
    );
}

#[test]
fn check_reports_unusable_tls_files_naming_their_keys() {
    let pki = Pki::generate();
    let tls = |files: &str| {
        format!(
            "[mqtt]\nurl = \"mqtts://localhost:8883\"\n{files}\n[http]\nlisten = \"127.0.0.1:0\"\n"
        )
    };
    let (code, text) = check_config(&tls(&tls_files(&pki, &pki)));
    assert_eq!(code, Some(0), "usable TLS files pass: {text}");

    // A CA file holding a key, and a client key that belongs to another certificate.
    let (code, text) = check_config(&tls(&format!(
        "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
        pki.ca_key().display(),
        pki.client_cert().display(),
        pki.server_key().display()
    )));
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("mqtt.ca_file: holds no PEM certificate")
            && text.contains("mqtt.key_file: is not the key of cert_file"),
        "{text}"
    );

    // Missing files, found before the first connection.
    let (code, text) = check_config(&tls(
        "ca_file = \"/nonexistent/ca.crt\"\ncert_file = \"/nonexistent/c.crt\"\n\
         key_file = \"/nonexistent/c.key\"",
    ));
    assert_eq!(code, Some(2), "{text}");
    for key in ["ca_file", "cert_file", "key_file"] {
        assert!(
            text.contains(&format!("mqtt.{key}: cannot read it")),
            "{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_without_a_username_is_logged_as_not_sent() {
    let redis = Redis::start();
    let (broker, _passwords) = broker_with_passwords();
    let mut bridge = Bridge::start_unready(&with_mqtt(
        config(&redis, &broker, "bridge-no-user", &route_to("got")),
        "password = \"bridge-secret\"",
    ));
    wait_for_retry(&bridge, "Connection refused");
    assert!(
        bridge
            .log_text()
            .contains("mqtt.password is set but mqtt.username is not"),
        "log:\n{}",
        bridge.log_text()
    );
    let status = bridge.terminate(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "log:\n{}", bridge.log_text());
}
