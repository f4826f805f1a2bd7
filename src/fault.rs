//! Faults the integration tests inject into the real daemon, to prove that a bug of ours
//! neither wedges nor silences it (spec §6: "the process never lingers broken").
//!
//! TEST-ONLY. Compiled into debug builds only (the integration tests run the debug binary);
//! in a release build every function here is an empty inline one, so the message path pays
//! nothing. Each fault is armed by an environment variable read once, at first use, naming
//! the payload that triggers it:
//!
//! - `ROUTEMQ_FAULT_PANIC_ON_PAYLOAD`: handling that message panics (→ `internal_error`).
//! - `ROUTEMQ_FAULT_HANG_ON_PAYLOAD`: handling that message never ends (a stuck lane).
//! - `ROUTEMQ_FAULT_END_MQTT_LOOP_ON_PAYLOAD`: the MQTT loop panics on receiving it.
//!
//! Not `ROUTEMQ_BRIDGE_…`: that prefix is the config loader's, which would refuse the
//! variables as unknown keys.

#[cfg(debug_assertions)]
mod armed {
    use std::sync::OnceLock;

    struct Faults {
        panic_on: Option<Vec<u8>>,
        hang_on: Option<Vec<u8>>,
        end_mqtt_loop_on: Option<Vec<u8>>,
    }

    fn faults() -> &'static Faults {
        static FAULTS: OnceLock<Faults> = OnceLock::new();
        FAULTS.get_or_init(|| {
            let var = |name: &str| {
                std::env::var_os(name)
                    .filter(|v| !v.is_empty())
                    .map(|v| v.into_encoded_bytes())
            };
            Faults {
                panic_on: var("ROUTEMQ_FAULT_PANIC_ON_PAYLOAD"),
                hang_on: var("ROUTEMQ_FAULT_HANG_ON_PAYLOAD"),
                end_mqtt_loop_on: var("ROUTEMQ_FAULT_END_MQTT_LOOP_ON_PAYLOAD"),
            }
        })
    }

    /// While handling one message: panics or hangs when its payload is the armed one.
    pub async fn in_handler(payload: &[u8]) {
        let faults = faults();
        if faults.panic_on.as_deref() == Some(payload) {
            panic!("injected fault: a panic while handling a message");
        }
        if faults.hang_on.as_deref() == Some(payload) {
            tracing::warn!("injected fault: this message's handling hangs forever");
            std::future::pending::<()>().await;
        }
    }

    /// In the MQTT loop, as a message arrives: panics when its payload is the armed one.
    pub fn in_mqtt_loop(payload: &[u8]) {
        if faults().end_mqtt_loop_on.as_deref() == Some(payload) {
            panic!("injected fault: the MQTT loop dies");
        }
    }
}

#[cfg(debug_assertions)]
pub use armed::{in_handler, in_mqtt_loop};

#[cfg(not(debug_assertions))]
#[inline(always)]
pub async fn in_handler(_payload: &[u8]) {}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn in_mqtt_loop(_payload: &[u8]) {}
