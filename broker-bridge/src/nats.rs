//! The NATS transport: core subjects and JetStream, behind the crate's transport vocabulary.
//!
//! - [`NatsTransport::connect`] opens one connection (async-nats reconnects by itself, forever
//!   unless `max_reconnects` says otherwise) and a JetStream context on it;
//!   [`NatsTransport::connect_at_startup`] first waits up to `startup_wait` for a server
//!   that does not answer yet.
//! - Core NATS ([`NatsTransport::subscribe_core`], [`NatsPublisher`]) is **at-most-once by
//!   nature**: a message nobody is subscribed to, or that a slow subscriber cannot take, is
//!   gone; there is no redelivery and no publish confirmation. Settling a core delivery is a
//!   no-op; retries happen in place ([`RetryStyle::InPlace`](crate::RetryStyle)) while the
//!   process lives.
//! - JetStream ([`NatsTransport::subscribe_jetstream`], [`JetStreamPublisher`]) is
//!   at-least-once: a durable pull consumer with explicit acks, fetched in batches that never
//!   exceed `max_in_flight × (1 + prefetch)` unsettled deliveries; settles are sent on the
//!   connection (an ack the server misses means a redelivery, never a loss; [`NatsTransport::flush`]
//!   at shutdown makes a clean stop leave none); retries are NAK-with-delay (never a bare
//!   NAK); publishes wait for the stream's ack and carry `Nats-Msg-Id` for de-duplication.
//! - [`NatsTransport::read_subject_history`] reads what a stream holds for a subject, all of it
//!   or the last N messages (for `weir tail`), with an ordered consumer that leaves no state
//!   behind.
//! - [`NatsTransport::read_backlog`] reads what a stream holds for a subject up to its last
//!   message now, deleting what its reader sent on (`weir dlq redrive`).
//! - [`NatsTransport::ensure_stream`] creates missing streams and reports (never changes)
//!   existing ones whose settings differ; a declared stream deleted while Weir runs is created
//!   again when a subscription or a confirmed publish finds it gone (`declared`).
//!
//! Security: every authentication method of [`NatsConfig`] (user and password, token, nkey,
//! creds file) and TLS (server verified against `tls_ca` or the system CAs, a client
//! certificate for mutual TLS). [`NatsTransport::connect`] reports refused credentials as
//! [`TransportError::Authentication`] and a failed handshake as [`TransportError::Tls`] (with a
//! hint at the setting to check where the cause is clear), so start-up fails with what to fix.
//! Tested against a real nats-server in `tests/tests/nats_security.rs`.
//!
//! It deliberately does not decide retries or dead-lettering (the dispatcher's policy), does
//! not decode events, and does not use JetStream's MaxDeliver/BackOff (see
//! [`JetStreamConsumerOptions`]). Metrics are emitted only from the `events` module.

mod backlog;
mod config;
mod core_nats;
mod declared;
mod events;
mod history;
mod jetstream;

use std::borrow::Cow;
use std::time::Duration;

use async_nats::jetstream::context::{
    GetStreamByNameError, GetStreamByNameErrorKind, RequestError, RequestErrorKind,
};
use async_nats::jetstream::Context;
use async_nats::{Client, ConnectOptions, HeaderMap, HeaderName, HeaderValue};
use futures::StreamExt as _;

pub use self::backlog::SubjectBacklog;
pub use self::config::{
    DeliverFrom, DiscardKind, JetStreamConsumerOptions, NatsConfig, RetentionKind, StorageKind,
    StreamConfig, DEFAULT_PREFETCH, MAX_PREFETCH,
};
pub use self::core_nats::{NatsCoreSubscription, NatsPublisher};
pub use self::declared::{subject_covers, subjects_overlap};
pub use self::history::SubjectHistory;
use self::jetstream::ensure_stream;
pub use self::jetstream::{
    JetStreamPublisher, JetStreamSubscription, StreamDifference, StreamReport, PULL_EXPIRES,
};
use crate::{BrokerKind, TransportError};

/// One NATS connection and its JetStream context. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct NatsTransport {
    client: Client,
    jetstream: Context,
    request_timeout: Duration,
    /// The cap of start-up's delays between attempts, as of reconnects.
    reconnect_delay_max: Duration,
    /// Until when binding a consumer asks again while the cluster is not ready: connected
    /// plus `startup_wait` for a process starting up, the moment of connecting otherwise.
    startup_until: tokio::time::Instant,
    /// Streams [`NatsTransport::ensure_stream`] declared: created again if they disappear.
    declared: declared::DeclaredStreams,
}

impl std::fmt::Debug for NatsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsTransport")
            .field("state", &self.client.connection_state())
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

impl NatsTransport {
    /// Validates `config`, reads its secrets (files or environment) and connects. Fails when no
    /// server answers within `connect_timeout`; once connected, reconnects are automatic.
    /// The commands a person runs use this: they say at once that nothing answers.
    pub async fn connect(config: &NatsConfig) -> Result<Self, TransportError> {
        Self::connect_within(config, Duration::ZERO).await
    }

    /// [`NatsTransport::connect`] for a process starting beside its server (a compose file, a
    /// pod): while no server answers, it tries again, the delay doubling from 250 ms up to
    /// `reconnect_delay_max`, each attempt logged and counted, for up to `startup_wait`. What
    /// trying again cannot fix (refused credentials, TLS, a secret that cannot be read) fails
    /// at once.
    pub async fn connect_at_startup(config: &NatsConfig) -> Result<Self, TransportError> {
        Self::connect_within(config, config.startup_wait).await
    }

    async fn connect_within(config: &NatsConfig, wait: Duration) -> Result<Self, TransportError> {
        let problems = config.validate("nats");
        if !problems.is_empty() {
            return Err(TransportError::Config(problems.join("; ")));
        }
        let started = tokio::time::Instant::now();
        let client = retry_until(
            started + wait,
            config.reconnect_delay_max,
            || async {
                // Built again each time: `ConnectOptions` is consumed by `connect`.
                let options = connect_options(config)
                    .await
                    .map_err(StartupFailure::for_good)?;
                options
                    .connect(config.servers.as_slice())
                    .await
                    .map_err(|error| StartupFailure {
                        transient: unreachable(&error),
                        error: classify_connect_error(error),
                    })
            },
            |error, delay, left| {
                events::record_unreachable_at_startup(
                    &config.redacted_servers(),
                    &error.to_string(),
                    delay,
                    left,
                );
            },
        )
        .await
        .map_err(|(failure, attempts)| match failure.error {
            TransportError::Connect { broker, reason } if failure.transient && attempts > 1 => {
                TransportError::Connect {
                    broker,
                    reason: format!(
                        "{reason} (no server answered in {attempts} attempts over {wait:?}: \
                         brokers.nats.startup_wait)"
                    ),
                }
            }
            other => other,
        })?;
        let mut jetstream = async_nats::jetstream::new(client.clone());
        jetstream.set_timeout(config.request_timeout);
        Ok(Self {
            client,
            jetstream,
            request_timeout: config.request_timeout,
            reconnect_delay_max: config.reconnect_delay_max,
            startup_until: started + wait,
            declared: declared::DeclaredStreams::default(),
        })
    }

    /// The underlying async-nats client (for the relay and benchmarks; the dispatcher should not
    /// need it).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The JetStream context, with `request_timeout` applied.
    pub fn jetstream(&self) -> &Context {
        &self.jetstream
    }

    /// A core publisher on this connection.
    pub fn core_publisher(&self) -> NatsPublisher {
        NatsPublisher::new(self.client.clone(), self.request_timeout)
    }

    /// A confirmed JetStream publisher on this connection; waits at most `request_timeout` for
    /// each publish ack. A publish that finds no stream for its subject creates the declared
    /// stream that captures it, if one was declared (see [`NatsTransport::ensure_stream`]).
    pub fn jetstream_publisher(&self) -> JetStreamPublisher {
        JetStreamPublisher::new(
            self.jetstream.clone(),
            self.request_timeout,
            self.declared.clone(),
        )
    }

    /// Creates `config`'s stream when missing, else reports how it differs (the
    /// [`StreamReport`]). The declaration is remembered: if the stream is deleted while this
    /// transport runs, a subscription on it or a confirmed publish to its subjects creates it
    /// again with these settings (empty: what it held is gone).
    pub async fn ensure_stream(
        &self,
        config: &StreamConfig,
    ) -> Result<StreamReport, TransportError> {
        let report = ensure_stream(&self.jetstream, config).await?;
        self.declared.remember(config);
        Ok(report)
    }

    /// [`NatsTransport::ensure_stream`] at start-up: while JetStream does not answer, or the
    /// cluster has no leader for the stream yet, it asks again for up to `wait`.
    pub async fn ensure_stream_at_startup(
        &self,
        config: &StreamConfig,
        wait: Duration,
    ) -> Result<StreamReport, TransportError> {
        let report = jetstream::ensure_stream_waiting(
            &self.jetstream,
            config,
            wait,
            self.reconnect_delay_max,
        )
        .await?;
        self.declared.remember(config);
        Ok(report)
    }

    /// At start-up, before a trigger binds its consumer to `stream` (one not declared here,
    /// whose readiness [`NatsTransport::ensure_stream_at_startup`] does not cover): waits up
    /// to `wait` while the stream does not answer, as a cluster's does until it has elected
    /// its leader for it. Done at once when it answers, or is missing (binding says so).
    pub async fn wait_for_stream(
        &self,
        stream: &str,
        wait: Duration,
    ) -> Result<(), TransportError> {
        jetstream::wait_for_stream(&self.jetstream, stream, wait, self.reconnect_delay_max).await
    }

    /// The JetStream stream that captures `subject`, or `None` when none does (a confirmed
    /// publish to it would find no stream to store it), which is always so on a server or an
    /// account without JetStream.
    pub async fn stream_capturing(&self, subject: &str) -> Result<Option<String>, TransportError> {
        match self.jetstream.stream_by_subject(subject).await {
            Ok(name) => Ok(Some(name)),
            Err(err) if err.kind() == GetStreamByNameErrorKind::NotFound => Ok(None),
            Err(err) if jetstream_absent(&err) => Ok(None),
            Err(err) => Err(TransportError::Subscribe {
                topic: subject.to_owned(),
                reason: format!("looking up the JetStream stream that captures it: {err}"),
            }),
        }
    }

    /// Waits up to `wait` for JetStream's API to answer on this connection, trying at least
    /// once. A cluster starting up accepts clients before it has elected the meta leader
    /// JetStream's API needs (seconds, or for as long as a majority of its servers is
    /// down), and a stream declared meanwhile fails with a bare "timed out". Returns at
    /// once when JetStream answers, and when the server or the account has no JetStream
    /// (what needs it then fails, saying so); fails when it did not answer in `wait`.
    pub async fn wait_for_jetstream(&self, wait: Duration) -> Result<(), TransportError> {
        use async_nats::jetstream::context::AccountErrorKind;
        use async_nats::jetstream::ErrorCode;

        if jetstream_disabled(&self.client).is_some() {
            return Ok(());
        }
        let until = tokio::time::Instant::now() + wait;
        retry_until(
            until,
            self.reconnect_delay_max,
            || async {
                let error = match self.jetstream.query_account().await {
                    Ok(_) => return Ok(()),
                    Err(error) => error,
                };
                let absent = match error.kind() {
                    AccountErrorKind::JetStream(refusal) => matches!(
                        refusal.error_code(),
                        ErrorCode::JETSTREAM_NOT_ENABLED
                            | ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT
                    ),
                    AccountErrorKind::JetStreamUnavailable => true,
                    _ => false,
                };
                if absent {
                    return Ok(());
                }
                Err(StartupFailure {
                    error,
                    transient: true,
                })
            },
            |error, delay, left| {
                events::record_jetstream_unready_at_startup(&error.to_string(), delay, left);
            },
        )
        .await
        .map_err(|(failure, attempts)| TransportError::Connect {
            broker: BrokerKind::JetStream,
            reason: format!(
                "JetStream did not answer in {attempts} attempt{} over {wait:?} \
                 (brokers.nats.startup_wait): {}; a cluster answers once a majority of its \
                 servers is up and has elected a leader",
                if attempts == 1 { "" } else { "s" },
                failure.error
            ),
        })
    }

    /// The largest message (payload and headers) the connected server takes, its
    /// `max_payload`.
    pub fn max_payload(&self) -> usize {
        self.client.server_info().max_payload
    }

    /// Number of messages currently stored in `stream` (read from the server).
    pub async fn stream_messages(&self, stream: &str) -> Result<u64, TransportError> {
        let stream_handle =
            self.jetstream
                .get_stream(stream)
                .await
                .map_err(|err| TransportError::Lag {
                    topic: stream.to_owned(),
                    reason: err.to_string(),
                })?;
        Ok(stream_handle.cached_info().state.messages)
    }

    /// Writes everything queued on the connection (publishes, acks) and waits until the server
    /// has read it: a message to the connection's own inbox comes back only after the server
    /// processed what was sent before it. Writing to the socket alone would not do for a
    /// process about to exit, whose close may reset the connection before the server reads.
    pub async fn flush(&self) -> Result<(), TransportError> {
        let flushed = tokio::time::timeout(self.request_timeout, self.round_trip()).await;
        match flushed {
            Ok(Ok(())) => Ok(()),
            Ok(Err(reason)) => Err(TransportError::Connect {
                broker: BrokerKind::Nats,
                reason: format!("flushing: {reason}"),
            }),
            Err(_) => Err(TransportError::Connect {
                broker: BrokerKind::Nats,
                reason: format!(
                    "flushing: the server did not answer within {:?}",
                    self.request_timeout
                ),
            }),
        }
    }

    async fn round_trip(&self) -> Result<(), String> {
        let inbox = self.client.new_inbox();
        let mut echo = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|err| err.to_string())?;
        self.client
            .publish(inbox, bytes::Bytes::new())
            .await
            .map_err(|err| err.to_string())?;
        self.client.flush().await.map_err(|err| err.to_string())?;
        let answered = echo.next().await.is_some();
        // Best effort: the subscription is gone with the connection anyway.
        let _ = echo.unsubscribe().await;
        if answered {
            Ok(())
        } else {
            Err("the connection closed".to_owned())
        }
    }

    /// Sends everything queued (publishes, acks; see [`NatsTransport::flush`]), then drains
    /// the connection: unsubscribes and closes it. The runtime calls it at shutdown so that a
    /// clean stop leaves no ack unsent (which would mean a redelivery, i.e. a duplicate, after
    /// the restart), and `weir publish` before it exits so that no core publish is lost.
    pub async fn close(&self) -> Result<(), TransportError> {
        let flushed = self.flush().await;
        self.client
            .drain()
            .await
            .map_err(|err| TransportError::Connect {
                broker: BrokerKind::Nats,
                reason: format!("closing: {err}"),
            })?;
        flushed
    }
}

async fn connect_options(config: &NatsConfig) -> Result<ConnectOptions, TransportError> {
    let mut options = if let Some(creds) = &config.creds_file {
        ConnectOptions::with_credentials_file(creds)
            .await
            .map_err(|err| secret_error("creds_file", &err.to_string()))?
    } else if let Some(seed_file) = &config.nkey_seed_file {
        ConnectOptions::with_nkey(read_secret_file("nkey_seed_file", seed_file).await?)
    } else if let Some(user) = &config.user {
        let password = match (&config.password_file, &config.password_env) {
            (Some(file), _) => read_secret_file("password_file", file).await?,
            (None, Some(var)) => read_secret_env("password_env", var)?,
            (None, None) => return Err(secret_error("password", "user set without a password")),
        };
        ConnectOptions::with_user_and_password(user.clone(), password)
    } else if let Some(file) = &config.token_file {
        ConnectOptions::with_token(read_secret_file("token_file", file).await?)
    } else if let Some(var) = &config.token_env {
        ConnectOptions::with_token(read_secret_env("token_env", var)?)
    } else {
        ConnectOptions::new()
    };

    if let Some(name) = &config.name {
        options = options.name(name);
    }
    if let Some(ca) = &config.tls_ca {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    let delay_max = config.reconnect_delay_max;
    Ok(options
        .require_tls(config.tls_required)
        .connection_timeout(config.connect_timeout)
        .request_timeout(Some(config.request_timeout))
        .max_reconnects(config.max_reconnects)
        .reconnect_delay_callback(move |attempts| reconnect_delay(attempts, delay_max))
        .event_callback(|event| async move { events::connection_event(&event) }))
}

/// Whether `err` says no server answered (refused, timed out, not resolving), which waiting
/// can cure, rather than that one answered and refused us.
fn unreachable(err: &async_nats::ConnectError) -> bool {
    use async_nats::ConnectErrorKind;
    match err.kind() {
        ConnectErrorKind::Dns | ConnectErrorKind::TimedOut => true,
        ConnectErrorKind::Io => tls_error_in(err).is_none(),
        _ => false,
    }
}

/// A start-up step's failed attempt, and whether asking again may help.
struct StartupFailure<E> {
    error: E,
    transient: bool,
}

impl<E> StartupFailure<E> {
    fn for_good(error: E) -> Self {
        Self {
            error,
            transient: false,
        }
    }
}

/// The one retry of every start-up step (connecting, JetStream answering, streams,
/// consumers): runs `attempt` again after each transient failure, `report` told of each wait
/// first, until it succeeds, fails for good or `until` has passed; then the last failure and
/// the number of attempts made.
async fn retry_until<T, E, F>(
    until: tokio::time::Instant,
    delay_max: Duration,
    mut attempt: impl FnMut() -> F,
    mut report: impl FnMut(&E, Duration, Duration),
) -> Result<T, (StartupFailure<E>, u32)>
where
    F: std::future::Future<Output = Result<T, StartupFailure<E>>>,
{
    let mut attempts = 0u32;
    loop {
        let failure = match attempt().await {
            Ok(done) => return Ok(done),
            Err(failure) => failure,
        };
        attempts += 1;
        let left = until.saturating_duration_since(tokio::time::Instant::now());
        if !failure.transient || left.is_zero() {
            return Err((failure, attempts));
        }
        let delay = startup_delay(attempts, delay_max).min(left);
        report(&failure.error, delay, left);
        tokio::time::sleep(delay).await;
    }
}

/// The wait before start-up's next attempt: 250 ms, doubling up to `max`.
fn startup_delay(attempts: u32, max: Duration) -> Duration {
    let exponent = attempts.saturating_sub(1).min(16);
    Duration::from_millis(250u64 << exponent).min(max)
}

/// A refused certificate or handshake is [`TransportError::Tls`] and refused credentials are
/// [`TransportError::Authentication`]: retrying with the same settings fails again, so the
/// operator is told what to fix instead of "could not connect".
fn classify_connect_error(err: async_nats::ConnectError) -> TransportError {
    use async_nats::ConnectErrorKind;

    let broker = BrokerKind::Nats;
    let reason = connect_error_reason(&err);
    match err.kind() {
        ConnectErrorKind::Tls => TransportError::Tls { broker, reason },
        ConnectErrorKind::Authentication | ConnectErrorKind::AuthorizationViolation => {
            TransportError::Authentication { broker, reason }
        }
        // async-nats reports a failed handshake (an untrusted certificate, a client
        // certificate the server refused) as an IO error wrapping rustls' error.
        ConnectErrorKind::Io => match tls_error_in(&err) {
            Some(tls) => TransportError::Tls {
                broker,
                reason: match tls_hint(tls) {
                    Some(hint) => format!("{reason} ({hint})"),
                    None => reason,
                },
            },
            None => TransportError::Connect { broker, reason },
        },
        _ => TransportError::Connect { broker, reason },
    }
}

/// The rustls error somewhere in `err`'s chain, also inside an `io::Error` (whose `source`
/// skips the error it wraps).
fn tls_error_in<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a async_nats::rustls::Error> {
    let mut next = Some(err);
    while let Some(error) = next {
        if let Some(tls) = error.downcast_ref::<async_nats::rustls::Error>() {
            return Some(tls);
        }
        if let Some(tls) = error
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            .and_then(|inner| tls_error_in(inner))
        {
            return Some(tls);
        }
        next = error.source();
    }
    None
}

/// Which setting to look at, for the handshake failures a misconfiguration causes.
fn tls_hint(error: &async_nats::rustls::Error) -> Option<&'static str> {
    use async_nats::rustls::{AlertDescription, CertificateError, Error, InvalidMessage};

    match error {
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            Some("the server's certificate is not signed by tls_ca nor by a system CA")
        }
        Error::InvalidCertificate(CertificateError::NotValidForName) => {
            Some("the server's certificate does not name the host in the server URL")
        }
        Error::AlertReceived(AlertDescription::CertificateRequired) => {
            Some("the server requires a client certificate: set tls_cert and tls_key")
        }
        Error::AlertReceived(AlertDescription::UnknownCA | AlertDescription::BadCertificate) => {
            Some("the server does not accept the client certificate in tls_cert")
        }
        Error::InvalidMessage(InvalidMessage::InvalidContentType) => {
            Some("the server did not answer in TLS: is TLS enabled on it?")
        }
        _ => None,
    }
}

/// The reason to give when a JetStream request went unanswered because the server has no
/// JetStream at all. Such a server answers no JetStream request, which async-nats reports as
/// a missing resource or no responders: read as is, that sends the operator looking for a
/// stream that is not the problem. `None` when the server says it has JetStream.
fn jetstream_disabled(client: &Client) -> Option<&'static str> {
    (!client.server_info().jetstream).then_some(
        "the NATS server has JetStream disabled: start nats-server with -js (or give its \
         configuration a `jetstream {}` block)",
    )
}

/// Whether a stream lookup failed because nothing answers JetStream's API on this server
/// (started without JetStream, or an account without it): core subjects are all there is then.
fn jetstream_absent(err: &GetStreamByNameError) -> bool {
    request_failed(err, RequestErrorKind::NoResponders)
}

/// Whether `err`'s chain holds a request that failed as `kind`: async-nats wraps a request's
/// error in others (no responders in a second request error, say), so the whole chain is
/// looked down rather than a depth relied on.
fn request_failed(err: &(dyn std::error::Error + 'static), kind: RequestErrorKind) -> bool {
    let mut next = Some(err);
    while let Some(error) = next {
        if error
            .downcast_ref::<RequestError>()
            .is_some_and(|request| request.kind() == kind)
        {
            return true;
        }
        next = error.source();
    }
    false
}

/// The error with its whole chain: async-nats puts the telling part (the certificate
/// verifier's complaint, the file that could not be read) in the source.
fn connect_error_reason(err: &async_nats::ConnectError) -> String {
    let mut reason = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        let text = cause.to_string();
        if !reason.contains(&text) {
            reason.push_str(": ");
            reason.push_str(&text);
        }
        source = cause.source();
    }
    reason
}

/// 0 for the first attempt, then doubling from 10 ms up to `max`.
fn reconnect_delay(attempts: usize, max: Duration) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let exponent = u32::try_from(attempts - 2).unwrap_or(u32::MAX).min(20);
    Duration::from_millis(10u64.saturating_mul(1 << exponent)).min(max)
}

fn secret_error(key: &str, reason: &str) -> TransportError {
    TransportError::Connect {
        broker: BrokerKind::Nats,
        reason: format!("{key}: {reason}"),
    }
}

/// Reads a secret file; the content never appears in errors, only the path.
async fn read_secret_file(key: &str, path: &std::path::Path) -> Result<String, TransportError> {
    let content = tokio::fs::read_to_string(path)
        .await
        .map_err(|err| secret_error(key, &format!("reading {}: {err}", path.display())))?;
    let secret = content.trim_end_matches(['\r', '\n']).to_owned();
    if secret.is_empty() {
        return Err(secret_error(key, &format!("{} is empty", path.display())));
    }
    Ok(secret)
}

fn read_secret_env(key: &str, var: &str) -> Result<String, TransportError> {
    match std::env::var(var) {
        Ok(value) if !value.is_empty() => Ok(value),
        _ => Err(secret_error(
            key,
            &format!("environment variable {var} is not set or empty"),
        )),
    }
}

/// Beyond this many headers [`pairs_to_headers`] does not look for repeated names.
const MAX_COMPARED_HEADERS: usize = 32;

/// The vocabulary's pairs → async-nats headers, taking the strings over (no copies; well-known
/// names are static) and without the panicking conversions: a header name or value NATS
/// cannot carry is a publish error naming the header.
fn pairs_to_headers(
    topic: &str,
    pairs: Vec<(Cow<'static, str>, String)>,
) -> Result<HeaderMap, TransportError> {
    let invalid = |reason: String| TransportError::Publish {
        topic: topic.to_owned(),
        reason,
    };
    let mut headers = HeaderMap::new();
    // `append` looks a name up before inserting it, which only a repeated name needs. Outputs
    // carry about ten short names, none repeated, so comparing them is cheaper than hashing
    // each twice; past a few dozen, every header is appended.
    let repeated = pairs.len() > MAX_COMPARED_HEADERS
        || pairs
            .iter()
            .enumerate()
            .any(|(index, (name, _))| pairs[..index].iter().any(|(earlier, _)| earlier == name));
    for (name, value) in pairs {
        // Bytes, not a `char` pattern: this runs for every header of every output.
        if value.bytes().any(|b| b == b'\r' || b == b'\n') {
            return Err(invalid(format!(
                "the value of header `{name}` contains CR or LF"
            )));
        }
        // async-nats' own rule, checked here so the error can name the header (and so that a
        // static name, which it takes unchecked, is checked too).
        if name.is_empty() || name.bytes().any(|b| !b.is_ascii_graphic() || b == b':') {
            return Err(invalid(format!(
                "header name `{name}` is not valid in NATS"
            )));
        }
        let header_name = match name {
            Cow::Borrowed(name) => HeaderName::from_static(name),
            Cow::Owned(name) => HeaderName::try_from(name)
                .map_err(|_| invalid("a header name is not valid in NATS".into()))?,
        };
        // Checked above: `From<String>` asserts there is no CR or LF, and takes the string over.
        let value = HeaderValue::from(value);
        if repeated {
            headers.append(header_name, value);
        } else {
            headers.insert(header_name, value);
        }
    }
    Ok(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_delay_doubles_from_a_quarter_second_to_the_cap() {
        let max = Duration::from_secs(4);
        let delays: Vec<u64> = (1..=7)
            .map(|n| startup_delay(n, max).as_millis() as u64)
            .collect();
        assert_eq!(delays, [250, 500, 1000, 2000, 4000, 4000, 4000]);
        assert_eq!(startup_delay(u32::MAX, max), max);
    }

    #[test]
    fn reconnect_delay_grows_to_the_cap() {
        let max = Duration::from_secs(4);
        assert_eq!(reconnect_delay(1, max), Duration::ZERO);
        assert_eq!(reconnect_delay(2, max), Duration::from_millis(10));
        assert_eq!(reconnect_delay(3, max), Duration::from_millis(20));
        assert_eq!(reconnect_delay(200, max), max);
    }

    #[test]
    fn headers_round_trip_keeps_every_value() {
        let pairs = vec![
            ("ce-id".to_owned(), "1".to_owned()),
            ("x-multi".to_owned(), "a".to_owned()),
            ("x-multi".to_owned(), "b".to_owned()),
        ];
        let owned = pairs
            .iter()
            .map(|(name, value)| (Cow::Owned(name.clone()), value.clone()))
            .collect();
        let headers = pairs_to_headers("t", owned).unwrap();
        assert_eq!(crate::Headers::from_nats(Some(headers)), pairs);
        let headers = pairs_to_headers("t", vec![(Cow::Borrowed("ce-id"), "1".into())]).unwrap();
        assert_eq!(
            crate::Headers::from_nats(Some(headers)),
            vec![("ce-id".to_owned(), "1".to_owned())]
        );
        assert!(pairs_to_headers("t", vec![(Cow::Borrowed("bad name"), "v".into())]).is_err());
        assert!(pairs_to_headers("t", vec![("bad:name".into(), "v".into())]).is_err());
        assert!(pairs_to_headers("t", vec![("ok".into(), "a\r\nb".into())]).is_err());
    }

    /// Unique names are inserted, repeated ones appended, at any count: no value is lost.
    #[test]
    fn headers_keep_every_value_past_the_compared_count() {
        // `Headers` compares in name order, as a map iterates in none.
        let received = |headers: HeaderMap| crate::Headers::from_nats(Some(headers));
        for count in [MAX_COMPARED_HEADERS, MAX_COMPARED_HEADERS + 8] {
            let mut pairs: Vec<(String, String)> = (0..count)
                .map(|i| (format!("x-{i:03}"), i.to_string()))
                .collect();
            let headers = pairs_to_headers(
                "t",
                pairs
                    .iter()
                    .map(|(name, value)| (Cow::Owned(name.clone()), value.clone()))
                    .collect(),
            )
            .unwrap();
            assert_eq!(received(headers), pairs, "{count} unique names");
            // The repeat comes last, a static name beside the owned first one.
            pairs.push(("x-000".to_owned(), "again".to_owned()));
            let mut owned: Vec<(Cow<'static, str>, String)> = pairs
                .iter()
                .map(|(name, value)| (Cow::Owned(name.clone()), value.clone()))
                .collect();
            if let Some(last) = owned.last_mut() {
                last.0 = Cow::Borrowed("x-000");
            }
            assert_eq!(
                received(pairs_to_headers("t", owned).unwrap()),
                pairs,
                "{count} names and a repeat"
            );
        }
    }
}
