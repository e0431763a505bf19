//! TLS for test servers: certificates made at test time (rcgen) and a TLS terminator that puts
//! a real TLS listener in front of a server that speaks none itself.
//!
//! Tansu 0.6 parses `--cert`/`--key` but never wraps its connections in TLS (the acceptor it
//! builds is unused), so [`crate::kafka_broker`] puts a [`TlsTerminator`] in front of it: the
//! client's TLS stack (librdkafka with OpenSSL) does a real handshake with a rustls server, and
//! the Kafka protocol, SASL included, then flows through to Tansu unchanged. The terminator can
//! also require a client certificate (mutual TLS), which Tansu could not do either.

use std::fs::File;
use std::io::Write as _;
use std::net::TcpListener as StdTcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// How long a client has to finish its TLS handshake with the terminator.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A certificate authority made for one test.
pub struct TestCa {
    cert: CertificateDer<'static>,
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

/// A certificate issued by a [`TestCa`], with its private key.
#[derive(Clone)]
pub struct IssuedCert {
    pub cert: CertificateDer<'static>,
    pub cert_pem: String,
    /// PKCS#8 DER.
    key_der: Vec<u8>,
    /// PKCS#8 PEM.
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert").finish_non_exhaustive()
    }
}

impl IssuedCert {
    fn key(&self) -> PrivateKeyDer<'static> {
        PrivatePkcs8KeyDer::from(self.key_der.clone()).into()
    }

    /// Write the certificate and the key as PEM files.
    pub fn write(&self, cert: &Path, key: &Path) -> anyhow::Result<()> {
        std::fs::write(cert, &self.cert_pem)
            .with_context(|| format!("writing {}", cert.display()))?;
        std::fs::write(key, &self.key_pem).with_context(|| format!("writing {}", key.display()))
    }
}

impl TestCa {
    /// A new CA (ECDSA P-256) whose subject is `name`.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let mut params = CertificateParams::new(Vec::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate as PEM (what a client's `ssl.ca.location` points at).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Write the CA certificate as a PEM file.
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        std::fs::write(path, &self.cert_pem).with_context(|| format!("writing {}", path.display()))
    }

    /// A certificate for `names` (DNS names or IP addresses, as subject alternative names),
    /// good for TLS servers and clients alike.
    pub fn issue(&self, common_name: &str, names: &[&str]) -> anyhow::Result<IssuedCert> {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            cert: cert.der().clone(),
            key_der: key.serialize_der(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A TLS listener on a loopback port that forwards each connection, decrypted, to a plaintext
/// port. Stopped (listener and every connection) on drop.
#[derive(Debug)]
pub struct TlsTerminator {
    port: u16,
    stop: CancellationToken,
    thread: Option<JoinHandle<()>>,
}

impl TlsTerminator {
    /// Listen on 127.0.0.1:`port` with `server` as the certificate, and relay each connection
    /// to 127.0.0.1:`upstream`. With `client_ca`, a client must present a certificate issued
    /// by it. Handshake failures are appended to `log`.
    pub fn start(
        port: u16,
        upstream: u16,
        server: &IssuedCert,
        client_ca: Option<&TestCa>,
        log: &Path,
    ) -> anyhow::Result<Self> {
        let config = server_config(server, client_ca)?;
        let listener = StdTcpListener::bind(("127.0.0.1", port))
            .with_context(|| format!("binding the TLS terminator to 127.0.0.1:{port}"))?;
        listener.set_nonblocking(true)?;
        let log = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let log = Arc::new(Mutex::new(log));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the TLS terminator's runtime")?;
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let thread = std::thread::Builder::new()
            .name(format!("tls-terminator-{port}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(listener) => listener,
                        Err(error) => {
                            note(&log, &format!("listener failed: {error}"));
                            return;
                        }
                    };
                    loop {
                        tokio::select! {
                            () = stopped.cancelled() => break,
                            accepted = listener.accept() => match accepted {
                                Ok((stream, peer)) => {
                                    let acceptor = acceptor.clone();
                                    let log = log.clone();
                                    tokio::spawn(async move {
                                        relay(acceptor, stream, upstream, &log, peer).await;
                                    });
                                }
                                Err(error) => note(&log, &format!("accept failed: {error}")),
                            },
                        }
                    }
                });
                // Dropping the runtime here ends every relayed connection.
            })
            .context("starting the TLS terminator's thread")?;
        Ok(Self {
            port,
            stop,
            thread: Some(thread),
        })
    }

    /// The TLS port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for TlsTerminator {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn server_config(server: &IssuedCert, client_ca: Option<&TestCa>) -> anyhow::Result<ServerConfig> {
    // Explicit provider: the build must not depend on which rustls backends other crates enable.
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            roots.add(ca.cert.clone()).context("client CA")?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .context("client certificate verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    builder
        .with_single_cert(vec![server.cert.clone()], server.key())
        .context("server certificate")
}

async fn relay(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    upstream: u16,
    log: &Mutex<File>,
    peer: std::net::SocketAddr,
) {
    let _ = stream.set_nodelay(true);
    let mut tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            note(log, &format!("{peer}: TLS handshake failed: {error}"));
            return;
        }
        Err(_) => {
            note(log, &format!("{peer}: TLS handshake timed out"));
            return;
        }
    };
    let mut server = match TcpStream::connect(("127.0.0.1", upstream)).await {
        Ok(server) => server,
        Err(error) => {
            note(
                log,
                &format!("{peer}: connecting to 127.0.0.1:{upstream}: {error}"),
            );
            return;
        }
    };
    let _ = server.set_nodelay(true);
    // Ends when either side closes; errors are the peers' business (e.g. a restarted server).
    let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
}

fn note(log: &Mutex<File>, line: &str) {
    let mut file = log
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let _ = writeln!(file, "{line}");
}
