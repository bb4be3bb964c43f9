//! TLS for a listener, with rustls: the port then speaks only TLS.
//!
//! Owns loading a PEM certificate chain and private key into an acceptor, and swapping them
//! while the listener runs ([`Certs::reload`], on a config reload, and [`watch`], when the
//! files change on disk, as a renewal does): a connection already up keeps the certificate it
//! shook hands with; the next handshake gets the new one. It must never accept a
//! configuration that does not fit together: a bad file is an error at start-up, naming the
//! file, and on a reload it keeps the certificate in use.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use tokio_rustls::rustls;
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;

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

/// The certificate every new handshake is given, swappable.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok().map(|k| k.clone())
    }
}

/// The files a [`Certs`] was loaded from and their modification times then.
#[derive(Debug, Clone, PartialEq)]
struct Files {
    cert: PathBuf,
    key: PathBuf,
    modified: Option<(SystemTime, SystemTime)>,
}

fn modified(cert: &Path, key: &Path) -> Option<(SystemTime, SystemTime)> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((m(cert)?, m(key)?))
}

/// A listener's TLS: the acceptor and the certificate behind it, which can be swapped.
pub struct Certs {
    pub acceptor: Tls,
    current: Arc<Current>,
    files: Mutex<Files>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads and checks a certificate chain and its key.
fn certified(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let file_err = |p: &Path, reason: String| TlsError::File {
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
    CertifiedKey::from_der(certs, key_der, &provider()).map_err(|e| TlsError::Config(e.to_string()))
}

impl Certs {
    /// TLS from PEM files (certificate chain, private key).
    pub fn load(cert: &Path, key: &Path) -> Result<Certs, TlsError> {
        let current = Arc::new(Current(RwLock::new(Arc::new(certified(cert, key)?))));
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        Ok(Certs {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            current,
            files: Mutex::new(Files {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                modified: modified(cert, key),
            }),
        })
    }

    /// Loads `cert` and `key` (perhaps other files than before) and gives them to every
    /// handshake from now on; on an error the certificate in use stays.
    pub fn reload(&self, cert: &Path, key: &Path) -> Result<(), TlsError> {
        let stamp = modified(cert, key);
        let new = certified(cert, key)?;
        if let Ok(mut k) = self.current.0.write() {
            *k = Arc::new(new);
        }
        if let Ok(mut f) = self.files.lock() {
            *f = Files {
                cert: cert.to_path_buf(),
                key: key.to_path_buf(),
                modified: stamp,
            };
        }
        Ok(())
    }

    /// Reloads when either file changed on disk since it was last loaded; Ok(true) when it
    /// did and the new pair is in use.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let Ok(files) = self.files.lock().map(|f| f.clone()) else {
            return Ok(false);
        };
        let now = modified(&files.cert, &files.key);
        if now.is_none() || now == files.modified {
            return Ok(false);
        }
        match self.reload(&files.cert, &files.key) {
            Ok(()) => Ok(true),
            Err(e) => {
                // Not again until the files change once more: one warning per change.
                if let Ok(mut f) = self.files.lock() {
                    f.modified = now;
                }
                Err(e)
            }
        }
    }
}

/// How often [`watch`] looks at the files.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(5);

/// Re-reads the certificate and key whenever they change on disk, forever (the role aborts
/// the task at shutdown).
pub async fn watch(certs: Arc<Certs>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        match certs.reload_if_changed() {
            Ok(true) => tracing::info!(
                "the TLS certificate changed on disk: new connections get the new one"
            ),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "the TLS certificate changed on disk but cannot be used; the one in use stays")
            }
        }
    }
}

/// Loads TLS when both files are named (a role's `tls_cert` and `tls_key`), else none.
pub fn optional(cert: &str, key: &str) -> Result<Option<Arc<Certs>>, TlsError> {
    if cert.is_empty() {
        return Ok(None);
    }
    Certs::load(Path::new(cert), Path::new(key)).map(|c| Some(Arc::new(c)))
}
