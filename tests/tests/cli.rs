//! The real `weir` binary: `weir check` and `weir run` on good and bad configurations, and the
//! demo pipeline of `weir up` driven by `weir publish` and `weir tail`, on the memory bus and on
//! a real `nats-server -js` (`weir up --nats`, `publish --nats [--core]`, `tail --nats`).
//!
//! Needs `make functions` and `cargo build -p weir-dispatcher --bin weir` first (the harness
//! says so when they are missing). Every command runs with a bound.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use serde_json::Value;
use weir_tests::nats_server::NatsServer;
use weir_tests::weir::{functions_dir, run_weir, weir_bin, CommandOutput, WeirUp};

/// `weir check` compiles every component (Cranelift, debug build, shared machine).
const CHECK_TIMEOUT: Duration = Duration::from_secs(120);
/// `weir publish` / `weir tail` against a running weir.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

fn function(name: &str, module: &Path, topic: &str, extra: &str) -> String {
    format!(
        "\n[[functions]]\nname = \"{name}\"\nmodule = \"{}\"\noutputs = [\"{name}.out\"]\n{extra}\n[functions.trigger]\nbroker = \"memory\"\ntopic = \"{topic}\"\n",
        module.display()
    )
}

fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<std::path::PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// `weir check -c CONFIG`.
async fn weir_check(config: &Path) -> anyhow::Result<CommandOutput> {
    run_weir(
        ["check", "-c"]
            .iter()
            .map(Into::into)
            .chain([config.as_os_str().to_owned()]),
        CHECK_TIMEOUT,
    )
    .await
}

/// Every problem line of `weir check`'s report: `  <path>: <message>`.
fn problem_lines(output: &CommandOutput) -> Vec<(String, String)> {
    output
        .stderr
        .lines()
        .filter_map(|line| line.strip_prefix("  "))
        .filter_map(|line| line.split_once(": "))
        .map(|(path, message)| (path.to_owned(), message.to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_accepts_a_valid_config_and_lists_every_problem_of_bad_ones() -> anyhow::Result<()> {
    let functions = functions_dir()?;
    let dir = tempfile::tempdir()?;

    let valid = format!(
        "{}{}",
        function("echo", &functions.join("echo.wasm"), "echo.in", ""),
        function(
            "flaky",
            &functions.join("flaky.wasm"),
            "flaky.in",
            "config = { fail_attempts = \"1\" }"
        )
    );
    let valid = write(dir.path(), "valid.toml", &valid)?;
    let output = weir_check(&valid).await?;
    assert_eq!(output.code, Some(0), "{output:?}");
    assert!(output.stdout.contains("ok (2 functions)"), "{output:?}");

    // The documented example, with every key, stays a valid configuration.
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/weir.example.toml");
    let output = weir_check(&example).await?;
    assert_eq!(output.code, Some(0), "deploy/weir.example.toml: {output:?}");

    // Parse problems: reported together, each with its key path. A config that does not parse
    // is never instantiated, so module *world* checks cannot run on it: that problem needs a
    // second config (below).
    let parse_problems = format!(
        "{}{}{}",
        function(
            "unknown-key",
            &functions.join("echo.wasm"),
            "a.in",
            "colour = \"red\""
        ),
        function(
            "bad-duration",
            &functions.join("echo.wasm"),
            "b.in",
            "timeout = \"5 parsecs\""
        ),
        function(
            "missing-module",
            &dir.path().join("no-such-module.wasm"),
            "c.in",
            ""
        )
    );
    let bad = write(dir.path(), "bad.toml", &parse_problems)?;
    let output = weir_check(&bad).await?;
    assert_eq!(output.code, Some(2), "{output:?}");
    let problems = problem_lines(&output);
    assert_eq!(problems.len(), 3, "exactly the three problems: {output:?}");
    assert!(output.stderr.contains("3 problems"), "{output:?}");
    assert_eq!(problems[0].0, "functions[0].colour");
    assert!(
        problems[0].1.contains("unknown field `colour`"),
        "{problems:?}"
    );
    assert_eq!(problems[1].0, "functions[1].timeout");
    assert!(problems[1].1.contains("5 parsecs"), "{problems:?}");
    assert_eq!(problems[2].0, "functions[2].module");
    assert!(
        problems[2].1.contains("no-such-module.wasm") && problems[2].1.contains("does not exist"),
        "{problems:?}"
    );

    // A component that is valid but is a `wasi:cli/run` program, not a weir function.
    let wrong_world = format!(
        "{}{}",
        function("echo", &functions.join("echo.wasm"), "echo.in", ""),
        function(
            "not-a-function",
            &functions.join("not_a_function.wasm"),
            "d.in",
            ""
        )
    );
    let wrong_world = write(dir.path(), "wrong-world.toml", &wrong_world)?;
    let output = weir_check(&wrong_world).await?;
    assert_eq!(output.code, Some(2), "{output:?}");
    let problems = problem_lines(&output);
    assert_eq!(problems.len(), 1, "{output:?}");
    assert_eq!(problems[0].0, "functions[1].module");
    assert!(
        problems[0]
            .1
            .contains("does not implement the weir:function world"),
        "{problems:?}"
    );
    assert!(
        problems[0].1.contains("weir:function/handler"),
        "names the missing export: {problems:?}"
    );

    // `weir run` refuses both bad configs before serving, listing the same problems.
    for (config, expected) in [
        (
            &bad,
            vec![
                "functions[0].colour",
                "functions[1].timeout",
                "functions[2].module",
            ],
        ),
        (&wrong_world, vec!["functions[1].module"]),
    ] {
        let output = run_weir(
            ["run", "-c"]
                .iter()
                .map(Into::into)
                .chain([config.as_os_str().to_owned()]),
            CHECK_TIMEOUT,
        )
        .await?;
        assert_ne!(output.code, Some(0), "{output:?}");
        assert!(output.code.is_some(), "it exits by itself: {output:?}");
        assert!(output.stderr.contains("is not valid"), "{output:?}");
        for path in expected {
            assert!(
                output.stderr.contains(&format!("{path}: ")),
                "{path} listed: {output:?}"
            );
        }
    }
    Ok(())
}

/// The JSON lines `weir tail` printed.
fn json_lines(output: &CommandOutput) -> anyhow::Result<Vec<Value>> {
    output
        .stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("not a JSON line: {l}")))
        .collect()
}

/// `weir tail ARGS --limit 1`: what it printed and the one event, or an error with the log of
/// the `weir up` it read from.
async fn tail_one(up: &WeirUp, args: &[&str]) -> anyhow::Result<(CommandOutput, Value)> {
    let output = run_weir(
        ["tail"].iter().chain(args).chain(&["--limit", "1"]),
        CLIENT_TIMEOUT,
    )
    .await?;
    ensure!(
        output.code == Some(0),
        "tail failed: {output:?}\nweir up log:\n{}",
        up.log_text()
    );
    let mut events = json_lines(&output)?;
    ensure!(events.len() == 1, "one event expected: {output:?}");
    let event = events.remove(0);
    Ok((output, event))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_up_publish_and_tail() -> anyhow::Result<()> {
    let up = WeirUp::start()?;
    let http = up.addr().to_string();

    let output = run_weir(
        [
            "publish",
            "orders",
            "--type",
            "com.example.order",
            "--data",
            r#"{"id":"o-1","amount":42}"#,
            "--http",
            &http,
        ],
        CLIENT_TIMEOUT,
    )
    .await?;
    ensure!(
        output.code == Some(0),
        "publish failed: {output:?}\nweir up log:\n{}",
        up.log_text()
    );
    let accepted: Value =
        serde_json::from_str(output.stdout.trim()).context("publish prints the 202 answer")?;
    assert_eq!(accepted["topic"], "orders");

    let (_, enriched) = tail_one(&up, &["orders.enriched", "--http", &http]).await?;
    assert_eq!(enriched["type"], "weir.order.enriched");
    assert_eq!(enriched["weirhops"], "2");
    assert_eq!(enriched["data"]["id"], "o-1");
    assert_eq!(enriched["data"]["amount"], 42);
    assert_eq!(enriched["data"]["tier"], "small");
    assert_eq!(enriched["data"]["currency"], "EUR");

    let dir = tempfile::tempdir()?;
    let fixture = write(
        dir.path(),
        "change.json",
        r#"{"schema":{"type":"struct"},"payload":{"before":{"id":7,"qty":1},"after":{"id":7,"qty":3},"source":{"db":"shop","schema":"public","table":"stock"},"op":"u","ts_ms":1700000000000}}"#,
    )?;
    let output = run_weir(
        ["publish", "db.changes", "--file"]
            .iter()
            .map(Into::into)
            .chain([
                fixture.as_os_str().to_owned(),
                "--http".into(),
                http.clone().into(),
            ]),
        CLIENT_TIMEOUT,
    )
    .await?;
    ensure!(output.code == Some(0), "publish --file failed: {output:?}");
    let (_, audit) = tail_one(&up, &["db.audit", "--http", &http]).await?;
    assert_eq!(audit["type"], "weir.db.audit");
    assert_eq!(
        audit["data"],
        serde_json::json!({"table": "public.stock", "op": "update", "key": null, "changed": ["qty"]})
    );
    assert_eq!(audit["weirhops"], "1");
    Ok(())
}

/// `weir publish ... --nats URL [--core]`; fails unless it exits 0.
async fn publish_nats(url: &str, topic: &str, data: &str, core: bool) -> anyhow::Result<Value> {
    let mut args = vec![
        "publish",
        topic,
        "--type",
        "com.example.order",
        "--data",
        data,
        "--nats",
        url,
    ];
    if core {
        args.push("--core");
    }
    let output = run_weir(&args, CLIENT_TIMEOUT).await?;
    ensure!(output.code == Some(0), "publish failed: {output:?}");
    serde_json::from_str(output.stdout.trim()).context("publish prints what it published")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_up_on_nats_publish_and_tail() -> anyhow::Result<()> {
    let server = NatsServer::start()?;
    let url = server.url();
    let up = WeirUp::start_with(&["--nats", &url])?;
    let log = up.log_text();
    ensure!(
        log.contains(&format!("weir tail orders.enriched --limit 1 --nats {url}")),
        "the banner's commands go to the demo's broker:\n{log}"
    );

    // JetStream: published (confirmed) before the tail starts, read from the stream's history.
    let accepted = publish_nats(&url, "orders", r#"{"id":"o-1","amount":42}"#, false).await?;
    assert_eq!(accepted["broker"], "jetstream", "{accepted}");
    let (output, enriched) = tail_one(&up, &["orders.enriched", "--nats", &url]).await?;
    ensure!(
        output
            .stderr
            .contains("from the first message stream WEIR_DEMO_ORDERS holds"),
        "{output:?}"
    );
    assert_eq!(enriched["type"], "weir.order.enriched");
    assert_eq!(enriched["weirhops"], "2");
    assert_eq!(enriched["data"]["id"], "o-1");
    assert_eq!(enriched["data"]["tier"], "small");

    // A rejected order: its dead-letter record, read back the same way.
    let accepted = publish_nats(&url, "orders", r#"{"id":"o-2"}"#, false).await?;
    let (_, record) = tail_one(&up, &["weir.dlq.order-validate", "--nats", &url]).await?;
    assert_eq!(record["id"], accepted["ids"][0], "{record}");
    assert_eq!(record["weirdlqreason"], "rejected");
    assert_eq!(record["weirdlqfunction"], "order-validate");

    // Reading a JetStream topic through the weir's HTTP server is refused with where to look,
    // instead of waiting for ever on an empty memory-bus topic.
    let http = up.addr().to_string();
    let output = run_weir(
        ["tail", "orders.enriched", "--limit", "1", "--http", &http],
        CLIENT_TIMEOUT,
    )
    .await?;
    assert_eq!(output.code, Some(1), "{output:?}");
    ensure!(
        output.stderr.contains("409")
            && output.stderr.contains("is on jetstream")
            && output.stderr.contains("--nats URL"),
        "{output:?}"
    );
    Ok(())
}

/// Core NATS through the CLI: every `weir publish --core` reaches a `weir tail` that was
/// following the subject, though each publisher exits right after publishing (core publishes
/// are only queued on the connection until it is flushed). On a JetStream server whose
/// streams do not capture the subject, and on a server without JetStream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_nats_publish_and_tail_lose_nothing() -> anyhow::Result<()> {
    let with_jetstream = NatsServer::start()?;
    core_publish_and_tail(&with_jetstream.url())
        .await
        .context("on a server with JetStream")?;
    let core_only = NatsServer::start_core_only()?;
    core_publish_and_tail(&core_only.url())
        .await
        .context("on a server without JetStream")
}

async fn core_publish_and_tail(url: &str) -> anyhow::Result<()> {
    use tokio::io::AsyncBufReadExt as _;

    let mut tail = tokio::process::Command::new(weir_bin()?)
        .args(["tail", "cli.core", "--limit", "5", "--nats", url])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting weir tail")?;
    let stderr = tail.stderr.take().context("tail's stderr")?;
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    // The tail says it is following only once the server registered its subscription.
    let ready = tokio::time::timeout(CLIENT_TIMEOUT, async {
        let mut said = Vec::new();
        while let Some(line) = lines.next_line().await? {
            if line.contains("following core subject cli.core") {
                return Ok(());
            }
            said.push(line);
        }
        anyhow::bail!(
            "weir tail ended before following the subject:\n{}",
            said.join("\n")
        )
    })
    .await
    .context("weir tail did not start following in time")?;
    ready?;

    let mut ids = Vec::new();
    for n in 0..5 {
        let accepted = publish_nats(url, "cli.core", &format!(r#"{{"n":{n}}}"#), true).await?;
        assert_eq!(accepted["broker"], "nats", "{accepted}");
        ids.push(accepted["ids"][0].clone());
    }
    let output = tokio::time::timeout(CLIENT_TIMEOUT, tail.wait_with_output())
        .await
        .context("weir tail did not see 5 events in time: core publishes were lost")??;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let seen: Vec<Value> = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("not JSON lines: {stdout}"))?;
    let seen_ids: Vec<Value> = seen.iter().map(|e| e["id"].clone()).collect();
    assert_eq!(seen_ids, ids, "core NATS keeps one publisher's order");
    for (n, event) in seen.iter().enumerate() {
        assert_eq!(event["data"]["n"], n, "{event}");
    }
    Ok(())
}
