//! Weir end to end on Kafka (a real Kafka-protocol broker, Tansu): the foundation scenarios,
//! `key` ordering with one key retrying in place, the commit watermark under out-of-order
//! completion, and the fault plan's Kafka cases (reference A.5: kill -9 and SIGTERM under load,
//! broker restart, DLQ unavailable, two dispatchers in one consumer group).
//!
//! Every test starts its own Tansu on a free loopback port. Weir runs in process (the real
//! [`weir_dispatcher::runtime::Runtime`], so counters can be read) or as the real `weir run`
//! binary ([`WeirProcess`]) where the test must kill it. What Weir did is read back from the
//! broker with a plain rdkafka consumer (outputs and DLQ records, decoded the way `weir tail`
//! shows them; record timestamps) and from the group's committed offsets, which is the
//! broker's truth rather than Weir's account of itself.
//!
//! Two Tansu 0.6 quirks shape the helpers: ListOffsets(latest) answers the base offset of the
//! newest record batch plus one (so `fetch_watermarks` under-reports; the [`Reader`] takes the
//! high watermark from fetch responses instead), and a fetch returns batches from the first
//! one whose base offset is at or after the requested offset (so resuming from a committed
//! offset inside a multi-record batch skips or stalls; the tests produce one record per batch).
//!
//! Tansu runs on memory storage (fast), except in the broker-restart test, which runs it on
//! SQLite storage so that topics, records and committed offsets survive the restart and
//! "nothing lost" covers the events published before it too.
//!
//! Tests of this file run one at a time ([`SERIAL`]): timing assertions and load tests must not
//! compete for the 2 cores. Every wait is bounded. Needs `make functions` and
//! `cargo build -p weir-dispatcher --bin weir` first.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context as _};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::future_producer::Delivery as Produced;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use weir_broker_bridge::kafka::KafkaTransport;
use weir_tests::kafka_broker::{test_producer, KafkaBroker};
use weir_tests::process::{metric_value, WeirProcess};
use weir_tests::scenario::{
    check_exhausted_record, check_flaky_retries, check_forbidden_output, check_memory_trap_record,
    check_order_chain, check_rejected_record, check_timeout_record, check_trap_record,
    check_undecodable_record, ext, failure_functions, flaky_policy, write_config, SPIN_TIMEOUT,
    TRACEPARENT,
};
use weir_tests::weir::{component_path, run_weir, InProcess};

/// Tests of this file run one at a time (see the module docs).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Generous bound for anything that should take milliseconds: the machine is shared, and a
/// fresh consumer group needs a join round first.
const WAIT: Duration = Duration::from_secs(30);
/// Bound for a load test's events to be processed.
const LOAD_WAIT: Duration = Duration::from_secs(240);
const LOAD_EVENTS: usize = 6_000;
/// The consumer-group session timeout of every configuration here.
const SESSION_TIMEOUT: Duration = Duration::from_secs(6);
/// Partitions of every topic Weir creates, and of the topics the tests create.
const PARTITIONS: i32 = 3;

/// Slack over the upper bound of an in-place retry delay: a tokio timer, a task wake-up and
/// the millisecond resolution of the timestamps compared, on a loaded 2-core machine.
const IN_PLACE_SLACK: Duration = Duration::from_millis(150);
/// Beyond the timeout: epoch tick, unwind, the DLQ publish confirmed, and the test's polling.
const TIMEOUT_BOUND_SLACK: Duration = Duration::from_millis(1500);

// -------------------------------------------------------------------------------------------
// Test-side Kafka helpers
// -------------------------------------------------------------------------------------------

/// A broker, Weir's own transport to it (topics, committed offsets) and a test producer.
struct Kafka {
    broker: KafkaBroker,
    transport: KafkaTransport,
    producer: FutureProducer,
}

/// A record to produce.
struct Record<'a> {
    key: Option<&'a str>,
    headers: Vec<(String, String)>,
    /// `None` is a null value (a tombstone).
    payload: Option<Vec<u8>>,
}

impl Kafka {
    async fn start() -> anyhow::Result<Kafka> {
        Self::with_broker(KafkaBroker::start().await?).await
    }

    /// A broker whose data survives a restart (SQLite storage).
    async fn start_persistent() -> anyhow::Result<Kafka> {
        Self::with_broker(KafkaBroker::start_persistent().await?).await
    }

    async fn with_broker(broker: KafkaBroker) -> anyhow::Result<Kafka> {
        let transport = KafkaTransport::connect(&broker.config()).await?;
        let producer = test_producer(&broker.bootstrap())?;
        Ok(Kafka {
            broker,
            transport,
            producer,
        })
    }

    fn bootstrap(&self) -> String {
        self.broker.bootstrap()
    }

    async fn create_topics(&self, topics: &[&str], partitions: i32) -> anyhow::Result<()> {
        for topic in topics {
            self.transport
                .ensure_topic(topic, partitions, 1)
                .await
                .with_context(|| format!("creating {topic}"))?;
        }
        Ok(())
    }

    /// Produces `records` in order (enqueued one after the other, so per-partition order is the
    /// slice's order) and waits for every delivery report.
    async fn produce(&self, topic: &str, records: &[Record<'_>]) -> anyhow::Result<Vec<Produced>> {
        let mut reports = Vec::with_capacity(records.len());
        for record in records {
            let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
            for (key, value) in &record.headers {
                headers = headers.insert(Header {
                    key,
                    value: Some(value.as_bytes()),
                });
            }
            let mut future: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic).headers(headers);
            if let Some(key) = record.key {
                future = future.key(key);
            }
            if let Some(payload) = &record.payload {
                future = future.payload(payload);
            }
            let deadline = Instant::now() + WAIT;
            loop {
                match self.producer.send_result(future) {
                    Ok(report) => {
                        reports.push(report);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        ensure!(
                            Instant::now() < deadline,
                            "the producer queue stayed full for {WAIT:?}"
                        );
                        future = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((error, _)) => bail!("producing to {topic}: {error}"),
                }
            }
        }
        let mut produced = Vec::with_capacity(reports.len());
        for report in reports {
            let delivery = tokio::time::timeout(WAIT, report)
                .await
                .context("no delivery report")?
                .context("the producer went away")?
                .map_err(|(error, _)| anyhow::anyhow!("producing to {topic}: {error}"))?;
            produced.push(delivery);
        }
        Ok(produced)
    }

    /// One binary-mode CloudEvent with JSON data.
    async fn publish_event(
        &self,
        topic: &str,
        key: Option<&str>,
        id: &str,
        ty: &str,
        data: &str,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<Produced> {
        let record = Record {
            key,
            headers: ce_headers(id, ty, extra),
            payload: Some(data.as_bytes().to_vec()),
        };
        let mut produced = self.produce(topic, &[record]).await?;
        produced.pop().context("no delivery")
    }

    /// `ids` as small JSON events keyed by their id; returns id → (partition, offset).
    async fn publish_ids(
        &self,
        topic: &str,
        ids: &[String],
    ) -> anyhow::Result<HashMap<String, (i32, i64)>> {
        let records: Vec<Record<'_>> = ids
            .iter()
            .map(|id| Record {
                key: Some(id),
                headers: ce_headers(id, "com.example.load", &[]),
                payload: Some(format!("{{\"id\":\"{id}\"}}").into_bytes()),
            })
            .collect();
        let produced = self.produce(topic, &records).await?;
        Ok(ids
            .iter()
            .cloned()
            .zip(produced.iter().map(|d| (d.partition, d.offset)))
            .collect())
    }

    /// A reader of `topic` from the beginning.
    fn reader(&self, topic: &str) -> anyhow::Result<Reader> {
        Reader::new(&self.bootstrap(), topic)
    }

    /// Everything `topic` holds now.
    fn read(&self, topic: &str) -> anyhow::Result<Vec<Stored>> {
        let mut reader = self.reader(topic)?;
        reader.catch_up()?;
        Ok(reader.records)
    }

    /// The decoded events of `topic`.
    fn events(&self, topic: &str) -> anyhow::Result<Vec<Value>> {
        Ok(self.read(topic)?.iter().map(|r| r.event(topic)).collect())
    }

    /// The first event on `topic` for which `matches` holds; fails after `timeout` with what the
    /// topic held.
    async fn wait_event(
        &self,
        topic: &str,
        timeout: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        let mut reader = self.reader(topic)?;
        loop {
            reader.catch_up()?;
            let events: Vec<Value> = reader.records.iter().map(|r| r.event(topic)).collect();
            if let Some(found) = events.iter().find(|e| matches(e)) {
                return Ok(found.clone());
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {timeout:?} waiting for an event on {topic}; saw {}: {}",
                    events.len(),
                    serde_json::to_string_pretty(&events).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The high watermark of each partition of `topic`.
    fn high_watermarks(&self, topic: &str) -> anyhow::Result<BTreeMap<i32, i64>> {
        self.reader(topic)?.catch_up()
    }

    /// How many records `topic` holds (sum of high watermarks; nothing is ever deleted here).
    fn count(&self, topic: &str) -> anyhow::Result<i64> {
        Ok(self.high_watermarks(topic)?.values().sum())
    }

    async fn wait_count(&self, topic: &str, n: i64, timeout: Duration) -> anyhow::Result<i64> {
        let deadline = Instant::now() + timeout;
        loop {
            let count = self.count(topic)?;
            if count >= n {
                return Ok(count);
            }
            ensure!(
                Instant::now() < deadline,
                "{topic} holds {count} records after {timeout:?}, expected {n}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The group's committed offset per partition (`None`: nothing committed).
    async fn committed(
        &self,
        topic: &str,
        group: &str,
    ) -> anyhow::Result<BTreeMap<i32, Option<i64>>> {
        Ok(self.transport.committed_offsets(topic, group).await?)
    }

    /// Waits until `group` committed `topic` up to its high watermark on every partition.
    async fn wait_committed(
        &self,
        topic: &str,
        group: &str,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let high = self.high_watermarks(topic)?;
            let committed = self.committed(topic, group).await?;
            let done = high
                .iter()
                .all(|(p, h)| *h == 0 || committed.get(p).copied().flatten() == Some(*h));
            if done {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{group} did not commit {topic} to its end within {timeout:?}: committed {committed:?}, high {high:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A record as stored.
#[derive(Debug, Clone)]
struct Stored {
    partition: i32,
    offset: i64,
    key: Option<Vec<u8>>,
    headers: Vec<(String, String)>,
    payload: Option<Vec<u8>>,
    /// The record's timestamp (the producer's create time), ms since the epoch.
    timestamp_ms: i64,
}

impl Stored {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The id of the input event this output was caused by.
    fn causation(&self) -> Option<&str> {
        self.header("ce_weircausation")
    }

    /// Decoded with Weir's own codec and shown as `weir tail` / the admin API show events.
    fn event(&self, topic: &str) -> Value {
        let origin = format!("kafka://{topic}/{}/{}", self.partition, self.offset);
        let source = weir_schemas::wire::default_source("kafka", topic);
        let wire = weir_schemas::WireMessage {
            headers: &self.headers,
            payload: self.payload.as_deref(),
            key: self.key.as_deref(),
            origin: &origin,
            default_source: &source,
        };
        match weir_schemas::decode(&wire, weir_schemas::Format::Auto) {
            Ok(events) if events.len() == 1 => weir_dispatcher::http::event_json(&events[0]),
            Ok(events) => json!({ "offset": self.offset, "events": events.len() }),
            Err(e) => json!({ "offset": self.offset, "undecodable": e.to_string() }),
        }
    }
}

/// Keeps the reader's latest librdkafka statistics: their `hi_offset` is the high watermark of
/// the last fetch response. Tansu 0.6 answers ListOffsets(latest) with the base offset of the
/// newest record batch plus one (too low for batches of several records), so
/// `fetch_watermarks` cannot be trusted there; the fetch response's watermark can.
#[derive(Clone, Default)]
struct StatsContext {
    latest: Arc<Mutex<(u64, Option<Statistics>)>>,
}

impl ClientContext for StatsContext {
    fn stats(&self, statistics: Statistics) {
        let mut latest = self
            .latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        latest.0 += 1;
        latest.1 = Some(statistics);
    }
}

impl ConsumerContext for StatsContext {}

/// Reads a topic from the beginning, incrementally, without a consumer group.
struct Reader {
    consumer: BaseConsumer<StatsContext>,
    context: StatsContext,
    topic: String,
    partitions: Vec<i32>,
    next: BTreeMap<i32, i64>,
    records: Vec<Stored>,
}

impl Reader {
    fn new(bootstrap: &str, topic: &str) -> anyhow::Result<Reader> {
        let context = StatsContext::default();
        let consumer: BaseConsumer<StatsContext> = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "weir-tests-reader")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "20")
            .set("statistics.interval.ms", "50")
            .create_with_context(context.clone())
            .context("creating the test reader")?;
        let metadata = blocking(|| consumer.fetch_metadata(Some(topic), Duration::from_secs(10)))
            .with_context(|| format!("metadata of {topic}"))?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic)
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        ensure!(
            !partitions.is_empty(),
            "topic {topic} has no partitions (does it exist?)"
        );
        let mut list = TopicPartitionList::new();
        for partition in &partitions {
            list.add_partition_offset(topic, *partition, Offset::Beginning)?;
        }
        consumer.assign(&list).context("assigning the reader")?;
        Ok(Reader {
            consumer,
            context,
            topic: topic.to_owned(),
            next: partitions.iter().map(|p| (*p, 0)).collect(),
            partitions,
            records: Vec::new(),
        })
    }

    /// The statistics generation and the high watermark of every partition per the latest
    /// fetch responses (`None` until every partition was fetched).
    fn fetched_high(&self) -> (u64, Option<BTreeMap<i32, i64>>) {
        let latest = self
            .context
            .latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let high = latest.1.as_ref().and_then(|stats| {
            let topic = stats.topics.get(&self.topic)?;
            self.partitions
                .iter()
                .map(|p| {
                    let partition = topic.partitions.get(p)?;
                    (partition.fetch_state == "active" && partition.hi_offset >= 0)
                        .then_some((*p, partition.hi_offset))
                })
                .collect()
        });
        (latest.0, high)
    }

    /// Reads until every partition reached the high watermark of a fetch response that came
    /// after the call began; returns those high watermarks.
    fn catch_up(&mut self) -> anyhow::Result<BTreeMap<i32, i64>> {
        let (generation, _) = self.fetched_high();
        let deadline = Instant::now() + WAIT;
        loop {
            let (now, high) = self.fetched_high();
            // Two statistics rounds later, the watermarks are from fetches sent after the start.
            if let Some(high) = high.clone().filter(|_| now >= generation + 2) {
                if high
                    .iter()
                    .all(|(p, h)| self.next.get(p).copied().unwrap_or(0) >= *h)
                {
                    return Ok(high);
                }
            }
            ensure!(
                Instant::now() < deadline,
                "reading {}: at {:?}, fetched high {high:?} after {WAIT:?}",
                self.topic,
                self.next
            );
            let Some(polled) = blocking(|| {
                self.consumer
                    .poll(Duration::from_millis(20))
                    .map(|m| m.map(|m| m.detach()))
            }) else {
                continue;
            };
            let message = polled.with_context(|| format!("reading {}", self.topic))?;
            let headers = message
                .headers()
                .map(|h| {
                    (0..h.count())
                        .map(|i| {
                            let header = h.get(i);
                            (
                                header.key.to_owned(),
                                String::from_utf8_lossy(header.value.unwrap_or_default())
                                    .into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            self.next.insert(message.partition(), message.offset() + 1);
            self.records.push(Stored {
                partition: message.partition(),
                offset: message.offset(),
                key: message.key().map(<[u8]>::to_vec),
                headers,
                payload: message.payload().map(<[u8]>::to_vec),
                timestamp_ms: message.timestamp().to_millis().unwrap_or(0),
            });
        }
    }
}

/// A blocking rdkafka call from an async test (multi-thread runtime).
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn ce_headers(id: &str, ty: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut headers = vec![
        ("ce_specversion".to_owned(), "1.0".to_owned()),
        ("ce_id".to_owned(), id.to_owned()),
        ("ce_source".to_owned(), "weir-tests".to_owned()),
        ("ce_type".to_owned(), ty.to_owned()),
        ("content-type".to_owned(), "application/json".to_owned()),
    ];
    headers.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    headers
}

/// `[brokers.kafka]` for `bootstrap`, with short timeouts suited to tests.
fn brokers(bootstrap: &str, create_topics: bool) -> String {
    format!(
        r#"[brokers.kafka]
bootstrap = "{bootstrap}"
create_topics = {create_topics}
topic_defaults = {{ partitions = {PARTITIONS}, replication_factor = 1 }}
session_timeout = "{session}s"
commit_interval = "200ms"
drain_timeout = "5s"
publish_timeout = "5s"
"#,
        session = SESSION_TIMEOUT.as_secs()
    )
}

/// How many outputs each input id has, from the outputs' `weircausation`.
fn outputs_per_input(outputs: &[Stored]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for output in outputs {
        *counts
            .entry(output.causation().unwrap_or_default().to_owned())
            .or_insert(0) += 1;
    }
    counts
}

/// Inputs without an output (first 10) and the number of duplicate outputs.
fn lost_and_duplicates(ids: &[String], outputs: &[Stored]) -> (Vec<String>, usize) {
    let counts = outputs_per_input(outputs);
    let lost = ids
        .iter()
        .filter(|id| !counts.contains_key(*id))
        .take(10)
        .cloned()
        .collect();
    let duplicates = counts.values().map(|n| n.saturating_sub(1)).sum();
    (lost, duplicates)
}

// -------------------------------------------------------------------------------------------
// 1. The foundation scenarios
// -------------------------------------------------------------------------------------------

fn foundation_config(bootstrap: &str) -> String {
    format!(
        r#"
[defaults]
timeout = "2s"
memory = "64MiB"

[defaults.trigger]
broker = "kafka"

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

[[functions]]
name = "order-enrich"
module = "order_enrich.wasm"
outputs = ["orders.enriched"]
config = {{ large_threshold = "1000", currency = "EUR" }}
[functions.trigger]
topic = "orders.validated"

[[functions]]
name = "flaky"
module = "flaky.wasm"
outputs = ["k.flaky.out"]
config = {{ fail_attempts = "2", output_topic = "k.flaky.out" }}
[functions.trigger]
topic = "k.flaky.in"
[functions.retry]
max_attempts = 5
initial_delay = "200ms"
multiplier = 2.0
jitter = 0.2

{failures}
[[functions]]
name = "db-audit"
module = "db_audit.wasm"
outputs = ["db.audit"]
[functions.trigger]
topic = "dbserver1.inventory.customers"
format = "debezium"
"#,
        brokers = brokers(bootstrap, true),
        failures = failure_functions("k", ""),
    )
}

/// The chain, in-place retries, exhaustion, reject, timeout, traps, a forbidden output,
/// undecodable input and a Debezium tombstone, all on Kafka with DLQ records on DLQ topics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_foundation_scenarios() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let kafka = Kafka::start().await?;
    // Weir never publishes there (the test proves it), so it creates no such topic itself.
    kafka
        .create_topics(&["k.forbidden.topic"], PARTITIONS)
        .await?;
    let weir = InProcess::start(&foundation_config(&kafka.bootstrap())).await?;
    chain(&kafka).await.context("chain")?;
    flaky_retries_in_place(&kafka, &weir)
        .await
        .context("flaky")?;
    exhaustion_dead_letters_once(&kafka, &weir)
        .await
        .context("exhaustion")?;
    reject(&kafka, &weir).await.context("reject")?;
    timeout_and_traps(&kafka)
        .await
        .context("timeout and traps")?;
    forbidden_output(&kafka, &weir)
        .await
        .context("bad output")?;
    undecodable(&kafka).await.context("undecodable")?;
    tombstone(&kafka).await.context("tombstone")?;
    weir.shutdown().await
}

async fn chain(kafka: &Kafka) -> anyhow::Result<()> {
    let order = r#"{"id":"o-1","amount":42}"#;
    kafka
        .publish_event(
            "orders",
            Some("o-1"),
            "order-1",
            "com.example.order",
            order,
            &[("ce_traceparent", TRACEPARENT)],
        )
        .await?;
    let validated = kafka
        .wait_event("orders.validated", WAIT, |e| {
            e["weircausation"] == "order-1"
        })
        .await?;
    let enriched = kafka
        .wait_event("orders.enriched", WAIT, |e| e["data"]["id"] == "o-1")
        .await?;
    check_order_chain(&validated, &enriched)?;
    // Outputs are keyed by the order id (order-validate / order-enrich set it).
    let stored = kafka.read("orders.enriched")?;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].key.as_deref(), Some(&b"o-1"[..]));
    kafka
        .wait_committed("orders", "weir-order-validate", WAIT)
        .await?;
    kafka
        .wait_committed("orders.validated", "weir-order-enrich", WAIT)
        .await
}

async fn flaky_retries_in_place(kafka: &Kafka, weir: &InProcess) -> anyhow::Result<()> {
    let flaky = weir.function("flaky")?;
    assert_eq!(
        flaky.spec.retry,
        flaky_policy(),
        "the configured policy is the one checked here"
    );
    kafka
        .publish_event(
            "k.flaky.in",
            Some("f-1"),
            "flaky-1",
            "com.example.flaky",
            r#"{"n":1}"#,
            &[],
        )
        .await?;
    let output = kafka
        .wait_event("k.flaky.out", WAIT, |e| e["weircausation"] == "flaky-1")
        .await?;
    assert_eq!(output["data"], json!({"n": 1}), "flaky echoes its input");
    check_flaky_retries(&flaky, "flaky-1", &output, IN_PLACE_SLACK)?;
    assert_eq!(
        flaky.counters.received.load(Relaxed),
        1,
        "Kafka delivered it once; the retries were in place"
    );
    assert_eq!(kafka.read("k.flaky.out")?.len(), 1, "one output");
    kafka.wait_committed("k.flaky.in", "weir-flaky", WAIT).await
}

async fn exhaustion_dead_letters_once(kafka: &Kafka, weir: &InProcess) -> anyhow::Result<()> {
    let data = json!({"order": "o-77", "lines": [1, 2, 3]});
    let produced = kafka
        .publish_event(
            "k.forever.in",
            Some("o-77"),
            "forever-1",
            "com.example.forever",
            &data.to_string(),
            &[("ce_subject", "orders/o-77")],
        )
        .await?;
    let record = kafka
        .wait_event("weir.dlq.flaky-forever", WAIT, |e| e["id"] == "forever-1")
        .await?;
    let runner = weir.function("flaky-forever")?;
    // The first and last failures are two in-place delays apart.
    check_exhausted_record(
        &record,
        &data,
        runner.pool.module().sha256(),
        &format!(
            "kafka://k.forever.in/{}/{}",
            produced.partition, produced.offset
        ),
    )?;

    // Exactly one record, the input committed past, no output.
    kafka
        .wait_committed("k.forever.in", "weir-flaky-forever", WAIT)
        .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let records = kafka.events("weir.dlq.flaky-forever")?;
    assert_eq!(records.len(), 1, "exactly one DLQ record: {records:?}");
    assert_eq!(
        runner.counters.received.load(Relaxed),
        1,
        "one delivery; three invocations in place"
    );
    assert_eq!(runner.counters.dead_lettered.load(Relaxed), 1);
    assert!(kafka.read("k.forever.out")?.is_empty());
    Ok(())
}

async fn reject(kafka: &Kafka, weir: &InProcess) -> anyhow::Result<()> {
    let produced = kafka
        .publish_event("k.reject.in", None, "reject-1", "com.example.x", "{}", &[])
        .await?;
    let record = kafka
        .wait_event("weir.dlq.reject-all", WAIT, |e| e["id"] == "reject-1")
        .await?;
    check_rejected_record(&record)?;
    assert_eq!(
        ext(&record, "weirdlqorigin"),
        format!(
            "kafka://k.reject.in/{}/{}",
            produced.partition, produced.offset
        )
    );
    kafka
        .wait_committed("k.reject.in", "weir-reject-all", WAIT)
        .await?;
    let runner = weir.function("reject-all")?;
    assert_eq!(
        runner.counters.retried.load(Relaxed),
        0,
        "a reject burns no retries"
    );
    assert_eq!(runner.counters.received.load(Relaxed), 1);
    Ok(())
}

async fn timeout_and_traps(kafka: &Kafka) -> anyhow::Result<()> {
    let published = Instant::now();
    kafka
        .publish_event("k.spin.in", None, "spin-1", "com.example.x", "{}", &[])
        .await?;
    let record = kafka
        .wait_event("weir.dlq.spin", WAIT, |e| e["id"] == "spin-1")
        .await?;
    check_timeout_record(
        &record,
        published.elapsed(),
        SPIN_TIMEOUT + TIMEOUT_BOUND_SLACK,
    )?;

    kafka
        .publish_event("k.hog.in", None, "hog-1", "com.example.x", "{}", &[])
        .await?;
    let record = kafka
        .wait_event("weir.dlq.memory-hog", WAIT, |e| e["id"] == "hog-1")
        .await?;
    check_memory_trap_record(&record)?;

    kafka
        .publish_event("k.trap.in", None, "trap-1", "com.example.x", "{}", &[])
        .await?;
    let record = kafka
        .wait_event("weir.dlq.always-trap", WAIT, |e| e["id"] == "trap-1")
        .await?;
    check_trap_record(&record)?;
    for (topic, group) in [
        ("k.spin.in", "weir-spin"),
        ("k.hog.in", "weir-memory-hog"),
        ("k.trap.in", "weir-always-trap"),
    ] {
        kafka.wait_committed(topic, group, WAIT).await?;
    }
    Ok(())
}

async fn forbidden_output(kafka: &Kafka, weir: &InProcess) -> anyhow::Result<()> {
    kafka
        .publish_event("k.bad.in", None, "bad-1", "com.example.x", "{}", &[])
        .await?;
    let record = kafka
        .wait_event("weir.dlq.bad-output", WAIT, |e| e["id"] == "bad-1")
        .await?;
    let bad_output = weir.function("bad-output")?;
    check_forbidden_output(&record, &bad_output, "k.forbidden.topic")?;
    assert!(
        kafka.read("k.forbidden.topic")?.is_empty(),
        "nothing on the forbidden topic"
    );
    assert!(
        kafka.read("k.ok.topic")?.is_empty(),
        "nothing on the allowed one either"
    );
    kafka
        .wait_committed("k.bad.in", "weir-bad-output", WAIT)
        .await
}

async fn undecodable(kafka: &Kafka) -> anyhow::Result<()> {
    let raw = b"\x00\x01 not json \xff".to_vec();
    let headers = vec![
        ("ce_specversion".to_owned(), "0.3".to_owned()),
        ("ce_id".to_owned(), "legacy-1".to_owned()),
        ("ce_source".to_owned(), "legacy".to_owned()),
        ("ce_type".to_owned(), "com.example.legacy".to_owned()),
        (
            "content-type".to_owned(),
            "application/octet-stream".to_owned(),
        ),
    ];
    let produced = kafka
        .produce(
            "k.echo.in",
            &[Record {
                key: None,
                headers,
                payload: Some(raw.clone()),
            }],
        )
        .await?;
    let origin = format!(
        "kafka://k.echo.in/{}/{}",
        produced[0].partition, produced[0].offset
    );
    let record = kafka
        .wait_event("weir.dlq.echo", WAIT, |e| {
            e["weirdlqorigin"] == origin.as_str()
        })
        .await?;
    check_undecodable_record(&record, &raw)?;
    assert!(kafka.read("k.echo.out")?.is_empty(), "echo never ran on it");
    kafka.wait_committed("k.echo.in", "weir-echo", WAIT).await
}

async fn tombstone(kafka: &Kafka) -> anyhow::Result<()> {
    let topic = "dbserver1.inventory.customers";
    let key = r#"{"id":1004}"#;
    let produced = kafka
        .produce(
            topic,
            &[Record {
                key: Some(key),
                headers: Vec::new(),
                payload: None,
            }],
        )
        .await?;
    // The id Weir derives for it (from its coordinates), decoded the same way Weir does.
    let stored = Stored {
        partition: produced[0].partition,
        offset: produced[0].offset,
        key: Some(key.as_bytes().to_vec()),
        headers: Vec::new(),
        payload: None,
        timestamp_ms: 0,
    };
    let input = stored.event(topic);
    let input_id = ext(&input, "id").to_owned();
    ensure!(!input_id.is_empty(), "the tombstone decodes: {input}");
    let audit = kafka
        .wait_event("db.audit", WAIT, |e| {
            e["weircausation"] == input_id.as_str()
        })
        .await?;
    assert_eq!(audit["data"]["op"], "tombstone", "{audit}");
    assert_eq!(
        audit["data"]["table"], "inventory.customers",
        "the table comes from the topic name: {audit}"
    );
    assert_eq!(audit["data"]["changed"], json!([]), "{audit}");
    assert_eq!(audit["type"], "weir.db.audit");
    kafka.wait_committed(topic, "weir-db-audit", WAIT).await
}

// -------------------------------------------------------------------------------------------
// 2. `key` ordering with one key retrying in place
// -------------------------------------------------------------------------------------------

const KEYS: usize = 8;
const EVENTS_PER_KEY: usize = 1_000;

/// 8 keys × 1,000 events over 3 partitions; one key's every event fails twice (in place)
/// before succeeding. Every key's outputs come in order, exactly once, and the other keys —
/// including one that shares the failing key's partition — finish while the failing key is
/// still retrying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_ordering_holds_per_key_and_a_retrying_key_blocks_no_other() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let kafka = Kafka::start().await?;
    kafka
        .create_topics(&["ko.in", "ko.out"], PARTITIONS)
        .await?;
    let keys: Vec<String> = (0..KEYS).map(|k| format!("key-{k}")).collect();
    let event = |key: &str, seq: usize| Record {
        key: None,
        headers: ce_headers(&format!("{key}-{seq:04}"), "com.example.seq", &[]),
        payload: Some(json!({"key": key, "seq": seq}).to_string().into_bytes()),
    };
    // The first event of each key tells which partition the key lives on.
    let first: Vec<Record<'_>> = keys
        .iter()
        .map(|k| Record {
            key: Some(k),
            ..event(k, 0)
        })
        .collect();
    let produced = kafka.produce("ko.in", &first).await?;
    let partition_of: HashMap<&str, i32> = keys
        .iter()
        .map(String::as_str)
        .zip(produced.iter().map(|d| d.partition))
        .collect();
    // Fail a key that shares its partition with another, so "per key, also inside one
    // partition" is what is tested.
    let fail_key = keys
        .iter()
        .find(|k| {
            partition_of
                .values()
                .filter(|p| **p == partition_of[k.as_str()])
                .count()
                > 1
        })
        .context("8 keys on 3 partitions: two share one")?
        .clone();
    let neighbours: Vec<&str> = keys
        .iter()
        .map(String::as_str)
        .filter(|k| *k != fail_key && partition_of[k] == partition_of[fail_key.as_str()])
        .collect();
    println!("keys on partitions: {partition_of:?}; failing key {fail_key}, sharing its partition with {neighbours:?}");
    let mut rest = Vec::with_capacity(KEYS * EVENTS_PER_KEY);
    for seq in 1..EVENTS_PER_KEY {
        for key in &keys {
            rest.push(Record {
                key: Some(key),
                ..event(key, seq)
            });
        }
    }
    kafka.produce("ko.in", &rest).await?;

    let config = format!(
        r#"
{brokers}
[[functions]]
name = "key-order"
module = "fail_key.wasm"
outputs = ["ko.out"]
timeout = "2s"
config = {{ fail_key = "{fail_key}", fail_attempts = "2", output_topic = "ko.out" }}
[functions.trigger]
broker = "kafka"
topic = "ko.in"
ordering = "key"
[functions.retry]
max_attempts = 5
initial_delay = "5ms"
multiplier = 1.0
max_delay = "5ms"
jitter = 0.0
[functions.scaling]
min = {KEYS}
max = {KEYS}
"#,
        brokers = brokers(&kafka.bootstrap(), false)
    );
    let started = SystemTime::now();
    let weir = InProcess::start(&config).await?;
    let mut reader = kafka.reader("ko.out")?;
    let deadline = Instant::now() + LOAD_WAIT;
    while reader.records.len() < KEYS * EVENTS_PER_KEY {
        ensure!(
            Instant::now() < deadline,
            "{} of {} outputs after {LOAD_WAIT:?}",
            reader.records.len(),
            KEYS * EVENTS_PER_KEY
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        reader.catch_up()?;
    }
    let runner = weir.function("key-order")?;
    kafka
        .wait_committed("ko.in", "weir-key-order", WAIT)
        .await?;
    weir.shutdown().await?;

    // Order: each key's outputs (one output partition per key, read in offset order) carry
    // sequences 0, 1, 2, ... with nothing missing or repeated.
    let mut per_key: BTreeMap<String, Vec<(u64, i64)>> = BTreeMap::new();
    for record in &reader.records {
        let event = record.event("ko.out");
        let key = event["data"]["key"]
            .as_str()
            .context("output has a key")?
            .to_owned();
        let seq = event["data"]["seq"].as_u64().context("output has a seq")?;
        assert_eq!(
            record.key.as_deref(),
            Some(key.as_bytes()),
            "outputs keep the input key"
        );
        per_key
            .entry(key)
            .or_default()
            .push((seq, record.timestamp_ms));
    }
    ensure!(per_key.len() == KEYS, "outputs for {} keys", per_key.len());
    for (key, outputs) in &per_key {
        let seqs: Vec<u64> = outputs.iter().map(|(s, _)| *s).collect();
        let expected: Vec<u64> = (0..EVENTS_PER_KEY as u64).collect();
        if seqs != expected {
            let first_bad = seqs.iter().zip(&expected).position(|(a, b)| a != b);
            bail!("key {key}: outputs out of order or incomplete ({} outputs; first deviation at index {first_bad:?})", seqs.len());
        }
    }

    // Not held up: the other keys finished while the failing key was still retrying.
    let start_ms = started.duration_since(SystemTime::UNIX_EPOCH)?.as_millis() as i64;
    let done_ms = |key: &str| per_key[key].last().map_or(0, |(_, t)| *t);
    let failing_done = done_ms(&fail_key);
    let others_done = keys
        .iter()
        .filter(|k| **k != fail_key)
        .map(|k| done_ms(k))
        .max()
        .unwrap_or(0);
    let failing_at_others_done = per_key[&fail_key]
        .iter()
        .filter(|(_, t)| *t <= others_done)
        .count();
    println!(
        "key ordering: the other {} keys finished after {} ms, the failing key after {} ms; \
         when the others were done it had {failing_at_others_done} of {EVENTS_PER_KEY} done",
        KEYS - 1,
        others_done - start_ms,
        failing_done - start_ms
    );
    assert!(
        others_done < failing_done,
        "the other keys finished last ({others_done} vs {failing_done})"
    );
    assert!(
        failing_at_others_done < EVENTS_PER_KEY * 9 / 10,
        "the failing key was nearly done when the others finished: they waited for it ({failing_at_others_done})"
    );
    for neighbour in &neighbours {
        assert!(
            done_ms(neighbour) < failing_done,
            "{neighbour} shares the partition and still finished first"
        );
    }
    assert_eq!(
        runner.counters.retried.load(Relaxed),
        2 * EVENTS_PER_KEY as u64,
        "two in-place retries per failing event"
    );
    assert_eq!(
        runner.counters.received.load(Relaxed),
        (KEYS * EVENTS_PER_KEY) as u64,
        "each record delivered once"
    );
    Ok(())
}

// -------------------------------------------------------------------------------------------
// 3. The commit watermark under out-of-order completion
// -------------------------------------------------------------------------------------------

/// Ordering `none` with variable service times: events finish out of order, and the committed
/// offset of each partition never passes its lowest unfinished offset (the outputs are the
/// completion record). At the end the committed offset is the high watermark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_offset_never_passes_an_unfinished_offset() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    const EVENTS: usize = 2_000;
    let kafka = Kafka::start().await?;
    kafka
        .create_topics(&["wm.in", "wm.out"], PARTITIONS)
        .await?;
    let ids: Vec<String> = (0..EVENTS).map(|i| format!("wm-{i:05}")).collect();
    let coordinates = kafka.publish_ids("wm.in", &ids).await?;
    let mut count: BTreeMap<i32, i64> = BTreeMap::new();
    for (partition, _) in coordinates.values() {
        *count.entry(*partition).or_insert(0) += 1;
    }
    let config = format!(
        r#"
{brokers}
[[functions]]
name = "watermark"
module = "fail_key.wasm"
outputs = ["wm.out"]
timeout = "2s"
config = {{ output_topic = "wm.out", max_sleep_ms = "25" }}
[functions.trigger]
broker = "kafka"
topic = "wm.in"
ordering = "none"
[functions.scaling]
min = 8
max = 8
"#,
        brokers = brokers(&kafka.bootstrap(), false)
    );
    let weir = InProcess::start(&config).await?;
    let mut reader = kafka.reader("wm.out")?;
    let deadline = Instant::now() + LOAD_WAIT;
    let mut samples = 0;
    let mut out_of_order_samples = 0;
    let mut partial_commits = 0;
    loop {
        // Committed first, outputs after: an output read later can only make an offset
        // "finished" that was unfinished at the sample, so a violation seen is a real one.
        let committed = kafka.committed("wm.in", "weir-watermark").await?;
        reader.catch_up()?;
        let finished: HashSet<(i32, i64)> = reader
            .records
            .iter()
            .filter_map(|r| r.causation().and_then(|id| coordinates.get(id)).copied())
            .collect();
        samples += 1;
        for (partition, total) in &count {
            let lowest_unfinished = (0..*total)
                .find(|o| !finished.contains(&(*partition, *o)))
                .unwrap_or(*total);
            let highest_finished = finished
                .iter()
                .filter(|(p, _)| p == partition)
                .map(|(_, o)| *o)
                .max();
            if highest_finished.is_some_and(|h| h > lowest_unfinished) {
                out_of_order_samples += 1;
            }
            if let Some(committed) = committed.get(partition).copied().flatten() {
                if committed > lowest_unfinished {
                    // The reader may simply not have caught up with outputs that were
                    // published before the commit (Tansu's watermarks lag on multi-record
                    // batches). Reading again is still sound: every output of an offset at or
                    // below the commit was confirmed before its offset was acked, so a
                    // violation that survives a later full read is real.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    reader.catch_up()?;
                    let finished_now: HashSet<(i32, i64)> = reader
                        .records
                        .iter()
                        .filter_map(|r| r.causation().and_then(|id| coordinates.get(id)).copied())
                        .collect();
                    let lowest_now = (0..*total)
                        .find(|o| !finished_now.contains(&(*partition, *o)))
                        .unwrap_or(*total);
                    assert!(
                        committed <= lowest_now,
                        "partition {partition}: committed {committed} passes the unfinished offset {lowest_now}"
                    );
                }
                if committed > 0 && committed < *total {
                    partial_commits += 1;
                }
            }
        }
        if finished.len() == EVENTS {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{} of {EVENTS} finished after {LOAD_WAIT:?}",
            finished.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    kafka
        .wait_committed("wm.in", "weir-watermark", WAIT)
        .await?;
    let committed = kafka.committed("wm.in", "weir-watermark").await?;
    let high = kafka.high_watermarks("wm.in")?;
    for (partition, h) in &high {
        assert_eq!(
            committed.get(partition).copied().flatten(),
            Some(*h),
            "partition {partition} committed to its end"
        );
        assert_eq!(count.get(partition).copied().unwrap_or(0), *h);
    }
    println!("watermark: {samples} samples, {out_of_order_samples} saw out-of-order completion, {partial_commits} partial commits");
    ensure!(
        out_of_order_samples > 0,
        "no out-of-order completion was observed: the test proved nothing"
    );
    ensure!(
        partial_commits > 0,
        "no commit was observed mid-run: the test proved nothing"
    );
    let outputs = kafka.read("wm.out")?;
    let (lost, duplicates) = lost_and_duplicates(&ids, &outputs);
    assert!(lost.is_empty(), "lost: {lost:?}");
    assert_eq!(duplicates, 0);
    weir.shutdown().await
}

// -------------------------------------------------------------------------------------------
// 4 and 5. kill -9 and SIGTERM under load
// -------------------------------------------------------------------------------------------

const LOAD_GROUP: &str = "load";

fn load_config(bootstrap: &str) -> anyhow::Result<String> {
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
broker = "kafka"
topic = "load.in"
group = "{LOAD_GROUP}"
[functions.retry]
max_attempts = 10
initial_delay = "50ms"
max_delay = "500ms"
[functions.scaling]
min = 1
max = 8
"#,
        brokers = brokers(bootstrap, true),
        module = component_path("echo.wasm")?
    ))
}

fn load_ids() -> Vec<String> {
    (0..LOAD_EVENTS).map(|i| format!("ev-{i:05}")).collect()
}

/// What the broker held right after the first process ended.
#[derive(Debug)]
struct AtStop {
    /// Output records.
    outputs: i64,
    /// Inputs with at least one output.
    finished: usize,
    /// Sum of the committed offsets.
    committed: i64,
}

/// `LOAD_EVENTS` events, a first `weir run` stopped (kill -9 or SIGTERM) once some but not all
/// are done, a second one that finishes the job. Returns the state at the stop and all outputs.
async fn load_with_stop(
    kafka: &Kafka,
    dir: &Path,
    graceful: bool,
) -> anyhow::Result<(AtStop, Vec<Stored>)> {
    kafka
        .create_topics(&["load.in", "load.out"], PARTITIONS)
        .await?;
    let ids = load_ids();
    let coordinates = kafka.publish_ids("load.in", &ids).await?;
    let config = write_config(dir, &load_config(&kafka.bootstrap())?)?;

    let mut first = WeirProcess::start(&config, &[]).await?;
    let started = Instant::now();
    let threshold = (LOAD_EVENTS / 10) as i64;
    kafka
        .wait_count("load.out", threshold, LOAD_WAIT)
        .await
        .with_context(|| first.log_text())?;
    let status = if graceful {
        first.terminate(Duration::from_secs(30)).await?
    } else {
        first.kill9().await?
    };
    let log = first.log_text();
    let committed = kafka.committed("load.in", LOAD_GROUP).await?;
    let outputs = kafka.read("load.out")?;
    let counts = outputs_per_input(&outputs);
    let at_stop = AtStop {
        outputs: outputs.len() as i64,
        finished: counts.len(),
        committed: committed.values().map(|c| c.unwrap_or(0)).sum(),
    };
    println!(
        "{} after {:?}: {at_stop:?}, committed {committed:?} (exit {status})",
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
        at_stop.finished < LOAD_EVENTS,
        "all {LOAD_EVENTS} events were done before the stop; the test proves nothing (make it bigger)"
    );
    // The committed offsets never pass an input without its output.
    for (id, (partition, offset)) in &coordinates {
        if committed
            .get(partition)
            .copied()
            .flatten()
            .is_some_and(|c| *offset < c)
        {
            assert!(
                counts.contains_key(id),
                "{id} at {partition}/{offset} is committed but has no output"
            );
        }
    }

    if !graceful {
        // Tansu 0.6 expires a silent member only when another member joins or syncs, not on a
        // timer: a member that joins before the dead one's session ran out gets nothing and is
        // never told to rejoin. So the replacement starts after the session timeout, as a
        // restarted pod would after its crash loop; real Kafka would rebalance either way.
        tokio::time::sleep(SESSION_TIMEOUT + Duration::from_secs(2)).await;
    }
    let second = WeirProcess::start(&config, &[]).await?;
    let deadline = Instant::now() + LOAD_WAIT;
    loop {
        let outputs = kafka.read("load.out")?;
        if outputs_per_input(&outputs).len() >= LOAD_EVENTS {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{} of {LOAD_EVENTS} inputs have an output after {LOAD_WAIT:?}; second log:\n{}",
            outputs_per_input(&outputs).len(),
            second.log_text()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    kafka
        .wait_committed("load.in", LOAD_GROUP, WAIT)
        .await
        .with_context(|| second.log_text())?;
    let outputs = kafka.read("load.out")?;
    let (lost, _) = lost_and_duplicates(&ids, &outputs);
    assert!(
        lost.is_empty(),
        "inputs without an output (first 10): {lost:?}"
    );
    assert_eq!(
        kafka.count("weir.dlq.echo")?,
        0,
        "nothing was dead-lettered"
    );
    Ok((at_stop, outputs))
}

/// Fault plan #1 on Kafka: kill -9 mid-stream, then restart. 0 lost; the duplicates are
/// exactly the inputs that had their output but were not yet committed (the uncommitted
/// window), each at most once more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_loses_nothing_and_duplicates_only_the_uncommitted_window(
) -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let kafka = Kafka::start().await?;
    let dir = tempfile::tempdir()?;
    let (at_stop, outputs) = load_with_stop(&kafka, dir.path(), false).await?;
    let (_, duplicates) = lost_and_duplicates(&load_ids(), &outputs);
    let window = at_stop.finished as i64 - at_stop.committed;
    println!("kill -9: {duplicates} duplicate outputs; uncommitted window at the kill: {window} finished inputs");
    assert!(window >= 0, "{at_stop:?}");
    assert!(
        duplicates as i64 <= window,
        "{duplicates} duplicates exceed the uncommitted window {window}"
    );
    assert!(
        outputs_per_input(&outputs).values().all(|n| *n <= 2),
        "no input ran more than twice"
    );
    Ok(())
}

/// Fault plan #3 on Kafka: SIGTERM under load. 0 lost and 0 duplicates: at the stop every
/// output belongs to a committed input, and nothing runs twice after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_nothing_and_duplicates_nothing() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let kafka = Kafka::start().await?;
    let dir = tempfile::tempdir()?;
    let (at_stop, outputs) = load_with_stop(&kafka, dir.path(), true).await?;
    assert_eq!(
        at_stop.outputs, at_stop.committed,
        "every output at the stop belongs to a committed input: {at_stop:?}"
    );
    let (_, duplicates) = lost_and_duplicates(&load_ids(), &outputs);
    assert_eq!(duplicates, 0, "no input ran twice");
    assert_eq!(outputs.len(), LOAD_EVENTS);
    Ok(())
}

/// Fault plan: the broker restarts mid-stream (killed, then started again on the same port and
/// the same SQLite storage, so topics, records and committed offsets survive like a real
/// broker's log). Weir rides out the outage, reconnects and finishes the stream: every event
/// published before and after the restart has its output, nothing lost; duplicates are allowed
/// (at-least-once: work done after the last commit before the kill runs again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_mid_stream_weir_reconnects_and_continues() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let mut kafka = Kafka::start_persistent().await?;
    let config = format!(
        r#"
{brokers}
[[functions]]
name = "restart-echo"
module = "echo.wasm"
outputs = ["br.out"]
config = {{ output_topic = "br.out" }}
[functions.trigger]
broker = "kafka"
topic = "br.in"
[functions.retry]
max_attempts = 20
initial_delay = "100ms"
max_delay = "1s"
[functions.scaling]
min = 1
max = 4
"#,
        brokers = brokers(&kafka.bootstrap(), true)
    );
    let weir = InProcess::start(&config).await?;
    let before: Vec<String> = (0..300).map(|i| format!("before-{i:04}")).collect();
    kafka.publish_ids("br.in", &before).await?;
    let seen = kafka.wait_count("br.out", 100, WAIT).await?;
    ensure!(
        seen < i64::try_from(before.len())?,
        "the restart must come mid-stream, but all {seen} outputs were already there"
    );

    kafka.broker.restart().await?;
    // A fresh test producer: the old one's idempotence state may not match the restarted
    // broker's, and the test is not about its recovery.
    kafka.producer = test_producer(&kafka.bootstrap())?;
    let after: Vec<String> = (0..300).map(|i| format!("after-{i:04}")).collect();
    kafka.publish_ids("br.in", &after).await?;

    let all: Vec<String> = before.iter().chain(&after).cloned().collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let outputs = kafka.read("br.out")?;
        let (lost, _) = lost_and_duplicates(&all, &outputs);
        if lost.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            let runner = weir.function("restart-echo")?;
            bail!(
                "after the broker restart, {} outputs for {} inputs; missing e.g. {lost:?}; \
                 received {}, succeeded {}, failures {:?}; broker log:\n{}",
                outputs.len(),
                all.len(),
                runner.counters.received.load(Relaxed),
                runner.counters.succeeded.load(Relaxed),
                runner.recent_failures(),
                kafka.broker.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    kafka
        .wait_committed("br.in", "weir-restart-echo", WAIT)
        .await?;
    let outputs = kafka.read("br.out")?;
    let (lost, duplicates) = lost_and_duplicates(&all, &outputs);
    ensure!(lost.is_empty(), "lost after the commit: {lost:?}");
    println!(
        "broker restart: {} outputs for {} inputs ({duplicates} duplicates), nothing lost",
        outputs.len(),
        all.len()
    );
    weir.shutdown().await
}

// -------------------------------------------------------------------------------------------
// 6. DLQ unwritable
// -------------------------------------------------------------------------------------------

/// The DLQ topic does not exist and nobody may create it (`create_topics = false`; Tansu does
/// not auto-create topics): a poison event cannot be dead-lettered. Its partition pauses
/// (gauge and admin API say so), the committed offset stays below it, nothing after it runs;
/// once the topic exists the record is written and everything proceeds, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_unwritable_holds_the_commit_and_pauses_until_it_recovers() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let kafka = Kafka::start().await?;
    kafka.create_topics(&["dq.in", "dq.out"], 1).await?;
    let config = format!(
        r#"
{brokers}
[[functions]]
name = "dlq-guard"
module = "fail_key.wasm"
outputs = ["dq.out"]
config = {{ fail_key = "poison", fail_attempts = "1000", output_topic = "dq.out" }}
[functions.trigger]
broker = "kafka"
topic = "dq.in"
[functions.retry]
max_attempts = 2
initial_delay = "20ms"
"#,
        brokers = brokers(&kafka.bootstrap(), false)
    );
    let weir = InProcess::start(&config).await?;
    let keys: Vec<String> = (0..10)
        .map(|i| {
            if i == 5 {
                "poison".to_owned()
            } else {
                format!("ok-{i}")
            }
        })
        .collect();
    let records: Vec<Record<'_>> = keys
        .iter()
        .enumerate()
        .map(|(i, key)| Record {
            key: Some(key),
            headers: ce_headers(&format!("dq-{i}"), "com.example.x", &[]),
            payload: Some(json!({"i": i}).to_string().into_bytes()),
        })
        .collect();
    let produced = kafka.produce("dq.in", &records).await?;
    let poison_offset = produced[5].offset;

    // The events before the poison are done; the poison is stuck on the DLQ.
    kafka.wait_count("dq.out", 5, WAIT).await?;
    let deadline = Instant::now() + WAIT;
    let view = loop {
        let all = weir.get_json("/v1/functions").await?;
        let view = all["functions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|f| f["name"] == "dlq-guard")
            .cloned();
        if let Some(view) = view.filter(|v| v["dead_letter_paused"] == true) {
            break view;
        }
        ensure!(
            Instant::now() < deadline,
            "dead_letter_paused never became true: {all}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let metrics = weir
        .client()
        .get(format!("{}/metrics", weir.base_url()))
        .send()
        .await?
        .text()
        .await?;
    assert_eq!(
        metric_value(&metrics, r#"weir_lane_paused{function="dlq-guard"}"#),
        Some(1.0),
        "{metrics}"
    );
    // Held for a while: several commit rounds pass, and the commit stays at the poison.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let committed = kafka.committed("dq.in", "weir-dlq-guard").await?;
    assert_eq!(
        committed.get(&0).copied().flatten(),
        Some(poison_offset),
        "committed up to the poison, not past it"
    );
    assert_eq!(
        kafka.count("dq.out")?,
        5,
        "nothing after the poison ran (partition ordering)"
    );
    println!(
        "DLQ unavailable: paused, committed {committed:?}, view {}",
        view["counters"]
    );

    // Recovery: the topic appears; the record is written, the lane resumes, the rest runs.
    kafka.create_topics(&["weir.dlq.dlq-guard"], 1).await?;
    let record = kafka
        .wait_event("weir.dlq.dlq-guard", WAIT, |e| e["id"] == "dq-5")
        .await?;
    assert_eq!(
        ext(&record, "weirdlqreason"),
        "retries-exhausted",
        "{record}"
    );
    assert_eq!(
        ext(&record, "weirdlqorigin"),
        format!("kafka://dq.in/0/{poison_offset}")
    );
    kafka.wait_count("dq.out", 9, WAIT).await?;
    kafka
        .wait_committed("dq.in", "weir-dlq-guard", WAIT)
        .await?;
    let outputs = kafka.read("dq.out")?;
    let expected: Vec<String> = (0..10)
        .filter(|i| *i != 5)
        .map(|i| format!("dq-{i}"))
        .collect();
    let (lost, duplicates) = lost_and_duplicates(&expected, &outputs);
    assert!(
        lost.is_empty() && duplicates == 0,
        "lost {lost:?}, {duplicates} duplicates"
    );
    assert_eq!(
        kafka.events("weir.dlq.dlq-guard")?.len(),
        1,
        "one DLQ record"
    );
    let view = weir.function("dlq-guard")?;
    assert!(!view.counters.dlq_paused.load(Relaxed), "resumed");
    let metrics = weir
        .client()
        .get(format!("{}/metrics", weir.base_url()))
        .send()
        .await?
        .text()
        .await?;
    assert_eq!(
        metric_value(&metrics, r#"weir_lane_paused{function="dlq-guard"}"#),
        Some(0.0)
    );
    weir.shutdown().await
}

// -------------------------------------------------------------------------------------------
// 7. Two dispatchers in one consumer group
// -------------------------------------------------------------------------------------------

/// Two `weir run` processes share one consumer group: both get partitions; one leaves with
/// SIGTERM mid-stream; the other takes its partitions over and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dispatchers_share_partitions_and_a_leaving_one_loses_nothing() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let kafka = Kafka::start().await?;
    kafka
        .create_topics(&["load.in", "load.out"], PARTITIONS)
        .await?;
    let ids = load_ids();
    kafka.publish_ids("load.in", &ids).await?;
    let dir = tempfile::tempdir()?;
    let config = write_config(dir.path(), &load_config(&kafka.bootstrap())?)?;

    let mut first = WeirProcess::start(&config, &[]).await?;
    kafka
        .wait_count("load.out", 300, LOAD_WAIT)
        .await
        .with_context(|| first.log_text())?;
    let second = WeirProcess::start(&config, &[]).await?;
    // Both members work: the second one receives events while the first still does.
    let deadline = Instant::now() + WAIT;
    let (first_before, second_before) = loop {
        let a = first.function_view("echo").await?["counters"]["received"]
            .as_u64()
            .unwrap_or(0);
        let b = second.function_view("echo").await?["counters"]["received"]
            .as_u64()
            .unwrap_or(0);
        if b > 0 {
            break (a, b);
        }
        ensure!(
            Instant::now() < deadline,
            "the second member got no partition within {WAIT:?}:\n{}",
            second.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let first_after = first.function_view("echo").await?["counters"]["received"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        first_after > first_before,
        "the first member kept working after the rebalance"
    );
    let done_at_leave = outputs_per_input(&kafka.read("load.out")?).len();
    ensure!(
        done_at_leave < LOAD_EVENTS,
        "everything was done before the first member left; make the test bigger"
    );
    let status = first.terminate(Duration::from_secs(30)).await?;
    assert!(status.success(), "{status}: {}", first.log_text());

    let deadline = Instant::now() + LOAD_WAIT;
    loop {
        let done = outputs_per_input(&kafka.read("load.out")?).len();
        if done >= LOAD_EVENTS {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{done} of {LOAD_EVENTS} after {LOAD_WAIT:?}:\n{}",
            second.log_text()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    kafka.wait_committed("load.in", LOAD_GROUP, WAIT).await?;
    let outputs = kafka.read("load.out")?;
    let (lost, duplicates) = lost_and_duplicates(&ids, &outputs);
    let second_received = second.function_view("echo").await?["counters"]["received"]
        .as_u64()
        .unwrap_or(0);
    println!(
        "two members: second got its first events when the first had {first_before} ({second_before}); \
         {done_at_leave} done when the first left; second received {second_received} in all; {duplicates} duplicates"
    );
    assert!(lost.is_empty(), "lost: {lost:?}");
    assert_eq!(
        duplicates, 0,
        "graceful leave and cooperative rebalance: nothing runs twice"
    );
    Ok(())
}

// -------------------------------------------------------------------------------------------
// weir dlq redrive
// -------------------------------------------------------------------------------------------

/// `kredo-work` (the module given) and `kredo-audit` (echo), both on `kredo.in`.
fn redrive_config(bootstrap: &str, work: &str) -> anyhow::Result<String> {
    Ok(format!(
        r#"
{brokers}
[defaults.trigger]
broker = "kafka"

[[functions]]
name = "kredo-work"
module = "{work}"
outputs = ["kredo.work"]
config = {{ output_topic = "kredo.work" }}
[functions.trigger]
topic = "kredo.in"
[functions.retry]
max_attempts = 1

[[functions]]
name = "kredo-audit"
module = "{echo}"
outputs = ["kredo.audit"]
config = {{ output_topic = "kredo.audit" }}
[functions.trigger]
topic = "kredo.in"
"#,
        brokers = brokers(bootstrap, true),
        work = component_path(work)?,
        echo = component_path("echo.wasm")?,
    ))
}

/// `weir dlq redrive` on Kafka: what was sent back is remembered as the
/// `weir-redrive-<function>` group's offsets, so a second redrive sends only what came after
/// (the record of an event that failed again after the first, which says where it was
/// redriven from), and a third nothing. The other function on the topic runs none of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_dead_letters_are_redriven_once_each() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let kafka = Kafka::start().await?;
    let dir = tempfile::tempdir()?;
    let (broken_dir, fixed_dir) = (dir.path().join("broken"), dir.path().join("fixed"));
    std::fs::create_dir_all(&broken_dir)?;
    std::fs::create_dir_all(&fixed_dir)?;
    let broken = redrive_config(&kafka.bootstrap(), "reject_all.wasm")?;
    let broken_path = write_config(&broken_dir, &broken)?;
    let fixed = redrive_config(&kafka.bootstrap(), "echo.wasm")?;
    let fixed_path = write_config(&fixed_dir, &fixed)?;
    let redrive = |path: &Path, extra: &[&str]| {
        let mut args: Vec<String> = ["dlq", "redrive", "kredo-work", "-c"]
            .iter()
            .map(|a| (*a).to_owned())
            .collect();
        args.push(path.to_string_lossy().into_owned());
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        async move {
            let out = run_weir(&args, WAIT).await?;
            ensure!(out.code == Some(0), "{out:?}");
            let summary: Value = out
                .stdout
                .lines()
                .last()
                .map(serde_json::from_str)
                .transpose()?
                .context("a summary line")?;
            Ok::<_, anyhow::Error>((out, summary["summary"].clone()))
        }
    };

    let weir = InProcess::start(&broken).await?;
    for id in ["k-1", "k-2"] {
        kafka
            .publish_event("kredo.in", Some(id), id, "com.example.x", "{}", &[])
            .await?;
    }
    kafka.wait_count("weir.dlq.kredo-work", 2, WAIT).await?;
    kafka.wait_count("kredo.audit", 2, WAIT).await?;

    // Still broken: one goes back and fails again.
    let (out, summary) = redrive(&broken_path, &["--limit", "1"]).await?;
    assert_eq!(summary["sent"], 1, "{out:?}");
    let line: Value = serde_json::from_str(out.stdout.lines().next().unwrap_or_default())?;
    let (first_id, first_origin) = (line["id"].clone(), line["origin"].clone());
    let again = kafka
        .wait_event("weir.dlq.kredo-work", WAIT, |r| {
            r["weirdlqredriven"] == first_origin
        })
        .await?;
    assert_eq!(again["id"], first_id, "{again}");
    assert_eq!(ext(&again, "weirdlqtopic"), "kredo.in");
    kafka
        .wait_committed("kredo.in", "weir-kredo-audit", WAIT)
        .await?;
    weir.shutdown().await?;

    // Fixed: the other original and the new record go back; the one sent before does not.
    let weir = InProcess::start(&fixed).await?;
    let (out, summary) = redrive(&fixed_path, &[]).await?;
    assert_eq!(summary["read"], 2, "{out:?}");
    assert_eq!(summary["sent"], 2, "{out:?}");
    kafka.wait_count("kredo.work", 2, WAIT).await?;
    kafka
        .wait_committed("kredo.in", "weir-kredo-work", WAIT)
        .await?;
    kafka
        .wait_committed("kredo.in", "weir-kredo-audit", WAIT)
        .await?;
    let mut causes: Vec<String> = kafka
        .read("kredo.work")?
        .iter()
        .map(|r| r.causation().unwrap_or_default().to_owned())
        .collect();
    causes.sort_unstable();
    assert_eq!(causes, ["k-1", "k-2"]);
    assert_eq!(
        kafka.count("kredo.audit")?,
        2,
        "the audit ran nothing again"
    );
    let (_, metrics) = weir.get("/metrics").await?;
    assert_eq!(
        metric_value(
            &metrics,
            r#"weir_redrives_passed_over_total{function="kredo-audit"}"#
        ),
        Some(3.0),
        "{metrics}"
    );

    let (out, summary) = redrive(&fixed_path, &[]).await?;
    assert_eq!(summary["read"], 0, "{out:?}");
    let committed = kafka
        .committed("weir.dlq.kredo-work", "weir-redrive-kredo-work")
        .await?;
    let high = kafka.high_watermarks("weir.dlq.kredo-work")?;
    for (partition, end) in &high {
        let at = committed.get(partition).copied().flatten();
        assert!(
            *end == 0 || at == Some(*end),
            "partition {partition}: committed {at:?}, high {end}"
        );
    }
    weir.shutdown().await
}
