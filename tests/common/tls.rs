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
