//! A newcomer's first five minutes (issue "one stage, one place"): what the log says when the
//! services are not running yet, and when the first message goes nowhere.

use std::time::Duration;

use crate::bridge::{config, Bridge, Client};
use crate::harness::{free_port, Mosquitto, Redis};

const ROUTE: &str = r#"
[[routes]]
name = "needs-session"
topic = "sensors/{id}/data"
[routes.session]
key = "session:{id}"
required = true
[[routes.actions]]
op = "set"
key = "latest:{id}"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_refusal_of_a_kind_on_a_route_is_logged_at_info_once() {
    let redis = Redis::start();
    let broker = Mosquitto::start();
    let bridge = Bridge::start_with_env(
        &config(&redis, &broker, "newcomer-refusal", ROUTE),
        &[("RUST_LOG", "info")],
    );
    let mut client = Client::connect(&broker, "newcomer-publisher").await;
    for seq in 0..3 {
        client
            .publish("sensors/dev-1/data", format!(r#"{{"seq":{seq}}}"#))
            .await;
    }
    let needle = "outcome=unauthorized";
    assert!(
        bridge.wait_for_log(needle, Duration::from_secs(20)),
        "the first unauthorized message is explained at info; log:\n{}",
        bridge.log_text()
    );
    let log = bridge.log_text();
    let line = log.lines().find(|l| l.contains(needle)).expect("just seen");
    assert!(
        line.contains("requires a session"),
        "the line says why: {line}"
    );
    // The other two are counted, not logged at info (a flood would drown the first).
    let mut metrics = String::new();
    for _ in 0..200 {
        metrics = crate::ops::get(crate::ops::http_addr(&bridge), "/metrics")
            .await
            .1;
        if crate::ops::sample(
            &metrics,
            r#"routemq_bridge_messages_total{route="needs-session",outcome="unauthorized"}"#,
        ) == Some(3.0)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        metrics.contains(r#"outcome="unauthorized"} 3"#),
        "{metrics}"
    );
    assert_eq!(
        bridge.log_text().matches(needle).count(),
        1,
        "one info line for three refusals; log:\n{}",
        bridge.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_started_before_its_services_says_once_what_it_waits_for() {
    let (mqtt_port, redis_port) = (free_port(), free_port());
    let text = format!(
        r#"[mqtt]
url = "mqtt://127.0.0.1:{mqtt_port}"
client_id = "newcomer-waiting"
reconnect_max_delay = "200ms"
[redis]
url = "redis://127.0.0.1:{redis_port}"
[http]
listen = "127.0.0.1:0"
{ROUTE}"#
    );
    let bridge = Bridge::start_unready(&text);
    for needle in ["waiting for Redis", "waiting for the MQTT broker"] {
        assert!(
            bridge.wait_for_log(needle, Duration::from_secs(20)),
            "{needle:?} said; log:\n{}",
            bridge.log_text()
        );
    }
    // Retries go on (several connection attempts), the explanation is said once.
    let lost = "MQTT connection lost";
    assert!(
        bridge.wait_for_log(lost, Duration::from_secs(20)),
        "a failed attempt"
    );
    let first = bridge.log_text().find(lost).expect("just seen");
    assert!(bridge.wait_for_log_after(first + lost.len(), lost, Duration::from_secs(20)));
    let log = bridge.log_text();
    assert_eq!(
        log.matches("waiting for the MQTT broker").count(),
        1,
        "{log}"
    );
    assert_eq!(log.matches("waiting for Redis").count(), 1, "{log}");
    assert!(
        log.contains(&format!("127.0.0.1:{redis_port}")),
        "names where: {log}"
    );
}
