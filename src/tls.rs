//! TLS to PostgreSQL, RabbitMQ and Redis with rustls: one [`TlsSettings`] (extra CAs and a default client
//! certificate, from files or PEM bytes) that each connector turns into a rustls `ClientConfig` with the options
//! its URL asks for ([`ClientTls`]), and a description of TLS failures naming the reason ([`describe_failure`]).
//!
//! Trust: the system roots (rustls-native-certs: the OS store, `SSL_CERT_FILE` / `SSL_CERT_DIR`, so a corporate
//! CA installed in the image works and the roots are updated with the image, without a rebuild) plus the extra
//! CAs of `FLOWCRAFT_TLS_CA_FILE`. A CA file named by the URL itself (`sslrootcert`, `cacertfile`) replaces
//! that set for its connection, as libpq and RabbitMQ's Erlang client do.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// Longest PEM file read (a CA bundle of every public root is ~250 KiB).
const MAX_PEM_BYTES: u64 = 16 * 1024 * 1024;

/// TLS material could not be read or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read the {what} {}: {source}", path.display())]
    Read {
        /// What the file is (e.g. "CA file").
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// PEM data holds nothing usable.
    #[error("the {what} {origin} {problem}")]
    Pem {
        /// What the data is (e.g. "client key").
        what: &'static str,
        /// Where it came from (a file name, or "(PEM bytes)").
        origin: String,
        /// What is wrong.
        problem: String,
    },
    /// A client certificate without its key or the reverse.
    #[error("a client certificate needs both a certificate and a key: {0}")]
    Incomplete(String),
    /// rustls refused the configuration (e.g. a key that does not match its certificate).
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// A client certificate chain with its private key.
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
        }
    }
}

impl PartialEq for Identity {
    fn eq(&self, other: &Self) -> bool {
        self.cert_pem == other.cert_pem && self.key_pem == other.key_pem
    }
}

impl Eq for Identity {}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity").field("certificates", &self.chain.len()).field("key", &"<redacted>").finish()
    }
}

impl Identity {
    /// A client certificate (PEM chain, leaf first) and its unencrypted private key (PKCS#8, PKCS#1 or SEC1 PEM).
    pub fn from_pem(cert_pem: &[u8], key_pem: &[u8], origin: &str) -> Result<Self, TlsError> {
        let chain = parse_certs(cert_pem, "client certificate", origin)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Pem {
            what: "client key",
            origin: origin.to_string(),
            problem: format!("holds no unencrypted PKCS#8, PKCS#1 or SEC1 private key ({e})"),
        })?;
        Ok(Self { chain, key, cert_pem: cert_pem.to_vec(), key_pem: key_pem.to_vec() })
    }

    /// A client certificate and key from two PEM files.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let cert_pem = read_pem(cert, "client certificate file")?;
        let key_pem = read_pem(key, "client key file")?;
        Self::from_pem(&cert_pem, &key_pem, &format!("{} / {}", cert.display(), key.display()))
    }

    /// The certificate chain and the key as PEM (for connectors that take PEM).
    pub fn pem(&self) -> (&[u8], &[u8]) {
        (&self.cert_pem, &self.key_pem)
    }
}

/// The TLS settings shared by the three connectors: extra trusted CAs and a default client certificate.
///
/// Built from `FLOWCRAFT_TLS_CA_FILE`, `FLOWCRAFT_TLS_CERT_FILE` and `FLOWCRAFT_TLS_KEY_FILE`
/// ([`TlsSettings::from_files`]) or from PEM bytes ([`TlsSettings::from_pem`], e.g. a ConfigMap or Secret).
/// Whether a connection uses TLS at all is the URL's choice (`sslmode`, `amqps://`, `rediss://`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSettings {
    extra_roots: Vec<CertificateDer<'static>>,
    identity: Option<Identity>,
}

impl TlsSettings {
    /// No extra CA and no client certificate: the system roots only.
    pub fn none() -> Self {
        Self::default()
    }

    /// Settings from PEM bytes: a CA bundle to trust besides the system roots, and a client certificate with its
    /// key (both or neither).
    pub fn from_pem(ca: Option<&[u8]>, cert: Option<&[u8]>, key: Option<&[u8]>) -> Result<Self, TlsError> {
        let extra_roots = match ca {
            Some(pem) => parse_certs(pem, "CA bundle", "(PEM bytes)")?,
            None => Vec::new(),
        };
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some(Identity::from_pem(cert, key, "(PEM bytes)")?),
            (None, None) => None,
            (Some(_), None) => return Err(TlsError::Incomplete("a certificate was given without its key".into())),
            (None, Some(_)) => return Err(TlsError::Incomplete("a key was given without its certificate".into())),
        };
        Ok(Self { extra_roots, identity })
    }

    /// Settings from PEM files (`FLOWCRAFT_TLS_CA_FILE`, `FLOWCRAFT_TLS_CERT_FILE`, `FLOWCRAFT_TLS_KEY_FILE`).
    pub fn from_files(ca: Option<&Path>, cert: Option<&Path>, key: Option<&Path>) -> Result<Self, TlsError> {
        let extra_roots = match ca {
            Some(path) => parse_certs(&read_pem(path, "CA file")?, "CA file", &path.display().to_string())?,
            None => Vec::new(),
        };
        let identity = match (cert, key) {
            (Some(cert), Some(key)) => Some(Identity::from_files(cert, key)?),
            (None, None) => None,
            (Some(c), None) => {
                return Err(TlsError::Incomplete(format!("{} was given without a key file", c.display())));
            }
            (None, Some(k)) => {
                return Err(TlsError::Incomplete(format!("{} was given without a certificate file", k.display())));
            }
        };
        Ok(Self { extra_roots, identity })
    }

    /// The default client certificate, if any.
    pub fn identity(&self) -> Option<&Identity> {
        self.identity.as_ref()
    }

    /// How many extra CAs are trusted.
    pub fn extra_ca_count(&self) -> usize {
        self.extra_roots.len()
    }

    /// The trusted roots of [`Roots::Default`] (system roots and extra CAs) as one PEM bundle, for connectors that
    /// take PEM.
    pub fn default_roots_pem(&self) -> Vec<u8> {
        let mut pem = Vec::new();
        for cert in system_roots().iter().chain(&self.extra_roots) {
            pem.extend_from_slice(&to_pem(cert));
        }
        pem
    }

    /// The rustls configuration of one connection.
    pub fn client_config(&self, options: &ClientTls) -> Result<ClientConfig, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let verifier: Arc<dyn ServerCertVerifier> = match options.verify {
            Verify::None => Arc::new(NoVerification(provider)),
            Verify::Full | Verify::ChainOnly => {
                let roots = self.roots(&options.roots)?;
                let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| TlsError::Config(format!("no usable trusted CA: {e}")))?;
                if options.verify == Verify::Full { webpki } else { Arc::new(ChainOnly(webpki)) }
            }
        };
        let builder = builder.dangerous().with_custom_certificate_verifier(verifier);
        let identity = match &options.identity {
            Some((cert, key)) => Some(Identity::from_files(cert, key)?),
            None => self.identity.clone(),
        };
        let mut config = match identity {
            Some(id) => builder
                .with_client_auth_cert(id.chain, id.key)
                .map_err(|e| TlsError::Config(format!("the client certificate cannot be used: {e}")))?,
            None => builder.with_no_client_auth(),
        };
        config.enable_sni = options.sni;
        Ok(config)
    }

    fn roots(&self, roots: &Roots) -> Result<RootCertStore, TlsError> {
        let certs: Vec<CertificateDer<'static>> = match roots {
            Roots::Default => system_roots().iter().chain(&self.extra_roots).cloned().collect(),
            Roots::System => system_roots().to_vec(),
            Roots::File(path) => parse_certs(&read_pem(path, "CA file")?, "CA file", &path.display().to_string())?,
        };
        let mut store = RootCertStore::empty();
        let (_, ignored) = store.add_parsable_certificates(certs);
        if store.is_empty() {
            let origin = match roots {
                Roots::File(path) => path.display().to_string(),
                _ => "system store (and FLOWCRAFT_TLS_CA_FILE)".to_string(),
            };
            return Err(TlsError::Pem {
                what: "trusted CA set",
                origin,
                problem: format!("holds no usable CA certificate ({ignored} could not be parsed)"),
            });
        }
        Ok(store)
    }
}

/// Which CAs a connection trusts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Roots {
    /// The system roots and the extra CAs of the [`TlsSettings`].
    #[default]
    Default,
    /// The system roots only (libpq's `sslrootcert=system`).
    System,
    /// Exactly the CAs of this PEM file (named by the URL).
    File(PathBuf),
}

/// How a connection checks the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verify {
    /// The chain up to a trusted CA and the host name (libpq `verify-full`, `verify_peer`, `rediss://`).
    #[default]
    Full,
    /// The chain only, not the host name (libpq `verify-ca`).
    ChainOnly,
    /// Nothing: encrypted but not authenticated (libpq `require` without a root certificate, `verify_none`,
    /// `rediss://…#insecure`).
    None,
}

/// The TLS options of one connection, from its URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    /// What is verified.
    pub verify: Verify,
    /// Which CAs are trusted.
    pub roots: Roots,
    /// A client certificate and key file named by the URL (else the settings' default identity).
    pub identity: Option<(PathBuf, PathBuf)>,
    /// Send the server name (SNI).
    pub sni: bool,
}

impl Default for ClientTls {
    fn default() -> Self {
        Self { verify: Verify::Full, roots: Roots::Default, identity: None, sni: true }
    }
}

/// The system roots, loaded once per process.
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let loaded = rustls_native_certs::load_native_certs();
        for error in &loaded.errors {
            tracing::warn!(error = %error, "Some system CA certificates could not be loaded.");
        }
        loaded.certs
    })
}

fn read_pem(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    use std::io::Read;
    let read = || -> std::io::Result<Vec<u8>> {
        let mut bytes = Vec::new();
        std::fs::File::open(path)?.take(MAX_PEM_BYTES + 1).read_to_end(&mut bytes)?;
        if bytes.len() as u64 > MAX_PEM_BYTES {
            return Err(std::io::Error::other(format!("larger than {MAX_PEM_BYTES} bytes")));
        }
        Ok(bytes)
    };
    read().map_err(|source| TlsError::Read { what, path: path.to_path_buf(), source })
}

fn parse_certs(pem: &[u8], what: &'static str, origin: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().map_err(|e| TlsError::Pem {
        what,
        origin: origin.to_string(),
        problem: format!("is not valid PEM: {e}"),
    })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            origin: origin.to_string(),
            problem: "holds no certificate (expected -----BEGIN CERTIFICATE-----)".into(),
        });
    }
    Ok(certs)
}

fn to_pem(cert: &CertificateDer<'_>) -> Vec<u8> {
    use base64::Engine as _;
    let body = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem.into_bytes()
}

/// libpq's `verify-ca`: the chain must lead to a trusted CA; the host name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// No certificate check (the handshake signatures are still verified): encryption without authentication.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The rustls error somewhere in an error's chain (through `io::Error` wrappers, whose `source()` skips the
/// wrapped error).
pub fn find_rustls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(inner) = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref())
            && let Some(found) = find_rustls_error(inner)
        {
            return Some(found);
        }
        // Some crates (redis) keep their cause as an `Arc<dyn Error>`, whose `source()` skips the cause itself.
        if let Some(arc) = e.downcast_ref::<Arc<dyn std::error::Error + Send + Sync>>()
            && let Some(found) = find_rustls_error(arc.as_ref())
        {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// Why a TLS handshake failed, in words a user can act on; `None` when the error holds no TLS failure.
pub fn describe_failure(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    find_rustls_error(error).map(describe_rustls)
}

/// A rustls error in words a user can act on.
pub fn describe_rustls(error: &rustls::Error) -> String {
    use rustls::AlertDescription as Alert;
    match error {
        rustls::Error::InvalidCertificate(cert) => {
            let why = match cert {
                CertificateError::UnknownIssuer => "it is not signed by a trusted CA (name the CA with the URL's CA \
                                                   file parameter or FLOWCRAFT_TLS_CA_FILE)"
                    .to_string(),
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                    format!("it is not valid for the host name connected to ({cert})")
                }
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    format!("it has expired ({cert})")
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    format!("it is not valid yet ({cert})")
                }
                other => other.to_string(),
            };
            format!("the server's certificate was rejected: {why}")
        }
        rustls::Error::AlertReceived(Alert::CertificateRequired | Alert::HandshakeFailure | Alert::BadCertificate)
        | rustls::Error::AlertReceived(Alert::UnknownCA | Alert::AccessDenied) => {
            format!("the server refused the handshake ({error}): it may require a valid client certificate")
        }
        other => format!("TLS handshake failed: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trip_and_errors() {
        let roots = system_roots();
        if let Some(first) = roots.first() {
            let pem = to_pem(first);
            let parsed = parse_certs(&pem, "CA file", "x").unwrap();
            assert_eq!(parsed[0].as_ref(), first.as_ref());
        }
        let err = parse_certs(b"not pem at all", "CA file", "ca.pem").unwrap_err();
        assert!(err.to_string().contains("ca.pem") && err.to_string().contains("no certificate"), "{err}");
        let err = TlsSettings::from_pem(None, Some(b"x"), None).unwrap_err();
        assert!(matches!(err, TlsError::Incomplete(_)), "{err}");
        let err = Identity::from_pem(b"", b"", "mine").unwrap_err();
        assert!(err.to_string().contains("mine"), "{err}");
        let err = TlsSettings::from_files(Some(Path::new("/nonexistent/ca.pem")), None, None).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn identity_debug_hides_the_key() {
        let settings = TlsSettings::none();
        assert!(settings.identity().is_none());
        assert!(!format!("{settings:?}").contains("BEGIN"));
    }

    #[test]
    fn failures_are_described() {
        let e = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        assert!(describe_rustls(&e).contains("not signed by a trusted CA"));
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let wrapped: Box<dyn std::error::Error> = Box::new(io);
        assert!(describe_failure(wrapped.as_ref()).is_some_and(|d| d.contains("trusted CA")));
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(describe_failure(&plain).is_none());
        let alert = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired);
        assert!(describe_rustls(&alert).contains("client certificate"));
    }
}
