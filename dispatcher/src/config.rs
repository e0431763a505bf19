//! `weir.toml`: reading, layering and validating the dispatcher's configuration.
//!
//! One TOML file, with environment overrides `WEIR__SECTION__KEY` layered on top through the
//! `config` crate. The outcome is a [`Config`] whose every [`FunctionConfig`] is concrete: the
//! function's own values, else `[defaults]`, else Weir's built-in defaults.
//!
//! Every problem is reported, not just the first: each top-level section and each
//! `[[functions]]` entry is deserialized on its own (so a typo in one function does not hide a
//! typo in the next), then semantic validation collects everything it finds. Problems carry a
//! path in one style everywhere: `http.listen`, `functions[2].retry.max_delay`,
//! `functions[0].outputs[1]` (indexes count from 0 in file order).
//!
//! **Environment overrides.** Variables named `WEIR__<SEGMENT>__<SEGMENT>...` set one scalar
//! value each; segments are lowercased (`WEIR__HTTP__LISTEN=0.0.0.0:9000` sets `http.listen`).
//! A numeric segment indexes an array (`WEIR__FUNCTIONS__0__RETRY__MAX_ATTEMPTS=9`,
//! `WEIR__BROKERS__NATS_STREAMS__1__...`), and under `FUNCTIONS` a segment may also name the
//! function, with `-` written as `_` (`WEIR__FUNCTIONS__ORDER_VALIDATE__TIMEOUT=2s`). Overrides
//! can change values of entries the file has; they cannot add array entries or set lists
//! (`outputs`). Values are strings converted to the field's type ("9" → 9). Overrides are
//! applied here rather than through `config::Environment` because that source cannot address
//! array elements. A problem caused by an override names the variable.
//!
//! What this module deliberately does not do: open a connection, load or check a module's
//! content (the engine does; its findings are merged with [`ConfigErrors::push`]), or check
//! that JetStream streams or Kafka topics exist.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;
use weir_broker_bridge::kafka::KafkaConfig;
use weir_broker_bridge::memory::MemoryBusConfig;
use weir_broker_bridge::nats::{
    subject_covers, subjects_overlap, DeliverFrom, NatsConfig, RetentionKind, StreamConfig,
};
use weir_broker_bridge::{BrokerKind, Ordering};
use weir_schemas::Format;

/// The prefix of environment variables that override the file.
pub const ENV_PREFIX: &str = "WEIR__";

/// Built-in defaults: what a function gets when neither it nor `[defaults]` says otherwise.
pub mod builtin {
    use std::time::Duration;

    use bytesize::ByteSize;

    pub const HTTP_LISTEN: &str = "127.0.0.1:8080";
    pub const HTTP_MAX_BODY: ByteSize = ByteSize::mib(1);
    pub const TIMEOUT: Duration = Duration::from_secs(5);
    pub const MEMORY: ByteSize = ByteSize::mib(64);
    pub const MAX_STACK: ByteSize = ByteSize::kib(512);
    pub const MAX_OUTPUTS: u32 = 64;
    pub const MAX_OUTPUT_BYTES: ByteSize = ByteSize::mib(1);
    pub const HOP_LIMIT: u32 = 16;
    pub const ACK_WAIT: Duration = Duration::from_secs(30);
    pub const RETRY_MAX_ATTEMPTS: u32 = 5;
    pub const RETRY_INITIAL_DELAY: Duration = Duration::from_millis(200);
    pub const RETRY_MULTIPLIER: f64 = 2.0;
    pub const RETRY_MAX_DELAY: Duration = Duration::from_secs(30);
    pub const RETRY_JITTER: f64 = 0.2;
    pub const SCALING_MIN: u32 = 1;
    pub const SCALING_MAX: u32 = 4;
    pub const SCALING_TARGET_LAG: u64 = 10;
    pub const SCALING_SCALE_DOWN_WINDOW: Duration = Duration::from_secs(30);
    pub const SCALING_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
    pub const SCALING_MAX_INVOCATIONS: u64 = 10_000;
}

/// Limits on values that make sense for a wasm32 guest and an epoch-driven deadline.
const MIN_TIMEOUT: Duration = Duration::from_millis(10);
const MIN_MEMORY: ByteSize = ByteSize::kib(64);
const MAX_MEMORY: ByteSize = ByteSize::gib(4);
const MIN_STACK: ByteSize = ByteSize::kib(4);
const MAX_STACK: ByteSize = ByteSize::mib(16);
const MAX_NAME_LEN: usize = 63;
const MAX_KAFKA_TOPIC_LEN: usize = 249;

// ---------------------------------------------------------------------------------------------
// Problems
// ---------------------------------------------------------------------------------------------

/// One thing wrong with the configuration, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Where: `functions[2].retry.max_delay`; empty for the file as a whole.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a configuration, in file order. Displays one problem per line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigErrors {
    problems: Vec<Problem>,
}

impl ConfigErrors {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.problems.is_empty()
    }

    pub fn len(&self) -> usize {
        self.problems.len()
    }

    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    pub fn iter(&self) -> std::slice::Iter<'_, Problem> {
        self.problems.iter()
    }

    /// Adds every problem of `other`.
    pub fn extend(&mut self, other: ConfigErrors) {
        self.problems.extend(other.problems);
    }

    /// Drops every problem at one of `paths` but the first one there.
    fn keep_first_at(&mut self, paths: &[String]) {
        let mut seen = std::collections::HashSet::new();
        self.problems.retain(
            |problem| match paths.iter().find(|path| **path == problem.path) {
                Some(path) => seen.insert(path.as_str()),
                None => true,
            },
        );
    }

    /// `Ok(value)` if there is no problem, else `Err(self)`.
    pub fn into_result<T>(self, value: T) -> Result<T, ConfigErrors> {
        if self.is_empty() {
            Ok(value)
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl<'a> IntoIterator for &'a ConfigErrors {
    type Item = &'a Problem;
    type IntoIter = std::slice::Iter<'a, Problem>;

    fn into_iter(self) -> Self::IntoIter {
        self.problems.iter()
    }
}

impl IntoIterator for ConfigErrors {
    type Item = Problem;
    type IntoIter = std::vec::IntoIter<Problem>;

    fn into_iter(self) -> Self::IntoIter {
        self.problems.into_iter()
    }
}

// ---------------------------------------------------------------------------------------------
// The resolved configuration
// ---------------------------------------------------------------------------------------------

/// The whole configuration, validated, with defaults applied to every function.
#[derive(Debug, Clone)]
pub struct Config {
    pub http: HttpConfig,
    pub brokers: BrokersConfig,
    /// `[defaults]` as written (already folded into `functions`; kept for display).
    pub defaults: Defaults,
    pub functions: Vec<FunctionConfig>,
}

impl Config {
    pub fn function(&self, name: &str) -> Option<&FunctionConfig> {
        self.functions.iter().find(|f| f.name == name)
    }

    /// The broker `topic` lives on in this configuration: that of the functions it triggers,
    /// else that of the functions publishing to it, else (a dead-letter topic) that of their
    /// dead letters, else the memory bus.
    pub fn topic_broker(&self, topic: &str) -> BrokerKind {
        self.mentioned_topic_broker(topic)
            .unwrap_or(BrokerKind::Memory)
    }

    /// [`Config::topic_broker`] for a topic some function triggers on, publishes to or
    /// dead-letters to; `None` for one the configuration does not mention.
    pub fn mentioned_topic_broker(&self, topic: &str) -> Option<BrokerKind> {
        let functions = &self.functions;
        functions
            .iter()
            .find(|f| topic_matches(&f.trigger.topic, topic))
            .map(|f| f.trigger.broker)
            .or_else(|| {
                functions
                    .iter()
                    .find(|f| f.output_allowed(topic))
                    .map(|f| f.output_broker)
            })
            .or_else(|| {
                functions
                    .iter()
                    .find(|f| f.dead_letter.topic == topic)
                    .map(|f| f.dead_letter.broker)
            })
    }
}

/// `[http]`: ingress, admin API, `/metrics` and the status page.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    #[serde(deserialize_with = "de::socket_addr")]
    pub listen: SocketAddr,
    /// Largest accepted request body.
    #[serde(deserialize_with = "de::size")]
    pub max_body: ByteSize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body: builtin::HTTP_MAX_BODY,
        }
    }
}

/// `[brokers]`: the in-process memory bus is always there; NATS and Kafka only when configured.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokersConfig {
    #[serde(default)]
    pub memory: MemoryBusConfig,
    #[serde(default)]
    pub nats: Option<NatsConfig>,
    #[serde(default)]
    pub kafka: Option<KafkaConfig>,
    /// JetStream streams to create or verify at start-up.
    #[serde(default)]
    pub nats_streams: Vec<StreamConfig>,
}

impl BrokersConfig {
    /// Whether the broker a function names can be reached with this configuration.
    pub fn is_configured(&self, broker: BrokerKind) -> bool {
        match broker {
            BrokerKind::Memory => true,
            BrokerKind::Nats | BrokerKind::JetStream => self.nats.is_some(),
            BrokerKind::Kafka => self.kafka.is_some(),
        }
    }
}

/// Per-invocation sandboxing of a function's instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Isolation {
    /// A warm instance handles one event at a time and is reused for the next.
    #[default]
    Warm,
    /// A fresh Store per event: no memory is ever shared between events.
    PerEvent,
}

/// One function, every value concrete.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionConfig {
    pub name: String,
    /// Resolved against the config file's directory.
    pub module: PathBuf,
    pub isolation: Isolation,
    /// Deadline of one invocation (epoch interruption).
    pub timeout: Duration,
    /// Linear memory limit per memory (`StoreLimits`).
    pub memory: ByteSize,
    /// Maximum wasm stack.
    pub max_stack: ByteSize,
    /// Most output events per invocation.
    pub max_outputs: u32,
    /// Most output data bytes per invocation, summed over outputs.
    pub max_output_bytes: ByteSize,
    /// Allowed output topics: see [`topic_matches`].
    pub outputs: Vec<String>,
    pub output_broker: BrokerKind,
    /// Most chained hops (`weirhops`) before an event goes to the DLQ as `hop-limit`.
    pub hop_limit: u32,
    /// Values handed to the function through `host.config-get`.
    pub config: BTreeMap<String, String>,
    pub trigger: TriggerConfig,
    pub retry: RetryConfig,
    pub dead_letter: DeadLetterConfig,
    pub scaling: ScalingConfig,
}

impl FunctionConfig {
    /// Whether the function may publish to `topic` (on [`FunctionConfig::output_broker`]).
    pub fn output_allowed(&self, topic: &str) -> bool {
        self.outputs
            .iter()
            .any(|pattern| topic_matches(pattern, topic))
    }
}

/// `[functions.trigger]`, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TriggerConfig {
    pub broker: BrokerKind,
    /// Topic (Kafka, memory) or subject (NATS, JetStream; wildcards allowed there).
    pub topic: String,
    pub format: Format,
    pub ordering: Ordering,
    /// Consumer group (Kafka, memory), durable consumer (JetStream) or queue group (NATS).
    pub group: String,
    /// `Some` exactly when `broker` is JetStream.
    pub jetstream: Option<JetStreamTrigger>,
}

/// What only a JetStream trigger has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JetStreamTrigger {
    pub stream: String,
    pub ack_wait: Duration,
    /// Messages fetched ahead per instance slot (see `JetStreamConsumerOptions::prefetch`).
    pub prefetch: usize,
    /// Where the function's durable consumer starts when weir creates it; one that exists
    /// keeps its place.
    pub deliver_policy: DeliverFrom,
}

/// `[functions.retry]`, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    /// Invocations in all, the first included (>= 1).
    pub max_attempts: u32,
    pub initial_delay: Duration,
    /// >= 1.0
    pub multiplier: f64,
    /// >= initial_delay
    pub max_delay: Duration,
    /// Randomization factor in 0..=1.
    pub jitter: f64,
    /// Events older than this go to the DLQ as `expired`.
    pub max_age: Option<Duration>,
}

/// `[functions.dead_letter]`, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterConfig {
    pub topic: String,
    pub broker: BrokerKind,
}

/// `[functions.scaling]`, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScalingConfig {
    /// 0 = scale to zero.
    pub min: u32,
    /// The concurrency limit, >= max(1, min).
    pub max: u32,
    /// Lag per instance the autoscaler aims at (>= 1).
    pub target_lag: u64,
    pub scale_down_window: Duration,
    pub idle_timeout: Duration,
    /// An instance is recycled after this many invocations.
    pub max_invocations: u64,
}

// ---------------------------------------------------------------------------------------------
// [defaults] and the partial sections shared with [[functions]]
// ---------------------------------------------------------------------------------------------

/// `[defaults]`: every per-function value that makes sense for all functions; all optional.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    #[serde(default, deserialize_with = "de::opt_enum")]
    pub isolation: Option<Isolation>,
    #[serde(default, deserialize_with = "de::opt_duration")]
    pub timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de::opt_size")]
    pub memory: Option<ByteSize>,
    #[serde(default, deserialize_with = "de::opt_size")]
    pub max_stack: Option<ByteSize>,
    #[serde(default)]
    pub max_outputs: Option<u32>,
    #[serde(default, deserialize_with = "de::opt_size")]
    pub max_output_bytes: Option<ByteSize>,
    #[serde(default, deserialize_with = "de::opt_enum")]
    pub output_broker: Option<BrokerKind>,
    #[serde(default)]
    pub hop_limit: Option<u32>,
    /// Merged under each function's own `config` (the function's values win).
    #[serde(default)]
    pub config: BTreeMap<String, String>,
    #[serde(default)]
    pub trigger: TriggerDefaults,
    #[serde(default)]
    pub retry: PartialRetry,
    #[serde(default)]
    pub dead_letter: DeadLetterDefaults,
    #[serde(default)]
    pub scaling: PartialScaling,
}

/// `[defaults.trigger]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerDefaults {
    #[serde(default, deserialize_with = "de::opt_enum")]
    pub broker: Option<BrokerKind>,
    #[serde(default, deserialize_with = "de::opt_enum")]
    pub format: Option<Format>,
    #[serde(default, deserialize_with = "de::opt_enum")]
    pub ordering: Option<Ordering>,
    /// Applies to JetStream triggers only.
    #[serde(default, deserialize_with = "de::opt_duration")]
    pub ack_wait: Option<Duration>,
    /// Applies to JetStream triggers only.
    #[serde(default)]
    pub prefetch: Option<usize>,
    /// Applies to JetStream triggers only.
    /// A name or a table: see [`DeliverFrom`].
    #[serde(default)]
    pub deliver_policy: Option<DeliverFrom>,
}

/// `[defaults.dead_letter]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterDefaults {
    #[serde(default, deserialize_with = "de::opt_enum")]
    pub broker: Option<BrokerKind>,
}

/// A retry policy as written in `[defaults.retry]` or `[functions.retry]`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialRetry {
    #[serde(default)]
    pub max_attempts: Option<u32>,
    #[serde(default, deserialize_with = "de::opt_duration")]
    pub initial_delay: Option<Duration>,
    #[serde(default)]
    pub multiplier: Option<f64>,
    #[serde(default, deserialize_with = "de::opt_duration")]
    pub max_delay: Option<Duration>,
    #[serde(default)]
    pub jitter: Option<f64>,
    #[serde(default, deserialize_with = "de::opt_duration")]
    pub max_age: Option<Duration>,
}

/// Scaling as written in `[defaults.scaling]` or `[functions.scaling]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialScaling {
    #[serde(default)]
    pub min: Option<u32>,
    #[serde(default)]
    pub max: Option<u32>,
    #[serde(default)]
    pub target_lag: Option<u64>,
    #[serde(default, deserialize_with = "de::opt_duration")]
    pub scale_down_window: Option<Duration>,
    #[serde(default, deserialize_with = "de::opt_duration")]
    pub idle_timeout: Option<Duration>,
    #[serde(default)]
    pub max_invocations: Option<u64>,
}

/// One `[[functions]]` entry as written. `deny_unknown_fields` rules out `#[serde(flatten)]`,
/// so the fields shared with [`Defaults`] are repeated here and regrouped by [`Self::own`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFunction {
    name: String,
    module: PathBuf,
    #[serde(default, deserialize_with = "de::opt_enum")]
    isolation: Option<Isolation>,
    #[serde(default, deserialize_with = "de::opt_duration")]
    timeout: Option<Duration>,
    #[serde(default, deserialize_with = "de::opt_size")]
    memory: Option<ByteSize>,
    #[serde(default, deserialize_with = "de::opt_size")]
    max_stack: Option<ByteSize>,
    #[serde(default)]
    max_outputs: Option<u32>,
    #[serde(default, deserialize_with = "de::opt_size")]
    max_output_bytes: Option<ByteSize>,
    #[serde(default)]
    outputs: Vec<String>,
    #[serde(default, deserialize_with = "de::opt_enum")]
    output_broker: Option<BrokerKind>,
    #[serde(default)]
    hop_limit: Option<u32>,
    #[serde(default)]
    config: BTreeMap<String, String>,
    trigger: RawTrigger,
    #[serde(default)]
    retry: PartialRetry,
    #[serde(default)]
    dead_letter: RawDeadLetter,
    #[serde(default)]
    scaling: PartialScaling,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrigger {
    #[serde(default, deserialize_with = "de::opt_enum")]
    broker: Option<BrokerKind>,
    topic: String,
    #[serde(default, deserialize_with = "de::opt_enum")]
    format: Option<Format>,
    #[serde(default, deserialize_with = "de::opt_enum")]
    ordering: Option<Ordering>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    stream: Option<String>,
    #[serde(default, deserialize_with = "de::opt_duration")]
    ack_wait: Option<Duration>,
    #[serde(default)]
    prefetch: Option<usize>,
    #[serde(default)]
    deliver_policy: Option<DeliverFrom>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDeadLetter {
    #[serde(default)]
    topic: Option<String>,
    #[serde(default, deserialize_with = "de::opt_enum")]
    broker: Option<BrokerKind>,
}

impl RawFunction {
    /// The values this function sets itself, in the shape of `[defaults]`.
    fn own(&self) -> Defaults {
        Defaults {
            isolation: self.isolation,
            timeout: self.timeout,
            memory: self.memory,
            max_stack: self.max_stack,
            max_outputs: self.max_outputs,
            max_output_bytes: self.max_output_bytes,
            output_broker: self.output_broker,
            hop_limit: self.hop_limit,
            config: self.config.clone(),
            trigger: TriggerDefaults {
                broker: self.trigger.broker,
                format: self.trigger.format,
                ordering: self.trigger.ordering,
                ack_wait: self.trigger.ack_wait,
                prefetch: self.trigger.prefetch,
                deliver_policy: self.trigger.deliver_policy,
            },
            retry: self.retry.clone(),
            dead_letter: DeadLetterDefaults {
                broker: self.dead_letter.broker,
            },
            scaling: self.scaling.clone(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// What a configuration is loaded for, which decides how much of it must be there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadFor {
    /// Running it (`weir run`, `weir check`): every function and its module file.
    Running,
    /// Connecting as it does (`weir publish` / `weir tail -c`): only the broker settings and
    /// which broker each topic lives on are used, so module files need not exist on this
    /// machine and `[[functions]]` may be left out. Everything present is still validated.
    Connecting,
}

/// Reads `path` and applies `WEIR__...` overrides from the process environment.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    load_for(path, LoadFor::Running)
}

/// [`load`] for `purpose`.
pub fn load_for(path: &Path, purpose: LoadFor) -> Result<Config, ConfigErrors> {
    let env = std::env::vars_os()
        .filter_map(|(key, value)| Some((key.into_string().ok()?, value.into_string().ok()?)));
    read_and_parse(path, env, purpose)
}

/// [`load`] with the environment given explicitly (only `WEIR__` variables are looked at).
pub fn load_with_env<I>(path: &Path, env: I) -> Result<Config, ConfigErrors>
where
    I: IntoIterator<Item = (String, String)>,
{
    read_and_parse(path, env, LoadFor::Running)
}

fn read_and_parse<I>(path: &Path, env: I, purpose: LoadFor) -> Result<Config, ConfigErrors>
where
    I: IntoIterator<Item = (String, String)>,
{
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) => {
            let mut errors = ConfigErrors::new();
            errors.push("", format!("reading {}: {err}", path.display()));
            return Err(errors);
        }
    };
    let base_dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    parse_text(&text, &base_dir, env, purpose).map_err(|mut errors| {
        for problem in &mut errors.problems {
            if problem.path.is_empty() {
                problem.message = format!("{}: {}", path.display(), problem.message);
            }
        }
        errors
    })
}

/// Parses a configuration from text, without environment overrides. Relative module paths
/// resolve against `base_dir`.
pub fn from_toml_str(text: &str, base_dir: &Path) -> Result<Config, ConfigErrors> {
    from_toml_str_with_env(text, base_dir, std::iter::empty())
}

/// Parses a configuration from text with the given environment overrides.
pub fn from_toml_str_with_env<I>(
    text: &str,
    base_dir: &Path,
    env: I,
) -> Result<Config, ConfigErrors>
where
    I: IntoIterator<Item = (String, String)>,
{
    parse_text(text, base_dir, env, LoadFor::Running)
}

fn parse_text<I>(
    text: &str,
    base_dir: &Path,
    env: I,
    purpose: LoadFor,
) -> Result<Config, ConfigErrors>
where
    I: IntoIterator<Item = (String, String)>,
{
    let mut errors = ConfigErrors::new();
    let env: Vec<(String, String)> = env
        .into_iter()
        .filter(|(key, _)| key.starts_with(ENV_PREFIX))
        .collect();

    let overrides = if env.is_empty() {
        Vec::new()
    } else {
        // Names and counts of array entries are needed to address them from the environment.
        let file_only = match build_layers(text, &[]) {
            Ok(root) => root,
            Err(err) => {
                errors.push("", bare_message(&err));
                return Err(errors);
            }
        };
        env_overrides(&env, &ArrayShapes::of(&file_only), &mut errors)
    };

    let root = match build_layers(text, &overrides) {
        Ok(root) => root,
        Err(err) => {
            errors.push("", bare_message(&err));
            return Err(errors);
        }
    };

    let config = parse_sections(root, base_dir, purpose, &mut errors);
    annotate_overrides(&mut errors, &overrides);
    match config {
        Some(config) => errors.into_result(config),
        None => Err(errors),
    }
}

/// File, then overrides, merged by the `config` crate into one table.
fn build_layers(
    text: &str,
    overrides: &[EnvOverride],
) -> Result<config::Map<String, config::Value>, config::ConfigError> {
    let mut builder = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml));
    for o in overrides {
        builder = builder.set_override(o.key.as_str(), o.value.as_str())?;
    }
    builder.build()?.try_deserialize()
}

fn parse_sections(
    root: config::Map<String, config::Value>,
    base_dir: &Path,
    purpose: LoadFor,
    errors: &mut ConfigErrors,
) -> Option<Config> {
    let mut http = None;
    let mut brokers = None;
    let mut defaults = None;
    let mut raw_functions = None;
    let mut http_value = None;
    let mut brokers_value = None;
    let mut defaults_value = None;
    for (key, value) in root {
        match key.as_str() {
            "http" => http_value = Some(value),
            "brokers" => brokers_value = Some(value),
            "defaults" => defaults_value = Some(value),
            "functions" => raw_functions = Some(value),
            _ => errors.push(
                key.clone(),
                format!("unknown key `{key}`, expected one of `http`, `brokers`, `defaults`, `functions`"),
            ),
        }
    }
    // Values that did not parse and were taken out, so the checks after parsing can run.
    let mut taken_out: Vec<String> = Vec::new();
    // Sections are parsed in a fixed order so problems come out in a stable order.
    if let Some(value) = http_value {
        http = section::<HttpConfig>(value, "http", errors, &mut taken_out);
    }
    let mut brokers_ok = true;
    if let Some(value) = brokers_value {
        let before = errors.len();
        brokers = section::<BrokersConfig>(value, "brokers", errors, &mut taken_out);
        // A broker whose settings had a mistake may have been taken out whole; functions
        // naming it would only repeat that mistake as "not configured".
        brokers_ok = errors.len() == before;
    }
    if let Some(value) = defaults_value {
        defaults = section::<Defaults>(value, "defaults", errors, &mut taken_out);
    }

    let running = purpose == LoadFor::Running;
    let functions: Vec<Option<RawFunction>> = match raw_functions {
        None if !running => Vec::new(),
        None => {
            errors.push(
                "functions",
                "missing: at least one [[functions]] entry is required",
            );
            Vec::new()
        }
        Some(value) => match value.into_array() {
            Ok(items) if items.is_empty() && running => {
                errors.push("functions", "no [[functions]] configured");
                Vec::new()
            }
            Ok(items) => items
                .into_iter()
                .enumerate()
                .map(|(i, item)| {
                    let path = format!("functions[{i}]");
                    section::<RawFunction>(item, &path, errors, &mut taken_out)
                })
                .collect(),
            Err(_) => {
                errors.push("functions", "must be an array of tables ([[functions]])");
                Vec::new()
            }
        },
    };

    let http = http.unwrap_or_default();
    let brokers = brokers.unwrap_or_default();
    let defaults = defaults.unwrap_or_default();

    validate_brokers(&brokers, errors);
    check_settings(&defaults, "defaults", errors);

    let mut resolved = Vec::with_capacity(functions.len());
    let mut indices = Vec::with_capacity(functions.len());
    let mut first_index_of_name: HashMap<String, usize> = HashMap::new();
    for (i, raw) in functions.into_iter().enumerate() {
        let Some(raw) = raw else { continue };
        let path = format!("functions[{i}]");
        if let Some(first) = first_index_of_name.get(&raw.name) {
            errors.push(
                format!("{path}.name"),
                format!(
                    "duplicate function name {:?} (also functions[{first}])",
                    raw.name
                ),
            );
        } else {
            first_index_of_name.insert(raw.name.clone(), i);
        }
        // Broker presence is only judged once [brokers] itself parsed, or every function
        // would repeat the brokers section's own error.
        let function = resolve_function(
            &path,
            raw,
            &defaults,
            &brokers,
            brokers_ok,
            ModuleFiles {
                base_dir,
                must_exist: running,
            },
            errors,
        );
        resolved.push(function);
        indices.push(i);
    }
    check_shared_consumers(&indices, &resolved, errors);
    check_work_queue_consumers(&indices, &resolved, &brokers, errors);
    // A value taken out looks unset to those checks ("missing: set it here or in
    // [defaults]"); its parse error already says what is wrong there.
    errors.keep_first_at(&taken_out);

    Some(Config {
        http,
        brokers,
        defaults,
        functions: resolved,
    })
}

/// Past this many problems in one section, the rest of it is not examined.
const MAX_PROBLEMS_PER_SECTION: usize = 32;

/// Deserializes one section, recording every value that does not parse (with its full path).
///
/// serde stops at a section's first error, which would make a user fix a file in rounds. So a
/// value that does not parse is reported, taken out of the section, and the section is read
/// again: a field with a default falls back to it, which lets the remaining fields (and the
/// section's own checks afterwards) be examined in the same run. A table missing a required
/// field is taken out the same way. A required value that had to be taken out ends the section
/// (`None`, its own checks cannot run) once every other value has been read, without a second
/// "missing field" for the same mistake.
fn section<T: serde::de::DeserializeOwned>(
    mut value: config::Value,
    prefix: &str,
    errors: &mut ConfigErrors,
    taken_out: &mut Vec<String>,
) -> Option<T> {
    let first_problem = errors.len();
    // Tables that held an unknown key taken out: most likely a misspelling of a required one.
    let mut held_unknown_keys: Vec<String> = Vec::new();
    let parsed = loop {
        if errors.len() - first_problem >= MAX_PROBLEMS_PER_SECTION {
            errors.push(
                prefix,
                format!("more than {MAX_PROBLEMS_PER_SECTION} problems; the rest of this section was not checked"),
            );
            break None;
        }
        let err = match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            Ok(parsed) => break Some(parsed),
            Err(err) => err,
        };
        let path = joined_path(prefix, &err.path().to_string());
        if let Some(key) = missing_key(err.inner()) {
            // A required value that was there but wrong, or an unknown key beside it (`topc`
            // for `topic`), has been reported already.
            let missing = joined_path(prefix, key);
            let (holder, field) = missing.rsplit_once('.').unwrap_or(("", &missing));
            let explained = taken_out.contains(&missing)
                || held_unknown_keys.iter().any(|table| table == holder);
            if !explained {
                errors.push(path.clone(), format!("missing field `{field}`"));
            }
            // serde gives up on the whole section here, before it has seen the keys that come
            // after this table (in hash order). Without the table the rest is still read; if
            // the table is required itself, that is reported as explained, just above.
        } else {
            let message = bare_message(err.inner());
            if message.starts_with("unknown field `") {
                if let Some((table, _)) = path.rsplit_once('.') {
                    held_unknown_keys.push(table.to_owned());
                }
            }
            errors.push(path.clone(), message);
        }
        match take_out(&mut value, err.path()) {
            Some(TakenOut::Value) => taken_out.push(path),
            // The elements after it would be renumbered, so the whole list goes.
            Some(TakenOut::ListHolding) => match path.rsplit_once('[') {
                Some((list_path, _)) => taken_out.push(list_path.to_owned()),
                None => break None,
            },
            None => break None,
        }
    };
    // Map keys come in hash order; sorting keeps a section's problems in a stable order.
    errors.problems[first_problem..].sort_by(|a, b| a.path.cmp(&b.path));
    parsed
}

/// `prefix` and a path as serde_path_to_error prints it (`.` for the value itself).
fn joined_path(prefix: &str, inner_path: &str) -> String {
    if inner_path == "." || inner_path.is_empty() {
        prefix.to_owned()
    } else if inner_path.starts_with('[') {
        format!("{prefix}{inner_path}")
    } else {
        format!("{prefix}.{inner_path}")
    }
}

/// The key (a path from the section's top) of a required value that is missing.
fn missing_key(err: &config::ConfigError) -> Option<&str> {
    match err {
        config::ConfigError::At { error, .. } => missing_key(error),
        config::ConfigError::NotFound(key) => Some(key),
        _ => None,
    }
}

/// What [`take_out`] removed.
enum TakenOut {
    /// The value at the path.
    Value,
    /// The list the path's element belongs to.
    ListHolding,
}

/// Removes the value at `path` from `value` (for a list's element, the whole list); `None`
/// when the path does not lead to a table's entry (the error is about the section as a whole,
/// an enum's variant, or a list inside a list).
fn take_out(value: &mut config::Value, path: &serde_path_to_error::Path) -> Option<TakenOut> {
    use config::ValueKind;
    use serde_path_to_error::Segment;
    let segments: Vec<&Segment> = path.iter().collect();
    let (target, taken) = match segments.split_last()? {
        (Segment::Seq { .. }, parents) => (parents, TakenOut::ListHolding),
        _ => (segments.as_slice(), TakenOut::Value),
    };
    let (Segment::Map { key }, parents) = target.split_last()? else {
        return None;
    };
    let mut current = value;
    for segment in parents {
        current = match (segment, &mut current.kind) {
            (Segment::Map { key }, ValueKind::Table(table)) => table.get_mut(key)?,
            (Segment::Seq { index }, ValueKind::Array(items)) => items.get_mut(*index)?,
            _ => return None,
        };
    }
    match &mut current.kind {
        ValueKind::Table(table) => table.remove(key).map(|_| taken),
        _ => None,
    }
}

/// The `config` crate appends its own (imprecise) key to messages; the path is reported
/// separately, so only the underlying message is kept.
fn bare_message(err: &config::ConfigError) -> String {
    match err {
        config::ConfigError::At { error, .. } => bare_message(error),
        config::ConfigError::Type {
            unexpected,
            expected,
            ..
        } => format!("invalid type: {unexpected}, expected {expected}"),
        config::ConfigError::NotFound(field) => format!("missing field `{field}`"),
        config::ConfigError::Message(message) => {
            match message.split_once(" does not have variant constructor ") {
                Some((enum_name, variant)) if enum_name.starts_with("enum ") => {
                    format!("unknown variant `{variant}`")
                }
                _ => message.clone(),
            }
        }
        other => other.to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Environment overrides
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct EnvOverride {
    var: String,
    /// A `config` crate path: `functions[0].retry.max_attempts`.
    key: String,
    value: String,
}

/// What the file's arrays hold, so that overrides can address their entries.
struct ArrayShapes {
    function_names: Vec<Option<String>>,
    nats_streams: usize,
}

impl ArrayShapes {
    fn of(root: &config::Map<String, config::Value>) -> Self {
        let function_names = root
            .get("functions")
            .and_then(|v| v.clone().into_array().ok())
            .unwrap_or_default()
            .into_iter()
            .map(|entry| {
                entry
                    .into_table()
                    .ok()
                    .and_then(|mut table| table.remove("name"))
                    .and_then(|name| name.into_string().ok())
            })
            .collect();
        let nats_streams = root
            .get("brokers")
            .and_then(|v| v.clone().into_table().ok())
            .and_then(|mut brokers| brokers.remove("nats_streams"))
            .and_then(|v| v.into_array().ok())
            .map_or(0, |streams| streams.len());
        Self {
            function_names,
            nats_streams,
        }
    }
}

fn env_overrides(
    env: &[(String, String)],
    shapes: &ArrayShapes,
    errors: &mut ConfigErrors,
) -> Vec<EnvOverride> {
    let mut overrides = Vec::new();
    'vars: for (var, value) in env {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let segments: Vec<String> = rest.split("__").map(str::to_lowercase).collect();
        if segments.iter().any(String::is_empty) {
            errors.push(
                var.clone(),
                "empty segment in variable name (use `__` between keys only)",
            );
            continue;
        }
        let mut key = String::new();
        let mut previous: Option<&str> = None;
        for segment in &segments {
            let array_len = match previous {
                Some("functions") => Some(shapes.function_names.len()),
                Some("nats_streams") => Some(shapes.nats_streams),
                _ => None,
            };
            if let Ok(index) = segment.parse::<usize>() {
                if let Some(len) = array_len {
                    if index >= len {
                        errors.push(
                            var.clone(),
                            format!(
                                "index {index} is out of range: the file has {len} `{}` entries \
                                 (overrides cannot add entries)",
                                previous.unwrap_or_default()
                            ),
                        );
                        continue 'vars;
                    }
                }
                key.push_str(&format!("[{index}]"));
            } else if previous == Some("functions") {
                let found = shapes.function_names.iter().position(|name| {
                    name.as_deref()
                        .is_some_and(|name| name == segment || name.replace('-', "_") == *segment)
                });
                match found {
                    Some(index) => key.push_str(&format!("[{index}]")),
                    None => {
                        errors.push(
                            var.clone(),
                            format!(
                                "no [[functions]] entry is named {segment:?} (write `-` as `_`)"
                            ),
                        );
                        continue 'vars;
                    }
                }
            } else {
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(segment);
            }
            previous = Some(segment.as_str());
        }
        overrides.push(EnvOverride {
            var: var.clone(),
            key,
            value: value.clone(),
        });
    }
    overrides
}

/// Says which variable caused a problem found under an overridden path.
fn annotate_overrides(errors: &mut ConfigErrors, overrides: &[EnvOverride]) {
    for problem in &mut errors.problems {
        let cause = overrides.iter().find(|o| {
            problem.path == o.key
                || (problem.path.starts_with(&o.key)
                    && problem.path[o.key.len()..].starts_with(['.', '[']))
        });
        if let Some(o) = cause {
            problem.message = format!(
                "{} (set by environment variable {})",
                problem.message, o.var
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Resolution and validation
// ---------------------------------------------------------------------------------------------

fn validate_brokers(brokers: &BrokersConfig, errors: &mut ConfigErrors) {
    if brokers.memory.max_pending == 0 {
        errors.push("brokers.memory.max_pending", "must be at least 1");
    }
    if let Some(nats) = &brokers.nats {
        push_section_problems(errors, "brokers.nats", nats.validate("brokers.nats"));
    }
    if let Some(kafka) = &brokers.kafka {
        push_section_problems(errors, "brokers.kafka", kafka.validate("brokers.kafka"));
    }
    if !brokers.nats_streams.is_empty() && brokers.nats.is_none() {
        errors.push(
            "brokers.nats_streams",
            "JetStream streams are listed but [brokers.nats] is not configured",
        );
    }
    for (i, stream) in brokers.nats_streams.iter().enumerate() {
        let path = format!("brokers.nats_streams[{i}]");
        let problems = stream.validate(&path);
        push_section_problems(errors, &path, problems);
    }
}

/// The broker sections' own `validate` returns `"<path>.<key>: <message>"` strings; they are
/// split back into path and message so that every problem has the same shape.
fn push_section_problems(errors: &mut ConfigErrors, section: &str, problems: Vec<String>) {
    for problem in problems {
        match problem.split_once(": ") {
            Some((path, message)) if path.starts_with(section) && !path.contains(' ') => {
                errors.push(path, message);
            }
            _ => errors.push(section, problem),
        }
    }
}

/// Range checks of single values, on what one section wrote itself (so that a bad value in
/// `[defaults]` is reported once, at `defaults.*`, not once per function).
fn check_settings(s: &Defaults, path: &str, errors: &mut ConfigErrors) {
    if let Some(timeout) = s.timeout {
        if timeout < MIN_TIMEOUT {
            errors.push(
                format!("{path}.timeout"),
                format!(
                    "must be at least 10ms, got {}",
                    humantime::format_duration(timeout)
                ),
            );
        }
    }
    if let Some(memory) = s.memory {
        if memory < MIN_MEMORY || memory > MAX_MEMORY {
            errors.push(
                format!("{path}.memory"),
                format!("must be between 64KiB (one wasm page) and 4GiB, got {memory}"),
            );
        }
    }
    if let Some(stack) = s.max_stack {
        if stack < MIN_STACK || stack > MAX_STACK {
            errors.push(
                format!("{path}.max_stack"),
                format!("must be between 4KiB and 16MiB, got {stack}"),
            );
        }
    }
    if s.max_output_bytes == Some(ByteSize::b(0)) {
        errors.push(format!("{path}.max_output_bytes"), "must be greater than 0");
    }
    if s.hop_limit == Some(0) {
        errors.push(format!("{path}.hop_limit"), "must be at least 1");
    }
    for key in s.config.keys() {
        if key.is_empty() {
            errors.push(format!("{path}.config"), "config keys must not be empty");
        }
    }
    if s.trigger.ack_wait == Some(Duration::ZERO) {
        errors.push(format!("{path}.trigger.ack_wait"), "must be greater than 0");
    }

    let retry = &s.retry;
    if retry.max_attempts == Some(0) {
        errors.push(
            format!("{path}.retry.max_attempts"),
            "must be at least 1 (1 = no retries)",
        );
    }
    if retry.initial_delay == Some(Duration::ZERO) {
        errors.push(
            format!("{path}.retry.initial_delay"),
            "must be greater than 0",
        );
    }
    if let Some(multiplier) = retry.multiplier {
        if !multiplier.is_finite() || multiplier < 1.0 {
            errors.push(
                format!("{path}.retry.multiplier"),
                format!("must be a number >= 1.0, got {multiplier}"),
            );
        }
    }
    if retry.max_delay == Some(Duration::ZERO) {
        errors.push(format!("{path}.retry.max_delay"), "must be greater than 0");
    }
    if let Some(jitter) = retry.jitter {
        if !(0.0..=1.0).contains(&jitter) {
            errors.push(
                format!("{path}.retry.jitter"),
                format!("must be between 0 and 1 (a randomization factor), got {jitter}"),
            );
        }
    }
    if retry.max_age == Some(Duration::ZERO) {
        errors.push(
            format!("{path}.retry.max_age"),
            "must be greater than 0 (or left out)",
        );
    }

    let scaling = &s.scaling;
    if scaling.max == Some(0) {
        errors.push(format!("{path}.scaling.max"), "must be at least 1");
    }
    if scaling.target_lag == Some(0) {
        errors.push(format!("{path}.scaling.target_lag"), "must be at least 1");
    }
    if scaling.idle_timeout == Some(Duration::ZERO) {
        errors.push(
            format!("{path}.scaling.idle_timeout"),
            "must be greater than 0",
        );
    }
    if scaling.max_invocations == Some(0) {
        errors.push(
            format!("{path}.scaling.max_invocations"),
            "must be at least 1",
        );
    }
}

fn layer<T: Clone>(own: &Option<T>, default: &Option<T>, builtin: T) -> T {
    own.clone().or_else(|| default.clone()).unwrap_or(builtin)
}

/// Where relative module paths resolve, and whether the files must be there.
struct ModuleFiles<'a> {
    base_dir: &'a Path,
    must_exist: bool,
}

fn resolve_function(
    path: &str,
    raw: RawFunction,
    defaults: &Defaults,
    brokers: &BrokersConfig,
    check_brokers: bool,
    modules: ModuleFiles<'_>,
    errors: &mut ConfigErrors,
) -> FunctionConfig {
    let own = raw.own();
    check_settings(&own, path, errors);
    check_name(&raw.name, path, errors);

    let module = modules.base_dir.join(&raw.module);
    if raw.module.as_os_str().is_empty() {
        errors.push(format!("{path}.module"), "must not be empty");
    } else if modules.must_exist && !module.is_file() {
        errors.push(
            format!("{path}.module"),
            format!(
                "module file {} does not exist or is not a file",
                module.display()
            ),
        );
    }

    let trigger_broker = match own.trigger.broker.or(defaults.trigger.broker) {
        Some(broker) => broker,
        None => {
            errors.push(
                format!("{path}.trigger.broker"),
                "missing: set it here or in [defaults.trigger] (memory | nats | jetstream | kafka)",
            );
            BrokerKind::Memory
        }
    };
    let timeout = layer(&own.timeout, &defaults.timeout, builtin::TIMEOUT);

    let jetstream = if trigger_broker == BrokerKind::JetStream {
        let ack_wait = layer(
            &own.trigger.ack_wait,
            &defaults.trigger.ack_wait,
            builtin::ACK_WAIT,
        );
        if ack_wait <= timeout {
            errors.push(
                format!("{path}.trigger.ack_wait"),
                format!(
                    "must exceed the function timeout ({}), or JetStream redelivers events that \
                     are still being processed; got {}",
                    humantime::format_duration(timeout),
                    humantime::format_duration(ack_wait)
                ),
            );
        }
        let stream = match &raw.trigger.stream {
            Some(stream) => {
                check_stream_name(stream, &format!("{path}.trigger.stream"), errors);
                check_stream_captures(brokers, stream, &raw.trigger.topic, path, errors);
                stream.clone()
            }
            None => {
                errors.push(
                    format!("{path}.trigger.stream"),
                    "missing: a jetstream trigger must name its stream",
                );
                String::new()
            }
        };
        let prefetch = layer(
            &own.trigger.prefetch,
            &defaults.trigger.prefetch,
            weir_broker_bridge::nats::DEFAULT_PREFETCH,
        );
        if prefetch > weir_broker_bridge::nats::MAX_PREFETCH {
            errors.push(
                format!("{path}.trigger.prefetch"),
                format!(
                    "at most {} per instance slot; got {prefetch}",
                    weir_broker_bridge::nats::MAX_PREFETCH
                ),
            );
        }
        Some(JetStreamTrigger {
            stream,
            ack_wait,
            prefetch,
            deliver_policy: layer(
                &own.trigger.deliver_policy,
                &defaults.trigger.deliver_policy,
                DeliverFrom::All,
            ),
        })
    } else {
        if raw.trigger.stream.is_some() {
            errors.push(
                format!("{path}.trigger.stream"),
                format!("only jetstream triggers have a stream (this trigger's broker is {trigger_broker})"),
            );
        }
        if raw.trigger.ack_wait.is_some() {
            errors.push(
                format!("{path}.trigger.ack_wait"),
                format!("only jetstream triggers have an ack_wait (this trigger's broker is {trigger_broker})"),
            );
        }
        if raw.trigger.prefetch.is_some() {
            errors.push(
                format!("{path}.trigger.prefetch"),
                format!("only jetstream triggers have a prefetch (this trigger's broker is {trigger_broker})"),
            );
        }
        if raw.trigger.deliver_policy.is_some() {
            errors.push(
                format!("{path}.trigger.deliver_policy"),
                format!("only jetstream triggers have a deliver_policy (this trigger's broker is {trigger_broker})"),
            );
        }
        None
    };

    // NATS has no partitions, and JetStream's retries (NAK with a delay) hand an event back
    // behind later ones of its key: events run in parallel there. Refuse an explicit request
    // for an order we would not keep; a `[defaults.trigger]` ordering meant for Kafka does not
    // apply.
    let ordering = match trigger_broker {
        BrokerKind::Nats | BrokerKind::JetStream => {
            if let Some(asked) = own.trigger.ordering.filter(|o| *o != Ordering::None) {
                errors.push(
                    format!("{path}.trigger.ordering"),
                    format!(
                        "{trigger_broker} triggers run events in parallel (ordering = \"none\"); \
                         `{}` ordering is kept on kafka and memory triggers only",
                        match asked {
                            Ordering::Partition => "partition",
                            Ordering::Key => "key",
                            Ordering::None => "none",
                        }
                    ),
                );
            }
            Ordering::None
        }
        BrokerKind::Memory | BrokerKind::Kafka => layer(
            &own.trigger.ordering,
            &defaults.trigger.ordering,
            Ordering::default(),
        ),
    };

    let group = raw
        .trigger
        .group
        .clone()
        .unwrap_or_else(|| format!("weir-{}", raw.name));
    check_group(
        &group,
        trigger_broker,
        &format!("{path}.trigger.group"),
        errors,
    );
    check_topic(
        &raw.trigger.topic,
        trigger_broker,
        TopicUse::Subscribe,
        &format!("{path}.trigger.topic"),
        errors,
    );

    let output_broker = own
        .output_broker
        .or(defaults.output_broker)
        .unwrap_or(trigger_broker);
    for (j, pattern) in raw.outputs.iter().enumerate() {
        let output_path = format!("{path}.outputs[{j}]");
        if !check_topic(
            pattern,
            output_broker,
            TopicUse::OutputPattern,
            &output_path,
            errors,
        ) {
            continue;
        }
        if same_topic_space(output_broker, trigger_broker)
            && subjects_overlap(pattern, &raw.trigger.topic)
        {
            errors.push(
                output_path,
                format!(
                    "output {pattern:?} on {output_broker} matches the trigger topic {:?}: the \
                     function would consume its own outputs and loop",
                    raw.trigger.topic
                ),
            );
        }
    }

    let dead_letter_broker = own
        .dead_letter
        .broker
        .or(defaults.dead_letter.broker)
        .unwrap_or(trigger_broker);
    let dead_letter_topic = raw
        .dead_letter
        .topic
        .clone()
        .unwrap_or_else(|| format!("weir.dlq.{}", raw.name));
    let dead_letter_path = format!("{path}.dead_letter.topic");
    if check_topic(
        &dead_letter_topic,
        dead_letter_broker,
        TopicUse::Publish,
        &dead_letter_path,
        errors,
    ) && same_topic_space(dead_letter_broker, trigger_broker)
        && subjects_overlap(&dead_letter_topic, &raw.trigger.topic)
    {
        errors.push(
            dead_letter_path,
            format!(
                "dead-letter topic {dead_letter_topic:?} on {dead_letter_broker} matches the \
                 trigger topic {:?}: dead letters would be consumed again and loop",
                raw.trigger.topic
            ),
        );
    }

    if check_brokers {
        let uses = [
            ("trigger.broker", trigger_broker),
            ("output_broker", output_broker),
            ("dead_letter.broker", dead_letter_broker),
        ];
        for (field, broker) in uses {
            if !brokers.is_configured(broker) {
                let section = if broker == BrokerKind::Kafka {
                    "kafka"
                } else {
                    "nats"
                };
                errors.push(
                    format!("{path}.{field}"),
                    format!("{field} = {broker} but [brokers.{section}] is not configured"),
                );
            }
        }
    }

    let retry = RetryConfig {
        max_attempts: layer(
            &own.retry.max_attempts,
            &defaults.retry.max_attempts,
            builtin::RETRY_MAX_ATTEMPTS,
        ),
        initial_delay: layer(
            &own.retry.initial_delay,
            &defaults.retry.initial_delay,
            builtin::RETRY_INITIAL_DELAY,
        ),
        multiplier: layer(
            &own.retry.multiplier,
            &defaults.retry.multiplier,
            builtin::RETRY_MULTIPLIER,
        ),
        max_delay: layer(
            &own.retry.max_delay,
            &defaults.retry.max_delay,
            builtin::RETRY_MAX_DELAY,
        ),
        jitter: layer(
            &own.retry.jitter,
            &defaults.retry.jitter,
            builtin::RETRY_JITTER,
        ),
        max_age: own.retry.max_age.or(defaults.retry.max_age),
    };
    if retry.max_delay < retry.initial_delay {
        errors.push(
            format!("{path}.retry.max_delay"),
            format!(
                "max_delay ({}) must be >= initial_delay ({})",
                humantime::format_duration(retry.max_delay),
                humantime::format_duration(retry.initial_delay)
            ),
        );
    }

    let scaling = ScalingConfig {
        min: layer(
            &own.scaling.min,
            &defaults.scaling.min,
            builtin::SCALING_MIN,
        ),
        max: layer(
            &own.scaling.max,
            &defaults.scaling.max,
            builtin::SCALING_MAX,
        ),
        target_lag: layer(
            &own.scaling.target_lag,
            &defaults.scaling.target_lag,
            builtin::SCALING_TARGET_LAG,
        ),
        scale_down_window: layer(
            &own.scaling.scale_down_window,
            &defaults.scaling.scale_down_window,
            builtin::SCALING_SCALE_DOWN_WINDOW,
        ),
        idle_timeout: layer(
            &own.scaling.idle_timeout,
            &defaults.scaling.idle_timeout,
            builtin::SCALING_IDLE_TIMEOUT,
        ),
        max_invocations: layer(
            &own.scaling.max_invocations,
            &defaults.scaling.max_invocations,
            builtin::SCALING_MAX_INVOCATIONS,
        ),
    };
    if scaling.max < scaling.min {
        errors.push(
            format!("{path}.scaling.max"),
            format!("max ({}) must be >= min ({})", scaling.max, scaling.min),
        );
    }

    let mut config = defaults.config.clone();
    config.extend(raw.config);

    FunctionConfig {
        name: raw.name,
        module,
        isolation: layer(&own.isolation, &defaults.isolation, Isolation::Warm),
        timeout,
        memory: layer(&own.memory, &defaults.memory, builtin::MEMORY),
        max_stack: layer(&own.max_stack, &defaults.max_stack, builtin::MAX_STACK),
        max_outputs: layer(
            &own.max_outputs,
            &defaults.max_outputs,
            builtin::MAX_OUTPUTS,
        ),
        max_output_bytes: layer(
            &own.max_output_bytes,
            &defaults.max_output_bytes,
            builtin::MAX_OUTPUT_BYTES,
        ),
        outputs: raw.outputs,
        output_broker,
        hop_limit: layer(&own.hop_limit, &defaults.hop_limit, builtin::HOP_LIMIT),
        config,
        trigger: TriggerConfig {
            broker: trigger_broker,
            topic: raw.trigger.topic,
            format: layer(&own.trigger.format, &defaults.trigger.format, Format::Auto),
            ordering,
            group,
            jetstream,
        },
        retry,
        dead_letter: DeadLetterConfig {
            topic: dead_letter_topic,
            broker: dead_letter_broker,
        },
        scaling,
    }
}

fn check_name(name: &str, path: &str, errors: &mut ConfigErrors) {
    let valid_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if name.is_empty() || name.len() > MAX_NAME_LEN || !valid_chars {
        errors.push(
            format!("{path}.name"),
            format!("{name:?} is not a valid function name: use 1 to 63 of a-z, 0-9 and `-`"),
        );
    }
}

/// A JetStream trigger on a stream this configuration declares must be among that stream's
/// subjects: the server refuses a consumer whose filter the stream does not capture, and
/// `weir check` should say so rather than `weir run` at start-up. A stream declared nowhere
/// here is the server's business (its subjects are only known there).
fn check_stream_captures(
    brokers: &BrokersConfig,
    stream: &str,
    topic: &str,
    path: &str,
    errors: &mut ConfigErrors,
) {
    let Some(declared) = brokers.nats_streams.iter().find(|s| s.name == stream) else {
        return;
    };
    // An empty topic and a stream without subjects are reported as such.
    if topic.is_empty()
        || declared.subjects.is_empty()
        || declared.subjects.iter().any(|s| subject_covers(s, topic))
    {
        return;
    }
    errors.push(
        format!("{path}.trigger.topic"),
        format!(
            "`{topic}` is not among the subjects of stream {stream} ({}), nor within one: a \
             consumer of a subject its stream does not capture never receives a message",
            declared.subjects.join(", ")
        ),
    );
}

/// Two functions of one configuration must not read through one consumer. On a shared Kafka or
/// memory group, or a shared core queue group on overlapping subjects, they would split the
/// events between them, each function seeing only a share and nothing saying so; a shared
/// JetStream durable consumer is worse: binding it again re-points it at the second function's
/// subject (the server updates a consumer's filter), so both run the second's events and
/// nothing reads the first's. Instances of one function share its consumer (`scaling.max`),
/// and so do weir processes running the same function; two functions never need to.
fn check_shared_consumers(
    indices: &[usize],
    functions: &[FunctionConfig],
    errors: &mut ConfigErrors,
) {
    for (later, function) in functions.iter().enumerate() {
        let trigger = &function.trigger;
        let clash = functions[..later].iter().position(|earlier| {
            let other = &earlier.trigger;
            // A repeated name is reported as such (and would repeat the default group too).
            earlier.name != function.name
                && other.broker == trigger.broker
                && other.group == trigger.group
                && match (trigger.broker, &other.jetstream, &trigger.jetstream) {
                    (BrokerKind::JetStream, Some(a), Some(b)) => a.stream == b.stream,
                    (BrokerKind::Nats, _, _) => subjects_overlap(&other.topic, &trigger.topic),
                    _ => other.topic == trigger.topic,
                }
        });
        let Some(earlier) = clash else { continue };
        const SPLIT: &str = "two functions in one group would split its events, each seeing \
                             only a share";
        let (what, why) = match &trigger.jetstream {
            Some(jetstream) => (
                format!("the durable consumer on stream {}", jetstream.stream),
                "a durable consumer has one subject filter, so the second binding would re-point \
                 it and both functions would share the second's events, the first's unread",
            ),
            None if trigger.broker == BrokerKind::Nats => (
                format!(
                    "the queue group on `{}` (overlapping `{}`)",
                    functions[earlier].trigger.topic, trigger.topic
                ),
                SPLIT,
            ),
            None => (format!("the consumer group on `{}`", trigger.topic), SPLIT),
        };
        errors.push(
            format!("functions[{}].trigger.group", indices[later]),
            format!(
                "{:?} is already {what} of functions[{}] ({}): {why}; give each function its \
                 own group (by default weir-<name>)",
                trigger.group, indices[earlier], functions[earlier].name
            ),
        );
    }
}

/// A work-queue stream hands each message to one consumer, so the server refuses a second
/// consumer whose subjects overlap another's ("filtered consumer not unique on workqueue
/// stream"); for a stream declared here, `weir check` says so instead of `weir run` failing
/// at start-up. (Two functions on one group are `check_shared_consumers`' problem.)
fn check_work_queue_consumers(
    indices: &[usize],
    functions: &[FunctionConfig],
    brokers: &BrokersConfig,
    errors: &mut ConfigErrors,
) {
    fn on_work_queue<'f>(function: &'f FunctionConfig, brokers: &BrokersConfig) -> Option<&'f str> {
        let jetstream = function.trigger.jetstream.as_ref()?;
        brokers
            .nats_streams
            .iter()
            .any(|s| s.name == jetstream.stream && s.retention == RetentionKind::WorkQueue)
            .then_some(jetstream.stream.as_str())
    }
    for (later, function) in functions.iter().enumerate() {
        let Some(stream) = on_work_queue(function, brokers) else {
            continue;
        };
        let clash = functions[..later].iter().position(|earlier| {
            on_work_queue(earlier, brokers) == Some(stream)
                && earlier.trigger.group != function.trigger.group
                && subjects_overlap(&earlier.trigger.topic, &function.trigger.topic)
        });
        let Some(earlier) = clash else { continue };
        errors.push(
            format!("functions[{}].trigger.topic", indices[later]),
            format!(
                "`{}` overlaps `{}`, which functions[{}] ({}) reads from stream {stream}, a \
                 workqueue stream: it hands each message to one consumer, and the server \
                 refuses a second on the same subjects; use a limits or interest stream for \
                 events more than one function reads",
                function.trigger.topic,
                functions[earlier].trigger.topic,
                indices[earlier],
                functions[earlier].name
            ),
        );
    }
}

fn check_stream_name(stream: &str, path: &str, errors: &mut ConfigErrors) {
    if stream.is_empty()
        || stream
            .chars()
            .any(|c| c.is_whitespace() || ".*>/\\".contains(c))
    {
        errors.push(
            path,
            format!("{stream:?} is not a valid JetStream stream name (no spaces, `.`, `*`, `>`, `/`, `\\`)"),
        );
    }
}

fn check_group(group: &str, broker: BrokerKind, path: &str, errors: &mut ConfigErrors) {
    let forbidden: &str = match broker {
        // A durable consumer name.
        BrokerKind::JetStream => ".*>/\\",
        _ => "",
    };
    if group.is_empty()
        || group
            .chars()
            .any(|c| c.is_whitespace() || forbidden.contains(c))
    {
        let extra = if forbidden.is_empty() {
            ""
        } else {
            ", `.`, `*`, `>`, `/`, `\\`"
        };
        errors.push(
            path,
            format!("{group:?} is not a valid {broker} consumer group name (no spaces{extra})"),
        );
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TopicUse {
    /// A trigger's topic: NATS subjects may use `*` and `>`.
    Subscribe,
    /// An allowed-output pattern: exact, or ending in a `>` token.
    OutputPattern,
    /// A concrete topic to publish to.
    Publish,
}

/// Checks a topic or subject for `broker`; returns whether it is valid.
fn check_topic(
    topic: &str,
    broker: BrokerKind,
    usage: TopicUse,
    path: &str,
    errors: &mut ConfigErrors,
) -> bool {
    let problem = topic_problem(topic, broker, usage);
    if let Some(message) = &problem {
        errors.push(path, format!("{topic:?}: {message}"));
    }
    problem.is_none()
}

fn topic_problem(topic: &str, broker: BrokerKind, usage: TopicUse) -> Option<String> {
    if topic.is_empty() {
        return Some("must not be empty".into());
    }
    if topic.chars().any(char::is_whitespace) {
        return Some("must not contain whitespace".into());
    }
    let tokens: Vec<&str> = topic.split('.').collect();
    let last = tokens.len() - 1;
    let has_wildcards = tokens.iter().any(|t| t.contains(['*', '>']));
    if has_wildcards {
        for (i, token) in tokens.iter().enumerate() {
            if token.contains(['*', '>']) && token.len() > 1 {
                return Some("`*` and `>` must stand alone as a token".into());
            }
            if *token == ">" && i != last {
                return Some("`>` may only be the last token".into());
            }
        }
        let allowed = match usage {
            TopicUse::Publish => false,
            TopicUse::OutputPattern => !topic.contains('*'),
            TopicUse::Subscribe => matches!(broker, BrokerKind::Nats | BrokerKind::JetStream),
        };
        if !allowed {
            return Some(match usage {
                TopicUse::Publish => "wildcards are not allowed in a topic to publish to".into(),
                TopicUse::OutputPattern => {
                    "only a trailing `>` wildcard is supported in outputs (e.g. \"orders.>\")"
                        .into()
                }
                TopicUse::Subscribe => {
                    format!("wildcards are only supported on nats and jetstream, not {broker}")
                }
            });
        }
    }
    match broker {
        BrokerKind::Nats | BrokerKind::JetStream => {
            if tokens.iter().any(|t| t.is_empty()) {
                return Some(
                    "a NATS subject must not have empty tokens (leading, trailing or double `.`)"
                        .into(),
                );
            }
        }
        BrokerKind::Kafka => {
            let name = topic.strip_suffix(".>").unwrap_or(topic);
            if topic == ">" {
                return None;
            }
            if name.len() > MAX_KAFKA_TOPIC_LEN
                || name == "."
                || name == ".."
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Some("a Kafka topic is 1 to 249 of a-z, A-Z, 0-9, `.`, `_`, `-`".into());
            }
        }
        BrokerKind::Memory => {}
    }
    None
}

/// NATS core and JetStream share one subject space: publishing to a core NATS subject that a
/// stream captures feeds that stream.
fn same_topic_space(a: BrokerKind, b: BrokerKind) -> bool {
    let space = |k: BrokerKind| match k {
        BrokerKind::Nats | BrokerKind::JetStream => BrokerKind::Nats,
        other => other,
    };
    space(a) == space(b)
}

/// Whether an output pattern allows `topic`.
///
/// A pattern is an exact topic, or ends with a `>` token and then matches every topic that
/// starts with the tokens before it and has at least one more (`orders.>` matches
/// `orders.eu` and `orders.eu.paid`, not `orders`); `>` alone matches everything. Tokens are
/// separated by `.`, as in NATS subjects; the same rule applies to Kafka and memory topics.
pub fn topic_matches(pattern: &str, topic: &str) -> bool {
    match pattern.strip_suffix('>') {
        Some("") => !topic.is_empty(),
        Some(prefix) if prefix.ends_with('.') => {
            topic.len() > prefix.len() && topic.starts_with(prefix)
        }
        _ => pattern == topic,
    }
}

// ---------------------------------------------------------------------------------------------
// Human-readable values
// ---------------------------------------------------------------------------------------------

mod de {
    use std::fmt;
    use std::net::SocketAddr;
    use std::str::FromStr;
    use std::time::Duration;

    use bytesize::ByteSize;
    use serde::de::{self, Visitor};
    use serde::{Deserialize, Deserializer};

    struct HumanDuration(Duration);

    impl<'de> Deserialize<'de> for HumanDuration {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let text = String::deserialize(d)?;
            humantime::parse_duration(text.trim())
                .map(HumanDuration)
                .map_err(|err| {
                    de::Error::custom(format!(
                    "invalid duration {text:?} ({err}); expected e.g. \"250ms\", \"5s\", \"1h 30m\""
                ))
                })
        }
    }

    struct HumanSize(ByteSize);

    impl<'de> Deserialize<'de> for HumanSize {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(SizeVisitor)
        }
    }

    struct SizeVisitor;

    impl Visitor<'_> for SizeVisitor {
        type Value = HumanSize;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a size like \"64MiB\" or a number of bytes")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<HumanSize, E> {
            Ok(HumanSize(ByteSize::b(v)))
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<HumanSize, E> {
            u64::try_from(v)
                .map(|v| HumanSize(ByteSize::b(v)))
                .map_err(|_| E::custom(format!("invalid size {v}: must not be negative")))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<HumanSize, E> {
            ByteSize::from_str(v.trim()).map(HumanSize).map_err(|err| {
                E::custom(format!(
                    "invalid size {v:?} ({err}); expected e.g. \"512KiB\", \"64MiB\", \"1GiB\""
                ))
            })
        }
    }

    /// Unit-variant enums through serde's own string deserializer, whose error lists the
    /// variants (the `config` crate's own enum error does not).
    pub(super) fn opt_enum<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: de::DeserializeOwned,
    {
        let Some(text) = Option::<String>::deserialize(d)? else {
            return Ok(None);
        };
        let variant = de::value::StrDeserializer::<de::value::Error>::new(&text);
        T::deserialize(variant).map(Some).map_err(de::Error::custom)
    }

    pub(super) fn opt_duration<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<HumanDuration>::deserialize(d)?.map(|h| h.0))
    }

    pub(super) fn opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ByteSize>, D::Error> {
        Ok(Option::<HumanSize>::deserialize(d)?.map(|h| h.0))
    }

    pub(super) fn size<'de, D: Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
        Ok(HumanSize::deserialize(d)?.0)
    }

    pub(super) fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        let text = String::deserialize(d)?;
        SocketAddr::from_str(text.trim()).map_err(|_| {
            de::Error::custom(format!(
                "{text:?} is not a socket address; expected ip:port, e.g. \"127.0.0.1:8080\" or \"[::1]:8080\""
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_patterns_match_exact_and_trailing_wildcard() {
        assert!(topic_matches("orders.validated", "orders.validated"));
        assert!(!topic_matches("orders.validated", "orders.validated.x"));
        assert!(topic_matches("orders.>", "orders.eu"));
        assert!(topic_matches("orders.>", "orders.eu.paid"));
        assert!(!topic_matches("orders.>", "orders"));
        assert!(!topic_matches("orders.>", "ordersx.eu"));
        assert!(topic_matches(">", "anything"));
        assert!(!topic_matches("orders*", "orders1"));
    }

    #[test]
    fn topic_rules_depend_on_broker_and_use() {
        assert!(topic_problem("orders.*", BrokerKind::Nats, TopicUse::Subscribe).is_none());
        assert!(topic_problem("orders.*", BrokerKind::Kafka, TopicUse::Subscribe).is_some());
        assert!(topic_problem("orders.>", BrokerKind::Kafka, TopicUse::OutputPattern).is_none());
        assert!(topic_problem("orders.*", BrokerKind::Nats, TopicUse::OutputPattern).is_some());
        assert!(topic_problem("orders.>", BrokerKind::Nats, TopicUse::Publish).is_some());
        assert!(topic_problem("orders..x", BrokerKind::JetStream, TopicUse::Publish).is_some());
        assert!(topic_problem("a>.b", BrokerKind::Nats, TopicUse::Subscribe).is_some());
        assert!(topic_problem(">.b", BrokerKind::Nats, TopicUse::Subscribe).is_some());
        assert!(topic_problem("bad topic", BrokerKind::Memory, TopicUse::Publish).is_some());
        assert!(topic_problem(
            "weir.dlq.order-validate",
            BrokerKind::Kafka,
            TopicUse::Publish
        )
        .is_none());
        assert!(topic_problem("orders/eu", BrokerKind::Kafka, TopicUse::Publish).is_some());
    }

    #[test]
    fn env_segments_map_to_config_paths() {
        let shapes = ArrayShapes {
            function_names: vec![Some("order-validate".into()), Some("b".into())],
            nats_streams: 1,
        };
        let env = vec![
            ("WEIR__HTTP__LISTEN".to_owned(), "0.0.0.0:9000".to_owned()),
            (
                "WEIR__FUNCTIONS__1__RETRY__MAX_ATTEMPTS".to_owned(),
                "9".to_owned(),
            ),
            (
                "WEIR__FUNCTIONS__ORDER_VALIDATE__TIMEOUT".to_owned(),
                "2s".to_owned(),
            ),
            (
                "WEIR__BROKERS__NATS_STREAMS__0__NAME".to_owned(),
                "X".to_owned(),
            ),
            ("WEIR__FUNCTIONS__7__TIMEOUT".to_owned(), "2s".to_owned()),
            ("WEIR__FUNCTIONS__NOPE__TIMEOUT".to_owned(), "2s".to_owned()),
            ("WEIR__HTTP____LISTEN".to_owned(), "x".to_owned()),
        ];
        let mut errors = ConfigErrors::new();
        let keys: Vec<String> = env_overrides(&env, &shapes, &mut errors)
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert_eq!(
            keys,
            [
                "http.listen",
                "functions[1].retry.max_attempts",
                "functions[0].timeout",
                "brokers.nats_streams[0].name"
            ]
        );
        let paths: Vec<&str> = errors.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "WEIR__FUNCTIONS__7__TIMEOUT",
                "WEIR__FUNCTIONS__NOPE__TIMEOUT",
                "WEIR__HTTP____LISTEN"
            ]
        );
    }

    #[test]
    fn errors_display_one_problem_per_line() {
        let mut errors = ConfigErrors::new();
        assert!(errors.is_empty());
        errors.push("http.listen", "bad");
        errors.push("", "whole file");
        assert_eq!(errors.len(), 2);
        assert_eq!(errors.to_string(), "http.listen: bad\nwhole file");
    }
}
