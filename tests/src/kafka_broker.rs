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
use weir_broker_bridge::kafka::{KafkaConfig, KafkaTransport};

use crate::ports::free_port;

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

/// A running Tansu broker.
#[derive(Debug)]
pub struct KafkaBroker {
    binary: PathBuf,
    port: u16,
    storage: Storage,
    /// Holds the broker's log (`tansu.log`); also its working directory, so no stray `.env`
    /// file is picked up.
    dir: tempfile::TempDir,
    child: Option<Child>,
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
        let binary = find_tansu()?;
        let port = free_port().context("finding a free port for tansu")?;
        let dir = tempfile::Builder::new()
            .prefix("weir-tansu-")
            .tempdir()
            .context("creating tansu's directory")?;
        let mut broker = Self {
            binary,
            port,
            storage,
            dir,
            child: None,
        };
        broker.spawn_and_wait().await?;
        Ok(broker)
    }

    /// `127.0.0.1:PORT`, for `KafkaConfig::bootstrap`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// A config pointing at this broker, with short timeouts suited to tests.
    pub fn config(&self) -> KafkaConfig {
        KafkaConfig {
            bootstrap: self.bootstrap(),
            session_timeout: Duration::from_secs(10),
            commit_interval: Duration::from_millis(200),
            drain_timeout: Duration::from_secs(5),
            publish_timeout: Duration::from_secs(10),
            ..KafkaConfig::default()
        }
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
        let url = format!("tcp://127.0.0.1:{}", self.port);
        // Relative to the working directory (the temp dir): Tansu joins the URL's host and
        // path onto it.
        let storage = match self.storage {
            Storage::Memory => "memory://tansu/",
            Storage::Sqlite => "sqlite://tansu.db",
        };
        let child = Command::new(&self.binary)
            .arg("broker")
            .args(["--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", storage])
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
                        "tansu on {} not ready after {READY_TIMEOUT:?}: {error}; log:\n{}",
                        self.bootstrap(),
                        self.log()
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
