//! The server's certificate: loading `--tls-cert` / `--tls-key`, and swapping them on
//! SIGHUP under live connections.
//!
//! [`CertStore`] is the rustls certificate resolver of every TLS connection: each
//! handshake asks it for the certificate in use at that moment, so a reload changes what
//! new connections are served and leaves connections already established alone (their
//! keys were agreed at their handshake). A reload that fails (a missing file, a half
//! written PEM, a key that does not match the certificate) keeps the certificate in use.
//!
//! What it leaves to others: `server::run` builds the listener from
//! [`server_config`] and calls [`CertStore::reload`] on SIGHUP; `config` checks that
//! both flags or neither are given. The crypto provider is rustls' *ring* one, named
//! here explicitly so no process-wide default provider has to be installed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// The two files a TLS server is configured with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain: the server's certificate first, then its intermediates.
    pub cert: PathBuf,
    /// PEM private key of the first certificate: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
    pub key: PathBuf,
}

/// Why a certificate or key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    // `error`, not `source`: the message already says it, and anyhow's `{:#}` would
    // print it twice.
    #[error("cannot read {flag} {path}: {error}")]
    Read {
        flag: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("--tls-cert {path} is not a PEM certificate chain: {reason}")]
    BadCert { path: PathBuf, reason: String },
    #[error("--tls-cert {0} holds no certificate (expected `-----BEGIN CERTIFICATE-----`)")]
    NoCert(PathBuf),
    #[error(
        "--tls-key {path} holds no usable private key (expected PEM `PRIVATE KEY`, \
         `RSA PRIVATE KEY` or `EC PRIVATE KEY`): {reason}"
    )]
    BadKey { path: PathBuf, reason: String },
    #[error("--tls-key {key} does not belong to the certificate in --tls-cert {cert}: {reason}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
}

/// The crypto provider of the server's TLS connections.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads and checks a certificate chain and its key.
pub fn load(files: &TlsFiles, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let read = |flag, path: &Path| {
        std::fs::read(path).map_err(|error| TlsError::Read {
            flag,
            path: path.to_owned(),
            error,
        })
    };
    let cert_pem = read("--tls-cert", &files.cert)?;
    let key_pem = read("--tls-key", &files.key)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCert {
            path: files.cert.clone(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCert(files.cert.clone()));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::BadKey {
        path: files.key.clone(),
        reason: e.to_string(),
    })?;
    let signing_key =
        provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| TlsError::BadKey {
                path: files.key.clone(),
                reason: e.to_string(),
            })?;
    let certified = CertifiedKey::new(chain, signing_key);
    // Without this a wrong key only shows at the first handshake, as a client error.
    certified.keys_match().map_err(|e| TlsError::Mismatch {
        cert: files.cert.clone(),
        key: files.key.clone(),
        reason: e.to_string(),
    })?;
    Ok(certified)
}

/// The certificate every new TLS handshake is served, replaceable while connections run.
#[derive(Debug)]
pub struct CertStore {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    /// Written by [`CertStore::reload`] (SIGHUP), read by every handshake. The guard is
    /// held only to clone the `Arc`.
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertStore {
    /// Loads the files; an error here stops the start.
    pub fn open(files: TlsFiles) -> Result<CertStore, TlsError> {
        let provider = provider();
        let current = load(&files, &provider)?;
        Ok(CertStore {
            files,
            provider,
            current: RwLock::new(Arc::new(current)),
        })
    }

    /// Re-reads the files for the handshakes to come. On error the certificate in use
    /// stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = load(&self.files, &self.provider)?;
        *self.current.write() = Arc::new(fresh);
        Ok(())
    }

    /// The files this store reads.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

/// The rustls configuration of the listener: TLS 1.2 and 1.3, no client certificates,
/// the certificate from `store`. ALPN (`http/1.1`) is added by actix-web.
pub fn server_config(store: Arc<CertStore>) -> rustls::ServerConfig {
    rustls::ServerConfig::builder_with_provider(store.provider.clone())
        .with_safe_default_protocol_versions()
        // The ring provider supports both default versions: this cannot fail.
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> TlsFiles {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
            .expect("a certificate");
        let files = TlsFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.cert, cert.cert.pem()).expect("writable");
        std::fs::write(&files.key, cert.signing_key.serialize_pem()).expect("writable");
        files
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let a = write_pair(dir.path(), "a");
        let b = write_pair(dir.path(), "b");
        assert!(load(&a, &provider()).is_ok());
        let crossed = TlsFiles {
            cert: a.cert.clone(),
            key: b.key.clone(),
        };
        assert!(matches!(
            load(&crossed, &provider()),
            Err(TlsError::Mismatch { .. })
        ));
    }

    #[test]
    fn a_failed_reload_keeps_the_certificate_in_use() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let files = write_pair(dir.path(), "a");
        let store = CertStore::open(files.clone()).expect("valid files");
        let before = store.current.read().clone();
        std::fs::write(&files.cert, "not a certificate").expect("writable");
        assert!(matches!(store.reload(), Err(TlsError::NoCert(_))));
        assert!(Arc::ptr_eq(&before, &store.current.read()));
        std::fs::remove_file(&files.key).expect("removable");
        assert!(matches!(store.reload(), Err(TlsError::Read { .. })));
        assert!(Arc::ptr_eq(&before, &store.current.read()));
    }
}
