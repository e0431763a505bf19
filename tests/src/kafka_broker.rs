//! A real Kafka-protocol broker (Tansu) for tests, on a free loopback port, killed on drop.
//!
//! The binary comes from `$WEIR_TANSU`, else `tansu` on `PATH`, else `~/.cargo/bin/tansu`;
//! `make test` installs it (`cargo install tansu --version 0.6.0 --features dynostore,libsql`).
//! A missing binary fails the test: nothing is skipped.
//!
//! [`KafkaBroker::start`] runs Tansu on the `memory://` storage engine (fast; a
//! [`KafkaBroker::restart`] keeps the port but loses every topic, message and committed
//! offset). [`KafkaBroker::start_persistent`] runs it on the `sqlite://` engine (the `libsql`
//! feature) with the database file in the broker's temp dir, so a restart keeps topics,
//! records and committed offsets, like a real broker's log. It is much slower than memory and
//! meant for restart tests, not for load. Tansu 0.6 has no metrics listener of its own, so
//! parallel brokers only need distinct Kafka ports.
//!
//! [`KafkaBroker::start_secured`] runs a broker that clients reach over TLS, SASL/SCRAM or
//! both ([`SecurityOptions`]); [`KafkaBroker::config`] then carries the matching settings.
//! What Tansu 0.6 can and cannot do here:
//! - TLS: Tansu accepts `--cert`/`--key` but never wraps a connection in TLS, so the harness
//!   terminates TLS in front of it ([`crate::tls::TlsTerminator`], rustls, optionally requiring
//!   a client certificate) and makes Tansu advertise the terminator's port, so every
//!   connection a client makes (bootstrap, group coordinator, fetch) goes through TLS.
//! - SASL: `--authentication` offers SCRAM-SHA-256 and SCRAM-SHA-512 (and OAUTHBEARER), not
//!   PLAIN (its SASL library is built without it). Credentials live in the storage engine,
//!   and only the SQL engines keep them (the memory engine drops them), so a SASL broker runs
//!   on SQLite; users are created with `tansu user create` while authentication is still
//!   off, then the broker is restarted with it on.
//!
//! Known Tansu 0.6 behaviours the tests work around (see `tests/tests/kafka_e2e.rs`):
//! ListOffsets(latest) answers the newest batch's first offset + 1 (too low for multi-record
//! batches, so lag under-reports); a fetch from an offset inside a multi-record batch skips or
//! stalls (tests produce one record per batch); dead group members are evicted only when
//! another member joins or syncs.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::config::ClientConfig;
use rdkafka::producer::FutureProducer;
use weir_broker_bridge::kafka::{KafkaConfig, KafkaTransport, SaslMechanism, SecurityProtocol};

use crate::ports::free_port;
use crate::tls::{TestCa, TlsTerminator};

/// How long a started broker has to answer a metadata request.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Where Tansu keeps its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// `memory://`: gone with the process.
    Memory,
    /// `sqlite://tansu.db` in the broker's temp dir: survives [`KafkaBroker::restart`].
    Sqlite,
}

/// How clients must reach a broker started with [`KafkaBroker::start_secured`].
#[derive(Debug, Clone, Default)]
pub struct SecurityOptions {
    /// Clients connect over TLS. The server certificate (for 127.0.0.1 and localhost) is
    /// issued by a CA made for this broker: [`KafkaBroker::ca_path`].
    pub tls: bool,
    /// With `tls`: clients must also present a certificate issued by that CA (mutual TLS);
    /// [`KafkaBroker::config`] carries one.
    pub require_client_certificate: bool,
    /// Clients must authenticate with SASL/SCRAM as one of these `(user, password)`s; each
    /// gets a SCRAM-SHA-256 and a SCRAM-SHA-512 credential. Non-empty means SQLite storage.
    pub scram_users: Vec<(String, String)>,
}

/// The TLS side of a secured broker.
#[derive(Debug)]
struct TlsSetup {
    ca: TestCa,
    /// Written in the broker's directory: `ca.pem`, and `client.pem`/`client.key` (a client
    /// certificate issued by the CA).
    ca_path: PathBuf,
    client_cert_path: PathBuf,
    client_key_path: PathBuf,
    require_client_certificate: bool,
    /// Owns the port clients connect to; lives across [`KafkaBroker::restart`].
    _terminator: TlsTerminator,
}

/// A running Tansu broker.
#[derive(Debug)]
pub struct KafkaBroker {
    binary: PathBuf,
    /// The port clients connect to, and the one Tansu advertises.
    port: u16,
    /// Tansu's own (plaintext) listener: `port` unless TLS is terminated in front of it.
    listener_port: u16,
    storage: Storage,
    tls: Option<TlsSetup>,
    scram_users: Vec<(String, String)>,
    /// Tansu runs with `--authentication` (set once the SCRAM users exist).
    authentication: bool,
    /// Holds the broker's log (`tansu.log`); also its working directory, so no stray `.env`
    /// file is picked up.
    dir: tempfile::TempDir,
    child: Option<Child>,
}

/// The tests' own producer for a plaintext broker at `bootstrap`: idempotent, `acks=all`, one
/// record per batch.
pub fn test_producer(bootstrap: &str) -> anyhow::Result<FutureProducer> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        // One record per batch: Tansu 0.6 serves a fetch from the first batch whose *base*
        // offset is at or after the requested offset, so a consumer resuming from a committed
        // offset inside a multi-record batch would skip the rest of that batch (or stall).
        .set("batch.num.messages", "1")
        .set("linger.ms", "0")
        .set("message.timeout.ms", "20000")
        .create()
        .context("creating the test producer")
}

impl KafkaBroker {
    /// Start a broker with memory storage on a free port and wait until it answers a
    /// metadata request.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(Storage::Memory).await
    }

    /// Start a broker whose topics, records and committed offsets survive
    /// [`KafkaBroker::restart`] (SQLite storage in its temp dir).
    pub async fn start_persistent() -> anyhow::Result<Self> {
        Self::start_with(Storage::Sqlite).await
    }

    /// Start a broker on `storage`, on a free port, and wait until it answers a metadata
    /// request.
    pub async fn start_with(storage: Storage) -> anyhow::Result<Self> {
        let mut broker = Self::prepare(storage)?;
        broker.spawn_and_wait().await?;
        Ok(broker)
    }

    /// Start a broker that clients must reach with TLS and/or SASL/SCRAM, as `options` says,
    /// and wait until it answers a metadata request made with [`Self::config`]. Memory
    /// storage, unless there are SCRAM users (SQLite: see the module docs).
    pub async fn start_secured(options: SecurityOptions) -> anyhow::Result<Self> {
        if options.require_client_certificate && !options.tls {
            bail!("require_client_certificate needs tls");
        }
        let storage = if options.scram_users.is_empty() {
            Storage::Memory
        } else {
            Storage::Sqlite
        };
        let mut broker = Self::prepare(storage)?;
        if options.tls {
            broker.listener_port = free_port().context("finding a free port for tansu")?;
            let dir = broker.dir.path();
            let ca = TestCa::new("weir test CA")?;
            let ca_path = dir.join("ca.pem");
            ca.write(&ca_path)?;
            let server = ca.issue("tansu", &["127.0.0.1", "localhost"])?;
            let client = ca.issue("weir", &["weir.test"])?;
            let client_cert_path = dir.join("client.pem");
            let client_key_path = dir.join("client.key");
            client.write(&client_cert_path, &client_key_path)?;
            let terminator = TlsTerminator::start(
                broker.port,
                broker.listener_port,
                &server,
                options.require_client_certificate.then_some(&ca),
                &dir.join("tls.log"),
            )?;
            broker.tls = Some(TlsSetup {
                ca,
                ca_path,
                client_cert_path,
                client_key_path,
                require_client_certificate: options.require_client_certificate,
                _terminator: terminator,
            });
        }
        broker.spawn_and_wait().await?;
        if !options.scram_users.is_empty() {
            for (user, password) in &options.scram_users {
                for mechanism in ["scram256", "scram512"] {
                    broker.create_scram_user(user, password, mechanism)?;
                }
            }
            broker.scram_users = options.scram_users;
            broker.authentication = true;
            broker.restart().await?;
        }
        Ok(broker)
    }

    fn prepare(storage: Storage) -> anyhow::Result<Self> {
        let binary = find_tansu()?;
        let port = free_port().context("finding a free port for tansu")?;
        let dir = tempfile::Builder::new()
            .prefix("weir-tansu-")
            .tempdir()
            .context("creating tansu's directory")?;
        Ok(Self {
            binary,
            port,
            listener_port: port,
            storage,
            tls: None,
            scram_users: Vec::new(),
            authentication: false,
            dir,
            child: None,
        })
    }

    /// `tansu user create`, against Tansu's own listener while authentication is off.
    fn create_scram_user(&self, user: &str, password: &str, mechanism: &str) -> anyhow::Result<()> {
        let output = Command::new(&self.binary)
            .args(["user", "create"])
            .args([
                "--broker",
                &format!("tcp://127.0.0.1:{}", self.listener_port),
            ])
            .args(["--mechanism", mechanism])
            .args([user, password])
            .current_dir(self.dir.path())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .context("running tansu user create")?;
        if !output.status.success() {
            bail!(
                "tansu user create {user} ({mechanism}) failed with {}: {}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// `127.0.0.1:PORT`, for `KafkaConfig::bootstrap`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Tansu's own plaintext listener. The same as [`Self::bootstrap`] unless the broker
    /// serves TLS; then a client gets no further than the bootstrap connection here, since
    /// the broker advertises the TLS port.
    pub fn plaintext_bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.listener_port)
    }

    /// A config pointing at this broker, with short timeouts suited to tests. For a secured
    /// broker it carries what the broker asks for: `ssl`/`sasl_ssl`/`sasl_plaintext`, the CA,
    /// the client certificate when one is required, and SCRAM-SHA-512 as the first SCRAM
    /// user (password in a file in the broker's directory).
    pub fn config(&self) -> KafkaConfig {
        let mut config = KafkaConfig {
            bootstrap: self.bootstrap(),
            session_timeout: Duration::from_secs(10),
            commit_interval: Duration::from_millis(200),
            drain_timeout: Duration::from_secs(5),
            publish_timeout: Duration::from_secs(10),
            ..KafkaConfig::default()
        };
        if let Some(tls) = &self.tls {
            config.security_protocol = Some(SecurityProtocol::Ssl);
            config.ssl_ca_location = Some(tls.ca_path.clone());
            if tls.require_client_certificate {
                config.ssl_certificate_location = Some(tls.client_cert_path.clone());
                config.ssl_key_location = Some(tls.client_key_path.clone());
            }
        }
        if self.authentication {
            if let Some((user, password)) = self.scram_users.first() {
                config.security_protocol = Some(if self.tls.is_some() {
                    SecurityProtocol::SaslSsl
                } else {
                    SecurityProtocol::SaslPlaintext
                });
                config.sasl_mechanism = Some(SaslMechanism::ScramSha512);
                config.sasl_username = Some(user.clone());
                // Written on every call: cheap, and the file then always holds this password.
                config.sasl_password_file = self.password_file(password).ok();
            }
        }
        config
    }

    /// The CA that issued the server certificate (and the client certificate), for
    /// `ssl_ca_location`. `None` unless the broker serves TLS.
    pub fn ca_path(&self) -> Option<&Path> {
        self.tls.as_ref().map(|tls| tls.ca_path.as_path())
    }

    /// The CA as PEM. `None` unless the broker serves TLS.
    pub fn ca_pem(&self) -> Option<&str> {
        self.tls.as_ref().map(|tls| tls.ca.cert_pem())
    }

    /// A CA that has nothing to do with this broker, written as PEM into its directory (for
    /// "untrusted certificate" tests).
    pub fn unrelated_ca(&self) -> anyhow::Result<PathBuf> {
        let ca = TestCa::new("unrelated test CA")?;
        let path = self.dir.path().join("unrelated-ca.pem");
        ca.write(&path)?;
        Ok(path)
    }

    /// A file in the broker's directory holding `password` (for `sasl_password_file`).
    pub fn password_file(&self, password: &str) -> anyhow::Result<PathBuf> {
        let name: String = password
            .bytes()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        let path = self.dir.path().join(format!("password-{name}"));
        std::fs::write(&path, format!("{password}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// What the TLS terminator logged (failed handshakes); empty without TLS.
    pub fn tls_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tls.log")).unwrap_or_default()
    }

    /// The broker's log so far (stdout and stderr), for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Kill the broker (SIGKILL: no clean shutdown) and start it again on the same port and
    /// storage. With [`Storage::Memory`] all topics, messages and committed offsets are lost;
    /// with [`Storage::Sqlite`] they are kept (what SQLite had committed when it died).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn_and_wait().await
    }

    /// Kill the broker now (also done on drop).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("tansu.log")
    }

    async fn spawn_and_wait(&mut self) -> anyhow::Result<()> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("opening tansu's log")?;
        let listener = format!("tcp://127.0.0.1:{}", self.listener_port);
        let advertised = format!("tcp://127.0.0.1:{}", self.port);
        // Relative to the working directory (the temp dir): Tansu joins the URL's host and
        // path onto it.
        let storage = match self.storage {
            Storage::Memory => "memory://tansu/",
            Storage::Sqlite => "sqlite://tansu.db",
        };
        let mut command = Command::new(&self.binary);
        command
            .arg("broker")
            .args(["--listener-url", &listener])
            .args(["--advertised-listener-url", &advertised])
            .args(["--storage-engine", storage]);
        if self.authentication {
            command.arg("--authentication");
        }
        let child = command
            .current_dir(self.dir.path())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("sharing tansu's log")?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut probe = self.config();
        // Each probe is bounded by the transport's metadata timeout; librdkafka retries the
        // connection inside it.
        probe
            .options
            .insert("socket.connection.setup.timeout.ms".into(), "2000".into());
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait().context("checking tansu")? {
                    bail!("tansu exited early with {status}; log:\n{}", self.log());
                }
            }
            let attempt =
                tokio::time::timeout(Duration::from_secs(5), KafkaTransport::connect(&probe));
            match attempt.await {
                Ok(Ok(_transport)) => return Ok(()),
                Ok(Err(error)) if Instant::now() >= deadline => {
                    bail!(
                        "tansu on {} not ready after {READY_TIMEOUT:?}: {error}; log:\n{}{}",
                        self.bootstrap(),
                        self.log(),
                        self.tls_log()
                    )
                }
                Err(_) if Instant::now() >= deadline => {
                    bail!(
                        "tansu on {} not ready after {READY_TIMEOUT:?}; log:\n{}",
                        self.bootstrap(),
                        self.log()
                    )
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

fn find_tansu() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("WEIR_TANSU") {
        let path = PathBuf::from(path);
        if is_executable(&path) {
            return Ok(path);
        }
        bail!("WEIR_TANSU={} is not an executable file", path.display());
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("tansu");
            if is_executable(&candidate) {
                return Ok(candidate);
            }
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        let candidate = Path::new(&home).join(".cargo/bin/tansu");
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    bail!("tansu not found: run `make test` (it installs it)")
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
