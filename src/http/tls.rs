//! TLS for a listener, with rustls: the port then speaks only TLS.
//!
//! Owns loading a PEM certificate chain and private key into an acceptor. It must never
//! accept a configuration that does not fit together: a bad file is an error at start-up,
//! naming the file.

/// TLS for a listener.
pub type Tls = tokio_rustls::TlsAcceptor;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("certificate and key do not fit together: {0}")]
    Config(String),
}

/// A TLS acceptor from PEM files (certificate chain, private key).
pub fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> Result<Tls, TlsError> {
    let file_err = |p: &std::path::Path, reason: String| TlsError::File {
        path: p.display().to_string(),
        reason,
    };
    let cert_pem = std::fs::read(cert).map_err(|e| file_err(cert, e.to_string()))?;
    let key_pem = std::fs::read(key).map_err(|e| file_err(key, e.to_string()))?;
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err(cert, "no PEM certificate in it".into()));
    }
    let key_der = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| file_err(key, e.to_string()))?
        .ok_or_else(|| file_err(key, "no PEM private key in it".into()))?;
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| TlsError::Config(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key_der)
    .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)))
}

/// Loads TLS when both files are named (a role's `tls_cert` and `tls_key`), else none.
pub fn optional(cert: &str, key: &str) -> Result<Option<Tls>, TlsError> {
    if cert.is_empty() {
        return Ok(None);
    }
    tls_acceptor(std::path::Path::new(cert), std::path::Path::new(key)).map(Some)
}
