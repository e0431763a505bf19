//! Kafka: topics as triggers, outputs and dead-letter queues.
//!
//! - [`KafkaConfig`] is the `[kafka]` config section, validated before any connection.
//! - [`KafkaTransport`] holds the connection settings, creates topics and opens subscriptions.
//! - [`KafkaSubscription`] is one consumer-group member per trigger. It hands out deliveries in
//!   the trigger's [`Ordering`] (one in flight per partition, per key inside a partition, or up
//!   to a cap) and commits each partition only up to its lowest unfinished offset, so a crash
//!   redelivers but never skips (see `consumer.rs`).
//! - [`TopicHistory`] reads a topic's retained records outside any group, then follows it
//!   (for `weir tail --kafka`; see `history.rs`).
//! - [`TopicBacklog`] reads a topic from a group's committed offsets to its end, once, and
//!   commits how far it got (for `weir dlq redrive`; see `backlog.rs`).
//! - [`KafkaPublisher`] is an idempotent producer (`acks=all`) whose `publish` returns once the
//!   delivery report confirmed the write.
//!
//! Delivery details the dispatcher can rely on: headers come as UTF-8 strings (a value that is
//! not UTF-8 is converted lossily and counted in `weir_kafka_lossy_headers_total`; a null header
//! value becomes the empty string); a null value (tombstone) is a `None` payload; the delivery
//! count is counted by the transport (Kafka has none). [`OutboundMessage::dedup_id`] is not
//! used: the idempotent producer de-duplicates its own retries, and outputs of a redelivered
//! input carry the same deterministic key.
//!
//! This module does not decide retries (the dispatcher retries in place, see
//! [`RetryStyle::InPlace`](crate::RetryStyle::InPlace)), does not decode events and does not
//! use Kafka transactions.
//!
//! Security: librdkafka is built with the system OpenSSL (the `rdkafka/ssl` feature), so every
//! `security_protocol` works: `ssl` (server verified against `ssl_ca_location`, else the system
//! CA store; a client certificate with `ssl_certificate_location` + `ssl_key_location`),
//! `sasl_plaintext` and `sasl_ssl` with `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`
//! (librdkafka's built-in SASL; no GSSAPI). [`KafkaTransport::connect`] reports a TLS failure
//! (untrusted certificate, refused handshake, unloadable file) as [`TransportError::Tls`] and a
//! refused mechanism or credentials as [`TransportError::Authentication`], as soon as
//! librdkafka reports them rather than at the end of the connect timeout; once running, such
//! failures are logged as errors. Tested against Tansu (`tests/tests/kafka_security.rs`): TLS,
//! mutual TLS and SCRAM-SHA-256/512; PLAIN only as a mechanism Tansu refuses (it does not
//! offer PLAIN).

mod backlog;
mod consumer;
mod history;
mod lanes;
mod record;
mod watermark;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{
    BaseProducer, DeliveryResult, FutureProducer, FutureRecord, Producer as _, ProducerContext,
};
use rdkafka::util::Timeout;
use rdkafka::Offset;
use serde::Deserialize;

pub use self::backlog::TopicBacklog;
pub use self::consumer::{KafkaLagProbe, KafkaSubscription, PartitionLag};
pub use self::history::TopicHistory;
pub use self::lanes::{LaneId, LaneScheduler, Popped};
pub use self::watermark::WatermarkTracker;
use crate::{BrokerKind, Ordering, OutboundMessage, Published, Publisher, TransportError};

/// How long `connect` and admin calls wait for the broker.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// librdkafka options Weir sets itself; passing them through `options` would break the
/// delivery contract or bypass the secret handling.
const CONTROLLED_OPTIONS: &[(&str, &str)] = &[
    ("bootstrap.servers", "use `bootstrap`"),
    ("metadata.broker.list", "use `bootstrap`"),
    ("group.id", "Weir uses one consumer group per function"),
    (
        "enable.auto.commit",
        "Weir commits offsets itself, only up to the watermark",
    ),
    (
        "enable.auto.offset.store",
        "Weir commits offsets itself, only up to the watermark",
    ),
    (
        "partition.assignment.strategy",
        "Weir uses cooperative-sticky",
    ),
    ("transactional.id", "Weir does not use Kafka transactions"),
    ("security.protocol", "use `security_protocol`"),
    ("sasl.mechanism", "use `sasl_mechanism`"),
    ("sasl.mechanisms", "use `sasl_mechanism`"),
    ("sasl.username", "use `sasl_username`"),
    ("ssl.ca.location", "use `ssl_ca_location`"),
    ("ssl.certificate.location", "use `ssl_certificate_location`"),
    ("ssl.key.location", "use `ssl_key_location`"),
    ("session.timeout.ms", "use `session_timeout`"),
    ("max.poll.interval.ms", "use `max_poll_interval`"),
    ("message.timeout.ms", "use `publish_timeout`"),
];

/// `security.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }

    fn uses_sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }

    fn uses_tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }
}

/// `sasl.mechanism`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    pub fn as_str(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// Partitions and replication of topics Weir creates (`create_topics = true`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TopicDefaults {
    pub partitions: i32,
    pub replication_factor: i32,
}

impl Default for TopicDefaults {
    fn default() -> Self {
        Self {
            partitions: 1,
            replication_factor: 1,
        }
    }
}

/// The `[kafka]` config section.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `host:port[,host:port...]`.
    pub bootstrap: String,
    pub security_protocol: Option<SecurityProtocol>,
    pub sasl_mechanism: Option<SaslMechanism>,
    pub sasl_username: Option<String>,
    /// File holding the SASL password (trailing newline ignored).
    pub sasl_password_file: Option<PathBuf>,
    /// Environment variable holding the SASL password.
    pub sasl_password_env: Option<String>,
    pub ssl_ca_location: Option<PathBuf>,
    pub ssl_certificate_location: Option<PathBuf>,
    pub ssl_key_location: Option<PathBuf>,
    /// Further librdkafka options, passed to consumers, producers and the admin client.
    pub options: BTreeMap<String, String>,
    /// Create trigger, output and DLQ topics that do not exist yet.
    pub create_topics: bool,
    pub topic_defaults: TopicDefaults,
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub max_poll_interval: Duration,
    /// How often finished offsets are committed (also on revoke and close).
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// How long revoke and close wait for in-flight deliveries before giving them up to a
    /// redelivery.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// How long a publish may wait for its delivery report (`message.timeout.ms`).
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Records per partition taken from librdkafka and not handed out yet. Beyond it, records
    /// wait in librdkafka's own queue, which stops fetching at its own limits
    /// (`queued.max.messages.kbytes`, settable in `options`); a partition added to the topic
    /// after the subscription started is paused instead.
    pub max_buffered_per_partition: usize,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            bootstrap: "127.0.0.1:9092".to_owned(),
            security_protocol: None,
            sasl_mechanism: None,
            sasl_username: None,
            sasl_password_file: None,
            sasl_password_env: None,
            ssl_ca_location: None,
            ssl_certificate_location: None,
            ssl_key_location: None,
            options: BTreeMap::new(),
            create_topics: false,
            topic_defaults: TopicDefaults::default(),
            session_timeout: Duration::from_secs(45),
            max_poll_interval: Duration::from_secs(300),
            commit_interval: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(10),
            publish_timeout: Duration::from_secs(30),
            max_buffered_per_partition: 10_000,
        }
    }
}

fn looks_secret(option: &str) -> bool {
    option.contains("password") || option.contains("secret")
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |set: bool| if set { Some("<redacted>") } else { None };
        let options: BTreeMap<&str, &str> = self
            .options
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str(),
                    if looks_secret(k) {
                        "<redacted>"
                    } else {
                        v.as_str()
                    },
                )
            })
            .collect();
        f.debug_struct("KafkaConfig")
            .field("bootstrap", &self.bootstrap)
            .field("security_protocol", &self.security_protocol)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field(
                "sasl_password_file",
                &redacted(self.sasl_password_file.is_some()),
            )
            .field(
                "sasl_password_env",
                &redacted(self.sasl_password_env.is_some()),
            )
            .field("ssl_ca_location", &self.ssl_ca_location)
            .field("ssl_certificate_location", &self.ssl_certificate_location)
            .field("ssl_key_location", &self.ssl_key_location)
            .field("options", &options)
            .field("create_topics", &self.create_topics)
            .field("topic_defaults", &self.topic_defaults)
            .field("session_timeout", &self.session_timeout)
            .field("max_poll_interval", &self.max_poll_interval)
            .field("commit_interval", &self.commit_interval)
            .field("drain_timeout", &self.drain_timeout)
            .field("publish_timeout", &self.publish_timeout)
            .field(
                "max_buffered_per_partition",
                &self.max_buffered_per_partition,
            )
            .finish()
    }
}

impl KafkaConfig {
    /// Every problem of this section, each prefixed with its key path (`path` is the path of
    /// the section itself, e.g. `kafka`). Touches no network; checks that named files exist.
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut problems = Vec::new();
        let mut problem = |key: &str, what: String| problems.push(format!("{path}.{key}: {what}"));

        if self.bootstrap.trim().is_empty() {
            problem("bootstrap", "must name at least one host:port".to_owned());
        }
        for server in self.bootstrap.split(',').filter(|s| !s.trim().is_empty()) {
            let server = server.trim();
            let port_ok = server
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                problem("bootstrap", format!("`{server}` is not host:port"));
            }
        }

        let sasl_protocol = self
            .security_protocol
            .is_some_and(SecurityProtocol::uses_sasl);
        if sasl_protocol && self.sasl_mechanism.is_none() {
            problem(
                "sasl_mechanism",
                "required with a sasl_* security_protocol".to_owned(),
            );
        }
        if self.sasl_mechanism.is_some() {
            if !sasl_protocol {
                problem(
                    "security_protocol",
                    "must be sasl_plaintext or sasl_ssl when sasl_mechanism is set".to_owned(),
                );
            }
            if self.sasl_username.as_deref().is_none_or(str::is_empty) {
                problem("sasl_username", "required with sasl_mechanism".to_owned());
            }
            match (&self.sasl_password_file, &self.sasl_password_env) {
                (None, None) => problem(
                    "sasl_password_file",
                    "one of sasl_password_file or sasl_password_env is required with \
                     sasl_mechanism"
                        .to_owned(),
                ),
                (Some(_), Some(_)) => problem(
                    "sasl_password_env",
                    "set only one of sasl_password_file and sasl_password_env".to_owned(),
                ),
                _ => {}
            }
        }
        if let Some(file) = &self.sasl_password_file {
            if !file.is_file() {
                problem(
                    "sasl_password_file",
                    format!("{} is not a readable file", file.display()),
                );
            }
        }
        if self.sasl_password_env.as_deref().is_some_and(str::is_empty) {
            problem(
                "sasl_password_env",
                "must name an environment variable".to_owned(),
            );
        }
        for (key, file) in [
            ("ssl_ca_location", &self.ssl_ca_location),
            ("ssl_certificate_location", &self.ssl_certificate_location),
            ("ssl_key_location", &self.ssl_key_location),
        ] {
            if let Some(file) = file {
                if !file.exists() {
                    problem(key, format!("{} does not exist", file.display()));
                }
                if !self
                    .security_protocol
                    .is_some_and(SecurityProtocol::uses_tls)
                {
                    problem(
                        key,
                        "only used with security_protocol ssl or sasl_ssl".to_owned(),
                    );
                }
            }
        }
        match (&self.ssl_certificate_location, &self.ssl_key_location) {
            (Some(_), None) => problem(
                "ssl_key_location",
                "required with ssl_certificate_location".to_owned(),
            ),
            (None, Some(_)) => problem(
                "ssl_certificate_location",
                "required with ssl_key_location".to_owned(),
            ),
            _ => {}
        }

        for (option, value) in &self.options {
            let value = value.trim();
            let key = format!("options.\"{option}\"");
            if let Some((_, why)) = CONTROLLED_OPTIONS.iter().find(|(name, _)| name == option) {
                problem(&key, format!("Weir sets this itself ({why})"));
            } else if looks_secret(option) {
                problem(&key, "secrets come from sasl_password_file or sasl_password_env, never from the config file".to_owned());
            } else if option == "enable.idempotence" && value != "true" {
                problem(
                    &key,
                    "must stay true: outputs rely on the idempotent producer".to_owned(),
                );
            } else if (option == "acks" || option == "request.required.acks")
                && !matches!(value, "all" | "-1")
            {
                problem(
                    &key,
                    "must be all (-1): a publish is confirmed only once replicated".to_owned(),
                );
            }
        }

        if self.topic_defaults.partitions < 1 {
            problem("topic_defaults.partitions", "must be at least 1".to_owned());
        }
        if self.topic_defaults.replication_factor < 1 {
            problem(
                "topic_defaults.replication_factor",
                "must be at least 1".to_owned(),
            );
        }
        for (key, value, min) in [
            (
                "session_timeout",
                self.session_timeout,
                Duration::from_secs(1),
            ),
            (
                "max_poll_interval",
                self.max_poll_interval,
                Duration::from_secs(1),
            ),
            (
                "commit_interval",
                self.commit_interval,
                Duration::from_millis(10),
            ),
            ("drain_timeout", self.drain_timeout, Duration::ZERO),
            (
                "publish_timeout",
                self.publish_timeout,
                Duration::from_millis(1),
            ),
        ] {
            if value < min {
                problem(
                    key,
                    format!(
                        "must be at least {}",
                        humantime_serde::re::humantime::format_duration(min)
                    ),
                );
            }
            if millis(value).is_none() {
                problem(
                    key,
                    "is too long for librdkafka (at most ~24 days)".to_owned(),
                );
            }
        }
        if self.max_poll_interval < self.session_timeout {
            problem(
                "max_poll_interval",
                "must not be shorter than session_timeout".to_owned(),
            );
        }
        if self.drain_timeout >= self.max_poll_interval {
            problem(
                "drain_timeout",
                "must be shorter than max_poll_interval (revoke waits inside a poll)".to_owned(),
            );
        }
        if self.max_buffered_per_partition == 0 {
            problem(
                "max_buffered_per_partition",
                "must be at least 1".to_owned(),
            );
        }
        problems
    }

    /// The librdkafka settings every client shares (connection, security, passthrough options).
    /// Holds the SASL password: never log or Debug-print the result.
    fn client_config(&self) -> Result<ClientConfig, TransportError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.bootstrap)
            .set("client.id", "weir");
        if let Some(protocol) = self.security_protocol {
            config.set("security.protocol", protocol.as_str());
        }
        if let Some(mechanism) = self.sasl_mechanism {
            config.set("sasl.mechanism", mechanism.as_str());
        }
        if let Some(username) = &self.sasl_username {
            config.set("sasl.username", username);
        }
        if let Some(password) = self.sasl_password()? {
            config.set("sasl.password", password);
        }
        for (key, location) in [
            ("ssl.ca.location", &self.ssl_ca_location),
            ("ssl.certificate.location", &self.ssl_certificate_location),
            ("ssl.key.location", &self.ssl_key_location),
        ] {
            if let Some(location) = location {
                config.set(key, location.to_string_lossy());
            }
        }
        for (key, value) in &self.options {
            config.set(key, value);
        }
        Ok(config)
    }

    fn sasl_password(&self) -> Result<Option<String>, TransportError> {
        if let Some(file) = &self.sasl_password_file {
            let text = std::fs::read_to_string(file).map_err(|e| {
                TransportError::Config(format!(
                    "reading kafka sasl_password_file {}: {e}",
                    file.display()
                ))
            })?;
            return Ok(Some(text.trim_end_matches(['\r', '\n']).to_owned()));
        }
        if let Some(var) = &self.sasl_password_env {
            let value = std::env::var(var).map_err(|e| {
                TransportError::Config(format!("reading kafka sasl_password_env {var}: {e}"))
            })?;
            return Ok(Some(value));
        }
        Ok(None)
    }
}

fn millis(duration: Duration) -> Option<String> {
    i32::try_from(duration.as_millis())
        .ok()
        .map(|ms| ms.to_string())
}

fn millis_or_max(duration: Duration) -> String {
    millis(duration).unwrap_or_else(|| i32::MAX.to_string())
}

fn connect_error(reason: impl fmt::Display) -> TransportError {
    TransportError::Connect {
        broker: BrokerKind::Kafka,
        reason: reason.to_string(),
    }
}

/// Which security failure a librdkafka error is, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SecurityFailure {
    Tls,
    Authentication,
}

impl SecurityFailure {
    /// `__SSL` (handshake refused, certificate not trusted), `__AUTHENTICATION` (SASL
    /// mechanism or credentials refused), and a TLS alert the peer sent after the handshake
    /// (TLS 1.3 refuses a missing or bad client certificate that way; librdkafka reports it as
    /// `__TRANSPORT` with OpenSSL's "SSL alert number N"). Other disconnects, also during the
    /// TLS handshake, are not classified: they are as likely a network problem.
    fn of(code: RDKafkaErrorCode, reason: &str) -> Option<Self> {
        match code {
            RDKafkaErrorCode::SSL => Some(Self::Tls),
            RDKafkaErrorCode::Authentication
            | RDKafkaErrorCode::SaslAuthenticationFailed
            | RDKafkaErrorCode::UnsupportedSASLMechanism
            | RDKafkaErrorCode::IllegalSASLState => Some(Self::Authentication),
            RDKafkaErrorCode::BrokerTransportFailure if reason.contains("SSL alert number") => {
                Some(Self::Tls)
            }
            _ => None,
        }
    }

    fn error(self, reason: String) -> TransportError {
        match self {
            Self::Tls => TransportError::Tls {
                broker: BrokerKind::Kafka,
                reason,
            },
            Self::Authentication => TransportError::Authentication {
                broker: BrokerKind::Kafka,
                reason,
            },
        }
    }
}

/// librdkafka refused to create a client: a bad option value, or a certificate, key or CA file
/// it could not load (classified as TLS).
fn client_creation_error(error: KafkaError) -> TransportError {
    let reason = error.to_string();
    if reason.contains("ssl.") || reason.contains("SSL") {
        SecurityFailure::Tls.error(reason)
    } else {
        connect_error(reason)
    }
}

/// How long one metadata request of the connect probe waits before librdkafka's errors are
/// looked at.
const PROBE_SLICE: Duration = Duration::from_millis(250);

/// The probe's `socket.connection.setup.timeout.ms` (librdkafka's default is 30 s), unless
/// `options` sets it: a connection stuck in a handshake (TLS to a plaintext listener) is then
/// reported, with the state it was stuck in, inside [`ADMIN_TIMEOUT`].
const PROBE_SETUP_TIMEOUT: Duration = Duration::from_secs(4);

/// Ask the cluster for metadata until it answers (Ok), librdkafka reports a TLS or SASL
/// failure (a classified error, at once: retrying would fail the same way), or
/// [`ADMIN_TIMEOUT`] passes (a connect error carrying librdkafka's last error).
///
/// The probe is a producer (that never produces) because a producer's `poll` serves the
/// error events of the client's main queue; an admin client's main queue is never served.
async fn probe_cluster(config: &KafkaConfig, client: &ClientConfig) -> Result<(), TransportError> {
    let mut probe_config = client.clone();
    probe_config.set("enable.idempotence", "false");
    // Connection failures that raise no error event are logged at info or warning level.
    probe_config.set_log_level(RDKafkaLogLevel::Info);
    if probe_config
        .get("socket.connection.setup.timeout.ms")
        .is_none()
    {
        probe_config.set(
            "socket.connection.setup.timeout.ms",
            millis_or_max(PROBE_SETUP_TIMEOUT),
        );
    }
    let producer: BaseProducer<ProbeContext> = probe_config
        .create_with_context(ProbeContext::default())
        .map_err(client_creation_error)?;
    let bootstrap = config.bootstrap.clone();
    let protocol = config
        .security_protocol
        .unwrap_or(SecurityProtocol::Plaintext);
    let outcome = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + ADMIN_TIMEOUT;
        loop {
            let slice = PROBE_SLICE.min(deadline.saturating_duration_since(Instant::now()));
            let Err(error) = producer.client().fetch_metadata(None, slice) else {
                // The cluster answered with these settings: a failure seen on the way (say,
                // one bootstrap server of several) is left to the running clients' logs.
                return Ok(());
            };
            // Serves the error events into the context.
            producer.poll(Duration::from_millis(1));
            let context = producer.context();
            if let Some((failure, reason)) = context.failure() {
                return Err(failure.error(format!("{bootstrap}: {reason}")));
            }
            if Instant::now() >= deadline {
                let last = context.last_error();
                let hint = last
                    .as_deref()
                    .and_then(|last| mismatch_hint(protocol, last))
                    .map(|hint| format!("; {hint}"))
                    .unwrap_or_default();
                let last = last
                    .map(|reason| format!("; last error: {reason}"))
                    .unwrap_or_default();
                return Err(connect_error(format!(
                    "{bootstrap}: no broker answered within {ADMIN_TIMEOUT:?} ({error}){last}{hint}"
                )));
            }
        }
    })
    .await;
    outcome.map_err(connect_error)?
}

/// What a connection that failed in this way usually means, for the connect error. librdkafka
/// names the state a connection failed in; a dropped connection in these states is the
/// typical sign of a `security_protocol` the listener does not speak.
fn mismatch_hint(protocol: SecurityProtocol, last_error: &str) -> Option<&'static str> {
    // The hang-up is seen either on reading ("Disconnected") or, when librdkafka was still
    // writing the request, on writing ("Send failed: ... Broken pipe", or a reset).
    let dropped = ["Disconnected", "Broken pipe", "Connection reset by peer"]
        .iter()
        .any(|sign| last_error.contains(sign));
    if last_error.contains("in state SSL_HANDSHAKE") && !dropped {
        Some("hint: the TLS handshake got no answer: does this listener speak TLS?")
    } else if dropped && last_error.contains("in state APIVERSION_QUERY") && !protocol.uses_tls() {
        Some(
            "hint: the broker hung up on the first request: does this listener expect TLS \
             (security_protocol \"ssl\" or \"sasl_ssl\")?",
        )
    } else if dropped && last_error.contains("in state UP") && !protocol.uses_sasl() {
        Some(
            "hint: the broker hung up right after connecting: does it require SASL \
             (security_protocol \"sasl_plaintext\" or \"sasl_ssl\")?",
        )
    } else {
        None
    }
}

/// librdkafka's log lines start with the thread's name (`[thrd:...]: `), which says nothing
/// the rest of the line does not.
fn without_thread_name(line: &str) -> &str {
    match (line.starts_with("[thrd:"), line.find("]: ")) {
        (true, Some(end)) => &line[end + 3..],
        _ => line,
    }
}

/// The context of the connect probe: remembers what librdkafka reported.
#[derive(Debug, Default)]
struct ProbeContext {
    state: std::sync::Mutex<ProbeState>,
}

#[derive(Debug, Default)]
struct ProbeState {
    /// The first TLS or SASL failure.
    failure: Option<(SecurityFailure, String)>,
    /// The latest connection failure: an error event, or a `FAIL` log line (librdkafka logs
    /// every broker connection failure so, but raises an error event only for some: a
    /// handshake that timed out or a disconnect right after connecting are logs only).
    last_failure: Option<String>,
    /// The latest "N/N brokers are down": a summary, named only when nothing better came.
    all_brokers_down: Option<String>,
}

impl ProbeContext {
    fn state(&self) -> std::sync::MutexGuard<'_, ProbeState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn failure(&self) -> Option<(SecurityFailure, String)> {
        self.state().failure.clone()
    }

    fn last_error(&self) -> Option<String> {
        let state = self.state();
        state
            .last_failure
            .clone()
            .or_else(|| state.all_brokers_down.clone())
    }
}

impl ClientContext for ProbeContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        forward_log(level, fac, log_message);
        if fac == "FAIL" {
            self.state().last_failure = Some(without_thread_name(log_message).to_owned());
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // rust-rdkafka calls this twice per error event (see `BaseProducer::poll`).
        let code = error.rdkafka_error_code();
        let mut state = self.state();
        if let Some(failure) = code.and_then(|code| SecurityFailure::of(code, reason)) {
            state
                .failure
                .get_or_insert_with(|| (failure, reason.to_owned()));
        }
        if code == Some(RDKafkaErrorCode::AllBrokersDown) {
            state.all_brokers_down = Some(reason.to_owned());
        } else {
            state.last_failure = Some(reason.to_owned());
        }
    }
}

impl ProducerContext for ProbeContext {
    type DeliveryOpaque = ();

    fn delivery(&self, _report: &DeliveryResult<'_>, _opaque: ()) {}
}

/// Route librdkafka's log lines into tracing.
fn forward_log(level: RDKafkaLogLevel, facility: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", facility, "{message}");
        }
        RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", facility, "{message}"),
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", facility, "{message}");
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
    }
}

/// The context of Weir's producers and admin clients: logs into tracing.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogContext;

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        forward_log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        report_client_error(None, &error, reason);
    }
}

impl ConsumerContext for LogContext {}

/// Log an error a running client reported. TLS and SASL failures are errors (they repeat until
/// the settings or the broker change); the rest are warnings (librdkafka retries them).
fn report_client_error(topic: Option<&str>, error: &KafkaError, reason: &str) {
    match error
        .rdkafka_error_code()
        .and_then(|code| SecurityFailure::of(code, reason))
    {
        Some(SecurityFailure::Tls) => {
            tracing::error!(topic, %error, reason, "kafka TLS failed");
        }
        Some(SecurityFailure::Authentication) => {
            tracing::error!(topic, %error, reason, "kafka authentication failed");
        }
        None => tracing::warn!(topic, %error, reason, "kafka client error"),
    }
}

/// A connection to a Kafka cluster: creates topics, subscriptions and publishers.
pub struct KafkaTransport {
    config: KafkaConfig,
    /// Holds the SASL password: never log it.
    client: ClientConfig,
    admin: Arc<AdminClient<LogContext>>,
}

impl fmt::Debug for KafkaTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaTransport")
            .field("bootstrap", &self.config.bootstrap)
            .finish()
    }
}

impl KafkaTransport {
    /// Build the clients and check that the cluster answers a metadata request (bounded).
    /// Does not validate the config: call [`KafkaConfig::validate`] first.
    pub async fn connect(config: &KafkaConfig) -> Result<Self, TransportError> {
        let client = config.client_config()?;
        let admin: AdminClient<LogContext> = client
            .create_with_context(LogContext)
            .map_err(client_creation_error)?;
        let admin = Arc::new(admin);
        probe_cluster(config, &client).await?;
        Ok(Self {
            config: config.clone(),
            client,
            admin,
        })
    }

    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    /// Create `name` unless it exists ("already exists" is success).
    pub async fn ensure_topic(
        &self,
        name: &str,
        partitions: i32,
        replication: i32,
    ) -> Result<(), TransportError> {
        let topic_error = |reason: String| TransportError::Subscribe {
            topic: name.to_owned(),
            reason,
        };
        let new_topic = NewTopic::new(name, partitions, TopicReplication::Fixed(replication));
        let options = AdminOptions::new().request_timeout(Some(ADMIN_TIMEOUT));
        let results = self
            .admin
            .create_topics([&new_topic], &options)
            .await
            .map_err(|e| topic_error(e.to_string()))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => return Err(topic_error(format!("creating topic: {code}"))),
            }
        }
        Ok(())
    }

    /// [`Self::ensure_topic`] with `topic_defaults`, when `create_topics` is on; else a no-op.
    pub async fn ensure_topic_if_configured(&self, name: &str) -> Result<(), TransportError> {
        if !self.config.create_topics {
            return Ok(());
        }
        let defaults = self.config.topic_defaults;
        self.ensure_topic(name, defaults.partitions, defaults.replication_factor)
            .await
    }

    /// Join consumer group `group_id` on `topic` (one group per function). New groups start at
    /// the earliest offset unless `options` sets `auto.offset.reset`.
    pub fn subscribe(
        &self,
        topic: &str,
        group_id: &str,
        ordering: Ordering,
        max_in_flight: usize,
    ) -> Result<KafkaSubscription, TransportError> {
        let mut client = self.client.clone();
        client
            .set(
                "session.timeout.ms",
                millis_or_max(self.config.session_timeout),
            )
            .set(
                "max.poll.interval.ms",
                millis_or_max(self.config.max_poll_interval),
            );
        if !self.config.options.contains_key("auto.offset.reset") {
            client.set("auto.offset.reset", "earliest");
        }
        KafkaSubscription::start(
            client,
            consumer::SubscriptionSettings {
                topic: topic.to_owned(),
                group_id: group_id.to_owned(),
                ordering,
                max_in_flight,
                commit_interval: self.config.commit_interval,
                drain_timeout: self.config.drain_timeout,
                max_buffered_per_partition: self.config.max_buffered_per_partition,
            },
        )
    }

    /// An idempotent, `acks=all` producer.
    pub fn publisher(&self) -> Result<KafkaPublisher, TransportError> {
        let mut client = self.client.clone();
        client
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set(
                "message.timeout.ms",
                millis_or_max(self.config.publish_timeout),
            );
        let producer: FutureProducer<LogContext> = client
            .create_with_context(LogContext)
            .map_err(client_creation_error)?;
        Ok(KafkaPublisher {
            producer: std::sync::RwLock::new(producer),
            client_config: client,
            timeout: self.config.publish_timeout,
        })
    }

    /// The committed offset of every partition of `topic` for `group_id`, as the broker has it
    /// (`None` where the group committed nothing). Does not join the group.
    pub async fn committed_offsets(
        &self,
        topic: &str,
        group_id: &str,
    ) -> Result<BTreeMap<i32, Option<i64>>, TransportError> {
        let lag_error = |reason: String| TransportError::Lag {
            topic: topic.to_owned(),
            reason,
        };
        let mut client = self.client.clone();
        client
            .set("group.id", group_id)
            .set("enable.auto.commit", "false");
        let consumer: BaseConsumer<LogContext> = client
            .create_with_context(LogContext)
            .map_err(|e| lag_error(e.to_string()))?;
        let topic_name = topic.to_owned();
        let result = tokio::task::spawn_blocking(move || -> Result<_, KafkaError> {
            let metadata = consumer.fetch_metadata(Some(&topic_name), ADMIN_TIMEOUT)?;
            let mut list = rdkafka::TopicPartitionList::new();
            for meta in metadata.topics().iter().filter(|t| t.name() == topic_name) {
                for partition in meta.partitions() {
                    list.add_partition(&topic_name, partition.id());
                }
            }
            let committed = consumer.committed_offsets(list, ADMIN_TIMEOUT)?;
            Ok(committed
                .elements()
                .iter()
                .map(|e| match e.offset() {
                    Offset::Offset(offset) => (e.partition(), Some(offset)),
                    _ => (e.partition(), None),
                })
                .collect())
        })
        .await
        .map_err(|e| lag_error(e.to_string()))?;
        result.map_err(|e| lag_error(e.to_string()))
    }
}

/// Confirmed publishing to Kafka: `publish` returns once the delivery report arrived.
///
/// An idempotent producer can hit a *fatal* error (e.g. UnknownProducerId after a broker lost
/// its state in a restart); librdkafka then refuses every later send. The publisher replaces
/// such a producer with a fresh one, so the caller's retry (output retry, DLQ hold) succeeds
/// once the broker is back instead of failing forever.
pub struct KafkaPublisher {
    producer: std::sync::RwLock<FutureProducer<LogContext>>,
    client_config: ClientConfig,
    timeout: Duration,
}

impl fmt::Debug for KafkaPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaPublisher")
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl KafkaPublisher {
    /// Publish one record and wait for its delivery report. `payload: None` writes a null
    /// value (a tombstone), which [`OutboundMessage`] cannot express.
    pub async fn publish_record<N: AsRef<str>, V: AsRef<str>>(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        headers: &[(N, V)],
        payload: Option<&[u8]>,
    ) -> Result<(), TransportError> {
        let mut owned_headers = OwnedHeaders::new_with_capacity(headers.len());
        for (key, value) in headers {
            owned_headers = owned_headers.insert(Header {
                key: key.as_ref(),
                value: Some(value.as_ref().as_bytes()),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(topic).headers(owned_headers);
        if let Some(payload) = payload {
            record = record.payload(payload);
        }
        if let Some(key) = key {
            record = record.key(key);
        }
        let timeout_error = || TransportError::PublishTimeout {
            topic: topic.to_owned(),
            timeout: self.timeout,
        };
        // The queue wait and the delivery report are each bounded by `timeout`; the outer bound
        // only guards against a report that never comes.
        let producer = self.current_producer();
        let send = producer.send(record, Timeout::After(self.timeout));
        let outcome = tokio::time::timeout(self.timeout * 2 + Duration::from_secs(1), send)
            .await
            .map_err(|_| timeout_error());
        let result = match outcome {
            Err(error) => Err(error),
            Ok(Ok(_delivery)) => Ok(()),
            Ok(Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut), _))) => {
                Err(timeout_error())
            }
            // librdkafka's own check against `message.max.bytes`, or the broker's answer.
            Ok(Err((
                error @ KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
                _,
            ))) => Err(TransportError::TooLarge {
                topic: topic.to_owned(),
                reason: error.to_string(),
            }),
            Ok(Err((error, _))) => Err(TransportError::Publish {
                topic: topic.to_owned(),
                reason: error.to_string(),
            }),
        };
        metrics_events::published(if result.is_ok() { "ok" } else { "error" });
        if result.is_err() {
            self.replace_if_fatal(&producer);
        }
        result
    }

    fn current_producer(&self) -> FutureProducer<LogContext> {
        self.producer
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replace `failed` with a new producer when librdkafka declared it fatally broken (once,
    /// even when several publishes fail on it at the same time).
    fn replace_if_fatal(&self, failed: &FutureProducer<LogContext>) {
        let Some((code, reason)) = failed.client().fatal_error() else {
            return;
        };
        let mut current = self
            .producer
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.client().fatal_error().is_none() {
            return;
        }
        match self.client_config.create_with_context(LogContext) {
            Ok(fresh) => {
                tracing::warn!(
                    ?code,
                    reason,
                    "Kafka producer hit a fatal error; replaced it with a new one"
                );
                metrics_events::producer_replaced();
                *current = fresh;
            }
            Err(error) => {
                tracing::error!(%error, "Kafka producer hit a fatal error and a new one could not be created");
            }
        }
    }
}

#[async_trait]
impl Publisher for KafkaPublisher {
    /// Kafka does not de-duplicate by `dedup_id` (outputs are keyed by it instead): every
    /// confirmed publish is [`Published::Stored`].
    async fn publish(&self, message: OutboundMessage) -> Result<Published, TransportError> {
        self.publish_record(
            &message.topic,
            message.key.as_deref(),
            &message.headers,
            Some(&message.payload[..]),
        )
        .await
        .map(|()| Published::Stored)
    }

    fn broker(&self) -> BrokerKind {
        BrokerKind::Kafka
    }
}

/// Every metric this module emits. Labels are bounded: no topic, key or offset.
mod metrics_events {
    /// A fatally broken idempotent producer was replaced.
    pub(super) fn producer_replaced() {
        metrics::counter!("weir_kafka_producer_replacements_total").increment(1);
    }

    /// An offset commit finished (`outcome`: ok | error).
    pub(super) fn commit(outcome: &'static str) {
        metrics::counter!("weir_kafka_offset_commits_total", "outcome" => outcome).increment(1);
    }

    /// A rebalance event (`kind`: assign | revoke | lost | error).
    pub(super) fn rebalance(kind: &'static str) {
        metrics::counter!("weir_kafka_rebalances_total", "kind" => kind).increment(1);
    }

    /// Partitions paused because their buffer was full.
    pub(super) fn partitions_paused(count: usize) {
        metrics::counter!("weir_kafka_partition_pauses_total")
            .increment(u64::try_from(count).unwrap_or(u64::MAX));
    }

    /// A delivery handed back to its lane (`reason`: retry | dropped).
    pub(super) fn redelivered(reason: &'static str) {
        metrics::counter!("weir_kafka_redeliveries_total", "reason" => reason).increment(1);
    }

    /// A header value that was not UTF-8 and was converted lossily.
    pub(super) fn lossy_header() {
        metrics::counter!("weir_kafka_lossy_headers_total").increment(1);
    }

    /// A publish finished (`outcome`: ok | error).
    pub(super) fn published(outcome: &'static str) {
        metrics::counter!("weir_kafka_publishes_total", "outcome" => outcome).increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<KafkaConfig, serde::de::value::Error> {
        // A map of strings stands in for the TOML loader: the same derive is exercised.
        KafkaConfig::deserialize(serde::de::value::MapDeserializer::new(
            pairs.iter().copied(),
        ))
    }

    #[test]
    fn defaults_are_valid() {
        let config = KafkaConfig::default();
        assert_eq!(config.bootstrap, "127.0.0.1:9092");
        assert!(
            config.validate("kafka").is_empty(),
            "{:?}",
            config.validate("kafka")
        );
    }

    #[test]
    fn unknown_keys_are_refused_and_durations_are_human() {
        assert!(parse(&[("bootstrapp", "x:1")]).is_err());
        let config = parse(&[("session_timeout", "10s"), ("commit_interval", "250ms")]).unwrap();
        assert_eq!(config.session_timeout, Duration::from_secs(10));
        assert_eq!(config.commit_interval, Duration::from_millis(250));
    }

    #[test]
    fn validation_lists_every_problem_with_its_path() {
        let mut config = KafkaConfig {
            bootstrap: "nohost".to_owned(),
            ..Default::default()
        };
        config.sasl_mechanism = Some(SaslMechanism::Plain);
        config
            .options
            .insert("enable.auto.commit".to_owned(), "true".to_owned());
        config
            .options
            .insert("enable.idempotence".to_owned(), "false".to_owned());
        config.options.insert("acks".to_owned(), "1".to_owned());
        config
            .options
            .insert("sasl.password".to_owned(), "hunter2".to_owned());
        config
            .options
            .insert("linger.ms".to_owned(), "5".to_owned());
        config.topic_defaults.partitions = 0;
        let problems = config.validate("kafka");
        let has = |needle: &str| problems.iter().any(|p| p.starts_with(needle));
        assert!(has("kafka.bootstrap:"), "{problems:?}");
        assert!(has("kafka.security_protocol:"), "{problems:?}");
        assert!(has("kafka.sasl_username:"), "{problems:?}");
        assert!(has("kafka.sasl_password_file:"), "{problems:?}");
        assert!(has("kafka.options.\"enable.auto.commit\":"), "{problems:?}");
        assert!(has("kafka.options.\"enable.idempotence\":"), "{problems:?}");
        assert!(has("kafka.options.\"acks\":"), "{problems:?}");
        assert!(has("kafka.options.\"sasl.password\":"), "{problems:?}");
        assert!(has("kafka.topic_defaults.partitions:"), "{problems:?}");
        assert!(!has("kafka.options.\"linger.ms\""), "{problems:?}");
        assert_eq!(problems.len(), 9, "{problems:?}");
    }

    #[test]
    fn tls_files_need_a_tls_protocol_and_come_in_pairs() {
        let existing = std::env::temp_dir();
        let mut config = KafkaConfig {
            security_protocol: Some(SecurityProtocol::SaslPlaintext),
            sasl_mechanism: Some(SaslMechanism::ScramSha256),
            sasl_username: Some("weir".to_owned()),
            sasl_password_env: Some("KAFKA_PASSWORD".to_owned()),
            ssl_ca_location: Some(existing.clone()),
            ssl_certificate_location: Some(existing.clone()),
            ..Default::default()
        };
        let problems = config.validate("kafka");
        let has = |needle: &str| problems.iter().any(|p| p.starts_with(needle));
        assert!(has("kafka.ssl_ca_location: only used with"), "{problems:?}");
        assert!(
            has("kafka.ssl_certificate_location: only used with"),
            "{problems:?}"
        );
        assert!(
            has("kafka.ssl_key_location: required with ssl_certificate_location"),
            "{problems:?}"
        );
        assert_eq!(problems.len(), 3, "{problems:?}");

        config.security_protocol = Some(SecurityProtocol::SaslSsl);
        config.ssl_key_location = Some(existing);
        assert!(
            config.validate("kafka").is_empty(),
            "{:?}",
            config.validate("kafka")
        );
    }

    #[test]
    fn tls_and_sasl_failures_are_classified() {
        assert_eq!(
            SecurityFailure::of(RDKafkaErrorCode::SSL, ""),
            Some(SecurityFailure::Tls)
        );
        for code in [
            RDKafkaErrorCode::Authentication,
            RDKafkaErrorCode::SaslAuthenticationFailed,
            RDKafkaErrorCode::UnsupportedSASLMechanism,
        ] {
            assert_eq!(
                SecurityFailure::of(code, ""),
                Some(SecurityFailure::Authentication)
            );
        }
        let alert = "ssl://b:9093/bootstrap: Receive failed: error:0A00045C:SSL routines::\
                     tlsv13 alert certificate required:SSL alert number 116";
        assert_eq!(
            SecurityFailure::of(RDKafkaErrorCode::BrokerTransportFailure, alert),
            Some(SecurityFailure::Tls)
        );
        let reset = "ssl://b:9093/bootstrap: Disconnected: connection reset by peer";
        assert_eq!(
            SecurityFailure::of(RDKafkaErrorCode::BrokerTransportFailure, reset),
            None
        );
        assert_eq!(
            SecurityFailure::of(RDKafkaErrorCode::OperationTimedOut, ""),
            None
        );
        let error = client_creation_error(KafkaError::ClientCreation(
            "ssl.ca.location failed: no such file".to_owned(),
        ));
        assert!(matches!(error, TransportError::Tls { .. }), "{error:?}");
        let error = client_creation_error(KafkaError::ClientCreation(
            "Invalid value for configuration property \"linger.ms\"".to_owned(),
        ));
        assert!(matches!(error, TransportError::Connect { .. }), "{error:?}");
    }

    #[test]
    fn protocol_mismatches_get_a_hint() {
        let plaintext_to_tls = "127.0.0.1:9093/bootstrap: Disconnected: connection closed by \
                                peer: receive 0 after POLLIN (after 0ms in state \
                                APIVERSION_QUERY)";
        let hint = mismatch_hint(SecurityProtocol::Plaintext, plaintext_to_tls).unwrap();
        assert!(hint.contains("expect TLS"), "{hint}");
        assert_eq!(mismatch_hint(SecurityProtocol::Ssl, plaintext_to_tls), None);

        let tls_to_plaintext = "ssl://127.0.0.1:9092/bootstrap: Connection setup timed out in \
                                state SSL_HANDSHAKE (after 4003ms in state SSL_HANDSHAKE)";
        let hint = mismatch_hint(SecurityProtocol::Ssl, tls_to_plaintext).unwrap();
        assert!(hint.contains("speak TLS"), "{hint}");

        let no_sasl = "ssl://127.0.0.1:9093/bootstrap: Disconnected: SSL connection closed by \
                       peer (after 0ms in state UP)";
        let hint = mismatch_hint(SecurityProtocol::Ssl, no_sasl).unwrap();
        assert!(hint.contains("require SASL"), "{hint}");
        assert_eq!(mismatch_hint(SecurityProtocol::SaslSsl, no_sasl), None);
        // The same hang-up, met while the first request was still being written.
        let no_sasl_on_send = "ssl://127.0.0.1:42183/bootstrap: Send failed: SSL transport \
                               error: Broken pipe (after 0ms in state UP)";
        let hint = mismatch_hint(SecurityProtocol::Ssl, no_sasl_on_send).unwrap();
        assert!(hint.contains("require SASL"), "{hint}");

        let refused = "127.0.0.1:9092/bootstrap: Connect to ipv4#127.0.0.1:9092 failed: \
                       Connection refused (after 0ms in state CONNECT)";
        assert_eq!(mismatch_hint(SecurityProtocol::Plaintext, refused), None);
        assert_eq!(
            without_thread_name("[thrd:ssl://b:1/bootstrap]: ssl://b:1/bootstrap: x"),
            "ssl://b:1/bootstrap: x"
        );
    }

    /// TLS and SCRAM need librdkafka built with OpenSSL (the `rdkafka/ssl` feature).
    #[test]
    fn librdkafka_has_tls_and_scram() {
        let features = ClientConfig::new()
            .create_native_config()
            .unwrap()
            .get("builtin.features")
            .unwrap();
        let features: Vec<&str> = features.split(',').collect();
        for wanted in ["ssl", "sasl_plain", "sasl_scram"] {
            assert!(features.contains(&wanted), "{wanted} missing: {features:?}");
        }
    }

    /// The connect probe against a port nobody listens on: a connect error within the
    /// timeout, naming the bootstrap server and librdkafka's last error.
    #[tokio::test]
    async fn connect_to_nothing_fails_with_the_last_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let config = KafkaConfig {
            bootstrap: format!("127.0.0.1:{port}"),
            ..Default::default()
        };
        let started = std::time::Instant::now();
        let error = KafkaTransport::connect(&config).await.unwrap_err();
        assert!(started.elapsed() < ADMIN_TIMEOUT + Duration::from_secs(3));
        let text = error.to_string();
        assert!(matches!(error, TransportError::Connect { .. }), "{text}");
        assert!(text.contains(&config.bootstrap), "{text}");
        assert!(text.contains("last error"), "{text}");
    }

    #[test]
    fn debug_never_shows_secrets() {
        let mut config = KafkaConfig {
            sasl_password_env: Some("KAFKA_PASSWORD_VAR".to_owned()),
            ..Default::default()
        };
        config
            .options
            .insert("ssl.key.password".to_owned(), "hunter2".to_owned());
        let text = format!("{config:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(!text.contains("KAFKA_PASSWORD_VAR"), "{text}");
        assert!(text.contains("<redacted>"));
    }

    #[test]
    fn password_comes_from_the_file_without_its_newline() {
        let dir = std::env::temp_dir().join(format!("weir-kafka-secret-{}", std::process::id()));
        std::fs::write(&dir, "s3cret\n").unwrap();
        let config = KafkaConfig {
            sasl_password_file: Some(dir.clone()),
            ..Default::default()
        };
        assert_eq!(config.sasl_password().unwrap().as_deref(), Some("s3cret"));
        std::fs::remove_file(&dir).unwrap();
    }
}
