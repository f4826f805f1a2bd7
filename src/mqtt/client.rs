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

/// Why the MQTT client could not be configured (bad URL, unreadable certificate, …).
#[derive(Debug, thiserror::Error)]
#[error("mqtt: {0}")]
pub struct OptionsError(pub String);

/// Requests (acks, forwards, subscriptions) written per flush. Bounded so one batch is at
/// most a few KiB of acks; larger publishes make the codec flush earlier anyway.
const MAX_REQUEST_BATCH: usize = 128;

/// rumqttc options for `config`, with manual acks (we ack only what reached Redis).
pub fn options(config: &MqttConfig) -> Result<MqttOptions, OptionsError> {
    if config.protocol == Protocol::V5 {
        return Err(OptionsError(
            "protocol = \"5\" is not supported yet; use \"3.1.1\"".into(),
        ));
    }
    let broker = config.broker().map_err(OptionsError)?;
    let mut options = MqttOptions::new(config.client_id.clone(), broker.host, broker.port);
    options
        .set_clean_session(config.clean_session)
        .set_keep_alive(config.keep_alive.max(Duration::from_secs(1)))
        .set_manual_acks(true)
        // Acks, forwards and subscriptions queue here; generous so `try_ack` never finds it
        // full in practice (the broker's in-flight window bounds what we hold).
        .set_request_channel_capacity(4096)
        // Write up to this many queued requests before one flush (our patch of rumqttc,
        // vendor/rumqttc/PATCHED.md): the acks of a burst leave in one write, not one
        // system call and TCP segment each (TCP_NODELAY is on, see `source`).
        .set_max_request_batch(MAX_REQUEST_BATCH);
    let max = usize::try_from(config.max_packet_size).unwrap_or(usize::MAX);
    options.set_max_packet_size(max, max);
    match (&config.username, &config.password) {
        (Some(user), password) => {
            // No password: rumqttc then sends the user name alone, as MQTT allows.
            let password = password
                .as_ref()
                .map(|p| p.expose().to_string())
                .unwrap_or_default();
            options.set_credentials(user.clone(), password);
        }
        // Not an error at load: a RouteMQ `.env` may carry MQTT_PASSWORD for a broker
        // that ignores it. But the operator should learn that it is not sent.
        (None, Some(_)) => tracing::warn!(
            "mqtt.password is set but mqtt.username is not; MQTT 3.1.1 sends a password only \
             with a user name, so the bridge connects without credentials"
        ),
        (None, None) => {}
    }
    if broker.tls {
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls_config(config)?),
        )));
    }
    Ok(options)
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
