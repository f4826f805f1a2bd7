//! `rediss://`: the manager speaks TLS to Redis (rustls with the ring provider), verifying
//! the server against the trust store — here a throwaway CA handed to the daemon through
//! `SSL_CERT_FILE`, which the native trust store loader honours.

use std::time::Duration;

use redis::Commands;

use crate::bridge::{eventually, Bridge, Client};
use crate::harness::{free_port, Mosquitto, Pki, Redis};

fn tls_redis(pki: &Pki) -> (Redis, u16) {
    let tls_port = free_port();
    let redis = Redis::start_with(&[
        "--tls-port",
        &tls_port.to_string(),
        "--tls-cert-file",
        &pki.server_cert().display().to_string(),
        "--tls-key-file",
        &pki.server_key().display().to_string(),
        "--tls-ca-cert-file",
        &pki.ca_cert().display().to_string(),
        "--tls-auth-clients",
        "no",
    ]);
    (redis, tls_port)
}

fn config(broker: &Mosquitto, redis_url: &str) -> String {
    format!(
        r#"[mqtt]
url = "{mqtt}"
client_id = "bridge-rediss"
keep_alive = "5s"
reconnect_max_delay = "1s"

[redis]
url = "{redis_url}"
socket_timeout = "2s"

[http]
listen = "127.0.0.1:0"

[limits]
shutdown_timeout = "1s"

[[routes]]
name = "latest"
topic = "sensors/{{id}}/data"
payload = "text"
[[routes.actions]]
op = "set"
key = "tls:{{id}}"
"#,
        mqtt = broker.url(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_url_writes_over_tls_to_a_verified_server() {
    let pki = Pki::generate();
    let (redis, tls_port) = tls_redis(&pki);
    let broker = Mosquitto::start();
    let ca = pki.ca_cert().display().to_string();
    let _bridge = Bridge::start_with_env(
        &config(&broker, &format!("rediss://localhost:{tls_port}")),
        &[("SSL_CERT_FILE", ca.as_str())],
    );
    let mut client = Client::connect(&broker, "rediss-publisher").await;
    client.publish("sensors/dev-1/data", "over-tls").await;
    let mut conn = redis.client().get_connection().expect("redis");
    let value = eventually(Duration::from_secs(10), || {
        conn.get::<_, Option<String>>("tls:dev-1").ok().flatten()
    })
    .await;
    assert_eq!(value.as_deref(), Some("over-tls"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_refuses_a_server_the_trust_store_does_not_vouch_for() {
    let pki = Pki::generate();
    let (redis, tls_port) = tls_redis(&pki);
    let broker = Mosquitto::start();
    // Another CA in the trust store: the server's certificate does not chain to it.
    let other = Pki::generate();
    let ca = other.ca_cert().display().to_string();
    let mut bridge = Bridge::start_with_env(
        &config(&broker, &format!("rediss://localhost:{tls_port}")),
        &[("SSL_CERT_FILE", ca.as_str())],
    );
    assert!(
        bridge.wait_for_log("Redis is not reachable", Duration::from_secs(15)),
        "the bridge should not reach an unverified Redis; log:\n{}",
        bridge.log_text()
    );
    let mut client = Client::connect(&broker, "rediss-publisher-2").await;
    client.publish("sensors/dev-1/data", "must-not-land").await;
    assert!(
        bridge.wait_for_log("message waits and retries", Duration::from_secs(15)),
        "the message should wait for Redis; log:\n{}",
        bridge.log_text()
    );
    let mut conn = redis.client().get_connection().expect("redis");
    assert_eq!(
        conn.get::<_, Option<String>>("tls:dev-1").expect("get"),
        None
    );
    assert!(bridge.terminate(Duration::from_secs(15)).success());
}
