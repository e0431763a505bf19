//! Weir end to end on NATS: the foundation scenarios on JetStream and core NATS, and the fault
//! plan's NATS cases (reference A.5: dispatcher crash and graceful stop under load, broker
//! restart, DLQ unavailable or full, a function slower than ack-wait, two dispatchers on one
//! durable consumer).
//!
//! Every test starts its own `nats-server -js` on free loopback ports. Weir runs either in
//! process (the real [`Runtime`], so counters and pools can be read) or as the real `weir run`
//! binary ([`WeirProcess`]) where the test must kill it. What Weir did is read back from the
//! server with async-nats: stream contents (outputs and DLQ records, decoded the way
//! `weir tail` shows them) and consumer state (`num_pending`, `num_ack_pending`, delivery
//! sequences), which is the broker's truth rather than Weir's account of itself.
//!
//! Tests of this file run one at a time ([`SERIAL`]): timing assertions (retry delays, the
//! timeout) and load tests must not compete for the 2 cores. Every wait is bounded.
//! Needs `make functions` and `cargo build -p weir-dispatcher --bin weir` first.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use async_nats::jetstream::consumer::{self, pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::stream::{self, DiscardPolicy};
use async_nats::jetstream::Context;
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt as _;
use serde_json::{json, Value};
use weir_broker_bridge::nats::{NatsConfig, NatsTransport, StreamConfig};
use weir_dispatcher::runtime::Runtime;
use weir_tests::nats_server::NatsServer;
use weir_tests::process::{metric_value, WeirProcess};
use weir_tests::scenario::{
    check_exhausted_record, check_flaky_retries, check_forbidden_output, check_memory_trap_record,
    check_order_chain, check_rejected_record, check_timeout_record, check_trap_record,
    check_undecodable_record, ext, failure_functions, flaky_policy, write_config, SPIN_TIMEOUT,
    TRACEPARENT,
};
use weir_tests::weir::{component_path, functions_dir, run_weir, InProcess};

/// Tests of this file run one at a time (see the module docs).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Generous bound for anything that should take milliseconds: the machine is shared.
const WAIT: Duration = Duration::from_secs(20);
/// Bound for a load test's 10,000 events to be processed.
const LOAD_WAIT: Duration = Duration::from_secs(180);
const LOAD_EVENTS: usize = 10_000;

/// Slack over a retry policy's upper bound for a JetStream redelivery: the NAK is confirmed,
/// the server's redelivery timer fires, the message goes to a waiting pull request, and the
/// runner needs a slot and a task; on a loaded 2-core machine that takes up to ~100 ms.
const REDELIVERY_SLACK: Duration = Duration::from_millis(250);
/// Slack over the upper bound for an in-place retry (a tokio timer and a task wake-up).
const IN_PLACE_SLACK: Duration = Duration::from_millis(100);

/// Beyond the timeout: epoch tick (10 ms), unwind, the DLQ publish confirmed by the server, and
/// the test's polling of the DLQ stream (every 50 ms), on a shared machine.
const TIMEOUT_BOUND_SLACK: Duration = Duration::from_millis(700);

// -------------------------------------------------------------------------------------------
// Test-side NATS helpers
// -------------------------------------------------------------------------------------------

/// A server and a test-side connection to it.
struct Nats {
    server: NatsServer,
    client: async_nats::Client,
    js: Context,
}

impl Nats {
    async fn start() -> anyhow::Result<Nats> {
        Self::connect(NatsServer::start()?).await
    }

    /// A server whose configuration file holds `conf` (say a `max_payload`).
    async fn start_with_config(conf: &str) -> anyhow::Result<Nats> {
        Self::connect(NatsServer::start_with_config(conf)?).await
    }

    async fn connect(server: NatsServer) -> anyhow::Result<Nats> {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(server.url())
            .await
            .context("connecting the test client")?;
        let js = async_nats::jetstream::new(client.clone());
        Ok(Nats { server, client, js })
    }

    /// Creates the streams the way Weir would (the bridge's `ensure_stream`), so that a Weir
    /// started later finds them identical.
    async fn ensure_streams(&self, streams: &[(&str, &[&str])]) -> anyhow::Result<()> {
        let transport = NatsTransport::connect(&NatsConfig {
            servers: vec![self.server.url()],
            ..NatsConfig::default()
        })
        .await?;
        for (name, subjects) in streams {
            let config = StreamConfig::new(*name, subjects.iter().map(|s| s.to_string()).collect());
            transport.ensure_stream(&config).await?;
        }
        transport.close().await?;
        Ok(())
    }

    async fn stream_count(&self, stream: &str) -> anyhow::Result<u64> {
        let stream = self
            .js
            .get_stream(stream)
            .await
            .with_context(|| format!("stream {stream}"))?;
        Ok(stream.cached_info().state.messages)
    }

    /// Waits until the server has `stream` (bounded).
    async fn wait_stream(&self, stream: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.js.get_stream(stream).await.is_err() {
            ensure!(
                Instant::now() < deadline,
                "no stream {stream} after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    async fn consumer(&self, stream: &str, durable: &str) -> anyhow::Result<consumer::Info> {
        let handle = self
            .js
            .get_stream(stream)
            .await
            .with_context(|| format!("stream {stream}"))?;
        handle
            .consumer_info(durable)
            .await
            .with_context(|| format!("consumer {durable} on {stream}"))
    }

    /// Publishes a binary-mode CloudEvent (JSON data) to JetStream; returns its stream sequence.
    async fn publish_event(
        &self,
        subject: &str,
        id: &str,
        ty: &str,
        data: &str,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<u64> {
        let headers = ce_headers(id, ty, extra);
        let ack = self
            .js
            .publish_with_headers(subject.to_owned(), headers, Bytes::from(data.to_owned()))
            .await
            .with_context(|| format!("publishing {id} to {subject}"))?
            .await
            .with_context(|| format!("publish ack of {id} on {subject}"))?;
        Ok(ack.sequence)
    }

    /// Publishes raw bytes with raw headers to JetStream; returns the stream sequence.
    async fn publish_raw(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
    ) -> anyhow::Result<u64> {
        let ack = self
            .js
            .publish_with_headers(subject.to_owned(), headers, payload)
            .await?
            .await?;
        Ok(ack.sequence)
    }

    /// Publishes `ids` as small JSON events, pipelining the publish acks (1,000 outstanding).
    async fn publish_many(&self, subject: &str, ids: &[String]) -> anyhow::Result<()> {
        for chunk in ids.chunks(1000) {
            let mut acks = Vec::with_capacity(chunk.len());
            for id in chunk {
                let data = format!("{{\"id\":\"{id}\"}}");
                let ack = self
                    .js
                    .publish_with_headers(
                        subject.to_owned(),
                        ce_headers(id, "com.example.load", &[]),
                        Bytes::from(data),
                    )
                    .await
                    .with_context(|| format!("publishing {id}"))?;
                acks.push(ack);
            }
            for ack in acks {
                ack.await.context("publish ack")?;
            }
        }
        Ok(())
    }

    /// A core NATS publish of a binary-mode CloudEvent, flushed.
    async fn publish_core(
        &self,
        subject: &str,
        id: &str,
        ty: &str,
        data: &str,
    ) -> anyhow::Result<()> {
        self.publish_core_raw(
            subject,
            ce_headers(id, ty, &[]),
            Bytes::from(data.to_owned()),
        )
        .await
    }

    /// A core NATS publish of raw bytes with raw headers, flushed.
    async fn publish_core_raw(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
    ) -> anyhow::Result<()> {
        self.client
            .publish_with_headers(subject.to_owned(), headers, payload)
            .await
            .with_context(|| format!("publishing to {subject}"))?;
        self.client
            .flush()
            .await
            .with_context(|| format!("flushing the publish to {subject}"))?;
        Ok(())
    }

    /// Publishes an empty event `id` on the core subject `subject` and waits for `function`'s
    /// dead-letter record of it, which the test's `CAPTURE` stream keeps.
    async fn core_dead_letter(
        &self,
        subject: &str,
        id: &str,
        function: &str,
    ) -> anyhow::Result<Value> {
        self.publish_core(subject, id, "com.example.x", "{}")
            .await?;
        self.wait_event("CAPTURE", &format!("weir.dlq.{function}"), WAIT, |e| {
            e["id"] == id
        })
        .await
        .with_context(|| format!("{function}'s dead-letter record of {id}"))
    }

    /// Every message of `stream` (optionally only `filter`), oldest first.
    async fn read_stream(&self, stream: &str, filter: Option<&str>) -> anyhow::Result<Vec<Stored>> {
        let handle = self
            .js
            .get_stream(stream)
            .await
            .with_context(|| format!("stream {stream}"))?;
        let mut reader: PullConsumer = handle
            .create_consumer(pull::Config {
                filter_subject: filter.unwrap_or_default().to_owned(),
                ack_policy: AckPolicy::None,
                deliver_policy: DeliverPolicy::All,
                inactive_threshold: Duration::from_secs(10),
                ..Default::default()
            })
            .await
            .with_context(|| format!("creating a reader on {stream}"))?;
        let expected = reader.info().await?.num_pending;
        let mut stored = Vec::new();
        let deadline = Instant::now() + WAIT;
        while (stored.len() as u64) < expected {
            ensure!(
                Instant::now() < deadline,
                "reading {stream}: {} of {expected} after {WAIT:?}",
                stored.len()
            );
            let mut batch = reader
                .batch()
                .max_messages(1000)
                .expires(Duration::from_millis(500))
                .messages()
                .await
                .context("fetching")?;
            while let Some(message) = batch.next().await {
                let message = message.map_err(|e| anyhow::anyhow!("reading {stream}: {e}"))?;
                let sequence = message
                    .info()
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .stream_sequence;
                stored.push(Stored {
                    sequence,
                    subject: message.subject.to_string(),
                    headers: header_pairs(message.headers.as_ref()),
                    payload: message.payload.clone(),
                });
                if stored.len() as u64 >= expected {
                    break;
                }
            }
        }
        Ok(stored)
    }

    /// The events of `stream` on `subject`, decoded and shown as `weir tail` shows them.
    async fn events(&self, stream: &str, subject: &str) -> anyhow::Result<Vec<Value>> {
        Ok(self
            .read_stream(stream, Some(subject))
            .await?
            .iter()
            .map(|m| m.event(stream))
            .collect())
    }

    /// The `weircausation` (the input's id) of each event on `subject` of `stream`, in order.
    async fn causes(&self, stream: &str, subject: &str) -> anyhow::Result<Vec<String>> {
        Ok(self
            .events(stream, subject)
            .await?
            .iter()
            .map(|e| e["weircausation"].as_str().unwrap_or_default().to_owned())
            .collect())
    }

    /// The first event on `subject` of `stream` for which `matches` holds; fails after
    /// `timeout` with what the subject held.
    async fn wait_event(
        &self,
        stream: &str,
        subject: &str,
        timeout: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let events = self.events(stream, subject).await?;
            if let Some(found) = events.iter().find(|e| matches(e)) {
                return Ok(found.clone());
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {timeout:?} waiting for an event on {subject} ({stream}); saw {}: {}",
                    events.len(),
                    serde_json::to_string_pretty(&events).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `stream` holds at least `n` messages; returns the count.
    async fn wait_count(&self, stream: &str, n: u64, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let count = self.stream_count(stream).await?;
            if count >= n {
                return Ok(count);
            }
            if Instant::now() >= deadline {
                bail!("{stream} holds {count} messages after {timeout:?}, expected {n}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the consumer has nothing pending or unacknowledged.
    async fn wait_drained(
        &self,
        stream: &str,
        durable: &str,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.consumer(stream, durable).await?;
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "consumer {durable} not drained after {timeout:?}: pending {}, ack pending {}",
                    info.num_pending,
                    info.num_ack_pending
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A message as stored in a stream.
struct Stored {
    sequence: u64,
    subject: String,
    headers: Vec<(String, String)>,
    payload: Bytes,
}

impl Stored {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Decoded with Weir's own codec and shown as `weir tail` / the admin API show events.
    fn event(&self, stream: &str) -> Value {
        let origin = format!("jetstream://{stream}/{}", self.sequence);
        let source = weir_schemas::wire::default_source("jetstream", &self.subject);
        let wire = weir_schemas::WireMessage {
            headers: &self.headers,
            payload: Some(&self.payload),
            key: None,
            origin: &origin,
            default_source: &source,
        };
        match weir_schemas::decode(&wire, weir_schemas::Format::Auto) {
            Ok(events) if events.len() == 1 => weir_dispatcher::http::event_json(&events[0]),
            Ok(events) => json!({ "subject": self.subject, "events": events.len() }),
            Err(e) => json!({ "subject": self.subject, "undecodable": e.to_string() }),
        }
    }
}

fn header_pairs(headers: Option<&HeaderMap>) -> Vec<(String, String)> {
    let Some(headers) = headers else {
        return Vec::new();
    };
    headers
        .iter()
        .flat_map(|(name, values)| {
            let name: &str = name.as_ref();
            values
                .iter()
                .map(move |v| (name.to_owned(), v.as_str().to_owned()))
        })
        .collect()
}

fn ce_headers(id: &str, ty: &str, extra: &[(&str, &str)]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("ce-specversion", "1.0");
    headers.insert("ce-id", id);
    headers.insert("ce-source", "weir-tests");
    headers.insert("ce-type", ty);
    headers.insert("content-type", "application/json");
    for (name, value) in extra {
        headers.insert(*name, *value);
    }
    headers
}

/// `[brokers.nats]` for `url` and the given streams.
fn brokers(url: &str, streams: &[(&str, &[&str])]) -> String {
    let mut text = format!(
        "[brokers.nats]\nservers = [\"{url}\"]\nreconnect_delay_max = \"500ms\"\nrequest_timeout = \"3s\"\n"
    );
    for (name, subjects) in streams {
        let subjects: Vec<String> = subjects.iter().map(|s| format!("\"{s}\"")).collect();
        text.push_str(&format!(
            "\n[[brokers.nats_streams]]\nname = \"{name}\"\nsubjects = [{}]\n",
            subjects.join(", ")
        ));
    }
    text
}

/// The sum of `weir_nats_publish_total` samples with these labels in a metrics exposition.
fn publish_count(metrics: &str, outcome: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("weir_nats_publish_total{"))
        .filter(|l| {
            l.contains("broker=\"jetstream\"") && l.contains(&format!("outcome=\"{outcome}\""))
        })
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum::<f64>() as u64
}

/// Stops an in-process Weir; its shutdown is bounded by the runtime's grace, so a hang here is
/// a failure, not a stuck test.
async fn shutdown_within(weir: InProcess) -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(30), weir.shutdown())
        .await
        .context("the in-process Weir did not shut down within 30 s")?
}

// -------------------------------------------------------------------------------------------
// 1. The foundation scenarios on JetStream
// -------------------------------------------------------------------------------------------

fn jetstream_config(url: &str) -> String {
    let streams: [(&str, &[&str]); 3] = [
        ("ORDERS", &["orders", "orders.>"]),
        ("TEST", &["js.>"]),
        ("DLQ", &["weir.dlq.>"]),
    ];
    format!(
        r#"
[defaults]
timeout = "2s"
memory = "64MiB"

[defaults.trigger]
broker = "jetstream"

[defaults.retry]
max_attempts = 3
initial_delay = "50ms"
multiplier = 2.0
jitter = 0.2

[defaults.scaling]
min = 1
max = 2

{brokers}
[[functions]]
name = "order-validate"
module = "order_validate.wasm"
outputs = ["orders.validated"]
[functions.trigger]
topic = "orders"
stream = "ORDERS"

[[functions]]
name = "order-enrich"
module = "order_enrich.wasm"
outputs = ["orders.enriched"]
config = {{ large_threshold = "1000", currency = "EUR" }}
[functions.trigger]
topic = "orders.validated"
stream = "ORDERS"

[[functions]]
name = "flaky"
module = "flaky.wasm"
outputs = ["js.flaky.out"]
config = {{ fail_attempts = "2", output_topic = "js.flaky.out" }}
[functions.trigger]
topic = "js.flaky.in"
stream = "TEST"
[functions.retry]
max_attempts = 5
initial_delay = "200ms"
multiplier = 2.0
jitter = 0.2

{failures}"#,
        brokers = brokers(url, &streams),
        failures = failure_functions("js", r#"stream = "TEST""#),
    )
}

/// The chain, retries by NAK-with-delay, exhaustion, reject, timeout, traps, a forbidden
/// output and undecodable input, all on JetStream with DLQ records on a DLQ stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_foundation_scenarios() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let nats = Nats::start().await?;
    let weir = InProcess::start(&jetstream_config(&nats.server.url())).await?;
    js_chain(&nats).await.context("chain")?;
    println!("chain ok");
    js_flaky_retries_by_nak_with_delay(&nats, &weir)
        .await
        .context("flaky")?;
    println!("flaky ok");
    js_exhaustion_dead_letters_once(&nats, &weir)
        .await
        .context("exhaustion")?;
    println!("exhaustion ok");
    js_reject(&nats, &weir).await.context("reject")?;
    println!("reject ok");
    if let Err(e) = js_timeout_and_traps(&nats).await {
        eprintln!("timeout and traps failed: {e:#}");
        return Err(e);
    }
    println!("timeout and traps ok");
    js_forbidden_output(&nats, &weir)
        .await
        .context("bad output")?;
    println!("bad output ok");
    js_undecodable(&nats).await.context("undecodable")?;
    println!("undecodable ok");
    shutdown_within(weir).await
}

async fn js_chain(nats: &Nats) -> anyhow::Result<()> {
    nats.publish_event(
        "orders",
        "order-1",
        "com.example.order",
        r#"{"id":"o-1","amount":42}"#,
        &[("ce-traceparent", TRACEPARENT)],
    )
    .await?;
    let validated = nats
        .wait_event("ORDERS", "orders.validated", WAIT, |e| {
            e["weircausation"] == "order-1"
        })
        .await?;
    let enriched = nats
        .wait_event("ORDERS", "orders.enriched", WAIT, |e| {
            e["data"]["id"] == "o-1"
        })
        .await?;
    check_order_chain(&validated, &enriched)?;
    // The output ids are the JetStream de-duplication ids.
    let stored = nats.read_stream("ORDERS", Some("orders.enriched")).await?;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].header("Nats-Msg-Id"), Some(ext(&enriched, "id")));
    nats.wait_drained("ORDERS", "weir-order-validate", WAIT)
        .await?;
    nats.wait_drained("ORDERS", "weir-order-enrich", WAIT).await
}

async fn js_flaky_retries_by_nak_with_delay(nats: &Nats, weir: &InProcess) -> anyhow::Result<()> {
    let flaky = weir.function("flaky")?;
    assert_eq!(
        flaky.spec.retry,
        flaky_policy(),
        "the configured policy is the one checked here"
    );
    nats.publish_event(
        "js.flaky.in",
        "flaky-1",
        "com.example.flaky",
        r#"{"n":1}"#,
        &[],
    )
    .await?;
    let output = nats
        .wait_event("TEST", "js.flaky.out", WAIT, |e| {
            e["weircausation"] == "flaky-1"
        })
        .await?;
    assert_eq!(output["data"], json!({"n": 1}), "flaky echoes its input");
    // flaky fails while `attempt <= 2`: attempts come from JetStream's delivery count. Each gap
    // is a NAK delay: at least the policy's lower bound (a bare NAK would redeliver at once)
    // and far below the 30 s ack wait (it was not an ack timeout).
    check_flaky_retries(&flaky, "flaky-1", &output, REDELIVERY_SLACK)?;
    assert_eq!(
        flaky.counters.received.load(Relaxed),
        3,
        "three deliveries of one message"
    );
    nats.wait_drained("TEST", "weir-flaky", WAIT).await?;
    let info = nats.consumer("TEST", "weir-flaky").await?;
    assert_eq!(
        info.delivered.consumer_sequence, 3,
        "the server delivered the message exactly 3 times"
    );
    assert_eq!(
        info.ack_floor.stream_sequence, info.delivered.stream_sequence,
        "acked"
    );
    Ok(())
}

async fn js_exhaustion_dead_letters_once(nats: &Nats, weir: &InProcess) -> anyhow::Result<()> {
    let data = json!({"order": "o-77", "lines": [1, 2, 3]});
    let sequence = nats
        .publish_event(
            "js.forever.in",
            "forever-1",
            "com.example.forever",
            &data.to_string(),
            &[("ce-subject", "orders/o-77")],
        )
        .await?;
    let record = nats
        .wait_event("DLQ", "weir.dlq.flaky-forever", WAIT, |e| {
            e["id"] == "forever-1"
        })
        .await?;
    let runner = weir.function("flaky-forever")?;
    // The first and last failures are two NAK delays apart.
    check_exhausted_record(
        &record,
        &data,
        runner.pool.module().sha256(),
        &format!("jetstream://TEST/{sequence}"),
    )?;

    // Exactly one record, the input terminated (not pending, not redelivered).
    nats.wait_drained("TEST", "weir-flaky-forever", WAIT)
        .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let records = nats.events("DLQ", "weir.dlq.flaky-forever").await?;
    assert_eq!(records.len(), 1, "exactly one DLQ record: {records:?}");
    let info = nats.consumer("TEST", "weir-flaky-forever").await?;
    assert_eq!(
        info.delivered.consumer_sequence, 3,
        "3 deliveries, then +TERM"
    );
    assert!(nats.events("TEST", "js.forever.out").await?.is_empty());
    assert_eq!(runner.counters.dead_lettered.load(Relaxed), 1);
    Ok(())
}

async fn js_reject(nats: &Nats, weir: &InProcess) -> anyhow::Result<()> {
    let sequence = nats
        .publish_event("js.reject.in", "reject-1", "com.example.x", "{}", &[])
        .await?;
    let record = nats
        .wait_event("DLQ", "weir.dlq.reject-all", WAIT, |e| {
            e["id"] == "reject-1"
        })
        .await?;
    check_rejected_record(&record)?;
    assert_eq!(
        ext(&record, "weirdlqorigin"),
        format!("jetstream://TEST/{sequence}")
    );
    nats.wait_drained("TEST", "weir-reject-all", WAIT).await?;
    let info = nats.consumer("TEST", "weir-reject-all").await?;
    assert_eq!(
        info.delivered.consumer_sequence, 1,
        "a reject burns no retries"
    );
    assert_eq!(
        weir.function("reject-all")?.counters.retried.load(Relaxed),
        0
    );
    Ok(())
}

async fn js_timeout_and_traps(nats: &Nats) -> anyhow::Result<()> {
    let published = Instant::now();
    nats.publish_event("js.spin.in", "spin-1", "com.example.x", "{}", &[])
        .await?;
    let record = nats
        .wait_event("DLQ", "weir.dlq.spin", WAIT, |e| e["id"] == "spin-1")
        .await?;
    check_timeout_record(
        &record,
        published.elapsed(),
        SPIN_TIMEOUT + TIMEOUT_BOUND_SLACK,
    )?;

    nats.publish_event("js.hog.in", "hog-1", "com.example.x", "{}", &[])
        .await?;
    let record = nats
        .wait_event("DLQ", "weir.dlq.memory-hog", WAIT, |e| e["id"] == "hog-1")
        .await?;
    check_memory_trap_record(&record)?;

    nats.publish_event("js.trap.in", "trap-1", "com.example.x", "{}", &[])
        .await?;
    let record = nats
        .wait_event("DLQ", "weir.dlq.always-trap", WAIT, |e| e["id"] == "trap-1")
        .await?;
    check_trap_record(&record)?;
    for durable in ["weir-spin", "weir-memory-hog", "weir-always-trap"] {
        nats.wait_drained("TEST", durable, WAIT).await?;
    }
    Ok(())
}

async fn js_forbidden_output(nats: &Nats, weir: &InProcess) -> anyhow::Result<()> {
    nats.publish_event("js.bad.in", "bad-1", "com.example.x", "{}", &[])
        .await?;
    let record = nats
        .wait_event("DLQ", "weir.dlq.bad-output", WAIT, |e| e["id"] == "bad-1")
        .await?;
    let bad_output = weir.function("bad-output")?;
    check_forbidden_output(&record, &bad_output, "js.forbidden.topic")?;
    // The TEST stream captures js.>: nothing was ever published to either output subject.
    assert!(nats
        .read_stream("TEST", Some("js.forbidden.topic"))
        .await?
        .is_empty());
    assert!(nats
        .read_stream("TEST", Some("js.ok.topic"))
        .await?
        .is_empty());
    Ok(())
}

/// What `check_undecodable_record` expects to find undecoded: raw bytes under the headers of a
/// CloudEvents version Weir does not read (0.3).
fn undecodable_message() -> (HeaderMap, Bytes) {
    let mut headers = HeaderMap::new();
    headers.insert("ce-specversion", "0.3");
    headers.insert("ce-id", "legacy-1");
    headers.insert("ce-source", "legacy");
    headers.insert("ce-type", "com.example.legacy");
    headers.insert("content-type", "application/octet-stream");
    (headers, Bytes::from_static(b"\x00\x01 not json \xff"))
}

async fn js_undecodable(nats: &Nats) -> anyhow::Result<()> {
    let (headers, raw) = undecodable_message();
    let sequence = nats.publish_raw("js.echo.in", headers, raw.clone()).await?;
    let origin = format!("jetstream://TEST/{sequence}");
    let record = nats
        .wait_event("DLQ", "weir.dlq.echo", WAIT, |e| {
            e["weirdlqorigin"] == origin.as_str()
        })
        .await?;
    check_undecodable_record(&record, &raw)?;
    assert!(
        nats.read_stream("TEST", Some("js.echo.out"))
            .await?
            .is_empty(),
        "echo never ran on it"
    );
    nats.wait_drained("TEST", "weir-echo", WAIT).await
}

/// Broker de-duplication must only ever drop what is truly the same message. JetStream
/// de-duplicates by `Nats-Msg-Id` across a whole stream, so:
/// - two functions failing one event, their dead-letter topics in one stream (`weir.dlq.>`, as
///   the demo and the example configuration have it), get a record each;
/// - two producers' events with the same id (CloudEvents makes ids unique per source only)
///   each get their outputs, whether they were published straight to the stream or through
///   the HTTP ingress;
/// - while a client retrying one event through the ingress is still de-duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_sharing_an_id_keep_their_outputs_and_dead_letters_apart() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let nats = Nats::start().await?;
    let streams: [(&str, &[&str]); 2] = [("SHARE", &["share.>"]), ("DLQ", &["weir.dlq.>"])];
    let config = format!(
        r#"
[defaults.trigger]
broker = "jetstream"

{brokers}
[[functions]]
name = "reject-a"
module = "{reject}"
[functions.trigger]
topic = "share.in"
stream = "SHARE"

[[functions]]
name = "reject-b"
module = "{reject}"
[functions.trigger]
topic = "share.in"
stream = "SHARE"

[[functions]]
name = "echo"
module = "{echo}"
outputs = ["share.out"]
config = {{ output_topic = "share.out" }}
[functions.trigger]
topic = "share.echo"
stream = "SHARE"
"#,
        brokers = brokers(&nats.server.url(), &streams),
        reject = component_path("reject_all.wasm")?,
        echo = component_path("echo.wasm")?,
    );
    let weir = InProcess::start(&config).await?;

    nats.publish_event("share.in", "shared-1", "com.example.x", "{}", &[])
        .await?;
    for function in ["reject-a", "reject-b"] {
        let subject = format!("weir.dlq.{function}");
        let record = nats
            .wait_event("DLQ", &subject, WAIT, |e| e["id"] == "shared-1")
            .await
            .with_context(|| format!("{function}'s dead-letter record"))?;
        assert_eq!(ext(&record, "weirdlqfunction"), function, "{record}");
    }

    // Straight to the stream: one id, two sources.
    for source in ["producer-a", "producer-b"] {
        let mut headers = ce_headers("1", "com.example.x", &[]);
        headers.insert("ce-source", source);
        nats.publish_raw("share.echo", headers, Bytes::from_static(b"{}"))
            .await?;
    }
    // Through the ingress: one id, two sources, and the first request sent twice; only the
    // retried request is answered as a duplicate.
    for (source, duplicates) in [
        ("producer-a", serde_json::json!([])),
        ("producer-b", serde_json::json!([])),
        ("producer-a", serde_json::json!(["2"])),
    ] {
        let (status, answer) = weir
            .post(
                "share.echo",
                &[
                    ("ce-specversion", "1.0"),
                    ("ce-id", "2"),
                    ("ce-source", source),
                    ("ce-type", "com.example.x"),
                ],
                "{}",
            )
            .await?;
        assert_eq!(status, 202, "{answer}");
        assert_eq!(answer["duplicates"], duplicates, "{source}: {answer}");
    }
    let inputs = nats.events("SHARE", "share.echo").await?;
    let sources = |id: &str| -> Vec<String> {
        let mut sources: Vec<String> = inputs
            .iter()
            .filter(|e| e["id"] == id)
            .map(|e| ext(e, "source").to_owned())
            .collect();
        sources.sort();
        sources
    };
    assert_eq!(sources("1"), ["producer-a", "producer-b"], "{inputs:?}");
    assert_eq!(
        sources("2"),
        ["producer-a", "producer-b"],
        "the ingress keeps both producers' events and drops the retried request: {inputs:?}"
    );

    nats.wait_count("SHARE", 9, WAIT)
        .await
        .context("share.in's event, four on share.echo, and an output of each on share.out")?;
    nats.wait_drained("SHARE", "weir-echo", WAIT).await?;
    let outputs = nats.events("SHARE", "share.out").await?;
    let ids: HashSet<&str> = outputs.iter().map(|e| ext(e, "id")).collect();
    assert_eq!(outputs.len(), 4, "{outputs:?}");
    assert_eq!(ids.len(), 4, "every output has its own id: {outputs:?}");
    shutdown_within(weir).await
}

/// NATS takes messages up to its `max_payload`, headers included. An input that fits, whose
/// output with Weir's headers does not, fails like an output over `max_output_bytes` (retried,
/// then dead-lettered); its dead-letter record, the input and the failure's extensions, does
/// not fit either, so it is written without the data rather than holding the lane for good,
/// and says so. The function goes on with the next event. An event too large for the topic's
/// broker is refused as the client's fault: 413 from the ingress, exit 2 from `weir publish`
/// (JetStream and core).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_too_large_for_nats_is_refused_and_its_dead_letter_cut_down() -> anyhow::Result<()>
{
    const MAX_PAYLOAD: usize = 8192;
    let _serial = SERIAL.lock().await;
    let nats = Nats::start_with_config(&format!("max_payload: {MAX_PAYLOAD}\n")).await?;
    let streams: [(&str, &[&str]); 2] = [("BIG", &["big.>"]), ("DLQ", &["weir.dlq.>"])];
    let config = format!(
        r#"
[defaults.trigger]
broker = "jetstream"
[defaults.retry]
max_attempts = 2
initial_delay = "20ms"

{brokers}
[[functions]]
name = "echo-big"
module = "{echo}"
outputs = ["big.out"]
config = {{ output_topic = "big.out" }}
[functions.trigger]
topic = "big.in"
stream = "BIG"
"#,
        brokers = brokers(&nats.server.url(), &streams),
        echo = component_path("echo.wasm")?,
    );
    let weir = InProcess::start(&config).await?;

    // ~130 bytes of headers: the input fits; echo's output adds Weir's (id, time, hops,
    // causation, Nats-Msg-Id, ...) and does not.
    let data = format!("\"{}\"", "x".repeat(MAX_PAYLOAD - 252));
    let sequence = nats
        .publish_event("big.in", "big-1", "com.example.big", &data, &[])
        .await
        .context("the input itself must fit")?;
    nats.publish_event("big.in", "small-1", "com.example.big", "{}", &[])
        .await?;

    let record = nats
        .wait_event("DLQ", "weir.dlq.echo-big", WAIT, |e| e["id"] == "big-1")
        .await?;
    assert_eq!(
        ext(&record, "weirdlqreason"),
        "retries-exhausted",
        "{record}"
    );
    assert_eq!(ext(&record, "weirdlqattempts"), "2", "{record}");
    assert!(
        ext(&record, "weirdlqerror").contains("too large for its broker"),
        "{record}"
    );
    assert_eq!(ext(&record, "weirdlqdropped"), "data", "{record}");
    assert_eq!(
        ext(&record, "weirdlqdroppedbytes"),
        data.len().to_string(),
        "{record}"
    );
    assert_eq!(
        ext(&record, "weirdlqorigin"),
        format!("jetstream://BIG/{sequence}")
    );
    assert_eq!(ext(&record, "type"), "com.example.big", "{record}");
    assert!(record.get("data").is_none(), "{record}");

    // The lane went on: the next event's output is there and nothing is left unacknowledged.
    let output = nats
        .wait_event("BIG", "big.out", WAIT, |e| e["weircausation"] == "small-1")
        .await?;
    assert_eq!(ext(&output, "weirhops"), "1", "{output}");
    nats.wait_drained("BIG", "weir-echo-big", WAIT).await?;
    assert_eq!(nats.causes("BIG", "big.out").await?, ["small-1"]);
    assert_eq!(nats.events("DLQ", "weir.dlq.echo-big").await?.len(), 1);

    let (_, metrics) = weir.get("/metrics").await?;
    // Never paused: the gauge is 0 or was never set.
    let paused = metric_value(&metrics, r#"weir_lane_paused{function="echo-big"}"#);
    assert!(paused.unwrap_or(0.0) == 0.0, "{paused:?}");
    for (series, value) in [
        (
            r#"weir_dead_letters_shrunk_total{function="echo-big",dropped="data"}"#,
            1.0,
        ),
        (
            r#"weir_dead_letters_total{function="echo-big",reason="retries-exhausted"}"#,
            1.0,
        ),
        (
            r#"weir_output_publish_failures_total{function="echo-big"}"#,
            2.0,
        ),
    ] {
        assert_eq!(
            metric_value(&metrics, series),
            Some(value),
            "{series} in:\n{metrics}"
        );
    }

    // Too large at the door: the ingress answers 413, `weir publish` exits 2 (a message to
    // fix, not a broker to wait for), on JetStream and on core NATS; nothing was stored.
    let body = "y".repeat(MAX_PAYLOAD + 100);
    let (status, answer) = weir
        .post(
            "big.in",
            &[("content-type", "application/octet-stream")],
            body.clone(),
        )
        .await?;
    assert_eq!(status, 413, "{answer}");
    assert_eq!(answer["kind"], "too-large", "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .is_some_and(|e| e.contains("too large")),
        "{answer}"
    );
    let url = nats.server.url();
    for core in [false, true] {
        let mut args = vec!["publish", "--nats", &url, "big.in", "--data", &body];
        if core {
            args.push("--core");
        }
        let out = run_weir(&args, WAIT).await?;
        assert_eq!(out.code, Some(2), "core {core}: {out:?}");
        assert!(out.stderr.contains("too large"), "core {core}: {out:?}");
    }
    assert_eq!(nats.events("BIG", "big.in").await?.len(), 2);
    shutdown_within(weir).await
}

/// Declared streams deleted while Weir runs: the trigger's stream is created again by its
/// consumers (once, though two find it gone), the output stream by the output publish that
/// found it gone (which fails once and is retried), and every event published after that is
/// processed with its output kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_declared_streams_are_created_again_while_weir_runs() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let nats = Nats::start().await?;
    let streams: [(&str, &[&str]); 2] = [("HEALIN", &["heal.in"]), ("HEALOUT", &["heal.out"])];
    let config = format!(
        r#"
[defaults.trigger]
broker = "jetstream"
[defaults.retry]
max_attempts = 5
initial_delay = "50ms"

{brokers}
[[functions]]
name = "echo"
module = "{echo}"
outputs = ["heal.out"]
config = {{ output_topic = "heal.out" }}
[functions.trigger]
topic = "heal.in"
stream = "HEALIN"

# A second consumer on the stream: both find it gone, one re-creates it.
[[functions]]
name = "noop"
module = "{noop}"
[functions.trigger]
topic = "heal.in"
stream = "HEALIN"
"#,
        brokers = brokers(&nats.server.url(), &streams),
        echo = component_path("echo.wasm")?,
        noop = component_path("noop.wasm")?,
    );
    let weir = InProcess::start(&config).await?;
    nats.publish_event("heal.in", "heal-1", "com.example.x", "{}", &[])
        .await?;
    nats.wait_event("HEALOUT", "heal.out", WAIT, |e| {
        e["weircausation"] == "heal-1"
    })
    .await
    .context("the output before the streams were deleted")?;

    for stream in ["HEALOUT", "HEALIN"] {
        ensure!(
            nats.js.delete_stream(stream).await?.success,
            "deleting {stream}"
        );
    }
    // Only Weir's consumer can bring the trigger's stream back: nothing publishes to it yet.
    nats.wait_stream("HEALIN", WAIT).await?;
    ensure!(
        nats.js.get_stream("HEALOUT").await.is_err(),
        "no output was published yet, so nothing re-created the output stream"
    );
    nats.publish_event("heal.in", "heal-2", "com.example.x", "{}", &[])
        .await?;
    nats.wait_stream("HEALOUT", WAIT).await?;
    let output = nats
        .wait_event("HEALOUT", "heal.out", WAIT, |e| {
            e["weircausation"] == "heal-2"
        })
        .await
        .context("the output after the streams were created again")?;
    assert_eq!(ext(&output, "weirhops"), "1", "{output}");
    nats.wait_drained("HEALIN", "weir-echo", WAIT).await?;
    nats.wait_drained("HEALIN", "weir-noop", WAIT).await?;
    assert_eq!(nats.stream_count("HEALOUT").await?, 1, "one output, kept");

    let echo = weir.function("echo")?;
    assert_eq!(echo.counters.dead_lettered.load(Relaxed), 0);
    assert!(
        echo.counters.retried.load(Relaxed) >= 1,
        "the publish that found the output stream gone was retried"
    );
    let metrics = weir
        .client()
        .get(format!("{}/metrics", weir.base_url()))
        .send()
        .await?
        .text()
        .await?;
    for found_by in ["subscription", "publish"] {
        let sample = format!("weir_nats_streams_recreated_total{{found_by=\"{found_by}\"}}");
        assert_eq!(
            metric_value(&metrics, &sample),
            Some(1.0),
            "{sample} in:\n{metrics}"
        );
    }
    shutdown_within(weir).await
}

// -------------------------------------------------------------------------------------------
// 1b. The scenarios that apply to core NATS
// -------------------------------------------------------------------------------------------

/// Core NATS: the chain, reject → DLQ after one attempt, and retries in place. A stream
/// (`CAPTURE`) records every core subject involved so the test can read what was published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_nats_chain_reject_and_retries_in_place() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let nats = Nats::start().await?;
    let streams: [(&str, &[&str]); 1] =
        [("CAPTURE", &["orders", "orders.>", "core.>", "weir.dlq.>"])];
    let config = format!(
        r#"
[defaults]
timeout = "2s"
[defaults.trigger]
broker = "nats"
[defaults.scaling]
min = 1
max = 2

{brokers}
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
[functions.trigger]
topic = "orders.validated"

[[functions]]
name = "reject-all"
module = "reject_all.wasm"
[functions.trigger]
topic = "core.reject.in"

[[functions]]
name = "flaky"
module = "flaky.wasm"
outputs = ["core.flaky.out"]
config = {{ fail_attempts = "2", output_topic = "core.flaky.out" }}
[functions.trigger]
topic = "core.flaky.in"
[functions.retry]
max_attempts = 5
initial_delay = "200ms"
multiplier = 2.0
jitter = 0.2
"#,
        brokers = brokers(&nats.server.url(), &streams)
    );
    let weir = InProcess::start(&config).await?;

    // The chain.
    nats.publish_core(
        "orders",
        "core-order-1",
        "com.example.order",
        r#"{"id":"o-9","amount":4000}"#,
    )
    .await?;
    let validated = nats
        .wait_event("CAPTURE", "orders.validated", WAIT, |e| {
            e["weircausation"] == "core-order-1"
        })
        .await?;
    let enriched = nats
        .wait_event("CAPTURE", "orders.enriched", WAIT, |e| {
            e["data"]["id"] == "o-9"
        })
        .await?;
    assert_eq!(enriched["data"]["tier"], "large", "{enriched}");
    assert_eq!(ext(&validated, "weirhops"), "1");
    assert_eq!(ext(&enriched, "weirhops"), "2");
    assert_eq!(ext(&enriched, "weircausation"), ext(&validated, "id"));
    assert_eq!(
        ext(&validated, "traceparent").split('-').nth(1),
        ext(&enriched, "traceparent").split('-').nth(1),
        "one trace through the chain"
    );

    // Reject → DLQ (on core NATS too) after one attempt.
    nats.publish_core("core.reject.in", "core-reject-1", "com.example.x", "{}")
        .await?;
    let record = nats
        .wait_event("CAPTURE", "weir.dlq.reject-all", WAIT, |e| {
            e["id"] == "core-reject-1"
        })
        .await?;
    assert_eq!(ext(&record, "weirdlqreason"), "rejected", "{record}");
    assert_eq!(ext(&record, "weirdlqattempts"), "1");
    assert_eq!(ext(&record, "weirdlqorigin"), "nats://core.reject.in");
    assert_eq!(
        weir.function("reject-all")?.counters.received.load(Relaxed),
        1
    );

    // Retries in place: one delivery, three invocations, gaps within the policy's bounds.
    nats.publish_core(
        "core.flaky.in",
        "core-flaky-1",
        "com.example.flaky",
        r#"{"n":2}"#,
    )
    .await?;
    let output = nats
        .wait_event("CAPTURE", "core.flaky.out", WAIT, |e| {
            e["weircausation"] == "core-flaky-1"
        })
        .await?;
    assert_eq!(output["data"], json!({"n": 2}));
    let flaky = weir.function("flaky")?;
    check_flaky_retries(&flaky, "core-flaky-1", &output, IN_PLACE_SLACK)?;
    assert_eq!(
        flaky.counters.received.load(Relaxed),
        1,
        "core NATS delivered it once; retries were in place"
    );
    assert_eq!(
        nats.read_stream("CAPTURE", Some("core.flaky.out"))
            .await?
            .len(),
        1,
        "one output"
    );
    shutdown_within(weir).await
}

/// Core NATS: the failure scenarios, each ending in a dead-letter record published on core NATS
/// (the `CAPTURE` stream keeps it for the test): retries run out in place, a timeout, a
/// memory-limit trap, a reject, a trap, an output the function may not write, and input that
/// does not decode; and a core trigger whose dead letters go to JetStream (`dead_letter.broker`). Core
/// NATS delivers each event once, so every attempt after the first is a retry in place, and the
/// records must be the same as on the memory bus, JetStream and Kafka.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_nats_failures_end_in_dead_letters() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let nats = Nats::start().await?;
    let streams: [(&str, &[&str]); 1] = [("CAPTURE", &["core.>", "weir.dlq.>"])];
    let config = format!(
        r#"
[defaults.trigger]
broker = "nats"

{brokers}
{failures}
# A core trigger whose dead letters are kept: confirmed JetStream publishes.
[[functions]]
name = "reject-kept"
module = "reject_all.wasm"
[functions.trigger]
topic = "core.kept.in"
[functions.dead_letter]
broker = "jetstream"
"#,
        brokers = brokers(&nats.server.url(), &streams),
        failures = failure_functions("core", ""),
    );
    let weir = InProcess::start(&config).await?;

    // Exhaustion: three attempts in place, one record, no output.
    let data = json!({"order": "o-77", "lines": [1, 2, 3]});
    nats.publish_core_raw(
        "core.forever.in",
        ce_headers(
            "forever-1",
            "com.example.forever",
            &[("ce-subject", "orders/o-77")],
        ),
        Bytes::from(data.to_string()),
    )
    .await?;
    let record = nats
        .wait_event("CAPTURE", "weir.dlq.flaky-forever", WAIT, |e| {
            e["id"] == "forever-1"
        })
        .await
        .context("exhaustion")?;
    let forever = weir.function("flaky-forever")?;
    check_exhausted_record(
        &record,
        &data,
        forever.pool.module().sha256(),
        "nats://core.forever.in",
    )?;
    assert_eq!(
        (
            forever.counters.received.load(Relaxed),
            forever.counters.retried.load(Relaxed),
            forever.counters.dead_lettered.load(Relaxed),
        ),
        (1, 2, 1),
        "delivered once, retried twice in place, dead-lettered once"
    );

    // A reject, a timeout, a memory-limit trap and a trap, each dead-lettered after its one
    // attempt.
    let record = nats
        .core_dead_letter("core.reject.in", "reject-1", "reject-all")
        .await?;
    check_rejected_record(&record)?;
    let published = Instant::now();
    let record = nats
        .core_dead_letter("core.spin.in", "spin-1", "spin")
        .await?;
    check_timeout_record(
        &record,
        published.elapsed(),
        SPIN_TIMEOUT + TIMEOUT_BOUND_SLACK,
    )?;
    let record = nats
        .core_dead_letter("core.hog.in", "hog-1", "memory-hog")
        .await?;
    check_memory_trap_record(&record)?;
    let record = nats
        .core_dead_letter("core.trap.in", "trap-1", "always-trap")
        .await?;
    check_trap_record(&record)?;

    // An output the function may not write: nothing reaches either subject.
    let record = nats
        .core_dead_letter("core.bad.in", "bad-1", "bad-output")
        .await?;
    let bad_output = weir.function("bad-output")?;
    check_forbidden_output(&record, &bad_output, "core.forbidden.topic")?;

    // Input that does not decode: its bytes unchanged in the record, echo never run.
    let (headers, raw) = undecodable_message();
    nats.publish_core_raw("core.echo.in", headers, raw.clone())
        .await?;
    let record = nats
        .wait_event("CAPTURE", "weir.dlq.echo", WAIT, |e| {
            e["weirdlqorigin"] == "nats://core.echo.in"
        })
        .await
        .context("undecodable")?;
    check_undecodable_record(&record, &raw)?;

    // Dead letters on JetStream for a core trigger: the record is a confirmed publish, carrying
    // its de-duplication id, where the core ones above carry none.
    let record = nats
        .core_dead_letter("core.kept.in", "kept-1", "reject-kept")
        .await?;
    check_rejected_record(&record)?;
    assert_eq!(ext(&record, "weirdlqorigin"), "nats://core.kept.in");
    let kept = nats
        .read_stream("CAPTURE", Some("weir.dlq.reject-kept"))
        .await?;
    ensure!(
        kept.len() == 1 && kept[0].header("Nats-Msg-Id").is_some(),
        "one record, published to JetStream with a Nats-Msg-Id: {:?}",
        kept.iter().map(|m| &m.headers).collect::<Vec<_>>()
    );
    let on_core = nats
        .read_stream("CAPTURE", Some("weir.dlq.always-trap"))
        .await?;
    ensure!(
        on_core.iter().all(|m| m.header("Nats-Msg-Id").is_none()),
        "a core record carries no JetStream de-duplication id"
    );

    // Every record above was published once, and no function wrote an output.
    for (subject, records) in [
        ("weir.dlq.flaky-forever", 1),
        ("weir.dlq.reject-all", 1),
        ("weir.dlq.spin", 1),
        ("weir.dlq.memory-hog", 1),
        ("weir.dlq.always-trap", 1),
        ("weir.dlq.bad-output", 1),
        ("weir.dlq.echo", 1),
        ("weir.dlq.reject-kept", 1),
        ("core.forever.out", 0),
        ("core.ok.topic", 0),
        ("core.forbidden.topic", 0),
        ("core.echo.out", 0),
    ] {
        assert_eq!(
            nats.read_stream("CAPTURE", Some(subject)).await?.len(),
            records,
            "messages on {subject}"
        );
    }
    let echo = weir.function("echo")?;
    assert_eq!(
        (
            echo.counters.succeeded.load(Relaxed),
            echo.counters.retried.load(Relaxed),
            echo.counters.dead_lettered.load(Relaxed),
        ),
        (0, 0, 1),
        "undecodable input is dead-lettered at once, never run"
    );
    shutdown_within(weir).await
}

// -------------------------------------------------------------------------------------------
// 2 and 3. kill -9 and SIGTERM under load
// -------------------------------------------------------------------------------------------

const LOAD_STREAMS: [(&str, &[&str]); 3] = [
    ("IN", &["load.in"]),
    ("OUT", &["load.out"]),
    ("DLQ", &["weir.dlq.>"]),
];
const LOAD_MAX_IN_FLIGHT: usize = 8;

fn load_config(url: &str) -> anyhow::Result<String> {
    Ok(format!(
        r#"
{brokers}
[[functions]]
name = "echo"
module = "{module}"
outputs = ["load.out"]
timeout = "2s"
config = {{ output_topic = "load.out" }}
[functions.trigger]
broker = "jetstream"
topic = "load.in"
stream = "IN"
group = "load"
ack_wait = "3s"
[functions.retry]
max_attempts = 10
initial_delay = "50ms"
max_delay = "500ms"
[functions.scaling]
min = 1
max = {LOAD_MAX_IN_FLIGHT}
"#,
        brokers = brokers(url, &LOAD_STREAMS),
        module = component_path("echo.wasm")?
    ))
}

fn load_ids() -> Vec<String> {
    (0..LOAD_EVENTS).map(|i| format!("ev-{i:05}")).collect()
}

/// What the consumer and the output stream looked like right after the first process ended.
#[derive(Debug)]
struct AtStop {
    outputs: u64,
    pending: u64,
    ack_pending: u64,
    acked: u64,
    /// The consumer's bound on unacknowledged deliveries.
    max_ack_pending: u64,
}

/// 10,000 events, a first `weir run` stopped by `stop` once some but not all are done, a
/// second one that finishes the job. Returns the state at the stop and the second process.
async fn load_with_stop(
    nats: &Nats,
    dir: &Path,
    graceful: bool,
) -> anyhow::Result<(AtStop, WeirProcess)> {
    nats.ensure_streams(&LOAD_STREAMS).await?;
    let ids = load_ids();
    nats.publish_many("load.in", &ids).await?;
    assert_eq!(nats.stream_count("IN").await?, LOAD_EVENTS as u64);
    let config = write_config(dir, &load_config(&nats.server.url())?)?;

    let mut first = WeirProcess::start(&config, &[]).await?;
    let started = Instant::now();
    let threshold = (LOAD_EVENTS / 10) as u64;
    nats.wait_count("OUT", threshold, LOAD_WAIT)
        .await
        .with_context(|| first.log_text())?;
    // Stop while deliveries are out: the transport fetches in batches with short pauses in
    // between, so wait (bounded) until the server reports some unacknowledged.
    let deadline = Instant::now() + WAIT;
    while nats.consumer("IN", "load").await?.num_ack_pending == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let status = if graceful {
        first.terminate(Duration::from_secs(30)).await?
    } else {
        first.kill9().await?
    };
    let log = first.log_text();
    // Let the server finish what the dead client's socket had already delivered.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let info = nats.consumer("IN", "load").await?;
    let outputs = nats.stream_count("OUT").await?;
    let ack_pending = info.num_ack_pending as u64;
    let at_stop = AtStop {
        outputs,
        pending: info.num_pending,
        ack_pending,
        acked: LOAD_EVENTS as u64 - info.num_pending - ack_pending,
        max_ack_pending: u64::try_from(info.config.max_ack_pending)?,
    };
    // Tied to the function's maximum instances: each slot plus what is fetched ahead for it.
    assert_eq!(
        at_stop.max_ack_pending,
        (LOAD_MAX_IN_FLIGHT * (1 + weir_broker_bridge::nats::DEFAULT_PREFETCH)) as u64
    );
    println!(
        "{} after {:?}: {at_stop:?} (exit {status})",
        if graceful { "SIGTERM" } else { "kill -9" },
        started.elapsed()
    );
    if graceful {
        assert!(
            status.success(),
            "weir exited with {status} on SIGTERM; log:\n{log}"
        );
        assert!(
            log.contains("all functions stopped"),
            "the graceful path ran; log:\n{log}"
        );
    } else {
        assert_eq!(status.code(), None, "killed by a signal");
    }
    ensure!(
        at_stop.outputs < LOAD_EVENTS as u64,
        "all {LOAD_EVENTS} events were done before the stop; the test proves nothing (make it bigger)"
    );
    assert!(
        at_stop.acked >= threshold.saturating_sub(at_stop.max_ack_pending),
        "{at_stop:?}"
    );
    assert!(
        at_stop.outputs >= at_stop.acked,
        "an acked input always has its output first: {at_stop:?}"
    );

    let second = WeirProcess::start(&config, &[]).await?;
    nats.wait_count("OUT", LOAD_EVENTS as u64, LOAD_WAIT)
        .await
        .with_context(|| second.log_text())?;
    nats.wait_drained("IN", "load", LOAD_WAIT).await?;
    Ok((at_stop, second))
}

/// Every input has exactly one output message in OUT: 0 lost, and duplicates (if any) were
/// absorbed by `Nats-Msg-Id`.
async fn assert_every_input_has_one_output(nats: &Nats) -> anyhow::Result<()> {
    let outputs = nats.read_stream("OUT", None).await?;
    assert_eq!(
        outputs.len(),
        LOAD_EVENTS,
        "OUT holds exactly one message per input"
    );
    let causes: HashSet<&str> = outputs
        .iter()
        .filter_map(|m| m.header("ce-weircausation"))
        .collect();
    let expected = load_ids();
    let expected: HashSet<&str> = expected.iter().map(String::as_str).collect();
    let lost: Vec<&&str> = expected.difference(&causes).take(10).collect();
    assert!(
        lost.is_empty(),
        "inputs without an output (first 10): {lost:?}"
    );
    assert_eq!(causes.len(), LOAD_EVENTS, "distinct causes");
    let msg_ids: HashSet<&str> = outputs
        .iter()
        .filter_map(|m| m.header("Nats-Msg-Id"))
        .collect();
    assert_eq!(
        msg_ids.len(),
        LOAD_EVENTS,
        "every output carries its own de-duplication id"
    );
    assert_eq!(
        nats.stream_count("DLQ").await?,
        0,
        "nothing was dead-lettered"
    );
    Ok(())
}

/// Fault plan #1: kill -9 mid-batch. 0 lost; the duplicates are bounded by the in-flight
/// window and absorbed by the output stream's de-duplication.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_nothing_and_dedups_outputs() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let nats = Nats::start().await?;
    let dir = tempfile::tempdir()?;
    let (at_stop, second) = load_with_stop(&nats, dir.path(), false).await?;
    // Deliveries the killed process held: bounded by the consumer's max_ack_pending.
    assert!(
        at_stop.ack_pending <= at_stop.max_ack_pending,
        "{at_stop:?}"
    );
    // Outputs published whose input was not acked: the invocations that run twice.
    let duplicated = at_stop.outputs - at_stop.acked;
    assert!(duplicated <= at_stop.ack_pending, "{at_stop:?}");

    assert_every_input_has_one_output(&nats).await?;
    let view = second.function_view("echo").await?;
    let received = view["counters"]["received"].as_u64().context("received")?;
    assert_eq!(
        received,
        at_stop.pending + at_stop.ack_pending,
        "the second process got exactly what the first had not acked: {view}"
    );
    let metrics = second.get_text("/metrics").await?;
    let duplicates = publish_count(&metrics, "duplicate");
    println!(
        "kill -9: {} inputs re-run after the crash; {duplicated} of their outputs were already stored \
         and came back as JetStream duplicates ({duplicates} seen by the second process)",
        at_stop.ack_pending
    );
    assert_eq!(
        duplicates, duplicated,
        "each re-run output was de-duplicated by Nats-Msg-Id"
    );
    assert_eq!(
        publish_count(&metrics, "ok"),
        LOAD_EVENTS as u64 - at_stop.outputs
    );
    Ok(())
}

/// Fault plan #3: SIGTERM under load. 0 lost and 0 duplicates: every output stored at the stop
/// belongs to an acked input, and nothing is run twice after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_nothing_and_duplicates_nothing() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let nats = Nats::start().await?;
    let dir = tempfile::tempdir()?;
    let (at_stop, second) = load_with_stop(&nats, dir.path(), true).await?;
    assert_eq!(
        at_stop.outputs, at_stop.acked,
        "no output without its ack: {at_stop:?}"
    );
    assert_every_input_has_one_output(&nats).await?;
    let view = second.function_view("echo").await?;
    assert_eq!(
        view["counters"]["received"].as_u64(),
        Some(at_stop.pending + at_stop.ack_pending),
        "nothing delivered twice: {view}"
    );
    let metrics = second.get_text("/metrics").await?;
    assert_eq!(
        publish_count(&metrics, "duplicate"),
        0,
        "no output was published twice"
    );
    let info = nats.consumer("IN", "load").await?;
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0));
    Ok(())
}

// -------------------------------------------------------------------------------------------
// 4. nats-server restarted mid-stream
// -------------------------------------------------------------------------------------------

/// Fault plan #4: the server restarts (file storage) while Weir works; Weir reconnects by
/// itself, and every event published before and after the restart gets exactly one output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_restart_mid_stream_loses_nothing() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut nats = Nats::start().await?;
    const BEFORE: usize = 3000;
    const AFTER: usize = 1000;
    let streams: [(&str, &[&str]); 3] = [
        ("RIN", &["restart.in"]),
        ("ROUT", &["restart.out"]),
        ("DLQ", &["weir.dlq.>"]),
    ];
    nats.ensure_streams(&streams).await?;
    let before: Vec<String> = (0..BEFORE).map(|i| format!("before-{i:05}")).collect();
    nats.publish_many("restart.in", &before).await?;
    let config = format!(
        r#"
{brokers}
[[functions]]
name = "echo"
module = "echo.wasm"
outputs = ["restart.out"]
timeout = "2s"
config = {{ output_topic = "restart.out" }}
[functions.trigger]
broker = "jetstream"
topic = "restart.in"
stream = "RIN"
group = "restart"
ack_wait = "3s"
[functions.retry]
max_attempts = 30
initial_delay = "100ms"
max_delay = "1s"
[functions.scaling]
min = 1
max = 8
"#,
        brokers = brokers(&nats.server.url(), &streams)
    );
    let weir = InProcess::start(&config).await?;
    let done_at_restart = nats
        .wait_count("ROUT", (BEFORE / 5) as u64, LOAD_WAIT)
        .await?;
    let restarted = Instant::now();
    tokio::task::block_in_place(|| nats.server.restart())?;
    println!(
        "nats-server restarted after {done_at_restart} outputs, in {:?}",
        restarted.elapsed()
    );
    let stored = nats.stream_count("RIN").await?;
    assert_eq!(
        stored, BEFORE as u64,
        "file storage kept every input across the restart"
    );

    let after: Vec<String> = (0..AFTER).map(|i| format!("after-{i:05}")).collect();
    let deadline = Instant::now() + WAIT;
    // The test's own client reconnects too; retry until it has.
    while let Err(e) = nats.publish_many("restart.in", &after).await {
        ensure!(
            Instant::now() < deadline,
            "publishing after the restart: {e:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let total = (BEFORE + AFTER) as u64;
    nats.wait_count("ROUT", total, LOAD_WAIT).await?;
    nats.wait_drained("RIN", "restart", LOAD_WAIT).await?;
    let outputs = nats.read_stream("ROUT", None).await?;
    let causes: HashSet<&str> = outputs
        .iter()
        .filter_map(|m| m.header("ce-weircausation"))
        .collect();
    for id in before.iter().chain(&after) {
        assert!(causes.contains(id.as_str()), "{id} has no output");
    }
    assert_eq!(
        outputs.len() as u64,
        total,
        "one output per input (duplicates de-duplicated)"
    );
    assert_eq!(
        nats.stream_count("DLQ").await?,
        0,
        "nothing was dead-lettered"
    );
    let echo = weir.function("echo")?;
    assert!(
        echo.counters.succeeded.load(Relaxed) >= total,
        "every event succeeded at least once"
    );
    shutdown_within(weir).await
}

// -------------------------------------------------------------------------------------------
// 5. DLQ unavailable or full
// -------------------------------------------------------------------------------------------

/// Fault plan #15: while the DLQ cannot take a record (a stream full with `discard = new`, or
/// no stream capturing the subject), the input stays unacknowledged, the lane shows paused in
/// the admin API and in `weir_lane_paused`, and once the DLQ recovers everything is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_full_or_missing_pauses_the_lane_and_loses_nothing() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let nats = Nats::start().await?;
    let dir = tempfile::tempdir()?;
    let streams: [(&str, &[&str]); 1] = [("DIN", &["dlq.in.>"])];
    // Declared by the test, not by Weir: Weir would create it without the limit.
    nats.js
        .create_stream(stream::Config {
            name: "DLQFULL".into(),
            subjects: vec!["weir.dlq.>".into()],
            max_messages: 1,
            discard: DiscardPolicy::New,
            ..Default::default()
        })
        .await?;
    let reject = component_path("reject_all.wasm")?;
    let config = format!(
        r#"
[defaults]
timeout = "1s"
[defaults.trigger]
broker = "jetstream"
ack_wait = "2s"
# Fixed slots: every held delivery sits in its own slot (and gets heartbeats); see
# `queued_deliveries_beyond_the_slot_count_are_not_redelivered` for what happens otherwise.
[defaults.scaling]
min = 4
max = 4

{brokers}
[[functions]]
name = "reject-full"
module = "{reject}"
[functions.trigger]
topic = "dlq.in.full"
stream = "DIN"

[[functions]]
name = "reject-nostream"
module = "{reject}"
[functions.trigger]
topic = "dlq.in.none"
stream = "DIN"
[functions.dead_letter]
topic = "lost.dlq.reject-nostream"

# Only for the start-up warning: its dead letters go to a core subject no stream keeps.
[[functions]]
name = "reject-core"
module = "{reject}"
[functions.trigger]
broker = "nats"
topic = "dlq.core.in"
[functions.dead_letter]
topic = "gone.dlq.reject-core"
"#,
        brokers = brokers(&nats.server.url(), &streams)
    );
    let config = write_config(dir.path(), &config)?;
    let weir = WeirProcess::start(&config, &[]).await?;
    // Said at start-up, before any event needs it; of the captured one, nothing.
    let log = weir.log_text();
    ensure!(
        log.contains("no JetStream stream captures lost.dlq.reject-nostream, a dead-letter topic")
            && log.contains(
                "no JetStream stream captures gone.dlq.reject-core, a core NATS dead-letter topic"
            )
            && !log.contains("no JetStream stream captures weir.dlq.reject-full"),
        "start-up names the uncaptured dead-letter topics:\n{log}"
    );

    nats.publish_event("dlq.in.full", "full-1", "com.example.x", "{}", &[])
        .await?;
    nats.wait_count("DLQFULL", 1, WAIT).await?;
    nats.wait_drained("DIN", "weir-reject-full", WAIT).await?;
    for id in ["full-2", "full-3"] {
        nats.publish_event("dlq.in.full", id, "com.example.x", "{}", &[])
            .await?;
    }
    nats.publish_event("dlq.in.none", "none-1", "com.example.x", "{}", &[])
        .await?;

    let deadline = Instant::now() + WAIT;
    loop {
        let full = weir.function_view("reject-full").await?;
        let none = weir.function_view("reject-nostream").await?;
        if full["dead_letter_paused"] == true && none["dead_letter_paused"] == true {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "lanes not paused: {full}\n{none}\nlog:\n{}",
            weir.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let paused = |function: &str| format!("weir_lane_paused{{function=\"{function}\"}}");
    assert!(
        weir.metric(&paused("reject-full")).await?.unwrap_or(0.0) >= 1.0,
        "metric shows the pause"
    );
    assert!(
        weir.metric(&paused("reject-nostream"))
            .await?
            .unwrap_or(0.0)
            >= 1.0,
        "metric shows the pause"
    );

    // Held for two ack waits: nothing acked, nothing terminated, nothing redelivered (the
    // in-progress heartbeats keep the deliveries), and the full DLQ still has its one record.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let full = nats.consumer("DIN", "weir-reject-full").await?;
    assert_eq!(
        full.num_ack_pending, 2,
        "full-2 and full-3 are held unacknowledged"
    );
    assert_eq!(
        full.delivered.consumer_sequence,
        3,
        "each delivered once, none redelivered; log:\n{}",
        weir.log_text()
    );
    assert_eq!(full.num_redelivered, 0);
    let none = nats.consumer("DIN", "weir-reject-nostream").await?;
    assert_eq!(
        (none.num_ack_pending, none.delivered.consumer_sequence),
        (1, 1)
    );
    assert_eq!(nats.stream_count("DLQFULL").await?, 1);
    let metrics = weir.get_text("/metrics").await?;
    for function in ["reject-full", "reject-nostream"] {
        let failures = metric_value(
            &metrics,
            &format!("weir_dlq_publish_failures_total{{function=\"{function}\"}}"),
        );
        assert!(
            failures.unwrap_or(0.0) >= 2.0,
            "{function}: DLQ publish failures are counted: {failures:?}"
        );
    }

    // Recover: lift the limit, and create a stream for the other DLQ subject.
    let mut limited = nats
        .js
        .get_stream("DLQFULL")
        .await?
        .cached_info()
        .config
        .clone();
    limited.max_messages = -1;
    nats.js.update_stream(limited).await?;
    nats.js
        .create_stream(stream::Config {
            name: "LOST".into(),
            subjects: vec!["lost.dlq.>".into()],
            ..Default::default()
        })
        .await?;
    nats.wait_count("DLQFULL", 3, WAIT).await?;
    nats.wait_count("LOST", 1, WAIT).await?;
    nats.wait_drained("DIN", "weir-reject-full", WAIT).await?;
    nats.wait_drained("DIN", "weir-reject-nostream", WAIT)
        .await?;
    let ids: HashSet<String> = nats
        .events("DLQFULL", "weir.dlq.reject-full")
        .await?
        .iter()
        .map(|e| ext(e, "id").to_owned())
        .collect();
    assert_eq!(
        ids,
        HashSet::from(["full-1", "full-2", "full-3"].map(String::from))
    );
    let lost = nats.events("LOST", "lost.dlq.reject-nostream").await?;
    assert_eq!(lost.len(), 1);
    assert_eq!(ext(&lost[0], "id"), "none-1");
    assert_eq!(ext(&lost[0], "weirdlqreason"), "rejected");
    for function in ["reject-full", "reject-nostream"] {
        let view = weir.function_view(function).await?;
        assert_eq!(view["dead_letter_paused"], false, "{view}");
        assert_eq!(
            weir.metric(&paused(function)).await?,
            Some(0.0),
            "{function} resumed"
        );
    }
    Ok(())
}

// -------------------------------------------------------------------------------------------
// 6. A function slower than ack-wait
// -------------------------------------------------------------------------------------------

/// Fault plan #7: `sleepy` takes 3 s with a 1 s ack wait. The in-progress heartbeats (every
/// ack_wait/3) keep the delivery: one delivery, one invocation, no redelivery.
///
/// The config refuses `ack_wait <= timeout` (functions[0].trigger.ack_wait), so the test
/// validates a legal configuration and then shortens the ack wait on the resolved config,
/// exactly the situation of a function whose run outlives its ack wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn function_slower_than_ack_wait_runs_once() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let nats = Nats::start().await?;
    let streams: [(&str, &[&str]); 1] = [("SLOW", &["slow.in"])];
    let text = format!(
        r#"
{brokers}
[[functions]]
name = "sleepy"
module = "sleepy.wasm"
timeout = "10s"
config = {{ sleep_ms = "3000" }}
[functions.trigger]
broker = "jetstream"
topic = "slow.in"
stream = "SLOW"
ack_wait = "11s"
[functions.retry]
max_attempts = 1
"#,
        brokers = brokers(&nats.server.url(), &streams)
    );
    let mut config = weir_dispatcher::config::from_toml_str(&text, &functions_dir()?)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let trigger = config.functions[0]
        .trigger
        .jetstream
        .as_mut()
        .context("a jetstream trigger")?;
    trigger.ack_wait = Duration::from_secs(1);
    let runtime = Runtime::start(config).await?;
    let shared = runtime.shared();
    let sleepy = shared.function("sleepy").context("sleepy")?.clone();
    let info = nats.consumer("SLOW", "weir-sleepy").await?;
    assert_eq!(
        info.config.ack_wait,
        Duration::from_secs(1),
        "the consumer really has a 1 s ack wait"
    );

    let published = Instant::now();
    nats.publish_event("slow.in", "slow-1", "com.example.x", "{}", &[])
        .await?;
    let deadline = Instant::now() + WAIT;
    while sleepy.counters.succeeded.load(Relaxed) == 0 {
        ensure!(
            Instant::now() < deadline,
            "sleepy did not finish within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = published.elapsed();
    assert!(
        took >= Duration::from_secs(3),
        "the invocation outlived the ack wait: {took:?}"
    );
    // Two more ack waits: a redelivery would show up now.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        sleepy.counters.received.load(Relaxed),
        1,
        "one delivery reached the function"
    );
    assert_eq!(sleepy.counters.succeeded.load(Relaxed), 1, "one invocation");
    assert_eq!(sleepy.counters.failed.load(Relaxed), 0);
    let info = nats.consumer("SLOW", "weir-sleepy").await?;
    assert_eq!(
        info.delivered.consumer_sequence, 1,
        "the server delivered it once"
    );
    assert_eq!(info.num_redelivered, 0);
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0), "acked");
    runtime.shutdown().await;
    Ok(())
}

// -------------------------------------------------------------------------------------------
// 7. Two dispatchers on one durable consumer
// -------------------------------------------------------------------------------------------

/// Two `weir run` processes bound to the same durable consumer share its work: both process
/// some, together they process every event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_one_durable_consumer() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let nats = Nats::start().await?;
    let dir = tempfile::tempdir()?;
    let streams: [(&str, &[&str]); 3] = [
        ("SIN", &["share.in"]),
        ("SOUT", &["share.out"]),
        ("DLQ", &["weir.dlq.>"]),
    ];
    let config = shared_echo_config(
        &nats,
        dir.path(),
        "broker = \"jetstream\"\nstream = \"SIN\"",
        &streams,
    )?;
    let a = WeirProcess::start(&config, &[]).await?;
    let b = WeirProcess::start(&config, &[]).await?;
    let ids = shared_ids("share");
    nats.publish_many("share.in", &ids).await?;
    nats.wait_count("SOUT", SHARED_EVENTS as u64, LOAD_WAIT)
        .await?;
    nats.wait_drained("SIN", "shared", WAIT).await?;
    check_shared_once(&nats, [&a, &b], &ids, "one durable consumer").await
}

/// `trigger.deliver_policy = "new"`: the durable consumer weir creates starts after what the
/// stream holds, so a stored event does not run and one published after does. Once created it
/// keeps its place: an event published while weir is down runs after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliver_policy_new_starts_a_new_consumer_after_the_stored_events() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let nats = Nats::start().await?;
    let dir = tempfile::tempdir()?;
    let streams: [(&str, &[&str]); 2] = [("NEWIN", &["fresh.in"]), ("NEWOUT", &["fresh.out"])];
    nats.ensure_streams(&streams).await?;
    let trigger = "broker = \"jetstream\"\nstream = \"NEWIN\"\ndeliver_policy = \"new\"";
    let config = echo_config(
        &nats,
        dir.path(),
        &streams,
        "fresh.in",
        "fresh.out",
        trigger,
    )?;

    nats.publish_event("fresh.in", "stored", "com.example.x", "{}", &[])
        .await?;
    let mut first = WeirProcess::start(&config, &[]).await?;
    nats.publish_event("fresh.in", "new-1", "com.example.x", "{}", &[])
        .await?;
    nats.wait_event("NEWOUT", "fresh.out", WAIT, |e| {
        e["weircausation"] == "new-1"
    })
    .await
    .with_context(|| first.log_text())?;
    nats.wait_drained("NEWIN", "weir-echo", WAIT).await?;
    assert_eq!(
        nats.causes("NEWOUT", "fresh.out").await?,
        ["new-1"],
        "the stored event did not run"
    );
    first.terminate(Duration::from_secs(30)).await?;

    nats.publish_event("fresh.in", "while-down", "com.example.x", "{}", &[])
        .await?;
    let mut second = WeirProcess::start(&config, &[]).await?;
    nats.wait_event("NEWOUT", "fresh.out", WAIT, |e| {
        e["weircausation"] == "while-down"
    })
    .await
    .with_context(|| second.log_text())?;
    nats.wait_drained("NEWIN", "weir-echo", WAIT).await?;
    assert_eq!(
        nats.causes("NEWOUT", "fresh.out").await?,
        ["new-1", "while-down"]
    );
    let status = second.terminate(Duration::from_secs(30)).await?;
    assert!(status.success(), "weir exited with {status}");
    Ok(())
}

/// A function whose trigger moves to another subject of its stream keeps its group, so `weir
/// run` binds the same durable consumer with other subjects: the server moves it there, but
/// not in the stream. That is warned of and counted, and is what the warning says: an event of
/// the new subject stored before the consumer's place does not run, one published after does.
/// Another client moving the consumer while weir runs (a second weir process with another
/// configuration, say) is warned of and counted as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_consumer_moved_to_other_subjects_is_reported() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let nats = Nats::start().await?;
    let dir = tempfile::tempdir()?;
    let streams: [(&str, &[&str]); 2] = [("MOVE", &["move.>"]), ("MOVED", &["moved.out"])];
    nats.ensure_streams(&streams).await?;
    let config_on = |topic: &str| {
        let trigger = "broker = \"jetstream\"\nstream = \"MOVE\"\ngroup = \"mover\"";
        echo_config(&nats, dir.path(), &streams, topic, "moved.out", trigger)
    };
    let moved = |by: &str| format!("weir_nats_consumer_subject_changes_total{{by=\"{by}\"}}");
    let caused = |id: &'static str| move |e: &Value| e["weircausation"] == id;

    nats.publish_event("move.b", "early-b", "com.example.x", "{}", &[])
        .await?;
    nats.publish_event("move.a", "a-1", "com.example.x", "{}", &[])
        .await?;
    let mut first = WeirProcess::start(&config_on("move.a")?, &[]).await?;
    nats.wait_event("MOVED", "moved.out", WAIT, caused("a-1"))
        .await
        .with_context(|| first.log_text())?;
    nats.wait_drained("MOVE", "mover", WAIT).await?;
    assert_eq!(first.metric(&moved("binding")).await?, None);
    first.terminate(Duration::from_secs(30)).await?;

    let mut second = WeirProcess::start(&config_on("move.b")?, &[]).await?;
    assert_eq!(second.metric(&moved("binding")).await?, Some(1.0));
    let log = second.log_text();
    ensure!(
        log.contains("binding it moved it to the trigger's") && log.contains("move.a"),
        "the move is warned of, naming the subjects it left; log:\n{log}"
    );
    assert_eq!(
        nats.consumer("MOVE", "mover").await?.config.filter_subject,
        "move.b"
    );
    nats.publish_event("move.b", "b-1", "com.example.x", "{}", &[])
        .await?;
    nats.wait_event("MOVED", "moved.out", WAIT, caused("b-1"))
        .await
        .with_context(|| second.log_text())?;
    nats.wait_drained("MOVE", "mover", WAIT).await?;
    assert_eq!(
        nats.causes("MOVED", "moved.out").await?,
        ["a-1", "b-1"],
        "early-b was stored before the consumer's place, so it did not run"
    );

    let stream = nats.js.get_stream("MOVE").await?;
    let info = nats.consumer("MOVE", "mover").await?;
    stream
        .update_consumer(consumer::Config {
            filter_subject: "move.c".into(),
            ..info.config
        })
        .await
        .context("moving the consumer as another client")?;
    let deadline = Instant::now() + WAIT;
    while second.metric(&moved("another_client")).await? != Some(1.0) {
        ensure!(
            Instant::now() < deadline,
            "the move by another client was not reported; log:\n{}",
            second.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = second.log_text();
    ensure!(
        log.contains("another client moved this function's durable consumer")
            && log.contains("move.c"),
        "the move by another client is warned of, naming its subjects; log:\n{log}"
    );
    // Reported once, not at every lag reading.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(second.metric(&moved("another_client")).await?, Some(1.0));
    let status = second.terminate(Duration::from_secs(30)).await?;
    assert!(status.success(), "weir exited with {status}");
    Ok(())
}

/// Two `weir run` processes whose core NATS trigger names one queue group (`trigger.group`)
/// share the subject: the server gives each event to one of them, so every event has exactly
/// one output and both processes took work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_a_core_queue_group() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let nats = Nats::start().await?;
    let dir = tempfile::tempdir()?;
    let streams: [(&str, &[&str]); 1] = [("SOUT", &["share.out"])];
    let config = shared_echo_config(&nats, dir.path(), "broker = \"nats\"", &streams)?;
    // Each is subscribed once it answers /healthz: a core subject has no backlog to read.
    let a = WeirProcess::start(&config, &[]).await?;
    let b = WeirProcess::start(&config, &[]).await?;
    let ids = shared_ids("core-share");
    for id in &ids {
        nats.client
            .publish_with_headers(
                "share.in",
                ce_headers(id, "com.example.load", &[]),
                Bytes::from(format!("{{\"id\":\"{id}\"}}")),
            )
            .await
            .with_context(|| format!("publishing {id}"))?;
    }
    nats.client.flush().await.context("flushing the inputs")?;
    nats.wait_count("SOUT", SHARED_EVENTS as u64, LOAD_WAIT)
        .await?;
    check_shared_once(&nats, [&a, &b], &ids, "one core queue group").await
}

/// How many events the two-process tests publish.
const SHARED_EVENTS: usize = 2000;

fn shared_ids(prefix: &str) -> Vec<String> {
    (0..SHARED_EVENTS)
        .map(|i| format!("{prefix}-{i:05}"))
        .collect()
}

/// `weir.toml` in `dir` for the two-process tests: `echo` from `share.in` to `share.out`, in
/// group `shared`, up to 4 instances; `trigger` adds the broker's keys to its trigger.
fn shared_echo_config(
    nats: &Nats,
    dir: &Path,
    trigger: &str,
    streams: &[(&str, &[&str])],
) -> anyhow::Result<std::path::PathBuf> {
    let trigger = format!("{trigger}\ngroup = \"shared\"\n[functions.scaling]\nmin = 1\nmax = 4");
    echo_config(nats, dir, streams, "share.in", "share.out", &trigger)
}

/// `weir.toml` in `dir`: `echo` from `topic` to `output`; `trigger` adds its trigger's other
/// keys (its broker first of all) and may go on with the function's further sections.
fn echo_config(
    nats: &Nats,
    dir: &Path,
    streams: &[(&str, &[&str])],
    topic: &str,
    output: &str,
    trigger: &str,
) -> anyhow::Result<std::path::PathBuf> {
    let config = format!(
        r#"
{brokers}
[[functions]]
name = "echo"
module = "{module}"
outputs = ["{output}"]
config = {{ output_topic = "{output}" }}
[functions.trigger]
topic = "{topic}"
{trigger}
"#,
        brokers = brokers(&nats.server.url(), streams),
        module = component_path("echo.wasm")?
    );
    write_config(dir, &config)
}

/// After every event of `ids` has its output in `SOUT`: both processes took some, together
/// they took each once, and every event has its output.
async fn check_shared_once(
    nats: &Nats,
    processes: [&WeirProcess; 2],
    ids: &[String],
    shared: &str,
) -> anyhow::Result<()> {
    let received = |view: &Value| view["counters"]["received"].as_u64().unwrap_or(0);
    let (from_a, from_b) = (
        received(&processes[0].function_view("echo").await?),
        received(&processes[1].function_view("echo").await?),
    );
    println!("two processes on {shared}: {from_a} + {from_b}");
    assert!(
        from_a > 0 && from_b > 0,
        "both processes took work: {from_a} and {from_b}"
    );
    assert_eq!(
        from_a + from_b,
        ids.len() as u64,
        "each event was delivered to exactly one process"
    );
    let outputs = nats.read_stream("SOUT", None).await?;
    let causes: HashSet<&str> = outputs
        .iter()
        .filter_map(|m| m.header("ce-weircausation"))
        .collect();
    assert_eq!(outputs.len(), ids.len(), "one output per event");
    assert!(
        ids.iter().all(|id| causes.contains(id.as_str())),
        "the union covers every event"
    );
    Ok(())
}

/// A JetStream trigger fetches up to `scaling.max` deliveries, but the runner only takes one
/// when a pool slot is free. When the autoscaler runs fewer slots than `max` (here: lag 3 is
/// below `target_lag`, so 1 slot), fetched deliveries wait in the subscription's buffer with no
/// in-progress heartbeat, and the server redelivers them after `ack_wait` although Weir holds
/// them: the same event is then delivered (and run) more than once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_deliveries_beyond_the_slot_count_are_not_redelivered() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let nats = Nats::start().await?;
    let streams: [(&str, &[&str]); 1] = [("QUEUE", &["queue.in"])];
    let text = format!(
        r#"
{brokers}
[[functions]]
name = "sleepy"
module = "sleepy.wasm"
timeout = "5s"
config = {{ sleep_ms = "1500" }}
[functions.trigger]
broker = "jetstream"
topic = "queue.in"
stream = "QUEUE"
ack_wait = "6s"
[functions.scaling]
min = 1
max = 4
"#,
        brokers = brokers(&nats.server.url(), &streams)
    );
    let mut config = weir_dispatcher::config::from_toml_str(&text, &functions_dir()?)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let trigger = config.functions[0]
        .trigger
        .jetstream
        .as_mut()
        .context("a jetstream trigger")?;
    trigger.ack_wait = Duration::from_secs(1);
    let runtime = Runtime::start(config).await?;
    for id in ["q-1", "q-2", "q-3"] {
        nats.publish_event("queue.in", id, "com.example.x", "{}", &[])
            .await?;
    }
    let result = async {
        nats.wait_drained("QUEUE", "weir-sleepy", Duration::from_secs(30))
            .await?;
        let info = nats.consumer("QUEUE", "weir-sleepy").await?;
        let sleepy = runtime
            .shared()
            .function("sleepy")
            .context("sleepy")?
            .clone();
        ensure!(
            info.delivered.consumer_sequence == 3,
            "3 events were delivered {} times ({} invocations)",
            info.delivered.consumer_sequence,
            sleepy.counters.received.load(Relaxed)
        );
        Ok(())
    }
    .await;
    runtime.shutdown().await;
    result
}

// -------------------------------------------------------------------------------------------
// weir dlq redrive
// -------------------------------------------------------------------------------------------

/// The redrive test's configuration: `redo-work` (the module given, reading `format`) and
/// `redo-audit` (echo) both triggered by `redo.>`.
fn redrive_config(url: &str, work: &str, format: &str) -> anyhow::Result<String> {
    let streams: [(&str, &[&str]); 3] = [
        ("REDO", &["redo.>"]),
        ("REDONE", &["redone.>"]),
        ("DLQ", &["weir.dlq.>"]),
    ];
    Ok(format!(
        r#"
[defaults.trigger]
broker = "jetstream"

{brokers}
[[functions]]
name = "redo-work"
module = "{work}"
outputs = ["redone.work"]
config = {{ output_topic = "redone.work" }}
[functions.trigger]
topic = "redo.>"
stream = "REDO"
format = "{format}"
[functions.retry]
max_attempts = 1

[[functions]]
name = "redo-audit"
module = "{echo}"
outputs = ["redone.audit"]
config = {{ output_topic = "redone.audit" }}
[functions.trigger]
topic = "redo.>"
stream = "REDO"
"#,
        brokers = brokers(url, &streams),
        work = component_path(work)?,
        echo = component_path("echo.wasm")?,
    ))
}

/// `weir dlq redrive` with its JSON lines parsed: (exit code, record lines, summary, stderr).
async fn redrive(args: &[&str]) -> anyhow::Result<(Option<i32>, Vec<Value>, Value, String)> {
    let mut all = vec!["dlq", "redrive"];
    all.extend_from_slice(args);
    let out = run_weir(&all, WAIT).await?;
    let mut lines: Vec<Value> = out
        .stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("stdout is JSON lines: {out:?}"))?;
    let summary = match lines.pop() {
        Some(last) if last.get("summary").is_some() => last["summary"].clone(),
        _ => Value::Null,
    };
    Ok((out.code, lines, summary, out.stderr))
}

/// Dead letters go back to the function that failed them, to the subject each came in on,
/// and nowhere else: the other function on that subject acknowledges them without running.
/// A record is deleted once its event is confirmed; a dry run and a `--limit` leave the rest.
/// An event that fails again makes a new record (not a duplicate of the one redriven, which is
/// gone), saying where it was redriven from; an undecodable input goes back as its bytes and
/// runs once the function reads it differently; a second redrive finds nothing left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_redriven_to_the_function_that_failed_them() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let nats = Nats::start().await?;
    let url = nats.server.url();
    let dir = tempfile::tempdir()?;
    let (broken_dir, fixed_dir) = (dir.path().join("broken"), dir.path().join("fixed"));
    std::fs::create_dir_all(&broken_dir)?;
    std::fs::create_dir_all(&fixed_dir)?;
    let broken = redrive_config(&url, "reject_all.wasm", "cloudevents")?;
    let broken_path = write_config(&broken_dir, &broken)?;
    let fixed = redrive_config(&url, "echo.wasm", "auto")?;
    let fixed_path = write_config(&fixed_dir, &fixed)?;
    let (broken_path, fixed_path) = (
        broken_path.to_string_lossy().into_owned(),
        fixed_path.to_string_lossy().into_owned(),
    );

    let weir = InProcess::start(&broken).await?;
    // One at a time, each dead-lettered before the next is published: the function runs
    // events in parallel, and the steps below rely on the records' order.
    let mut records = Vec::new();
    for n in 1..=3 {
        match n {
            1 => nats
                .publish_event("redo.eu", "o-1", "com.example.order", r#"{"n":1}"#, &[])
                .await
                .map(drop)?,
            2 => nats
                .publish_event("redo.us", "o-2", "com.example.order", r#"{"n":2}"#, &[])
                .await
                .map(drop)?,
            _ => nats
                .publish_raw(
                    "redo.eu",
                    HeaderMap::new(),
                    Bytes::from_static(b"not an event"),
                )
                .await
                .map(drop)?,
        }
        let deadline = Instant::now() + WAIT;
        records = loop {
            let records = nats.events("DLQ", "weir.dlq.redo-work").await?;
            if records.len() >= n || Instant::now() >= deadline {
                break records;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        ensure!(records.len() == n, "{n} dead letters: {records:#?}");
    }
    let reasons: Vec<&str> = records.iter().map(|r| ext(r, "weirdlqreason")).collect();
    assert_eq!(reasons, ["rejected", "rejected", "undecodable"]);
    let topics: Vec<&str> = records.iter().map(|r| ext(r, "weirdlqtopic")).collect();
    assert_eq!(topics, ["redo.eu", "redo.us", "redo.eu"]);
    nats.wait_drained("REDO", "weir-redo-audit", WAIT).await?;
    assert_eq!(nats.causes("REDONE", "redone.audit").await?.len(), 3);

    // A dry run says what it would send and changes nothing.
    let (code, lines, summary, stderr) =
        redrive(&["redo-work", "-c", &broken_path, "--dry-run"]).await?;
    assert_eq!(code, Some(0), "{stderr}");
    let actions: Vec<&str> = lines
        .iter()
        .map(|l| l["action"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(actions, ["would-send"; 3], "{lines:#?}");
    let to: Vec<&str> = lines
        .iter()
        .map(|l| l["to"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(to, ["redo.eu", "redo.us", "redo.eu"]);
    assert_eq!(summary["would_send"], 3, "{summary}");
    assert!(stderr.contains("would send 3 events"), "{stderr}");
    assert_eq!(nats.events("DLQ", "weir.dlq.redo-work").await?.len(), 3);
    assert_eq!(nats.stream_count("REDO").await?, 3);

    // The function still rejects: the first rejected record goes back, fails again, and its
    // new record (a new position, not a duplicate of the one deleted) says where it came from.
    let (code, lines, summary, stderr) = redrive(&[
        "redo-work",
        "-c",
        &broken_path,
        "--reason",
        "rejected",
        "--limit",
        "1",
    ])
    .await?;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(lines.len(), 1, "{lines:#?}");
    assert_eq!(lines[0]["action"], "sent", "{lines:#?}");
    assert_eq!(lines[0]["id"], "o-1");
    assert_eq!(summary["stopped_at_limit"], true, "{summary}");
    let redriven_from = lines[0]["origin"].as_str().unwrap_or_default().to_owned();
    let again = nats
        .wait_event("DLQ", "weir.dlq.redo-work", WAIT, |r| {
            r["weirdlqredriven"] == redriven_from.as_str()
        })
        .await?;
    assert_eq!(again["id"], "o-1", "{again}");
    assert_eq!(ext(&again, "weirdlqreason"), "rejected");
    let left: Vec<String> = nats
        .events("DLQ", "weir.dlq.redo-work")
        .await?
        .iter()
        .map(|r| r["id"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        left.len(),
        3,
        "the redriven record is gone, its successor there: {left:?}"
    );
    assert_eq!(left[0], "o-2");
    assert_eq!(left[2], "o-1");
    // What went back: the event as it came, without the record's extensions, to redo.eu, for
    // redo-work alone.
    let resent = nats.read_stream("REDO", Some("redo.eu")).await?;
    let resent = resent.last().context("the redriven event on redo.eu")?;
    assert_eq!(resent.header("weir-redrive-for"), Some("redo-work"));
    assert_eq!(
        resent.header("weir-redrive-from"),
        Some(redriven_from.as_str())
    );
    let event = resent.event("REDO");
    assert_eq!(event["id"], "o-1", "{event}");
    assert!(
        event
            .as_object()
            .is_some_and(|e| !e.keys().any(|k| k.starts_with("weirdlq"))),
        "{event}"
    );
    nats.wait_drained("REDO", "weir-redo-audit", WAIT).await?;
    let (_, metrics) = weir.get("/metrics").await?;
    assert_eq!(
        metric_value(
            &metrics,
            r#"weir_redrives_passed_over_total{function="redo-audit"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(nats.causes("REDONE", "redone.audit").await?.len(), 3);
    shutdown_within(weir).await?;

    // Fixed (echo, reading any format): everything left goes back and runs.
    let weir = InProcess::start(&fixed).await?;
    let (code, lines, summary, stderr) = redrive(&["redo-work", "-c", &fixed_path]).await?;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(summary["sent"], 3, "{summary} {lines:#?}");
    assert_eq!(summary["kept"], 0, "{summary}");
    let outputs = {
        let deadline = Instant::now() + WAIT;
        loop {
            let outputs = nats.events("REDONE", "redone.work").await?;
            if outputs.len() >= 3 || Instant::now() >= deadline {
                break outputs;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let mut causes: Vec<&str> = outputs
        .iter()
        .map(|o| o["weircausation"].as_str().unwrap_or("?"))
        .collect();
    causes.retain(|cause| cause.starts_with("o-"));
    causes.sort_unstable();
    assert_eq!(outputs.len(), 3, "{outputs:#?}");
    assert_eq!(causes, ["o-1", "o-2"], "{outputs:#?}");
    assert!(
        // base64 of `not an event`: echo's output of a custom event of those bytes.
        outputs
            .iter()
            .any(|o| o["data_base64"] == "bm90IGFuIGV2ZW50" && o["type"] == "weir.custom"),
        "the undecodable input went back as its bytes: {}",
        serde_json::to_string_pretty(&outputs)?
    );
    assert!(nats.events("DLQ", "weir.dlq.redo-work").await?.is_empty());
    nats.wait_drained("REDO", "weir-redo-work", WAIT).await?;
    nats.wait_drained("REDO", "weir-redo-audit", WAIT).await?;
    assert_eq!(nats.causes("REDONE", "redone.audit").await?.len(), 3);
    // Passed over is not received: this weir's audit had none of its own.
    let audit = weir.function("redo-audit")?;
    assert_eq!(audit.counters.received.load(Relaxed), 0);
    let (_, metrics) = weir.get("/metrics").await?;
    assert_eq!(
        metric_value(
            &metrics,
            r#"weir_redrives_passed_over_total{function="redo-audit"}"#
        ),
        Some(4.0),
        "{metrics}"
    );

    // Nothing left, nothing sent; a function the file does not have is the caller's mistake.
    let (code, lines, summary, stderr) = redrive(&["redo-work", "-c", &fixed_path]).await?;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(lines.is_empty(), "{lines:#?}");
    assert_eq!(summary["read"], 0, "{summary}");
    assert_eq!(nats.stream_count("REDO").await?, 3 + 1 + 3);
    let (code, _, _, stderr) = redrive(&["nope", "-c", &fixed_path]).await?;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("no function \"nope\"") && stderr.contains("redo-work"),
        "{stderr}"
    );
    shutdown_within(weir).await
}
