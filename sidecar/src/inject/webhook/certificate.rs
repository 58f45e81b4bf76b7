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
    reload_check_interval: Duration,
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
        Self::load_checking_every(cert, key, RELOAD_CHECK_INTERVAL)
    }

    fn load_checking_every(
        cert: &Path,
        key: &Path,
        reload_check_interval: Duration,
    ) -> Result<Self, CertificateError> {
        let certified = Arc::new(load_certified_key(cert, key)?);
        Ok(CertificateFiles {
            cert: cert.to_owned(),
            key: key.to_owned(),
            reload_check_interval,
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
        Some(self.current())
    }
}

impl CertificateFiles {
    /// The certificate to serve now, re-read first when the files changed since the last look.
    fn current(&self) -> Arc<CertifiedKey> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if state.checked.elapsed() >= self.reload_check_interval {
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
        state.certified.clone()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn write_certificate(dir: &Path, name: &str, age: Duration) -> Vec<u8> {
        let certified = rcgen::generate_simple_self_signed(vec![name.to_owned()]).expect("cert");
        std::fs::write(dir.join("tls.crt"), certified.cert.pem()).expect("write cert");
        std::fs::write(dir.join("tls.key"), certified.signing_key.serialize_pem()).expect("key");
        // A renewal always moves the modification time; file systems with coarse timestamps
        // may not within one test, so move it explicitly.
        let later = SystemTime::now() + age;
        for file in ["tls.crt", "tls.key"] {
            std::fs::File::options()
                .write(true)
                .open(dir.join(file))
                .and_then(|f| f.set_modified(later))
                .expect("set mtime");
        }
        certified.cert.der().to_vec()
    }

    #[test]
    fn serves_a_renewed_certificate_and_keeps_the_old_one_when_the_new_files_are_broken() {
        let dir = tempfile::tempdir().expect("temp dir");
        let old = write_certificate(dir.path(), "old.example", Duration::ZERO);
        let files = CertificateFiles::load_checking_every(
            &dir.path().join("tls.crt"),
            &dir.path().join("tls.key"),
            Duration::ZERO,
        )
        .expect("loads");
        assert_eq!(files.current().cert[0].as_ref(), old.as_slice());

        let new = write_certificate(dir.path(), "new.example", Duration::from_secs(60));
        assert_eq!(files.current().cert[0].as_ref(), new.as_slice());

        std::fs::write(dir.path().join("tls.key"), "not a key").expect("break the key");
        std::fs::File::options()
            .write(true)
            .open(dir.path().join("tls.key"))
            .and_then(|f| f.set_modified(SystemTime::now() + Duration::from_secs(120)))
            .expect("set mtime");
        assert_eq!(
            files.current().cert[0].as_ref(),
            new.as_slice(),
            "a broken renewal keeps the working certificate"
        );
    }

    #[test]
    fn refuses_to_start_without_a_usable_certificate() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("tls.crt"), "").expect("write");
        std::fs::write(dir.path().join("tls.key"), "").expect("write");
        let error =
            CertificateFiles::load(&dir.path().join("tls.crt"), &dir.path().join("tls.key"))
                .expect_err("empty files");
        assert!(
            matches!(error, CertificateError::NoCertificate { .. }),
            "{error}"
        );
    }
}
