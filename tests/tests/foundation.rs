//! Acceptance tests of Weir's foundation on the embedded memory bus: the real runtime and HTTP
//! server in process, the real example and test components, events posted over HTTP (or put
//! straight onto the bus) and their effects read back from topics, DLQs, pool stats and the
//! admin API.
//!
//! One runtime runs every function of [`CONFIG`], and [`foundation_end_to_end`] walks through
//! the cases in order: the later successes (and the final order through the chain) show that
//! failures, traps, timeouts and malformed input of one function leave Weir serving the other
//! events and functions. The cases run one after the other, not concurrently, because the
//! timing assertions (retry delays, the timeout) must not compete with each other for the CPU;
//! and the tests of this file take [`SERIAL`] for the same reason.
//!
//! Every wait is bounded. Needs `make functions` (the components) first.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use bytes::Bytes;
use serde_json::{json, Value};
use weir_broker_bridge::{OutboundMessage, Publisher as _};
use weir_tests::scenario::{
    check_exhausted_record, check_flaky_retries, check_forbidden_output, check_memory_trap_record,
    check_order_chain, check_rejected_record, check_timeout_record, check_trap_record,
    check_undecodable_record, ext, flaky_policy, SPIN_TIMEOUT, TRACEPARENT,
};
use weir_tests::weir::InProcess;

/// Tests of this file run one at a time (see the module docs).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Generous bound for anything that should take milliseconds: the machine is shared.
const WAIT: Duration = Duration::from_secs(15);
/// Bound on one whole case (and on start-up, which compiles every component).
const CASE_TIMEOUT: Duration = Duration::from_secs(90);

/// Slack for scheduling when checking measured delays against a policy's bounds: the memory
/// bus wakes the retry on a tokio timer (≈1 ms granularity) and the runner then needs a slot
/// and a task; on a loaded 2-core machine that takes up to a few tens of ms.
const SCHEDULING_SLACK: Duration = Duration::from_millis(60);

/// Beyond the timeout: the epoch ticks every 10 ms, then the trap unwinds, the instance is
/// dropped, the DLQ record is appended and the long-poll wakes. Measured in the low ms; the
/// rest of the bound is scheduling slack on a shared 2-core machine.
const TIMEOUT_OVERHEAD: Duration = Duration::from_millis(100);
/// Documented extra slack for [`TIMEOUT_OVERHEAD`]: the HTTP round trips of the post and the
/// long-poll, on a machine where other test binaries compile and run at the same time.
const TIMEOUT_SLACK: Duration = Duration::from_millis(150);

/// Every function of these tests in one runtime. Module paths are relative to the components
/// directory. `http.max_body` is 1 KiB so case 9 can exceed it; every fixture stays below.
const CONFIG: &str = r#"
[http]
max_body = "1KiB"

[defaults]
timeout = "2s"
memory = "64MiB"

[defaults.trigger]
broker = "memory"

[defaults.retry]
max_attempts = 3
initial_delay = "50ms"
multiplier = 2.0
jitter = 0.2

[defaults.scaling]
min = 1
max = 2

[[functions]]
name = "db-audit"
module = "db_audit.wasm"
outputs = ["db.audit"]
[functions.trigger]
topic = "db.changes"

[[functions]]
name = "upload-indexer"
module = "upload_indexer.wasm"
outputs = ["uploads.indexed"]
[functions.trigger]
topic = "uploads"

[[functions]]
name = "order-validate"
module = "order_validate.wasm"
outputs = ["orders.validated"]
[functions.trigger]
topic = "orders"

[[functions]]
name = "order-enrich"
module = "order_enrich.wasm"
outputs = ["orders.enriched"]
config = { large_threshold = "1000", currency = "EUR" }
[functions.trigger]
topic = "orders.validated"

[[functions]]
name = "flaky"
module = "flaky.wasm"
outputs = ["flaky.out"]
config = { fail_attempts = "2", output_topic = "flaky.out" }
[functions.trigger]
topic = "flaky.in"
[functions.retry]
max_attempts = 5
initial_delay = "200ms"
multiplier = 2.0
jitter = 0.2

[[functions]]
name = "flaky-forever"
module = "flaky.wasm"
outputs = ["flaky.forever.out"]
config = { fail_attempts = "1000", output_topic = "flaky.forever.out" }
[functions.trigger]
topic = "flaky.forever"
[functions.retry]
max_attempts = 3
initial_delay = "50ms"

[[functions]]
name = "reject-all"
module = "reject_all.wasm"
[functions.trigger]
topic = "reject.in"

[[functions]]
name = "memory-hog"
module = "memory_hog.wasm"
memory = "32MiB"
[functions.trigger]
topic = "hog.in"
[functions.retry]
max_attempts = 1

[[functions]]
name = "always-trap"
module = "always_trap.wasm"
[functions.trigger]
topic = "trap.in"
[functions.retry]
max_attempts = 1

[[functions]]
name = "bad-output"
module = "bad_output.wasm"
outputs = ["ok.topic"]
[functions.trigger]
topic = "bad.in"
[functions.retry]
max_attempts = 2

[[functions]]
name = "echo"
module = "echo.wasm"
outputs = ["echo.out"]
[functions.trigger]
topic = "echo.in"

[[functions]]
name = "echo-isolated"
module = "echo.wasm"
isolation = "per-event"
outputs = ["isolated.out"]
config = { output_topic = "isolated.out" }
[functions.trigger]
topic = "isolated.in"
"#;

/// Headers of a CloudEvents binary-mode JSON event.
fn ce_headers<'a>(id: &'a str, ty: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("ce-specversion", "1.0"),
        ("ce-id", id),
        ("ce-source", "weir-tests"),
        ("ce-type", ty),
        ("content-type", "application/json"),
    ]
}

/// The single id of a 202 answer.
fn accepted_id(status: u16, answer: &Value) -> anyhow::Result<String> {
    ensure!(status == 202, "expected 202, got {status}: {answer}");
    match answer["ids"].as_array().map(Vec::as_slice) {
        Some([id]) => id.as_str().map(str::to_owned).context("id is not a string"),
        _ => bail!("expected exactly one id in {answer}"),
    }
}

/// The DLQ record for event `id` on function `function`'s dead-letter topic.
async fn dlq_record(weir: &InProcess, function: &str, id: &str) -> anyhow::Result<Value> {
    let topic = format!("weir.dlq.{function}");
    weir.wait_for_match(&topic, WAIT, |e| e["id"] == id)
        .await
        .with_context(|| format!("waiting for the DLQ record of {id} on {topic}"))
}

fn pool_stats(
    weir: &InProcess,
    function: &str,
) -> anyhow::Result<weir_dispatcher::pool::PoolStats> {
    Ok(weir.function(function)?.pool.stats())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foundation_end_to_end() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let weir = bounded("start", InProcess::start(CONFIG)).await?;
    bounded(
        "case 1: event kinds",
        event_kinds_reach_their_functions(&weir),
    )
    .await?;
    bounded(
        "case 2: flaky retries",
        flaky_succeeds_on_the_third_attempt_within_the_backoff_bounds(&weir),
    )
    .await?;
    bounded(
        "case 3: retries exhausted",
        retries_exhausted_are_dead_lettered_with_every_extension(&weir),
    )
    .await?;
    bounded("case 4: reject", reject_goes_to_the_dlq_at_once(&weir)).await?;
    bounded(
        "case 6: traps",
        traps_and_memory_breaches_are_dead_lettered(&weir),
    )
    .await?;
    bounded(
        "case 7: bad output",
        forbidden_outputs_are_never_published(&weir),
    )
    .await?;
    bounded("case 9: malformed inputs", malformed_inputs(&weir)).await?;
    bounded(
        "case 10: per-event isolation",
        per_event_isolation_starts_a_fresh_instance_each_time(&weir),
    )
    .await?;
    bounded(
        "case 8: still serving",
        still_serving_after_all_failures(&weir),
    )
    .await?;
    bounded("shutdown", weir.shutdown()).await
}

/// Runs one case with an overall bound, naming it in the error.
async fn bounded<T>(
    case: &str,
    work: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(CASE_TIMEOUT, work).await {
        Ok(result) => result.with_context(|| case.to_owned()),
        Err(_) => bail!("{case}: did not finish within {CASE_TIMEOUT:?}"),
    }
}

/// Case 1: Debezium (bare and wrapped), S3 with two records, and a custom order through the
/// two-function chain with its trace.
async fn event_kinds_reach_their_functions(weir: &InProcess) -> anyhow::Result<()> {
    // A bare Debezium envelope: an update that changed one column.
    let bare = json!({
        "before": {"id": 1, "status": "new", "total": 10},
        "after": {"id": 1, "status": "paid", "total": 10},
        "source": {"connector": "postgresql", "db": "shop", "schema": "public", "table": "orders"},
        "op": "u",
        "ts_ms": 1_700_000_000_000_i64
    });
    let (status, answer) = weir
        .post(
            "db.changes",
            &[("content-type", "application/json")],
            bare.to_string(),
        )
        .await?;
    let bare_id = accepted_id(status, &answer)?;
    // The same shape inside the JSON converter's schema/payload wrapper: an insert.
    let wrapped = json!({
        "schema": {"type": "struct", "name": "shop.inventory.items.Envelope"},
        "payload": {
            "before": null,
            "after": {"id": 2, "name": "widget"},
            "source": {"connector": "postgresql", "db": "shop", "schema": "inventory", "table": "items"},
            "op": "c",
            "ts_ms": 1_700_000_000_001_i64
        }
    });
    let (status, answer) = weir
        .post(
            "db.changes",
            &[("content-type", "application/json")],
            wrapped.to_string(),
        )
        .await?;
    let wrapped_id = accepted_id(status, &answer)?;

    let audit = weir
        .wait_for_match("db.audit", WAIT, |e| e["weircausation"] == bare_id.as_str())
        .await?;
    assert_eq!(
        audit["data"],
        json!({"table": "public.orders", "op": "update", "key": null, "changed": ["status"]}),
        "{audit}"
    );
    assert_eq!(audit["type"], "weir.db.audit");
    assert_eq!(ext(&audit, "weirhops"), "1");
    let audit = weir
        .wait_for_match("db.audit", WAIT, |e| {
            e["weircausation"] == wrapped_id.as_str()
        })
        .await?;
    assert_eq!(
        audit["data"],
        json!({"table": "inventory.items", "op": "create", "key": null, "changed": ["id", "name"]}),
        "{audit}"
    );

    // An S3 / MinIO notification with two records and URL-encoded keys (`+` is a space).
    let notification = json!({"Records": [
        {"eventVersion": "2.1", "eventSource": "minio:s3", "eventName": "s3:ObjectCreated:Put",
         "eventTime": "2024-05-01T10:00:00.000Z",
         "s3": {"bucket": {"name": "photos"},
                "object": {"key": "holiday+2024/beach%20day%281%29.jpg", "size": 1024, "eTag": "e1"}}},
        {"eventVersion": "2.1", "eventSource": "minio:s3", "eventName": "s3:ObjectCreated:Put",
         "eventTime": "2024-05-01T10:00:01.000Z",
         "s3": {"bucket": {"name": "photos"},
                "object": {"key": "docs/r%C3%A9sum%C3%A9.pdf", "size": 2048, "eTag": "e2"}}}
    ]});
    let body = notification.to_string();
    assert!(body.len() < 1024, "the fixture must fit http.max_body");
    let (status, answer) = weir
        .post("uploads", &[("content-type", "application/json")], body)
        .await?;
    assert_eq!(status, 202, "{answer}");
    let ids: Vec<String> = answer["ids"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i.as_str().map(str::to_owned))
        .collect();
    assert_eq!(ids.len(), 2, "one event per record: {answer}");
    let indexed = weir.wait_for("uploads.indexed", 2, WAIT).await?;
    assert_eq!(indexed.len(), 2, "{indexed:?}");
    let by_cause = |id: &str| indexed.iter().find(|e| e["weircausation"] == id).cloned();
    let first = by_cause(&ids[0]).context("no output for the first record")?;
    let second = by_cause(&ids[1]).context("no output for the second record")?;
    assert_eq!(
        first["data"],
        json!({"bucket": "photos", "key": "holiday 2024/beach day(1).jpg", "size": 1024, "etag": "e1", "kind": "image"})
    );
    assert_eq!(
        second["data"],
        json!({"bucket": "photos", "key": "docs/résumé.pdf", "size": 2048, "etag": "e2", "kind": "document"})
    );

    // A custom order with a W3C trace, through order-validate and order-enrich.
    let mut headers = ce_headers("order-1", "com.example.order");
    headers.push(("traceparent", TRACEPARENT));
    let (status, answer) = weir
        .post("orders", &headers, r#"{"id":"o-1","amount":42}"#)
        .await?;
    assert_eq!(
        accepted_id(status, &answer)?,
        "order-1",
        "a CloudEvent keeps its id"
    );
    let validated = weir
        .wait_for_match("orders.validated", WAIT, |e| {
            e["weircausation"] == "order-1"
        })
        .await?;
    let enriched = weir
        .wait_for_match("orders.enriched", WAIT, |e| e["data"]["id"] == "o-1")
        .await?;
    check_order_chain(&validated, &enriched)
}

/// Case 2: `flaky` fails twice with `retry`, then succeeds; the gaps between attempts are the
/// policy's delays (200 ms then 400 ms, ±20 %).
async fn flaky_succeeds_on_the_third_attempt_within_the_backoff_bounds(
    weir: &InProcess,
) -> anyhow::Result<()> {
    let flaky = weir.function("flaky")?;
    assert_eq!(
        flaky.spec.retry,
        flaky_policy(),
        "the configured policy is the one checked here"
    );
    let (status, answer) = weir
        .post(
            "flaky.in",
            &ce_headers("flaky-1", "com.example.flaky"),
            r#"{"n":1}"#,
        )
        .await?;
    accepted_id(status, &answer)?;
    let output = weir
        .wait_for_match("flaky.out", WAIT, |e| e["weircausation"] == "flaky-1")
        .await?;
    assert_eq!(output["data"], json!({"n": 1}), "flaky echoes its input");
    check_flaky_retries(&flaky, "flaky-1", &output, SCHEDULING_SLACK)?;
    Ok(())
}

/// Case 3: a function that always asks to retry is dead-lettered after exactly `max_attempts`,
/// with every `weirdlq*` extension right and the original event unchanged.
async fn retries_exhausted_are_dead_lettered_with_every_extension(
    weir: &InProcess,
) -> anyhow::Result<()> {
    let data = json!({"order": "o-77", "lines": [1, 2, 3]});
    let mut headers = ce_headers("forever-1", "com.example.forever");
    headers.push(("ce-subject", "orders/o-77"));
    let (status, answer) = weir
        .post("flaky.forever", &headers, data.to_string())
        .await?;
    accepted_id(status, &answer)?;
    let record = dlq_record(weir, "flaky-forever", "forever-1").await?;

    let functions = weir.get_json("/v1/functions").await?;
    let view = functions["functions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|f| f["name"] == "flaky-forever")
        .context("flaky-forever in /v1/functions")?;
    let sha256 = view["module_sha256"].as_str().context("module_sha256")?;
    assert_eq!(sha256.len(), 64);
    let seq = weir
        .messages("flaky.forever")
        .await?
        .into_iter()
        .find(|(_, events)| events.iter().any(|e| e["id"] == "forever-1"))
        .map(|(seq, _)| seq)
        .context("the input in flaky.forever's history")?;

    check_exhausted_record(
        &record,
        &data,
        sha256,
        &format!("memory://flaky.forever/{seq}"),
    )?;
    assert_eq!(
        ext(&record, "traceparent").split('-').count(),
        4,
        "ingress stamped a trace: {record}"
    );

    let runner = weir.function("flaky-forever")?;
    let attempts = runner
        .recent_failures()
        .into_iter()
        .filter(|f| f.event_id == "forever-1")
        .count();
    assert_eq!(attempts, 3, "exactly three attempts");
    assert_eq!(
        runner
            .counters
            .dead_lettered
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // Nothing more arrives: one record only.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let records = weir.history("weir.dlq.flaky-forever").await?;
    assert_eq!(records.len(), 1, "exactly one DLQ record: {records:?}");
    assert!(weir.history("flaky.forever.out").await?.is_empty());
    Ok(())
}

/// Case 4: a `reject` is dead-lettered after one attempt.
async fn reject_goes_to_the_dlq_at_once(weir: &InProcess) -> anyhow::Result<()> {
    let (status, answer) = weir
        .post("reject.in", &ce_headers("reject-1", "com.example.x"), "{}")
        .await?;
    accepted_id(status, &answer)?;
    let record = dlq_record(weir, "reject-all", "reject-1").await?;
    check_rejected_record(&record)?;
    let runner = weir.function("reject-all")?;
    assert_eq!(
        runner
            .counters
            .retried
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "a reject burns no retries"
    );
    assert_eq!(
        runner.pool.stats().discarded,
        0,
        "a reject leaves the instance reusable"
    );
    Ok(())
}

/// Case 5: a guest that never returns is stopped at its timeout; its instance is discarded.
async fn timeout_is_enforced_and_dead_lettered(weir: &InProcess) -> anyhow::Result<()> {
    let before = pool_stats(weir, "spin")?;
    assert_eq!(
        before.idle, 1,
        "scaling.min = 1 pre-warms the instance: {before:?}"
    );
    let posted = Instant::now();
    let (status, answer) = weir
        .post("spin.in", &ce_headers("spin-1", "com.example.x"), "{}")
        .await?;
    accepted_id(status, &answer)?;
    let record = dlq_record(weir, "spin", "spin-1").await?;
    let elapsed = posted.elapsed();
    check_timeout_record(
        &record,
        elapsed,
        SPIN_TIMEOUT + TIMEOUT_OVERHEAD + TIMEOUT_SLACK,
    )?;
    let after = pool_stats(weir, "spin")?;
    assert_eq!(
        after.discarded,
        before.discarded + 1,
        "the timed-out instance is discarded: {after:?}"
    );
    Ok(())
}

/// Case 5 in its own runtime: while the bug below stands, the spinning guest is never stopped
/// and occupies a runtime worker for good, so the test owns its tokio runtime (extra workers
/// keep the timers running, and `shutdown_background` does not wait for the stuck worker) and
/// fails instead of hanging.
#[test]
fn timeout_is_enforced() -> anyhow::Result<()> {
    let _serial = SERIAL.blocking_lock();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        let weir = bounded("start", InProcess::start(SPIN_ONLY)).await?;
        bounded(
            "case 5: timeout",
            timeout_is_enforced_and_dead_lettered(&weir),
        )
        .await?;
        bounded("shutdown", weir.shutdown()).await
    });
    runtime.shutdown_background();
    result
}

const SPIN_ONLY: &str = r#"
[defaults.trigger]
broker = "memory"

[[functions]]
name = "spin"
module = "spin.wasm"
timeout = "300ms"
[functions.trigger]
topic = "spin.in"
[functions.retry]
max_attempts = 1
[functions.scaling]
min = 1
max = 1
"#;

/// Case 6: running out of memory and `unreachable` are traps; the instances are discarded.
async fn traps_and_memory_breaches_are_dead_lettered(weir: &InProcess) -> anyhow::Result<()> {
    let (status, answer) = weir
        .post("hog.in", &ce_headers("hog-1", "com.example.x"), "{}")
        .await?;
    accepted_id(status, &answer)?;
    let record = dlq_record(weir, "memory-hog", "hog-1").await?;
    check_memory_trap_record(&record)?;
    assert!(pool_stats(weir, "memory-hog")?.discarded >= 1);

    let (status, answer) = weir
        .post("trap.in", &ce_headers("trap-1", "com.example.x"), "{}")
        .await?;
    accepted_id(status, &answer)?;
    let record = dlq_record(weir, "always-trap", "trap-1").await?;
    check_trap_record(&record)?;
    assert!(pool_stats(weir, "always-trap")?.discarded >= 1);
    Ok(())
}

/// Case 7: an output to a topic the function may not use fails the invocation and nothing
/// is published there.
async fn forbidden_outputs_are_never_published(weir: &InProcess) -> anyhow::Result<()> {
    let (status, answer) = weir
        .post("bad.in", &ce_headers("bad-1", "com.example.x"), "{}")
        .await?;
    accepted_id(status, &answer)?;
    let record = dlq_record(weir, "bad-output", "bad-1").await?;
    let bad_output = weir.function("bad-output")?;
    check_forbidden_output(&record, &bad_output, "forbidden.topic")?;
    assert!(
        weir.history("forbidden.topic").await?.is_empty(),
        "nothing was published to forbidden.topic"
    );
    assert!(weir.history("ok.topic").await?.is_empty());
    assert!(
        !weir
            .shared()
            .memory
            .topics()
            .iter()
            .any(|t| t.name == "forbidden.topic" && t.last_seq > 0),
        "forbidden.topic never received a message"
    );
    Ok(())
}

/// Case 9: malformed input over HTTP is refused with a precise 4xx; malformed input on the
/// bus is dead-lettered byte for byte.
async fn malformed_inputs(weir: &InProcess) -> anyhow::Result<()> {
    let (status, answer) = weir
        .post(
            "echo.in",
            &[("content-type", "application/cloudevents+json")],
            "{\"specversion\": ",
        )
        .await?;
    assert_eq!(
        (status, answer["kind"].as_str()),
        (400, Some("json")),
        "{answer}"
    );

    let mut headers = ce_headers("old-1", "com.example.x");
    headers[0] = ("ce-specversion", "0.3");
    let (status, answer) = weir.post("echo.in", &headers, "{}").await?;
    assert_eq!(
        (status, answer["kind"].as_str()),
        (400, Some("specversion")),
        "{answer}"
    );

    let (status, answer) = weir
        .post(
            "echo.in",
            &[("content-type", "application/json")],
            "x".repeat(1025),
        )
        .await?;
    assert_eq!(
        (status, answer["kind"].as_str()),
        (413, Some("body")),
        "a body over http.max_body is a JSON problem like any other refusal: {answer}"
    );
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("http.max_body (1.0 KiB)")),
        "{answer}"
    );

    // A Debezium tombstone: a literal JSON null.
    let (status, answer) = weir
        .post(
            "db.changes",
            &[("content-type", "application/json")],
            "null",
        )
        .await?;
    let tombstone_id = accepted_id(status, &answer)?;
    let audit = weir
        .wait_for_match("db.audit", WAIT, |e| {
            e["weircausation"] == tombstone_id.as_str()
        })
        .await?;
    assert_eq!(audit["data"]["op"], "tombstone", "{audit}");
    assert_eq!(audit["data"]["changed"], json!([]));

    // Undecodable on the bus (CloudEvents 0.3 is not read): DLQ `undecodable`, bytes intact.
    let raw = Bytes::from_static(b"\x00\x01 not json \xff");
    let seq_before = weir
        .shared()
        .memory
        .topics()
        .into_iter()
        .find(|t| t.name == "echo.in")
        .map_or(0, |t| t.last_seq);
    weir.shared()
        .memory
        .publisher()
        .publish(OutboundMessage {
            topic: "echo.in".to_owned(),
            key: None,
            headers: vec![
                ("ce-specversion".into(), "0.3".to_owned()),
                ("ce-id".into(), "legacy-1".to_owned()),
                ("ce-source".into(), "legacy".to_owned()),
                ("ce-type".into(), "com.example.legacy".to_owned()),
                ("content-type".into(), "application/octet-stream".to_owned()),
            ],
            payload: raw.clone(),
            dedup_id: None,
        })
        .await?;
    let origin = format!("memory://echo.in/{}", seq_before + 1);
    let record = weir
        .wait_for_match("weir.dlq.echo", WAIT, |e| {
            e["weirdlqorigin"] == origin.as_str()
        })
        .await?;
    check_undecodable_record(&record, &raw)?;
    assert!(
        weir.history("echo.out").await?.is_empty(),
        "echo never ran on it"
    );

    // Invalid MessagePack in a typed event: it decodes as a CloudEvent (data is opaque bytes to
    // the envelope), so it reaches db-audit, whose `event.db_change()?` fails to decode it and
    // rejects it: DLQ `rejected` at once, not retried.
    let headers = [
        ("ce-specversion", "1.0"),
        ("ce-id", "badpack-1"),
        ("ce-source", "weir-tests"),
        ("ce-type", "weir.db.change"),
        ("content-type", "application/vnd.weir.dbchange+msgpack"),
    ];
    let (status, answer) = weir
        .post("db.changes", &headers, &b"\xc1\xc1 not msgpack"[..])
        .await?;
    accepted_id(status, &answer)?;
    let record = dlq_record(weir, "db-audit", "badpack-1").await?;
    assert_eq!(ext(&record, "weirdlqreason"), "rejected", "{record}");
    assert_eq!(ext(&record, "weirdlqattempts"), "1");
    let error = ext(&record, "weirdlqerror");
    println!("invalid MessagePack is rejected with: {error}");
    assert!(
        error.to_lowercase().contains("msgpack") || error.contains("MessagePack"),
        "{record}"
    );
    Ok(())
}

/// Case 10: `isolation = "per-event"` gives every event a fresh instance.
async fn per_event_isolation_starts_a_fresh_instance_each_time(
    weir: &InProcess,
) -> anyhow::Result<()> {
    let before = pool_stats(weir, "echo-isolated")?;
    assert_eq!(
        before.live, 0,
        "per-event isolation keeps no warm instance: {before:?}"
    );
    for n in 1..=3u64 {
        let id = format!("iso-{n}");
        let (status, answer) = weir
            .post(
                "isolated.in",
                &ce_headers(&id, "com.example.x"),
                format!("{{\"n\":{n}}}"),
            )
            .await?;
        accepted_id(status, &answer)?;
        let out = weir
            .wait_for_match("isolated.out", WAIT, |e| e["weircausation"] == id.as_str())
            .await?;
        assert_eq!(out["data"], json!({"n": n}));
        // The instance is retired as the invocation ends, just before the output is published.
        let stats = pool_stats(weir, "echo-isolated")?;
        assert_eq!(
            stats.starts,
            before.starts + n,
            "one start per event: {stats:?}"
        );
        assert_eq!(
            stats.recycled,
            before.recycled + n,
            "each instance is retired after its event: {stats:?}"
        );
    }
    assert_eq!(pool_stats(weir, "echo-isolated")?.live, 0);
    Ok(())
}

/// Case 8: after every failure above, orders still flow through the chain and the failing
/// functions' pools still serve.
async fn still_serving_after_all_failures(weir: &InProcess) -> anyhow::Result<()> {
    let (status, answer) = weir
        .post(
            "orders",
            &ce_headers("order-2", "com.example.order"),
            r#"{"id":"o-2","amount":5000}"#,
        )
        .await?;
    accepted_id(status, &answer)?;
    let enriched = weir
        .wait_for_match("orders.enriched", WAIT, |e| e["data"]["id"] == "o-2")
        .await?;
    assert_eq!(enriched["data"]["tier"], "large");
    assert_eq!(ext(&enriched, "weirhops"), "2");
    // The failing functions take the next event too (a fresh instance replaces a discarded one).
    let (status, answer) = weir
        .post("trap.in", &ce_headers("trap-2", "com.example.x"), "{}")
        .await?;
    accepted_id(status, &answer)?;
    let record = dlq_record(weir, "always-trap", "trap-2").await?;
    assert_eq!(ext(&record, "weirdlqreason"), "trap");
    let (status, answer) = weir
        .post(
            "echo.in",
            &ce_headers("echo-ok", "com.example.x"),
            r#"{"ok":true}"#,
        )
        .await?;
    accepted_id(status, &answer)?;
    let echoed = weir
        .wait_for_match("echo.out", WAIT, |e| e["weircausation"] == "echo-ok")
        .await?;
    assert_eq!(echoed["data"], json!({"ok": true}));
    let functions = weir.get_json("/v1/functions").await?;
    let paused: Vec<&Value> = functions["functions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|f| f["dead_letter_paused"] == true)
        .collect();
    assert!(paused.is_empty(), "no lane is paused: {paused:?}");
    Ok(())
}

/// A binary-mode request with `ce-` attributes but no `ce-id` is a broken CloudEvent, not a
/// custom event: it must be refused, naming the missing attribute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_mode_without_ce_id_is_refused() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let weir = InProcess::start(ECHO_ONLY).await?;
    let headers = [
        ("ce-specversion", "1.0"),
        ("ce-source", "weir-tests"),
        ("ce-type", "com.example.x"),
        ("content-type", "application/json"),
    ];
    let (status, answer) = weir.post("echo.in", &headers, r#"{"n":1}"#).await?;
    let result = (status, answer["kind"].as_str().map(str::to_owned));
    weir.shutdown().await?;
    assert_eq!(
        result,
        (400, Some("missing_attribute".to_owned())),
        "{answer}"
    );
    assert!(
        answer["error"].as_str().unwrap_or_default().contains("id"),
        "{answer}"
    );
    Ok(())
}

/// The history endpoint `weir tail` reads refuses a query it cannot use with the same JSON
/// problem as ingress (axum's own rejection is plain text), asks for `limit` of at least 1
/// (`limit=0` used to return one event), takes a larger one (capped at 1,000), starts at the
/// oldest event without `after` (it used to give the newest page), and takes any `after` (the
/// largest one used to overflow: a panic in a debug build, the oldest events in release).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_queries_are_checked() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let weir = InProcess::start(ECHO_ONLY).await?;
    let result = history_queries(&weir).await;
    weir.shutdown().await?;
    result
}

async fn history_queries(weir: &InProcess) -> anyhow::Result<()> {
    for n in 0..3 {
        let (status, answer) = weir
            .post(
                "echo.in",
                &ce_headers(&format!("h-{n}"), "com.example.x"),
                "{}",
            )
            .await?;
        accepted_id(status, &answer)?;
    }
    let path = |query: &str| format!("/v1/topics/echo.in/events?{query}");
    for (query, says) in [
        ("limit=0", "limit=0"),
        ("limit=-1", "limit"),
        ("limit=many", "limit"),
        ("after=first", "after"),
        ("wait=forever", "wait"),
    ] {
        let (status, text) = weir.get(&path(query)).await?;
        let answer: Value = serde_json::from_str(&text)
            .with_context(|| format!("?{query} answers JSON, not {text:?}"))?;
        ensure!(
            status == 400
                && answer["kind"] == "query"
                && answer["error"].as_str().is_some_and(|e| e.contains(says)),
            "?{query} is a 400 query problem naming {says:?}: {status} {answer}"
        );
    }
    let page = weir.get_json(&path("limit=5000")).await?;
    let seqs: Vec<u64> = page["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["seq"].as_u64())
        .collect();
    ensure!(
        seqs == [1, 2, 3],
        "limit=5000 is a page of all three: {page}"
    );
    let page = weir.get_json(&path("limit=1")).await?;
    ensure!(
        page["messages"][0]["seq"] == 1 && page["next"] == 1,
        "without `after`, the oldest first: {page}"
    );
    let page = weir.get_json(&path("limit=1&after=1")).await?;
    ensure!(
        page["messages"][0]["seq"] == 2 && page["next"] == 2,
        "one page of one after 1: {page}"
    );
    let last = u64::MAX;
    let page = weir.get_json(&path(&format!("after={last}"))).await?;
    ensure!(
        page["messages"] == json!([]) && page["next"] == last,
        "nothing after the largest sequence: {page}"
    );
    Ok(())
}

/// The HTTP binding's batched mode: every event of the batch is its own message (its id kept,
/// its function run), all or nothing. A batch with one bad event publishes none of them, and
/// its refusal names the event; a body that is no array is refused as a batch. Batches used to
/// be read as one structured event and refused with "expected a map".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_requests_publish_each_event() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let weir = InProcess::start(ECHO_ONLY).await?;
    let result = batched_requests(&weir).await;
    weir.shutdown().await?;
    result
}

async fn batched_requests(weir: &InProcess) -> anyhow::Result<()> {
    let batch = [("content-type", "application/cloudevents-batch+json")];
    let event = |id: &str| {
        json!({"specversion": "1.0", "id": id, "source": "batcher", "type": "com.example.x",
               "data": {"id": id}})
    };
    let (status, answer) = weir
        .post(
            "echo.in",
            &batch,
            json!([event("b-1"), event("b-2")]).to_string(),
        )
        .await?;
    ensure!(
        status == 202 && answer["ids"] == json!(["b-1", "b-2"]),
        "a batch of two is accepted with both ids: {status} {answer}"
    );
    for id in ["b-1", "b-2"] {
        let echoed = weir
            .wait_for_match("echo.out", WAIT, |e| e["weircausation"] == id)
            .await?;
        ensure!(echoed["data"] == json!({"id": id}), "{echoed}");
    }

    let mut nameless = event("b-4");
    if let Some(attributes) = nameless.as_object_mut() {
        attributes.remove("id");
    }
    let refusals = [
        (
            json!([event("b-3"), nameless]).to_string(),
            "missing_attribute",
            "event [1] of the batch",
        ),
        (event("b-5").to_string(), "batch", "must be a JSON array"),
        ("[1]".to_owned(), "json", "event [0] of the batch"),
    ];
    for (body, kind, says) in refusals {
        let (status, answer) = weir.post("echo.in", &batch, body.clone()).await?;
        ensure!(
            status == 400
                && answer["kind"] == kind
                && answer["error"].as_str().is_some_and(|e| e.contains(says)),
            "{body} is refused ({kind}, {says:?}): {status} {answer}"
        );
    }
    let (status, answer) = weir.post("echo.in", &batch, "[]").await?;
    ensure!(
        status == 202 && answer["ids"] == json!([]),
        "an empty batch publishes nothing: {status} {answer}"
    );
    let ids: Vec<Value> = weir
        .history("echo.in")
        .await?
        .into_iter()
        .map(|e| e["id"].clone())
        .collect();
    ensure!(
        ids == [json!("b-1"), json!("b-2")],
        "echo.in holds the first batch's two events and nothing of the refused ones: {ids:?}"
    );
    Ok(())
}

const ECHO_ONLY: &str = r#"
[defaults.trigger]
broker = "memory"

[[functions]]
name = "echo"
module = "echo.wasm"
outputs = ["echo.out"]
[functions.trigger]
topic = "echo.in"
"#;

const SPIN_BESIDE_ECHO: &str = r#"
[defaults.trigger]
broker = "memory"

[[functions]]
name = "spin"
module = "spin.wasm"
timeout = "5s"
[functions.trigger]
topic = "spin.in"
ordering = "none"
[functions.retry]
max_attempts = 1
[functions.scaling]
min = 2
max = 2

[[functions]]
name = "echo"
module = "echo.wasm"
outputs = ["echo.out"]
[functions.trigger]
topic = "echo.in"
[functions.scaling]
min = 1
max = 1
"#;

/// Guests that burn CPU do not starve other functions: two spinning guests occupy as many
/// instances as the runtime has workers, yet an event for another function is handled long
/// before their 5 s timeout, because a guest yields to the executor at every epoch tick. (Were
/// they to hold the workers, even this test's own timers would wait for the timeout.)
#[test]
fn spinning_guests_do_not_starve_other_functions() -> anyhow::Result<()> {
    let _serial = SERIAL.blocking_lock();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        let weir = bounded("start", InProcess::start(SPIN_BESIDE_ECHO)).await?;
        let started = Instant::now();
        for id in ["burn-1", "burn-2"] {
            let (status, answer) = weir
                .post("spin.in", &ce_headers(id, "com.example.x"), "{}")
                .await?;
            accepted_id(status, &answer)?;
        }
        // Let both spinning invocations get going on the two workers.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (status, answer) = weir
            .post(
                "echo.in",
                &ce_headers("echo-while-burning", "com.example.x"),
                "{\"n\":1}",
            )
            .await?;
        accepted_id(status, &answer)?;
        weir.wait_for("echo.out", 1, Duration::from_secs(10))
            .await?;
        let waited = started.elapsed();
        let spin = pool_stats(&weir, "spin")?;
        assert_eq!(
            spin.busy, 2,
            "both spinning guests were still running: {spin:?}"
        );
        assert!(
            waited < Duration::from_millis(2500),
            "echo was handled {waited:?} after two guests started spinning (their timeout is 5 s)"
        );
        bounded("shutdown", weir.shutdown()).await
    });
    runtime.shutdown_background();
    result
}
