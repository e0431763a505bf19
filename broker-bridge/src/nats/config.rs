//! The NATS section of `weir.toml`: connection, JetStream consumer options and stream settings,
//! each with a `validate` that reports every problem with its key path.
//!
//! Secrets are never stored here: only *where* to read them (a file or an environment
//! variable). They are read at connect time and never logged; `Debug` is written by hand so a
//! server URL with credentials in it cannot leak either. This module does no network I/O.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

/// How Weir connects to NATS (`[brokers.nats]`).
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URLs (`nats://host:port`, `tls://host:port`). Credentials in URLs are refused:
    /// use `user` + `password_file`/`password_env`.
    pub servers: Vec<String>,
    /// Connection name shown by the server (`/connz`).
    pub name: Option<String>,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    /// Name of the environment variable holding the password.
    pub password_env: Option<String>,
    pub token_file: Option<PathBuf>,
    pub token_env: Option<String>,
    pub nkey_seed_file: Option<PathBuf>,
    /// A `.creds` file (JWT + nkey seed).
    pub creds_file: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_required: bool,
    /// Consecutive failed reconnect attempts before giving up; absent = reconnect forever.
    pub max_reconnects: Option<usize>,
    /// Upper bound of the exponential delay between reconnect attempts.
    #[serde(with = "humantime_serde")]
    pub reconnect_delay_max: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long, in all, a weir starting up keeps trying to reach a server that does not
    /// answer (not up yet, its name not resolving yet) and a JetStream that does not answer (a
    /// cluster without its majority) before it gives up; zero gives up at once. Refused
    /// credentials and TLS failures stop it at once: trying again would fail again.
    #[serde(with = "humantime_serde")]
    pub startup_wait: Duration,
    /// Timeout of JetStream API requests, acks that wait for confirmation and publish acks.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            servers: vec!["nats://127.0.0.1:4222".to_owned()],
            name: None,
            user: None,
            password_file: None,
            password_env: None,
            token_file: None,
            token_env: None,
            nkey_seed_file: None,
            creds_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_required: false,
            max_reconnects: None,
            reconnect_delay_max: Duration::from_secs(4),
            connect_timeout: Duration::from_secs(5),
            startup_wait: Duration::from_secs(30),
            request_timeout: Duration::from_secs(5),
        }
    }
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let servers: Vec<String> = self.servers.iter().map(|s| redact_url(s)).collect();
        f.debug_struct("NatsConfig")
            .field("servers", &servers)
            .field("name", &self.name)
            .field("auth", &self.auth_method())
            .field("user", &self.user)
            .field("password_file", &self.password_file)
            .field("password_env", &self.password_env)
            .field("token_file", &self.token_file)
            .field("token_env", &self.token_env)
            .field("nkey_seed_file", &self.nkey_seed_file)
            .field("creds_file", &self.creds_file)
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("tls_required", &self.tls_required)
            .field("max_reconnects", &self.max_reconnects)
            .field("reconnect_delay_max", &self.reconnect_delay_max)
            .field("connect_timeout", &self.connect_timeout)
            .field("startup_wait", &self.startup_wait)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

/// Replaces the user-info part of a URL (`nats://user:pass@host`) by `***`.
fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let redacted = match rest[..authority_end].rfind('@') {
        Some(at) => format!("***@{}", &rest[at + 1..]),
        None => rest.to_owned(),
    };
    match scheme {
        Some(scheme) => format!("{scheme}://{redacted}"),
        None => redacted,
    }
}

impl NatsConfig {
    /// The server URLs for logs and errors, any user-info in them replaced by `***`.
    pub(crate) fn redacted_servers(&self) -> String {
        let servers: Vec<String> = self.servers.iter().map(|s| redact_url(s)).collect();
        servers.join(", ")
    }

    /// Which authentication method is configured, for logs (never the secret).
    pub fn auth_method(&self) -> &'static str {
        if self.creds_file.is_some() {
            "creds"
        } else if self.nkey_seed_file.is_some() {
            "nkey"
        } else if self.token_file.is_some() || self.token_env.is_some() {
            "token"
        } else if self.user.is_some() {
            "user_password"
        } else {
            "none"
        }
    }

    /// Every problem in this section, each prefixed with its key path (`path` is the section's
    /// own path, e.g. `brokers.nats`). Checks that referenced files exist and environment
    /// variables are set, so a bad secret location fails before any connection.
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut problems = Vec::new();
        if self.servers.is_empty() {
            problems.push(format!("{path}.servers: at least one server is required"));
        }
        for (index, server) in self.servers.iter().enumerate() {
            let key = format!("{path}.servers[{index}]");
            match async_nats::ServerAddr::from_str(server) {
                Ok(addr) => {
                    if addr.username().is_some() || addr.password().is_some() {
                        problems.push(format!(
                            "{key}: credentials in a server URL would end up in logs; use \
                             user with password_file/password_env, token_file/token_env, \
                             nkey_seed_file or creds_file"
                        ));
                    }
                }
                Err(err) => problems.push(format!(
                    "{key}: `{}` is not a NATS server URL: {err}",
                    redact_url(server)
                )),
            }
        }
        if self.name.as_deref() == Some("") {
            problems.push(format!("{path}.name: must not be empty when set"));
        }

        let has_password = self.password_file.is_some() || self.password_env.is_some();
        if self.user.as_deref() == Some("") {
            problems.push(format!("{path}.user: must not be empty when set"));
        }
        if self.user.is_some() && !has_password {
            problems.push(format!(
                "{path}.user: set without password_file or password_env"
            ));
        }
        if has_password && self.user.is_none() {
            problems.push(format!(
                "{path}.password_file/password_env: set without user"
            ));
        }
        if self.password_file.is_some() && self.password_env.is_some() {
            problems.push(format!(
                "{path}.password_file: set together with password_env; choose one"
            ));
        }
        if self.token_file.is_some() && self.token_env.is_some() {
            problems.push(format!(
                "{path}.token_file: set together with token_env; choose one"
            ));
        }
        let methods = [
            self.user.is_some() || has_password,
            self.token_file.is_some() || self.token_env.is_some(),
            self.nkey_seed_file.is_some(),
            self.creds_file.is_some(),
        ];
        if methods.iter().filter(|set| **set).count() > 1 {
            problems.push(format!(
                "{path}: more than one authentication method is set (user/password, token, \
                 nkey_seed_file, creds_file); choose one"
            ));
        }

        for (key, file) in [
            ("password_file", &self.password_file),
            ("token_file", &self.token_file),
            ("nkey_seed_file", &self.nkey_seed_file),
            ("creds_file", &self.creds_file),
            ("tls_ca", &self.tls_ca),
            ("tls_cert", &self.tls_cert),
            ("tls_key", &self.tls_key),
        ] {
            if let Some(file) = file {
                check_file(&mut problems, &format!("{path}.{key}"), file);
            }
        }
        for (key, var) in [
            ("password_env", &self.password_env),
            ("token_env", &self.token_env),
        ] {
            if let Some(var) = var {
                check_env(&mut problems, &format!("{path}.{key}"), var);
            }
        }

        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => problems.push(format!("{path}.tls_cert: set without tls_key")),
            (None, Some(_)) => problems.push(format!("{path}.tls_key: set without tls_cert")),
            _ => {}
        }
        if self.max_reconnects == Some(0) {
            problems.push(format!(
                "{path}.max_reconnects: 0 is ambiguous; leave it out to reconnect forever"
            ));
        }
        for (key, value) in [
            ("reconnect_delay_max", self.reconnect_delay_max),
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
        ] {
            if value.is_zero() {
                problems.push(format!("{path}.{key}: must be greater than zero"));
            }
        }
        problems
    }
}

fn check_file(problems: &mut Vec<String>, key: &str, file: &Path) {
    if !file.is_file() {
        problems.push(format!(
            "{key}: {} does not exist or is not a file",
            file.display()
        ));
    }
}

fn check_env(problems: &mut Vec<String>, key: &str, var: &str) {
    if var.is_empty() {
        problems.push(format!("{key}: the variable name must not be empty"));
    } else if std::env::var_os(var).is_none_or(|value| value.is_empty()) {
        problems.push(format!(
            "{key}: environment variable {var} is not set or empty"
        ));
    }
}

/// Where a new consumer starts in its stream: JetStream's deliver policies. In configuration
/// a name (`"all"`, `"new"`, `"last"`, `"last_per_subject"`) or a table of one key
/// (`{ start_sequence = 42 }`, `{ start_time = "2026-12-01T00:00:00Z" }`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeliverFrom {
    /// Every message still in the stream.
    #[default]
    All,
    /// Only messages stored after the consumer was created.
    New,
    /// The last message the consumer's subjects hold, then what comes after it.
    Last,
    /// The last message of each of the consumer's subjects, then what comes after.
    LastPerSubject,
    /// From this stream sequence (1 is the stream's first message ever).
    StartSequence(u64),
    /// From the first message stored at or after this time.
    StartTime(time::OffsetDateTime),
}

const DELIVER_FROM_EXPECTED: &str = "\"all\", \"new\", \"last\", \"last_per_subject\", \
     { start_sequence = N } or { start_time = \"<RFC 3339 time>\" }";

impl<'de> Deserialize<'de> for DeliverFrom {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(DeliverFromVisitor)
    }
}

struct DeliverFromVisitor;

/// A deliver-policy table's value, whatever it is: it never fails to deserialize.
#[derive(Deserialize)]
#[serde(untagged)]
enum AnyScalar {
    Integer(i64),
    Text(String),
    Other(serde::de::IgnoredAny),
}

impl fmt::Display for AnyScalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AnyScalar::Integer(n) => write!(f, "{n}"),
            AnyScalar::Text(text) => write!(f, "{text:?}"),
            AnyScalar::Other(_) => f.write_str("a value of another kind"),
        }
    }
}

impl<'de> serde::de::Visitor<'de> for DeliverFromVisitor {
    type Value = DeliverFrom;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(DELIVER_FROM_EXPECTED)
    }

    fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<DeliverFrom, E> {
        match name {
            "all" => Ok(DeliverFrom::All),
            "new" => Ok(DeliverFrom::New),
            "last" => Ok(DeliverFrom::Last),
            "last_per_subject" => Ok(DeliverFrom::LastPerSubject),
            _ => Err(E::custom(format!(
                "unknown deliver policy {name:?}; expected {DELIVER_FROM_EXPECTED}"
            ))),
        }
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<DeliverFrom, A::Error> {
        use serde::de::Error as _;
        let one_key = || {
            A::Error::custom(format!(
                "a deliver policy table holds one key, start_sequence or start_time; expected \
                 {DELIVER_FROM_EXPECTED}"
            ))
        };
        let Some(key) = map.next_key::<String>()? else {
            return Err(one_key());
        };
        // Whatever the key holds is read, then judged here, so that every problem is reported
        // as the policy's (one message, at `deliver_policy`), not some at a key below it.
        let value = map.next_value::<AnyScalar>()?;
        let from = match (key.as_str(), value) {
            ("start_sequence", AnyScalar::Integer(sequence)) if sequence >= 1 => {
                DeliverFrom::StartSequence(sequence.unsigned_abs())
            }
            ("start_sequence", value) => {
                return Err(A::Error::custom(format!(
                    "start_sequence is a stream sequence, counted from 1 (the stream's first \
                     message); got {value}"
                )))
            }
            ("start_time", AnyScalar::Text(text)) => {
                let at = time::OffsetDateTime::parse(
                    &text,
                    &time::format_description::well_known::Rfc3339,
                )
                .map_err(|e| {
                    A::Error::custom(format!(
                        "start_time {text:?} is not an RFC 3339 time such as \
                         \"2026-12-01T00:00:00Z\": {e}"
                    ))
                })?;
                DeliverFrom::StartTime(at)
            }
            ("start_time", value) => {
                return Err(A::Error::custom(format!(
                    "start_time is an RFC 3339 time in quotes, such as \
                     \"2026-12-01T00:00:00Z\"; got {value}"
                )))
            }
            _ => return Err(one_key()),
        };
        if map.next_key::<String>()?.is_some() {
            return Err(one_key());
        }
        Ok(from)
    }
}

/// How a JetStream trigger's pull consumer is set up.
///
/// Weir counts attempts and dead-letters by itself, so the broker-side retry knobs are kept
/// out of the way:
/// - `max_deliver` defaults to -1 (unlimited). With a finite MaxDeliver, a dispatcher that
///   crashes during the last allowed delivery leaves the message in the stream, never delivered
///   again and never dead-lettered (the server only emits a core-NATS advisory, which is lost
///   if nobody listens). With -1 the message comes back after `ack_wait`, Weir reads the
///   delivery count from its metadata, sees the budget is spent and writes the DLQ record.
/// - `backoff` must stay empty. A JetStream BackOff silently replaces AckWait with
///   `backoff[0]` (so in-progress heartbeats sized for `ack_wait` come too late), applies only
///   to ack timeouts and never to NAKs, and requires a finite `max_deliver`. Retry delays
///   belong to the function's retry policy, which Weir applies with NAK-with-delay. The key
///   exists only to refuse it with that explanation instead of "unknown field".
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JetStreamConsumerOptions {
    pub stream: String,
    /// Durable consumer name, shared by every dispatcher of the function. Absent: an ephemeral
    /// consumer with a generated name that the server removes 5 minutes after it goes idle
    /// (tests, ad-hoc runs).
    #[serde(default)]
    pub durable: Option<String>,
    /// Time the server waits for a settle before redelivering. Size it above the function's
    /// p99 plus its timeout; long invocations send in-progress heartbeats.
    #[serde(default = "default_ack_wait", with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Server-side cap on unsettled messages; absent: `max_in_flight × (1 + prefetch)` with the
    /// `max_in_flight` given at subscribe time (the function's maximum instance count).
    #[serde(default)]
    pub max_ack_pending: Option<i64>,
    /// Messages fetched ahead for each in-flight slot. They wait in a local buffer (with
    /// in-progress heartbeats, so they are not redelivered while they wait) and spare each
    /// delivery a pull round trip. 0 fetches only what the slots can take at once.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    #[serde(default = "default_max_deliver")]
    pub max_deliver: i64,
    #[serde(default, deserialize_with = "deserialize_durations")]
    pub backoff: Vec<Duration>,
    /// Where a new consumer starts; an existing durable keeps its place.
    #[serde(default)]
    pub deliver_policy: DeliverFrom,
    /// Narrows the consumer to these subjects; absent: the trigger's subject.
    #[serde(default)]
    pub filter_subject: Option<String>,
}

fn default_ack_wait() -> Duration {
    Duration::from_secs(30)
}

fn default_max_deliver() -> i64 {
    -1
}

/// Enough that a pull request's round trip is paid once per dozens of deliveries, small enough
/// that one dispatcher does not hoard a shared durable consumer's backlog.
pub const DEFAULT_PREFETCH: usize = 32;

/// Beyond this a buffer mostly holds other dispatchers' work hostage.
pub const MAX_PREFETCH: usize = 1024;

fn default_prefetch() -> usize {
    DEFAULT_PREFETCH
}

fn deserialize_durations<'de, D>(deserializer: D) -> Result<Vec<Duration>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let wrapped: Vec<humantime_serde::Serde<Duration>> = Vec::deserialize(deserializer)?;
    Ok(wrapped
        .into_iter()
        .map(humantime_serde::Serde::into_inner)
        .collect())
}

impl JetStreamConsumerOptions {
    /// Options with defaults for `stream`.
    pub fn new(stream: impl Into<String>) -> Self {
        Self {
            stream: stream.into(),
            durable: None,
            ack_wait: default_ack_wait(),
            max_ack_pending: None,
            prefetch: DEFAULT_PREFETCH,
            max_deliver: default_max_deliver(),
            backoff: Vec::new(),
            deliver_policy: DeliverFrom::All,
            filter_subject: None,
        }
    }

    /// The consumer's `max_ack_pending` for `max_in_flight` slots: the configured one, else
    /// each slot plus what is fetched ahead for it.
    pub fn max_ack_pending_for(&self, max_in_flight: usize) -> i64 {
        self.max_ack_pending.unwrap_or_else(|| {
            i64::try_from(max_in_flight.saturating_mul(self.prefetch.saturating_add(1)))
                .unwrap_or(i64::MAX)
        })
    }

    /// Every problem, each prefixed with its key path.
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut problems = Vec::new();
        check_name(&mut problems, &format!("{path}.stream"), &self.stream);
        if let Some(durable) = &self.durable {
            check_name(&mut problems, &format!("{path}.durable"), durable);
        }
        if self.ack_wait < Duration::from_millis(100) {
            problems.push(format!("{path}.ack_wait: must be at least 100ms"));
        }
        if let Some(max) = self.max_ack_pending {
            if max < 1 {
                problems.push(format!("{path}.max_ack_pending: must be at least 1"));
            }
        }
        if self.prefetch > MAX_PREFETCH {
            problems.push(format!(
                "{path}.prefetch: at most {MAX_PREFETCH} per slot (each waiting message holds \
                 an ack deadline and a place in max_ack_pending)"
            ));
        }
        if self.max_deliver == 0 || self.max_deliver < -1 {
            problems.push(format!(
                "{path}.max_deliver: must be -1 (unlimited; Weir counts attempts) or at least 1"
            ));
        }
        if !self.backoff.is_empty() {
            problems.push(format!(
                "{path}.backoff: not supported: a JetStream BackOff silently replaces ack_wait \
                 with its first entry and never applies to NAKs; set the function's retry \
                 policy (initial delay, multiplier, max delay) instead"
            ));
        }
        if let Some(filter) = &self.filter_subject {
            check_subject(&mut problems, &format!("{path}.filter_subject"), filter);
        }
        problems
    }
}

/// Where a stream keeps its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    #[default]
    File,
    Memory,
}

/// When a stream drops messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RetentionKind {
    #[default]
    Limits,
    Interest,
    WorkQueue,
}

/// What a full stream does with a new message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiscardKind {
    /// Drop the oldest messages.
    #[default]
    Old,
    /// Refuse the new message (the publisher gets an error).
    New,
}

/// A stream Weir creates when it is missing (`[[brokers.nats.streams]]`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    pub name: String,
    pub subjects: Vec<String>,
    #[serde(default)]
    pub storage: StorageKind,
    #[serde(default)]
    pub retention: RetentionKind,
    /// Absent: unlimited.
    #[serde(default)]
    pub max_msgs: Option<i64>,
    /// Absent: unlimited. Human-readable (`"64MiB"`).
    #[serde(default)]
    pub max_bytes: Option<ByteSize>,
    /// Absent: unlimited.
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// Window in which a repeated `Nats-Msg-Id` is dropped.
    #[serde(default = "default_duplicate_window", with = "humantime_serde")]
    pub duplicate_window: Duration,
    #[serde(default)]
    pub discard: DiscardKind,
}

fn default_replicas() -> usize {
    1
}

fn default_duplicate_window() -> Duration {
    Duration::from_secs(120)
}

impl StreamConfig {
    /// A file-backed, limits-retention stream with defaults.
    pub fn new(name: impl Into<String>, subjects: Vec<String>) -> Self {
        Self {
            name: name.into(),
            subjects,
            storage: StorageKind::File,
            retention: RetentionKind::Limits,
            max_msgs: None,
            max_bytes: None,
            max_age: None,
            replicas: default_replicas(),
            duplicate_window: default_duplicate_window(),
            discard: DiscardKind::Old,
        }
    }

    /// Every problem, each prefixed with its key path.
    pub fn validate(&self, path: &str) -> Vec<String> {
        let mut problems = Vec::new();
        check_name(&mut problems, &format!("{path}.name"), &self.name);
        if self.subjects.is_empty() {
            problems.push(format!("{path}.subjects: at least one subject is required"));
        }
        for (index, subject) in self.subjects.iter().enumerate() {
            check_subject(&mut problems, &format!("{path}.subjects[{index}]"), subject);
        }
        if let Some(max) = self.max_msgs {
            if max < 1 {
                problems.push(format!(
                    "{path}.max_msgs: must be at least 1 (leave out for unlimited)"
                ));
            }
        }
        if let Some(max) = self.max_bytes {
            if max.as_u64() == 0 || i64::try_from(max.as_u64()).is_err() {
                problems.push(format!(
                    "{path}.max_bytes: must be between 1 byte and 8 EiB"
                ));
            }
        }
        if !(1..=5).contains(&self.replicas) {
            problems.push(format!("{path}.replicas: must be between 1 and 5"));
        }
        if self.duplicate_window.is_zero() {
            problems.push(format!(
                "{path}.duplicate_window: must be greater than zero"
            ));
        }
        if let Some(max_age) = self.max_age {
            if max_age.is_zero() {
                problems.push(format!(
                    "{path}.max_age: must be greater than zero (leave out for unlimited)"
                ));
            } else if self.duplicate_window > max_age {
                problems.push(format!(
                    "{path}.duplicate_window: must not exceed max_age ({max_age:?})"
                ));
            }
        }
        problems
    }
}

/// A stream, consumer or durable name: no whitespace, `.`, `*` or `>`.
fn check_name(problems: &mut Vec<String>, key: &str, name: &str) {
    if name.is_empty() {
        problems.push(format!("{key}: must not be empty"));
    } else if name
        .chars()
        .any(|c| c.is_whitespace() || c == '.' || c == '*' || c == '>' || c.is_control())
    {
        problems.push(format!(
            "{key}: `{name}` must not contain whitespace, '.', '*' or '>'"
        ));
    }
}

/// A subject or subject filter: dot-separated non-empty tokens, `>` only last.
fn check_subject(problems: &mut Vec<String>, key: &str, subject: &str) {
    if subject.is_empty() {
        problems.push(format!("{key}: must not be empty"));
        return;
    }
    if subject.chars().any(|c| c.is_whitespace() || c.is_control()) {
        problems.push(format!("{key}: `{subject}` must not contain whitespace"));
        return;
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    for (index, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            problems.push(format!("{key}: `{subject}` has an empty token"));
            return;
        }
        if *token == ">" && index + 1 != tokens.len() {
            problems.push(format!(
                "{key}: `{subject}`: '>' may only be the last token"
            ));
            return;
        }
        if token.len() > 1 && (token.contains('*') || token.contains('>')) {
            problems.push(format!(
                "{key}: `{subject}`: wildcards must be whole tokens"
            ));
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_documentation() {
        let config = NatsConfig::default();
        assert_eq!(config.servers, vec!["nats://127.0.0.1:4222".to_owned()]);
        assert!(config.validate("brokers.nats").is_empty());
        let options = JetStreamConsumerOptions::new("EVENTS");
        assert_eq!(options.ack_wait, Duration::from_secs(30));
        assert_eq!(options.max_deliver, -1);
        assert!(options.validate("t").is_empty());
        let stream = StreamConfig::new("EVENTS", vec!["events.>".into()]);
        assert_eq!(stream.duplicate_window, Duration::from_secs(120));
        assert!(stream.validate("s").is_empty());
    }

    #[test]
    fn validate_reports_every_problem_with_its_path() {
        let config = NatsConfig {
            servers: vec!["nats://bob:secret@localhost:4222".into()],
            user: Some("alice".into()),
            token_env: Some("WEIR_TEST_SURELY_UNSET_TOKEN".into()),
            tls_cert: Some("/nonexistent/cert.pem".into()),
            request_timeout: Duration::ZERO,
            ..NatsConfig::default()
        };
        let problems = config.validate("brokers.nats");
        let expect = [
            "brokers.nats.servers[0]: credentials in a server URL",
            "brokers.nats.user: set without password_file or password_env",
            "brokers.nats: more than one authentication method",
            "brokers.nats.tls_cert: /nonexistent/cert.pem does not exist",
            "brokers.nats.token_env: environment variable WEIR_TEST_SURELY_UNSET_TOKEN",
            "brokers.nats.tls_cert: set without tls_key",
            "brokers.nats.request_timeout: must be greater than zero",
        ];
        for expected in expect {
            assert!(
                problems.iter().any(|p| p.starts_with(expected)),
                "missing `{expected}` in {problems:#?}"
            );
        }
        assert_eq!(problems.len(), expect.len(), "{problems:#?}");
    }

    #[test]
    fn debug_redacts_credentials_in_urls() {
        let config = NatsConfig {
            servers: vec!["nats://bob:secret@localhost:4222".into()],
            ..NatsConfig::default()
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(!shown.contains("bob"), "{shown}");
        assert!(shown.contains("nats://***@localhost:4222"), "{shown}");
    }

    #[test]
    fn backoff_and_bad_limits_are_refused() {
        let mut options = JetStreamConsumerOptions::new("bad.name");
        options.backoff = vec![Duration::from_secs(1)];
        options.max_deliver = 0;
        options.max_ack_pending = Some(0);
        options.filter_subject = Some("a.>.b".into());
        let problems = options.validate("functions.f.trigger");
        for expected in [
            "functions.f.trigger.stream:",
            "functions.f.trigger.backoff: not supported: a JetStream BackOff silently replaces",
            "functions.f.trigger.max_deliver:",
            "functions.f.trigger.max_ack_pending:",
            "functions.f.trigger.filter_subject:",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(expected)),
                "{expected}: {problems:#?}"
            );
        }
    }

    #[test]
    fn stream_window_longer_than_max_age_is_refused() {
        let mut stream = StreamConfig::new("S", vec!["s.*".into()]);
        stream.max_age = Some(Duration::from_secs(60));
        let problems = stream.validate("brokers.nats.streams[0]");
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert!(problems[0].starts_with("brokers.nats.streams[0].duplicate_window"));
    }

    #[test]
    fn deserializes_human_readable_values_and_refuses_unknown_keys() {
        let options: JetStreamConsumerOptions = serde_json::from_str(
            r#"{"stream":"S","ack_wait":"1s 500ms","backoff":["1s","2s"],"deliver_policy":"new"}"#,
        )
        .unwrap();
        assert_eq!(options.ack_wait, Duration::from_millis(1500));
        assert_eq!(
            options.backoff,
            vec![Duration::from_secs(1), Duration::from_secs(2)]
        );
        assert_eq!(options.deliver_policy, DeliverFrom::New);
        let stream: StreamConfig = serde_json::from_str(
            r#"{"name":"S","subjects":["s.>"],"max_bytes":"64MiB","storage":"memory","retention":"workqueue"}"#,
        )
        .unwrap();
        assert_eq!(stream.max_bytes, Some(ByteSize::mib(64)));
        assert_eq!(stream.retention, RetentionKind::WorkQueue);
        assert!(serde_json::from_str::<NatsConfig>(r#"{"servers":[],"passwd":"x"}"#).is_err());
    }
}
