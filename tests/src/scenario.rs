//! What the foundation scenarios must end in, whichever transport carried them: the checks that
//! `foundation.rs` (memory bus), `nats_e2e.rs` (JetStream and core NATS) and `kafka_e2e.rs`
//! make on the same functions' outputs, dead-letter records and failure history.
//!
//! Each check takes what the test read back and says precisely what is wrong. Publishing,
//! waiting and the broker's own bookkeeping (acks, commits, delivery counts, the `origin` of a
//! record) stay in the tests, because those differ by broker and are what each test is for.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context as _};
use base64::prelude::{Engine as _, BASE64_STANDARD};
use serde_json::{json, Value};
use weir_dispatcher::retry::RetryPolicy;
use weir_dispatcher::runner::FunctionRunner;

/// The trace the order chain's input carries, and its id.
pub const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
pub const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// The timeout the scenario configurations give `spin`.
pub const SPIN_TIMEOUT: Duration = Duration::from_millis(300);

/// Timestamps in events and failure records have millisecond precision: a measured gap may
/// fall this much below the policy's lower bound.
const TIMESTAMP_PRECISION: Duration = Duration::from_millis(5);

/// An extension attribute of a JSON-rendered event, `""` when absent.
pub fn ext<'a>(event: &'a Value, name: &str) -> &'a str {
    event[name].as_str().unwrap_or_default()
}

pub fn parse_time(text: &str) -> anyhow::Result<SystemTime> {
    humantime::parse_rfc3339_weak(text).with_context(|| format!("{text:?} is not an RFC 3339 time"))
}

pub fn since(later: SystemTime, earlier: SystemTime) -> anyhow::Result<Duration> {
    later
        .duration_since(earlier)
        .with_context(|| format!("{later:?} is before {earlier:?}"))
}

/// Writes `text` as `weir.toml` in `dir`.
pub fn write_config(dir: &Path, text: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join("weir.toml");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The `[[functions]]` of the failure scenarios on a broker, as the checks below expect them:
/// `flaky-forever` (3 attempts, 50 ms apart and doubling), `reject-all`, `spin` (timing out
/// after [`SPIN_TIMEOUT`]), `memory-hog` (32 MiB), `always-trap`, `bad-output` (writing to
/// `{prefix}.forbidden.topic`, allowed only `{prefix}.ok.topic`) and `echo`. Each reads
/// `{prefix}.forever.in`, `{prefix}.reject.in`, `{prefix}.spin.in`, `{prefix}.hog.in`,
/// `{prefix}.trap.in`, `{prefix}.bad.in` and `{prefix}.echo.in`; the configuration's
/// `[defaults.trigger]` names the broker, and `trigger` adds its lines to every trigger (a
/// JetStream stream, say).
pub fn failure_functions(prefix: &str, trigger: &str) -> String {
    let p = prefix;
    format!(
        r#"
[[functions]]
name = "flaky-forever"
module = "flaky.wasm"
outputs = ["{p}.forever.out"]
config = {{ fail_attempts = "1000", output_topic = "{p}.forever.out" }}
[functions.trigger]
topic = "{p}.forever.in"
{trigger}
[functions.retry]
max_attempts = 3
initial_delay = "50ms"

[[functions]]
name = "reject-all"
module = "reject_all.wasm"
[functions.trigger]
topic = "{p}.reject.in"
{trigger}

[[functions]]
name = "spin"
module = "spin.wasm"
timeout = "300ms"
[functions.trigger]
topic = "{p}.spin.in"
{trigger}
[functions.retry]
max_attempts = 1
[functions.scaling]
min = 1
max = 1

[[functions]]
name = "memory-hog"
module = "memory_hog.wasm"
memory = "32MiB"
[functions.trigger]
topic = "{p}.hog.in"
{trigger}
[functions.retry]
max_attempts = 1

[[functions]]
name = "always-trap"
module = "always_trap.wasm"
[functions.trigger]
topic = "{p}.trap.in"
{trigger}
[functions.retry]
max_attempts = 1

[[functions]]
name = "bad-output"
module = "bad_output.wasm"
outputs = ["{p}.ok.topic"]
config = {{ topic = "{p}.forbidden.topic" }}
[functions.trigger]
topic = "{p}.bad.in"
{trigger}
[functions.retry]
max_attempts = 2

[[functions]]
name = "echo"
module = "echo.wasm"
outputs = ["{p}.echo.out"]
config = {{ output_topic = "{p}.echo.out" }}
[functions.trigger]
topic = "{p}.echo.in"
{trigger}
"#
    )
}

/// The policy the scenario configurations give `flaky` (200 ms, doubling, ±20 %); what they
/// leave out (`max_delay`, `max_age`) is the default.
pub fn flaky_policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 5,
        initial_delay: Duration::from_millis(200),
        multiplier: 2.0,
        jitter: 0.2,
        ..RetryPolicy::default()
    }
}

/// `{"id":"o-1","amount":42}` with [`TRACEPARENT`] through `order-validate` and
/// `order-enrich`: the enriched data, the hop count, the causation chain, and one trace with a
/// span of its own per hop.
pub fn check_order_chain(validated: &Value, enriched: &Value) -> anyhow::Result<()> {
    let expected =
        json!({"id": "o-1", "amount": 42, "validated": true, "tier": "small", "currency": "EUR"});
    ensure!(enriched["data"] == expected, "enriched data: {enriched}");
    ensure!(
        enriched["type"] == "weir.order.enriched",
        "type: {enriched}"
    );
    ensure!(ext(validated, "weirhops") == "1", "hops: {validated}");
    ensure!(ext(enriched, "weirhops") == "2", "hops: {enriched}");
    ensure!(
        ext(enriched, "weircausation") == ext(validated, "id"),
        "causation names the validated event: {enriched} after {validated}"
    );
    for event in [validated, enriched] {
        let traceparent = ext(event, "traceparent");
        ensure!(
            traceparent.split('-').nth(1) == Some(TRACE_ID),
            "trace id carried: {event}"
        );
        ensure!(
            traceparent != TRACEPARENT,
            "each hop has its own span id: {event}"
        );
    }
    Ok(())
}

/// `flaky` (failing its first two attempts with `retry`) after `event_id` succeeded as
/// `output`: exactly two failures, naming attempts 1 and 2, one success, and each gap between
/// attempts within `flaky`'s policy, up to `slack` late.
pub fn check_flaky_retries(
    flaky: &FunctionRunner,
    event_id: &str,
    output: &Value,
    slack: Duration,
) -> anyhow::Result<()> {
    let failures: Vec<_> = flaky
        .recent_failures()
        .into_iter()
        .filter(|f| f.event_id == event_id)
        .collect();
    ensure!(
        failures.len() == 2,
        "exactly two failed attempts: {failures:?}"
    );
    for (index, failure) in failures.iter().enumerate() {
        let expected = format!("function asked to retry: attempt {} failed", index + 1);
        ensure!(
            failure.error == expected && failure.outcome == "retry",
            "failure {} of {event_id} (the attempt number grows): {failure:?}",
            index + 1
        );
    }
    let succeeded = flaky.counters.succeeded.load(Relaxed);
    let retried = flaky.counters.retried.load(Relaxed);
    ensure!(
        (succeeded, retried) == (1, 2),
        "flaky succeeded {succeeded} times and retried {retried} times, not 1 and 2"
    );
    // The output's `time` is stamped when the third attempt succeeded (the input had none).
    let attempts = [
        parse_time(&failures[0].at)?,
        parse_time(&failures[1].at)?,
        parse_time(ext(output, "time"))?,
    ];
    let policy = &flaky.spec.retry;
    for (index, pair) in attempts.windows(2).enumerate() {
        let failed_attempt = index as u32 + 1;
        let gap = since(pair[1], pair[0])?;
        let (low, high) = policy.delay_bounds(failed_attempt);
        println!("flaky: delay after attempt {failed_attempt}: {gap:?} (policy {low:?}..{high:?})");
        ensure!(
            gap + TIMESTAMP_PRECISION >= low && gap <= high + slack,
            "the delay after attempt {failed_attempt} was {gap:?}, outside {low:?}..{high:?} (+{slack:?})"
        );
    }
    Ok(())
}

/// The `flaky-forever` record of event `forever-1` (subject `orders/o-77`, JSON `data`):
/// retries exhausted after 3 attempts, every `weirdlq*` extension right, the original unchanged.
pub fn check_exhausted_record(
    record: &Value,
    data: &Value,
    module_sha256: &str,
    origin: &str,
) -> anyhow::Result<()> {
    check_extensions(
        record,
        &[
            ("weirdlqreason", "retries-exhausted"),
            ("weirdlqattempts", "3"),
            ("weirdlqfunction", "flaky-forever"),
            ("weirdlqmodule", module_sha256),
            ("weirdlqorigin", origin),
            ("weirdlqerror", "function asked to retry: attempt 3 failed"),
        ],
    )?;
    ensure!(
        module_sha256.len() == 64,
        "a SHA-256 in hex: {module_sha256}"
    );
    let first = parse_time(ext(record, "weirdlqfirstfailure"))?;
    let last = parse_time(ext(record, "weirdlqlastfailure"))?;
    let span = since(last, first).context("the first failure is after the last")?;
    // Two delays of at least 40 ms and 80 ms (`flaky-forever`'s 50 ms, doubling, less the
    // default jitter) separate the first and the last failure.
    ensure!(
        span >= Duration::from_millis(115),
        "first..last failure spans only {span:?}"
    );
    for (name, expected) in [
        ("id", json!("forever-1")),
        ("type", json!("com.example.forever")),
        ("source", json!("weir-tests")),
        ("subject", json!("orders/o-77")),
        ("datacontenttype", json!("application/json")),
        ("data", data.clone()),
    ] {
        ensure!(
            record[name] == expected,
            "the original's {name} is {expected}: {record}"
        );
    }
    Ok(())
}

/// The `reject-all` record: rejected after one attempt, the function's reason kept as written.
pub fn check_rejected_record(record: &Value) -> anyhow::Result<()> {
    check_extensions(
        record,
        &[
            ("weirdlqreason", "rejected"),
            ("weirdlqattempts", "1"),
            ("weirdlqerror", "rejected by test"),
        ],
    )
}

/// The `spin` record, `elapsed` after the event was sent: a timeout after one attempt, not
/// before [`SPIN_TIMEOUT`] and not after `bound`.
pub fn check_timeout_record(
    record: &Value,
    elapsed: Duration,
    bound: Duration,
) -> anyhow::Result<()> {
    check_extensions(
        record,
        &[("weirdlqreason", "timeout"), ("weirdlqattempts", "1")],
    )?;
    ensure!(
        ext(record, "weirdlqerror").contains("timed out after 300ms"),
        "the error names the timeout: {record}"
    );
    ensure!(
        elapsed >= SPIN_TIMEOUT,
        "dead-lettered after {elapsed:?}, before the timeout"
    );
    ensure!(
        elapsed <= bound,
        "dead-lettered after {elapsed:?}, later than {bound:?}"
    );
    Ok(())
}

/// The `memory-hog` record: a trap that names the 32 MiB limit.
pub fn check_memory_trap_record(record: &Value) -> anyhow::Result<()> {
    check_extensions(record, &[("weirdlqreason", "trap")])?;
    let error = ext(record, "weirdlqerror");
    ensure!(
        error.contains("memory limit") && error.contains("32"),
        "the error names the 32 MiB limit: {error}"
    );
    Ok(())
}

/// The `always-trap` record: a trap, said so.
pub fn check_trap_record(record: &Value) -> anyhow::Result<()> {
    check_extensions(record, &[("weirdlqreason", "trap")])?;
    ensure!(
        ext(record, "weirdlqerror").starts_with("trapped: "),
        "{record}"
    );
    Ok(())
}

/// The `bad-output` record and failures: both attempts broke the output rule by writing to
/// `forbidden_topic`, so the retries ran out.
pub fn check_forbidden_output(
    record: &Value,
    bad_output: &FunctionRunner,
    forbidden_topic: &str,
) -> anyhow::Result<()> {
    check_extensions(
        record,
        &[
            ("weirdlqreason", "retries-exhausted"),
            ("weirdlqattempts", "2"),
        ],
    )?;
    let error = ext(record, "weirdlqerror");
    ensure!(
        error.contains(&format!("\"{forbidden_topic}\""))
            && error.contains("not in the function's allowed outputs"),
        "the error names the topic and the rule: {error}"
    );
    let failures = bad_output.recent_failures();
    ensure!(
        !failures.is_empty() && failures.iter().all(|f| f.outcome == "output_rule"),
        "every failure is the output rule's: {failures:?}"
    );
    Ok(())
}

/// The `echo` record of an event that does not decode (CloudEvents 0.3, `raw` as
/// `application/octet-stream`): `undecodable` at once, the version named, the bytes unchanged.
pub fn check_undecodable_record(record: &Value, raw: &[u8]) -> anyhow::Result<()> {
    check_extensions(
        record,
        &[
            ("weirdlqreason", "undecodable"),
            ("weirdlqfunction", "echo"),
            ("weirdlqattempts", "1"),
        ],
    )?;
    ensure!(
        ext(record, "weirdlqerror").contains("0.3"),
        "the error names the version: {record}"
    );
    ensure!(record["type"] == "weir.undecodable", "{record}");
    ensure!(
        record["datacontenttype"] == "application/octet-stream",
        "{record}"
    );
    let data = record["data_base64"]
        .as_str()
        .context("raw bytes are carried as data_base64")?;
    ensure!(
        BASE64_STANDARD.decode(data)? == raw,
        "the raw bytes, unchanged: {record}"
    );
    Ok(())
}

fn check_extensions(record: &Value, expected: &[(&str, &str)]) -> anyhow::Result<()> {
    for (name, value) in expected {
        let actual = ext(record, name);
        ensure!(
            actual == *value,
            "{name} is {actual:?}, not {value:?}: {record}"
        );
    }
    Ok(())
}
