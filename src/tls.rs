//! TLS for the client listeners (DESIGN.md §8): the server identity read from `tls.cert` and
//! `tls.key`, and one acceptor per listener kind over it. The identity is swapped whole on
//! [`Tls::reload`] (SIGHUP): handshakes after it present the new certificate, connections
//! already established keep theirs. rustls speaks TLS 1.2 and 1.3 only, so nothing older is
//! ever negotiated; client certificates are not asked for (clients authenticate with tokens).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.cert: cannot read certificates from {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("tls.cert: {path} holds no PEM certificate")]
    NoCert { path: PathBuf },
    #[error("tls.key: cannot read a private key from {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("tls.key ({key}) is not the key of tls.cert ({cert}): {reason}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("TLS set-up: {0}")]
    Setup(String),
}

/// The certificate every new handshake presents, replaceable while connections run.
#[derive(Debug)]
struct Identity(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for Identity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// The gateway's TLS: where its identity comes from and the acceptors that use it.
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    identity: Arc<Identity>,
    /// HTTPS and WSS: HTTP/2 or HTTP/1.1 by ALPN (WebSockets ride HTTP/1.1).
    pub http: TlsAcceptor,
    /// MQTT and AMQP over TLS: no ALPN (clients rarely send one, and none is needed).
    pub stream: TlsAcceptor,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads the certificate chain and key; fails when either is unreadable or they do not
    /// belong together, so a bad pair stops start-up instead of failing every handshake.
    pub fn load(cert: &Path, key: &Path) -> Result<Tls, TlsError> {
        // One provider named explicitly: several crates in the build enable rustls providers,
        // and rustls refuses to guess between them.
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let identity = Arc::new(Identity(ArcSwap::from_pointee(read_identity(
            cert, key, &provider,
        )?)));
        let config = |alpn: &[&[u8]]| -> Result<TlsAcceptor, TlsError> {
            let mut c = rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .map_err(|e| TlsError::Setup(e.to_string()))?
                .with_no_client_auth()
                .with_cert_resolver(identity.clone());
            c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(TlsAcceptor::from(Arc::new(c)))
        };
        Ok(Tls {
            http: config(&[b"h2", b"http/1.1"])?,
            stream: config(&[])?,
            cert: cert.to_owned(),
            key: key.to_owned(),
            provider,
            identity,
        })
    }

    /// Reads the files again and, when they hold a valid pair, presents it from the next
    /// handshake on. On an error the current identity stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = read_identity(&self.cert, &self.key, &self.provider)?;
        self.identity.0.store(Arc::new(fresh));
        Ok(())
    }
}

fn read_identity(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Cert {
            path: cert.to_owned(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCert {
            path: cert.to_owned(),
        });
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.to_owned(),
        reason: e.to_string(),
    })?;
    CertifiedKey::from_der(chain, private, provider).map_err(|e| TlsError::Mismatch {
        cert: cert.to_owned(),
        key: key.to_owned(),
        reason: e.to_string(),
    })
}
