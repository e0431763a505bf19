//! Assembling a running Weir from a validated [`Config`]: the engine, the modules, the
//! transports, one [`FunctionRunner`] per function, and their background chores (idle reaping,
//! lag sampling). Also the module checks `weir check` shares with start-up.
//!
//! It holds no policy of its own: what happens to an event is [`crate::runner`]'s business.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use weir_broker_bridge::kafka::{KafkaPublisher, KafkaTransport};
use weir_broker_bridge::memory::{MemoryBus, SubscribeOptions};
use weir_broker_bridge::nats::{JetStreamConsumerOptions, NatsTransport};
use weir_broker_bridge::{BrokerKind, FlowControl, LagProbe, Publisher, Subscription};

use crate::chain::OutputRules;
use crate::config::{Config, ConfigErrors, FunctionConfig};
use crate::engine::{EngineSettings, FunctionModule, SandboxLimits, WasmEngine};
use crate::pool::{InstancePool, PoolSettings};
use crate::retry::RetryPolicy;
use crate::runner::{FunctionRunner, FunctionSpec};
use crate::scaling;
use crate::telemetry;

/// How long shutdown waits for in-flight invocations before handing them back.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How often lag is sampled (DESIGN.md: ≤ 250 ms).
pub const LAG_TICK: Duration = Duration::from_millis(250);

/// The engine settings a configuration needs.
pub fn engine_settings(config: &Config) -> EngineSettings {
    let defaults = EngineSettings::default();
    let max_stack = config
        .functions
        .iter()
        .map(|f| f.max_stack.as_u64() as usize)
        .max();
    let max_memory = config
        .functions
        .iter()
        .map(|f| f.memory.as_u64() as usize)
        .max();
    let instances: u32 = config.functions.iter().map(|f| f.scaling.max).sum();
    EngineSettings {
        max_wasm_stack: max_stack.unwrap_or(defaults.max_wasm_stack),
        // Headroom for per-event isolation, where an instance is replaced while the slot is
        // still held, and for `weir check`'s trial instantiation.
        max_instances: instances.saturating_add(16),
        max_memory: max_memory.unwrap_or(defaults.max_memory),
    }
}

/// Compile every function's module and check it implements the world; every failure is
/// reported with its key path.
pub fn load_modules(
    engine: &WasmEngine,
    config: &Config,
) -> Result<Vec<FunctionModule>, ConfigErrors> {
    let mut errors = ConfigErrors::new();
    let mut modules = Vec::new();
    for (index, function) in config.functions.iter().enumerate() {
        match engine.load(&function.module) {
            Ok(module) => modules.push(module),
            Err(e) => errors.push(format!("functions[{index}].module"), e.to_string()),
        }
    }
    errors.into_result(modules)
}

/// What the HTTP layer and the CLI see of a running Weir.
pub struct Shared {
    pub config: Config,
    pub memory: MemoryBus,
    pub functions: Vec<Arc<FunctionRunner>>,
    transports: Transports,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("functions", &self.functions.len())
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub fn function(&self, name: &str) -> Option<&Arc<FunctionRunner>> {
        self.functions.iter().find(|f| &*f.spec.name == name)
    }

    /// The broker `topic` lives on in this configuration: see [`Config::topic_broker`].
    pub fn topic_broker(&self, topic: &str) -> BrokerKind {
        self.config.topic_broker(topic)
    }

    /// Where an event posted to `topic` over HTTP goes: see [`Shared::topic_broker`].
    pub fn ingress(&self, topic: &str) -> anyhow::Result<(BrokerKind, Arc<dyn Publisher>)> {
        let broker = self.topic_broker(topic);
        Ok((broker, self.transports.publisher(broker)?))
    }
}

/// A running Weir.
pub struct Runtime {
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    runners: JoinSet<()>,
    chores: JoinSet<()>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("functions", &self.shared.functions.len())
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// Load, connect, subscribe and start every function.
    pub async fn start(config: Config) -> anyhow::Result<Runtime> {
        let engine =
            WasmEngine::new(&engine_settings(&config)).context("starting the wasm engine")?;
        let modules = load_modules(&engine, &config).map_err(|e| anyhow::anyhow!("{e}"))?;
        let memory = MemoryBus::new(config.brokers.memory);
        let transports = Transports::connect(&config, &memory).await?;

        let shutdown = CancellationToken::new();
        let mut runners = JoinSet::new();
        let mut chores = JoinSet::new();
        let mut functions = Vec::new();
        for (function, module) in config.functions.iter().zip(modules) {
            let name: Arc<str> = Arc::from(function.name.as_str());
            let pool = Arc::new(InstancePool::new(
                name.clone(),
                module,
                Arc::new(function.config.clone()),
                SandboxLimits {
                    timeout: function.timeout,
                    memory: function.memory.as_u64() as usize,
                },
                PoolSettings {
                    min: function.scaling.min as usize,
                    max: function.scaling.max.max(1) as usize,
                    idle_timeout: function.scaling.idle_timeout,
                    max_invocations: function.scaling.max_invocations,
                    isolation: function.isolation,
                },
            ));
            pool.prewarm().await.map_err(|e| {
                anyhow::anyhow!(
                    "function {}: starting its minimum instances: {e}",
                    function.name
                )
            })?;
            let runner = Arc::new(FunctionRunner::new(
                spec(function, name.clone()),
                pool.clone(),
                transports.publisher(function.output_broker)?,
                transports.publisher(function.dead_letter.broker)?,
            ));
            let subscription = transports.subscribe(function, pool.stats().slots).await?;
            if let Some(flow) = subscription.flow_control() {
                chores.spawn(follow_slots(pool.clone(), flow, shutdown.child_token()));
            }
            let probe = subscription.lag_probe();
            if let Some(probe) = probe.clone() {
                chores.spawn(sample_lag(
                    probe,
                    name.clone(),
                    function.trigger.broker,
                    shutdown.child_token(),
                ));
            }
            chores.spawn(scaling::control_loop(
                name.clone(),
                function.trigger.broker,
                pool.clone(),
                probe,
                function.scaling.clone(),
                shutdown.child_token(),
            ));
            tracing::info!(
                function = %function.name,
                broker = %function.trigger.broker,
                topic = %function.trigger.topic,
                module = %function.module.display(),
                "function started"
            );
            runners.spawn(runner.clone().run(subscription, shutdown.child_token()));
            chores.spawn(reap_idle(pool, shutdown.child_token()));
            functions.push(runner);
        }
        let shared = Arc::new(Shared {
            config,
            memory,
            functions,
            transports,
        });
        Ok(Runtime {
            shared,
            shutdown,
            runners,
            chores,
        })
    }

    /// Stop fetching, finish or hand back in-flight work, settle what finished, return.
    pub async fn shutdown(mut self) {
        self.shutdown.cancel();
        while self.runners.join_next().await.is_some() {}
        self.chores.abort_all();
        while self.chores.join_next().await.is_some() {}
        self.shared.transports.close().await;
        tracing::info!("all functions stopped");
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// A token cancelled when shutdown begins (for the HTTP server and other companions).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

fn spec(function: &FunctionConfig, name: Arc<str>) -> FunctionSpec {
    FunctionSpec {
        name,
        trigger_broker: function.trigger.broker,
        trigger_topic: function.trigger.topic.clone(),
        format: function.trigger.format,
        retry: RetryPolicy {
            max_attempts: function.retry.max_attempts,
            initial_delay: function.retry.initial_delay,
            multiplier: function.retry.multiplier,
            max_delay: function.retry.max_delay,
            jitter: function.retry.jitter,
            max_age: function.retry.max_age,
        },
        rules: OutputRules {
            allowed_topics: function.outputs.clone(),
            max_outputs: function.max_outputs as usize,
            max_output_bytes: function.max_output_bytes.as_u64() as usize,
        },
        hop_limit: function.hop_limit,
        dead_letter_topic: function.dead_letter.topic.clone(),
        shutdown_grace: SHUTDOWN_GRACE,
    }
}

/// Warns at start-up of every destination that needs a stream and has none:
/// - a JetStream publish no stream captures can only fail, and for a dead-letter topic the
///   first failure pauses its function's lane;
/// - a dead-letter record published on a core subject no stream captures reaches only the
///   subscribers listening at that moment: with none, it is gone, and nothing says so.
///
/// Not an error: the stream may be created after Weir starts (a paused lane resumes then, and
/// nothing is lost), and only the server knows streams this configuration does not declare.
async fn warn_of_uncaptured_subjects(transport: &NatsTransport, config: &Config) {
    let mut checked = std::collections::HashSet::new();
    for function in &config.functions {
        let mut destinations = Vec::new();
        match function.dead_letter.broker {
            BrokerKind::JetStream => destinations.push((
                function.dead_letter.topic.as_str(),
                "dead-letter topic",
                "its first dead letter will pause the function's lane until a stream captures it",
            )),
            BrokerKind::Nats => destinations.push((
                function.dead_letter.topic.as_str(),
                "core NATS dead-letter topic",
                "a dead letter reaches only subscribers listening at that moment and is lost \
                 without one (or set dead_letter.broker = \"jetstream\")",
            )),
            BrokerKind::Memory | BrokerKind::Kafka => {}
        }
        if function.output_broker == BrokerKind::JetStream {
            for topic in &function.outputs {
                destinations.push((
                    topic.as_str(),
                    "output topic",
                    "its outputs will fail, be retried and then dead-lettered",
                ));
            }
        }
        for (topic, role, consequence) in destinations {
            if !checked.insert(topic.to_owned()) {
                continue;
            }
            match transport.stream_capturing(topic).await {
                Ok(Some(_)) => {}
                Ok(None) => tracing::warn!(
                    function = %function.name,
                    topic,
                    "no JetStream stream captures {topic}, a {role} of function {}: {consequence}; \
                     declare a stream whose subjects include it ([[brokers.nats_streams]])",
                    function.name
                ),
                Err(err) => tracing::warn!(
                    function = %function.name,
                    topic,
                    error = %err,
                    "could not check that a JetStream stream captures {topic}"
                ),
            }
        }
    }
}

/// Whether anything in `config` needs JetStream: a declared stream, or a function's trigger,
/// outputs or dead letters on it.
fn uses_jetstream(config: &Config) -> bool {
    !config.brokers.nats_streams.is_empty()
        || config.functions.iter().any(|function| {
            function.trigger.broker == BrokerKind::JetStream
                || function.output_broker == BrokerKind::JetStream
                || function.dead_letter.broker == BrokerKind::JetStream
        })
}

/// Warns at start-up of every function whose outputs go to NATS and may be larger than the
/// server takes: `max_output_bytes` above the server's `max_payload`. Such an output passes
/// Weir's own rule, is refused by the server, retried and dead-lettered; said once here
/// rather than found on the first large output. Equal limits (1 MiB, both defaults) are not
/// warned of, though the headers count against `max_payload` too: that would warn of every
/// function of a default configuration.
fn warn_of_outputs_over_max_payload(transport: &NatsTransport, config: &Config) {
    let max_payload = transport.max_payload();
    for function in &config.functions {
        let to_nats = matches!(
            function.output_broker,
            BrokerKind::Nats | BrokerKind::JetStream
        );
        let max_output = function.max_output_bytes.as_u64();
        if to_nats && !function.outputs.is_empty() && max_output > max_payload as u64 {
            tracing::warn!(
                function = %function.name,
                max_output_bytes = max_output,
                max_payload,
                "function {} may publish an output of up to {} of data (max_output_bytes, per \
                 invocation), but the NATS server takes messages of up to {} (max_payload, \
                 headers included): a larger output will be refused by the server, retried \
                 and dead-lettered; lower max_output_bytes or raise the server's max_payload",
                function.name,
                function.max_output_bytes,
                bytesize::ByteSize::b(max_payload as u64)
            );
        }
    }
}

/// The brokers this configuration uses.
struct Transports {
    memory: MemoryBus,
    nats: Option<NatsTransport>,
    kafka: Option<(KafkaTransport, Arc<KafkaPublisher>)>,
}

impl Transports {
    async fn connect(config: &Config, memory: &MemoryBus) -> anyhow::Result<Self> {
        let nats = match &config.brokers.nats {
            None => None,
            Some(nats_config) => {
                let started = tokio::time::Instant::now();
                let transport = NatsTransport::connect_at_startup(nats_config)
                    .await
                    .with_context(|| {
                        format!("connecting to NATS at {}", nats_config.servers.join(", "))
                    })?;
                if uses_jetstream(config) {
                    // One start-up wait in all, connecting included.
                    let left = nats_config.startup_wait.saturating_sub(started.elapsed());
                    transport.wait_for_jetstream(left).await.with_context(|| {
                        format!(
                            "waiting for JetStream at {}",
                            nats_config.servers.join(", ")
                        )
                    })?;
                }
                // The bridge logs (and counts) a created or differing stream; an existing
                // stream is never changed behind its operator's back.
                for stream in &config.brokers.nats_streams {
                    let left = nats_config.startup_wait.saturating_sub(started.elapsed());
                    transport
                        .ensure_stream_at_startup(stream, left)
                        .await
                        .with_context(|| format!("declaring JetStream stream {}", stream.name))?;
                }
                // Streams made elsewhere that triggers bind to: a cluster may answer for the
                // declared ones and not yet for these.
                let mut waited_for = std::collections::HashSet::new();
                for function in &config.functions {
                    let Some(jetstream) = &function.trigger.jetstream else {
                        continue;
                    };
                    let stream = jetstream.stream.as_str();
                    let declared = config.brokers.nats_streams.iter().any(|s| s.name == stream);
                    if declared || !waited_for.insert(stream) {
                        continue;
                    }
                    let left = nats_config.startup_wait.saturating_sub(started.elapsed());
                    transport
                        .wait_for_stream(stream, left)
                        .await
                        .with_context(|| format!("waiting for JetStream stream {stream}"))?;
                }
                warn_of_uncaptured_subjects(&transport, config).await;
                warn_of_outputs_over_max_payload(&transport, config);
                Some(transport)
            }
        };
        let kafka = match &config.brokers.kafka {
            None => None,
            Some(kafka_config) => {
                let transport = KafkaTransport::connect(kafka_config)
                    .await
                    .with_context(|| {
                        format!("connecting to Kafka at {}", kafka_config.bootstrap)
                    })?;
                if kafka_config.create_topics {
                    for topic in kafka_topics(config) {
                        transport
                            .ensure_topic_if_configured(&topic)
                            .await
                            .with_context(|| format!("creating Kafka topic {topic}"))?;
                    }
                }
                let publisher = Arc::new(
                    transport
                        .publisher()
                        .context("creating the Kafka producer")?,
                );
                Some((transport, publisher))
            }
        };
        Ok(Self {
            memory: memory.clone(),
            nats,
            kafka,
        })
    }

    /// Sends what is still queued on broker connections (NATS acks and core publishes are
    /// queued, not confirmed one by one). Bounded: a broker that does not answer is given up on.
    async fn close(&self) {
        if let Some(nats) = &self.nats {
            match tokio::time::timeout(SHUTDOWN_GRACE, nats.close()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "closing the NATS connection"),
                Err(_) => tracing::warn!(
                    "closing the NATS connection took longer than {SHUTDOWN_GRACE:?}; unsent acks \
                     mean redeliveries after a restart"
                ),
            }
        }
    }

    fn kafka(&self) -> anyhow::Result<&(KafkaTransport, Arc<KafkaPublisher>)> {
        self.kafka
            .as_ref()
            .context("the kafka broker is used but [brokers.kafka] is not configured")
    }

    fn nats(&self, broker: BrokerKind) -> anyhow::Result<&NatsTransport> {
        self.nats.as_ref().with_context(|| {
            format!("the {broker} broker is used but [brokers.nats] is not configured")
        })
    }

    fn publisher(&self, broker: BrokerKind) -> anyhow::Result<Arc<dyn Publisher>> {
        match broker {
            BrokerKind::Memory => Ok(Arc::new(self.memory.publisher())),
            BrokerKind::Nats => Ok(Arc::new(self.nats(broker)?.core_publisher())),
            BrokerKind::JetStream => Ok(Arc::new(self.nats(broker)?.jetstream_publisher())),
            BrokerKind::Kafka => Ok(self.kafka()?.1.clone()),
        }
    }

    /// Subscribe `function`'s trigger. `slots` is the pool's current concurrency: transports
    /// whose fetched messages time out while they wait start with that bound (see
    /// [`follow_slots`]), while the broker-side limit (JetStream `max_ack_pending`) stays at the
    /// function's maximum so scaling up is never capped by the server.
    async fn subscribe(
        &self,
        function: &FunctionConfig,
        slots: usize,
    ) -> anyhow::Result<Box<dyn Subscription>> {
        let trigger = &function.trigger;
        let max_in_flight = function.scaling.max.max(1) as usize;
        let context = || {
            format!(
                "function {} ({} trigger {})",
                function.name, trigger.broker, trigger.topic
            )
        };
        match trigger.broker {
            BrokerKind::Memory => {
                let options = SubscribeOptions {
                    ordering: trigger.ordering,
                    max_in_flight,
                    ..SubscribeOptions::default()
                };
                let subscription = self
                    .memory
                    .subscribe(&trigger.topic, &trigger.group, options)
                    .with_context(context)?;
                Ok(Box::new(subscription))
            }
            BrokerKind::Nats => {
                let subscription = self
                    .nats(trigger.broker)?
                    .subscribe_core(&trigger.topic, Some(trigger.group.clone()))
                    .await
                    .with_context(context)?;
                Ok(Box::new(subscription))
            }
            BrokerKind::JetStream => {
                let jetstream = trigger.jetstream.as_ref().with_context(|| {
                    format!(
                        "function {}: a jetstream trigger needs a stream",
                        function.name
                    )
                })?;
                let mut options = JetStreamConsumerOptions::new(jetstream.stream.clone());
                options.durable = Some(trigger.group.clone());
                options.ack_wait = jetstream.ack_wait;
                options.prefetch = jetstream.prefetch;
                options.deliver_policy = jetstream.deliver_policy;
                // The server-side bound follows the maximum, not the slots of the moment.
                options.max_ack_pending = Some(options.max_ack_pending_for(max_in_flight));
                let subscription = self
                    .nats(trigger.broker)?
                    .subscribe_jetstream(&trigger.topic, &options, slots.clamp(1, max_in_flight))
                    .await
                    .with_context(context)?;
                Ok(Box::new(subscription))
            }
            BrokerKind::Kafka => {
                let subscription = self
                    .kafka()?
                    .0
                    .subscribe(
                        &trigger.topic,
                        &trigger.group,
                        trigger.ordering,
                        max_in_flight,
                    )
                    .with_context(context)?;
                Ok(Box::new(subscription))
            }
        }
    }
}

/// Every exact Kafka topic the configuration names: triggers, outputs and dead-letter topics
/// (output patterns like `orders.>` cannot be created ahead of time).
fn kafka_topics(config: &Config) -> std::collections::BTreeSet<String> {
    let mut topics = std::collections::BTreeSet::new();
    for function in &config.functions {
        if function.trigger.broker == BrokerKind::Kafka {
            topics.insert(function.trigger.topic.clone());
        }
        if function.output_broker == BrokerKind::Kafka {
            topics.extend(
                function
                    .outputs
                    .iter()
                    .filter(|t| !t.ends_with('>'))
                    .cloned(),
            );
        }
        if function.dead_letter.broker == BrokerKind::Kafka {
            topics.insert(function.dead_letter.topic.clone());
        }
    }
    topics
}

async fn reap_idle(pool: Arc<InstancePool>, shutdown: CancellationToken) {
    let every = (pool.settings().idle_timeout / 4)
        .clamp(Duration::from_millis(100), Duration::from_secs(5));
    let mut ticker = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = ticker.tick() => { pool.reap_idle(); }
            () = shutdown.cancelled() => return,
        }
    }
}

/// Keeps a transport's bound on unsettled deliveries following the pool's slots (JetStream
/// multiplies it by `1 + prefetch`), so a scaled-down function does not hold a large buffer of
/// fetched messages that other dispatchers could be working on.
async fn follow_slots(
    pool: Arc<InstancePool>,
    flow: Arc<dyn FlowControl>,
    shutdown: CancellationToken,
) {
    let mut applied = None;
    let mut ticker = tokio::time::interval(Duration::from_millis(50));
    loop {
        let slots = pool.stats().slots.max(1);
        if applied != Some(slots) {
            flow.set_max_in_flight(slots);
            applied = Some(slots);
        }
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// Samples lag on its own clock, so a busy or blocked subscription still reports it.
async fn sample_lag(
    probe: Arc<dyn LagProbe>,
    function: Arc<str>,
    broker: BrokerKind,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(LAG_TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => return,
        }
        match probe.lag().await {
            Ok(lag) => {
                failing = false;
                telemetry::consumer_lag(&function, broker.as_str(), lag);
            }
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(function = %function, error = %e, "cannot read consumer lag");
            }
            Err(_) => {}
        }
    }
}
