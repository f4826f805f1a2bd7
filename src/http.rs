//! The HTTP endpoint (spec §8): `/metrics` for Prometheus, `/healthz` and `/readyz` for
//! whoever supervises the gateway.
//!
//! - `GET /metrics`: the Prometheus text format.
//! - `GET /healthz`: 200 while the daemon's loops are turning ([`Liveness`]); 503 naming the
//!   stuck loops otherwise. Says nothing about Redis or the broker: a restart would not fix
//!   those.
//! - `GET /readyz`: 200 only when MQTT is connected and subscribed and Redis is reachable
//!   and takes writes (or is disabled); otherwise 503. The JSON body says which side is
//!   down: `{"ready":false,"mqtt":"up","redis":"down"}`, or `"redis":"refusing"` while Redis
//!   answers but refuses writes (`OOM`, `READONLY`, `MISCONF`, …). A subscription the
//!   broker refused (MQTT 5 reason code, e.g. an ACL) keeps it 503 with the filters named:
//!   `{"ready":false,"mqtt":"down","redis":"up","refused":["alerts/#"]}` — the other routes
//!   run, but one of them gets nothing. With `[spool]`, the body also says
//!   `"spool":"active"|"idle"` (after `"redis"`), and while the spool takes what Redis
//!   cannot (spec §6.2) the answer stays 200:
//!   `{"ready":true,"mqtt":"up","redis":"down","spool":"active"}`.
//!
//! Three read-only routes do not need a framework: plain hyper 1 with HTTP/1.1, a header
//! read timeout, and a graceful shutdown that lets in-flight requests finish when the daemon
//! stops.
//!
//! A client that sends requests and never reads the answers (or keeps an idle connection)
//! must not hold a connection forever, nor crowd out `/healthz`. So every connection has an
//! overall deadline ([`CONNECTION_DEADLINE`], a keep-alive scraper simply reconnects), and
//! the accept loop never waits: up to [`MAX_CONNECTIONS`] connections get that deadline,
//! those beyond it are still served but cut after [`BUSY_DEADLINE`] — long enough to answer
//! a health check on loopback, too short to hold the endpoint — and beyond
//! [`MAX_BUSY_CONNECTIONS`] more a connection is closed at once.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::liveness::Liveness;
use crate::metrics::{Metrics, Observed};
use crate::redis::ConnectionState;

/// Connections with the full deadline at once: Prometheus and a health checker need a few.
const MAX_CONNECTIONS: usize = 64;
/// Connections beyond [`MAX_CONNECTIONS`] served with the short deadline at once.
const MAX_BUSY_CONNECTIONS: usize = 192;
/// A connection is closed this long after it was accepted, whatever it is doing: the bound
/// on a client that never reads (hyper has no write timeout) or idles on keep-alive.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
/// The deadline of a connection accepted while [`MAX_CONNECTIONS`] are open.
const BUSY_DEADLINE: Duration = Duration::from_secs(1);
/// A client that does not send its request headers in time is dropped.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long requests in flight may take once the daemon stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// What the endpoints read.
pub struct State {
    /// `None` when another `metrics` recorder was installed first (library use).
    pub metrics: Option<Metrics>,
    pub observed: Observed,
    pub liveness: Liveness,
}

/// The `/readyz` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub mqtt_up: bool,
    pub redis: ConnectionState,
    /// Filters the broker refused.
    pub refused: Vec<String>,
    /// With `[spool]`: whether it is active (spilling or holding messages).
    pub spool: Option<bool>,
    /// The spool takes what Redis cannot right now.
    pub spilling: bool,
}

impl Readiness {
    pub fn of(observed: &Observed) -> Readiness {
        let mqtt = observed.mqtt();
        Readiness {
            mqtt_up: mqtt.connected && mqtt.subscribed && mqtt.refused.is_empty(),
            redis: observed.redis_state(),
            refused: mqtt.refused,
            spool: observed.spool.as_ref().map(|s| s.active()),
            spilling: observed.spool.as_ref().is_some_and(|s| s.spilling()),
        }
    }

    pub fn ready(&self) -> bool {
        self.mqtt_up
            && (matches!(self.redis, ConnectionState::Up | ConnectionState::Disabled)
                || self.spilling)
    }

    /// `{"ready":bool,"mqtt":"up"|"down","redis":"up"|"down"|"refusing"|"disabled"}`, in
    /// that order, then `"spool":"active"|"idle"` with `[spool]`, then `"refused":[filters]`
    /// when the broker refused subscriptions.
    pub fn body(&self) -> String {
        let mut body = format!(
            r#"{{"ready":{},"mqtt":"{}","redis":"{}""#,
            self.ready(),
            if self.mqtt_up { "up" } else { "down" },
            self.redis.as_str()
        );
        match self.spool {
            None => {}
            Some(true) => body.push_str(r#","spool":"active""#),
            Some(false) => body.push_str(r#","spool":"idle""#),
        }
        if !self.refused.is_empty() {
            body.push_str(r#","refused":"#);
            body.push_str(&json!(self.refused).to_string());
        }
        body.push('}');
        body
    }
}

/// Binds `listen`. A port of 0 picks a free one; the bound address is logged either way.
pub async fn bind(listen: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(listen).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("http: cannot listen on {listen}: {e}"))
    })?;
    let addr = listener.local_addr()?;
    crate::events::http_listening(addr);
    Ok(listener)
}

/// Serves until `stop` turns true, then lets requests in flight finish (briefly).
pub fn serve(
    listener: TcpListener,
    state: Arc<State>,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let busy_permits = Arc::new(Semaphore::new(MAX_BUSY_CONNECTIONS));
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: pause rather than spin.
                        tracing::warn!(error = %e, "http: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = crate::liveness::stopped(&mut stop) => break,
            };
            // Never waiting for a permit: a connection waiting to be accepted could be the
            // health check, queued behind a flood.
            let (permit, deadline) = match permits.clone().try_acquire_owned() {
                Ok(permit) => (permit, CONNECTION_DEADLINE),
                Err(_) => match busy_permits.clone().try_acquire_owned() {
                    Ok(permit) => (permit, BUSY_DEADLINE),
                    Err(_) => {
                        tracing::debug!("http: too many connections; closing a new one");
                        continue;
                    }
                },
            };
            let state = state.clone();
            let service = hyper::service::service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&state, &request)) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                // A client going away mid-request is its business, not an error of ours;
                // one still there at the deadline is cut.
                let _ = tokio::time::timeout(deadline, connection).await;
                drop(permit);
            });
        }
        drop(listener);
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::debug!("http: requests still open at shutdown were cut");
        }
    })
}

fn respond(state: &State, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match request.uri().path() {
        "/metrics" => match &state.metrics {
            Some(metrics) => {
                let mut response = text(StatusCode::OK, metrics.render());
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                response
            }
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "another metrics recorder is installed in this process\n".into(),
            ),
        },
        "/healthz" => {
            let stuck = state.liveness.stuck();
            let status = if stuck.is_empty() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let body = json!({ "alive": stuck.is_empty(), "stuck": stuck }).to_string();
            json_response(status, body)
        }
        "/readyz" => {
            let readiness = Readiness::of(&state.observed);
            let status = if readiness.ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json_response(status, readiness.body())
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn json_response(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = text(status, body);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_the_side_that_is_down() {
        let redis_down = Readiness {
            mqtt_up: true,
            redis: ConnectionState::Down,
            refused: Vec::new(),
            spool: None,
            spilling: false,
        };
        assert!(!redis_down.ready());
        assert_eq!(
            redis_down.body(),
            r#"{"ready":false,"mqtt":"up","redis":"down"}"#
        );
        let disabled = Readiness {
            mqtt_up: true,
            redis: ConnectionState::Disabled,
            refused: Vec::new(),
            spool: None,
            spilling: false,
        };
        assert!(disabled.ready());
        let refusing = Readiness {
            mqtt_up: true,
            redis: ConnectionState::Refusing,
            refused: Vec::new(),
            spool: None,
            spilling: false,
        };
        assert!(!refusing.ready());
        assert_eq!(
            refusing.body(),
            r#"{"ready":false,"mqtt":"up","redis":"refusing"}"#
        );
        let mqtt_down = Readiness {
            mqtt_up: false,
            redis: ConnectionState::Up,
            refused: Vec::new(),
            spool: None,
            spilling: false,
        };
        assert!(!mqtt_down.ready());
        let refused = Readiness {
            mqtt_up: false,
            redis: ConnectionState::Up,
            refused: vec!["alerts/#".to_string()],
            spool: None,
            spilling: false,
        };
        assert!(!refused.ready());
        assert_eq!(
            refused.body(),
            r#"{"ready":false,"mqtt":"down","redis":"up","refused":["alerts/#"]}"#
        );
        assert!(mqtt_down.body().contains(r#""mqtt":"down""#));
    }

    #[test]
    fn a_spilling_spool_keeps_the_bridge_ready_and_says_so() {
        let spooling = Readiness {
            mqtt_up: true,
            redis: ConnectionState::Down,
            refused: Vec::new(),
            spool: Some(true),
            spilling: true,
        };
        assert!(spooling.ready());
        assert_eq!(
            spooling.body(),
            r#"{"ready":true,"mqtt":"up","redis":"down","spool":"active"}"#
        );
        let waiting = Readiness {
            spool: Some(false),
            spilling: false,
            ..spooling
        };
        assert!(
            !waiting.ready(),
            "before `after`, Redis being down is not covered yet"
        );
        assert_eq!(
            waiting.body(),
            r#"{"ready":false,"mqtt":"up","redis":"down","spool":"idle"}"#
        );
    }
}
