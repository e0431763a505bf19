//! A real `nats-server -js` for one test, on free loopback ports, with its own store directory;
//! killed on drop (pattern: nats.rs `nats-server/src/lib.rs`).
//!
//! The binary is `$WEIR_NATS_SERVER`, else `nats-server` on `PATH`, and must be at least
//! v2.10.23 (older JetStream servers can lose whole streams on a crash). It is never the
//! machine's own service on 4222. `make test` installs a suitable binary; a missing or old one
//! fails the test with that hint instead of skipping it.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::ports::free_port;

/// How long a start (or restart) may take before the test fails.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a graceful stop may take before the process is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Oldest server without the JetStream data-loss bugs Jepsen found.
const MIN_VERSION: (u64, u64, u64) = (2, 10, 23);

/// A running nats-server (with JetStream unless started core-only), stopped when dropped.
#[derive(Debug)]
pub struct NatsServer {
    binary: PathBuf,
    child: Option<Child>,
    port: u16,
    http_port: u16,
    /// Holds `store/` (JetStream data) and `server.log`; removed on drop.
    root: tempfile::TempDir,
    /// Started with `-js` (all but [`NatsServer::start_core_only`]).
    jetstream: bool,
    /// A configuration file (`-c`) with what the command line cannot say: `authorization`,
    /// `tls`, an operator. Ports, store and log still come from the command line.
    config: Option<PathBuf>,
    /// Ready only once `/healthz` (JetStream included) answers; a cluster's server is ready
    /// when it accepts clients, as its JetStream waits for a majority of the cluster.
    wait_for_jetstream: bool,
}

impl NatsServer {
    /// Starts a server on free loopback ports and waits (at most 10 s) until it accepts
    /// clients and `/healthz` (which includes JetStream) answers 200.
    pub fn start() -> anyhow::Result<NatsServer> {
        Self::start_with(true, None)
    }

    /// A server without JetStream, as a core-only deployment runs it.
    pub fn start_core_only() -> anyhow::Result<NatsServer> {
        Self::start_with(false, None)
    }

    /// A server with JetStream whose configuration file holds `conf` (say an `authorization`
    /// or a `tls` block); files it names (certificates, an operator JWT) are the caller's.
    pub fn start_with_config(conf: &str) -> anyhow::Result<NatsServer> {
        Self::start_with(true, Some(conf))
    }

    /// One server of a JetStream cluster, its `conf` from [`cluster_configs`]: ready once it
    /// accepts clients, since its JetStream answers only when a majority of the cluster is up
    /// and has elected a leader.
    pub fn start_cluster_node(conf: &str) -> anyhow::Result<NatsServer> {
        Self::start_with_readiness(true, Some(conf), false)
    }

    /// A JetStream cluster of `size` servers ([`cluster_configs`]), started together: a
    /// server started alone waits for the others' routes. Each is ready once it accepts
    /// clients; the cluster's JetStream answers a few seconds later, when it has elected its
    /// leader ([`NatsServer::jetstream_healthy`] says when).
    pub fn start_cluster(name: &str, size: usize) -> anyhow::Result<Vec<NatsServer>> {
        let starting: Vec<_> = cluster_configs(name, size)?
            .into_iter()
            .map(|conf| thread::spawn(move || Self::start_cluster_node(&conf)))
            .collect();
        starting
            .into_iter()
            .map(|node| {
                node.join()
                    .map_err(|_| anyhow::anyhow!("a thread starting a cluster server panicked"))?
            })
            .collect()
    }

    fn start_with(jetstream: bool, conf: Option<&str>) -> anyhow::Result<NatsServer> {
        Self::start_with_readiness(jetstream, conf, true)
    }

    fn start_with_readiness(
        jetstream: bool,
        conf: Option<&str>,
        wait_for_jetstream: bool,
    ) -> anyhow::Result<NatsServer> {
        let binary = server_binary()?;
        let root = tempfile::Builder::new()
            .prefix("weir-nats-")
            .tempdir()
            .context("creating the nats-server temp dir")?;
        fs::create_dir_all(root.path().join("store")).context("creating the store dir")?;
        let port = free_port().context("finding a free client port")?;
        let mut http_port = free_port().context("finding a free monitoring port")?;
        if http_port == port {
            http_port = free_port().context("finding a free monitoring port")?;
        }
        let config = match conf {
            None => None,
            Some(conf) => {
                let path = root.path().join("server.conf");
                fs::write(&path, conf).context("writing the nats-server config")?;
                Some(path)
            }
        };
        let mut server = NatsServer {
            binary,
            child: None,
            port,
            http_port,
            root,
            jetstream,
            config,
            wait_for_jetstream,
        };
        server.spawn()?;
        Ok(server)
    }

    /// The client URL, `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Same as [`NatsServer::url`] (the name nats.rs' harness uses).
    pub fn client_url(&self) -> String {
        self.url()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The HTTP monitoring base URL (`/healthz`, `/jsz`, `/varz`).
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Whether `/healthz` answers 200: the server accepts clients and its JetStream is up
    /// (in a cluster: in contact with a meta leader).
    pub fn jetstream_healthy(&self) -> bool {
        healthz_ok(self.http_port)
    }

    /// The server's process id while it runs (benchmarks read its CPU time from `/proc`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The JetStream store directory (kept across [`NatsServer::restart`]).
    pub fn store_dir(&self) -> PathBuf {
        self.root.path().join("store")
    }

    /// The server's log so far (for failure messages).
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_file()).unwrap_or_default()
    }

    /// Stops the server gracefully (SIGTERM, then SIGKILL after 10 s) and starts it again on
    /// the same ports and store directory; file-backed streams and durable consumers survive.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop_gracefully()?;
        self.spawn()
    }

    /// Kills the server at once (SIGKILL), as a crash would. [`NatsServer::restart`] brings it
    /// back.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("killing nats-server")?;
            child.wait().context("waiting for nats-server to exit")?;
        }
        Ok(())
    }

    fn log_file(&self) -> PathBuf {
        self.root.path().join("server.log")
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("nats-server is already running");
        }
        let mut command = Command::new(&self.binary);
        if self.jetstream {
            command.arg("-js");
        }
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        let child = command
            .args(["-a", "127.0.0.1"])
            .args(["-p", &self.port.to_string()])
            .args(["-m", &self.http_port.to_string()])
            .arg("-sd")
            .arg(self.store_dir())
            .arg("-l")
            .arg(self.log_file())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait().context("polling nats-server")? {
                    self.child = None;
                    bail!(
                        "nats-server exited during start-up ({status}); log:\n{}",
                        self.log()
                    );
                }
            }
            if accepts_clients(self.port)
                && (!self.wait_for_jetstream || healthz_ok(self.http_port))
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let log = self.log();
                let _ = self.kill();
                bail!(
                    "nats-server on port {} not ready within {READY_TIMEOUT:?}; log:\n{log}",
                    self.port
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop_gracefully(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let signalled = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .map(|status| status.success())
            .unwrap_or(false);
        if signalled {
            let deadline = Instant::now() + STOP_TIMEOUT;
            while Instant::now() < deadline {
                if child.try_wait().context("polling nats-server")?.is_some() {
                    return Ok(());
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        child.kill().context("killing nats-server")?;
        child.wait().context("waiting for nats-server to exit")?;
        Ok(())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The configurations of a JetStream cluster of `size` servers on loopback, named `n1`,
/// `n2`, ..., each with its own free route port and routes to all, for
/// [`NatsServer::start_cluster_node`].
pub fn cluster_configs(name: &str, size: usize) -> anyhow::Result<Vec<String>> {
    let mut ports = Vec::new();
    while ports.len() < size {
        let port = free_port().context("finding a free route port")?;
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    let routes: Vec<String> = ports
        .iter()
        .map(|port| format!("\"nats-route://127.0.0.1:{port}\""))
        .collect();
    Ok(ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            format!(
                "server_name: n{n}\ncluster {{\n  name: {name}\n  listen: 127.0.0.1:{port}\n  routes: [{routes}]\n}}\n",
                n = i + 1,
                routes = routes.join(", ")
            )
        })
        .collect())
}

/// The server sends its INFO line as soon as it accepts a client.
fn accepts_clients(port: u16) -> bool {
    let Ok(stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).is_ok() && line.starts_with("INFO ")
}

/// `GET /healthz` answers 200 once JetStream is up (503 while it recovers its store).
fn healthz_ok(http_port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", http_port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let request = "GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200")
}

/// `$WEIR_NATS_SERVER`, else `nats-server` on `PATH`, checked to be recent enough.
fn server_binary() -> anyhow::Result<PathBuf> {
    let binary = match std::env::var_os("WEIR_NATS_SERVER") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => find_on_path("nats-server").ok_or_else(|| {
            anyhow::anyhow!("nats-server not found: run `make test` (it installs it)")
        })?,
    };
    let output = Command::new(&binary)
        .arg("--version")
        .output()
        .with_context(|| {
            format!(
                "nats-server not found at {}: run `make test` (it installs it)",
                binary.display()
            )
        })?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    let version = parse_version(&text).with_context(|| {
        format!(
            "cannot read the version of {} from `{}`",
            binary.display(),
            text.trim()
        )
    })?;
    if version < MIN_VERSION {
        bail!(
            "{} is nats-server v{}.{}.{}, older than v{}.{}.{} (JetStream data-loss fixes): \
             run `make test` (it installs a recent one) or set WEIR_NATS_SERVER",
            binary.display(),
            version.0,
            version.1,
            version.2,
            MIN_VERSION.0,
            MIN_VERSION.1,
            MIN_VERSION.2
        );
    }
    Ok(binary)
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// `nats-server: v2.12.3` → (2, 12, 3).
fn parse_version(text: &str) -> Option<(u64, u64, u64)> {
    let start = text
        .char_indices()
        .zip(text.chars().skip(1))
        .find(|((_, c), next)| *c == 'v' && next.is_ascii_digit())
        .map(|((index, _), _)| index)?;
    let mut parts = text[start + 1..]
        .split(|c: char| !c.is_ascii_digit())
        .filter(|part| !part.is_empty())
        .map(str::parse::<u64>);
    let major = parts.next()?.ok()?;
    let minor = parts.next()?.ok()?;
    let patch = parts.next()?.ok()?;
    Some((major, minor, patch))
}

#[cfg(test)]
mod tests {
    use super::parse_version;

    #[test]
    fn parses_server_versions() {
        assert_eq!(parse_version("nats-server: v2.15.1\n"), Some((2, 15, 1)));
        assert_eq!(parse_version("nats-server: v2.9.10"), Some((2, 9, 10)));
        assert!(parse_version("nats-server: v2.9.10") < Some((2, 10, 23)));
        assert_eq!(parse_version("garbage"), None);
    }
}
