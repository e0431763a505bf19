//! Kafka throughput: Weir against a plain rdkafka consumer and against the broker's own ceiling,
//! on one Tansu started for the run.
//!
//! Three measurements, one table:
//! 1. **weir**: N events pre-produced → Kafka subscription → wasm `noop` → offset stored →
//!    committed. Weir runs in process (the real runtime, `ordering = "partition"`, the default);
//!    the clock runs until the group's committed offsets reach the end of every partition.
//! 2. **plain consumer**: the same N events read by a bare rdkafka consumer group that stores
//!    each offset and commits every 200 ms (Weir's test commit interval), no wasm, no decoding.
//! 3. **broker ceiling**: N produced, then N consumed without a group and without processing.
//!
//! (1) and (2) run in alternating rounds (plain, then Weir, each on topics and groups of its
//! own; 5 rounds unless `WEIR_BENCH_ROUNDS` says otherwise) and the table gives the median of
//! each, with every round listed after it: the plain consumer alone varies from ~80k to
//! ~137k/s between runs on the same Tansu, so one run each says little about the ratio.
//!
//! Rates for (1) and (2) are taken between 5 % and 100 % committed, so the group join (which
//! has nothing to do with throughput) is not counted. The end offsets come from the producer's
//! delivery reports: Tansu 0.6's ListOffsets(latest) under-reports for multi-record batches.
//!
//! `cargo bench -p weir-tests --bench kafka` runs 100,000 events (`WEIR_BENCH_KAFKA_EVENTS`
//! overrides); plain `cargo test` runs a 2,000-event smoke version that checks everything got
//! committed and prints the table, without judging the numbers. It does not measure latency.

// A benchmark binary is test code: a failed setup is a failed run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use weir_broker_bridge::kafka::KafkaTransport;
use weir_tests::bench::env_number;
use weir_tests::kafka_broker::KafkaBroker;
use weir_tests::weir::InProcess;

/// The weir binary's allocator, so Weir runs here as it does in production; the native
/// baselines in this process use it too.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PARTITIONS: i32 = 3;
const FULL_EVENTS: u32 = 100_000;
const SMOKE_EVENTS: u32 = 2_000;
/// Bound on any one measurement.
const RUN_LIMIT: Duration = Duration::from_secs(300);
const GOAL_RATIO: f64 = 0.8;
const GOAL_RATE: f64 = 150_000.0;

fn main() -> anyhow::Result<()> {
    let bench = std::env::args().any(|a| a == "--bench");
    let events = env_number(
        "WEIR_BENCH_KAFKA_EVENTS",
        if bench { FULL_EVENTS } else { SMOKE_EVENTS },
    )? as usize;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(events, bench))
}

async fn run(events: usize, bench: bool) -> anyhow::Result<()> {
    let broker = KafkaBroker::start().await?;
    let transport = KafkaTransport::connect(&broker.config()).await?;
    // Alternating plain/Weir rounds.
    let rounds = env_number("WEIR_BENCH_ROUNDS", if bench { 5 } else { 1 })?;
    transport.ensure_topic("bench.raw", PARTITIONS, 1).await?;
    let producer = producer(&broker.bootstrap())?;
    println!("kafka bench: {events} events of ~120 bytes, {PARTITIONS} partitions, one Tansu 0.6 (memory storage)");

    // (3) The broker's ceiling: produce, then consume with no processing.
    let started = Instant::now();
    let raw_end = produce(&producer, "bench.raw", events).await?;
    let produce_rate = rate(events, started.elapsed());
    let consume_rate = consume_only(&broker.bootstrap(), "bench.raw", &raw_end)?;

    let mut measured = Vec::new();
    for round in 1..=rounds {
        // (2) A plain consumer group: store + commit, no wasm.
        let plain_topic = format!("bench.plain.{round}");
        let plain_end = filled_topic(&transport, &producer, &plain_topic, events).await?;
        let plain_rate = plain_consumer(
            &broker.bootstrap(),
            &transport,
            &plain_topic,
            round,
            &plain_end,
        )
        .await
        .with_context(|| format!("plain consumer, round {round}"))?;

        // (1) Weir: Kafka → noop → commit.
        let weir_topic = format!("bench.weir.{round}");
        let weir_end = filled_topic(&transport, &producer, &weir_topic, events).await?;
        let weir_rate = weir(
            &broker.bootstrap(),
            &transport,
            &weir_topic,
            round,
            &weir_end,
        )
        .await
        .with_context(|| format!("Weir, round {round}"))?;
        measured.push((weir_rate, plain_rate));
    }
    let weir_rate = median(measured.iter().map(|(weir, _)| *weir));
    let plain_rate = median(measured.iter().map(|(_, plain)| *plain));

    println!();
    println!("| measurement                         | events/s | vs plain consumer | vs broker consume |");
    println!("|-------------------------------------|---------:|------------------:|------------------:|");
    println!(
        "| weir: kafka -> wasm noop -> commit  | {weir_rate:>8.0} | {:>17.2} | {:>17.2} |",
        weir_rate / plain_rate,
        weir_rate / consume_rate
    );
    println!(
        "| plain rdkafka: store + commit       | {plain_rate:>8.0} | {:>17.2} | {:>17.2} |",
        1.0,
        plain_rate / consume_rate
    );
    println!("| broker ceiling: consume only        | {consume_rate:>8.0} |                   | {:>17.2} |", 1.0);
    println!("| broker ceiling: produce (acks=all)  | {produce_rate:>8.0} |                   |                   |");
    let every: Vec<String> = measured
        .iter()
        .map(|(weir, plain)| format!("{weir:.0} / {plain:.0} = {:.2}x", weir / plain))
        .collect();
    println!();
    println!(
        "median of {rounds} alternating rounds; every round (weir / plain): {}",
        every.join("; ")
    );
    let ratio = weir_rate / plain_rate;
    println!(
        "goal: weir >= {GOAL_RATIO}x the plain consumer: {} ({ratio:.2}x)",
        if ratio >= GOAL_RATIO {
            "met"
        } else {
            "NOT met"
        }
    );
    if consume_rate >= GOAL_RATE {
        println!(
            "goal: weir >= {GOAL_RATE:.0}/s (the broker allows it): {} ({weir_rate:.0}/s)",
            if weir_rate >= GOAL_RATE {
                "met"
            } else {
                "NOT met"
            }
        );
    } else {
        println!("goal: {GOAL_RATE:.0}/s is out of reach here: the broker itself consumes only {consume_rate:.0}/s");
    }
    if !bench {
        println!("(smoke run under `cargo test`: debug build, {events} events; numbers are not meaningful)");
    }
    Ok(())
}

/// The median (the upper one of an even count); 0 for none.
fn median(rates: impl Iterator<Item = f64>) -> f64 {
    let mut rates: Vec<f64> = rates.collect();
    rates.sort_by(f64::total_cmp);
    rates.get(rates.len() / 2).copied().unwrap_or(0.0)
}

fn rate(events: usize, elapsed: Duration) -> f64 {
    events as f64 / elapsed.as_secs_f64().max(1e-9)
}

fn producer(bootstrap: &str) -> anyhow::Result<FutureProducer> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "60000")
        .create()
        .context("creating the bench producer")
}

/// A round's own topic, created and filled with `events`; returns its end offsets.
async fn filled_topic(
    transport: &KafkaTransport,
    producer: &FutureProducer,
    topic: &str,
    events: usize,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    transport.ensure_topic(topic, PARTITIONS, 1).await?;
    produce(producer, topic, events).await
}

/// Produces `events` binary-mode CloudEvents round-robin over the partitions; returns the end
/// offset (next offset to be written) of every partition, from the delivery reports.
async fn produce(
    producer: &FutureProducer,
    topic: &str,
    events: usize,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let mut reports = Vec::with_capacity(events);
    for i in 0..events {
        let id = format!("bench-{i:08}");
        let payload = format!("{{\"id\":\"{id}\",\"amount\":{i}}}");
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "ce_specversion",
                value: Some("1.0"),
            })
            .insert(Header {
                key: "ce_id",
                value: Some(id.as_str()),
            })
            .insert(Header {
                key: "ce_source",
                value: Some("bench"),
            })
            .insert(Header {
                key: "ce_type",
                value: Some("com.example.bench"),
            })
            .insert(Header {
                key: "content-type",
                value: Some("application/json"),
            });
        let partition = i32::try_from(i % PARTITIONS as usize)?;
        let mut record: FutureRecord<'_, str, str> = FutureRecord::to(topic)
            .partition(partition)
            .key(id.as_str())
            .payload(payload.as_str())
            .headers(headers);
        let deadline = Instant::now() + RUN_LIMIT;
        loop {
            match producer.send_result(record) {
                Ok(report) => {
                    reports.push(report);
                    break;
                }
                Err((_, back)) => {
                    ensure!(Instant::now() < deadline, "the producer queue stayed full");
                    record = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }
    let mut end = BTreeMap::new();
    for report in reports {
        let delivery = report
            .await?
            .map_err(|(e, _)| anyhow::anyhow!("producing to {topic}: {e}"))?;
        let next = end.entry(delivery.partition).or_insert(0);
        *next = (*next).max(delivery.offset + 1);
    }
    Ok(end)
}

/// Reads every record of `topic` without a group and without processing; events/s.
fn consume_only(bootstrap: &str, topic: &str, end: &BTreeMap<i32, i64>) -> anyhow::Result<f64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "bench-raw")
        .set("enable.auto.commit", "false")
        .create()?;
    let mut list = TopicPartitionList::new();
    for partition in end.keys() {
        list.add_partition_offset(topic, *partition, Offset::Beginning)?;
    }
    consumer.assign(&list)?;
    let total: i64 = end.values().sum();
    let mut seen = 0_i64;
    let started = Instant::now();
    // The clock starts at the first record, so connecting and the first fetch are not counted
    // (as the 5 % mark does for the other two).
    let mut first: Option<Instant> = None;
    while seen < total {
        ensure!(
            started.elapsed() < RUN_LIMIT,
            "consumed {seen} of {total} within {RUN_LIMIT:?}"
        );
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let message = message?;
            std::hint::black_box(message.payload());
            first.get_or_insert_with(Instant::now);
            seen += 1;
        }
    }
    let from = first.unwrap_or(started);
    Ok(rate(usize::try_from(total - 1)?.max(1), from.elapsed()))
}

/// Waits until `group`'s committed offsets reach `end`; the rate between 5 % and 100 %.
async fn committed_rate(
    transport: &KafkaTransport,
    topic: &str,
    group: &str,
    end: &BTreeMap<i32, i64>,
) -> anyhow::Result<f64> {
    let total: i64 = end.values().sum();
    let low_mark = total / 20;
    let started = Instant::now();
    let mut from: Option<(Instant, i64)> = None;
    loop {
        ensure!(
            started.elapsed() < RUN_LIMIT,
            "{group} did not commit {topic} to its end within {RUN_LIMIT:?}"
        );
        let committed: i64 = transport
            .committed_offsets(topic, group)
            .await?
            .values()
            .map(|c| c.unwrap_or(0))
            .sum();
        let now = Instant::now();
        if from.is_none() && committed >= low_mark.max(1) {
            from = Some((now, committed));
        }
        if committed >= total {
            let (from_time, from_count) = from.unwrap_or((started, 0));
            let counted = usize::try_from(total - from_count)?;
            // All at once (a tiny run): fall back to the whole run.
            if counted == 0 || now == from_time {
                return Ok(rate(usize::try_from(total)?, started.elapsed()));
            }
            return Ok(rate(counted, now - from_time));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A bare rdkafka consumer group storing every offset and committing every 200 ms.
async fn plain_consumer(
    bootstrap: &str,
    transport: &KafkaTransport,
    topic: &str,
    round: u32,
    end: &BTreeMap<i32, i64>,
) -> anyhow::Result<f64> {
    let group = format!("bench-plain-{round}");
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", &group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "200")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", "10000")
        .create()?;
    consumer.subscribe(&[topic])?;
    let total: i64 = end.values().sum();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let worker_stop = stop.clone();
    let worker = std::thread::spawn(move || -> anyhow::Result<()> {
        let mut seen = 0_i64;
        while !worker_stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Some(message) = consumer.poll(Duration::from_millis(50)) {
                let message = message?;
                std::hint::black_box(message.payload());
                consumer.store_offset_from_message(&message)?;
                seen += 1;
                if seen == total {
                    consumer.commit_consumer_state(CommitMode::Sync)?;
                }
            }
        }
        Ok(())
    });
    let measured = committed_rate(transport, topic, &group, end).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    worker
        .join()
        .map_err(|_| anyhow::anyhow!("the plain consumer panicked"))??;
    measured
}

/// Weir in process: the `noop` component on `topic`, as function `bench-noop-<round>` (so
/// group `weir-bench-noop-<round>`).
async fn weir(
    bootstrap: &str,
    transport: &KafkaTransport,
    topic: &str,
    round: u32,
    end: &BTreeMap<i32, i64>,
) -> anyhow::Result<f64> {
    let config = format!(
        r#"
[brokers.kafka]
bootstrap = "{bootstrap}"
commit_interval = "200ms"
session_timeout = "10s"

[[functions]]
name = "bench-noop-{round}"
module = "noop.wasm"
timeout = "5s"
[functions.trigger]
broker = "kafka"
topic = "{topic}"
ordering = "partition"
[functions.scaling]
min = {PARTITIONS}
max = 8
max_invocations = 1000000
"#
    );
    let weir = InProcess::start(&config).await?;
    let group = format!("weir-bench-noop-{round}");
    let measured = committed_rate(transport, topic, &group, end).await;
    weir.shutdown().await?;
    measured
}
