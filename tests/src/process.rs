//! `weir run -c <file>` as a child process, for fault tests that must kill or stop the real
//! binary: [`WeirProcess::kill9`] (a crash: SIGKILL, nothing is flushed or settled) and
//! [`WeirProcess::terminate`] (SIGTERM: the graceful shutdown a rolling deploy sends).
//!
//! The child listens on a free loopback port (`--http`), so the test can read `/v1/functions`
//! and `/metrics` of that very process. Its stdout and stderr go to a log file that failure
//! messages quote. It does not start brokers (see [`crate::nats_server`]) and does not write
//! configurations: the test hands it a file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::ports::free_port;
use crate::weir::{weir_bin, STARTUP_TIMEOUT};

/// A `weir run` child process; killed (SIGKILL) on drop if still running.
#[derive(Debug)]
pub struct WeirProcess {
    child: Option<Child>,
    addr: SocketAddr,
    config: PathBuf,
    log: tempfile::NamedTempFile,
    client: reqwest::Client,
}

impl WeirProcess {
    /// Starts `weir run -c config --http 127.0.0.1:<free port>` and waits (at most
    /// [`STARTUP_TIMEOUT`]) until `/healthz` answers, which is after every function subscribed.
    /// `env` is added to the child's environment (e.g. `WEIR_LOG`).
    pub async fn start(config: &Path, env: &[(&str, &str)]) -> anyhow::Result<WeirProcess> {
        let bin = weir_bin()?;
        let port = free_port().context("finding a free port")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log = tempfile::Builder::new()
            .prefix("weir-run-")
            .suffix(".log")
            .tempfile()
            .context("creating the log file")?;
        let mut command = Command::new(&bin);
        command
            .arg("run")
            .arg("-c")
            .arg(config)
            .args(["--http", &addr.to_string()])
            .stdin(Stdio::null())
            .stdout(log.reopen().context("opening the log file")?)
            .stderr(log.reopen().context("opening the log file")?);
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .context("building the HTTP client")?;
        let mut process = WeirProcess {
            child: Some(child),
            addr,
            config: config.to_path_buf(),
            log,
            client,
        };
        process.wait_healthy().await?;
        Ok(process)
    }

    async fn wait_healthy(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(status) = self.try_wait()? {
                bail!(
                    "weir run exited with {status} before serving; its log:\n{}",
                    self.log_text()
                );
            }
            if let Ok(response) = self
                .client
                .get(format!("{}/healthz", self.base_url()))
                .send()
                .await
            {
                if response.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "weir run did not answer /healthz within {STARTUP_TIMEOUT:?}; its log:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The configuration file it runs.
    pub fn config(&self) -> &Path {
        &self.config
    }

    /// The child's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// What the child wrote so far (stdout and stderr).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// `Some(status)` once the child exited.
    pub fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            None => bail!("the weir process was already reaped"),
            Some(child) => child.try_wait().context("polling the weir process"),
        }
    }

    /// SIGKILL, as a crash or an OOM kill would: nothing is settled, flushed or logged. Waits
    /// until the process is gone.
    pub async fn kill9(&mut self) -> anyhow::Result<ExitStatus> {
        self.signal(Signal::SIGKILL)?;
        self.wait_exit(Duration::from_secs(10)).await
    }

    /// SIGTERM, then waits at most `timeout` for the graceful shutdown to finish; a process
    /// still running then is killed and the call fails with its log.
    pub async fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        self.signal(Signal::SIGTERM)?;
        self.wait_exit(timeout).await
    }

    fn signal(&self, signal: Signal) -> anyhow::Result<()> {
        let child = self
            .child
            .as_ref()
            .context("the weir process was already reaped")?;
        let pid = i32::try_from(child.id()).context("the process id does not fit a pid_t")?;
        kill(Pid::from_raw(pid), signal)
            .with_context(|| format!("sending {signal} to weir (pid {pid})"))
    }

    async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = self.signal(Signal::SIGKILL);
                if let Some(mut child) = self.child.take() {
                    let _ = child.wait();
                }
                bail!(
                    "weir did not exit within {timeout:?}; killed it. Its log:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `GET path` as text (e.g. `/metrics`).
    pub async fn get_text(&self, path: &str) -> anyhow::Result<String> {
        let url = format!("{}{path}", self.base_url());
        let response = self
            .client
            .get(&url)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .with_context(|| format!("reading GET {url}"))?;
        if !status.is_success() {
            bail!("GET {url}: {status}: {text}");
        }
        Ok(text)
    }

    /// `GET path` as JSON (e.g. `/v1/functions`).
    pub async fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        let text = self.get_text(path).await?;
        serde_json::from_str(&text).with_context(|| format!("GET {path} is not JSON: {text}"))
    }

    /// The entry of `function` in `GET /v1/functions`.
    pub async fn function_view(&self, function: &str) -> anyhow::Result<Value> {
        let all = self.get_json("/v1/functions").await?;
        all["functions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|f| f["name"] == function)
            .cloned()
            .with_context(|| format!("no function {function} in /v1/functions: {all}"))
    }

    /// The value of one sample of `/metrics` (`name{labels}` exactly as exposed, e.g.
    /// `weir_lane_paused{function="f"}`); `None` when the series is absent.
    pub async fn metric(&self, series: &str) -> anyhow::Result<Option<f64>> {
        let text = self.get_text("/metrics").await?;
        Ok(metric_value(&text, series))
    }
}

/// One sample's value from Prometheus text exposition.
pub fn metric_value(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
}

impl Drop for WeirProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::metric_value;

    #[test]
    fn reads_a_sample_by_its_exact_series() {
        let text = "# TYPE weir_lane_paused gauge\nweir_lane_paused{function=\"a\"} 1\nweir_lane_paused{function=\"ab\"} 0\n";
        assert_eq!(
            metric_value(text, "weir_lane_paused{function=\"a\"}"),
            Some(1.0)
        );
        assert_eq!(
            metric_value(text, "weir_lane_paused{function=\"ab\"}"),
            Some(0.0)
        );
        assert_eq!(metric_value(text, "weir_lane_paused{function=\"b\"}"), None);
    }
}
