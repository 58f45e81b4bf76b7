//! The webhook's serving certificate, read from PEM files and re-read when they change
//! (cert-manager and the chart rotate them in place through the mounted Secret).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio_rustls::rustls::crypto::ring::sign::any_supported_type;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;

/// How often a handshake may look at the files' modification times: a Secret volume updates
/// within about a minute, and one `stat` per 30 s costs nothing.
const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(30);

/// Why the certificate or key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("reading certificate chain {path}")]
    Chain {
        path: PathBuf,
        #[source]
        source: tokio_rustls::rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("reading private key {path}")]
    Key {
        path: PathBuf,
        #[source]
        source: tokio_rustls::rustls::pki_types::pem::Error,
    },
    #[error("private key {path} is of a type TLS cannot sign with")]
    KeyType {
        path: PathBuf,
        #[source]
        source: tokio_rustls::rustls::Error,
    },
}

/// A [`ResolvesServerCert`] that serves the certificate in two files, picking up new contents
/// without a restart. A broken new file keeps the previous certificate in service.
pub struct CertificateFiles {
    cert: PathBuf,
    key: PathBuf,
    state: Mutex<Loaded>,
}

struct Loaded {
    certified: Arc<CertifiedKey>,
    modified: Option<(SystemTime, SystemTime)>,
    checked: Instant,
}

impl CertificateFiles {
    /// Loads both files now, so a wrong path or a bad file fails at start-up.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, CertificateError> {
        let certified = Arc::new(load_certified_key(cert, key)?);
        Ok(CertificateFiles {
            cert: cert.to_owned(),
            key: key.to_owned(),
            state: Mutex::new(Loaded {
                certified,
                modified: modified_times(cert, key),
                checked: Instant::now(),
            }),
        })
    }
}

impl fmt::Debug for CertificateFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateFiles")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for CertificateFiles {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if state.checked.elapsed() >= RELOAD_CHECK_INTERVAL {
            state.checked = Instant::now();
            let modified = modified_times(&self.cert, &self.key);
            if modified.is_some() && modified != state.modified {
                match load_certified_key(&self.cert, &self.key) {
                    Ok(certified) => {
                        tracing::info!(cert = %self.cert.display(), "serving the renewed certificate");
                        state.certified = Arc::new(certified);
                        state.modified = modified;
                    }
                    Err(e) => {
                        tracing::warn!(error = format!("{e:#}"), "keeping the previous certificate")
                    }
                }
            }
        }
        Some(state.certified.clone())
    }
}

fn modified_times(cert: &Path, key: &Path) -> Option<(SystemTime, SystemTime)> {
    let cert = std::fs::metadata(cert).ok()?.modified().ok()?;
    let key = std::fs::metadata(key).ok()?.modified().ok()?;
    Some((cert, key))
}

fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, CertificateError> {
    let chain_error = |source| CertificateError::Chain {
        path: cert.to_owned(),
        source,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(chain_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(chain_error)?;
    if chain.is_empty() {
        return Err(CertificateError::NoCertificate {
            path: cert.to_owned(),
        });
    }
    let private_key =
        PrivateKeyDer::from_pem_file(key).map_err(|source| CertificateError::Key {
            path: key.to_owned(),
            source,
        })?;
    let signing_key =
        any_supported_type(&private_key).map_err(|source| CertificateError::KeyType {
            path: key.to_owned(),
            source,
        })?;
    Ok(CertifiedKey::new(chain, signing_key))
}
