//! TLS set-up shared by every client in the process.
//!
//! rustls 0.23 needs a process-wide crypto provider before any TLS handshake. The crate is
//! built with rustls' `ring` backend only (no C/assembler toolchain surprises on gateways), and
//! both the Redis client (`rediss://`) and the MQTT client (`mqtts://`) build their TLS
//! configs from the process default, so one place installs it, once.

use std::sync::Once;

static INSTALL: Once = Once::new();

/// Installs rustls' `ring` provider as the process default. Idempotent and cheap after the
/// first call; call it before building any TLS client.
///
/// If another part of the process (a dependency, an embedding application) installed a
/// provider first, that one is kept: rustls allows exactly one default, and replacing it
/// under a running client would be worse than using it.
pub fn install_crypto_provider() {
    INSTALL.call_once(|| {
        // Err means a default is already installed, which is what we want anyway.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crypto_provider_is_installed_and_second_call_is_harmless() {
        install_crypto_provider();
        install_crypto_provider();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }
}
