//! The real `weir` binary: `weir check` and `weir run` on good and bad configurations, and the
//! demo pipeline of `weir up` driven by `weir publish` and `weir tail`.
//!
//! Needs `make functions` and `cargo build -p weir-dispatcher --bin weir` first (the harness
//! says so when they are missing). Every command runs with a bound.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use serde_json::Value;
use weir_tests::weir::{functions_dir, run_weir, CommandOutput, WeirUp};

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

/// Every problem line of `weir check`'s report: `  <path>: <message>`.
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

    let output = run_weir(
        ["tail", "orders.enriched", "--limit", "1", "--http", &http],
        CLIENT_TIMEOUT,
    )
    .await?;
    ensure!(
        output.code == Some(0),
        "tail failed: {output:?}\nweir up log:\n{}",
        up.log_text()
    );
    let events = json_lines(&output)?;
    assert_eq!(events.len(), 1, "{output:?}");
    let enriched = &events[0];
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
    let output = run_weir(
        ["tail", "db.audit", "--limit", "1", "--http", &http],
        CLIENT_TIMEOUT,
    )
    .await?;
    ensure!(
        output.code == Some(0),
        "tail failed: {output:?}\nweir up log:\n{}",
        up.log_text()
    );
    let events = json_lines(&output)?;
    assert_eq!(events.len(), 1, "{output:?}");
    assert_eq!(events[0]["type"], "weir.db.audit");
    assert_eq!(
        events[0]["data"],
        serde_json::json!({"table": "public.stock", "op": "update", "key": null, "changed": ["qty"]})
    );
    assert_eq!(events[0]["weirhops"], "1");
    Ok(())
}
