//! Real TLS for tests: a throw-away PKI generated with rcgen (a CA, a server certificate for 127.0.0.1 and
//! localhost, a client certificate, and an unrelated CA for "wrong CA" cases) and TLS-terminating proxies (tokio-rustls)
//! in front of the plain RabbitMQ and Redis of this machine, optionally requiring a client certificate.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// Debian's snakeoil certificate, which this machine's PostgreSQL serves (`CN=localhost`, self-signed).
pub const SNAKEOIL: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

/// The test PKI, as PEM files in a temporary directory.
pub struct Pki {
    _dir: tempfile::TempDir,
    /// The CA that signed the server and client certificates.
    pub ca_file: PathBuf,
    /// Another CA that signed nothing of ours.
    pub other_ca_file: PathBuf,
    /// A client certificate signed by the CA, and its key.
    pub client_cert_file: PathBuf,
    pub client_key_file: PathBuf,
    ca_der: CertificateDer<'static>,
    server_chain: Vec<CertificateDer<'static>>,
    server_key_pem: String,
}

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA")
}

/// The process' test PKI (generated once).
pub fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = new_ca("flowcraft test CA");
        let other = new_ca("some other CA");
        let server_key = KeyPair::generate().expect("key");
        let mut server = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).expect("p");
        server.distinguished_name.push(DnType::CommonName, "localhost");
        let server_cert = server.signed_by(&server_key, &ca).expect("server cert");
        let client_key = KeyPair::generate().expect("key");
        let mut client = CertificateParams::new(Vec::<String>::new()).expect("p");
        client.distinguished_name.push(DnType::CommonName, "flowcraft-test-client");
        let client_cert = client.signed_by(&client_key, &ca).expect("client cert");
        let write = |name: &str, content: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, content).expect("write pem");
            path
        };
        Pki {
            ca_file: write("ca.pem", &ca.pem()),
            other_ca_file: write("other-ca.pem", &other.pem()),
            client_cert_file: write("client.pem", &client_cert.pem()),
            client_key_file: write("client-key.pem", &client_key.serialize_pem()),
            ca_der: ca.der().clone(),
            server_chain: vec![server_cert.der().clone(), ca.der().clone()],
            server_key_pem: server_key.serialize_pem(),
            _dir: dir,
        }
    })
}

/// A TLS-terminating proxy: accepts TLS on 127.0.0.1:`port` and forwards the clear bytes to `upstream`.
pub struct TlsProxy {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsProxy {
    /// Start a proxy to `upstream` (e.g. `127.0.0.1:6379`); with `client_auth`, a client certificate signed by
    /// the test CA is required.
    pub async fn start(upstream: SocketAddr, client_auth: bool) -> Self {
        let pki = pki();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions");
        let builder = if client_auth {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(pki.ca_der.clone()).expect("ca");
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let key = PrivateKeyDer::from_pem_slice(pki.server_key_pem.as_bytes()).expect("server key");
        let config = builder.with_single_cert(pki.server_chain.clone(), key).expect("server config");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((socket, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                connections.spawn(async move {
                    let Ok(mut tls) = acceptor.accept(socket).await else { return };
                    let Ok(mut plain) = TcpStream::connect(upstream).await else { return };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Self { port, task }
    }
}

/// A plain TCP forwarder: accepts on 127.0.0.1:`port` and forwards the bytes to `upstream` (the same extra hop
/// as [`TlsProxy`] without the encryption: benchmarks compare TLS against it to measure TLS, not the hop).
pub struct PlainProxy {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PlainProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PlainProxy {
    /// Start a forwarder to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut socket, _)) = listener.accept().await {
                connections.spawn(async move {
                    let Ok(mut plain) = TcpStream::connect(upstream).await else { return };
                    let _ = tokio::io::copy_bidirectional(&mut socket, &mut plain).await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Self { port, task }
    }
}

/// The plain RabbitMQ and Redis addresses of this machine (from the test URLs).
pub fn upstream(url: &str, default_port: u16) -> SocketAddr {
    let parsed = url::Url::parse(url).expect("service url");
    let host = match parsed.host_str() {
        Some("localhost") | None => "127.0.0.1".to_string(),
        Some(h) => h.to_string(),
    };
    format!("{host}:{}", parsed.port().unwrap_or(default_port)).parse().expect("socket address")
}

/// A listener that records the first bytes a client sends on its first connection, answers `reply` and closes:
/// shows whether a client starts with a TLS handshake (a record of type 22, `0x16`) or with clear text.
pub async fn first_bytes(reply: &'static [u8]) -> (u16, tokio::sync::oneshot::Receiver<Vec<u8>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let Ok((mut socket, _)) = listener.accept().await else { return };
        let mut buf = vec![0u8; 64];
        let n = socket.read(&mut buf).await.unwrap_or(0);
        buf.truncate(n);
        let _ = tx.send(buf);
        let _ = socket.write_all(reply).await;
        // Keep the socket a moment so the reply is read, then close.
        let _ = socket.shutdown().await;
    });
    (port, rx)
}
