//! Lag-driven scaling end to end: bursts on the memory bus, JetStream and Kafka, the
//! concurrency limit, scale to zero, fair sharing between functions, and no event lost or
//! duplicated while instances come and go.
//!
//! The function under test is `probe`, which reports the wall-clock interval of every
//! invocation: the maximum number of overlapping intervals is the function's own account of
//! its concurrency, independent of the pool's counters. Its outputs go to the memory bus (on
//! every trigger broker), where the test reads them through a consumer group of its own, so
//! none is missed by the topic's bounded history.
//!
//! Pool state is sampled from the running [`InProcess`] runtime every 20 ms. Tests run one at a
//! time ([`SERIAL`]): they measure timing on a 2-core machine. Every wait is bounded.
//! Needs `make functions` first.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use bytes::Bytes;
use futures::StreamExt as _;
use serde_json::Value;
use weir_broker_bridge::memory::{MemoryBus, StartFrom, SubscribeOptions};
use weir_broker_bridge::{BrokerKind, Ordering, OutboundMessage, Publisher, Subscription as _};
use weir_dispatcher::pool::PoolStats;
use weir_dispatcher::runner::header_style;
use weir_dispatcher::telemetry;
use weir_schemas::Event;
use weir_tests::kafka_broker::KafkaBroker;
use weir_tests::nats_server::NatsServer;
use weir_tests::weir::InProcess;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const BURST: usize = 20_000;
const MIN: usize = 1;
const MAX: usize = 8;
/// DESIGN.md's goal: from a burst to `max` instances within a second.
const REACTION_GOAL: Duration = Duration::from_secs(1);
const WINDOW: Duration = Duration::from_secs(2);
/// Bound for draining a 20,000-event burst on a shared 2-core machine (debug build).
const DRAIN_WAIT: Duration = Duration::from_secs(240);
const SAMPLE_EVERY: Duration = Duration::from_millis(20);

// -------------------------------------------------------------------------------------------
// Configuration
// -------------------------------------------------------------------------------------------

/// One `probe` function; `trigger` is the body of its `[functions.trigger]`.
fn probe_function(name: &str, trigger: &str, out: &str, sleep_ms: u64, scaling: &str) -> String {
    format!(
        r#"
[[functions]]
name = "{name}"
module = "probe.wasm"
output_broker = "memory"
outputs = ["{out}"]
config = {{ sleep_ms = "{sleep_ms}", output_topic = "{out}" }}
[functions.trigger]
{trigger}
ordering = "none"
[functions.scaling]
{scaling}
"#
    )
}

fn burst_scaling() -> String {
    format!(
        "min = {MIN}\nmax = {MAX}\ntarget_lag = 10\nscale_down_window = \"{}ms\"\nidle_timeout = \"60s\"",
        WINDOW.as_millis()
    )
}

// -------------------------------------------------------------------------------------------
// Reading probe outputs
// -------------------------------------------------------------------------------------------

/// One invocation as the probe reported it.
#[derive(Debug, Clone)]
struct Run {
    input: String,
    start_ns: u64,
    end_ns: u64,
    /// When the test received the output.
    seen: Instant,
}

/// Everything the probe emitted on one memory topic, read by the test's own group.
/// The reading task ends with the test's tokio runtime.
#[derive(Clone)]
struct Outputs {
    runs: Arc<Mutex<Vec<Run>>>,
}

impl Outputs {
    /// Start reading `topic` (from its beginning) before anything is published to it.
    fn read(bus: &MemoryBus, topic: &str) -> anyhow::Result<Outputs> {
        let options = SubscribeOptions {
            ordering: Ordering::None,
            max_in_flight: 1024,
            start: StartFrom::Beginning,
        };
        let mut subscription = bus
            .subscribe(topic, "scaling-test-reader", options)
            .context("subscribing to outputs")?;
        let runs = Arc::new(Mutex::new(Vec::new()));
        let sink = runs.clone();
        tokio::spawn(async move {
            while let Some(delivery) = subscription.next().await {
                let seen = Instant::now();
                let record: Value = delivery
                    .message
                    .payload
                    .as_deref()
                    .and_then(|p| serde_json::from_slice(p).ok())
                    .unwrap_or(Value::Null);
                let run = Run {
                    input: record["input"].as_str().unwrap_or_default().to_owned(),
                    start_ns: record["start_ns"].as_u64().unwrap_or(0),
                    end_ns: record["end_ns"].as_u64().unwrap_or(0),
                    seen,
                };
                lock(&sink).push(run);
                let _ = delivery.ack().await;
            }
        });
        Ok(Outputs { runs })
    }

    fn len(&self) -> usize {
        lock(&self.runs).len()
    }

    fn snapshot(&self) -> Vec<Run> {
        lock(&self.runs).clone()
    }

    async fn wait_for(&self, n: usize, timeout: Duration) -> anyhow::Result<Vec<Run>> {
        let deadline = Instant::now() + timeout;
        while self.len() < n {
            if Instant::now() >= deadline {
                bail!("timed out after {timeout:?}: {} of {n} outputs", self.len());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(self.snapshot())
    }

    /// The run of input `id`, waiting for it.
    async fn wait_for_input(&self, id: &str, timeout: Duration) -> anyhow::Result<Run> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(run) = lock(&self.runs).iter().find(|r| r.input == id) {
                return Ok(run.clone());
            }
            if Instant::now() >= deadline {
                bail!("timed out after {timeout:?} waiting for the output of {id}");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The most invocations running at one time, from their intervals.
fn max_overlap(runs: &[Run]) -> usize {
    let mut edges: Vec<(u64, i32)> = runs
        .iter()
        .flat_map(|r| [(r.start_ns, 1), (r.end_ns, -1)])
        .collect();
    // An end and a start at the same nanosecond do not overlap.
    edges.sort_unstable();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, step) in edges {
        now += step;
        most = most.max(now);
    }
    usize::try_from(most).unwrap_or(0)
}

/// Every input id of `0..n` (with `prefix`) exactly once.
fn assert_exactly_once(runs: &[Run], prefix: &str, n: usize) -> anyhow::Result<()> {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for run in runs {
        *counts.entry(run.input.as_str()).or_default() += 1;
    }
    let duplicated: Vec<_> = counts.iter().filter(|(_, &c)| c > 1).take(5).collect();
    ensure!(
        duplicated.is_empty(),
        "inputs processed more than once: {duplicated:?}"
    );
    let missing: Vec<String> = (0..n)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|id| !counts.contains_key(id.as_str()))
        .take(5)
        .collect();
    ensure!(
        missing.is_empty(),
        "inputs never processed (first few): {missing:?}"
    );
    ensure!(
        counts.len() == n,
        "{} distinct inputs processed, expected {n}",
        counts.len()
    );
    ensure!(
        runs.iter()
            .all(|r| r.start_ns > 0 && r.end_ns >= r.start_ns),
        "a probe interval is impossible"
    );
    Ok(())
}

// -------------------------------------------------------------------------------------------
// Publishing and sampling
// -------------------------------------------------------------------------------------------

fn event_message(topic: &str, id: &str, broker: BrokerKind) -> OutboundMessage {
    let mut event = Event::new(id, "weir-tests/scaling", "weir.test.scaling");
    event.datacontenttype = Some("application/json".to_owned());
    event.data = Some(br#"{"n":1}"#.to_vec());
    let (headers, payload) = weir_schemas::encode_binary(&event, header_style(broker));
    OutboundMessage {
        topic: topic.to_owned(),
        key: Some(Bytes::from(id.to_owned())),
        headers,
        payload: Bytes::from(payload),
        dedup_id: Some(id.to_owned()),
    }
}

/// Publish `n` events `<prefix>-<i>`, many at once, each confirmed.
async fn publish_burst(
    publisher: &dyn Publisher,
    topic: &str,
    prefix: &str,
    n: usize,
) -> anyhow::Result<()> {
    let broker = publisher.broker();
    let results: Vec<_> = futures::stream::iter(0..n)
        .map(|i| publisher.publish(event_message(topic, &format!("{prefix}-{i}"), broker)))
        .buffer_unordered(512)
        .collect()
        .await;
    for result in results {
        result.context("publishing the burst")?;
    }
    Ok(())
}

/// Samples a function's pool every 20 ms until dropped.
struct Sampler {
    samples: Arc<Mutex<Vec<(Instant, PoolStats)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(weir: &InProcess, function: &str) -> anyhow::Result<Sampler> {
        let runner = weir
            .shared()
            .function(function)
            .cloned()
            .context("no such function")?;
        let samples = Arc::new(Mutex::new(Vec::new()));
        let sink = samples.clone();
        let task = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(SAMPLE_EVERY);
            loop {
                ticker.tick().await;
                lock(&sink).push((Instant::now(), runner.pool.stats()));
            }
        });
        Ok(Sampler { samples, task })
    }

    fn samples(&self) -> Vec<(Instant, PoolStats)> {
        lock(&self.samples).clone()
    }

    /// The first sample at or after `since` for which `cond` holds, waiting at most `timeout`.
    async fn wait_until(
        &self,
        since: Instant,
        timeout: Duration,
        cond: impl Fn(&PoolStats) -> bool,
    ) -> anyhow::Result<(Instant, PoolStats)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = lock(&self.samples)
                .iter()
                .find(|(at, s)| *at >= since && cond(s))
            {
                return Ok(*found);
            }
            if Instant::now() >= deadline {
                let last = lock(&self.samples).last().map(|(_, s)| *s);
                bail!("condition not met within {timeout:?}; last pool stats: {last:?}");
            }
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// -------------------------------------------------------------------------------------------
// The burst scenario, on each broker
// -------------------------------------------------------------------------------------------

/// What one burst showed.
#[derive(Debug)]
struct BurstReport {
    broker: BrokerKind,
    to_max: Duration,
    drained: Duration,
    back_to_min: Duration,
    max_overlap: usize,
    max_slots: usize,
}

/// Tests 1, 2 and 5 on a running Weir whose function `function` is triggered by `topic`.
async fn burst(
    weir: &InProcess,
    function: &str,
    publisher: &dyn Publisher,
    topic: &str,
    outputs: &Outputs,
) -> anyhow::Result<BurstReport> {
    let broker = publisher.broker();
    let sampler = Sampler::start(weir, function)?;
    let runner = weir
        .shared()
        .function(function)
        .cloned()
        .context("no such function")?;
    let succeeded_before = runner.counters.succeeded.load(Relaxed);
    // Settled at min before the burst (the first control tick sets the pool right).
    sampler
        .wait_until(Instant::now(), Duration::from_secs(10), |s| {
            s.desired == MIN && s.live == MIN
        })
        .await
        .context("the pool did not settle at min before the burst")?;

    let prefix = format!("burst-{}", broker.as_str());
    let burst_start = Instant::now();
    publish_burst(publisher, topic, &prefix, BURST).await?;
    let published = burst_start.elapsed();
    let (at_max, _) = sampler
        .wait_until(burst_start, Duration::from_secs(20), |s| s.live >= MAX)
        .await
        .context("instances never reached max")?;
    let to_max = at_max.duration_since(burst_start);

    let runs = outputs.wait_for(BURST, DRAIN_WAIT).await?;
    let drained = burst_start.elapsed();
    let (at_min, _) = sampler
        .wait_until(Instant::now(), WINDOW + Duration::from_secs(8), |s| {
            s.live == MIN && s.desired == MIN
        })
        .await
        .with_context(|| {
            let metrics = telemetry::install_prometheus()
                .map(|h| h.render())
                .unwrap_or_default();
            let lag: Vec<&str> = metrics
                .lines()
                .filter(|l| l.starts_with("weir_consumer_lag{") && l.contains(function))
                .collect();
            format!("instances did not return to min after the window (lag gauge: {lag:?})")
        })?;
    let back_to_min = at_min.duration_since(burst_start).saturating_sub(drained);
    // Late duplicates would arrive after the drain: give them a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let runs_after = outputs.snapshot();

    let samples = sampler.samples();
    let report = BurstReport {
        broker,
        to_max,
        drained,
        back_to_min,
        max_overlap: max_overlap(&runs),
        max_slots: samples.iter().map(|(_, s)| s.slots).max().unwrap_or(0),
    };
    eprintln!(
        "{}: {MIN} -> {MAX} instances {:?} after the burst start (published in {published:?}); drained {BURST} in {:?}; back to {MIN} {:?} after draining; max overlap {}, max slots {}",
        report.broker, report.to_max, report.drained, report.back_to_min, report.max_overlap, report.max_slots
    );

    // 1. From min to max within a second, and back to min after the window.
    ensure!(
        to_max <= REACTION_GOAL,
        "{broker}: reached {MAX} instances {to_max:?} after the burst (goal {REACTION_GOAL:?})"
    );
    ensure!(
        // Slack over the window: the last commits and a lag reading. Kafka's lag only reaches 0
        // after the next offset commit (every 1 s) and a watermark read from Tansu, which took
        // up to ~3.5 s on this 2-core machine under a full test run (5.48 s measured once).
        back_to_min <= WINDOW + Duration::from_secs(5),
        "{broker}: back to min {back_to_min:?} after draining (window {WINDOW:?})"
    );
    // 2. The function's own account of its concurrency never exceeds max, and it did scale.
    ensure!(
        report.max_overlap <= MAX,
        "{broker}: {} invocations overlapped; max is {MAX}",
        report.max_overlap
    );
    ensure!(
        report.max_overlap >= 2,
        "{broker}: invocations never overlapped: scaling did nothing"
    );
    ensure!(
        report.max_slots <= MAX,
        "{broker}: {} slots; max is {MAX}",
        report.max_slots
    );
    ensure!(
        samples.iter().all(|(_, s)| s.busy <= MAX),
        "{broker}: more than {MAX} instances busy at once"
    );
    // 5. Nothing lost, nothing duplicated: the outputs and the runner's own counts.
    assert_exactly_once(&runs_after, &prefix, BURST)?;
    let succeeded = runner.counters.succeeded.load(Relaxed) - succeeded_before;
    ensure!(
        succeeded as usize == BURST,
        "{broker}: {succeeded} successful invocations for {BURST} events"
    );
    Ok(report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_scales_up_within_a_second_and_back_on_the_memory_bus() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let config = probe_function(
        "probe-mem",
        "broker = \"memory\"\ntopic = \"scale.mem.in\"",
        "scale.mem.out",
        2,
        &burst_scaling(),
    );
    let weir = InProcess::start(&config).await?;
    let outputs = Outputs::read(&weir.shared().memory, "scale.mem.out")?;
    let publisher = weir.shared().memory.publisher();
    burst(&weir, "probe-mem", &publisher, "scale.mem.in", &outputs).await?;
    weir.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_scales_up_within_a_second_and_back_on_jetstream() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let server = NatsServer::start()?;
    let config = format!(
        "[brokers.nats]\nservers = [\"{}\"]\n\n[[brokers.nats_streams]]\nname = \"SCALE\"\nsubjects = [\"scale.js.>\"]\n{}",
        server.url(),
        probe_function(
            "probe-js",
            "broker = \"jetstream\"\ntopic = \"scale.js.in\"\nstream = \"SCALE\"",
            "scale.js.out",
            2,
            &burst_scaling()
        )
    );
    let weir = InProcess::start(&config).await?;
    let outputs = Outputs::read(&weir.shared().memory, "scale.js.out")?;
    let nats_config = weir_broker_bridge::nats::NatsConfig {
        servers: vec![server.url()],
        ..weir_broker_bridge::nats::NatsConfig::default()
    };
    let transport = weir_broker_bridge::nats::NatsTransport::connect(&nats_config).await?;
    let publisher = transport.jetstream_publisher();
    burst(&weir, "probe-js", &publisher, "scale.js.in", &outputs).await?;
    weir.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_scales_up_within_a_second_and_back_on_kafka() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let kafka = KafkaBroker::start().await?;
    let config = format!(
        "[brokers.kafka]\nbootstrap = \"{}\"\ncreate_topics = true\ncommit_interval = \"100ms\"\nsession_timeout = \"10s\"\n[brokers.kafka.topic_defaults]\npartitions = 4\n{}",
        kafka.bootstrap(),
        probe_function("probe-kafka", "broker = \"kafka\"\ntopic = \"scale.kafka.in\"", "scale.kafka.out", 2, &burst_scaling())
    );
    let weir = InProcess::start(&config).await?;
    let outputs = Outputs::read(&weir.shared().memory, "scale.kafka.out")?;
    let transport = weir_broker_bridge::kafka::KafkaTransport::connect(&kafka.config()).await?;
    let publisher = transport.publisher()?;
    // The consumer must own its partitions before the burst, or the reaction time would
    // measure the group join instead.
    let runner = weir
        .shared()
        .function("probe-kafka")
        .cloned()
        .context("no such function")?;
    publish_burst(&publisher, "scale.kafka.in", "warmup", 1).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while runner.counters.succeeded.load(Relaxed) < 1 {
        ensure!(
            Instant::now() < deadline,
            "the kafka consumer never processed the warm-up event"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    outputs.wait_for(1, Duration::from_secs(5)).await?;
    lock(&outputs.runs).retain(|r| !r.input.starts_with("warmup"));
    burst(&weir, "probe-kafka", &publisher, "scale.kafka.in", &outputs).await?;
    weir.shutdown().await
}

// -------------------------------------------------------------------------------------------
// Scale to zero
// -------------------------------------------------------------------------------------------

fn start_count(metrics: &str, function: &str) -> f64 {
    let series = format!("weir_instance_start_duration_seconds_count{{function=\"{function}\"}}");
    metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(series.as_str())
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scales_to_zero_after_idle_timeout_and_wakes_up_on_the_next_event() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let scaling =
        "min = 0\nmax = 4\ntarget_lag = 10\nscale_down_window = \"500ms\"\nidle_timeout = \"1s\"";
    let config = probe_function(
        "probe-zero",
        "broker = \"memory\"\ntopic = \"zero.in\"",
        "zero.out",
        5,
        scaling,
    );
    let weir = InProcess::start(&config).await?;
    let outputs = Outputs::read(&weir.shared().memory, "zero.out")?;
    let metrics = telemetry::install_prometheus()?;
    let publisher = weir.shared().memory.publisher();
    let sampler = Sampler::start(&weir, "probe-zero")?;

    publish_burst(&publisher, "zero.in", "zero-a", 5).await?;
    outputs.wait_for(5, Duration::from_secs(20)).await?;
    let idle_since = Instant::now();
    let starts_before = start_count(&metrics.render(), "probe-zero");
    ensure!(
        starts_before >= 1.0,
        "no instance start was recorded for the first events"
    );

    let (at_zero, _) = sampler
        .wait_until(idle_since, Duration::from_secs(5), |s| {
            s.live == 0 && s.desired == 0
        })
        .await
        .context("instances never went to zero")?;
    let to_zero = at_zero.duration_since(idle_since);
    eprintln!("scale to zero: no instance alive {to_zero:?} after the last output");
    ensure!(
        to_zero <= Duration::from_millis(2500),
        "took {to_zero:?} to reach zero (idle timeout 1 s)"
    );
    // It stays at zero while nothing arrives.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = weir
        .shared()
        .function("probe-zero")
        .context("no function")?
        .pool
        .stats();
    ensure!(
        stats.live == 0,
        "instances came back without work: {stats:?}"
    );

    let woke = Instant::now();
    publish_burst(&publisher, "zero.in", "zero-b", 1).await?;
    let run = outputs
        .wait_for_input("zero-b-0", Duration::from_secs(10))
        .await?;
    let wake_latency = run.seen.duration_since(woke);
    let starts_after = start_count(&metrics.render(), "probe-zero");
    eprintln!("scale from zero: output {wake_latency:?} after the event; instance starts {starts_before} -> {starts_after}");
    ensure!(
        starts_after > starts_before,
        "the cold start was not recorded in the start histogram"
    );
    ensure!(
        wake_latency <= Duration::from_secs(2),
        "the event after scale-to-zero took {wake_latency:?}"
    );
    assert_exactly_once(
        &outputs
            .snapshot()
            .into_iter()
            .filter(|r| r.input.starts_with("zero-a"))
            .collect::<Vec<_>>(),
        "zero-a",
        5,
    )?;
    weir.shutdown().await
}

// -------------------------------------------------------------------------------------------
// Fair sharing
// -------------------------------------------------------------------------------------------

/// p50 of post → output over `n` events sent one after another to function B.
async fn latency_p50(
    publisher: &dyn Publisher,
    outputs: &Outputs,
    prefix: &str,
    n: usize,
) -> anyhow::Result<Duration> {
    let mut latencies = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        let sent = Instant::now();
        publisher
            .publish(event_message("fair.b.in", &id, BrokerKind::Memory))
            .await?;
        let run = outputs.wait_for_input(&id, Duration::from_secs(10)).await?;
        latencies.push(run.seen.duration_since(sent));
    }
    latencies.sort_unstable();
    Ok(latencies[latencies.len() / 2])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_function_does_not_starve_another() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let config = format!(
        "{}{}",
        probe_function(
            "fair-a",
            "broker = \"memory\"\ntopic = \"fair.a.in\"",
            "fair.a.out",
            2,
            &burst_scaling()
        ),
        probe_function(
            "fair-b",
            "broker = \"memory\"\ntopic = \"fair.b.in\"",
            "fair.b.out",
            2,
            "min = 1\nmax = 2\ntarget_lag = 10\nscale_down_window = \"2s\"\nidle_timeout = \"60s\""
        )
    );
    let weir = InProcess::start(&config).await?;
    let outputs_a = Outputs::read(&weir.shared().memory, "fair.a.out")?;
    let outputs_b = Outputs::read(&weir.shared().memory, "fair.b.out")?;
    let publisher = weir.shared().memory.publisher();

    let alone = latency_p50(&publisher, &outputs_b, "alone", 50).await?;
    publish_burst(&publisher, "fair.a.in", "fair-a", BURST).await?;
    // Let A reach max and be saturated.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let a_before = outputs_a.len();
    let shared = latency_p50(&publisher, &outputs_b, "shared", 50).await?;
    let a_during = outputs_a.len() - a_before;
    let a_left = BURST - outputs_a.len();
    eprintln!("fair sharing: B p50 alone {alone:?}, beside a saturated A {shared:?}; A did {a_during} events meanwhile, {a_left} still waiting");
    ensure!(
        a_left > 0,
        "A drained before B was measured: A was not saturated"
    );
    ensure!(
        shared <= alone * 2,
        "B's p50 latency went from {alone:?} alone to {shared:?} beside a saturated A (limit 2x)"
    );
    outputs_a.wait_for(BURST, DRAIN_WAIT).await?;
    weir.shutdown().await
}
