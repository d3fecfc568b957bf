//! TLS for `wss://` endpoints: the rustls configuration built from
//! [`TlsRoots`](super::TlsRoots), the certificate authorities the client trusts.
//!
//! Built once per [`Client`](super::Client), at its first `wss://` connection attempt,
//! and shared by every reconnect. The crypto provider is rustls' *ring* one, named here
//! so that no process-wide default provider has to be installed by the application.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

use super::options::TlsRoots;

/// Whether `url` asks for TLS (`wss://`, any letter case).
pub(crate) fn is_tls(url: &str) -> bool {
    url.get(..6)
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("wss://"))
}

/// The client configuration trusting `roots`, or why it cannot be built (a CA file
/// that cannot be read or holds no certificate, no usable system root).
pub(crate) fn client_config(roots: &TlsRoots) -> Result<Arc<ClientConfig>, String> {
    let mut store = RootCertStore::empty();
    match roots {
        TlsRoots::System => {
            let found = rustls_native_certs::load_native_certs();
            // Unparseable system certificates are skipped, as browsers do.
            let (added, _ignored) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let errors: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
                return Err(format!(
                    "no usable system root certificate (errors: [{}]); give a CA in \
                     Options::tls_roots",
                    errors.join("; ")
                ));
            }
        }
        TlsRoots::Pem(pem) => add_pem(&mut store, pem, "the CA PEM in Options::tls_roots")?,
        TlsRoots::File(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| format!("cannot read the CA file {}: {e}", path.display()))?;
            add_pem(&mut store, &pem, &format!("the CA file {}", path.display()))?;
        }
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            // The ring provider supports both default versions: this cannot fail.
            .expect("the ring provider supports TLS 1.2 and 1.3")
            .with_root_certificates(store)
            .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Adds every certificate of a PEM text to `store`; `what` names the source in errors.
fn add_pem(store: &mut RootCertStore, pem: &[u8], what: &str) -> Result<(), String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} is not PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} holds no certificate (expected `-----BEGIN CERTIFICATE-----`)"
        ));
    }
    for cert in certs {
        store
            .add(cert)
            .map_err(|e| format!("{what} holds an unusable certificate: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_wss_urls_take_tls() {
        assert!(is_tls("wss://example.com/ws"));
        assert!(is_tls("WSS://example.com/ws"));
        assert!(!is_tls("ws://example.com/ws"));
        assert!(!is_tls("wss:"));
    }

    #[test]
    fn a_ca_without_certificates_is_refused() {
        let error = client_config(&TlsRoots::Pem(b"not pem".to_vec())).unwrap_err();
        assert!(error.contains("holds no certificate"), "{error}");
        let error = client_config(&TlsRoots::File("/nonexistent/ca.pem".into())).unwrap_err();
        assert!(error.contains("cannot read the CA file"), "{error}");
    }
}
