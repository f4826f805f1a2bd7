//! Turning `[mqtt]` into rumqttc options: broker address, session, packet limits, credentials
//! and TLS (`mqtts://`, with an optional CA and client certificate). The config loader uses
//! [`check_tls_files`] so that unusable certificate files are config errors (exit 2, found
//! by `check`), not a failure at the first connection.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::config::{MqttConfig, Protocol};
use super::wire::{Client, EventLoop};

/// Why the MQTT client could not be configured (bad URL, unreadable certificate, …).
#[derive(Debug, thiserror::Error)]
#[error("mqtt: {0}")]
pub struct OptionsError(pub String);

/// Requests (acks, forwards, subscriptions) written per flush. Bounded so one batch is at
/// most a few KiB of acks; larger publishes make the codec flush earlier anyway.
const MAX_REQUEST_BATCH: usize = 128;

/// The broker connection for `config`, in its protocol (spec §6.1), not yet connected:
/// the event loop connects when first polled. Manual acks (we ack only what reached Redis),
/// TCP_NODELAY, the dead-peer timeout, and under MQTT 5 Receive Maximum = `max_inflight`.
pub fn connect(
    config: &MqttConfig,
    max_inflight: usize,
) -> Result<(Client, EventLoop), OptionsError> {
    // TCP_NODELAY (rumqttc leaves it off). With Nagle, a PUBACK written while the
    // previous one is unacknowledged waits for the broker's delayed ACK (40 ms on Linux);
    // with the broker's in-flight window full meanwhile, every message waits: p99 of 20-
    // 47 ms at 5-10k msg/s in the bench, against 1-4 ms with it on. The acks of a
    // backlog still share segments: the event loop writes queued acks in batches
    // (`MAX_REQUEST_BATCH`, see docs/benchmarks.md).
    //
    // A broker gone without FIN or RST (a pulled cable, a NAT that forgot the flow):
    // what we send (a ping every keep-alive) unacknowledged by its TCP for half a
    // keep-alive ends the connection, so it is noticed within ~1.5 × keep_alive, also
    // while reading is paused. A broker process that hangs with its kernel alive is
    // caught by the PINGRESP deadline in the event loop (vendor/rumqttc, Change 7).
    let keep_alive = config.keep_alive.max(Duration::from_secs(1));
    let network = |mut network: rumqttc::NetworkOptions| {
        network.set_tcp_nodelay(true);
        network.set_dead_peer_timeout(keep_alive / 2);
        network
    };
    match config.protocol {
        Protocol::V311 => {
            let (client, mut eventloop) = rumqttc::AsyncClient::new(options(config)?, CHANNEL);
            eventloop.set_network_options(network(eventloop.network_options()));
            Ok((Client::V4(client), EventLoop::V4(Box::new(eventloop))))
        }
        Protocol::V5 => {
            let options = options_v5(config, max_inflight)?;
            let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, CHANNEL);
            let net = network(eventloop.options.network_options());
            eventloop.options.set_network_options(net);
            Ok((Client::V5(client), EventLoop::V5(Box::new(eventloop))))
        }
    }
}

/// Our unacknowledged outgoing publishes (forwards, republish) per connection under MQTT 5,
/// as rumqttc's 3.1.1 default `inflight`.
const OUTGOING_INFLIGHT: u16 = 100;

/// rumqttc's request channel: acks, forwards and subscriptions queue here; generous so
/// `try_ack` never finds it full in practice (the broker's in-flight window bounds what we
/// hold).
const CHANNEL: usize = 4096;

/// rumqttc 3.1.1 options for `config`.
fn options(config: &MqttConfig) -> Result<MqttOptions, OptionsError> {
    let broker = config.broker().map_err(OptionsError)?;
    let mut options = MqttOptions::new(config.client_id.clone(), broker.host.clone(), broker.port);
    options
        .set_clean_session(config.clean_session)
        .set_keep_alive(config.keep_alive.max(Duration::from_secs(1)))
        .set_manual_acks(true)
        .set_request_channel_capacity(CHANNEL)
        // Write up to this many queued requests before one flush (our patch of rumqttc,
        // vendor/rumqttc/PATCHED.md): the acks of a burst leave in one write, not one
        // system call and TCP segment each (TCP_NODELAY is on, see `connect`).
        .set_max_request_batch(MAX_REQUEST_BATCH);
    let max = usize::try_from(config.max_packet_size).unwrap_or(usize::MAX);
    options.set_max_packet_size(max, max);
    if let Some((user, password)) = credentials(config) {
        options.set_credentials(user, password);
    }
    if let Some(transport) = transport(config, &broker)? {
        options.set_transport(transport);
    }
    Ok(options)
}

/// rumqttc MQTT 5 options for `config` (spec §6.1): the session lives `session_expiry`
/// instead of `clean_session`; CONNECT announces Receive Maximum = `max_inflight` (capped
/// at 65,535), so a broker that honours it sends no more unacked messages than we hold
/// (reading is still paused at the bound, for brokers that do not).
fn options_v5(
    config: &MqttConfig,
    max_inflight: usize,
) -> Result<rumqttc::v5::MqttOptions, OptionsError> {
    let broker = config.broker().map_err(OptionsError)?;
    let mut options =
        rumqttc::v5::MqttOptions::new(config.client_id.clone(), broker.host.clone(), broker.port);
    let expiry = u32::try_from(config.session_expiry.as_secs()).unwrap_or(u32::MAX);
    let receive_maximum = u16::try_from(max_inflight.max(1)).unwrap_or(u16::MAX);
    let max_packet = u32::try_from(config.max_packet_size).unwrap_or(u32::MAX);
    options
        // A new session only when the old one may not be kept: expiry 0 ends it with the
        // connection anyway; otherwise the broker resumes what it holds for us.
        .set_clean_start(expiry == 0)
        .set_session_expiry_interval(Some(expiry))
        .set_keep_alive(config.keep_alive.max(Duration::from_secs(1)))
        .set_manual_acks(true)
        .set_request_channel_capacity(CHANNEL)
        .set_receive_maximum(Some(receive_maximum))
        // Our limit is not announced: a broker that honours it would drop a bigger message
        // unseen, while the codec skips it as it streams in and the bridge dead-letters it
        // (`payload_too_large`), as under 3.1.1 (vendor/rumqttc/PATCHED.md, Change 5).
        .set_default_max_incoming_size(max_packet)
        // Our own unacknowledged publishes at most (the broker's Receive Maximum may allow
        // fewer): 3.1.1's default window. Without it rumqttc's v5 state allocates 65,536
        // slots (≈ 17 MB) per connection.
        .set_outgoing_inflight_upper_limit(OUTGOING_INFLIGHT)
        .set_max_request_batch(MAX_REQUEST_BATCH);
    if let Some((user, password)) = credentials(config) {
        options.set_credentials(user, password);
    }
    if let Some(transport) = transport(config, &broker)? {
        options.set_transport(transport);
    }
    Ok(options)
}

/// The user name and password to send, if any.
fn credentials(config: &MqttConfig) -> Option<(String, String)> {
    match (&config.username, &config.password) {
        (Some(user), password) => {
            // No password: rumqttc then sends the user name alone, as MQTT allows.
            let password = password
                .as_ref()
                .map(|p| p.expose().to_string())
                .unwrap_or_default();
            Some((user.clone(), password))
        }
        // Not an error at load: a RouteMQ `.env` may carry MQTT_PASSWORD for a broker
        // that ignores it. But the operator should learn that it is not sent.
        (None, Some(_)) => {
            tracing::warn!(
                "mqtt.password is set but mqtt.username is not; MQTT sends a password only \
                 with a user name here, so the bridge connects without credentials"
            );
            None
        }
        (None, None) => None,
    }
}

/// TLS for `mqtts://`.
fn transport(
    config: &MqttConfig,
    broker: &crate::config::BrokerAddress,
) -> Result<Option<Transport>, OptionsError> {
    if !broker.tls {
        return Ok(None);
    }
    Ok(Some(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(tls_config(config)?),
    ))))
}

fn tls_config(config: &MqttConfig) -> Result<rustls::ClientConfig, OptionsError> {
    crate::tls::install_crypto_provider();
    let file_error = |key: &str, path: &Path, message: String| {
        OptionsError(format!("{key} {}: {message}", path.display()))
    };
    let roots = match &config.ca_file {
        Some(path) => ca_roots(path).map_err(|e| file_error("ca_file", path, e))?,
        None => {
            let mut roots = rustls::RootCertStore::empty();
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(OptionsError(
                    "no system CA certificates found: set mqtt.ca_file or install \
                     ca-certificates"
                        .into(),
                ));
            }
            roots
        }
    };
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    match (&config.cert_file, &config.key_file) {
        (Some(cert), Some(key)) => {
            let chain = cert_chain(cert).map_err(|e| file_error("cert_file", cert, e))?;
            let key_der = private_key(key).map_err(|e| file_error("key_file", key, e))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| file_error("key_file", key, client_key_error(&e)))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(OptionsError(
            "cert_file and key_file go together".to_string(),
        )),
    }
}

/// Checks that the TLS files named in `[mqtt]` can be used — readable, holding what they
/// should, a client key that belongs to its certificate — so that `check` (and a start
/// with a bad config, exit 2) finds a broken deployment before the first connection does.
/// Returns `(key, message)` per problem. The system CA store is not checked here: a
/// config stays valid on a machine without one (it is checked at start).
pub(crate) fn check_tls_files(config: &MqttConfig) -> Vec<(&'static str, String)> {
    crate::tls::install_crypto_provider();
    let mut problems = Vec::new();
    if let Some(path) = &config.ca_file {
        if let Err(e) = ca_roots(path) {
            problems.push(("ca_file", e));
        }
    }
    if let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) {
        let chain = cert_chain(cert).map_err(|e| problems.push(("cert_file", e)));
        let key_der = private_key(key).map_err(|e| problems.push(("key_file", e)));
        if let (Ok(chain), Ok(key_der)) = (chain, key_der) {
            let builder = rustls::ClientConfig::builder()
                .with_root_certificates(rustls::RootCertStore::empty());
            if let Err(e) = builder.with_client_auth_cert(chain, key_der) {
                problems.push(("key_file", client_key_error(&e)));
            }
        }
    }
    problems
}

/// The CA certificates in the PEM file `path`: at least one, each one a usable root.
fn ca_roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(pem_error)? {
        roots
            .add(cert.map_err(pem_error)?)
            .map_err(|e| format!("not a usable CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into());
    }
    Ok(roots)
}

/// The client certificate chain in the PEM file `path`, our own certificate first.
fn cert_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(pem_error)?;
    if chain.is_empty() {
        return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into());
    }
    Ok(chain)
}

/// The private key in the PEM file `path` (PKCS#8, PKCS#1 or SEC1; not encrypted).
fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => "holds no unencrypted PEM private key \
             (PKCS#8, PKCS#1 or SEC1; an encrypted key must be decrypted first)"
            .to_string(),
        e => pem_error(e),
    })
}

fn pem_error(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => format!("cannot read it: {io}"),
        e => format!("not valid PEM: {e}"),
    }
}

/// Why a client certificate and key cannot be used together.
fn client_key_error(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InconsistentKeys(_) => "is not the key of cert_file".to_string(),
        e => format!("cannot be used with cert_file: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use rumqttc::{Incoming, MqttState, Packet, PubComp, PubRel};

    /// Our rumqttc patch (vendor/rumqttc/PATCHED.md, change 3): after a reconnect the broker
    /// redelivers PUBRELs whose QoS 2 state `clean` forgot; upstream dropped the connection
    /// on each, again after every reconnect.
    #[test]
    fn an_unknown_pubrel_is_answered_with_pubcomp() {
        let mut state = MqttState::new(10, true);
        let reply = state.handle_incoming_packet(Incoming::PubRel(PubRel::new(7)));
        assert!(
            matches!(reply, Ok(Some(Packet::PubComp(PubComp { pkid: 7 })))),
            "{reply:?}"
        );
    }
}
