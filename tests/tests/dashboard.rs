//! The Grafana dashboard of the compose stack (`deploy/grafana/dashboards/weir.json`) against
//! real data: a real Prometheus scrapes a real Weir (in process, on the memory bus) under a load
//! that moves every metric the dashboard shows, and every panel's query must return data.
//!
//! The load: `echo` succeeds (outputs, and instances recycled every few calls, so instances
//! keep starting), `flaky` fails once then succeeds (retries), `exhausted` never succeeds
//! (retries, then dead letters `retries-exhausted`), `reject` rejects (dead letters
//! `rejected`), and `stuck` rejects into a dead-letter topic that is full: its only consumer
//! group (`dlq-holder`) keeps every record waiting for a retry a minute away, and the memory
//! bus refuses publishes beyond `max_pending` outstanding messages. So `stuck`'s DLQ writes fail
//! and its lane pauses, which is what the DLQ-failure and lane-paused panels show.
//!
//! Needs `prometheus` (Debian package `prometheus`, installed by `make tools`) and
//! `make functions`. Everything listens on loopback; every wait is bounded.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use serde_json::Value;
use weir_dispatcher::telemetry::{self, METRIC_NAMES};
use weir_tests::ports::free_port;
use weir_tests::weir::{repo_root, InProcess};

/// Memory-bus `max_pending` (per consumer group): small, so that `dlq.stuck` fills up.
const MAX_PENDING: u64 = 30;

const CONFIG: &str = r#"
[brokers.memory]
max_pending = 30

[defaults]
timeout = "2s"

[defaults.trigger]
broker = "memory"
ordering = "none"

[defaults.scaling]
min = 0
max = 3
max_invocations = 4

[[functions]]
name = "echo"
module = "echo.wasm"
outputs = ["echo.out"]
[functions.trigger]
topic = "load.echo"

[[functions]]
name = "flaky"
module = "flaky.wasm"
outputs = ["flaky.out"]
config = { fail_attempts = "1" }
[functions.trigger]
topic = "load.flaky"
[functions.retry]
max_attempts = 3
initial_delay = "20ms"

[[functions]]
name = "exhausted"
module = "flaky.wasm"
outputs = ["flaky.out"]
config = { fail_attempts = "1000" }
[functions.trigger]
topic = "load.exhausted"
[functions.retry]
max_attempts = 2
initial_delay = "20ms"

[[functions]]
name = "reject"
module = "reject_all.wasm"
[functions.trigger]
topic = "load.reject"

[[functions]]
name = "stuck"
module = "reject_all.wasm"
[functions.trigger]
topic = "load.stuck"
[functions.dead_letter]
topic = "dlq.stuck"

[[functions]]
name = "dlq-holder"
module = "flaky.wasm"
outputs = ["flaky.out"]
config = { fail_attempts = "1000" }
[functions.trigger]
topic = "dlq.stuck"
[functions.retry]
max_attempts = 1000
initial_delay = "60s"
max_delay = "60s"
"#;

/// What `$__rate_interval` stands for when the test evaluates a panel: Grafana uses at least
/// four scrape intervals; ten one-second scrapes leave room for a late one.
const RATE_INTERVAL: &str = "10s";

/// Prometheus scrapes the test's Weir this often.
const SCRAPE_INTERVAL: &str = "1s";

/// Whole-test bounds.
const PROMETHEUS_READY: Duration = Duration::from_secs(15);
const DLQ_PAUSE: Duration = Duration::from_secs(15);
/// Rates need a few scrapes of moving counters before every panel has a value.
const EVALUATE: Duration = Duration::from_secs(25);

/// The metrics the issue asks the dashboard to show; each must be queried by some panel.
const REQUIRED: &[&str] = &[
    telemetry::CONSUMER_LAG,
    telemetry::EVENTS_RECEIVED,
    telemetry::INVOCATIONS,
    telemetry::INVOCATION_DURATION,
    telemetry::INSTANCES,
    telemetry::INSTANCES_DESIRED,
    telemetry::RETRIES,
    telemetry::DEAD_LETTERS,
    telemetry::INSTANCE_STARTS,
    telemetry::INSTANCE_START_DURATION,
    telemetry::DLQ_PUBLISH_FAILURES,
    telemetry::LANE_PAUSED,
];

fn dashboard_path() -> PathBuf {
    repo_root().join("deploy/grafana/dashboards/weir.json")
}

fn load_dashboard() -> anyhow::Result<Value> {
    let path = dashboard_path();
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

/// A panel query: the panel's title, the target's refId and its PromQL.
#[derive(Debug, Clone)]
struct PanelQuery {
    panel: String,
    ref_id: String,
    expr: String,
}

/// Every target of every panel (rows' nested panels included).
fn panel_queries(dashboard: &Value) -> Vec<PanelQuery> {
    fn walk(panels: &[Value], out: &mut Vec<PanelQuery>) {
        for panel in panels {
            let title = panel["title"].as_str().unwrap_or("(untitled)").to_owned();
            for target in panel["targets"].as_array().into_iter().flatten() {
                out.push(PanelQuery {
                    panel: title.clone(),
                    ref_id: target["refId"].as_str().unwrap_or("?").to_owned(),
                    expr: target["expr"].as_str().unwrap_or_default().to_owned(),
                });
            }
            walk(
                panel["panels"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default(),
                out,
            );
        }
    }
    let mut out = Vec::new();
    walk(
        dashboard["panels"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default(),
        &mut out,
    );
    out
}

/// The template variables' queries (`label_values(...)`).
fn variable_queries(dashboard: &Value) -> Vec<String> {
    dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| {
            v["definition"]
                .as_str()
                .or_else(|| v["query"]["query"].as_str())
        })
        .map(str::to_owned)
        .collect()
}

/// Replace Grafana's variables with what the test evaluates; fails on any variable it does not
/// know, so a new variable cannot slip past the test.
fn concrete(expr: &str) -> anyhow::Result<String> {
    let out = expr
        .replace("$__rate_interval", RATE_INTERVAL)
        .replace("$function", ".*");
    ensure!(!out.contains('$'), "unknown Grafana variable in {expr:?}");
    Ok(out)
}

/// The `weir_*` names an expression mentions, with histogram series suffixes folded onto the
/// histogram's name.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let histograms = [
        telemetry::INVOCATION_DURATION,
        telemetry::INSTANCE_START_DURATION,
    ];
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(found) = expr[i..].find("weir_") {
        let start = i + found;
        let preceded_by_ident =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len()
            && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_' || bytes[end] == b':')
        {
            end += 1;
        }
        if !preceded_by_ident {
            let name = &expr[start..end];
            let folded = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    name.strip_suffix(suffix)
                        .filter(|base| histograms.contains(base))
                })
                .unwrap_or(name);
            names.insert(folded.to_owned());
        }
        i = end;
    }
    names
}

#[test]
fn the_dashboard_only_uses_metrics_weir_emits() -> anyhow::Result<()> {
    let dashboard = load_dashboard()?;
    let queries = panel_queries(&dashboard);
    ensure!(
        queries.len() >= REQUIRED.len(),
        "the dashboard has only {} queries",
        queries.len()
    );
    let mut used = BTreeSet::new();
    let all_exprs = queries
        .iter()
        .map(|q| q.expr.clone())
        .chain(variable_queries(&dashboard));
    for expr in all_exprs {
        ensure!(!expr.trim().is_empty(), "a dashboard query is empty");
        let names = metric_names(&expr);
        ensure!(!names.is_empty(), "{expr:?} queries no weir_ metric");
        for name in names {
            ensure!(
                METRIC_NAMES.contains(&name.as_str()),
                "the dashboard queries {name}, which Weir does not emit (telemetry::METRIC_NAMES), in {expr:?}"
            );
            used.insert(name);
        }
    }
    for required in REQUIRED {
        ensure!(used.contains(*required), "no panel shows {required}");
    }
    // Every drawing panel has a query and uses the provisioned datasource (by its fixed uid).
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        if panel["type"] == "row" {
            continue;
        }
        let title = panel["title"].as_str().unwrap_or_default();
        ensure!(
            panel["targets"].as_array().is_some_and(|t| !t.is_empty()),
            "panel {title:?} has no query"
        );
        ensure!(
            panel["datasource"]["uid"] == "prometheus",
            "panel {title:?} does not use the provisioned datasource"
        );
    }
    let provisioning = std::fs::read_to_string(
        repo_root().join("deploy/grafana/provisioning/datasources/prometheus.yaml"),
    )
    .context("reading the datasource provisioning")?;
    ensure!(
        provisioning.contains("uid: prometheus"),
        "the provisioned datasource's uid is not `prometheus`"
    );
    Ok(())
}

#[test]
fn metric_names_are_extracted_from_promql() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le) (rate(weir_invocation_duration_seconds_bucket{function=~"x"}[5m]))) / weir_lane_paused"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        vec![
            "weir_invocation_duration_seconds".to_owned(),
            "weir_lane_paused".to_owned()
        ]
    );
    assert!(metric_names("sum(rate(xweir_foo[1m]))").is_empty());
    assert!(concrete("rate(weir_x[$__interval])").is_err());
}

/// A Prometheus server on a free loopback port, its storage in a temp dir; killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Start it scraping `target`'s `/metrics` every [`SCRAPE_INTERVAL`].
    fn start(target: SocketAddr) -> anyhow::Result<Prometheus> {
        let bin = std::env::var_os("WEIR_PROMETHEUS").unwrap_or_else(|| "prometheus".into());
        let dir = tempfile::Builder::new()
            .prefix("weir-prometheus-")
            .tempdir()
            .context("creating a temp dir")?;
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: {SCRAPE_INTERVAL}\n  scrape_timeout: {SCRAPE_INTERVAL}\n  evaluation_interval: {SCRAPE_INTERVAL}\n\
                 scrape_configs:\n  - job_name: weir\n    metrics_path: /metrics\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .context("writing prometheus.yml")?;
        let port = free_port().context("finding a free port")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let log = std::fs::File::create(dir.path().join("prometheus.log"))
            .context("creating the log file")?;
        let child = Command::new(&bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("opening the log file")?)
            .stderr(log)
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => anyhow::anyhow!(
                    "prometheus is not installed ({}): `apt-get install -y prometheus` (make tools does it), or set WEIR_PROMETHEUS",
                    bin.to_string_lossy()
                ),
                _ => anyhow::Error::new(e).context(format!("starting {}", bin.to_string_lossy())),
            })?;
        Ok(Prometheus { child, addr, dir })
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Wait until it answers `/-/ready` and has scraped the target successfully once.
    async fn wait_scraping(&mut self, client: &reqwest::Client) -> anyhow::Result<()> {
        let deadline = Instant::now() + PROMETHEUS_READY;
        loop {
            if let Some(status) = self.child.try_wait().context("polling prometheus")? {
                bail!(
                    "prometheus exited with {status}; its log:\n{}",
                    self.log_text()
                );
            }
            if let Ok(result) = self.query(client, r#"up{job="weir"} == 1"#).await {
                if !result.is_empty() {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "prometheus did not scrape weir within {PROMETHEUS_READY:?}; its log:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// An instant query through the HTTP API; the `result` vector.
    async fn query(&self, client: &reqwest::Client, expr: &str) -> anyhow::Result<Vec<Value>> {
        let url = format!("http://{}/api/v1/query", self.addr);
        let answer: Value = client
            .get(&url)
            .query(&[("query", expr)])
            .send()
            .await
            .with_context(|| format!("GET {url}"))?
            .json()
            .await
            .with_context(|| format!("reading the answer of {expr:?}"))?;
        ensure!(
            answer["status"] == "success",
            "query {expr:?} failed: {answer}"
        );
        ensure!(
            answer["data"]["resultType"] == "vector",
            "query {expr:?} is not an instant vector: {answer}"
        );
        Ok(answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Posts events to the load topics until stopped (or for at most `limit`).
fn start_load(
    weir: &InProcess,
    stop: Arc<AtomicBool>,
    limit: Duration,
) -> tokio::task::JoinHandle<anyhow::Result<u64>> {
    let client = weir.client().clone();
    let base = weir.base_url();
    tokio::spawn(async move {
        let deadline = Instant::now() + limit;
        let accepted = AtomicU64::new(0);
        let mut round: u64 = 0;
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            round += 1;
            for topic in [
                "load.echo",
                "load.echo",
                "load.flaky",
                "load.exhausted",
                "load.reject",
            ] {
                let status = client
                    .post(format!("{base}/v1/topics/{topic}"))
                    .header("content-type", "application/json")
                    .body(format!(r#"{{"round":{round}}}"#))
                    .send()
                    .await
                    .with_context(|| format!("POST /v1/topics/{topic}"))?
                    .status();
                // 503 is the memory bus refusing a full backlog: load shedding, not a failure.
                ensure!(
                    status.as_u16() == 202 || status.as_u16() == 503,
                    "POST /v1/topics/{topic}: {status}"
                );
                if status.as_u16() == 202 {
                    accepted.fetch_add(1, Ordering::Relaxed);
                }
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        Ok(accepted.load(Ordering::Relaxed))
    })
}

/// Fill `dlq.stuck` past `max_pending`, then wait until `stuck` reports its lane paused.
async fn pause_the_stuck_lane(weir: &InProcess) -> anyhow::Result<()> {
    for n in 0..MAX_PENDING + 8 {
        let (status, body) = weir
            .post(
                "load.stuck",
                &[("content-type", "application/json")],
                format!(r#"{{"n":{n}}}"#),
            )
            .await?;
        ensure!(
            status == 202 || status == 503,
            "POST load.stuck: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let deadline = Instant::now() + DLQ_PAUSE;
    loop {
        let view = weir.get_json("/v1/functions").await?;
        let stuck = view["functions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|f| f["name"] == "stuck")
            .cloned()
            .context("no function `stuck` in /v1/functions")?;
        if stuck["dead_letter_paused"] == true {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("the stuck lane did not pause within {DLQ_PAUSE:?}: {stuck:#}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether a result vector has at least one finite sample (a quantile over an empty window is
/// NaN: present, but nothing to draw).
fn has_finite_sample(result: &[Value]) -> bool {
    result.iter().any(|series| {
        series["value"][1]
            .as_str()
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(f64::is_finite)
    })
}

fn label_values(result: &[Value], label: &str) -> BTreeSet<String> {
    result
        .iter()
        .filter_map(|s| s["metric"][label].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_shows_data_from_a_real_prometheus() -> anyhow::Result<()> {
    let started = Instant::now();
    let dashboard = load_dashboard()?;
    let queries = panel_queries(&dashboard);
    let weir = InProcess::start(CONFIG).await?;
    let mut prometheus = Prometheus::start(weir.addr())?;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    prometheus.wait_scraping(&client).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(&weir, stop.clone(), Duration::from_secs(45));
    pause_the_stuck_lane(&weir).await?;

    // Evaluate every panel's query until each has something to draw; report all that never do.
    let deadline = Instant::now() + EVALUATE;
    let mut missing: Vec<String>;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        missing = Vec::new();
        for q in queries.iter() {
            let expr = concrete(&q.expr)?;
            let result = prometheus.query(&client, &expr).await?;
            if !has_finite_sample(&result) {
                missing.push(format!(
                    "{} [{}]: {expr} → {}",
                    q.panel,
                    q.ref_id,
                    Value::Array(result)
                ));
            }
        }
        for variable in variable_queries(&dashboard) {
            // label_values(metric, label) is Grafana's; the series behind it must exist.
            let metric = metric_names(&variable)
                .into_iter()
                .next()
                .unwrap_or_default();
            if prometheus.query(&client, &metric).await?.is_empty() {
                missing.push(format!("variable {variable}: no series of {metric}"));
            }
        }
        if missing.is_empty() || Instant::now() >= deadline {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let accepted = load.await.context("the load task panicked")??;
    ensure!(
        missing.is_empty(),
        "after {:?} of load ({accepted} events accepted), these panel queries still return no data:\n{}\nprometheus log:\n{}",
        started.elapsed(),
        missing.join("\n"),
        prometheus.log_text()
    );

    // The data is the load's, not just any series: the labels the panels group by.
    let outcomes = prometheus
        .query(&client, r#"sum by (outcome) (weir_invocations_total)"#)
        .await?;
    let outcomes = label_values(&outcomes, "outcome");
    for outcome in ["success", "retry", "reject"] {
        ensure!(
            outcomes.contains(outcome),
            "no invocation outcome {outcome:?} scraped: {outcomes:?}"
        );
    }
    let reasons = label_values(
        &prometheus
            .query(&client, "sum by (reason) (weir_dead_letters_total)")
            .await?,
        "reason",
    );
    for reason in ["rejected", "retries-exhausted"] {
        ensure!(
            reasons.contains(reason),
            "no dead letters with reason {reason:?} scraped: {reasons:?}"
        );
    }
    let paused = prometheus.query(&client, "weir_lane_paused > 0").await?;
    ensure!(
        label_values(&paused, "function").contains("stuck"),
        "the stuck lane is not shown as paused: {}",
        Value::Array(paused)
    );
    let dlq_failures = prometheus
        .query(&client, "weir_dlq_publish_failures_total > 0")
        .await?;
    ensure!(
        label_values(&dlq_failures, "function").contains("stuck"),
        "no DLQ publish failures for stuck"
    );

    drop(prometheus);
    tokio::time::timeout(Duration::from_secs(15), weir.shutdown())
        .await
        .context("weir did not shut down within 15 s")??;
    ensure!(
        started.elapsed() < Duration::from_secs(60),
        "the test took {:?}",
        started.elapsed()
    );
    Ok(())
}
