//! Weir on NATS beside plain async-nats programs doing the same broker work without wasm.
//!
//! `cargo bench -p weir-tests --bench nats` measures, in one run and on one fresh
//! `nats-server -js` (file storage):
//! 1. JetStream → wasm `noop` → ack through Weir (in-process [`Runtime`], 8 instance slots,
//!    the default prefetch of 32 per slot): N events pre-published, timed from the runtime's
//!    start until the consumer's `num_pending + num_ack_pending` is 0;
//! 2. a plain async-nats pull consumer acking the same N messages (fire-and-forget acks, as
//!    Weir does and a typical program does) with a generous window of its own (10,000
//!    unacknowledged, pulls of 1,000), the same consumer held to Weir's limits (its
//!    `max_ack_pending` of slots × (1 + prefetch), pulls of half that waiting at most 1 s, as
//!    Weir pulls), and the same with confirmed acks (`double_ack`, 8 at a time) to show what a
//!    confirmation per ack would cost;
//! 3. core NATS → wasm `echo` → core publish through Weir, beside
//! 4. a plain async-nats subscriber that republishes each message as it came, and the same
//!    republishing it with the nine headers Weir's output carries (the CloudEvents attributes
//!    and Weir's chaining extensions); all fed by a publisher that keeps at most a window of
//!    messages unanswered, so core NATS never drops (no slow consumer) and the rate is the
//!    sustained one;
//! 5. end-to-end latency (p50, p99, max) of core NATS through Weir at half the rate of (3);
//! 6. the same through the (4c) relay at the same rate, so that a p99 the machine causes (a
//!    small shared machine stalls now and then) is not read as Weir's; each latency line also
//!    says when its slowest 1 % of probes were sent (warm-up, a passing stall or throughout)
//!    and how often the host stalled while it was measured (a [`StallWatch`]).
//!
//! Throughput is measured in alternating rounds (Weir, then its baseline; 5 rounds unless
//! `WEIR_BENCH_ROUNDS` says otherwise) and the table gives the median round of each, with
//! every round's ratio listed after it: on a small machine one run each varies by ±25 %.
//!
//! Each row also gives the CPU time this process and the server used per event (from
//! `/proc`), and the write and read system calls per event: where the time goes, beside how
//! fast it went. `WEIR_BENCH_SLOTS` and `WEIR_BENCH_PREFETCH` change Weir's instance slots and
//! JetStream prefetch (e.g. to see what a throughput-tuned configuration does);
//! `WEIR_BENCH_ONLY=jetstream|core` runs one half.
//!
//! Without `--bench` (plain `cargo test`) it runs a tiny smoke version of the same steps that
//! only checks every event came through. Native baselines use async-nats directly, which
//! DESIGN.md allows in `tests/` for this purpose only.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::Context;
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::StreamExt as _;
use weir_broker_bridge::nats::{NatsConfig, NatsTransport, StreamConfig, PULL_EXPIRES};
use weir_dispatcher::runtime::Runtime;
use weir_tests::bench::{env_number, StallWatch, Stalls};
use weir_tests::cpu::{CpuMeter, CpuUsed};
use weir_tests::nats_server::NatsServer;
use weir_tests::weir::{component_path, functions_dir};

/// The weir binary's allocator, so Weir runs here as it does in production; the native
/// baselines in this process use it too.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const STREAM: &str = "BENCH";
const JS_SUBJECT: &str = "bench.js";
/// Issue #3's goals: Weir at this fraction of a plain async-nats program's rate, and at these
/// rates on a 2-core machine.
const GOAL_RATIO: f64 = 0.8;
const JS_GOAL_RATE: f64 = 100_000.0;
const CORE_GOAL_RATE: f64 = 250_000.0;
/// Weir's instance slots unless `WEIR_BENCH_SLOTS` says otherwise; also the confirmed-ack
/// baseline's concurrency.
const SLOTS: u32 = 8;
/// JetStream prefetch per slot unless `WEIR_BENCH_PREFETCH` says otherwise (Weir's default).
const PREFETCH: u32 = 32;

/// Sizes of one run.
struct Plan {
    full: bool,
    /// Weir's instance slots (min = max) and JetStream prefetch per slot.
    slots: u32,
    prefetch: u32,
    /// Alternating Weir/native rounds of each throughput measurement.
    rounds: u32,
    /// The server's process, whose CPU time each row reports beside this process's.
    server_pid: u32,
    js_events: usize,
    core_events: u64,
    /// Most core messages published and not yet answered.
    core_window: u64,
    latency_for: Duration,
    /// Longest the Weir JetStream measurement runs (it reports what it did by then).
    js_budget: Duration,
    timeout: Duration,
}

impl Plan {
    fn new(full: bool, server_pid: u32) -> anyhow::Result<Plan> {
        let slots = env_number("WEIR_BENCH_SLOTS", SLOTS)?;
        let prefetch = env_number("WEIR_BENCH_PREFETCH", PREFETCH)?;
        let rounds = env_number("WEIR_BENCH_ROUNDS", if full { 5 } else { 1 })?;
        Ok(if full {
            Plan {
                full,
                slots,
                prefetch,
                rounds,
                server_pid,
                js_events: 100_000,
                core_events: 200_000,
                core_window: 8_192,
                latency_for: Duration::from_secs(5),
                js_budget: Duration::from_secs(60),
                timeout: Duration::from_secs(300),
            }
        } else {
            Plan {
                full,
                slots,
                prefetch,
                rounds,
                server_pid,
                js_events: 300,
                core_events: 2_000,
                core_window: 256,
                latency_for: Duration::from_millis(500),
                js_budget: Duration::from_secs(60),
                timeout: Duration::from_secs(60),
            }
        })
    }
}

/// One line of the table.
struct Row {
    name: String,
    events: u64,
    elapsed: Duration,
    /// CPU this process (Weir or the native program, plus the bench's own publisher and
    /// counter where the row says so) and the server used.
    cpu: CpuUsed,
}

impl Row {
    fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Weir and its native baseline measured in alternating rounds. One run each says little on a
/// small machine: the same build varies by ±25 % from run to run, the baseline as much as
/// Weir, so the table reports the median round of each and every round's ratio beside it.
#[derive(Default)]
struct Rounds {
    weir: Vec<Row>,
    native: Vec<Row>,
    /// The native program doing exactly Weir's broker work, in the same rounds: on JetStream
    /// within Weir's consumer limits, on core publishing Weir's output headers.
    like_for_like: Vec<Row>,
}

impl Rounds {
    fn median_weir(&self) -> &Row {
        median(&self.weir)
    }

    fn median_native(&self) -> &Row {
        median(&self.native)
    }

    fn median_ratio(&self) -> f64 {
        self.median_weir().rate() / self.median_native().rate()
    }

    /// `None` when this measurement has no like-for-like baseline.
    fn median_like_for_like(&self) -> Option<&Row> {
        (!self.like_for_like.is_empty()).then(|| median(&self.like_for_like))
    }

    /// Weir's median rate over the like-for-like baseline's, when there is one.
    fn like_for_like_ratio(&self) -> Option<f64> {
        self.median_like_for_like()
            .map(|baseline| self.median_weir().rate() / baseline.rate())
    }

    /// The median rows in table order: Weir, the native baseline, the like-for-like one.
    fn medians(&self) -> Vec<&Row> {
        [Some(self.median_weir()), Some(self.median_native())]
            .into_iter()
            .chain([self.median_like_for_like()])
            .flatten()
            .collect()
    }

    /// Whether Weir's median met issue #3's goals: at least [`GOAL_RATIO`] of each baseline's
    /// median, and at least `goal_rate` events/s. Only a full run's figures mean anything.
    fn print_goals(&self, name: &str, native: &str, like_for_like: &str, goal_rate: f64) {
        let verdict = |met: bool| if met { "met" } else { "NOT met" };
        let ratio = self.median_ratio();
        let mut line = format!(
            "  {name:<10} ≥ {GOAL_RATIO}x {native}: {} ({ratio:.3}x)",
            verdict(ratio >= GOAL_RATIO)
        );
        if let Some(ratio) = self.like_for_like_ratio() {
            line.push_str(&format!(
                "; ≥ {GOAL_RATIO}x {like_for_like}: {} ({ratio:.3}x)",
                verdict(ratio >= GOAL_RATIO)
            ));
        }
        let rate = self.median_weir().rate();
        line.push_str(&format!(
            "; ≥ {goal_rate:.0}/s: {} ({rate:.0}/s)",
            verdict(rate >= goal_rate)
        ));
        println!("{line}");
    }

    fn print(&self, name: &str) {
        // Weir's round beside the same round of one baseline.
        let against = |baseline: &[Row]| {
            let rounds: Vec<String> = self
                .weir
                .iter()
                .zip(baseline)
                .map(|(weir, native)| {
                    format!(
                        "{:.0} / {:.0} = {:.2}x",
                        weir.rate(),
                        native.rate(),
                        weir.rate() / native.rate()
                    )
                })
                .collect();
            rounds.join("; ")
        };
        println!("  {name:<10} {}", against(&self.native));
        if !self.like_for_like.is_empty() {
            println!("  {:<10} {}", "(same work)", against(&self.like_for_like));
        }
    }
}

/// The row with the median rate (the upper one of an even count). Every `Rounds` holds at
/// least one round: `Plan::rounds` is positive.
fn median(rows: &[Row]) -> &Row {
    let mut sorted: Vec<&Row> = rows.iter().collect();
    sorted.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
    sorted[sorted.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let full = std::env::args().any(|arg| arg == "--bench");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    runtime.block_on(run(full))
}

async fn run(full: bool) -> anyhow::Result<()> {
    let server = NatsServer::start()?;
    let plan = Plan::new(full, server.pid().context("nats-server is not running")?)?;
    let url = server.url();
    let client = async_nats::connect(&url).await.context("connecting")?;
    let js = async_nats::jetstream::new(client.clone());
    // Weir's own metrics recorder, as in production.
    weir_dispatcher::telemetry::install_prometheus()?;

    let transport = NatsTransport::connect(&NatsConfig {
        servers: vec![url.clone()],
        ..NatsConfig::default()
    })
    .await?;
    transport
        .ensure_stream(&StreamConfig::new(STREAM, vec![JS_SUBJECT.into()]))
        .await?;
    // `WEIR_BENCH_ONLY=jetstream` or `=core` runs one half (e.g. under a profiler); each
    // half still measures its own baseline.
    let only = std::env::var("WEIR_BENCH_ONLY").unwrap_or_default();
    ensure!(
        matches!(only.as_str(), "" | "jetstream" | "core"),
        "WEIR_BENCH_ONLY must be `jetstream` or `core`, not `{only}`"
    );
    let mut jetstream = None;
    if only != "core" {
        let published = Instant::now();
        publish_js(&js, plan.js_events).await?;
        let publish_rate = plan.js_events as f64 / published.elapsed().as_secs_f64();
        // Each round reads the whole stream again through new durable consumers.
        let mut rounds = Rounds::default();
        for round in 1..=plan.rounds {
            rounds.weir.push(
                weir_jetstream(&plan, &url, &js, round)
                    .await
                    .with_context(|| format!("(1) Weir JetStream, round {round}"))?,
            );
            rounds.native.push(
                native_jetstream(&plan, &js, &format!("native-{round}"), NativeAcks::Own)
                    .await
                    .with_context(|| format!("(2) native JetStream, round {round}"))?,
            );
            rounds.like_for_like.push(
                native_jetstream(
                    &plan,
                    &js,
                    &format!("native-limits-{round}"),
                    NativeAcks::WeirLimits,
                )
                .await
                .with_context(|| format!("(2c) native JetStream, Weir's limits, round {round}"))?,
            );
        }
        let native_js_confirmed =
            native_jetstream(&plan, &js, "native-confirmed", NativeAcks::Confirmed)
                .await
                .context("(2b) native JetStream, confirmed acks")?;
        jetstream = Some((publish_rate, rounds, native_js_confirmed));
    }
    let mut core = None;
    if only != "jetstream" {
        let mut rounds = Rounds::default();
        for round in 1..=plan.rounds {
            rounds.weir.push(
                weir_core(&plan, &url, round)
                    .await
                    .with_context(|| format!("(3) Weir core, round {round}"))?,
            );
            rounds.native.push(
                native_core(&plan, &url, round, false)
                    .await
                    .with_context(|| format!("(4) native core, round {round}"))?,
            );
            rounds.like_for_like.push(
                native_core(&plan, &url, round, true)
                    .await
                    .with_context(|| format!("(4c) native core, Weir's headers, round {round}"))?,
            );
        }
        let latency_rate = rounds.median_weir().rate() / 2.0;
        let weir_latency = weir_core_latency(&plan, &url, latency_rate)
            .await
            .context("(5) Weir core latency")?;
        let native_latency = native_core_latency(&plan, &url, latency_rate)
            .await
            .context("(6) native core latency")?;
        core = Some((rounds, [weir_latency, native_latency]));
    }

    println!();
    println!(
        "NATS benchmark ({}; nats-server -js, file storage; {} cores; median of {} alternating rounds)",
        if plan.full { "full" } else { "smoke" },
        std::thread::available_parallelism().map_or(0, usize::from),
        plan.rounds
    );
    println!(
        "{:<64} {:>9} {:>9} {:>12} {:>12} {:>10} {:>10}  goal",
        "measurement", "events", "seconds", "events/s", "Weir/native", "µs cpu/ev", "server"
    );
    let line = |row: &Row, ratio: Option<f64>, goal: &str| {
        let (own, server) = row.cpu.per_event_micros(row.events);
        println!(
            "{:<64} {:>9} {:>9.2} {:>12.0} {:>12} {:>10.1} {:>10.1}  {goal}",
            row.name,
            row.events,
            row.elapsed.as_secs_f64(),
            row.rate(),
            ratio.map_or(String::new(), |r| format!("{r:.2}x")),
            own,
            server,
        );
    };
    // Weir's median row with its goal, the native one, and the like-for-like one with Weir's
    // ratio to it.
    let medians = |rounds: &Rounds, goal: &str, same_work: &str| {
        line(rounds.median_weir(), Some(rounds.median_ratio()), goal);
        line(rounds.median_native(), None, "");
        if let Some(like_for_like) = rounds.median_like_for_like() {
            line(
                like_for_like,
                rounds.like_for_like_ratio(),
                &format!("(Weir ÷ this row: {same_work})"),
            );
        }
    };
    if let Some((publish_rate, rounds, native_js_confirmed)) = &jetstream {
        let goal = format!("≥ {GOAL_RATIO}x native, ≥ {JS_GOAL_RATE:.0}/s");
        medians(rounds, &goal, "same consumer limits");
        line(native_js_confirmed, None, "(what a confirmed ack costs)");
        println!("JetStream publish of the input (pipelined): {publish_rate:.0} events/s");
    }
    if let Some((rounds, latencies)) = &core {
        let goal = format!("≥ {GOAL_RATIO}x native, ≥ {CORE_GOAL_RATE:.0}/s");
        medians(rounds, &goal, "same output headers");
        let paths = [
            "core → echo → core latency through Weir",
            "core → (4c) relay → core latency, same rate",
        ];
        for (path, latency) in paths.iter().zip(latencies) {
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            println!(
                "{path:<64} {:>9} at {:.0}/s: p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms",
                latency.samples,
                latency.rate,
                ms(latency.p50),
                ms(latency.p99),
                ms(latency.max),
            );
            let slow = &latency.slow_sent;
            println!(
                "{:<64} slowest 1 % sent {:.2}–{:.2} s in, in {} of {} {} ms windows; {}",
                "",
                slow.first.as_secs_f64(),
                slow.last.as_secs_f64(),
                slow.windows,
                slow.of_windows,
                SLOW_WINDOW.as_millis(),
                latency.stalls
            );
        }
    }
    transport.close().await?;
    drop(server);
    println!();
    println!("System calls per event (writes / reads): this process, then nats-server");
    let calls = |row: &Row| {
        let per = |n: u64| n as f64 / row.events.max(1) as f64;
        println!(
            "{:<64} {:>6.2} / {:<6.2} {:>6.2} / {:<6.2}",
            row.name,
            per(row.cpu.own_io.0),
            per(row.cpu.own_io.1),
            per(row.cpu.other_io.0),
            per(row.cpu.other_io.1)
        );
    };
    let measured = [
        jetstream.as_ref().map(|(_, rounds, _)| rounds),
        core.as_ref().map(|(rounds, _)| rounds),
    ];
    for row in measured.into_iter().flatten().flat_map(Rounds::medians) {
        calls(row);
    }
    println!();
    println!("Every round (events/s, Weir / native = ratio):");
    if let Some((_, rounds, _)) = &jetstream {
        rounds.print("JetStream");
    }
    if let Some((rounds, _)) = &core {
        rounds.print("core");
    }
    println!();
    if plan.full {
        println!(
            "Goals, from the unrounded medians (a ratio printed 0.80x above may be under 0.8):"
        );
    } else {
        println!("Goals (a smoke run's figures mean nothing; shown so the lines are exercised):");
    }
    if let Some((_, rounds, _)) = &jetstream {
        rounds.print_goals("JetStream", "(2)", "(2c)", JS_GOAL_RATE);
    }
    if let Some((rounds, _)) = &core {
        rounds.print_goals("core", "(4)", "(4c)", CORE_GOAL_RATE);
    }
    if !plan.full {
        // Every step above checked that each event came through.
        println!("smoke: 1 passed, 0 failed");
    }
    Ok(())
}

fn ce_headers(id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("ce-specversion", "1.0");
    headers.insert("ce-id", id);
    headers.insert("ce-source", "bench");
    headers.insert("ce-type", "com.example.bench");
    headers.insert("content-type", "application/json");
    headers
}

async fn publish_js(js: &Context, events: usize) -> anyhow::Result<()> {
    let ids: Vec<usize> = (0..events).collect();
    for chunk in ids.chunks(2000) {
        let mut acks = Vec::with_capacity(chunk.len());
        for id in chunk {
            let ack = js
                .publish_with_headers(
                    JS_SUBJECT,
                    ce_headers(&format!("js-{id}")),
                    Bytes::from(format!("{{\"n\":{id}}}")),
                )
                .await?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await?;
        }
    }
    Ok(())
}

async fn lag(js: &Context, durable: &str) -> anyhow::Result<u64> {
    let stream = js.get_stream(STREAM).await?;
    let info = stream.consumer_info(durable).await?;
    Ok(info.num_pending + info.num_ack_pending as u64)
}

async fn wait_lag_zero(js: &Context, durable: &str, deadline: Instant) -> anyhow::Result<()> {
    loop {
        let left = lag(js, durable).await?;
        if left == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("consumer {durable} still has {left} messages to do");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn start_weir(url: &str, function: &str) -> anyhow::Result<Runtime> {
    let text = format!(
        "[brokers.nats]\nservers = [\"{url}\"]\n\n[[brokers.nats_streams]]\nname = \"{STREAM}\"\nsubjects = [\"{JS_SUBJECT}\"]\n{function}"
    );
    let config = weir_dispatcher::config::from_toml_str(&text, &functions_dir()?)
        .map_err(|e| anyhow::anyhow!("bench configuration:\n{e}"))?;
    Runtime::start(config).await
}

/// (1) JetStream → noop → ack through Weir.
async fn weir_jetstream(plan: &Plan, url: &str, js: &Context, round: u32) -> anyhow::Result<Row> {
    let group = format!("weir-bench-{round}");
    let function = format!(
        r#"
[[functions]]
name = "noop"
module = "{module}"
[functions.trigger]
broker = "jetstream"
topic = "{JS_SUBJECT}"
stream = "{STREAM}"
group = "{group}"
prefetch = {prefetch}
[functions.scaling]
min = {slots}
max = {slots}
"#,
        slots = plan.slots,
        prefetch = plan.prefetch,
        module = component_path("noop.wasm")?,
    );
    let runtime = start_weir(url, &function).await?;
    let meter = CpuMeter::start(plan.server_pid)?;
    let started = Instant::now();
    // Bounded: a slow Weir is measured over what it did within the budget, not waited for.
    let budget = started + plan.js_budget;
    let mut left = plan.js_events as u64;
    while left > 0 && Instant::now() < budget {
        tokio::time::sleep(Duration::from_millis(10)).await;
        left = lag(js, &group).await?;
    }
    let elapsed = started.elapsed();
    let cpu = meter.stop()?;
    let shared = runtime.shared();
    let succeeded = shared
        .function("noop")
        .map_or(0, |f| f.counters.succeeded.load(Ordering::Relaxed));
    runtime.shutdown().await;
    let done = plan.js_events as u64 - left;
    ensure!(
        succeeded >= done && done > 0,
        "noop ran {succeeded} times for {done} events done"
    );
    if !plan.full {
        ensure!(left == 0, "smoke: {left} events left after {elapsed:?}");
    }
    Ok(Row {
        name: if left == 0 {
            format!(
                "(1) JetStream → wasm noop → ack, Weir ({} slots, prefetch {})",
                plan.slots, plan.prefetch
            )
        } else {
            format!(
                "(1) JetStream → noop → ack, Weir ({} slots; budget hit)",
                plan.slots
            )
        },
        events: done,
        elapsed,
        cpu,
    })
}

/// How the native JetStream consumer of (2) acknowledges, and within which limits.
#[derive(Clone, Copy, PartialEq)]
enum NativeAcks {
    /// Fire-and-forget acks; 10,000 unacknowledged at most, pulled 1,000 at a time.
    Own,
    /// Fire-and-forget acks within Weir's limits: the `max_ack_pending` Weir gives its
    /// consumer (slots × (1 + prefetch)), pulled half of it at a time, as Weir's fetcher waits
    /// for half its bound to be free before it pulls, each pull expiring as Weir's do.
    WeirLimits,
    /// `double_ack`, a slot's worth at a time.
    Confirmed,
}

/// (2) The same pull + ack with async-nats and no wasm.
async fn native_jetstream(
    plan: &Plan,
    js: &Context,
    durable: &str,
    acks: NativeAcks,
) -> anyhow::Result<Row> {
    let weir_bound = plan.slots.saturating_mul(plan.prefetch.saturating_add(1));
    let (max_ack_pending, batch) = match acks {
        NativeAcks::Own => (10_000, 1_000),
        NativeAcks::WeirLimits => (weir_bound, (weir_bound / 2).max(1)),
        NativeAcks::Confirmed => (SLOTS, SLOTS),
    };
    let confirmed = acks == NativeAcks::Confirmed;
    let stream = js.get_stream(STREAM).await?;
    let consumer: PullConsumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(durable.to_owned()),
            ack_policy: AckPolicy::Explicit,
            deliver_policy: DeliverPolicy::All,
            max_ack_pending: i64::from(max_ack_pending),
            ..Default::default()
        })
        .await?;
    let meter = CpuMeter::start(plan.server_pid)?;
    let started = Instant::now();
    let deadline = started + plan.timeout;
    let pulls = consumer.stream().max_messages_per_batch(batch as usize);
    // Weir's limits include its pull expiry. A pull that stops short is renewed when it
    // expires: after `PULL_EXPIRES` in Weir's fetcher, after async-nats' default of 30 s here
    // (one (2c) round in fifteen once took 36 s instead of about 1.3).
    let pulls = match acks {
        NativeAcks::WeirLimits => pulls.expires(PULL_EXPIRES),
        NativeAcks::Own | NativeAcks::Confirmed => pulls,
    };
    let mut messages = pulls.messages().await?;
    let mut done = 0usize;
    if confirmed {
        let mut acks = futures::stream::FuturesUnordered::new();
        while done < plan.js_events {
            ensure!(
                Instant::now() < deadline,
                "native confirmed acks: {done} done"
            );
            tokio::select! {
                Some(message) = messages.next(), if acks.len() < SLOTS as usize => {
                    let message = message.map_err(|e| anyhow::anyhow!("{e}"))?;
                    acks.push(async move { message.double_ack().await.map_err(|e| anyhow::anyhow!("{e}")) });
                }
                Some(acked) = acks.next() => { acked?; done += 1; }
            }
        }
    } else {
        while done < plan.js_events {
            ensure!(Instant::now() < deadline, "native acks: {done} done");
            let message = messages
                .next()
                .await
                .context("the message stream ended")?
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            message.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
            done += 1;
        }
    }
    drop(messages);
    wait_lag_zero(js, durable, deadline).await?;
    let cpu = meter.stop()?;
    Ok(Row {
        name: match acks {
            NativeAcks::Own => "(2) native async-nats pull + ack".to_owned(),
            NativeAcks::WeirLimits => {
                format!(
                    "(2c) native pull + ack, ≤ {max_ack_pending} unacked, {} pulls of {batch}",
                    humantime::format_duration(PULL_EXPIRES)
                )
            }
            NativeAcks::Confirmed => format!("(2b) native pull + confirmed ack, {SLOTS} at a time"),
        },
        events: plan.js_events as u64,
        elapsed: started.elapsed(),
        cpu,
    })
}

/// Publishes `events` core messages to `input` keeping at most `window` unanswered (counted by
/// `answered`); returns the time from the first publish until every answer arrived, and the
/// CPU used meanwhile (this process's includes the publisher and the counter).
async fn drive_core(
    plan: &Plan,
    publisher: &async_nats::Client,
    input: &str,
    answered: &AtomicU64,
) -> anyhow::Result<(Duration, CpuUsed)> {
    let meter = CpuMeter::start(plan.server_pid)?;
    let started = Instant::now();
    let deadline = started + plan.timeout;
    let mut sent = 0u64;
    while sent < plan.core_events {
        let free = plan
            .core_window
            .saturating_sub(sent - answered.load(Ordering::Relaxed));
        if free < plan.core_window / 4 {
            ensure!(
                Instant::now() < deadline,
                "{input}: {} of {sent} answered",
                answered.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
            continue;
        }
        for _ in 0..free.min(plan.core_events - sent) {
            publisher
                .publish_with_headers(
                    input.to_owned(),
                    ce_headers(&format!("c-{sent}")),
                    Bytes::from(sent.to_string()),
                )
                .await?;
            sent += 1;
        }
        publisher.flush().await?;
    }
    while answered.load(Ordering::Relaxed) < plan.core_events {
        ensure!(
            Instant::now() < deadline,
            "{input}: {} of {} answered",
            answered.load(Ordering::Relaxed),
            plan.core_events
        );
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let elapsed = started.elapsed();
    Ok((elapsed, meter.stop()?))
}

/// Counts messages on `subject` into the returned counter.
async fn count_on(url: &str, subject: &str) -> anyhow::Result<Arc<AtomicU64>> {
    let client = async_nats::ConnectOptions::new()
        .subscription_capacity(1 << 20)
        .connect(url)
        .await?;
    let mut subscriber = client.subscribe(subject.to_owned()).await?;
    client.flush().await?;
    let count = Arc::new(AtomicU64::new(0));
    let counter = count.clone();
    tokio::spawn(async move {
        let _client = client;
        while subscriber.next().await.is_some() {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    Ok(count)
}

fn echo_function(plan: &Plan, input: &str, output: &str) -> anyhow::Result<String> {
    Ok(format!(
        r#"
[[functions]]
name = "echo"
module = "{module}"
outputs = ["{output}"]
config = {{ output_topic = "{output}" }}
[functions.trigger]
broker = "nats"
topic = "{input}"
[functions.scaling]
min = {slots}
max = {slots}
"#,
        slots = plan.slots,
        module = component_path("echo.wasm")?
    ))
}

/// (3) core → echo → core through Weir.
async fn weir_core(plan: &Plan, url: &str, round: u32) -> anyhow::Result<Row> {
    // Subjects of its own per round, so a late message of one round never counts in the next.
    let (input, output) = (
        format!("bench.core.in.{round}"),
        format!("bench.core.out.{round}"),
    );
    let runtime = start_weir(url, &echo_function(plan, &input, &output)?).await?;
    let answered = count_on(url, &output).await?;
    let publisher = async_nats::connect(url).await?;
    let driven = drive_core(plan, &publisher, &input, &answered).await;
    runtime.shutdown().await;
    let (elapsed, cpu) = driven?;
    Ok(Row {
        name: format!(
            "(3) core → wasm echo → core publish, Weir ({} slots)",
            plan.slots
        ),
        events: plan.core_events,
        elapsed,
        cpu,
    })
}

/// (4) A plain relay republishing each message with its own headers or, for (4c), with the
/// nine headers Weir's `echo` outputs carry: the input's five (a new `ce-id`) plus `ce-time`,
/// `ce-traceparent`, `ce-weirhops` and `ce-weircausation`, values of the same lengths as Weir's.
/// The time is a fixed string and the ids come from a counter, so (4c) pays for carrying the
/// headers, not for deriving them.
async fn native_core(
    plan: &Plan,
    url: &str,
    round: u32,
    weir_headers: bool,
) -> anyhow::Result<Row> {
    let tag = if weir_headers { "native-ce" } else { "native" };
    let (input, output) = (
        format!("bench.{tag}.in.{round}"),
        format!("bench.{tag}.out.{round}"),
    );
    let task = spawn_relay(url, &input, &output, weir_headers).await?;
    let answered = count_on(url, &output).await?;
    let publisher = async_nats::connect(url).await?;
    let driven = drive_core(plan, &publisher, &input, &answered).await;
    task.abort();
    let (elapsed, cpu) = driven?;
    Ok(Row {
        name: if weir_headers {
            "(4c) native subscribe + republish with Weir's 9 headers".to_owned()
        } else {
            "(4) native async-nats subscribe + republish".to_owned()
        },
        events: plan.core_events,
        elapsed,
        cpu,
    })
}

/// The plain relay of (4) and (4c): republishes every message on `input` to `output`, with
/// Weir's nine output headers when `weir_headers`. Runs until aborted.
async fn spawn_relay(
    url: &str,
    input: &str,
    output: &str,
    weir_headers: bool,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let relay = async_nats::ConnectOptions::new()
        .subscription_capacity(1 << 20)
        .connect(url)
        .await?;
    let mut subscriber = relay.subscribe(input.to_owned()).await?;
    relay.flush().await?;
    let republisher = relay.clone();
    // A `Subject` shares its bytes when cloned: no allocation per message, as with the
    // `&'static str` the relay used before subjects were per round.
    let republish_to = async_nats::Subject::from(output);
    Ok(tokio::spawn(async move {
        let mut relayed = 0u64;
        while let Some(message) = subscriber.next().await {
            let mut headers = message.headers.unwrap_or_default();
            if weir_headers {
                relayed += 1;
                let causation = headers
                    .get("ce-id")
                    .map_or_else(String::new, |id| id.as_str().to_owned());
                headers.insert("ce-id", format!("{relayed:032x}"));
                headers.insert("ce-time", "2026-11-26T07:00:00.000Z");
                headers.insert(
                    "ce-traceparent",
                    format!("00-{relayed:032x}-{relayed:016x}-01"),
                );
                headers.insert("ce-weirhops", "1");
                headers.insert("ce-weircausation", causation);
            }
            if republisher
                .publish_with_headers(republish_to.clone(), headers, message.payload)
                .await
                .is_err()
            {
                return;
            }
        }
    }))
}

/// End-to-end latencies of one path at a fixed rate.
struct Latency {
    rate: f64,
    p50: Duration,
    p99: Duration,
    max: Duration,
    samples: usize,
    /// When the slowest 1 % of probes were sent.
    slow_sent: SlowSent,
    /// The host's stalls while it was measured.
    stalls: Stalls,
}

/// Where in a latency run its slowest 1 % of probes were sent: a few windows early on point
/// at warm-up, a few anywhere at a passing stall, many at a steady cost.
struct SlowSent {
    first: Duration,
    last: Duration,
    /// How many of the run's [`SLOW_WINDOW`]s they were sent in.
    windows: usize,
    of_windows: usize,
}

/// The width of the windows [`SlowSent`] counts.
const SLOW_WINDOW: Duration = Duration::from_millis(100);

/// (5) publish → echo → receive through Weir at `rate` events/s.
async fn weir_core_latency(plan: &Plan, url: &str, rate: f64) -> anyhow::Result<Latency> {
    let (input, output) = ("bench.lat.in", "bench.lat.out");
    let runtime = start_weir(url, &echo_function(plan, input, output)?).await?;
    let latency = core_latency(plan, url, rate, input, output).await;
    runtime.shutdown().await;
    latency
}

/// (6) the same through the (4c) relay, in the same run: what the machine and the broker
/// alone give at that rate, so a p99 can be told apart from the host's own stalls.
async fn native_core_latency(plan: &Plan, url: &str, rate: f64) -> anyhow::Result<Latency> {
    let (input, output) = ("bench.lat.native.in", "bench.lat.native.out");
    let relay = spawn_relay(url, input, output, true).await?;
    let latency = core_latency(plan, url, rate, input, output).await;
    relay.abort();
    latency
}

/// Publishes numbered probes to `input` at `rate` for the plan's latency period and times
/// each one's answer on `output`.
async fn core_latency(
    plan: &Plan,
    url: &str,
    rate: f64,
    input: &'static str,
    output: &str,
) -> anyhow::Result<Latency> {
    let total = ((rate * plan.latency_for.as_secs_f64()) as usize).max(10);
    let receiver = async_nats::ConnectOptions::new()
        .subscription_capacity(1 << 20)
        .connect(url)
        .await?;
    let mut subscriber = receiver.subscribe(output.to_owned()).await?;
    receiver.flush().await?;
    let base = Instant::now();
    let collect = tokio::spawn(async move {
        let mut received = vec![None; total];
        let mut count = 0usize;
        while count < total {
            let Ok(Some(message)) =
                tokio::time::timeout(Duration::from_secs(10), subscriber.next()).await
            else {
                break;
            };
            let at = base.elapsed();
            if let Some(slot) = std::str::from_utf8(&message.payload)
                .ok()
                .and_then(|s| s.parse::<usize>().ok())
                .and_then(|i| received.get_mut(i))
            {
                *slot = Some(at);
                count += 1;
            }
        }
        received
    });
    let publisher = async_nats::connect(url).await?;
    let watch = StallWatch::start()?;
    let mut sent_at = Vec::with_capacity(total);
    let tick = Duration::from_millis(1);
    let per_tick = (rate / 1000.0).max(1.0);
    let mut ticker = tokio::time::interval(tick);
    let mut owed = 0.0f64;
    while sent_at.len() < total {
        ticker.tick().await;
        owed += per_tick;
        while owed >= 1.0 && sent_at.len() < total {
            let index = sent_at.len();
            sent_at.push(base.elapsed());
            publisher
                .publish_with_headers(
                    input,
                    ce_headers(&format!("l-{index}")),
                    Bytes::from(index.to_string()),
                )
                .await?;
            owed -= 1.0;
        }
        publisher.flush().await?;
    }
    let received = collect.await.context("the latency receiver failed")?;
    let stalls = watch.finish()?;
    // (latency, when it was sent), slowest last.
    let mut probes: Vec<(Duration, Duration)> = received
        .iter()
        .zip(&sent_at)
        .filter_map(|(got, sent)| got.map(|got| (got.saturating_sub(*sent), *sent)))
        .collect();
    ensure!(
        probes.len() == total,
        "{} of {total} latency probes came back",
        probes.len()
    );
    probes.sort();
    let at = |q: f64| probes[((probes.len() as f64 * q) as usize).min(probes.len() - 1)].0;
    // When the slowest 1 % were sent, in order, and which windows those times fall in.
    let mut slow_sends: Vec<Duration> = probes[probes.len() - probes.len().div_ceil(100)..]
        .iter()
        .map(|(_, sent)| *sent)
        .collect();
    slow_sends.sort_unstable();
    let window_of = |sent: &Duration| sent.as_millis() / SLOW_WINDOW.as_millis();
    let mut windows: Vec<u128> = slow_sends.iter().map(window_of).collect();
    windows.dedup();
    Ok(Latency {
        rate,
        p50: at(0.50),
        p99: at(0.99),
        max: at(1.0),
        samples: probes.len(),
        slow_sent: SlowSent {
            first: slow_sends.first().copied().unwrap_or_default(),
            last: slow_sends.last().copied().unwrap_or_default(),
            windows: windows.len(),
            of_windows: sent_at
                .last()
                .map_or(0, |last| window_of(last) as usize + 1),
        },
        stalls,
    })
}
