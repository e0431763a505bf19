//! Lag-driven scaling beside a fixed pool, in one run on the memory bus.
//!
//! `cargo bench -p weir-tests --bench scaling` starts one in-process Weir with two `probe`
//! functions (2 ms of WASI sleep per event): `autoscaled` (min 1, max 8, target lag 10) and
//! `fixed` (min = max = 1). For each it publishes a burst of 20,000 events and measures
//! - the **scale-up reaction**: burst start → `max` instances alive (pool sampled every 10 ms;
//!   the goal is ≤ 1 s),
//! - the **drain time**: burst start → the last output.
//!
//! and prints a table. `--quick` (or no `--bench`, as under `cargo test`) uses 2,000 events.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use bytes::Bytes;
use futures::StreamExt as _;
use weir_broker_bridge::memory::{StartFrom, SubscribeOptions};
use weir_broker_bridge::{
    BrokerKind, Ordering as Lanes, OutboundMessage, Publisher, Subscription as _,
};
use weir_dispatcher::runner::header_style;
use weir_schemas::Event;
use weir_tests::weir::InProcess;

/// The weir binary's allocator, so Weir runs here as it does in production; the native
/// baselines in this process use it too.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const MIN: usize = 1;
const MAX: usize = 8;
const SLEEP_MS: u64 = 2;

fn function(name: &str, min: usize, max: usize) -> String {
    format!(
        r#"
[[functions]]
name = "{name}"
module = "probe.wasm"
outputs = ["{name}.out"]
config = {{ sleep_ms = "{SLEEP_MS}", output_topic = "{name}.out" }}
[functions.trigger]
broker = "memory"
topic = "{name}.in"
ordering = "none"
[functions.scaling]
min = {min}
max = {max}
target_lag = 10
scale_down_window = "2s"
idle_timeout = "60s"
"#
    )
}

/// One measured burst.
struct Row {
    name: &'static str,
    slots: String,
    reaction: Option<Duration>,
    drain: Duration,
}

async fn measure(
    weir: &InProcess,
    name: &'static str,
    max: usize,
    events: usize,
) -> anyhow::Result<Row> {
    let shared = weir.shared();
    let runner = shared.function(name).cloned().context("no such function")?;
    let options = SubscribeOptions {
        ordering: Lanes::None,
        max_in_flight: 1024,
        start: StartFrom::Beginning,
    };
    let mut outputs = shared
        .memory
        .subscribe(&format!("{name}.out"), "bench", options)?;
    let received = Arc::new(AtomicUsize::new(0));
    let counter = received.clone();
    tokio::spawn(async move {
        while let Some(delivery) = outputs.next().await {
            counter.fetch_add(1, Ordering::Relaxed);
            let _ = delivery.ack().await;
        }
    });
    // Settle at min first.
    let settle = Instant::now() + Duration::from_secs(10);
    while runner.pool.stats().desired != MIN.min(max) && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let publisher = shared.memory.publisher();
    let start = Instant::now();
    let topic = format!("{name}.in");
    let results: Vec<_> = futures::stream::iter(0..events)
        .map(|i| publisher.publish(message(&topic, &format!("{name}-{i}"))))
        .buffer_unordered(512)
        .collect()
        .await;
    for result in results {
        result?;
    }
    let mut reaction = None;
    let deadline = start + Duration::from_secs(600);
    while received.load(Ordering::Relaxed) < events {
        ensure!(
            Instant::now() < deadline,
            "{name}: not drained within 600 s"
        );
        if reaction.is_none() && max > MIN && runner.pool.stats().live >= max {
            reaction = Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(Row {
        name,
        slots: if max > MIN {
            format!("{MIN}..{max}")
        } else {
            format!("{max}")
        },
        reaction,
        drain: start.elapsed(),
    })
}

fn message(topic: &str, id: &str) -> OutboundMessage {
    let mut event = Event::new(id, "weir-bench/scaling", "weir.bench.scaling");
    event.data = Some(b"{}".to_vec());
    event.datacontenttype = Some("application/json".to_owned());
    let (headers, payload) = weir_schemas::encode_binary(&event, header_style(BrokerKind::Memory));
    OutboundMessage {
        topic: topic.to_owned(),
        key: None,
        headers,
        payload: Bytes::from(payload),
        dedup_id: Some(id.to_owned()),
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let full = args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--quick");
    let events = if full { 20_000 } else { 2_000 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    runtime.block_on(async {
        let config = format!(
            "{}{}",
            function("autoscaled", MIN, MAX),
            function("fixed", MIN, MIN)
        );
        let weir = InProcess::start(&config).await?;
        let rows = [
            measure(&weir, "autoscaled", MAX, events).await?,
            measure(&weir, "fixed", MIN, events).await?,
        ];
        println!(
            "\nscaling: {events} events, probe sleeping {SLEEP_MS} ms per event, memory bus\n"
        );
        println!("| pool       | slots | scale-up reaction (→ max) | drain time | events/s |");
        println!("|------------|-------|---------------------------|------------|----------|");
        for row in &rows {
            let reaction = row.reaction.map_or_else(
                || "n/a".to_owned(),
                |r| format!("{:.0} ms", r.as_secs_f64() * 1e3),
            );
            println!(
                "| {:<10} | {:<5} | {:<25} | {:>8.2} s | {:>8.0} |",
                row.name,
                row.slots,
                reaction,
                row.drain.as_secs_f64(),
                events as f64 / row.drain.as_secs_f64()
            );
        }
        if let Some(reaction) = rows[0].reaction {
            println!(
                "\ngoal: reaction ≤ 1 s → {}",
                if reaction <= Duration::from_secs(1) {
                    "met"
                } else {
                    "MISSED"
                }
            );
        }
        weir.shutdown().await
    })
}
