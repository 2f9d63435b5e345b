//! TLS (rustls) from a qemu-style x509 credentials folder: `server-cert.pem` (the certificate
//! chain), `server-key.pem` (its private key) and, optionally, `ca-cert.pem`: client
//! certificates signed by that CA are verified when a client presents one, and required
//! with `verify_peer`.

use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

/// Build the TLS acceptor from `dir`.
pub fn acceptor(dir: &Path, verify_peer: bool) -> Result<tokio_rustls::TlsAcceptor, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cert_path = dir.join("server-cert.pem");
    let key_path = dir.join("server-key.pem");
    let ca_path = dir.join("ca-cert.pem");
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", cert_path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", cert_path.display()));
    }
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| format!("{}: {e}", key_path.display()))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS set-up: {e}"))?;
    let builder = if ca_path.exists() {
        let mut roots = RootCertStore::empty();
        let cas = CertificateDer::pem_file_iter(&ca_path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("{}: {e}", ca_path.display()))?;
        for c in cas {
            roots
                .add(c)
                .map_err(|e| format!("{}: {e}", ca_path.display()))?;
        }
        let mut v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
        if !verify_peer {
            v = v.allow_unauthenticated();
        }
        let v = v
            .build()
            .map_err(|e| format!("{}: {e}", ca_path.display()))?;
        builder.with_client_cert_verifier(v)
    } else if verify_peer {
        return Err(format!(
            "{}: missing (needed to verify client certificates)",
            ca_path.display()
        ));
    } else {
        builder.with_no_client_auth()
    };
    let cfg = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}
