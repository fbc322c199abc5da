//! TLS on the relay's own listeners (rustls with the `ring` provider): the
//! certificate chain and key from `--tls-cert` / `--tls-key`, read at
//! start and again on SIGHUP (a bad new file is logged and the old one
//! kept, so new handshakes never fail for it); TLS 1.3 and 1.2 with
//! rustls' modern suites only, ALPN `http/1.1`, and both session tickets
//! and a session cache, so a reconnect storm resumes instead of paying a
//! full handshake each.
//!
//! `wss://` and `https://` are served on the same port and paths as
//! `ws://` would be: the connection's first bytes are the TLS handshake,
//! done before the HTTP phase reads anything (`http::serve`). Each
//! connection runs on rustls' unbuffered API (`stream.rs`), so an idle one
//! holds no TLS buffer.

pub mod stream;

use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

/// Sessions remembered for resumption by ID (tickets need none).
const SESSION_CACHE: usize = 16_384;

/// The certificate in use, replaced whole on reload.
#[derive(Debug)]
struct Certificate {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// The relay's TLS: the acceptor every listener uses, and where its
/// certificate comes from.
pub struct Tls {
    /// What every handshake is made with.
    pub config: Arc<ServerConfig>,
    certificate: Arc<Certificate>,
    cert_path: std::path::PathBuf,
    key_path: std::path::PathBuf,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("cert", &self.cert_path)
            .field("key", &self.key_path)
            .finish()
    }
}

/// The flags a certificate and its key come from, for errors.
struct Flags {
    cert: &'static str,
    key: &'static str,
}

const SERVER_FILES: Flags = Flags {
    cert: "--tls-cert",
    key: "--tls-key",
};

const REDIS_CLIENT_FILES: Flags = Flags {
    cert: "--redis-client-cert",
    key: "--redis-client-key",
};

/// Reads a PEM chain and its key; errors name the flag, the file and what
/// is wrong.
fn read_pem_pair(
    cert_path: &std::path::Path,
    key_path: &std::path::Path,
    flags: &Flags,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let cert_flag = flags.cert;
    let key_flag = flags.key;
    let cert_bytes = std::fs::read(cert_path)
        .map_err(|e| format!("{cert_flag} {}: {e}", cert_path.display()))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{cert_flag} {}: {e}", cert_path.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "{cert_flag} {}: no certificate in PEM",
            cert_path.display()
        ));
    }
    let key_bytes =
        std::fs::read(key_path).map_err(|e| format!("{key_flag} {}: {e}", key_path.display()))?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| {
        format!(
            "{key_flag} {}: no private key in PEM: {e}",
            key_path.display()
        )
    })?;
    Ok((chain, key))
}

/// Reads a PEM chain and its key, checked to match.
fn read_certified_key(
    cert_path: &std::path::Path,
    key_path: &std::path::Path,
    flags: &Flags,
) -> Result<CertifiedKey, String> {
    let (chain, key) = read_pem_pair(cert_path, key_path, flags)?;
    certify(chain, &key, cert_path, key_path, flags)
}

/// The chain with its key, if they match.
fn certify(
    chain: Vec<CertificateDer<'static>>,
    key: &PrivateKeyDer<'static>,
    cert_path: &std::path::Path,
    key_path: &std::path::Path,
    flags: &Flags,
) -> Result<CertifiedKey, String> {
    let signing = rustls::crypto::ring::sign::any_supported_type(key)
        .map_err(|e| format!("{} {}: {e}", flags.key, key_path.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| {
        format!(
            "{} {} does not match {} {}: {e}",
            flags.key,
            key_path.display(),
            flags.cert,
            cert_path.display()
        )
    })?;
    Ok(certified)
}

impl Tls {
    /// TLS from the PEM files at `cert_path` (a chain, leaf first) and
    /// `key_path`.
    pub fn new(cert_path: &std::path::Path, key_path: &std::path::Path) -> Result<Tls, String> {
        let certificate = Arc::new(Certificate {
            current: RwLock::new(Arc::new(read_certified_key(
                cert_path,
                key_path,
                &SERVER_FILES,
            )?)),
        });
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| format!("TLS: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(certificate.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
        config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|e| format!("TLS: {e}"))?;
        Ok(Tls {
            config: Arc::new(config),
            certificate,
            cert_path: cert_path.to_path_buf(),
            key_path: key_path.to_path_buf(),
        })
    }

    /// Reads the certificate files again and puts them in use for new
    /// handshakes; on error the certificate in use stays.
    pub fn reload(&self) -> Result<(), String> {
        let certified = read_certified_key(&self.cert_path, &self.key_path, &SERVER_FILES)?;
        *self
            .certificate
            .current
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(certified);
        Ok(())
    }
}

/// The TLS client configuration for reaching Redis (`rediss://`): the
/// server's certificate is verified against the CAs in `ca_file` (the
/// system's trusted roots when unset), and the node presents
/// `client` (certificate chain, key) when given.
pub fn redis_client_config(
    ca_file: Option<&std::path::Path>,
    client: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let bytes = std::fs::read(path)
                .map_err(|e| format!("--redis-ca-file {}: {e}", path.display()))?;
            for cert in CertificateDer::pem_slice_iter(&bytes) {
                let cert = cert.map_err(|e| format!("--redis-ca-file {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("--redis-ca-file {}: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!(
                    "--redis-ca-file {}: no certificate in PEM",
                    path.display()
                ));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(
                    "rediss://: no trusted root certificates found on this system; \
                     name the CA that signs Redis's certificate with --redis-ca-file"
                        .into(),
                );
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS to Redis: {e}"))?
        .with_root_certificates(roots);
    match client {
        None => Ok(builder.with_no_client_auth()),
        Some((cert_path, key_path)) => {
            let (chain, key) = read_pem_pair(cert_path, key_path, &REDIS_CLIENT_FILES)?;
            certify(
                chain.clone(),
                &key,
                cert_path,
                key_path,
                &REDIS_CLIENT_FILES,
            )?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("--redis-client-cert {}: {e}", cert_path.display()))
        }
    }
}
