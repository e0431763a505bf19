//! The live status page (`GET /`) as a person sees it: headless Chromium loads it from a real
//! Weir (in process, on the memory bus) under load, runs its JavaScript for a few seconds of
//! virtual time, and the test reads the resulting DOM: every function is shown, its counters
//! are the non-zero counts of the load, lag and rates are numbers, and a failure's reason (the
//! `reject-all` function's message) is on the page. A second run takes a screenshot.
//!
//! The screenshot goes to a temp file; with `WEIR_UPDATE_SCREENSHOTS=1` it also replaces
//! `docs/screenshots/status.png` (the picture in docs/stack.md).
//!
//! Needs Chromium (Debian package `chromium`, installed by `make tools`; `WEIR_CHROMIUM`
//! overrides the binary) and `make functions`. Fails, never skips, when Chromium is missing.

use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use serde_json::Value;
use weir_tests::weir::{repo_root, InProcess};

const CONFIG: &str = r#"
[defaults]
timeout = "2s"

[defaults.trigger]
broker = "memory"
ordering = "none"

[defaults.scaling]
min = 1
max = 4

[[functions]]
name = "echo"
module = "echo.wasm"
outputs = ["echo.out"]
[functions.trigger]
topic = "status.echo"

[[functions]]
name = "flaky"
module = "flaky.wasm"
outputs = ["flaky.out"]
config = { fail_attempts = "1" }
[functions.trigger]
topic = "status.flaky"
[functions.retry]
max_attempts = 3
initial_delay = "20ms"

[[functions]]
name = "reject-all"
module = "reject_all.wasm"
[functions.trigger]
topic = "status.reject"
"#;

const FUNCTIONS: [&str; 3] = ["echo", "flaky", "reject-all"];

/// The reason `reject-all` gives for every event (functions/testing/reject-all).
const REJECT_REASON: &str = "rejected by test";

/// Bound on one Chromium run (it normally takes a few seconds).
const CHROMIUM_TIMEOUT: Duration = Duration::from_secs(60);
const WARM_UP: Duration = Duration::from_secs(20);

/// Chromium with the flags that make it work headless in a container and talk to nothing but
/// the page's origin.
async fn chromium(extra: &[OsString], url: &str) -> anyhow::Result<std::process::Output> {
    let bin = std::env::var_os("WEIR_CHROMIUM").unwrap_or_else(|| "chromium".into());
    let profile = tempfile::Builder::new()
        .prefix("weir-chromium-")
        .tempdir()
        .context("creating a profile dir")?;
    let mut command = tokio::process::Command::new(&bin);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => anyhow::anyhow!(
            "chromium is not installed ({}): `apt-get install -y chromium` (make tools does it), or set WEIR_CHROMIUM",
            bin.to_string_lossy()
        ),
        _ => anyhow::Error::new(e).context(format!("starting {}", bin.to_string_lossy())),
    })?;
    let output = tokio::time::timeout(CHROMIUM_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| anyhow::anyhow!("chromium did not finish within {CHROMIUM_TIMEOUT:?}"))?
        .context("waiting for chromium")?;
    ensure!(
        output.status.success(),
        "chromium failed with {}:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(output)
}

/// Posts to the three topics until stopped (at most `limit`).
fn start_load(
    weir: &InProcess,
    stop: Arc<AtomicBool>,
    limit: Duration,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let client = weir.client().clone();
    let base = weir.base_url();
    tokio::spawn(async move {
        let deadline = Instant::now() + limit;
        let mut n: u64 = 0;
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            n += 1;
            let topics: &[&str] = if n.is_multiple_of(4) {
                &["status.echo", "status.flaky", "status.reject"]
            } else {
                &["status.echo", "status.echo", "status.flaky"]
            };
            for topic in topics {
                let response = client
                    .post(format!("{base}/v1/topics/{topic}"))
                    .header("content-type", "application/json")
                    .body(format!(r#"{{"order":{n},"amount":{}}}"#, n * 7 % 500))
                    .send()
                    .await
                    .with_context(|| format!("POST /v1/topics/{topic}"))?;
                ensure!(
                    response.status().as_u16() == 202,
                    "POST /v1/topics/{topic}: {}",
                    response.status()
                );
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        Ok(())
    })
}

/// Wait until every function has received events and `reject-all` has a recorded failure.
async fn wait_for_activity(weir: &InProcess) -> anyhow::Result<()> {
    let deadline = Instant::now() + WARM_UP;
    loop {
        let view = weir.get_json("/v1/functions").await?;
        let functions = view["functions"].as_array().cloned().unwrap_or_default();
        let ready = FUNCTIONS.iter().all(|name| {
            functions
                .iter()
                .any(|f| f["name"] == *name && f["counters"]["received"].as_u64().unwrap_or(0) > 0)
        }) && functions.iter().any(|f| {
            f["recent_failures"].as_array().is_some_and(|fs| {
                fs.iter()
                    .any(|x| x["error"].as_str().unwrap_or("").contains(REJECT_REASON))
            })
        });
        if ready {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("no activity on every function within {WARM_UP:?}: {view:#}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The HTML of the card of `function`: from its `<section ... data-function="name">` to the
/// next card (or the end of `<main>`).
fn card<'a>(dom: &'a str, function: &str) -> anyhow::Result<&'a str> {
    let marker = format!(r#"data-function="{function}""#);
    let start = dom
        .find(&marker)
        .with_context(|| format!("no card for {function} in the page:\n{dom}"))?;
    let rest = &dom[start..];
    let end = rest[marker.len()..]
        .find("data-function=\"")
        .map(|i| i + marker.len())
        .or_else(|| rest.find("</main>"))
        .unwrap_or(rest.len());
    Ok(&rest[..end])
}

/// The `data-value` of the element with `data-counter="name"` inside `html`.
fn counter(html: &str, name: &str) -> anyhow::Result<u64> {
    let marker = format!(r#"data-counter="{name}""#);
    let at = html
        .find(&marker)
        .with_context(|| format!("no counter {name} in:\n{html}"))?;
    let tag_end = html[at..].find('>').map_or(html.len(), |i| at + i);
    let tag = &html[at..tag_end];
    let value = tag
        .split("data-value=\"")
        .nth(1)
        .and_then(|v| v.split('"').next())
        .with_context(|| format!("counter {name} has no data-value: {tag}"))?;
    value
        .parse()
        .with_context(|| format!("counter {name}: {value:?} is not a number"))
}

/// The text of the first element with `data-field="name"` inside `html`.
fn field<'a>(html: &'a str, name: &str) -> anyhow::Result<&'a str> {
    let marker = format!(r#"data-field="{name}""#);
    let at = html
        .find(&marker)
        .with_context(|| format!("no field {name} in:\n{html}"))?;
    let open_end = html[at..]
        .find('>')
        .map(|i| at + i + 1)
        .context("unterminated tag")?;
    let close = html[open_end..]
        .find('<')
        .map_or(html.len(), |i| open_end + i);
    Ok(html[open_end..close].trim())
}

fn is_number(text: &str) -> bool {
    !text.is_empty()
        && text
            .replace([',', '.'], "")
            .chars()
            .all(|c| c.is_ascii_digit())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_live_functions_counts_and_failures() -> anyhow::Result<()> {
    let weir = InProcess::start(CONFIG).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let load = start_load(&weir, stop.clone(), Duration::from_secs(50));
    wait_for_activity(&weir).await?;
    let url = format!("{}/", weir.base_url());

    // The page as served: self-contained.
    let html = weir.client().get(&url).send().await?.text().await?;
    ensure!(
        html.contains("<title>Weir · status</title>"),
        "GET / is not the status page:\n{html}"
    );

    let dump = chromium(
        &["--dump-dom".into(), "--virtual-time-budget=5000".into()],
        &url,
    )
    .await?;
    let dom = String::from_utf8(dump.stdout).context("the DOM is not UTF-8")?;
    ensure!(
        dom.contains(r#"class="conn live""#),
        "the page did not reach the API:\n{dom}"
    );
    for function in FUNCTIONS {
        let html = card(&dom, function)?;
        ensure!(
            html.contains(&format!("<h2>{function}</h2>")),
            "the card of {function} has no title:\n{html}"
        );
        ensure!(
            counter(html, "received")? > 0,
            "{function} shows no received events:\n{html}"
        );
        ensure!(
            is_number(field(html, "lag")?),
            "{function} shows no lag:\n{html}"
        );
        ensure!(
            is_number(field(html, "rate")?),
            "{function} shows no rate:\n{html}"
        );
        ensure!(
            field(html, "instances")?.contains(" / "),
            "{function} shows no instances:\n{html}"
        );
        ensure!(
            html.contains(r#"data-spark="rate""#) && html.contains("<path"),
            "{function} has no sparkline:\n{html}"
        );
    }
    let echo = card(&dom, "echo")?;
    ensure!(
        counter(echo, "succeeded")? > 0 && counter(echo, "outputs")? > 0,
        "echo shows no successes:\n{echo}"
    );
    ensure!(
        counter(card(&dom, "flaky")?, "retried")? > 0,
        "flaky shows no retries"
    );
    let reject = card(&dom, "reject-all")?;
    ensure!(
        counter(reject, "dead_lettered")? > 0,
        "reject-all shows no dead letters:\n{reject}"
    );
    ensure!(
        reject.contains("data-failure") && reject.contains(REJECT_REASON),
        "reject-all's failure reason {REJECT_REASON:?} is not on the page:\n{reject}"
    );
    ensure!(
        !dom.contains(r#"id="total-received">–<"#),
        "the header shows no totals:\n{dom}"
    );

    // A screenshot after ~20 polls, so the sparklines have a history.
    let shots = tempfile::Builder::new().prefix("weir-status-").tempdir()?;
    let shot = shots.path().join("status.png");
    chromium(
        &[
            format!("--screenshot={}", shot.display()).into(),
            "--window-size=1280,900".into(),
            "--virtual-time-budget=20000".into(),
        ],
        &url,
    )
    .await?;
    let png = std::fs::read(&shot)
        .with_context(|| format!("chromium wrote no screenshot at {}", shot.display()))?;
    ensure!(
        png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "the screenshot is not a PNG"
    );
    ensure!(
        png.len() > 20_000,
        "the screenshot is suspiciously small ({} bytes): a blank page?",
        png.len()
    );
    if std::env::var_os("WEIR_UPDATE_SCREENSHOTS").is_some_and(|v| v == "1") {
        let target = repo_root().join("docs/screenshots/status.png");
        std::fs::create_dir_all(target.parent().unwrap_or(Path::new(".")))?;
        std::fs::write(&target, &png).with_context(|| format!("writing {}", target.display()))?;
    }

    stop.store(true, Ordering::Relaxed);
    load.await.context("the load task panicked")??;
    let _: Value = weir.get_json("/v1/functions").await?;
    tokio::time::timeout(Duration::from_secs(15), weir.shutdown())
        .await
        .context("weir did not shut down within 15 s")??;
    Ok(())
}

#[test]
fn dom_helpers_read_what_the_page_renders() -> anyhow::Result<()> {
    let dom = r#"<main><section class="fn" data-function="a"><h2>a</h2><b data-field="lag">12</b>
        <dd data-counter="received" data-value="1234">1,234</dd></section>
        <section class="fn" data-function="b"><dd data-counter="received" data-value="0">0</dd></section></main>"#;
    assert_eq!(counter(card(dom, "a")?, "received")?, 1234);
    assert_eq!(counter(card(dom, "b")?, "received")?, 0);
    assert_eq!(field(card(dom, "a")?, "lag")?, "12");
    assert!(card(dom, "c").is_err());
    assert!(is_number("1,234") && is_number("0.25") && !is_number("–"));
    Ok(())
}
