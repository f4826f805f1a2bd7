//! Turning `[mqtt]` into rumqttc options: broker address, session, packet limits, credentials
//! and TLS (`mqtts://`, with an optional CA and client certificate).

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
        .set_request_channel_capacity(4096);
    let max = usize::try_from(config.max_packet_size).unwrap_or(usize::MAX);
    options.set_max_packet_size(max, max);
    if let Some(user) = &config.username {
        let password = config
            .password
            .as_ref()
            .map(|p| p.expose().to_string())
            .unwrap_or_default();
        options.set_credentials(user.clone(), password);
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
    let mut roots = rustls::RootCertStore::empty();
    match &config.ca_file {
        Some(path) => {
            for cert in CertificateDer::pem_file_iter(path)
                .map_err(|e| OptionsError(format!("ca_file {}: {e}", path.display())))?
            {
                let cert =
                    cert.map_err(|e| OptionsError(format!("ca_file {}: {e}", path.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| OptionsError(format!("ca_file {}: {e}", path.display())))?;
            }
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            for cert in native.certs {
                let _ = roots.add(cert);
            }
        }
    }
    if roots.is_empty() {
        return Err(OptionsError(
            "no CA certificates: set mqtt.ca_file or install ca-certificates".into(),
        ));
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    match (&config.cert_file, &config.key_file) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| OptionsError(format!("cert_file {}: {e}", cert.display())))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| OptionsError(format!("key_file {}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| OptionsError(format!("client certificate: {e}")))
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => Err(OptionsError(
            "cert_file and key_file go together".to_string(),
        )),
    }
}
