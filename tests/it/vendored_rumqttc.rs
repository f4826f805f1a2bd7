//! The vendored rumqttc's own PEM parsing (`TlsConfiguration::Simple`), which the bridge never
//! reaches: it hands rumqttc a ready `rustls::ClientConfig` (`src/mqtt/client.rs`). Change 4 in
//! vendor/rumqttc/PATCHED.md replaced rustls-pemfile (unmaintained) there with
//! rustls-pki-types; these tests hold that path to what upstream's code did, so that a later
//! upstream release can replace the copy without anyone wondering what it behaved like.

use std::time::Duration;

use rumqttc::{
    ConnectionError, Event, EventLoop, MqttOptions, Packet, TlsConfiguration, TlsError, Transport,
};

use crate::harness::{free_port, Mosquitto, Pki};

/// Ample for a TLS handshake to a local broker in a debug build on a shared CPU.
const HANDSHAKE: Duration = Duration::from_secs(20);

fn read(path: std::path::PathBuf) -> Vec<u8> {
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// An event loop for `localhost:port` with rumqttc parsing `ca` and `client_auth` itself.
fn event_loop(port: u16, ca: Vec<u8>, client_auth: Option<(Vec<u8>, Vec<u8>)>) -> EventLoop {
    routemq_bridge::tls::install_crypto_provider();
    let mut options = MqttOptions::new("vendored-rumqttc-pem", "localhost", port);
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
        ca,
        alpn: None,
        client_auth,
    }));
    EventLoop::new(options, 10)
}

/// The first event of `eventloop`: a ConnAck, or the error that ended the attempt.
async fn first_event(eventloop: &mut EventLoop) -> Result<Event, ConnectionError> {
    tokio::time::timeout(HANDSHAKE, eventloop.poll())
        .await
        .expect("the connection attempt ends in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vendored_rumqttc_reads_pem_ca_client_cert_and_key_for_a_broker_requiring_them() {
    let pki = Pki::generate();
    let port = free_port();
    let _broker = Mosquitto::start_with(&pki.mosquitto_listener(port));
    // A certificate ahead of the key in the key file is skipped, as upstream's
    // `rustls_pemfile::read_one` loop skipped it (combined PEM files are common).
    let mut key = read(pki.client_cert());
    key.extend(read(pki.client_key()));
    let mut eventloop = event_loop(
        port,
        read(pki.ca_cert()),
        Some((read(pki.client_cert()), key)),
    );
    match first_event(&mut eventloop).await {
        Ok(Event::Incoming(Packet::ConnAck(ack))) => {
            assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success)
        }
        other => panic!("expected a ConnAck, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vendored_rumqttc_reports_a_missing_key_and_malformed_pem_as_upstream_did() {
    let pki = Pki::generate();
    // rumqttc parses the PEM only after the TCP connection is up, and fails before a TLS byte
    // is sent: a listener nobody accepts on is enough.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let port = listener.local_addr().expect("local addr").port();

    let no_key = read(pki.client_cert());
    let mut eventloop = event_loop(
        port,
        read(pki.ca_cert()),
        Some((read(pki.client_cert()), no_key)),
    );
    match first_event(&mut eventloop).await {
        Err(ConnectionError::Tls(TlsError::NoValidKeyInChain)) => {}
        other => panic!("expected NoValidKeyInChain, got {other:?}"),
    }

    // A section without its END line: rustls-pemfile's io::Error(InvalidData), kept.
    let ca = read(pki.ca_cert());
    let truncated = ca[..ca.len() - "-----END CERTIFICATE-----\n".len()].to_vec();
    let mut eventloop = event_loop(port, truncated, None);
    match first_event(&mut eventloop).await {
        Err(ConnectionError::Tls(TlsError::Io(e))) => {
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}")
        }
        other => panic!("expected an InvalidData I/O error, got {other:?}"),
    }
}
