//! The real `weir` binary: `weir check` and `weir run` on good and bad configurations, the
//! demo pipeline of `weir up` driven by `weir publish` and `weir tail`, on the memory bus and on
//! a real `nats-server -js` (`weir up --nats`, `publish --nats [--core]`, `tail --nats
//! [--last N]`), and `weir publish --kafka` / `weir tail --kafka [--last N]` on Tansu.
//!
//! Needs `make functions` and `cargo build -p weir-dispatcher --bin weir` first (the harness
//! says so when they are missing). Every command runs with a bound.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context as _};
use serde_json::Value;
use weir_broker_bridge::kafka::KafkaTransport;
use weir_tests::kafka_broker::{test_producer, KafkaBroker};
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
    let one = write(
        dir.path(),
        "one.toml",
        &function("echo", &functions.join("echo.wasm"), "echo.in", ""),
    )?;
    let output = weir_check(&one).await?;
    assert_eq!(output.code, Some(0), "{output:?}");
    assert!(output.stdout.contains("ok (1 function)"), "{output:?}");

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

    // Standard error whose reader has gone (`weir check … 2>&1 | head -1`): the same exit
    // code, not a panic on the first problem line. So for an error `main` reports.
    let code =
        exit_code_with_stderr_gone(&["check".as_ref(), "-c".as_ref(), bad.as_os_str()]).await?;
    assert_eq!(code, Some(2), "weir check with its stderr reader gone");
    let missing = dir.path().join("missing.toml");
    let code =
        exit_code_with_stderr_gone(&["run".as_ref(), "-c".as_ref(), missing.as_os_str()]).await?;
    assert_eq!(
        code,
        Some(2),
        "weir run with its stderr reader gone: a missing file is bad input"
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
        assert_eq!(output.code, Some(2), "bad input: {output:?}");
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

/// `weir up --print-config` writes a file that runs where it is saved: `weir run -c` reads a
/// relative module path against the file's directory, so the printed paths name where the
/// components are (they were bare file names, and the file failed `weir check` anywhere but
/// in the components' own directory). A `--functions` without them is an error, not a file
/// that cannot run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_printed_demo_configuration_runs_where_it_is_saved() -> anyhow::Result<()> {
    let functions = functions_dir()?;
    let dir = tempfile::tempdir()?;
    let print = |extra: &[&str]| {
        let mut args = vec!["up", "--nats", "nats://127.0.0.1:4222", "--print-config"];
        args.extend_from_slice(extra);
        let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        run_weir(args, CLIENT_TIMEOUT)
    };
    let functions_arg = functions.display().to_string();
    for extra in [&[][..], &["--functions", functions_arg.as_str()][..]] {
        let output = print(extra).await?;
        assert_eq!(output.code, Some(0), "{extra:?}: {output:?}");
        let modules: Vec<&str> = output
            .stdout
            .lines()
            .filter_map(|line| line.strip_prefix("module = "))
            .collect();
        assert_eq!(modules.len(), 4, "{output:?}");
        for module in modules {
            let path = module.trim_matches('"');
            assert!(
                Path::new(path).is_absolute() && Path::new(path).is_file(),
                "{extra:?}: {module} names the component where it is"
            );
        }
        let saved = write(dir.path(), "weir.toml", &output.stdout)?;
        let check = weir_check(&saved).await?;
        assert_eq!(check.code, Some(0), "{extra:?}: {check:?}");
        assert!(check.stdout.contains("ok (4 functions)"), "{check:?}");
    }

    let output = print(&["--functions", &dir.path().display().to_string()]).await?;
    assert_eq!(output.code, Some(1), "{output:?}");
    assert!(
        output
            .stderr
            .contains("does not contain the example components"),
        "{output:?}"
    );
    assert!(output.stdout.is_empty(), "{output:?}");
    Ok(())
}

/// `weir ARGS`, its standard error a pipe whose reader closed before it started (so every
/// write fails), bounded: its exit code.
async fn exit_code_with_stderr_gone(args: &[&std::ffi::OsStr]) -> anyhow::Result<Option<i32>> {
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    let mut child = tokio::process::Command::new(weir_bin()?)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(writer)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting weir {args:?}"))?;
    let status = tokio::time::timeout(CHECK_TIMEOUT, child.wait())
        .await
        .with_context(|| format!("weir {args:?} ended in time"))??;
    Ok(status.code())
}

/// Misuse exits 2, as clap's own usage errors and `weir check`'s invalid configurations do,
/// and is reported before anything is read or sent: `--rate` that no timer can pace (which
/// used to be found only after the body was read from stdin, and a rate of 1e300 made the
/// pacing timer panic), `--count 0`, `--limit 0` (which printed one event, or waited for
/// one), `--core` beside another broker, `--core` for a topic the `-c` configuration puts on
/// Kafka, a `-c` or `--file` that does not exist. A failure to do what was asked stays exit 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misuse_exits_2_before_anything_is_read_or_sent() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let kafka_only = write(
        dir.path(),
        "kafka-only.toml",
        "[brokers.kafka]\nbootstrap = \"127.0.0.1:9\"\n",
    )?;
    let kafka_only = kafka_only.to_str().context("a UTF-8 temp path")?;
    let missing = dir.path().join("missing.toml");
    let missing = missing.to_str().context("a UTF-8 temp path")?;
    // Functions whose dead letters cannot be redriven from outside: on the memory bus (inside
    // the weir that runs it), and on a core NATS subject (which keeps nothing).
    let unredrivable = write(
        dir.path(),
        "unredrivable.toml",
        "[brokers.nats]\nservers = [\"nats://127.0.0.1:9\"]\n\
         [[functions]]\nname = \"m\"\nmodule = \"absent.wasm\"\n\
         [functions.trigger]\nbroker = \"memory\"\ntopic = \"t\"\n\
         [[functions]]\nname = \"c\"\nmodule = \"absent.wasm\"\n\
         [functions.trigger]\nbroker = \"nats\"\ntopic = \"c.in\"\n\
         [[functions]]\nname = \"k\"\nmodule = \"absent.wasm\"\n\
         [functions.trigger]\nbroker = \"nats\"\ntopic = \"k.in\"\n\
         [functions.dead_letter]\nbroker = \"jetstream\"\n",
    )?;
    let unredrivable = unredrivable.to_str().context("a UTF-8 temp path")?;
    let cases: [(&[&str], &str); 22] = [
        (
            &["publish", "t", "--rate", "0"],
            "positive number of events",
        ),
        (
            &["publish", "t", "--rate", "-3"],
            "positive number of events",
        ),
        (
            &["publish", "t", "--rate", "NaN"],
            "positive number of events",
        ),
        (
            &["publish", "t", "--rate", "fast"],
            "give events per second",
        ),
        (&["publish", "t", "--rate", "1e300"], "cannot be paced"),
        (&["publish", "t", "--rate", "1e-300"], "cannot be paced"),
        (&["publish", "t", "--count", "0"], "--count"),
        (&["tail", "t", "--limit", "0"], "--limit"),
        (&["publish", "t", "--source", "s"], "--type"),
        (&["publish", "t", "--key", "k"], "--key without --type"),
        (
            &["publish", "t", "--key", "k", "--nats", "nats://127.0.0.1:9"],
            "--key without --type",
        ),
        (
            &["publish", "t", "--core", "--kafka", "127.0.0.1:9"],
            "cannot be used with",
        ),
        (
            &["tail", "t", "--core", "--http", "127.0.0.1:9"],
            "cannot be used with",
        ),
        (
            &["publish", "t", "--core", "-c", kafka_only],
            "--core is for NATS",
        ),
        (&["publish", "t", "-c", missing], "is not valid"),
        (&["publish", "t", "--file", missing], "reading --file"),
        (&["dlq", "redrive", "m"], "--config"),
        (
            &[
                "dlq",
                "redrive",
                "m",
                "-c",
                unredrivable,
                "--reason",
                "bored",
            ],
            "not a dead-letter reason",
        ),
        (
            &["dlq", "redrive", "x", "-c", unredrivable],
            "has no function \"x\" (it has: m, c, k)",
        ),
        (
            &["dlq", "redrive", "m", "-c", unredrivable],
            "embedded memory bus",
        ),
        (
            &["dlq", "redrive", "c", "-c", unredrivable],
            "keeps nothing to redrive",
        ),
        (
            &["dlq", "redrive", "k", "-c", unredrivable],
            "nobody confirms a core publish",
        ),
    ];
    for (args, says) in cases {
        // Standard input stays open and empty: a command that read it before checking its
        // arguments would wait here until the bound.
        let mut child = spawn_weir_with_stdin(args, std::process::Stdio::piped())?;
        let stdin = child.stdin.take();
        let output = tokio::time::timeout(CLIENT_TIMEOUT, child.wait_with_output())
            .await
            .with_context(|| format!("weir {args:?} ended without reading stdin"))??;
        drop(stdin);
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            output.status.code() == Some(2) && stderr.contains(says),
            "weir {args:?} exits 2 saying {says:?}: {output:?}"
        );
        ensure!(
            !stderr.contains("panicked"),
            "weir {args:?} does not panic: {stderr}"
        );
    }
    // What is asked may fail; that is exit 1, not misuse: nothing listens at this address.
    let output = run_weir(
        ["publish", "t", "--data", "{}", "--http", "127.0.0.1:9"],
        CLIENT_TIMEOUT,
    )
    .await?;
    ensure!(output.code == Some(1), "{output:?}");
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
    // A redrive reads dead letters on a broker: the memory bus's banner does not offer one.
    let log = up.log_text();
    ensure!(
        log.contains("weir tail weir.dlq.order-validate --limit 1") && !log.contains("dlq redrive"),
        "{log}"
    );

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
    let accepted = publish_file("db.changes", &fixture, &http).await?;
    assert_eq!(accepted["duplicates"], serde_json::json!([]), "{accepted}");
    let (_, audit) = tail_one(&up, &["db.audit", "--http", &http]).await?;
    assert_eq!(audit["type"], "weir.db.audit");
    assert_eq!(
        audit["data"],
        serde_json::json!({"table": "public.stock", "op": "update", "key": null, "changed": ["qty"]})
    );
    assert_eq!(audit["weirhops"], "1");

    // A structured CloudEvent carries its own id: sent twice, the bus keeps the first
    // (same source and id). Accepted (a client's retry must succeed), counted and said.
    publish_repeated(STRUCTURED_ORDER, 2, &["--http", &http], 1).await?;

    // `--last N` starts at the topic's last N messages instead of its oldest; o-9 is among
    // them once (its repeat was not stored).
    for id in ["o-2", "o-3"] {
        let data = format!(r#"{{"id":"{id}","amount":1}}"#);
        let output = run_weir(
            [
                "publish",
                "orders",
                "--type",
                "com.example.order",
                "--data",
                &data,
                "--http",
                &http,
            ],
            CLIENT_TIMEOUT,
        )
        .await?;
        ensure!(output.code == Some(0), "publish failed: {output:?}");
    }
    let output = run_weir(
        [
            "tail", "orders", "--last", "4", "--limit", "4", "--http", &http,
        ],
        CLIENT_TIMEOUT,
    )
    .await?;
    ensure!(output.code == Some(0), "tail --last failed: {output:?}");
    let ids: Vec<Value> = json_lines(&output)?
        .iter()
        .map(|e| e["data"]["id"].clone())
        .collect();
    assert_eq!(ids, ["o-1", "o-9", "o-2", "o-3"], "{output:?}");
    // `weir tail orders | head -1` ends by itself, whether or not more events are printed.
    let first = first_then_reader_goes(&["tail", "orders", "--http", &http]).await?;
    assert_eq!(first["data"]["id"], "o-1", "{first}");

    // A tail starts at the topic's oldest retained event, also past the first page of 100
    // (it used to start at the newest page: the 51st of 150 here). `--last 150` starts there too.
    let output = run_weir(
        [
            "publish",
            "many",
            "--data",
            r#"{"n":1}"#,
            "--count",
            "150",
            "--http",
            &http,
        ],
        CLIENT_TIMEOUT,
    )
    .await?;
    ensure!(
        output.code == Some(0),
        "publish --count 150 failed: {output:?}"
    );
    let (_, oldest) = tail_one(&up, &["many", "--http", &http]).await?;
    let (_, last_150) = tail_one(&up, &["many", "--last", "150", "--http", &http]).await?;
    ensure!(
        oldest["id"] == last_150["id"],
        "tail starts at the oldest event: {oldest} is not {last_150}"
    );

    // A file holding an array of structured CloudEvents is sent as the batch it is: each
    // event stored on its own with its own id (it used to be one custom event).
    let batch = write(
        dir.path(),
        "batch.json",
        r#"[{"specversion":"1.0","id":"b-1","source":"cli-test","type":"com.example.note","data":1},
            {"specversion":"1.0","id":"b-2","source":"cli-test","type":"com.example.note","data":2}]"#,
    )?;
    let accepted = publish_file("notes.batch", &batch, &http).await?;
    assert_eq!(
        accepted["ids"],
        serde_json::json!(["b-1", "b-2"]),
        "{accepted}"
    );
    let output = run_weir(
        ["tail", "notes.batch", "--limit", "2", "--http", &http],
        CLIENT_TIMEOUT,
    )
    .await?;
    let stored: Vec<(Value, Value)> = json_lines(&output)?
        .iter()
        .map(|e| (e["id"].clone(), e["data"].clone()))
        .collect();
    assert_eq!(
        stored,
        [
            (Value::from("b-1"), Value::from(1)),
            (Value::from("b-2"), Value::from(2))
        ],
        "{output:?}"
    );

    // A body that is no event of its own gets the HTTP ingress as its source.
    let output = run_weir(
        ["publish", "notes", "--data", "plain text", "--http", &http],
        CLIENT_TIMEOUT,
    )
    .await?;
    ensure!(output.code == Some(0), "publish failed: {output:?}");
    let (_, note) = tail_one(&up, &["notes", "--http", &http]).await?;
    assert_eq!(note["source"], "weir://http/notes", "{note}");
    assert_eq!(note["type"], "weir.custom", "{note}");
    Ok(())
}

/// `weir publish TOPIC --file FILE --http HTTP`: the weir's answer; fails unless it exits 0.
async fn publish_file(topic: &str, file: &Path, http: &str) -> anyhow::Result<Value> {
    let output = run_weir(
        ["publish", topic, "--file"].iter().map(Into::into).chain([
            file.as_os_str().to_owned(),
            "--http".into(),
            http.into(),
        ]),
        CLIENT_TIMEOUT,
    )
    .await?;
    ensure!(output.code == Some(0), "publish --file failed: {output:?}");
    serde_json::from_str(output.stdout.trim()).with_context(|| format!("the answer: {output:?}"))
}

/// A CloudEvent in structured mode: it carries its own id, so sending it again is a repeat.
const STRUCTURED_ORDER: &str = r#"{"specversion":"1.0","id":"fixed-1","source":"test","type":"com.example.order","data":{"id":"o-9","amount":1}}"#;

/// `weir publish orders --data BODY --count N VIA`: every send accepted, `duplicates` of them
/// counted as already on the topic, on stdout and on stderr.
async fn publish_repeated(
    body: &str,
    count: u64,
    via: &[&str],
    duplicates: u64,
) -> anyhow::Result<()> {
    let count_arg = count.to_string();
    let args = ["publish", "orders", "--data", body, "--count", &count_arg];
    let output = run_weir(args.iter().chain(via), CLIENT_TIMEOUT).await?;
    ensure!(output.code == Some(0), "publish --count failed: {output:?}");
    let counted: Value = serde_json::from_str(output.stdout.trim())?;
    assert_eq!(
        counted,
        serde_json::json!({"accepted": count, "duplicates": duplicates}),
        "{output:?}"
    );
    let said = match duplicates {
        1 => "1 event was already on orders (".to_owned(),
        n => format!("{n} events were already on orders ("),
    };
    ensure!(output.stderr.contains(&said), "{output:?}");
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
    ensure!(
        log.contains(&format!("weir up --nats {url} --print-config > weir.toml"))
            && log.contains("weir dlq redrive order-validate -c weir.toml --dry-run"),
        "the banner shows how to redrive the dead letters:\n{log}"
    );

    // JetStream: published (confirmed) before the tail starts, read from the stream's history.
    let accepted = publish_nats(&url, "orders", r#"{"id":"o-1","amount":42}"#, false).await?;
    assert_eq!(accepted["broker"], "jetstream", "{accepted}");
    assert_eq!(accepted["duplicates"], serde_json::json!([]), "{accepted}");
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

    // A structured CloudEvent carries its own id: sent three times, JetStream stores it once
    // (`Nats-Msg-Id`), and `weir publish` says so instead of counting three.
    publish_repeated(STRUCTURED_ORDER, 3, &["--nats", &url], 2).await?;
    let output = run_weir(
        [
            "publish",
            "orders",
            "--data",
            STRUCTURED_ORDER,
            "--nats",
            &url,
        ],
        CLIENT_TIMEOUT,
    )
    .await?;
    ensure!(output.code == Some(0), "publish failed: {output:?}");
    let again: Value = serde_json::from_str(output.stdout.trim())?;
    assert_eq!(
        again["duplicates"],
        serde_json::json!(["fixed-1"]),
        "{again}"
    );

    // A rejected order: its dead-letter record, read back the same way.
    let accepted = publish_nats(&url, "orders", r#"{"id":"o-2"}"#, false).await?;
    let (_, record) = tail_one(&up, &["weir.dlq.order-validate", "--nats", &url]).await?;
    assert_eq!(record["id"], accepted["ids"][0], "{record}");
    assert_eq!(record["weirdlqreason"], "rejected");
    assert_eq!(record["weirdlqfunction"], "order-validate");

    // Without --type the body goes as is. The event it becomes names the CLI as its way in,
    // not the HTTP ingress it did not pass through.
    let output = run_weir(
        ["publish", "orders", "--data", "not json", "--nats", &url],
        CLIENT_TIMEOUT,
    )
    .await?;
    ensure!(output.code == Some(0), "publish failed: {output:?}");
    let accepted: Value = serde_json::from_str(output.stdout.trim())?;
    let (_, record) = tail_one(
        &up,
        &["weir.dlq.order-validate", "--nats", &url, "--last", "1"],
    )
    .await?;
    assert_eq!(record["id"], accepted["ids"][0], "{record}");
    assert_eq!(record["source"], "weir://cli/orders", "{record}");
    assert_eq!(record["weirdlqreason"], "rejected", "{record}");

    // An array of CloudEvents goes straight to JetStream as the batch it is: one message per
    // event, each with its own id. One without an id refuses the whole batch before anything
    // is sent (exit 2), so the stream's last two messages are still the first batch's.
    let batch = r#"[{"specversion":"1.0","id":"nb-1","source":"cli-test","type":"com.example.order","data":{"id":"nb-1","amount":3}},
                    {"specversion":"1.0","id":"nb-2","source":"cli-test","type":"com.example.order","data":{"id":"nb-2","amount":4}}]"#;
    let broken = r#"[{"specversion":"1.0","id":"nb-3","source":"cli-test","type":"com.example.order"},
                     {"specversion":"1.0","source":"cli-test","type":"com.example.order"}]"#;
    let output = run_weir(
        ["publish", "orders", "--data", batch, "--nats", &url],
        CLIENT_TIMEOUT,
    )
    .await?;
    ensure!(
        output.code == Some(0),
        "publish of a batch failed: {output:?}"
    );
    let accepted: Value = serde_json::from_str(output.stdout.trim())?;
    assert_eq!(
        accepted["ids"],
        serde_json::json!(["nb-1", "nb-2"]),
        "{accepted}"
    );
    let output = run_weir(
        ["publish", "orders", "--data", broken, "--nats", &url],
        CLIENT_TIMEOUT,
    )
    .await?;
    ensure!(
        output.code == Some(2) && output.stderr.contains("event [1] of the batch"),
        "a batch with an event without id is refused: {output:?}"
    );
    let output = run_weir(
        [
            "tail", "orders", "--nats", &url, "--last", "2", "--limit", "2",
        ],
        CLIENT_TIMEOUT,
    )
    .await?;
    let ids: Vec<Value> = json_lines(&output)?
        .iter()
        .map(|e| e["id"].clone())
        .collect();
    assert_eq!(ids, ["nb-1", "nb-2"], "{output:?}");

    // Reading a JetStream topic through the weir's HTTP server is refused with where to look,
    // instead of waiting for ever on an empty memory-bus topic.
    let http = up.addr().to_string();
    let output = run_weir(
        ["tail", "orders.enriched", "--limit", "1", "--http", &http],
        CLIENT_TIMEOUT,
    )
    .await?;
    assert_eq!(output.code, Some(2), "asked wrongly: {output:?}");
    ensure!(
        output.stderr.contains("409")
            && output.stderr.contains("is on jetstream")
            && output.stderr.contains("--nats URL"),
        "{output:?}"
    );

    // An event that is not valid (a CloudEvent must have a source) is the caller's to fix,
    // exit 2, whether the weir's HTTP server refuses it (400) or `weir publish` itself does
    // before it goes to JetStream.
    for (via, says) in [(["--http", &http], "400"), (["--nats", &url], "not valid")] {
        let mut args = vec![
            "publish", "orders", "--type", "o", "--source", "", "--data", "{}",
        ];
        args.extend(via);
        let output = run_weir(&args, CLIENT_TIMEOUT).await?;
        ensure!(
            output.code == Some(2)
                && output.stderr.contains(says)
                && output.stderr.contains("`source`"),
            "{args:?}: {output:?}"
        );
    }
    Ok(())
}

/// Core NATS through the CLI: every `weir publish --core` reaches a `weir tail` that was
/// following the subject, though each publisher exits right after publishing (core publishes
/// are only queued on the connection until it is flushed). On a JetStream server whose
/// streams do not capture the subject, and on a server without JetStream.
/// `weir publish --count N --nats` stores every copy, each with its own id (sends wait for
/// their confirmations many at a time; one at a time, a count could not build a backlog), and
/// a count to a subject no stream captures fails, saying so and how many were confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_count_to_jetstream_stores_every_copy() -> anyhow::Result<()> {
    let server = NatsServer::start()?;
    let url = server.url();
    let (js, _) = stream_capturing(&url, "COUNTED", "counted").await?;
    let output = run_weir(
        [
            "publish",
            "counted.orders",
            "--type",
            "com.example.order",
            "--data",
            r#"{"id":"o-c","amount":1}"#,
            "--count",
            "3000",
            "--nats",
            &url,
        ],
        CLIENT_TIMEOUT,
    )
    .await?;
    ensure!(output.code == Some(0), "{output:?}");
    assert_eq!(output.stdout.trim(), r#"{"accepted":3000,"duplicates":0}"#);
    let mut stream = js.get_stream("COUNTED").await?;
    assert_eq!(stream.info().await?.state.messages, 3000);

    let output = run_weir(
        [
            "publish",
            "nowhere.orders",
            "--data",
            r#"{"n":1}"#,
            "--count",
            "500",
            "--nats",
            &url,
        ],
        CLIENT_TIMEOUT,
    )
    .await?;
    ensure!(
        output.code == Some(1)
            && output.stderr.contains("no JetStream stream captures")
            && output
                .stderr
                .contains("0 of 500 confirmed before this failure")
            && !output.stdout.contains("accepted"),
        "{output:?}"
    );
    Ok(())
}

/// `weir run -c CONFIG` (written to `dir`), its standard error read line by line.
fn weir_run(dir: &Path, config: &str) -> anyhow::Result<(tokio::process::Child, StderrLines)> {
    use tokio::io::AsyncBufReadExt as _;

    let config = write(dir, "weir.toml", config)?;
    let mut child = spawn_weir(&["run", "-c", &config.display().to_string()])?;
    let stderr = child.stderr.take().context("the child's stderr")?;
    Ok((child, tokio::io::BufReader::new(stderr).lines()))
}

/// The lines `lines` gives up to and including the first that contains `needle`, within
/// `timeout`; fails with what was said when it ends first.
async fn said_until(
    lines: &mut StderrLines,
    needle: &str,
    timeout: Duration,
) -> anyhow::Result<Vec<String>> {
    tokio::time::timeout(timeout, async {
        let mut said = Vec::new();
        while let Some(line) = lines.next_line().await? {
            let found = line.contains(needle);
            said.push(line);
            if found {
                return Ok(said);
            }
        }
        anyhow::bail!("ended before saying {needle:?}:\n{}", said.join("\n"))
    })
    .await
    .with_context(|| format!("did not say {needle:?} within {timeout:?}"))?
}

/// Polls `done` every 200 ms, for at most [`CHECK_TIMEOUT`].
async fn until(mut done: impl FnMut() -> bool, what: &str) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + CHECK_TIMEOUT;
    while !done() {
        ensure!(
            std::time::Instant::now() < deadline,
            "not so within {CHECK_TIMEOUT:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// `weir run` against a JetStream cluster without its majority (one server of three up after
/// all stopped): that server accepts the connection, but JetStream answers nothing until a
/// majority is back, and declaring a stream used to fail start-up with a bare "timed out".
/// It now asks again (within `startup_wait`), says so, and runs the functions once a second
/// server is back: one on a stream it declares, one on a stream made by its operator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_run_waits_for_a_jetstream_cluster_to_regain_its_majority() -> anyhow::Result<()> {
    let mut cluster =
        tokio::task::spawn_blocking(|| NatsServer::start_cluster("weirtest", 3)).await??;
    // Formed (every server's JetStream in contact with a leader), then without a majority
    // (the one left has noticed).
    until(
        || cluster.iter().all(NatsServer::jetstream_healthy),
        "the cluster formed",
    )
    .await?;
    let url = cluster[0].url();
    // A stream made by its operator, on all three servers, not declared in weir's file.
    let js = async_nats::jetstream::new(async_nats::connect(&url).await?);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "MADE".into(),
        subjects: vec!["made.>".into()],
        num_replicas: 3,
        ..Default::default()
    })
    .await?;
    drop(js);
    // All stopped, one started again: it knows its two peers and cannot be a majority alone.
    // (Killing two and keeping one is not as clear: the one kept may have led, and goes on
    // answering for a while as if it still did.)
    for node in cluster.iter_mut() {
        node.kill()?;
    }
    let mut alone = cluster.remove(0);
    let alone = tokio::task::spawn_blocking(move || alone.restart().map(|()| alone)).await??;

    let echo = functions_dir()?.join("echo.wasm");
    let dir = tempfile::tempdir()?;
    let http = format!("127.0.0.1:{}", weir_tests::ports::free_port()?);
    let config = format!(
        r#"[http]
listen = "{http}"

[brokers.nats]
servers = ["{url}"]
startup_wait = "90s"

[[brokers.nats_streams]]
name = "CLU"
subjects = ["clu.>"]

[[functions]]
name = "echo"
module = "{echo}"
outputs = ["clu.out"]
config = {{ output_topic = "clu.out" }}
[functions.trigger]
broker = "jetstream"
topic = "clu.in"
stream = "CLU"
[functions.dead_letter]
broker = "jetstream"
topic = "clu.dlq"

[[functions]]
name = "made-echo"
module = "{echo}"
outputs = ["made.out"]
config = {{ output_topic = "made.out" }}
[functions.trigger]
broker = "jetstream"
topic = "made.in"
stream = "MADE"
[functions.dead_letter]
broker = "jetstream"
topic = "clu.dlq"
"#,
        echo = echo.display()
    );
    let (mut child, mut lines) = weir_run(dir.path(), &config)?;
    let said = said_until(
        &mut lines,
        "JetStream did not answer at start-up; asking again",
        CLIENT_TIMEOUT,
    )
    .await?;
    ensure!(
        !said.iter().any(|line| line.contains("weir is serving")),
        "served without JetStream: {said:#?}"
    );

    // A majority again: the cluster elects its leader, and weir goes on by itself.
    let mut second = cluster.remove(0);
    let second = tokio::task::spawn_blocking(move || second.restart().map(|()| second)).await??;
    said_until(&mut lines, "weir is serving", Duration::from_secs(90))
        .await
        .with_context(|| format!("n1:\n{}\nn2:\n{}", alone.log(), second.log()))?;

    for (input, output) in [("clu.in", "clu.out"), ("made.in", "made.out")] {
        let accepted = publish_nats(&url, input, r#"{"id":"c-1"}"#, false).await?;
        let tailed = run_weir(
            ["tail", output, "--nats", &url, "--limit", "1"],
            CLIENT_TIMEOUT,
        )
        .await?;
        ensure!(tailed.code == Some(0), "{tailed:?}");
        let echoed: Value = serde_json::from_str(tailed.stdout.trim())?;
        assert_eq!(echoed["weircausation"], accepted["ids"][0], "{echoed}");
    }
    child.kill().await?;
    drop((alone, second, cluster));
    Ok(())
}

/// `weir run` warns at start-up of a function whose outputs go to NATS and may be larger than
/// the server takes (`max_output_bytes` above `max_payload`), naming both limits; a function
/// whose limit fits is not warned of. Such an output would otherwise be found only when the
/// server refused it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_run_warns_of_outputs_larger_than_the_nats_server_takes() -> anyhow::Result<()> {
    let server = NatsServer::start_with_config("max_payload: 65536\n")?;
    let url = server.url();
    let echo = functions_dir()?.join("echo.wasm");
    let dir = tempfile::tempdir()?;
    let http = format!("127.0.0.1:{}", weir_tests::ports::free_port()?);
    let config = format!(
        r#"[http]
listen = "{http}"

[brokers.nats]
servers = ["{url}"]

[[brokers.nats_streams]]
name = "SIZES"
subjects = ["sizes.>"]

[[functions]]
name = "roomy"
module = "{echo}"
outputs = ["sizes.roomy.out"]
[functions.trigger]
broker = "jetstream"
topic = "sizes.roomy"
stream = "SIZES"

[[functions]]
name = "fitting"
module = "{echo}"
outputs = ["sizes.fitting.out"]
max_output_bytes = "32KiB"
[functions.trigger]
broker = "jetstream"
topic = "sizes.fitting"
stream = "SIZES"
"#,
        echo = echo.display()
    );
    let (mut child, mut lines) = weir_run(dir.path(), &config)?;
    let said = said_until(&mut lines, "weir is serving", CHECK_TIMEOUT).await?;
    child.kill().await?;
    let warnings: Vec<&String> = said
        .iter()
        .filter(|l| l.contains("may publish an output of up to"))
        .collect();
    ensure!(
        warnings.len() == 1,
        "one warning, for roomy only: {warnings:#?}"
    );
    let warning = warnings[0];
    ensure!(
        warning.contains("function roomy may publish an output of up to 1.0 MiB of data")
            && warning.contains("takes messages of up to 64.0 KiB"),
        "{warning}"
    );
    Ok(())
}

/// `weir up --nats` started before its server, as a compose file or a pod may start them:
/// it waits (`brokers.nats.startup_wait`, 30 s by default), says so in its log and metrics,
/// and runs the pipeline once the server is up. It used to exit at once ("connection
/// refused"), leaving the restart to a supervisor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_up_waits_for_a_nats_server_that_starts_after_it() -> anyhow::Result<()> {
    let mut server = NatsServer::start()?;
    let url = server.url();
    server.kill()?;
    let late = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        server.restart().map(|()| server)
    });
    // Waits for /healthz, which answers once the runtime (connected) is up.
    let up = tokio::task::block_in_place(|| WeirUp::start_with(&["--nats", &url]));
    let server = late
        .join()
        .map_err(|_| anyhow::anyhow!("the thread starting the server panicked"))??;
    let up = up?;
    let log = up.log_text();
    ensure!(
        log.contains("no NATS server answered at start-up; trying again"),
        "the wait is logged:\n{log}"
    );
    let metrics = reqwest::get(format!("http://{}/metrics", up.addr()))
        .await?
        .text()
        .await?;
    let waits = metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix(
                "weir_nats_connection_events_total{event=\"unreachable_at_startup\"} ",
            )
        })
        .and_then(|n| n.trim().parse::<u64>().ok());
    ensure!(
        waits.is_some_and(|n| n >= 1),
        "the attempts are counted: {waits:?}"
    );

    publish_nats(&url, "orders", r#"{"id":"o-late","amount":5}"#, false).await?;
    let (_, enriched) = tail_one(&up, &["orders.enriched", "--nats", &url]).await?;
    assert_eq!(enriched["data"]["id"], "o-late", "{enriched}");
    drop(server);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_nats_publish_and_tail_lose_nothing() -> anyhow::Result<()> {
    let with_jetstream = NatsServer::start()?;
    core_publish_and_tail(&with_jetstream.url())
        .await
        .context("on a server with JetStream")?;
    let core_only = NatsServer::start_core_only()?;
    core_publish_and_tail(&core_only.url())
        .await
        .context("on a server without JetStream")?;

    // What does need JetStream says that the server has none, at once.
    let url = core_only.url();
    for args in [
        vec!["up", "--nats", &url, "--http", "127.0.0.1:0"],
        vec!["publish", "orders", "--data", "{}", "--nats", &url],
    ] {
        let output = run_weir(&args, CLIENT_TIMEOUT).await?;
        assert_eq!(output.code, Some(1), "{args:?}: {output:?}");
        ensure!(
            output.stderr.contains("JetStream disabled"),
            "{args:?}: {output:?}"
        );
    }
    Ok(())
}

async fn core_publish_and_tail(url: &str) -> anyhow::Result<()> {
    let mut tail = spawn_weir(&["tail", "cli.core", "--limit", "5", "--nats", url])?;
    // The tail says it is following only once the server registered its subscription.
    wait_for_stderr(&mut tail, "following core subject cli.core").await?;

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

/// `weir tail --nats --last N` on a subject that shares its stream with another: the last N
/// messages of that subject, in order, however the two interleave; all of them when it holds
/// fewer; a clear refusal on a core subject, which keeps no history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_last_on_jetstream_starts_at_the_subjects_last_messages() -> anyhow::Result<()> {
    let server = NatsServer::start()?;
    let url = server.url();
    let (js, _) = stream_capturing(&url, "HIST", "hist").await?;
    // hist.a holds the even numbers, hist.b the odd ones, and hist.b has the last word.
    for n in 0..=41u32 {
        let subject = if n % 2 == 0 { "hist.a" } else { "hist.b" };
        publish_numbers(&js, subject, [n]).await?;
    }
    for (last, limit, expected, from) in [
        ("1", "1", vec![40], "the last message"),
        ("3", "3", vec![36, 38, 40], "the last 3 messages"),
        // More than the subject holds: all of it.
        (
            "50",
            "21",
            (0..=40).step_by(2).collect::<Vec<u64>>(),
            "the last 50 messages",
        ),
    ] {
        let (output, numbers) = tail_numbers(vec![
            "tail", "hist.a", "--nats", &url, "--last", last, "--limit", limit,
        ])
        .await?;
        ensure!(
            output
                .stderr
                .contains(&format!("from {from} stream HIST holds")),
            "{output:?}"
        );
        assert_eq!(numbers, expected, "--last {last}: {output:?}");
        // Neither the reading consumer nor those counting for --last outlive the command.
        assert_eq!(
            consumers_on(&js, "HIST").await?,
            Vec::<String>::new(),
            "--last {last}"
        );
    }

    // --last 0: nothing old; the first event shown is one published after the tail started.
    let event = tail_one_new(
        &[
            "tail", "hist.b", "--nats", &url, "--last", "0", "--limit", "1",
        ],
        "from after the last message stream HIST holds",
        async {
            js.publish("hist.b", r#"{"n":99}"#.into()).await?.await?;
            Ok(())
        },
    )
    .await?;
    assert_eq!(event["data"]["n"], 99, "{event}");

    // A core subject has no earlier messages to go back to.
    let output = run_weir(
        [
            "tail",
            "core.only",
            "--nats",
            &url,
            "--last",
            "2",
            "--limit",
            "1",
        ],
        CLIENT_TIMEOUT,
    )
    .await?;
    assert_eq!(output.code, Some(1), "{output:?}");
    ensure!(
        output.stderr.contains("--last: no JetStream stream")
            && output.stderr.contains("captures core.only"),
        "{output:?}"
    );
    // --core without NATS to go to.
    let output = run_weir(
        ["publish", "hist.a", "--data", "{}", "--core"],
        CLIENT_TIMEOUT,
    )
    .await?;
    assert_eq!(output.code, Some(2), "misuse: {output:?}");
    ensure!(output.stderr.contains("--core is for NATS"), "{output:?}");
    // --core and --last contradict each other: a usage error.
    let output = run_weir(
        ["tail", "hist.a", "--nats", &url, "--core", "--last", "2"],
        CLIENT_TIMEOUT,
    )
    .await?;
    assert_eq!(output.code, Some(2), "{output:?}");
    Ok(())
}

/// `weir tail` following forever ends cleanly however it is ended: Ctrl-C (SIGINT) and SIGTERM
/// end it with exit 0, and so does its reader going away (`weir tail … | head -1`: noticed
/// without another event, and no `println!` panic); a JetStream reader's consumer is deleted at
/// once in each case (also after async-nats re-created it under another name), not left on
/// the stream for the server's 30 s inactivity threshold.
/// `weir publish` whose reader has gone still publishes and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_ends_cleanly_when_stopped_or_its_reader_goes() -> anyhow::Result<()> {
    use nix::sys::signal::Signal;

    let server = NatsServer::start()?;
    let url = server.url();
    let (js, _) = stream_capturing(&url, "ENDS", "ends").await?;
    publish_numbers(&js, "ends.a", 0..3).await?;
    // ends.b holds one event: once it is printed, the tail has nothing more to write.
    publish_numbers(&js, "ends.b", [0]).await?;

    // Ctrl-C: the three events printed, exit 0, the consumer gone.
    let mut tail = spawn_weir(&["tail", "ends.a", "--nats", &url])?;
    wait_for_stderr(&mut tail, "then following").await?;
    let consumers = consumers_on(&js, "ENDS").await?;
    ensure!(
        consumers.len() == 1 && consumers[0].starts_with("weir-tail-"),
        "while reading, one weir-tail consumer: {consumers:?}"
    );
    let mut stdout = stdout_lines(&mut tail)?;
    let mut numbers = Vec::new();
    while numbers.len() < 3 {
        let event = next_event(&mut stdout, "the stream's events").await?;
        numbers.push(event["data"]["n"].clone());
    }
    assert_eq!(numbers, [0, 1, 2], "the stream's events, in order");
    // Its consumer deleted under it, the tail rides it out (async-nats re-creates it under
    // another name) and sees what comes next; the re-created consumer is deleted too.
    js.get_stream("ENDS")
        .await?
        .delete_consumer(&consumers[0])
        .await?;
    js.publish("ends.a", r#"{"n":3}"#.into()).await?.await?;
    let event = next_event(&mut stdout, "the event after its consumer was re-created").await?;
    assert_eq!(event["data"]["n"], 3, "{event}");
    let recreated = consumers_on(&js, "ENDS").await?;
    ensure!(
        recreated.len() == 1 && recreated[0] != consumers[0],
        "re-created under another name: {recreated:?}, was {consumers:?}"
    );
    stop_tail(&mut tail, Signal::SIGINT).await?;
    assert_eq!(
        consumers_on(&js, "ENDS").await?,
        Vec::<String>::new(),
        "after SIGINT"
    );

    // The reader goes away (`| head -1`): the tail notices without waiting for another event
    // to fail to print; exit 0, no panic, no consumer.
    let first = first_then_reader_goes(&["tail", "ends.b", "--nats", &url]).await?;
    assert_eq!(first["data"]["n"], 0, "{first}");
    assert_eq!(
        consumers_on(&js, "ENDS").await?,
        Vec::<String>::new(),
        "after the reader went"
    );

    // SIGTERM on a core subject: exit 0.
    let mut tail = spawn_weir(&["tail", "ends.core", "--nats", &url, "--core"])?;
    wait_for_stderr(&mut tail, "following core subject ends.core").await?;
    stop_tail(&mut tail, Signal::SIGTERM).await?;

    // `weir publish` whose reader has gone before the answer: published, exit 0, no panic.
    let mut publish = spawn_weir(&["publish", "ends.a", "--nats", &url, "--data", r#"{"n":3}"#])?;
    drop(publish.stdout.take());
    let output = tokio::time::timeout(CLIENT_TIMEOUT, publish.wait_with_output())
        .await
        .context("weir publish ended in time")??;
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let stream = js.get_stream("ENDS").await?;
    let last = stream.get_last_raw_message_by_subject("ends.a").await?;
    assert_eq!(&last.payload[..], br#"{"n":3}"#, "the event was published");
    Ok(())
}

/// A JetStream tail whose stream goes away does not wait in silence (async-nats would re-create
/// its consumer for ever): it fails, saying the stream was deleted. A stream deleted and
/// created again under the same name is another stream, whose first messages the reader would
/// skip (it goes on from the old stream's sequence): that tail fails too, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_fails_when_its_stream_is_deleted_or_created_again() -> anyhow::Result<()> {
    let server = NatsServer::start()?;
    let url = server.url();
    let (js, config) = stream_capturing(&url, "GOES", "goes").await?;
    publish_numbers(&js, "goes.a", [0]).await?;
    let (tail, mut stderr) = tail_until_first_event(&url, "goes.a").await?;
    js.delete_stream("GOES").await?;
    let (status, said) = tail_ends(tail, &mut stderr).await?;
    ensure!(
        status.code() == Some(1) && said.contains("stream GOES was deleted"),
        "a deleted stream fails the tail: {status:?}\n{said}"
    );

    js.create_stream(config.clone()).await?;
    publish_numbers(&js, "goes.a", 0..3).await?;
    let (tail, mut stderr) = tail_until_first_event(&url, "goes.a").await?;
    js.delete_stream("GOES").await?;
    js.create_stream(config).await?;
    js.publish("goes.a", r#"{"n":"new"}"#.into()).await?.await?;
    let (status, said) = tail_ends(tail, &mut stderr).await?;
    ensure!(
        status.code() == Some(1) && said.contains("stream GOES was deleted and created again"),
        "a re-created stream fails the tail: {status:?}\n{said}"
    );
    Ok(())
}

/// `weir tail --nats` on a subject a workqueue stream captures: refused (exit 1), saying why
/// and pointing at `--core`, with and without `--last`, having taken nothing from the stream
/// (JetStream serves a work queue only to consumers that acknowledge, and an ack removes the
/// message); `--core` then shows a new message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_refuses_a_work_queue_stream() -> anyhow::Result<()> {
    use async_nats::jetstream::stream;

    let server = NatsServer::start()?;
    let url = server.url();
    let js = async_nats::jetstream::new(async_nats::connect(&url).await?);
    js.create_stream(stream::Config {
        name: "JOBS".into(),
        subjects: vec!["jobs.>".into()],
        retention: stream::RetentionPolicy::WorkQueue,
        ..Default::default()
    })
    .await?;
    publish_numbers(&js, "jobs.a", [0]).await?;
    for last in [&[][..], &["--last", "1"]] {
        let mut args = vec!["tail", "jobs.a", "--nats", &url, "--limit", "1"];
        args.extend(last);
        let output = run_weir(&args, CLIENT_TIMEOUT).await?;
        ensure!(
            output.code == Some(1)
                && output.stderr.contains("stream JOBS is a workqueue stream")
                && output
                    .stderr
                    .contains("`--core` shows new messages on jobs.a"),
            "{args:?}: {output:?}"
        );
    }
    let held = js.get_stream("JOBS").await?.info().await?.state.messages;
    assert_eq!(
        held, 1,
        "the refused tails took nothing from the work queue"
    );
    assert_eq!(consumers_on(&js, "JOBS").await?, Vec::<String>::new());

    let event = tail_one_new(
        &["tail", "jobs.a", "--nats", &url, "--core", "--limit", "1"],
        "following core subject jobs.a",
        publish_numbers(&js, "jobs.a", [1]),
    )
    .await?;
    assert_eq!(event["data"]["n"], 1, "{event}");
    Ok(())
}

type StderrLines = tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>;
type StdoutLines = tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>;

/// A JetStream context on `url` and a new stream `name` capturing `<prefix>.>`, with its
/// configuration for creating it again.
async fn stream_capturing(
    url: &str,
    name: &str,
    prefix: &str,
) -> anyhow::Result<(
    async_nats::jetstream::Context,
    async_nats::jetstream::stream::Config,
)> {
    let js = async_nats::jetstream::new(async_nats::connect(url).await?);
    let config = async_nats::jetstream::stream::Config {
        name: name.into(),
        subjects: vec![format!("{prefix}.>")],
        ..Default::default()
    };
    js.create_stream(config.clone())
        .await
        .with_context(|| format!("creating stream {name}"))?;
    Ok((js, config))
}

/// Publishes `{"n":<n>}` to `subject` for each number, each publish confirmed.
async fn publish_numbers(
    js: &async_nats::jetstream::Context,
    subject: &str,
    numbers: impl IntoIterator<Item = u32>,
) -> anyhow::Result<()> {
    for n in numbers {
        js.publish(subject.to_owned(), format!(r#"{{"n":{n}}}"#).into())
            .await?
            .await
            .with_context(|| format!("publishing n={n} to {subject}"))?;
    }
    Ok(())
}

/// A child's standard output, line by line.
fn stdout_lines(child: &mut tokio::process::Child) -> anyhow::Result<StdoutLines> {
    use tokio::io::AsyncBufReadExt as _;

    let stdout = child.stdout.take().context("the child's stdout")?;
    Ok(tokio::io::BufReader::new(stdout).lines())
}

/// The next line a tail prints, as JSON, bounded; `what` says which line was awaited.
async fn next_event(stdout: &mut StdoutLines, what: &str) -> anyhow::Result<Value> {
    let line = tokio::time::timeout(CLIENT_TIMEOUT, stdout.next_line())
        .await
        .with_context(|| format!("the tail printed {what} in time"))??
        .with_context(|| format!("the tail's stdout ended before {what}"))?;
    serde_json::from_str(&line).with_context(|| format!("{what} is not a JSON line: {line}"))
}

/// `weir tail TOPIC --nats URL` on a subject a stream captures, once it has printed its first
/// event (which must be `{"n":0}`), with its standard error still being read.
async fn tail_until_first_event(
    url: &str,
    topic: &str,
) -> anyhow::Result<(tokio::process::Child, StderrLines)> {
    let mut tail = spawn_weir(&["tail", topic, "--nats", url])?;
    let stderr = stderr_after(&mut tail, "then following").await?;
    let mut stdout = stdout_lines(&mut tail)?;
    let event = next_event(&mut stdout, "the stream's first event").await?;
    assert_eq!(event["data"]["n"], 0, "{event}");
    // Keep reading standard output, or the tail would end on its reader going away.
    tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
    Ok((tail, stderr))
}

/// Waits for a tail to end by itself, bounded: its exit status and the rest of its stderr.
async fn tail_ends(
    mut tail: tokio::process::Child,
    stderr: &mut StderrLines,
) -> anyhow::Result<(std::process::ExitStatus, String)> {
    let status = tokio::time::timeout(CLIENT_TIMEOUT, tail.wait())
        .await
        .context("the tail ended by itself in time")??;
    let mut said = Vec::new();
    while let Some(line) = tokio::time::timeout(CLIENT_TIMEOUT, stderr.next_line()).await?? {
        said.push(line);
    }
    Ok((status, said.join("\n")))
}

/// Start `weir ARGS` (a tail without `--limit`), read its first line, then close its standard
/// output as `| head -1` does: it must end by itself with exit 0, in time and without a panic,
/// whether or not it has more to print. Returns the first line's event.
async fn first_then_reader_goes(args: &[&str]) -> anyhow::Result<Value> {
    let mut tail = spawn_weir(args)?;
    let mut stdout = stdout_lines(&mut tail)?;
    let first = next_event(&mut stdout, &format!("the first line of weir {args:?}")).await?;
    drop(stdout);
    let output = tokio::time::timeout(CLIENT_TIMEOUT, tail.wait_with_output())
        .await
        .with_context(|| format!("weir {args:?} ended when its reader went away, in time"))??;
    ensure!(
        output.status.code() == Some(0)
            && !String::from_utf8_lossy(&output.stderr).contains("panicked"),
        "weir {args:?} ends with exit 0 when its reader goes: {output:?}"
    );
    Ok(first)
}

/// Send `signal` to a running `weir tail`, which must then end with exit 0, in time.
async fn stop_tail(
    tail: &mut tokio::process::Child,
    signal: nix::sys::signal::Signal,
) -> anyhow::Result<()> {
    let pid = tail.id().context("the tail's pid")?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid)?), signal)?;
    let status = tokio::time::timeout(CLIENT_TIMEOUT, tail.wait())
        .await
        .with_context(|| format!("the tail ended on {signal:?} in time"))??;
    ensure!(
        status.code() == Some(0),
        "{signal:?} ends the tail with exit 0: {status:?}"
    );
    Ok(())
}

/// The names of the consumers on `stream`, sorted.
async fn consumers_on(
    js: &async_nats::jetstream::Context,
    stream: &str,
) -> anyhow::Result<Vec<String>> {
    use futures::TryStreamExt as _;

    let mut names: Vec<String> = js
        .get_stream(stream)
        .await?
        .consumer_names()
        .try_collect()
        .await?;
    names.sort();
    Ok(names)
}

/// `weir ARGS`, which must exit 0, and the `data.n` of every event it printed.
async fn tail_numbers(args: Vec<&str>) -> anyhow::Result<(CommandOutput, Vec<u64>)> {
    let output = run_weir(&args, CLIENT_TIMEOUT).await?;
    ensure!(output.code == Some(0), "weir {args:?} failed: {output:?}");
    let numbers = json_lines(&output)?
        .iter()
        .map(|e| e["data"]["n"].as_u64().context(format!("no data.n: {e}")))
        .collect::<anyhow::Result<_>>()?;
    Ok((output, numbers))
}

/// Start `weir tail ARGS` (with `--limit 1`), wait until it says `ready` on stderr, run
/// `publish`, and return the one event the tail printed: the first new one.
async fn tail_one_new(
    args: &[&str],
    ready: &str,
    publish: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<Value> {
    let mut tail = spawn_weir(args)?;
    wait_for_stderr(&mut tail, ready).await?;
    publish.await?;
    let output = tokio::time::timeout(CLIENT_TIMEOUT, tail.wait_with_output())
        .await
        .with_context(|| format!("weir {args:?} did not see the new message in time"))??;
    ensure!(output.status.code() == Some(0), "weir {args:?}: {output:?}");
    serde_json::from_slice(&output.stdout)
        .with_context(|| format!("weir {args:?} printed one JSON line: {output:?}"))
}

/// `weir ARGS` in the background, its output piped; killed when dropped.
fn spawn_weir(args: &[&str]) -> anyhow::Result<tokio::process::Child> {
    spawn_weir_with_stdin(args, std::process::Stdio::null())
}

/// [`spawn_weir`] with this standard input.
fn spawn_weir_with_stdin(
    args: &[&str],
    stdin: std::process::Stdio,
) -> anyhow::Result<tokio::process::Child> {
    tokio::process::Command::new(weir_bin()?)
        .args(args)
        .stdin(stdin)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting weir {args:?}"))
}

/// Read `child`'s stderr until a line contains `needle` (it said it is ready), bounded.
async fn wait_for_stderr(child: &mut tokio::process::Child, needle: &str) -> anyhow::Result<()> {
    stderr_after(child, needle).await.map(drop)
}

/// [`wait_for_stderr`], keeping the rest of `child`'s stderr to read what it says next.
async fn stderr_after(
    child: &mut tokio::process::Child,
    needle: &str,
) -> anyhow::Result<StderrLines> {
    use tokio::io::AsyncBufReadExt as _;

    let stderr = child.stderr.take().context("the child's stderr")?;
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    tokio::time::timeout(CLIENT_TIMEOUT, async {
        let mut said = Vec::new();
        while let Some(line) = lines.next_line().await? {
            if line.contains(needle) {
                return Ok(lines);
            }
            said.push(line);
        }
        anyhow::bail!("ended before saying {needle:?}:\n{}", said.join("\n"))
    })
    .await
    .with_context(|| format!("did not say {needle:?} in time"))?
}

/// `weir publish --kafka` and `weir tail --kafka [--last N]` on a topic of two partitions:
/// every record from the earliest offsets, the last N of each partition, only new ones with
/// `--last 0`, a clear error for a topic that does not exist, the starting line of a topic of
/// one partition, and no consumer group left on the broker (the reader assigns partitions
/// itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_publish_and_tail_from_the_cli() -> anyhow::Result<()> {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    use rdkafka::producer::FutureRecord;

    let broker = KafkaBroker::start().await?;
    let bootstrap = broker.bootstrap();
    let transport = KafkaTransport::connect(&broker.config()).await?;
    transport.ensure_topic("cli.kafka", 2, 1).await?;
    // One record per batch: see `test_producer` on Tansu's fetch inside a batch.
    let producer = test_producer(&bootstrap)?;
    let produce = |topic: &'static str, partition: i32, n: u64| {
        let producer = producer.clone();
        async move {
            let payload = format!(r#"{{"n":{n}}}"#);
            producer
                .send(
                    FutureRecord::<(), str>::to(topic)
                        .partition(partition)
                        .payload(&payload),
                    CLIENT_TIMEOUT,
                )
                .await
                .map_err(|(error, _)| anyhow::anyhow!("producing n={n}: {error}"))
        }
    };
    // Partition 0 holds 0, 1, 2; partition 1 holds 10, 11.
    for (partition, n) in [(0, 0), (0, 1), (0, 2), (1, 10), (1, 11)] {
        produce("cli.kafka", partition, n).await?;
    }
    // Each partition in order; the two partitions interleave as they arrive.
    let per_partition =
        |numbers: &[u64]| -> (Vec<u64>, Vec<u64>) { numbers.iter().partition(|&&n| n < 10) };
    let tail = |topic: &'static str, args: &'static [&'static str]| {
        let mut all = vec!["tail", topic, "--kafka", &bootstrap];
        all.extend_from_slice(args);
        tail_numbers(all)
    };

    let (output, numbers) = tail("cli.kafka", &["--limit", "5"]).await?;
    ensure!(
        output
            .stderr
            .contains("from the earliest offset of each of its 2 partitions"),
        "{output:?}"
    );
    assert_eq!(per_partition(&numbers), (vec![0, 1, 2], vec![10, 11]));
    let (output, numbers) = tail("cli.kafka", &["--last", "1", "--limit", "2"]).await?;
    ensure!(
        output
            .stderr
            .contains("from the last record of each of its 2 partitions"),
        "{output:?}"
    );
    assert_eq!(per_partition(&numbers), (vec![2], vec![11]));
    let (_, numbers) = tail("cli.kafka", &["--last", "2", "--limit", "4"]).await?;
    assert_eq!(per_partition(&numbers), (vec![1, 2], vec![10, 11]));

    // --last 0: only what arrives after the reader started.
    let event = tail_one_new(
        &[
            "tail",
            "cli.kafka",
            "--kafka",
            &bootstrap,
            "--last",
            "0",
            "--limit",
            "1",
        ],
        "from after the last record of each",
        async {
            produce("cli.kafka", 1, 12).await?;
            Ok(())
        },
    )
    .await?;
    assert_eq!(event["data"]["n"], 12, "{event}");

    // `weir publish --kafka`: the event is the newest of its partition.
    let output = run_weir(
        [
            "publish",
            "cli.kafka",
            "--type",
            "com.example.order",
            "--data",
            r#"{"n":100}"#,
            "--key",
            "order-100",
            "--kafka",
            &bootstrap,
        ],
        CLIENT_TIMEOUT,
    )
    .await?;
    ensure!(output.code == Some(0), "publish --kafka failed: {output:?}");
    let accepted: Value = serde_json::from_str(output.stdout.trim())
        .with_context(|| format!("publish prints what it published: {output:?}"))?;
    assert_eq!(accepted["broker"], "kafka", "{accepted}");
    let output = run_weir(
        [
            "tail",
            "cli.kafka",
            "--kafka",
            &bootstrap,
            "--last",
            "1",
            "--limit",
            "2",
        ],
        CLIENT_TIMEOUT,
    )
    .await?;
    ensure!(output.code == Some(0), "tail failed: {output:?}");
    let published = json_lines(&output)?
        .into_iter()
        .find(|e| e["id"] == accepted["ids"][0])
        .with_context(|| format!("the published event is not among the last: {output:?}"))?;
    assert_eq!(published["type"], "com.example.order", "{published}");
    assert_eq!(published["partitionkey"], "order-100", "{published}");
    assert_eq!(published["data"]["n"], 100, "{published}");

    // A topic that does not exist is an error, not an endless wait.
    let output = run_weir(
        [
            "tail",
            "no.such.topic",
            "--kafka",
            &bootstrap,
            "--limit",
            "1",
        ],
        CLIENT_TIMEOUT,
    )
    .await?;
    assert_eq!(output.code, Some(1), "{output:?}");
    ensure!(
        output.stderr.contains("no.such.topic") && output.stderr.contains("no such topic"),
        "{output:?}"
    );

    // A topic of one partition: the line says so, not "each of its 1 partitions".
    transport.ensure_topic("cli.kafka.one", 1, 1).await?;
    for n in [20, 21] {
        produce("cli.kafka.one", 0, n).await?;
    }
    let (output, numbers) = tail("cli.kafka.one", &["--limit", "2"]).await?;
    ensure!(
        output
            .stderr
            .contains("from the earliest offset of its only partition, then following"),
        "{output:?}"
    );
    assert_eq!(numbers, vec![20, 21]);
    let (output, numbers) = tail("cli.kafka.one", &["--last", "1", "--limit", "1"]).await?;
    ensure!(
        output
            .stderr
            .contains("from the last record of its only partition, then following"),
        "{output:?}"
    );
    assert_eq!(numbers, vec![21]);

    // Reading joined no group, so the broker lists none.
    let admin: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()?;
    let groups = tokio::task::spawn_blocking(move || {
        admin.fetch_group_list(None, CLIENT_TIMEOUT).map(|list| {
            list.groups()
                .iter()
                .map(|g| g.name().to_owned())
                .collect::<Vec<_>>()
        })
    })
    .await??;
    assert_eq!(groups, Vec::<String>::new(), "groups left on the broker");
    Ok(())
}
