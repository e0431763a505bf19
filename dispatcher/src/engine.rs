//! The wasmtime host: the one module that touches wasmtime's `Engine` and `Config`.
//!
//! It compiles function components, checks that they implement the `weir:function` world,
//! keeps a cached `InstancePre` per function, and turns an instance into a sandboxed call:
//! - **time**: epoch interruption (a ticker bumps the epoch every [`EPOCH_TICK`]); a store's
//!   deadline is set before every call, and a wall-clock timeout backs it up for time spent in
//!   host calls, where epochs are not checked;
//! - **memory**: a per-store limiter; a breach traps and is remembered so it is classified as
//!   a memory-limit failure rather than a generic trap;
//! - **capabilities**: WASI p2 with no files, no network, no environment; stdout/stderr go to
//!   the logs; the `host` interface gives structured logs and per-function config values.
//!
//! It deliberately knows nothing about brokers, retries or outputs' destinations: a call
//! returns an [`InvocationError`] class and the caller (the runner) decides what happens next.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, Store, Trap};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../schemas/wit",
        world: "function",
        exports: { default: async },
    });
}

use bindings::weir::function::host::Level;
pub use bindings::weir::function::types::{
    Broker as WitBroker, Delivery as WitDelivery, Event as WitEvent, HandleError as WitHandleError,
    Output as WitOutput,
};

/// How often the epoch advances. Timeouts are enforced with this granularity.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Process-wide sandbox settings, fixed when the engine is built.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Maximum wasm stack of any call (an engine-wide setting in wasmtime).
    pub max_wasm_stack: usize,
    /// Upper bound of concurrently live instances across all functions; sizes the pooling
    /// allocator. Instantiation beyond it fails (and is classified) instead of exhausting memory.
    pub max_instances: u32,
    /// Largest linear memory any function may have.
    pub max_memory: usize,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            max_wasm_stack: 512 * 1024,
            max_instances: 256,
            max_memory: 64 * 1024 * 1024,
        }
    }
}

/// Why a component could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading module {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("module {path} is not a valid WebAssembly component: {reason}")]
    Compile { path: String, reason: String },
    #[error("module {path} does not implement the weir:function world: {reason}")]
    World { path: String, reason: String },
}

/// The class of a failed invocation. Every variant but `Reject` flows into the retry policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvocationError {
    /// The function asked for a retry (transient).
    Retry(String),
    /// The function rejected the event (permanent): dead-letter at once.
    Reject(String),
    /// The call ran past its timeout.
    Timeout(Duration),
    /// The guest trapped (unreachable, out-of-bounds, stack overflow...).
    Trap(String),
    /// The guest tried to grow memory past its cap.
    MemoryLimit(usize),
    /// The outputs broke a rule: a topic not allowed, too many outputs, too many bytes.
    OutputRule(String),
    /// A fresh instance could not be created.
    Instantiate(String),
}

impl InvocationError {
    /// A short stable label for metrics and logs.
    pub fn outcome(&self) -> &'static str {
        match self {
            InvocationError::Retry(_) => "retry",
            InvocationError::Reject(_) => "reject",
            InvocationError::Timeout(_) => "timeout",
            InvocationError::Trap(_) => "trap",
            InvocationError::MemoryLimit(_) => "memory_limit",
            InvocationError::OutputRule(_) => "output_rule",
            InvocationError::Instantiate(_) => "instantiate",
        }
    }

    /// Whether the instance that produced this error may be reused. Anything that interrupted
    /// the guest mid-flight leaves it in an unknown state.
    pub fn instance_reusable(&self) -> bool {
        matches!(
            self,
            InvocationError::Retry(_) | InvocationError::Reject(_) | InvocationError::OutputRule(_)
        )
    }
}

impl fmt::Display for InvocationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvocationError::Retry(m) => write!(f, "function asked to retry: {m}"),
            InvocationError::Reject(m) => write!(f, "function rejected the event: {m}"),
            InvocationError::Timeout(t) => {
                write!(f, "timed out after {}", humantime::format_duration(*t))
            }
            InvocationError::Trap(m) => write!(f, "trapped: {m}"),
            InvocationError::MemoryLimit(cap) => {
                write!(
                    f,
                    "memory limit of {} exceeded",
                    bytesize::ByteSize(*cap as u64)
                )
            }
            InvocationError::OutputRule(m) => write!(f, "output refused: {m}"),
            InvocationError::Instantiate(m) => write!(f, "could not start an instance: {m}"),
        }
    }
}

/// The wasmtime engine and its epoch ticker. Clone is cheap.
#[derive(Clone)]
pub struct WasmEngine {
    engine: Engine,
    linker: Arc<Linker<HostState>>,
    _ticker: Arc<EpochTicker>,
}

impl fmt::Debug for WasmEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WasmEngine").finish_non_exhaustive()
    }
}

struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, AtomicOrdering::Relaxed);
    }
}

impl WasmEngine {
    pub fn new(settings: &EngineSettings) -> anyhow::Result<Self> {
        let engine = match Engine::new(&wasm_config(settings, true)) {
            Ok(engine) => engine,
            Err(pooling_error) => {
                // The pooling allocator reserves virtual memory up front; where that is not
                // allowed (tight ulimits), on-demand allocation still works, only slower.
                tracing::warn!(error = %pooling_error, "pooling allocator unavailable, using on-demand instance allocation");
                Engine::new(&wasm_config(settings, false)).map_err(wasm_error)?
            }
        };
        let mut linker = Linker::<HostState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(wasm_error)?;
        bindings::Function::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(wasm_error)?;

        let stop = Arc::new(AtomicBool::new(false));
        let ticker_engine = engine.clone();
        let ticker_stop = stop.clone();
        // A plain thread, not a tokio task: the epoch must advance even when every runtime
        // worker is busy, which is exactly when a runaway guest must be stopped.
        std::thread::Builder::new()
            .name("weir-epoch".into())
            .spawn(move || {
                while !ticker_stop.load(AtomicOrdering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticker_engine.increment_epoch();
                }
            })?;
        Ok(Self {
            engine,
            linker: Arc::new(linker),
            _ticker: Arc::new(EpochTicker { stop }),
        })
    }

    /// Compile a component and check that it implements the world.
    pub fn load(&self, path: &Path) -> Result<FunctionModule, LoadError> {
        let display = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: display.clone(),
            source,
        })?;
        self.load_bytes(&display, &bytes)
    }

    pub fn load_bytes(&self, name: &str, bytes: &[u8]) -> Result<FunctionModule, LoadError> {
        let component = Component::new(&self.engine, bytes).map_err(|e| LoadError::Compile {
            path: name.to_owned(),
            reason: format!("{e:#}"),
        })?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| LoadError::World {
                path: name.to_owned(),
                reason: format!("{e:#}"),
            })?;
        let pre = bindings::FunctionPre::new(pre).map_err(|e| LoadError::World {
            path: name.to_owned(),
            reason: format!("{e:#}"),
        })?;
        let digest = hex::encode(Sha256::digest(bytes));
        Ok(FunctionModule {
            pre,
            sha256: Arc::from(digest),
            _ticker: self._ticker.clone(),
        })
    }
}

fn wasm_config(settings: &EngineSettings, pooling: bool) -> wasmtime::Config {
    let mut config = wasmtime::Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    config.max_wasm_stack(settings.max_wasm_stack);
    // Fibers need room for the guest's stack plus the host functions it calls.
    config.async_stack_size(settings.max_wasm_stack + 1024 * 1024);
    if pooling {
        let mut pool = wasmtime::PoolingAllocationConfig::default();
        let instances = settings.max_instances.max(1);
        pool.total_component_instances(instances);
        // A Rust wasip2 component has one memory but several small core instances (adapters).
        pool.total_core_instances(instances.saturating_mul(8));
        pool.total_memories(instances.saturating_mul(2));
        pool.total_tables(instances.saturating_mul(8));
        pool.total_stacks(instances);
        pool.max_memory_size(settings.max_memory);
        config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
    }
    config
}

/// A compiled function component, ready to instantiate.
#[derive(Clone)]
pub struct FunctionModule {
    pre: bindings::FunctionPre<HostState>,
    sha256: Arc<str>,
    /// Timeouts depend on the epoch advancing: whoever can still start an instance keeps the
    /// ticker alive, even after the `WasmEngine` that loaded the module is gone.
    _ticker: Arc<EpochTicker>,
}

impl fmt::Debug for FunctionModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FunctionModule")
            .field("sha256", &self.sha256)
            .finish()
    }
}

/// Per-function limits and identity, fixed at load.
#[derive(Debug, Clone)]
pub struct SandboxLimits {
    pub timeout: Duration,
    pub memory: usize,
}

/// What a function sees of the host.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: MemoryLimiter,
    function: Arc<str>,
    config: Arc<BTreeMap<String, String>>,
    /// Id of the event being handled, for log attribution.
    current_event: String,
    /// When the current call (or instantiation) times out; checked at every epoch tick. A
    /// deadline in time rather than a count of ticks: the first tick after a call starts comes
    /// anywhere within one tick, so counting ticks could stop a guest up to a tick early.
    deadline: Instant,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl bindings::weir::function::types::Host for HostState {}

impl bindings::weir::function::host::Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        let message = &message[..message.floor_char_boundary(MAX_LOG_LINE)];
        let (function, event) = (&*self.function, self.current_event.as_str());
        match level {
            Level::Trace => tracing::trace!(target: "weir::function", function, event, "{message}"),
            Level::Debug => tracing::debug!(target: "weir::function", function, event, "{message}"),
            Level::Info => tracing::info!(target: "weir::function", function, event, "{message}"),
            Level::Warn => tracing::warn!(target: "weir::function", function, event, "{message}"),
            Level::Error => tracing::error!(target: "weir::function", function, event, "{message}"),
        }
    }

    fn config_get(&mut self, key: String) -> Option<String> {
        self.config.get(&key).cloned()
    }
}

const MAX_LOG_LINE: usize = 4096;

/// Caps linear memory and remembers a breach, so that the trap it causes is classified as a
/// memory-limit failure.
struct MemoryLimiter {
    cap: usize,
    breached: bool,
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.cap {
            self.breached = true;
            // An error (not `Ok(false)`) traps at once: a guest that ignores a failed grow
            // would otherwise keep running on an allocation it never got.
            wasmtime::bail!(
                "memory limit of {} bytes exceeded (wanted {desired})",
                self.cap
            );
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

const MAX_TABLE_ELEMENTS: usize = 100_000;

/// A live instance: its own Store, reused one event at a time until it fails, is recycled or
/// idles out.
pub struct Instance {
    store: Store<HostState>,
    /// A running guest is only interruptible while the epoch advances.
    _ticker: Arc<EpochTicker>,
    bindings: bindings::Function,
    limits: SandboxLimits,
    invocations: u64,
    /// When its last call ended (or it was made): the idle reaper's clock.
    pub(crate) last_used: Instant,
}

impl fmt::Debug for Instance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Instance")
            .field("invocations", &self.invocations)
            .finish()
    }
}

impl FunctionModule {
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Start a fresh instance with its own Store.
    pub async fn instantiate(
        &self,
        function: Arc<str>,
        config: Arc<BTreeMap<String, String>>,
        limits: SandboxLimits,
    ) -> Result<Instance, InvocationError> {
        let mut wasi = WasiCtx::builder();
        // No preopened directories, no environment, no arguments, no sockets: only clocks,
        // random and stdio (to the logs).
        wasi.stdout(LogStream {
            function: function.clone(),
            stream: "stdout",
        });
        wasi.stderr(LogStream {
            function: function.clone(),
            stream: "stderr",
        });
        wasi.allow_tcp(false);
        wasi.allow_udp(false);
        wasi.allow_ip_name_lookup(false);
        let state = HostState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limits: MemoryLimiter {
                cap: limits.memory,
                breached: false,
            },
            function,
            config,
            current_event: String::new(),
            deadline: Instant::now() + limits.timeout,
        };
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|s| &mut s.limits);
        // Every tick the guest yields to the executor, so a busy guest never holds a runtime
        // worker for longer than one tick (other functions and the HTTP server keep running on
        // a 2-core machine); when its ticks run out it is interrupted, which is the timeout.
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|ctx| {
            Ok(if Instant::now() >= ctx.data().deadline {
                wasmtime::UpdateDeadline::Interrupt
            } else {
                wasmtime::UpdateDeadline::Yield(1)
            })
        });
        let instantiate = self.pre.instantiate_async(&mut store);
        let bindings =
            match tokio::time::timeout(limits.timeout + EPOCH_TICK * 10, instantiate).await {
                Ok(Ok(bindings)) => bindings,
                Ok(Err(e)) => return Err(classify_trap(&store, &limits, &e)),
                Err(_) => return Err(InvocationError::Timeout(limits.timeout)),
            };
        Ok(Instance {
            store,
            _ticker: self._ticker.clone(),
            bindings,
            limits,
            invocations: 0,
            last_used: Instant::now(),
        })
    }
}

/// wasmtime has its own error type; the rest of the dispatcher speaks anyhow.
fn wasm_error(e: wasmtime::Error) -> anyhow::Error {
    anyhow::anyhow!("{e:#}")
}

fn classify_trap(
    store: &Store<HostState>,
    limits: &SandboxLimits,
    e: &wasmtime::Error,
) -> InvocationError {
    if store.data().limits.breached {
        return InvocationError::MemoryLimit(limits.memory);
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => InvocationError::Timeout(limits.timeout),
        Some(trap) => InvocationError::Trap(trap.to_string()),
        None => InvocationError::Trap(format!("{e:#}")),
    }
}

impl Instance {
    pub fn invocations(&self) -> u64 {
        self.invocations
    }

    /// Run the function on one event. After an error whose class is not
    /// [`InvocationError::instance_reusable`], the instance must be dropped.
    pub async fn handle(
        &mut self,
        event: &WitEvent,
        delivery: &WitDelivery,
    ) -> Result<Vec<WitOutput>, InvocationError> {
        self.invocations += 1;
        // The deadline and the backstop timeout start from one clock read.
        let started = Instant::now();
        self.store.data_mut().current_event.clone_from(&event.id);
        self.store.data_mut().deadline = started + self.limits.timeout;
        self.store.set_epoch_deadline(1);
        let call =
            self.bindings
                .weir_function_handler()
                .call_handle(&mut self.store, event, delivery);
        // The epoch deadline stops guest code; this backs it up for time spent in host calls
        // (e.g. a WASI sleep), where epochs are not checked.
        let backstop =
            tokio::time::Instant::from_std(started + self.limits.timeout + EPOCH_TICK * 10);
        let result = tokio::time::timeout_at(backstop, call).await;
        // After the call, not at its start: a call that ran longer than the idle timeout must
        // not leave its instance due for reaping the moment it is checked back in.
        self.last_used = Instant::now();
        match result {
            Err(_) => Err(InvocationError::Timeout(self.limits.timeout)),
            Ok(Err(e)) => Err(classify_trap(&self.store, &self.limits, &e)),
            Ok(Ok(Ok(outputs))) => Ok(outputs),
            Ok(Ok(Err(WitHandleError::Retry(m)))) => Err(InvocationError::Retry(m)),
            Ok(Ok(Err(WitHandleError::Reject(m)))) => Err(InvocationError::Reject(m)),
        }
    }
}

/// Guest stdout/stderr, line by line into the logs.
#[derive(Clone)]
struct LogStream {
    function: Arc<str>,
    stream: &'static str,
}

impl wasmtime_wasi::cli::IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for LogStream {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl tokio::io::AsyncWrite for LogStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let text = String::from_utf8_lossy(&buf[..buf.len().min(MAX_LOG_LINE)]);
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            tracing::info!(target: "weir::function", function = &*self.function, stream = self.stream, "{line}");
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The envelope as the guest sees it.
pub fn to_wit_event(event: &weir_schemas::Event) -> WitEvent {
    WitEvent {
        id: event.id.clone(),
        source: event.source.clone(),
        type_: event.ty.clone(),
        specversion: event.specversion.clone(),
        subject: event.subject.clone(),
        time: event.time.clone(),
        datacontenttype: event.datacontenttype.clone(),
        dataschema: event.dataschema.clone(),
        data: event.data.clone(),
        extensions: event
            .extensions
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// The event as the guest sees it, its fields moved out of `event` (left empty until
/// [`restore_event`] puts them back): an invocation copies nothing of the event on the host.
pub fn take_wit_event(event: &mut weir_schemas::Event) -> WitEvent {
    use std::mem::take;
    WitEvent {
        id: take(&mut event.id),
        source: take(&mut event.source),
        type_: take(&mut event.ty),
        specversion: take(&mut event.specversion),
        subject: event.subject.take(),
        time: event.time.take(),
        datacontenttype: event.datacontenttype.take(),
        dataschema: event.dataschema.take(),
        data: event.data.take(),
        extensions: take(&mut event.extensions).into_iter().collect(),
    }
}

/// Puts back what [`take_wit_event`] took.
pub fn restore_event(event: &mut weir_schemas::Event, taken: WitEvent) {
    *event = from_wit_event(taken);
}

/// The envelope a guest returned, back in Weir's own type.
pub fn from_wit_event(event: WitEvent) -> weir_schemas::Event {
    weir_schemas::Event {
        id: event.id,
        source: event.source,
        ty: event.type_,
        specversion: event.specversion,
        subject: event.subject,
        time: event.time,
        datacontenttype: event.datacontenttype,
        dataschema: event.dataschema,
        data: event.data,
        extensions: event.extensions.into_iter().collect(),
    }
}

/// The broker as the guest sees it.
pub fn to_wit_broker(broker: weir_broker_bridge::BrokerKind) -> WitBroker {
    match broker {
        weir_broker_bridge::BrokerKind::Memory => WitBroker::Memory,
        weir_broker_bridge::BrokerKind::Nats => WitBroker::Nats,
        weir_broker_bridge::BrokerKind::JetStream => WitBroker::Jetstream,
        weir_broker_bridge::BrokerKind::Kafka => WitBroker::Kafka,
    }
}
