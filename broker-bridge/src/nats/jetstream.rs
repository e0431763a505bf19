//! JetStream: pull-consumer subscriptions, settling, confirmed publishing, and stream set-up.
//!
//! A subscription runs one fetch task per trigger. It holds a semaphore of
//! `max_in_flight × (1 + prefetch)` permits; each delivery carries one permit until it is
//! settled or dropped, and a pull request never asks for more messages than there are free
//! permits, so the number of unsettled deliveries is bounded (the consumer's `max_ack_pending`
//! bounds it on the server side too). Fetched deliveries wait in a local buffer until the
//! dispatcher takes them; while they wait, a heartbeat task sends in-progress acks for them, so
//! a buffered message is never redelivered behind the dispatcher's back (the dispatcher sends
//! its own heartbeats once it runs one). When a pull fails (server restart, leader change,
//! deleted consumer, lost connection) the task logs it, waits with exponential backoff and
//! binds the consumer again before pulling again: the subscription never ends because of
//! broker trouble, only on [`Subscription::close`]. A consumer deleted under it is created
//! again just after its last known ack floor, not from the stream's start, so that only what
//! was acknowledged after that reading runs again. When the stream itself is gone and it was
//! declared, the task creates it again from its declaration first.
//!
//! Binding an existing durable with other subjects than it has moves it (the server updates its
//! filter) but not in the stream. That is reported, and so is a move by another client seen in
//! a lag reading, which is not undone until the consumer is bound again (a restart, a re-bind
//! after a failed pull): two configurations on one durable would otherwise move it back and
//! forth at every reading.
//!
//! Settles (ack, NAK-with-delay, TERM, in-progress) are sent, not confirmed: each one would
//! otherwise cost a server round trip and a temporary inbox subscription, and an ack the
//! server never sees only means a redelivery (a duplicate under at-least-once, never a loss).
//! A clean stop drains the connection ([`NatsTransport::close`]) so that it leaves none.
//!
//! A delivery dropped without settling is redelivered by the server after `ack_wait`.

use std::collections::VecDeque;
use std::time::Duration;

use async_nats::datetime::DateTime;
use async_nats::jetstream::consumer::{self, pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::context::{
    ConsumerInfoError, ConsumerInfoErrorKind, CreateStreamErrorKind, GetStreamError,
    GetStreamErrorKind, PublishErrorKind, RequestErrorKind,
};
use async_nats::jetstream::message::{AckKind, Acker};
use async_nats::jetstream::stream::{
    self, ConsumerErrorKind, DiscardPolicy, RetentionPolicy, StorageType,
};
use async_nats::jetstream::{self as js, Context};
use async_trait::async_trait;
use futures::StreamExt;
use std::sync::Arc;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::config::{
    DeliverFrom, DiscardKind, JetStreamConsumerOptions, RetentionKind, StorageKind, StreamConfig,
};
use super::declared::DeclaredStreams;
use super::{events, jetstream_disabled, pairs_to_headers, NatsTransport};
use crate::{
    BrokerKind, Delivery, FlowControl, Headers, InboundMessage, LagProbe, Origin, OutboundMessage,
    Published, Publisher, RetryStyle, Settle, Subscription, TransportError,
};

/// How long one pull request waits on the server for messages. Public so the benchmark's
/// plain consumer held to Weir's limits pulls the same way.
pub const PULL_EXPIRES: Duration = Duration::from_secs(1);
/// How long past `PULL_EXPIRES` we wait for the server's end-of-request before assuming the
/// request was lost (e.g. in a server restart).
const PULL_GRACE: Duration = Duration::from_secs(2);
/// Largest single pull request.
const MAX_BATCH: usize = 256;
/// How often a fetcher waiting for room re-checks whether its queue ran dry.
const ACCUMULATE_CHECK: Duration = Duration::from_millis(5);
/// Backoff between failed pulls / re-binds.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Ephemeral consumers are removed by the server after this long without pulls.
const EPHEMERAL_INACTIVE: Duration = Duration::from_secs(300);

impl NatsTransport {
    /// Creates or updates the trigger's pull consumer on `options.stream` and starts fetching.
    ///
    /// `subject_filter` is the trigger's subject (empty: the whole stream); `options.filter_subject`,
    /// when set, must equal it or replace an empty one. `max_in_flight` is how many deliveries
    /// the caller works on at once; `options.prefetch` more per in-flight slot are fetched ahead.
    /// `max_in_flight × (1 + prefetch)` is the consumer's `max_ack_pending` unless the options
    /// set one.
    /// Consumer settings are Weir's own: a changed `ack_wait` or `max_ack_pending` updates the
    /// durable; a change the server refuses (e.g. to its ack policy) is an error naming it.
    /// `deliver_policy` is where a new durable starts: an existing one keeps its place.
    pub async fn subscribe_jetstream(
        &self,
        subject_filter: &str,
        options: &JetStreamConsumerOptions,
        max_in_flight: usize,
    ) -> Result<JetStreamSubscription, TransportError> {
        let topic = if subject_filter.is_empty() {
            options.stream.clone()
        } else {
            subject_filter.to_owned()
        };
        let subscribe_error = |reason: String| TransportError::Subscribe {
            topic: topic.clone(),
            reason,
        };
        let problems = options.validate("jetstream");
        if !problems.is_empty() {
            return Err(TransportError::Config(problems.join("; ")));
        }
        if max_in_flight == 0 {
            return Err(TransportError::Config(
                "max_in_flight must be at least 1".into(),
            ));
        }
        let filter = match (options.filter_subject.as_deref(), subject_filter) {
            (Some(option), "") => option.to_owned(),
            (Some(option), trigger) if option != trigger => {
                return Err(TransportError::Config(format!(
                    "filter_subject `{option}` conflicts with the trigger's subject `{trigger}`"
                )))
            }
            (_, trigger) => trigger.to_owned(),
        };

        let stream = self
            .jetstream
            .get_stream(&options.stream)
            .await
            .map_err(|err| {
                subscribe_error(if no_such_stream(&err) {
                    format!(
                        "stream {} does not exist; declare it so Weir creates it",
                        options.stream
                    )
                } else {
                    match jetstream_disabled(&self.client) {
                        Some(disabled) => disabled.to_owned(),
                        None => format!("reading stream {}: {err}", options.stream),
                    }
                })
            })?;

        // Recent servers (2.15 here; 2.9 refused it) accept a filter outside the stream's
        // subjects, and the consumer then never receives a message: a function that silently
        // runs nothing. Only a stream that stores exactly what it captures can be judged by its
        // subjects: one that transforms them, mirrors or sources another may hold any.
        let held = &stream.cached_info().config;
        let captured = &held.subjects;
        let stores_what_it_captures = held.subject_transform.is_none()
            && held.mirror.is_none()
            && held.sources.as_ref().is_none_or(Vec::is_empty);
        if stores_what_it_captures
            && !filter.is_empty()
            && !captured
                .iter()
                .any(|subject| super::subject_covers(subject, &filter))
        {
            return Err(subscribe_error(format!(
                "stream {} captures {}; `{filter}` is none of those subjects nor within one, so \
                 its consumer would never receive a message",
                options.stream,
                captured.join(", ")
            )));
        }

        let name = match &options.durable {
            Some(durable) => durable.clone(),
            None => ephemeral_name(&self.client),
        };
        let per_slot = options.prefetch.saturating_add(1);
        let max_ack_pending = options.max_ack_pending_for(max_in_flight);
        let consumer_config = pull::Config {
            durable_name: options.durable.clone(),
            name: Some(name.clone()),
            deliver_policy: match options.deliver_policy {
                DeliverFrom::All => DeliverPolicy::All,
                DeliverFrom::New => DeliverPolicy::New,
                DeliverFrom::Last => DeliverPolicy::Last,
                DeliverFrom::LastPerSubject => DeliverPolicy::LastPerSubject,
                DeliverFrom::StartSequence(start_sequence) => {
                    DeliverPolicy::ByStartSequence { start_sequence }
                }
                DeliverFrom::StartTime(start_time) => DeliverPolicy::ByStartTime { start_time },
            },
            ack_policy: AckPolicy::Explicit,
            ack_wait: options.ack_wait,
            max_deliver: options.max_deliver,
            filter_subject: filter,
            max_ack_pending,
            inactive_threshold: if options.durable.is_some() {
                Duration::ZERO
            } else {
                EPHEMERAL_INACTIVE
            },
            ..Default::default()
        };
        let subjects = consumer_subjects(
            &consumer_config.filter_subject,
            &consumer_config.filter_subjects,
        );
        // While the process starts (`startup_wait`), a cluster that has not elected the
        // stream's leader yet times a binding out or refuses it: asked again then.
        let moved_reported = std::cell::Cell::new(false);
        let (stream_ref, config_ref, subjects_ref) = (&stream, &consumer_config, &subjects);
        let (name_ref, moved_ref) = (&name, &moved_reported);
        let consumer: PullConsumer = super::retry_until(
            self.startup_until,
            self.reconnect_delay_max,
            move || async move {
                // A durable keeps its place: its deliver policy only says where a new
                // consumer starts, and the server refuses to change it (an operator may have
                // created it with another).
                let mut binding = config_ref.clone();
                if options.durable.is_some() {
                    match existing_consumer(stream_ref, name_ref).await {
                        Err(err) => {
                            let transient = match err.kind() {
                                ConsumerInfoErrorKind::TimedOut
                                | ConsumerInfoErrorKind::Offline => true,
                                ConsumerInfoErrorKind::JetStream(refusal) => {
                                    cluster_not_ready(&refusal)
                                }
                                _ => false,
                            };
                            return Err(super::StartupFailure {
                                error: format!("reading consumer {name_ref}: {err}"),
                                transient,
                            });
                        }
                        Ok(Some(existing)) => {
                            binding.deliver_policy = existing.config.deliver_policy;
                            if !moved_ref.replace(true) {
                                report_moved_subjects(&options.stream, &existing, subjects_ref);
                            }
                        }
                        Ok(None) => {}
                    }
                }
                let err = match stream_ref.create_consumer(binding).await {
                    Ok(consumer) => return Ok(consumer),
                    Err(err) => err,
                };
                let transient = match err.kind() {
                    ConsumerErrorKind::TimedOut => true,
                    ConsumerErrorKind::JetStream(refusal) => cluster_not_ready(&refusal),
                    _ => false,
                };
                let rivals = if transient {
                    None
                } else {
                    work_queue_rivals(stream_ref, name_ref, config_ref, &err).await
                };
                Err(super::StartupFailure {
                    error: format!(
                        "creating consumer {name_ref}: {err}{}",
                        rivals.unwrap_or_default()
                    ),
                    transient,
                })
            },
            |reason, delay, left| events::record_jetstream_unready_at_startup(reason, delay, left),
        )
        .await
        .map_err(|(failure, _)| subscribe_error(failure.error))?;
        let position = Arc::new(ConsumerPosition::new(
            stream.cached_info().created,
            consumer.cached_info(),
            subjects,
        ));

        let bound = max_in_flight.saturating_mul(per_slot);
        let prefetched = Arc::new(Prefetched::default());
        let cancel = CancellationToken::new();
        let flow = Arc::new(InFlightBound {
            permits: Arc::new(Semaphore::new(bound)),
            per_slot,
            total: std::sync::Mutex::new(bound),
        });
        let fetcher = Fetcher {
            context: self.jetstream.clone(),
            declared: self.declared.clone(),
            stream: stream.clone(),
            stream_name: Arc::from(options.stream.as_str()),
            consumer_name: name.clone(),
            consumer_config,
            position: Arc::clone(&position),
            flow: Arc::clone(&flow),
            prefetched: Arc::clone(&prefetched),
            cancel: cancel.clone(),
        };
        let task = tokio::spawn(fetcher.run(consumer));
        // Every sixth of the ack wait: a waiting delivery is then told about at least every
        // third, and once handed out the dispatcher's own heartbeat (every third) takes over,
        // so no gap comes near the ack wait.
        let heartbeat = tokio::spawn(heartbeat(
            self.client.clone(),
            Arc::clone(&prefetched),
            options.ack_wait / 6,
            options.stream.clone(),
            cancel.clone(),
        ));
        Ok(JetStreamSubscription {
            topic,
            ack_wait: options.ack_wait,
            flow,
            stream,
            consumer_name: name,
            position,
            prefetched,
            cancel,
            fetcher: Some(task),
            heartbeat: Some(heartbeat),
            closed: false,
        })
    }
}

/// A server-unique name for an ephemeral consumer, stable across re-binds of this subscription.
fn ephemeral_name(client: &async_nats::Client) -> String {
    let inbox = client.new_inbox();
    let unique = inbox.rsplit('.').next().unwrap_or(inbox.as_str());
    format!("weir-{unique}")
}

/// When a workqueue stream refused a consumer because others read overlapping subjects (it
/// hands each message to one consumer), which ones, as the rest of the error message: most
/// often the durable of a function since renamed or removed, which nothing deletes.
async fn work_queue_rivals(
    stream: &stream::Stream,
    name: &str,
    config: &pull::Config,
    err: &async_nats::jetstream::stream::ConsumerError,
) -> Option<String> {
    let async_nats::jetstream::stream::ConsumerErrorKind::JetStream(inner) = err.kind() else {
        return None;
    };
    if inner.error_code() != js::ErrorCode::CONSUMER_WQ_CONSUMER_NOT_UNIQUE
        && inner.error_code() != js::ErrorCode::CONSUMER_WQ_MULTIPLE_UNFILTERED
    {
        return None;
    }
    let wanted = consumer_subjects(&config.filter_subject, &config.filter_subjects);
    let mut rivals = Vec::new();
    let mut consumers = stream.consumers();
    // The listing is the server's, a page at a time; a failed page ends the hint, not the error.
    while let Some(Ok(info)) = consumers.next().await {
        let theirs = consumer_subjects(&info.config.filter_subject, &info.config.filter_subjects);
        let overlaps = theirs
            .iter()
            .any(|t| wanted.iter().any(|w| super::subjects_overlap(t, w)));
        if info.name != name && overlaps {
            rivals.push(format!("{} ({})", info.name, theirs.join(", ")));
        }
    }
    let (who, read, it) = match rivals.len() {
        0 => return None,
        1 => ("consumer", "reads", "it"),
        _ => ("consumers", "read", "them"),
    };
    Some(format!(
        "; stream {} is a workqueue stream, which hands each message to one consumer, and {who} \
         {} already {read} overlapping subjects: delete {it} if no function uses {it} any more \
         (a function renamed or removed leaves its durable consumer behind)",
        stream.cached_info().config.name,
        rivals.join(", ")
    ))
}

/// Whether looking a stream up failed because there is no stream of that name.
pub(super) fn no_such_stream(err: &GetStreamError) -> bool {
    matches!(
        err.kind(),
        GetStreamErrorKind::JetStream(inner)
            if inner.error_code() == js::ErrorCode::STREAM_NOT_FOUND
    )
}

/// A consumer's subjects, sorted: its list, else its one filter, else the whole stream.
fn consumer_subjects(one: &str, many: &[String]) -> Vec<String> {
    let mut subjects = match (one, many) {
        (_, [_, ..]) => many.to_vec(),
        ("", []) => vec![">".to_owned()],
        (one, []) => vec![one.to_owned()],
    };
    subjects.sort_unstable();
    subjects
}

/// The consumer of that name as the server has it; `None` when there is no such consumer. Its
/// deliver policy is kept when binding it: the server refuses to change it, and it only says
/// where a new consumer starts.
async fn existing_consumer(
    stream: &stream::Stream,
    name: &str,
) -> Result<Option<consumer::Info>, ConsumerInfoError> {
    match stream.consumer_info(name).await {
        Ok(existing) => Ok(Some(existing)),
        Err(err) if err.kind() == ConsumerInfoErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    }
}

/// Binding an existing durable consumer with other subjects than it has moves it to them (the
/// server updates its filter) but not in the stream: said, because the events of the new
/// subjects stored before its place never run. Either the function's trigger changed, or
/// another process binds the same durable with other subjects.
fn report_moved_subjects(stream: &str, existing: &consumer::Info, subjects: &[String]) {
    let theirs = consumer_subjects(
        &existing.config.filter_subject,
        &existing.config.filter_subjects,
    );
    if theirs != subjects {
        events::record_consumer_subjects_moved(
            stream,
            &existing.name,
            &theirs.join(", "),
            &subjects.join(", "),
            existing.delivered.stream_sequence,
        );
    }
}

/// Whether binding a consumer failed because its stream does not exist.
fn stream_not_found(err: &async_nats::jetstream::stream::ConsumerError) -> bool {
    matches!(
        err.kind(),
        async_nats::jetstream::stream::ConsumerErrorKind::JetStream(inner)
            if inner.error_code() == js::ErrorCode::STREAM_NOT_FOUND
    )
}

fn retry_delay(failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    RETRY_MIN.saturating_mul(1 << exponent).min(RETRY_MAX)
}

/// Why binding a consumer again failed.
struct RebindError {
    reason: String,
    /// The stream is not there: if it was declared, it is created again.
    stream_gone: bool,
}

/// What a subscription knows of its consumer as last read from the server (when it was bound,
/// and at every lag reading). First, where the consumer is created again from if it is deleted
/// under the subscription: its ack floor, kept with the creation times of that consumer and of
/// its stream, so that a floor is only used on the stream it counts in and only ever read from
/// the consumer bound last. Second, whether another client moved it to other subjects.
struct ConsumerPosition {
    /// The subjects the subscription binds its consumer to, sorted.
    subjects: Vec<String>,
    last: std::sync::Mutex<LastBound>,
}

struct LastBound {
    stream_created: DateTime,
    consumer_created: DateTime,
    /// The stream sequence up to which everything was acknowledged.
    ack_floor: u64,
    /// Other subjects the consumer was found moved to, once reported; `None` while it reads
    /// the subscription's own.
    moved_to: Option<Vec<String>>,
}

impl ConsumerPosition {
    fn new(stream_created: DateTime, consumer: &consumer::Info, subjects: Vec<String>) -> Self {
        Self {
            subjects,
            last: std::sync::Mutex::new(LastBound {
                stream_created,
                consumer_created: consumer.created,
                ack_floor: floor_at_binding(consumer),
                moved_to: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LastBound> {
        // Plain values, consistent after any write: a poisoned lock holds nothing broken.
        self.last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn bound(&self, stream_created: DateTime, consumer: &consumer::Info) {
        *self.lock() = LastBound {
            stream_created,
            consumer_created: consumer.created,
            ack_floor: floor_at_binding(consumer),
            moved_to: None,
        };
    }

    /// A lag reading of the consumer: its ack floor (a reading of a consumer since replaced is
    /// ignored), and whether another client moved it to other subjects, which this returns
    /// the first time it is seen.
    fn observe(&self, consumer: &consumer::Info) -> Option<Vec<String>> {
        let mut last = self.lock();
        if consumer.created == last.consumer_created {
            last.ack_floor = last.ack_floor.max(consumer.ack_floor.stream_sequence);
        }
        let theirs = consumer_subjects(
            &consumer.config.filter_subject,
            &consumer.config.filter_subjects,
        );
        if theirs == self.subjects {
            last.moved_to = None;
            return None;
        }
        if last.moved_to.as_ref() == Some(&theirs) {
            return None;
        }
        last.moved_to = Some(theirs.clone());
        Some(theirs)
    }

    /// The stream sequence to create the consumer again from, on a stream created at
    /// `stream_created`: `None` when nothing is known to have been acknowledged on it.
    fn resume_from(&self, stream_created: DateTime) -> Option<u64> {
        let last = self.lock();
        (last.stream_created == stream_created && last.ack_floor > 0)
            .then(|| last.ack_floor.saturating_add(1))
    }
}

/// A consumer's ack floor when it is bound. One that has delivered nothing yet starts after
/// the stream sequence it reports as delivered, which is therefore its floor too: nats-server
/// 2.15 reports that as the ack floor as well, but 2.9 reports 0, and a consumer made with
/// `deliver_policy = "new"` and deleted before its first ack would then be made again from
/// its configured start, after the events published meanwhile.
fn floor_at_binding(consumer: &consumer::Info) -> u64 {
    let floor = consumer.ack_floor.stream_sequence;
    if consumer.delivered.consumer_sequence == 0 {
        floor.max(consumer.delivered.stream_sequence)
    } else {
        floor
    }
}

enum PullOutcome {
    /// The pull request ended; this many messages were handed on.
    Finished(usize),
    Failed(String),
    Stopped,
}

/// The per-subscription task that pulls messages within the in-flight bound.
struct Fetcher {
    context: Context,
    /// Where the stream's declaration is found when the stream has gone.
    declared: DeclaredStreams,
    stream: stream::Stream,
    stream_name: Arc<str>,
    consumer_name: String,
    /// As configured: where a consumer created on a new stream starts.
    consumer_config: pull::Config,
    /// Where a consumer deleted under it is created again from.
    position: Arc<ConsumerPosition>,
    /// Holds the semaphore every fetched delivery takes a permit from.
    flow: Arc<InFlightBound>,
    prefetched: Arc<Prefetched>,
    cancel: CancellationToken,
}

impl Fetcher {
    async fn run(self, consumer: PullConsumer) {
        let mut consumer = Some(consumer);
        let mut failures: u32 = 0;
        let mut just_recreated = false;
        loop {
            let bound = match consumer.take() {
                Some(bound) => bound,
                None => match self.rebind().await {
                    Ok(bound) => {
                        events::record_consumer_rebound(&self.stream_name, &self.consumer_name);
                        just_recreated = false;
                        bound
                    }
                    Err(err) => {
                        let mut reason = err.reason;
                        if err.stream_gone && !just_recreated {
                            match self.recreate_stream().await {
                                // Bind to the stream at once, whoever made it: nothing to wait
                                // for. Once only, so a stream that keeps vanishing backs off.
                                Ok(true) => {
                                    just_recreated = true;
                                    continue;
                                }
                                Ok(false) => {}
                                Err(why) => reason = why,
                            }
                        }
                        failures = failures.saturating_add(1);
                        let delay = retry_delay(failures);
                        events::record_consumer_rebind_failed(
                            &self.stream_name,
                            &self.consumer_name,
                            &reason,
                            delay,
                        );
                        if self.sleep(delay).await {
                            continue;
                        }
                        return;
                    }
                },
            };
            let started = Instant::now();
            match self.pull_once(&bound).await {
                PullOutcome::Stopped => return,
                PullOutcome::Finished(delivered) => {
                    failures = 0;
                    consumer = Some(bound);
                    // A pull that ended at once with nothing in it (should not happen with
                    // `expires`) must not turn into a busy loop; one that delivered messages
                    // ended early because it was full, and the next one starts at once.
                    if delivered == 0
                        && started.elapsed() < Duration::from_millis(20)
                        && !self.sleep(Duration::from_millis(50)).await
                    {
                        return;
                    }
                }
                PullOutcome::Failed(reason) => {
                    failures = failures.saturating_add(1);
                    let delay = retry_delay(failures);
                    events::record_fetch_error(
                        &self.stream_name,
                        &self.consumer_name,
                        &reason,
                        delay,
                    );
                    if !self.sleep(delay).await {
                        return;
                    }
                }
            }
        }
    }

    /// Binds the consumer again after a failed pull. One still there (a server restart, a
    /// leader change) is bound as it is, keeping its place. One deleted meanwhile is created
    /// again just after the ack floor last read from the server, so that what had been
    /// acknowledged does not run again: the configured start would run the stream's whole
    /// history again. On a stream other than the one that floor was read on (deleted and
    /// created again), the configured start applies.
    async fn rebind(&self) -> Result<PullConsumer, RebindError> {
        let stream_created = match self.context.get_stream(&*self.stream_name).await {
            Ok(stream) => stream.cached_info().created,
            Err(err) => {
                return Err(RebindError {
                    stream_gone: no_such_stream(&err),
                    reason: format!("reading stream {}: {err}", self.stream_name),
                })
            }
        };
        let mut config = self.consumer_config.clone();
        let mut resumed_at = None;
        match existing_consumer(&self.stream, &self.consumer_name).await {
            Ok(Some(existing)) => {
                config.deliver_policy = existing.config.deliver_policy;
                report_moved_subjects(&self.stream_name, &existing, &self.position.subjects);
            }
            Ok(None) => {
                resumed_at = self.position.resume_from(stream_created);
                if let Some(start_sequence) = resumed_at {
                    config.deliver_policy = DeliverPolicy::ByStartSequence { start_sequence };
                }
            }
            Err(err) => {
                return Err(RebindError {
                    stream_gone: err.kind() == ConsumerInfoErrorKind::StreamNotFound,
                    reason: format!("reading consumer {}: {err}", self.consumer_name),
                })
            }
        }
        let bound = self
            .stream
            .create_consumer(config)
            .await
            .map_err(|err| RebindError {
                stream_gone: stream_not_found(&err),
                reason: err.to_string(),
            })?;
        self.position.bound(stream_created, bound.cached_info());
        if let Some(start_sequence) = resumed_at {
            events::record_consumer_recreated(
                &self.stream_name,
                &self.consumer_name,
                start_sequence,
            );
        }
        Ok(bound)
    }

    /// The stream has gone: create it again if it was declared. `Ok(true)` when it is there
    /// again (made by this call or, a moment earlier, by another subscription or process);
    /// `Ok(false)` when it is not declared; `Err` says why it could not be created.
    async fn recreate_stream(&self) -> Result<bool, String> {
        let Some(config) = self.declared.named(&self.stream_name) else {
            return Ok(false);
        };
        self.declared
            .recreate(&self.context, &config, "subscription")
            .await
            .map(|_| true)
            .map_err(|err| format!("re-creating the deleted stream: {err}"))
    }

    /// Sleeps unless cancelled; false when cancelled.
    async fn sleep(&self, delay: Duration) -> bool {
        tokio::select! {
            () = self.cancel.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }

    /// One pull request for as many messages as there are free permits.
    async fn pull_once(&self, consumer: &PullConsumer) -> PullOutcome {
        let first = tokio::select! {
            () = self.cancel.cancelled() => return PullOutcome::Stopped,
            permit = Arc::clone(&self.flow.permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return PullOutcome::Stopped,
            },
        };
        let mut held = vec![first];
        // Every pull costs a round trip and a temporary subscription, so while deliveries are
        // still queued here, wait until half the bound is free instead of pulling a handful;
        // pull at once when the queue runs dry, so nothing waits for the accumulation.
        loop {
            while held.len() < MAX_BATCH {
                match Arc::clone(&self.flow.permits).try_acquire_owned() {
                    Ok(permit) => held.push(permit),
                    Err(_) => break,
                }
            }
            let worth_a_pull = (self.flow.total() / 2).clamp(1, MAX_BATCH);
            if held.len() >= worth_a_pull || self.prefetched.is_empty() {
                break;
            }
            tokio::select! {
                () = self.cancel.cancelled() => return PullOutcome::Stopped,
                // Bounded, so an emptied queue is noticed even when no permit comes back.
                permit = tokio::time::timeout(
                    ACCUMULATE_CHECK,
                    Arc::clone(&self.flow.permits).acquire_owned(),
                ) => match permit {
                    Ok(Ok(permit)) => held.push(permit),
                    Ok(Err(_)) => return PullOutcome::Stopped,
                    Err(_) => {}
                },
            }
        }
        let mut batch = match consumer
            .batch()
            .max_messages(held.len())
            .expires(PULL_EXPIRES)
            .messages()
            .await
        {
            Ok(batch) => batch,
            Err(err) => return PullOutcome::Failed(format!("pull request: {err}")),
        };
        // One clock read per pull, not per message: it starts each delivery's wait for the
        // buffer heartbeat, which then comes a little early, never late.
        let requested = Instant::now();
        let deadline = requested + PULL_EXPIRES + PULL_GRACE;
        let mut delivered = 0usize;
        loop {
            let item = tokio::select! {
                () = self.cancel.cancelled() => return PullOutcome::Stopped,
                item = tokio::time::timeout_at(deadline, batch.next()) => item,
            };
            let message = match item {
                Err(_) => {
                    return PullOutcome::Failed(
                        "the server did not end the pull request in time".into(),
                    )
                }
                Ok(None) => return PullOutcome::Finished(delivered),
                Ok(Some(Err(err))) => return PullOutcome::Failed(err.to_string()),
                Ok(Some(Ok(message))) => message,
            };
            // The request asked for `held.len()` messages, so a permit is always there; if the
            // server ever sent more, the extra message is left unacked for redelivery rather
            // than breaking the in-flight bound.
            let Some(permit) = held.pop() else {
                continue;
            };
            let waiting = self.delivery(message, permit, requested);
            self.prefetched.push(waiting);
            delivered += 1;
        }
    }

    fn delivery(
        &self,
        message: js::Message,
        permit: OwnedSemaphorePermit,
        fetched: Instant,
    ) -> Waiting {
        let (stream, sequence, delivered) = match message.info() {
            // Always our stream, unless it is a mirror's or source's name: share the name.
            Ok(info) if info.stream == &*self.stream_name => (
                Arc::clone(&self.stream_name),
                info.stream_sequence,
                info.delivered,
            ),
            Ok(info) => (Arc::from(info.stream), info.stream_sequence, info.delivered),
            Err(err) => {
                events::record_missing_metadata(&self.stream_name, &err.to_string());
                (Arc::clone(&self.stream_name), 0, 1)
            }
        };
        let reply = message.reply.clone();
        let (message, acker) = message.split();
        let settle = JetStreamSettle {
            acker,
            stream: Arc::clone(&stream),
            sequence,
            _permit: permit,
        };
        let origin = Origin::JetStream { stream, sequence };
        let inbound = InboundMessage {
            topic: message.subject.to_string(),
            key: None,
            headers: Headers::from_nats(message.headers),
            payload: Some(message.payload),
            origin,
            delivery_count: u32::try_from(delivered.max(1)).unwrap_or(u32::MAX),
        };
        Waiting {
            delivery: Delivery::new(inbound, Box::new(settle)),
            reply,
            since: fetched,
        }
    }
}

/// A fetched delivery the dispatcher has not taken yet.
struct Waiting {
    delivery: Delivery,
    /// Where in-progress acks go while it waits.
    reply: Option<async_nats::Subject>,
    /// Fetched, or last told to the server that we are still on it.
    since: Instant,
}

/// Deliveries fetched and not yet handed out, oldest first.
#[derive(Default)]
struct Prefetched {
    queue: std::sync::Mutex<VecDeque<Waiting>>,
    ready: Notify,
}

impl Prefetched {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Waiting>> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn push(&self, waiting: Waiting) {
        self.lock().push_back(waiting);
        // Stores a permit when nobody waits, so a push between `pop` and `notified` is not missed.
        self.ready.notify_one();
    }

    /// The oldest delivery, if one is waiting.
    fn try_next(&self) -> Option<Delivery> {
        self.lock().pop_front().map(|waiting| waiting.delivery)
    }

    /// The oldest delivery; waits for one.
    async fn next(&self) -> Delivery {
        loop {
            if let Some(waiting) = self.lock().pop_front() {
                return waiting.delivery;
            }
            self.ready.notified().await;
        }
    }

    /// Reply subjects of deliveries that waited `older_than` since their last heartbeat (marked
    /// as heartbeaten now).
    fn due(&self, older_than: Duration) -> Vec<async_nats::Subject> {
        let now = Instant::now();
        self.lock()
            .iter_mut()
            .filter(|waiting| now.duration_since(waiting.since) >= older_than)
            .filter_map(|waiting| {
                waiting.since = now;
                waiting.reply.clone()
            })
            .collect()
    }

    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn drain(&self) -> Vec<Delivery> {
        self.lock()
            .drain(..)
            .map(|waiting| waiting.delivery)
            .collect()
    }
}

/// Keeps buffered deliveries from reaching their ack deadline while they wait for a slot.
async fn heartbeat(
    client: async_nats::Client,
    prefetched: Arc<Prefetched>,
    every: Duration,
    stream: String,
    cancel: CancellationToken,
) {
    let every = every.max(Duration::from_millis(10));
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        for reply in prefetched.due(every) {
            if let Err(err) = client.publish(reply, AckKind::Progress.into()).await {
                events::record_settle_error("in_progress", &stream, &err.to_string());
            }
        }
    }
}

/// A JetStream pull-consumer subscription ([`RetryStyle::Redeliver`]).
pub struct JetStreamSubscription {
    topic: String,
    ack_wait: Duration,
    flow: Arc<InFlightBound>,
    stream: stream::Stream,
    consumer_name: String,
    position: Arc<ConsumerPosition>,
    prefetched: Arc<Prefetched>,
    cancel: CancellationToken,
    fetcher: Option<JoinHandle<()>>,
    heartbeat: Option<JoinHandle<()>>,
    closed: bool,
}

impl std::fmt::Debug for JetStreamSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamSubscription")
            .field("topic", &self.topic)
            .field("consumer", &self.consumer_name)
            .field("closed", &self.closed)
            .finish()
    }
}

impl JetStreamSubscription {
    /// The consumer's name (the durable, or the generated ephemeral name).
    pub fn consumer_name(&self) -> &str {
        &self.consumer_name
    }
}

impl Drop for JetStreamSubscription {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[async_trait]
impl Subscription for JetStreamSubscription {
    async fn next(&mut self) -> Option<Delivery> {
        if self.closed {
            return None;
        }
        tokio::select! {
            () = self.cancel.cancelled() => None,
            delivery = self.prefetched.next() => Some(delivery),
        }
    }

    fn try_next(&mut self) -> Option<Delivery> {
        if self.closed {
            return None;
        }
        self.prefetched.try_next()
    }

    /// `num_pending + num_ack_pending` of the consumer, read from the server.
    async fn lag(&self) -> Result<u64, TransportError> {
        self.probe().lag().await
    }

    fn lag_probe(&self) -> Option<std::sync::Arc<dyn LagProbe>> {
        Some(std::sync::Arc::new(self.probe()))
    }

    fn flow_control(&self) -> Option<Arc<dyn FlowControl>> {
        Some(Arc::clone(&self.flow) as Arc<dyn FlowControl>)
    }

    /// A third of the ack wait: two heartbeats may be lost before the server redelivers.
    fn progress_interval(&self) -> Option<Duration> {
        Some(self.ack_wait / 3)
    }

    fn retry_style(&self) -> RetryStyle {
        RetryStyle::Redeliver
    }

    fn broker(&self) -> BrokerKind {
        BrokerKind::JetStream
    }

    /// Stops pulling; deliveries fetched but not handed out are NAKed without delay so another
    /// dispatcher can take them at once (the server counts that as a delivery). Deliveries
    /// already handed out can still be settled.
    async fn close(&mut self) {
        self.closed = true;
        self.cancel.cancel();
        if let Some(fetcher) = self.fetcher.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), fetcher).await;
        }
        if let Some(heartbeat) = self.heartbeat.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), heartbeat).await;
        }
        for delivery in self.prefetched.drain() {
            let _ = delivery.retry_after(Duration::ZERO).await;
        }
    }
}

/// Settles one JetStream message by sending the settle to the server (see the module docs for
/// why it is not confirmed). Holds one in-flight permit until it is settled or dropped.
struct JetStreamSettle {
    acker: Acker,
    stream: Arc<str>,
    sequence: u64,
    _permit: OwnedSemaphorePermit,
}

impl JetStreamSettle {
    async fn send(&self, kind: AckKind, label: &'static str) -> Result<(), TransportError> {
        self.acker.ack_with(kind).await.map_err(|err| {
            let reason = format!("{label}: {err}");
            // Only a failure spells the origin out.
            let origin = Origin::JetStream {
                stream: Arc::clone(&self.stream),
                sequence: self.sequence,
            }
            .to_string();
            events::record_settle_error(label, &origin, &reason);
            TransportError::Settle { origin, reason }
        })
    }
}

#[async_trait]
impl Settle for JetStreamSettle {
    async fn ack(self: Box<Self>) -> Result<(), TransportError> {
        self.send(AckKind::Ack, "ack").await
    }

    /// NAK with the delay (never a bare NAK, which redelivers at once and ignores backoff).
    async fn retry_after(self: Box<Self>, delay: Duration) -> Result<(), TransportError> {
        self.send(AckKind::Nak(Some(delay)), "nak").await
    }

    async fn term(self: Box<Self>) -> Result<(), TransportError> {
        self.send(AckKind::Term, "term").await
    }

    /// `+WPI`: resets the server's ack timer to another full `ack_wait`.
    async fn in_progress(&self) -> Result<(), TransportError> {
        self.send(AckKind::Progress, "in_progress").await
    }
}

/// Publishes to JetStream and waits for the stream's ack.
#[derive(Clone)]
pub struct JetStreamPublisher {
    context: Context,
    ack_timeout: Duration,
    counters: events::PublishCounters,
    declared: DeclaredStreams,
}

impl std::fmt::Debug for JetStreamPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamPublisher")
            .field("ack_timeout", &self.ack_timeout)
            .finish()
    }
}

impl JetStreamPublisher {
    pub(super) fn new(context: Context, ack_timeout: Duration, declared: DeclaredStreams) -> Self {
        Self {
            context,
            ack_timeout,
            counters: events::PublishCounters::new(BrokerKind::JetStream),
            declared,
        }
    }

    /// No stream captured `subject`. When a declared one should, it was deleted: create it
    /// again and say so. The publish itself is not repeated here (its headers went with it);
    /// the caller's retry, which every confirmed publish has, finds the stream in place.
    async fn no_stream_for(&self, subject: &str) -> String {
        if let Some(disabled) = jetstream_disabled(&self.context.client()) {
            return disabled.to_owned();
        }
        let Some(config) = self.declared.capturing(subject) else {
            return "no JetStream stream captures this subject (no responders); declare a \
                    stream whose subjects include it"
                .to_owned();
        };
        match self
            .declared
            .recreate(&self.context, &config, "publish")
            .await
        {
            Ok(_) => {
                format!(
                    "no JetStream stream captured this subject: the declared stream {} had \
                     been deleted and has been created again (empty); retry the publish",
                    config.name
                )
            }
            Err(err) => format!(
                "no JetStream stream captures this subject: the declared stream {} is gone and \
                 could not be created again: {err}",
                config.name
            ),
        }
    }

    async fn publish_confirmed(
        &self,
        message: OutboundMessage,
    ) -> Result<Published, TransportError> {
        let topic = message.topic.clone();
        let mut headers = pairs_to_headers(&topic, message.headers)?;
        if let Some(id) = &message.dedup_id {
            let value =
                id.parse::<async_nats::HeaderValue>()
                    .map_err(|_| TransportError::Publish {
                        topic: topic.clone(),
                        reason: "dedup_id contains CR or LF".into(),
                    })?;
            headers.insert(async_nats::header::NATS_MESSAGE_ID, value);
        }
        // (No stream for the subject is answered below, where it can ask the server.)
        let map_error = |err: js::context::PublishError| match err.kind() {
            PublishErrorKind::TimedOut => TransportError::PublishTimeout {
                topic: topic.clone(),
                timeout: self.ack_timeout,
            },
            _ if too_large(&err) => TransportError::TooLarge {
                topic: topic.clone(),
                reason: err.to_string(),
            },
            _ => TransportError::Publish {
                topic: topic.clone(),
                reason: err.to_string(),
            },
        };
        let published = match self
            .context
            .publish_with_headers(message.topic, headers, message.payload)
            .await
        {
            Ok(ack_future) => ack_future.await,
            Err(err) => Err(err),
        };
        let ack = match published {
            Ok(ack) => ack,
            Err(err) if err.kind() == PublishErrorKind::StreamNotFound => {
                return Err(TransportError::Publish {
                    reason: self.no_stream_for(&topic).await,
                    topic,
                })
            }
            Err(err) => return Err(map_error(err)),
        };
        if ack.duplicate {
            self.counters.duplicate(&ack.stream, ack.sequence);
            Ok(Published::Duplicate)
        } else {
            self.counters.ok();
            Ok(Published::Stored)
        }
    }
}

/// Whether a publish was refused for its size: by async-nats, which measures payload and
/// headers against the server's `max_payload` before sending, or by the stream, whose
/// `max_msg_size` (or header limit) the server checks. Either way the same message fails again.
fn too_large(err: &js::context::PublishError) -> bool {
    match err.kind() {
        PublishErrorKind::MaxPayloadExceeded => true,
        PublishErrorKind::Other => std::error::Error::source(err)
            .and_then(|source| source.downcast_ref::<js::Error>())
            .is_some_and(|refusal| {
                matches!(
                    refusal.error_code(),
                    js::ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM
                        | js::ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM
                )
            }),
        _ => false,
    }
}

#[async_trait]
impl Publisher for JetStreamPublisher {
    /// Sets `Nats-Msg-Id` from `dedup_id`; a duplicate inside the stream's window is success,
    /// [`Published::Duplicate`]. The key is not sent (JetStream has none; the dispatcher keys
    /// by `partitionkey` or subject).
    async fn publish(&self, message: OutboundMessage) -> Result<Published, TransportError> {
        let topic = message.topic.clone();
        let result =
            match tokio::time::timeout(self.ack_timeout, self.publish_confirmed(message)).await {
                Ok(result) => result,
                Err(_) => Err(TransportError::PublishTimeout {
                    topic,
                    timeout: self.ack_timeout,
                }),
            };
        match &result {
            Ok(_) => {}
            Err(TransportError::PublishTimeout { .. }) => self.counters.timeout(),
            Err(_) => self.counters.error(),
        }
        result
    }

    fn broker(&self) -> BrokerKind {
        BrokerKind::JetStream
    }
}

/// What [`NatsTransport::ensure_stream`](super::NatsTransport::ensure_stream) did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamReport {
    pub name: String,
    /// The stream was missing and has been created.
    pub created: bool,
    /// Settings of the existing stream that differ from the configuration (left unchanged).
    pub differences: Vec<StreamDifference>,
}

/// One setting of an existing stream that differs from the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamDifference {
    /// The configuration key (`subjects`, `storage`, `max_age`, ...).
    pub field: &'static str,
    pub configured: String,
    pub actual: String,
}

impl std::fmt::Display for StreamDifference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: configured {}, server has {}",
            self.field, self.configured, self.actual
        )
    }
}

/// Creates the stream when it is missing. When it exists, it is **not** changed (changing a
/// live stream's storage, retention or limits can drop data, so that stays an operator's
/// decision): the report lists every setting that differs, and a warning is logged.
pub(super) async fn ensure_stream(
    jetstream: &Context,
    config: &StreamConfig,
) -> Result<StreamReport, TransportError> {
    try_ensure_stream(jetstream, config)
        .await
        .map_err(|failure| failure.error)
}

/// [`ensure_stream`], asking again while JetStream does not answer or the cluster has no
/// leader for the stream yet (a cluster starting up), for up to `wait`.
pub(super) async fn ensure_stream_waiting(
    jetstream: &Context,
    config: &StreamConfig,
    wait: Duration,
    delay_max: Duration,
) -> Result<StreamReport, TransportError> {
    let started = tokio::time::Instant::now();
    let report = at_startup(wait, delay_max, || try_ensure_stream(jetstream, config)).await?;
    // A stream that exists may have no leader yet: its replicas answer for it all the same.
    let left = wait.saturating_sub(started.elapsed());
    wait_for_stream(jetstream, &config.name, left, delay_max).await?;
    Ok(report)
}

/// Waits up to `wait` while the stream `name` does not answer, or answers that it has no
/// leader (a cluster that has not elected one for it yet). Done when it answers with a
/// leader, and when it is missing or any other error comes back: binding a consumer to it
/// then says what is wrong.
pub(super) async fn wait_for_stream(
    jetstream: &Context,
    name: &str,
    wait: Duration,
    delay_max: Duration,
) -> Result<(), TransportError> {
    let not_ready = |reason: String| StreamFailure {
        error: TransportError::Subscribe {
            topic: format!("stream {name}"),
            reason,
        },
        transient: true,
    };
    at_startup(wait, delay_max, || async {
        match jetstream.get_stream(name).await {
            // A replica answers for a stream whose group has no leader, saying so.
            Ok(stream)
                if stream
                    .cached_info()
                    .cluster
                    .as_ref()
                    .is_some_and(|cluster| cluster.leader.is_none()) =>
            {
                Err(not_ready(
                    "its servers have not elected a leader for it yet".to_owned(),
                ))
            }
            Err(err) if stream_read_transient(&err) => Err(not_ready(format!("reading: {err}"))),
            _ => Ok(()),
        }
    })
    .await
}

/// `attempt` until it succeeds or fails for good, asking again while its failure is
/// transient, for up to `wait`; each wait logged and counted.
async fn at_startup<T, F>(
    wait: Duration,
    delay_max: Duration,
    attempt: impl FnMut() -> F,
) -> Result<T, TransportError>
where
    F: std::future::Future<Output = Result<T, StreamFailure>>,
{
    super::retry_until(
        tokio::time::Instant::now() + wait,
        delay_max,
        attempt,
        |error, delay, left| {
            events::record_jetstream_unready_at_startup(&error.to_string(), delay, left);
        },
    )
    .await
    .map_err(|(failure, _)| failure.error)
}

/// Whether a stream read failed for a cluster not ready (unanswered, or refused while it
/// elects its leaders): asking again may help.
fn stream_read_transient(err: &GetStreamError) -> bool {
    match err.kind() {
        GetStreamErrorKind::JetStream(refusal) => cluster_not_ready(&refusal),
        GetStreamErrorKind::Request => super::request_failed(err, RequestErrorKind::TimedOut),
        _ => false,
    }
}

/// Why a stream could not be ensured, and whether asking again may help.
type StreamFailure = super::StartupFailure<TransportError>;

/// A JetStream refusal that a cluster gives while it elects its leaders.
fn cluster_not_ready(refusal: &js::Error) -> bool {
    matches!(
        refusal.error_code(),
        js::ErrorCode::CLUSTER_NOT_AVAILABLE
            | js::ErrorCode::CLUSTER_NOT_ACTIVE
            | js::ErrorCode::CLUSTER_NOT_LEADER
            | js::ErrorCode::STREAM_OFFLINE
    )
}

async fn try_ensure_stream(
    jetstream: &Context,
    config: &StreamConfig,
) -> Result<StreamReport, StreamFailure> {
    let problems = config.validate("stream");
    if !problems.is_empty() {
        return Err(StreamFailure {
            error: TransportError::Config(problems.join("; ")),
            transient: false,
        });
    }
    let stream_error = |reason: String, transient: bool| StreamFailure {
        error: TransportError::Subscribe {
            topic: format!("stream {}", config.name),
            reason,
        },
        transient,
    };
    let wanted = to_stream_config(config);
    match jetstream.get_stream(&config.name).await {
        Ok(existing) => {
            let differences = differences(&wanted, &existing.cached_info().config);
            if !differences.is_empty() {
                events::record_stream_drift(&config.name, &differences);
            }
            Ok(StreamReport {
                name: config.name.clone(),
                created: false,
                differences,
            })
        }
        Err(err) if no_such_stream(&err) => {
            jetstream.create_stream(wanted).await.map_err(|err| {
                let transient = match err.kind() {
                    CreateStreamErrorKind::TimedOut => true,
                    CreateStreamErrorKind::JetStream(refusal) => cluster_not_ready(&refusal),
                    _ => false,
                };
                stream_error(format!("creating: {err}"), transient)
            })?;
            events::record_stream_created(&config.name);
            Ok(StreamReport {
                name: config.name.clone(),
                created: true,
                differences: Vec::new(),
            })
        }
        Err(err) => {
            let transient = stream_read_transient(&err);
            Err(match jetstream_disabled(&jetstream.client()) {
                Some(disabled) => stream_error(disabled.to_owned(), false),
                None => stream_error(format!("reading: {err}"), transient),
            })
        }
    }
}

fn to_stream_config(config: &StreamConfig) -> stream::Config {
    stream::Config {
        name: config.name.clone(),
        subjects: config.subjects.clone(),
        storage: match config.storage {
            StorageKind::File => StorageType::File,
            StorageKind::Memory => StorageType::Memory,
        },
        retention: match config.retention {
            RetentionKind::Limits => RetentionPolicy::Limits,
            RetentionKind::Interest => RetentionPolicy::Interest,
            RetentionKind::WorkQueue => RetentionPolicy::WorkQueue,
        },
        max_messages: config.max_msgs.unwrap_or(-1),
        max_bytes: config
            .max_bytes
            .map_or(-1, |size| i64::try_from(size.as_u64()).unwrap_or(i64::MAX)),
        max_age: config.max_age.unwrap_or(Duration::ZERO),
        num_replicas: config.replicas,
        duplicate_window: config.duplicate_window,
        discard: match config.discard {
            DiscardKind::Old => DiscardPolicy::Old,
            DiscardKind::New => DiscardPolicy::New,
        },
        ..Default::default()
    }
}

fn differences(wanted: &stream::Config, actual: &stream::Config) -> Vec<StreamDifference> {
    let mut found = Vec::new();
    let mut check = |field: &'static str, configured: String, actual: String| {
        if configured != actual {
            found.push(StreamDifference {
                field,
                configured,
                actual,
            });
        }
    };
    let sorted = |subjects: &[String]| {
        let mut subjects = subjects.to_vec();
        subjects.sort();
        format!("{subjects:?}")
    };
    let limit = |value: i64| {
        if value < 0 {
            "unlimited".to_owned()
        } else {
            value.to_string()
        }
    };
    let age = |value: Duration| {
        if value.is_zero() {
            "unlimited".to_owned()
        } else {
            format!("{value:?}")
        }
    };
    check(
        "subjects",
        sorted(&wanted.subjects),
        sorted(&actual.subjects),
    );
    check(
        "storage",
        format!("{:?}", wanted.storage),
        format!("{:?}", actual.storage),
    );
    check(
        "retention",
        format!("{:?}", wanted.retention),
        format!("{:?}", actual.retention),
    );
    check(
        "max_msgs",
        limit(wanted.max_messages),
        limit(actual.max_messages),
    );
    check(
        "max_bytes",
        limit(wanted.max_bytes),
        limit(actual.max_bytes),
    );
    check("max_age", age(wanted.max_age), age(actual.max_age));
    check(
        "replicas",
        wanted.num_replicas.to_string(),
        actual.num_replicas.to_string(),
    );
    check(
        "duplicate_window",
        format!("{:?}", wanted.duplicate_window),
        format!("{:?}", actual.duplicate_window),
    );
    check(
        "discard",
        format!("{:?}", wanted.discard),
        format!("{:?}", actual.discard),
    );
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Consumer info as nats-server 2.9 gives it for a consumer made with deliver policy
    /// `new` on a stream holding `last` messages, after `delivered` deliveries and `acked`
    /// acknowledgements of the first ones.
    fn info_of_new_consumer(last: u64, delivered: u64, acked: u64) -> consumer::Info {
        let info = serde_json::json!({
            "type": "consumer_info_response",
            "stream_name": "S",
            "name": "d",
            "created": "2026-12-07T17:00:00Z",
            "config": {"durable_name": "d", "deliver_policy": "new", "ack_policy": "explicit"},
            "delivered": {"consumer_seq": delivered, "stream_seq": last + delivered},
            "ack_floor": {
                "consumer_seq": acked,
                "stream_seq": if acked == 0 { 0 } else { last + acked }
            },
            "num_ack_pending": delivered - acked,
            "num_redelivered": 0,
            "num_waiting": 0,
            "num_pending": 0,
            "cluster": null,
            "push_bound": false,
            "paused": false,
            "pause_remaining": null,
            "ts": "2026-12-07T17:00:00Z"
        });
        match serde_json::from_value(info) {
            Ok(info) => info,
            Err(err) => panic!("consumer info: {err}"),
        }
    }

    #[test]
    fn a_consumer_that_delivered_nothing_is_floored_where_it_starts() {
        assert_eq!(floor_at_binding(&info_of_new_consumer(3, 0, 0)), 3);
        // Once it delivers, the ack floor alone says what was done: 4 and 5 are not.
        assert_eq!(floor_at_binding(&info_of_new_consumer(3, 2, 0)), 0);
        assert_eq!(floor_at_binding(&info_of_new_consumer(3, 2, 1)), 4);
    }

    #[test]
    fn retry_delay_is_bounded() {
        assert_eq!(retry_delay(1), RETRY_MIN);
        assert_eq!(retry_delay(2), RETRY_MIN * 2);
        assert_eq!(retry_delay(u32::MAX), RETRY_MAX);
    }

    #[test]
    fn differences_name_each_changed_setting() {
        let mut config = StreamConfig::new("S", vec!["a.>".into(), "b.>".into()]);
        let wanted = to_stream_config(&config);
        let mut same = wanted.clone();
        same.subjects.reverse();
        assert!(differences(&wanted, &same).is_empty());
        config.storage = StorageKind::Memory;
        config.max_age = Some(Duration::from_secs(3600));
        let changed = differences(&to_stream_config(&config), &wanted);
        let fields: Vec<&str> = changed.iter().map(|d| d.field).collect();
        assert_eq!(fields, vec!["storage", "max_age"]);
        assert_eq!(changed[1].actual, "unlimited");
    }
}

/// The consumer's lag, read from the server.
#[derive(Clone)]
struct JetStreamLag {
    topic: String,
    stream: stream::Stream,
    consumer_name: String,
    position: Arc<ConsumerPosition>,
}

#[async_trait]
impl LagProbe for JetStreamLag {
    async fn lag(&self) -> Result<u64, TransportError> {
        let info = self
            .stream
            .consumer_info(&self.consumer_name)
            .await
            .map_err(|err| TransportError::Lag {
                topic: self.topic.clone(),
                reason: err.to_string(),
            })?;
        if let Some(moved_to) = self.position.observe(&info) {
            events::record_consumer_moved_by_another(
                &info.stream_name,
                &info.name,
                &self.position.subjects.join(", "),
                &moved_to.join(", "),
            );
        }
        Ok(info
            .num_pending
            .saturating_add(u64::try_from(info.num_ack_pending).unwrap_or(u64::MAX)))
    }
}

impl JetStreamSubscription {
    fn probe(&self) -> JetStreamLag {
        JetStreamLag {
            topic: self.topic.clone(),
            stream: self.stream.clone(),
            consumer_name: self.consumer_name.clone(),
            position: Arc::clone(&self.position),
        }
    }
}

/// The bound on fetched-and-unsettled messages, resizable while the fetcher runs: the caller's
/// in-flight slots times `1 + prefetch`. It follows the slots so that a scaled-down function
/// does not keep a large buffer of fetched messages waiting (heartbeaten, but unavailable to
/// other dispatchers of the same durable consumer).
struct InFlightBound {
    permits: Arc<Semaphore>,
    per_slot: usize,
    total: std::sync::Mutex<usize>,
}

impl InFlightBound {
    /// The current bound.
    fn total(&self) -> usize {
        *self
            .total
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl FlowControl for InFlightBound {
    fn set_max_in_flight(&self, max: usize) {
        let max = max.max(1).saturating_mul(self.per_slot);
        let mut total = self
            .total
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match max.cmp(&*total) {
            std::cmp::Ordering::Greater => self.permits.add_permits(max - *total),
            std::cmp::Ordering::Less => {
                // Permits held by unsettled deliveries come back later; take them as they do.
                let owed = u32::try_from(*total - max).unwrap_or(u32::MAX);
                let permits = Arc::clone(&self.permits);
                tokio::spawn(async move {
                    if let Ok(taken) = permits.acquire_many_owned(owed).await {
                        taken.forget();
                    }
                });
            }
            std::cmp::Ordering::Equal => {}
        }
        *total = max;
    }
}
