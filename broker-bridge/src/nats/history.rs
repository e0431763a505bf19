//! Reading what a JetStream stream holds for a subject, from its first message on (or from
//! the last N), then following it: what `weir tail --nats` shows for a subject a stream
//! captures (outputs, dead letters), so that an event published before the tail started is not
//! missed.
//!
//! It uses an ordered consumer: ephemeral, unacknowledged, recreated by async-nats when it
//! sees a gap, so reading leaves no durable state on the server and takes nothing from the
//! functions' durable consumers. It is named (`weir-tail-…`, and `weir-tail-…_N` once
//! async-nats has re-created it) so that [`Subscription::close`] can delete it: otherwise it
//! would stay listed on the stream for its 30 s inactivity threshold after every `weir tail`.
//! Finding where the last N messages of a subject start (the subject shares its stream's
//! sequence with other subjects) is a binary search over the stream's sequences, each step
//! asking the server how many of the subject's messages lie at or after a sequence (a
//! short-lived consumer's `num_pending`), so it costs a few dozen requests, not a read of the
//! whole stream. Every [`STREAM_CHECK`] it looks whether its stream still exists and is the
//! one it opened: async-nats re-creates an ordered consumer for ever, so a deleted stream would
//! otherwise leave the reader waiting in silence, and one created again would be read from the
//! old stream's sequence on, missing its first messages. Either ends the read, with
//! [`Subscription::ended_by`] saying why. A workqueue stream is refused: JetStream serves one
//! only to consumers that acknowledge, and an acknowledgement removes the message from the
//! functions' queue. It is for inspection only: it is not a trigger (no acks, no redelivery,
//! no lag) and deliberately does not implement the delivery contract.

use std::sync::Arc;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::stream::RetentionPolicy;
use async_trait::async_trait;
use futures::StreamExt;

use super::NatsTransport;
use crate::{
    BrokerKind, Delivery, Headers, InboundMessage, Origin, RetryStyle, StatelessSettle,
    Subscription, TransportError,
};

impl NatsTransport {
    /// The stream that captures `subject`, read from its first message on (with `last`, from
    /// the first of the subject's last `last` messages), then followed; or `None` when no
    /// stream captures it or the server has no JetStream (a core subject: only new messages
    /// can be seen).
    pub async fn read_subject_history(
        &self,
        subject: &str,
        last: Option<u64>,
    ) -> Result<Option<SubjectHistory>, TransportError> {
        let subscribe_error = |reason: String| TransportError::Subscribe {
            topic: subject.to_owned(),
            reason,
        };
        let Some((stream_name, stream)) = self.open_stream_capturing(subject).await? else {
            return Ok(None);
        };
        // The server serves a work queue only to consumers that acknowledge, and an ack there
        // removes the message: reading would take events from the functions that consume it.
        if stream.cached_info().config.retention == RetentionPolicy::WorkQueue {
            return Err(subscribe_error(format!(
                "stream {stream_name} is a workqueue stream: JetStream lets only consumers that \
                 acknowledge read it, and each acknowledgement would take a message from the \
                 functions that consume it; `--core` shows new messages on {subject} as they \
                 are published"
            )));
        }
        let deliver_policy = match last {
            None => DeliverPolicy::All,
            Some(last) => start_of_last(&stream, subject, last)
                .await
                .map_err(|reason| {
                    subscribe_error(format!(
                        "finding the last {last} messages in stream {stream_name}: {reason}"
                    ))
                })?,
        };
        let consumer_name = reader_name("tail");
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                // After a gap async-nats re-creates it as `{name}_{serial}`.
                name: Some(consumer_name.clone()),
                filter_subject: subject.to_owned(),
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|err| {
                subscribe_error(format!(
                    "creating an ordered consumer on stream {stream_name}: {err}"
                ))
            })?;
        let messages = consumer.messages().await.map_err(|err| {
            subscribe_error(format!(
                "reading stream {stream_name} from its start: {err}"
            ))
        })?;
        Ok(Some(SubjectHistory {
            stream: Arc::from(stream_name),
            subject: subject.to_owned(),
            consumer_name,
            jetstream: self.jetstream.clone(),
            created: stream.cached_info().created,
            next_check: tokio::time::Instant::now() + STREAM_CHECK,
            stream_handle: stream,
            messages: Some(std::sync::Mutex::new(messages)),
            ended_by: None,
        }))
    }
}

impl NatsTransport {
    /// The stream that captures `subject`, by name and opened; `None` when no stream captures
    /// it or the server has no JetStream.
    pub(super) async fn open_stream_capturing(
        &self,
        subject: &str,
    ) -> Result<Option<(String, async_nats::jetstream::stream::Stream)>, TransportError> {
        let Some(name) = self.stream_capturing(subject).await? else {
            return Ok(None);
        };
        match self.jetstream.get_stream(&name).await {
            Ok(stream) => Ok(Some((name, stream))),
            Err(err) => Err(TransportError::Subscribe {
                topic: subject.to_owned(),
                reason: format!("opening stream {name}: {err}"),
            }),
        }
    }
}

/// A message a stream stored, as the transport hands it on (read outside any trigger: a first
/// delivery, no key).
pub(super) fn stored_message(
    message: async_nats::Message,
    stream: &Arc<str>,
    sequence: u64,
) -> InboundMessage {
    InboundMessage {
        topic: message.subject.to_string(),
        key: None,
        headers: Headers::from_nats(message.headers),
        payload: Some(message.payload),
        origin: Origin::JetStream {
            stream: Arc::clone(stream),
            sequence,
        },
        delivery_count: 1,
    }
}

/// How long closing a history read waits for the server to delete its consumer.
const DELETE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// How often a history read checks that its stream is still the one it opened: one small
/// request each time, and a deleted or re-created stream noticed within it.
const STREAM_CHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// Where reading must start to see the last `last` messages on `subject`: the stream sequence
/// `s` with exactly `last` of the subject's messages at or after it, found by binary search
/// (the count only falls as `s` grows). Messages stored meanwhile can only add to what is
/// shown, never hide one of the last `last`.
async fn start_of_last(
    stream: &async_nats::jetstream::stream::Stream,
    subject: &str,
    last: u64,
) -> Result<DeliverPolicy, String> {
    if last == 0 {
        return Ok(DeliverPolicy::New);
    }
    // Fetched with the stream a moment ago.
    let state = &stream.cached_info().state;
    // Invariant: at least `last` at or after `low`, fewer than `last` at or after `high`.
    let mut low = state.first_sequence.max(1);
    if pending_from(stream, subject, low).await? <= last {
        return Ok(DeliverPolicy::All);
    }
    let mut high = state.last_sequence.saturating_add(1);
    // At most 64 rounds: the interval halves each time.
    while high - low > 1 {
        let middle = low + (high - low) / 2;
        if pending_from(stream, subject, middle).await? >= last {
            low = middle;
        } else {
            high = middle;
        }
    }
    Ok(DeliverPolicy::ByStartSequence {
        start_sequence: low,
    })
}

/// How many messages on `subject` the stream holds at or after `sequence`: the `num_pending`
/// of a consumer created there, which is deleted again at once (it acks nothing, keeps its
/// state in memory, and the server drops it by itself should the delete not arrive).
async fn pending_from(
    stream: &async_nats::jetstream::stream::Stream,
    subject: &str,
    sequence: u64,
) -> Result<u64, String> {
    let consumer = stream
        .create_consumer(pull::Config {
            filter_subject: subject.to_owned(),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: sequence,
            },
            ack_policy: AckPolicy::None,
            memory_storage: true,
            inactive_threshold: std::time::Duration::from_secs(5),
            ..Default::default()
        })
        .await
        .map_err(|err| format!("counting messages from sequence {sequence}: {err}"))?;
    let pending = consumer.cached_info().num_pending;
    let name = consumer.cached_info().name.clone();
    if let Err(err) = stream.delete_consumer(&name).await {
        super::events::record_reading_consumer_left(&name, &err.to_string());
    }
    Ok(pending)
}

/// A consumer name no other reader has (`weir-<purpose>-…`): the process, the time and a
/// count within the process.
pub(super) fn reader_name(purpose: &str) -> String {
    static READERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos());
    let count = READERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("weir-{purpose}-{}-{nanos:x}-{count}", std::process::id())
}

/// A stream's messages on one subject, oldest first, then new ones as they are stored.
pub struct SubjectHistory {
    stream: Arc<str>,
    subject: String,
    /// The ordered consumer's name, to delete it on close.
    consumer_name: String,
    /// To look the stream up again by name ([`stream_gone`]).
    jetstream: async_nats::jetstream::Context,
    /// When the stream read was created: a stream of that name created later is another one.
    created: async_nats::datetime::DateTime,
    next_check: tokio::time::Instant,
    stream_handle: async_nats::jetstream::stream::Stream,
    /// `None` once ended. In a mutex only to be `Sync` (the trait's `&self` methods need it;
    /// the stream is not): `next` takes `&mut self` and reaches it without locking.
    messages: Option<std::sync::Mutex<pull::Ordered>>,
    /// Why the read ended by itself.
    ended_by: Option<String>,
}

impl std::fmt::Debug for SubjectHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubjectHistory")
            .field("stream", &self.stream)
            .field("subject", &self.subject)
            .field("consumer", &self.consumer_name)
            .field("ended", &self.messages.is_none())
            .finish()
    }
}

impl SubjectHistory {
    /// The stream being read.
    pub fn stream(&self) -> &str {
        &self.stream
    }
}

#[async_trait]
impl Subscription for SubjectHistory {
    /// Ends (`None`, with [`Subscription::ended_by`] saying why) when the stream was deleted
    /// or created again, or the ordered consumer gives up; the reason is logged too. Gaps and
    /// reconnects it rides out itself.
    async fn next(&mut self) -> Option<Delivery> {
        let messages = self
            .messages
            .as_mut()?
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let next = loop {
            tokio::select! {
                next = messages.next() => break next.map(|next| next.map_err(|err| err.to_string())),
                () = tokio::time::sleep_until(self.next_check) => {
                    self.next_check = tokio::time::Instant::now() + STREAM_CHECK;
                    if let Some(gone) = stream_gone(&self.jetstream, &self.stream, self.created).await {
                        break Some(Err(gone));
                    }
                }
            }
        };
        match next {
            Some(Ok(message)) => {
                let sequence = message.info().map_or(0, |info| info.stream_sequence);
                let (message, _acker) = message.split();
                let inbound = stored_message(message, &self.stream, sequence);
                Some(Delivery::new(inbound, Box::new(StatelessSettle)))
            }
            Some(Err(reason)) => {
                super::events::record_history_ended(&self.stream, &self.subject, &reason);
                self.messages = None;
                self.ended_by = Some(reason);
                None
            }
            None => {
                self.messages = None;
                None
            }
        }
    }

    /// Not tracked: a history read is not a trigger.
    async fn lag(&self) -> Result<u64, TransportError> {
        Ok(0)
    }

    fn retry_style(&self) -> RetryStyle {
        RetryStyle::InPlace
    }

    fn broker(&self) -> BrokerKind {
        BrokerKind::JetStream
    }

    fn ended_by(&self) -> Option<&str> {
        self.ended_by.as_deref()
    }

    /// Stops the pulls and deletes the consumer, waiting at most `DELETE_TIMEOUT` (2 s): a reader
    /// that cannot reach the server must still be able to exit, and the server removes the
    /// consumer by itself after its inactivity threshold.
    async fn close(&mut self) {
        self.messages = None;
        remove_reader(&self.stream_handle, &self.consumer_name).await;
    }
}

/// Deletes a reading consumer (see [`delete_reader`]), waiting at most [`DELETE_TIMEOUT`]: a
/// reader that cannot reach the server must still be able to exit, and the server removes the
/// consumer by itself after its inactivity threshold. A consumer left behind is logged.
pub(super) async fn remove_reader(stream: &async_nats::jetstream::stream::Stream, name: &str) {
    let reason = match tokio::time::timeout(DELETE_TIMEOUT, delete_reader(stream, name)).await {
        Ok(Ok(())) => return,
        Ok(Err(reason)) => reason,
        Err(_) => format!("no answer within {DELETE_TIMEOUT:?}"),
    };
    super::events::record_reading_consumer_left(name, &reason);
}

/// Why the stream a history read opened is no longer there to read, if it is not: deleted, or
/// deleted and created again (the same name, another `created` time). A failed lookup is not
/// an answer (the server may be restarting; async-nats reconnects): the next check asks
/// again.
async fn stream_gone(
    jetstream: &async_nats::jetstream::Context,
    stream: &str,
    created: async_nats::datetime::DateTime,
) -> Option<String> {
    match jetstream.get_stream(stream).await {
        Ok(found) if found.cached_info().created != created => Some(format!(
            "stream {stream} was deleted and created again (its sequence started over, so reading on would skip its first messages); run weir tail again to read the new stream"
        )),
        Ok(_) => None,
        Err(err) if super::jetstream::no_such_stream(&err) => {
            Some(format!("stream {stream} was deleted"))
        }
        Err(err) => {
            super::events::record_stream_check_failed(stream, &err.to_string());
            None
        }
    }
}

/// Deletes a history read's consumer under whichever name it has now: `name`, or
/// `{name}_{serial}` once async-nats has re-created it (the re-creation deletes the one
/// before, so there is one; a reader's name is unique, so no other reader's matches).
async fn delete_reader(
    stream: &async_nats::jetstream::stream::Stream,
    name: &str,
) -> Result<(), String> {
    use futures::TryStreamExt as _;

    let names: Vec<String> = stream
        .consumer_names()
        .try_collect()
        .await
        .map_err(|err| format!("listing the stream's consumers: {err}"))?;
    let ours = names.iter().filter(|found| {
        found
            .strip_prefix(name)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('_'))
    });
    for found in ours {
        stream
            .delete_consumer(found)
            .await
            .map_err(|err| format!("deleting {found}: {err}"))?;
    }
    Ok(())
}
