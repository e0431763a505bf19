//! Per-event host overhead and instance start time, against baselines measured in the same run.
//!
//! - **raw call**: the `noop` component called directly through wasmtime (bindgen, one warm
//!   Store, no Weir code): the floor any host pays.
//! - **weir instance**: the same call through Weir's `Instance::handle` (epoch deadline, timeout
//!   guard, log attribution).
//! - **memory bus → noop → ack**: the full dispatcher path: publish to the embedded bus, decode,
//!   invoke on a warm pooled instance, stamp outputs, ack.
//! - **fresh instance**: Store + instantiate from the cached `InstancePre` (pooling allocator).
//!
//! `cargo bench -p weir-dispatcher --bench host_overhead` prints the table. Under `cargo test`
//! (no `--bench` argument) it runs a tiny smoke version so the code cannot rot.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use weir_broker_bridge::{BrokerKind, OutboundMessage};
use weir_dispatcher::config;
use weir_dispatcher::engine::{self, SandboxLimits, WasmEngine};
use weir_dispatcher::runtime::Runtime;

/// The weir binary's allocator, so Weir runs here as it does in production; the native
/// baselines in this process use it too.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod raw {
    wasmtime::component::bindgen!({
        path: "../schemas/wit",
        world: "function",
        exports: { default: async },
    });
}

struct RawState {
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for RawState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl raw::weir::function::types::Host for RawState {}
impl raw::weir::function::host::Host for RawState {
    fn log(&mut self, _level: raw::weir::function::host::Level, _message: String) {}
    fn config_get(&mut self, _key: String) -> Option<String> {
        None
    }
}

fn noop_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../functions/target/wasm32-wasip2/release/noop.wasm")
}

fn sample_event() -> weir_schemas::Event {
    let mut event = weir_schemas::Event::new("bench-1", "weir://bench", "bench.event");
    event.data = Some(br#"{"amount":42}"#.to_vec());
    event
}

async fn raw_call_per_event(bytes: &[u8], events: u32) -> anyhow::Result<Duration> {
    let mut config = wasmtime::Config::new();
    config.wasm_component_model(true);
    let engine = Engine::new(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let component = Component::new(&engine, bytes).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut linker = Linker::<RawState>::new(&engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(|e| anyhow::anyhow!("{e}"))?;
    raw::Function::add_to_linker::<RawState, HasSelf<RawState>>(&mut linker, |s| s)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut store = Store::new(
        &engine,
        RawState {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
        },
    );
    let bindings = raw::Function::instantiate_async(&mut store, &component, &linker)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let event = sample_event();
    let wit_event = raw::weir::function::types::Event {
        id: event.id.clone(),
        source: event.source.clone(),
        type_: event.ty.clone(),
        specversion: event.specversion.clone(),
        subject: None,
        time: None,
        datacontenttype: None,
        dataschema: None,
        data: event.data.clone(),
        extensions: Vec::new(),
    };
    let delivery = raw::weir::function::types::Delivery {
        broker: raw::weir::function::types::Broker::Memory,
        topic: "bench".into(),
        key: None,
        attempt: 1,
    };
    let started = Instant::now();
    for _ in 0..events {
        let result = bindings
            .weir_function_handler()
            .call_handle(&mut store, &wit_event, &delivery)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        anyhow::ensure!(result.is_ok(), "noop failed");
    }
    Ok(started.elapsed() / events)
}

async fn weir_instance_per_event(
    engine: &WasmEngine,
    events: u32,
) -> anyhow::Result<(Duration, Vec<Duration>)> {
    let module = engine.load(&noop_path())?;
    let limits = SandboxLimits {
        timeout: Duration::from_secs(5),
        memory: 64 << 20,
    };
    let mut starts = Vec::new();
    for _ in 0..events.clamp(10, 500) {
        let started = Instant::now();
        let instance = module
            .instantiate(Arc::from("noop"), Arc::default(), limits.clone())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        starts.push(started.elapsed());
        drop(instance);
    }
    let mut instance = module
        .instantiate(Arc::from("noop"), Arc::default(), limits)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let event = engine::to_wit_event(&sample_event());
    let delivery = engine::WitDelivery {
        broker: engine::to_wit_broker(BrokerKind::Memory),
        topic: "bench".into(),
        key: None,
        attempt: 1,
    };
    let started = Instant::now();
    for _ in 0..events {
        instance
            .handle(&event, &delivery)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    starts.sort();
    Ok((started.elapsed() / events, starts))
}

async fn memory_bus_per_event(events: u32, instances: u32) -> anyhow::Result<Duration> {
    let dir = noop_path().parent().map(PathBuf::from).unwrap_or_default();
    let toml = format!(
        r#"
[http]
listen = "127.0.0.1:0"
[brokers.memory]
history = 1000
max_pending = {pending}
[[functions]]
name = "noop"
module = "noop.wasm"
[functions.trigger]
broker = "memory"
topic = "bench.in"
ordering = "none"
[functions.scaling]
min = {instances}
max = {instances}
"#,
        pending = events as usize + 10,
    );
    let config = config::from_toml_str(&toml, &dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let runtime = Runtime::start(config).await?;
    let shared = runtime.shared();
    let (headers, payload) =
        weir_schemas::encode_binary(&sample_event(), weir_schemas::HeaderStyle::Dash);
    let runner = shared
        .function("noop")
        .ok_or_else(|| anyhow::anyhow!("noop not running"))?
        .clone();
    let started = Instant::now();
    for i in 0..events {
        let mut headers = headers.clone();
        for (name, value) in &mut headers {
            if name == "ce-id" {
                *value = format!("bench-{i}");
            }
        }
        shared.memory.publish(OutboundMessage {
            topic: "bench.in".into(),
            key: None,
            headers,
            payload: payload.clone().into(),
            dedup_id: None,
        })?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while runner
        .counters
        .succeeded
        .load(std::sync::atomic::Ordering::Relaxed)
        < u64::from(events)
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "memory bus run did not finish in 120 s"
        );
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let elapsed = started.elapsed();
    runtime.shutdown().await;
    Ok(elapsed / events)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn main() -> anyhow::Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let events: u32 = if full { 200_000 } else { 200 };
    let bytes = std::fs::read(noop_path()).map_err(|e| {
        anyhow::anyhow!(
            "{}: {e} (run `make functions` first)",
            noop_path().display()
        )
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let engine = WasmEngine::new(&engine::EngineSettings::default())?;
        // Warm-up runs, so that lazy initialisation is not billed to whichever goes first.
        raw_call_per_event(&bytes, events / 10 + 1).await?;
        let raw = raw_call_per_event(&bytes, events).await?;
        let (weir, starts) = weir_instance_per_event(&engine, events).await?;
        let bus_one = memory_bus_per_event(events, 1).await?;
        let bus_two = memory_bus_per_event(events, 2).await?;
        let ratio = |d: Duration| d.as_secs_f64() / raw.as_secs_f64();
        let rate = |d: Duration| 1.0 / d.as_secs_f64();
        println!(
            "\nWeir host overhead ({events} events, noop component; {} cores)",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        println!(
            "{:<44} {:>12} {:>14} {:>10}",
            "path", "per event", "events/s", "× raw"
        );
        for (name, d) in [
            ("raw wasmtime call (baseline)", raw),
            ("weir Instance::handle", weir),
            ("memory bus → noop → ack, 1 instance", bus_one),
            ("memory bus → noop → ack, 2 instances", bus_two),
        ] {
            println!(
                "{name:<44} {:>12} {:>14.0} {:>10.2}",
                format!("{:.2?}", d),
                rate(d),
                ratio(d)
            );
        }
        println!(
            "{:<44} p50 {:.2?}  p99 {:.2?}  ({} starts)",
            "fresh instance (Store + instantiate)",
            percentile(&starts, 0.5),
            percentile(&starts, 0.99),
            starts.len()
        );
        println!(
            "host overhead per event on the memory bus (1 instance): {:.2?}",
            bus_one.saturating_sub(raw)
        );
        Ok(())
    })
}
