//! The daemon end to end: a message published to the broker lands in Redis.

use std::time::Duration;

use redis::Commands;

use crate::bridge::{config, eventually, Bridge, Client};
use crate::harness::{Mosquitto, Redis};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_published_message_is_written_to_redis() {
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let _bridge = Bridge::start(&config(
        &redis,
        &broker,
        "bridge-smoke",
        r#"
[[routes]]
name = "latest"
topic = "sensors/{device_id}/data"
[[routes.actions]]
op = "set"
key = "sensor:{device_id}:latest"
"#,
    ));
    let mut client = Client::connect(&broker, "smoke-publisher").await;
    client.publish("sensors/dev-1/data", r#"{"t":21.5}"#).await;
    let mut conn = redis.client().get_connection().expect("redis");
    let value = eventually(Duration::from_secs(10), || {
        conn.get::<_, Option<String>>("sensor:dev-1:latest")
            .ok()
            .flatten()
    })
    .await;
    assert_eq!(value.as_deref(), Some(r#"{"t":21.5}"#));
}
