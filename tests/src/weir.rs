//! Running Weir itself for end-to-end tests: in process ([`InProcess`]: the real runtime and
//! HTTP server on a free loopback port, with access to its [`Shared`] state), or as the real
//! `weir` binary ([`WeirUp`], [`weir_bin`]).
//!
//! Everything runs on the embedded memory bus; nothing here talks to an external broker. The
//! components come from `make functions` (`functions/target/wasm32-wasip2/release`) and the
//! binary from `cargo build -p weir-dispatcher --bin weir`: when either is missing, the harness
//! fails with the command to run instead of skipping.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use weir_dispatcher::runner::FunctionRunner;
use weir_dispatcher::runtime::{Runtime, Shared};
use weir_dispatcher::{config, http, telemetry};

use crate::ports::free_port;

/// How long a `weir up` child may take to answer `/healthz`: Cranelift compiles every
/// component at start, which in a debug build on a busy machine takes a while.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// The repository root (the parent of this crate).
pub fn repo_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map_or(manifest.clone(), std::path::Path::to_path_buf)
}

/// Where `make functions` puts the components. Fails with the command to run when the
/// example and test components are not there.
pub fn functions_dir() -> anyhow::Result<PathBuf> {
    let dir = repo_root().join("functions/target/wasm32-wasip2/release");
    let needed = [
        "db_audit.wasm",
        "upload_indexer.wasm",
        "order_validate.wasm",
        "order_enrich.wasm",
        "flaky.wasm",
        "always_trap.wasm",
        "spin.wasm",
        "memory_hog.wasm",
        "bad_output.wasm",
        "echo.wasm",
        "reject_all.wasm",
        "not_a_function.wasm",
    ];
    let missing: Vec<&str> = needed
        .iter()
        .copied()
        .filter(|m| !dir.join(m).is_file())
        .collect();
    if !missing.is_empty() {
        bail!(
            "components missing in {} ({}): run `make functions` first",
            dir.display(),
            missing.join(", ")
        );
    }
    Ok(dir)
}

/// The absolute path of component `file` (e.g. `echo.wasm`), for configurations written to a
/// temporary directory.
pub fn component_path(file: &str) -> anyhow::Result<String> {
    let path = functions_dir()?.join(file);
    if !path.is_file() {
        bail!("{} is missing: run `make functions`", path.display());
    }
    Ok(path.display().to_string())
}

/// The `weir` binary built next to the test executable (`target/debug/weir`).
pub fn weir_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    // target/debug/deps/<test> → target/debug/weir
    let dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .context("the test executable has no target directory")?;
    let bin = dir.join(format!("weir{}", std::env::consts::EXE_SUFFIX));
    if !bin.is_file() {
        bail!(
            "{} is missing: run `cargo build -p weir-dispatcher --bin weir`",
            bin.display()
        );
    }
    Ok(bin)
}

/// A Weir runtime and its HTTP server inside the test process.
pub struct InProcess {
    runtime: Option<Runtime>,
    shared: Arc<Shared>,
    server: Option<JoinHandle<std::io::Result<()>>>,
    server_stop: CancellationToken,
    addr: SocketAddr,
    client: reqwest::Client,
}

impl std::fmt::Debug for InProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcess")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl InProcess {
    /// Parse `config_toml` (module paths relative to [`functions_dir`]), start every function
    /// and serve HTTP on a free loopback port. `http.listen` in the text is ignored.
    pub async fn start(config_toml: &str) -> anyhow::Result<InProcess> {
        let dir = functions_dir()?;
        let config = config::from_toml_str(config_toml, &dir)
            .map_err(|e| anyhow::anyhow!("the test configuration is not valid:\n{e}"))?;
        let metrics = telemetry::install_prometheus().context("installing the metrics recorder")?;
        let runtime = Runtime::start(config)
            .await
            .context("starting the runtime")?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the HTTP listener")?;
        let addr = listener
            .local_addr()
            .context("reading the listener's address")?;
        let state = http::AppState {
            shared: runtime.shared(),
            metrics,
        };
        // Its own token, so the server outlives the runtime's shutdown only as long as needed.
        let server_stop = CancellationToken::new();
        let server = tokio::spawn(http::serve(listener, state, server_stop.clone()));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .context("building the HTTP client")?;
        Ok(InProcess {
            shared: runtime.shared(),
            runtime: Some(runtime),
            server: Some(server),
            server_stop,
            addr,
            client,
        })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The memory bus and the function runners (counters, pools, recent failures).
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// The runner of function `name`: its counters, pool, spec and recent failures.
    pub fn function(&self, name: &str) -> anyhow::Result<Arc<FunctionRunner>> {
        self.shared
            .function(name)
            .cloned()
            .with_context(|| format!("no function {name}"))
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// `POST /v1/topics/{topic}` with `headers` and `body`; the status and the JSON answer.
    pub async fn post(
        &self,
        topic: &str,
        headers: &[(&str, &str)],
        body: impl Into<reqwest::Body>,
    ) -> anyhow::Result<(u16, Value)> {
        let url = format!("{}/v1/topics/{topic}", self.base_url());
        let mut request = self.client.post(&url).body(body);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = response.status().as_u16();
        let text = response
            .text()
            .await
            .with_context(|| format!("reading the answer of POST {url}"))?;
        let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, json))
    }

    /// `GET` a path of the admin API: the status and the body as text, whatever the status.
    pub async fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let url = format!("{}{path}", self.base_url());
        let response = self
            .client
            .get(&url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = response.status().as_u16();
        let text = response
            .text()
            .await
            .with_context(|| format!("reading GET {url}"))?;
        Ok((status, text))
    }

    /// `GET` a path of the admin API as JSON; a status other than 2xx is an error.
    pub async fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        let (status, text) = self.get(path).await?;
        if !(200..300).contains(&status) {
            bail!("GET {path}: {status}: {text}");
        }
        serde_json::from_str(&text).with_context(|| format!("GET {path} is not JSON: {text}"))
    }

    /// The events on `topic` (decoded, as `weir tail` shows them), oldest first, until there
    /// are at least `n`; fails after `timeout` with what it saw.
    pub async fn wait_for(
        &self,
        topic: &str,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        let mut seen: Vec<Value> = Vec::new();
        let mut after: Option<u64> = None;
        while seen.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "timed out after {timeout:?} waiting for {n} events on {topic}; saw {}: {}",
                    seen.len(),
                    serde_json::to_string_pretty(&seen).unwrap_or_default()
                );
            }
            let page = self.events_page(topic, after, left).await?;
            for message in page["messages"].as_array().into_iter().flatten() {
                seen.extend(message["events"].as_array().into_iter().flatten().cloned());
            }
            after = page["next"].as_u64().or(after);
        }
        Ok(seen)
    }

    /// The first event on `topic` (oldest first) for which `matches` holds; fails after
    /// `timeout` with everything the topic held.
    pub async fn wait_for_match(
        &self,
        topic: &str,
        timeout: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        let mut seen: Vec<Value> = Vec::new();
        let mut after: Option<u64> = None;
        loop {
            if let Some(found) = seen.iter().find(|e| matches(e)) {
                return Ok(found.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "timed out after {timeout:?} waiting for a matching event on {topic}; saw {}: {}",
                    seen.len(),
                    serde_json::to_string_pretty(&seen).unwrap_or_default()
                );
            }
            let page = self.events_page(topic, after, left).await?;
            for message in page["messages"].as_array().into_iter().flatten() {
                seen.extend(message["events"].as_array().into_iter().flatten().cloned());
            }
            after = page["next"].as_u64().or(after);
        }
    }

    /// One long-poll of `GET /v1/topics/{topic}/events`, waiting at most `left` (in slices of
    /// at most 2 s so that deadlines hold to within a few tens of ms).
    async fn events_page(
        &self,
        topic: &str,
        after: Option<u64>,
        left: Duration,
    ) -> anyhow::Result<Value> {
        let wait = left
            .min(Duration::from_secs(2))
            .max(Duration::from_millis(1));
        let mut url = format!(
            "{}/v1/topics/{topic}/events?wait={}ms&limit=1000",
            self.base_url(),
            wait.as_millis()
        );
        if let Some(after) = after {
            url.push_str(&format!("&after={after}"));
        }
        self.client
            .get(&url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?
            .error_for_status()
            .with_context(|| format!("GET {url}"))?
            .json()
            .await
            .with_context(|| format!("reading GET {url}"))
    }

    /// The topic's retained messages with their sequences, `(seq, decoded events)`, page by
    /// page (the server gives at most 1,000 a page) until a page comes back empty.
    pub async fn messages(&self, topic: &str) -> anyhow::Result<Vec<(u64, Vec<Value>)>> {
        // More pages than any test's topic holds: a topic that keeps growing is an error.
        const MAX_PAGES: usize = 1000;
        let mut messages = Vec::new();
        let mut after = String::new();
        for _ in 0..MAX_PAGES {
            let page = self
                .get_json(&format!("/v1/topics/{topic}/events?limit=1000{after}"))
                .await?;
            let before = messages.len();
            messages.extend(page["messages"].as_array().into_iter().flatten().map(|m| {
                (
                    m["seq"].as_u64().unwrap_or(0),
                    m["events"].as_array().cloned().unwrap_or_default(),
                )
            }));
            if messages.len() == before {
                return Ok(messages);
            }
            let next = page["next"]
                .as_u64()
                .with_context(|| format!("a page of {topic} without `next`: {page}"))?;
            after = format!("&after={next}");
        }
        bail!("{topic} still had messages after {MAX_PAGES} pages")
    }

    /// The whole retained history of `topic` right now (no waiting).
    pub async fn history(&self, topic: &str) -> anyhow::Result<Vec<Value>> {
        Ok(self
            .messages(topic)
            .await?
            .into_iter()
            .flat_map(|(_, events)| events)
            .collect())
    }

    /// Stop the functions (finishing in-flight work), then the HTTP server.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown().await;
        }
        self.server_stop.cancel();
        if let Some(server) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(10), server)
                .await
                .context("the HTTP server did not stop within 10 s")?
                .context("the HTTP server task failed")?
                .context("the HTTP server ended with an error")?;
        }
        Ok(())
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        // A test that failed before `shutdown` still stops the server; the runtime's tasks end
        // with the test's tokio runtime.
        self.server_stop.cancel();
    }
}

/// `weir up --http 127.0.0.1:<free port>` as a child process; killed on drop.
#[derive(Debug)]
pub struct WeirUp {
    child: Child,
    addr: SocketAddr,
    log: tempfile::NamedTempFile,
}

impl WeirUp {
    /// Start it and wait (at most [`STARTUP_TIMEOUT`]) until `/healthz` answers.
    pub fn start() -> anyhow::Result<WeirUp> {
        Self::start_with(&[])
    }

    /// Start it with more arguments (`--nats URL`, `--kafka BOOTSTRAP`) and wait as
    /// [`WeirUp::start`] does.
    pub fn start_with(args: &[&str]) -> anyhow::Result<WeirUp> {
        let bin = weir_bin()?;
        let functions = functions_dir()?;
        let port = free_port().context("finding a free port")?;
        let addr: SocketAddr = SocketAddr::from(([127, 0, 0, 1], port));
        let log = tempfile::Builder::new()
            .prefix("weir-up-")
            .suffix(".log")
            .tempfile()
            .context("creating the log file")?;
        let child = Command::new(&bin)
            .args(["up", "--http", &addr.to_string(), "--functions"])
            .arg(&functions)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.reopen().context("opening the log file")?)
            .stderr(log.reopen().context("opening the log file")?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut up = WeirUp { child, addr, log };
        up.wait_healthy()?;
        Ok(up)
    }

    fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().context("polling weir up")? {
                bail!(
                    "weir up exited with {status} before serving; its log:\n{}",
                    self.log_text()
                );
            }
            if healthz(self.addr) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "weir up did not answer /healthz within {STARTUP_TIMEOUT:?}; its log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `127.0.0.1:<port>`, as `--http` of `weir publish` / `weir tail` takes it.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the child wrote so far (stdout and stderr).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for WeirUp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `GET /healthz` on `addr` answers 200, with a plain socket (no runtime needed).
fn healthz(addr: SocketAddr) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200")
}

/// What a finished `weir` command printed.
#[derive(Debug, Clone)]
pub struct CommandOutput {
    /// The exit code (`None` when a signal ended it).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Run the `weir` binary with `args` and wait at most `timeout` for it to exit; a command
/// still running then is killed and the call fails with what it printed so far.
pub async fn run_weir<I, S>(args: I, timeout: Duration) -> anyhow::Result<CommandOutput>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let bin = weir_bin()?;
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let shown = args
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let child = tokio::process::Command::new(&bin)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A timed-out command must not outlive the test.
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting weir {shown}"))?;
    let output = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| anyhow::anyhow!("weir {shown} did not finish within {timeout:?}"))?
        .with_context(|| format!("waiting for weir {shown}"))?;
    Ok(CommandOutput {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}
