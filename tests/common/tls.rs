//! A TLS server identity for tests: a fresh self-signed certificate for `localhost`.

use std::sync::Arc;

/// A TLS acceptor with a fresh self-signed certificate for `localhost`, and that certificate
/// as a PEM file for the client to trust.
pub fn self_signed_localhost() -> (tokio_rustls::TlsAcceptor, tempfile::NamedTempFile) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca.path(), certified.cert.pem()).unwrap();
    let cert = rustls::pki_types::CertificateDer::from(certified.cert.der().to_vec());
    let key =
        rustls::pki_types::PrivateKeyDer::try_from(certified.signing_key.serialize_der()).unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .unwrap();
    (tokio_rustls::TlsAcceptor::from(Arc::new(tls)), ca)
}

/// A private CA and a server certificate it signed for `localhost` and `127.0.0.1`, as the PEM
/// files an operator gives the gateway (`tls.cert`, `tls.key`) and its clients (the CA).
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    /// The CA's certificate, for clients to trust (`--cafile`, `--cacert`).
    pub ca: std::path::PathBuf,
    pub ca_pem: String,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let mut pki = Pki {
            cert: dir.path().join("cert.pem"),
            key: dir.path().join("key.pem"),
            ca: dir.path().join("ca.pem"),
            ca_pem: String::new(),
            dir,
        };
        pki.ca_pem = pki.issue();
        std::fs::write(&pki.ca, &pki.ca_pem).unwrap();
        pki
    }

    /// A new CA and a server certificate it signed, written over `cert` and `key` (as an
    /// operator renewing them would); returns the new CA's PEM. `ca` keeps the first CA.
    pub fn issue(&self) -> String {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "amqp-gateway test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        std::fs::write(&self.cert, cert.pem()).unwrap();
        std::fs::write(&self.key, key.serialize_pem()).unwrap();
        ca.pem()
    }

    /// A file holding `pem` (another CA for a client to trust).
    pub fn file(&self, name: &str, pem: &str) -> std::path::PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path
    }
}

/// A rustls client trusting only the CA in `ca_pem`, TLS 1.2 and 1.3.
pub fn client(ca_pem: &str) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// A TLS connection to `addr` checking the server's certificate for `localhost` against
/// `ca_pem`.
pub async fn connect(
    addr: std::net::SocketAddr,
    ca_pem: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    client(ca_pem).connect(name, tcp).await
}
