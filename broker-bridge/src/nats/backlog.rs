//! Reading what a JetStream stream holds for a subject once, to the last message stored when the
//! read began, deleting each message its reader has sent on: a dead-letter queue as
//! `weir dlq redrive` drains it.
//!
//! The end is the subject's last message when the read begins, so events that fail again
//! while a redrive runs (their new records land after it) wait for the next redrive instead of
//! going round for ever. Messages are read with an ephemeral consumer that acknowledges
//! nothing (so reading takes nothing from anyone), and a message is deleted by sequence only
//! once the reader says it was sent on and confirmed. A message deleted by someone else
//! meanwhile is simply not read. Refused: a workqueue stream (only acknowledging consumers may
//! read one, and an acknowledgement is itself a removal) and, when messages are to be deleted,
//! a stream that denies deletes; `keep` reads without deleting.
//!
//! It does not decide what is sent where (the dispatcher's `redrive`), and it is not a trigger:
//! no acks, no redelivery, no lag.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::stream::{LastRawMessageErrorKind, RetentionPolicy};
use async_trait::async_trait;
use futures::StreamExt;

use super::history::{reader_name, remove_reader, stored_message};
use super::NatsTransport;
use crate::{Backlog, InboundMessage, Origin, TransportError};

/// How long a read waits for the next message it knows is there before it takes the rest as
/// gone (deleted by someone else since the read began).
const NEXT_TIMEOUT: Duration = Duration::from_secs(10);

impl NatsTransport {
    /// What the stream capturing `subject` holds for it, up to its last message now; `None`
    /// when no stream captures the subject (a core subject keeps nothing). With `keep`,
    /// nothing read is deleted.
    pub async fn read_backlog(
        &self,
        subject: &str,
        keep: bool,
    ) -> Result<Option<SubjectBacklog>, TransportError> {
        let error = |reason: String| TransportError::Subscribe {
            topic: subject.to_owned(),
            reason,
        };
        let Some((stream_name, stream)) = self.open_stream_capturing(subject).await? else {
            return Ok(None);
        };
        let config = &stream.cached_info().config;
        if config.retention == RetentionPolicy::WorkQueue {
            return Err(error(format!(
                "stream {stream_name} is a workqueue stream: JetStream lets only consumers that \
                 acknowledge read it, and an acknowledgement removes the message whether or not \
                 it was sent on; give the dead letters a limits or interest stream"
            )));
        }
        if config.deny_delete && !keep {
            return Err(error(format!(
                "stream {stream_name} denies deletes (deny_delete), so what is sent back could \
                 not be taken out of it; keep the records (--keep) or allow deletes"
            )));
        }
        let end = match stream.get_last_raw_message_by_subject(subject).await {
            Ok(last) => last.sequence,
            Err(err) if err.kind() == LastRawMessageErrorKind::NoMessageFound => 0,
            Err(err) => {
                return Err(error(format!(
                    "finding the last message on {subject} in stream {stream_name}: {err}"
                )))
            }
        };
        let stream_name: Arc<str> = Arc::from(stream_name);
        if end == 0 {
            return Ok(Some(SubjectBacklog {
                stream: stream_name,
                stream_handle: stream,
                subject: subject.to_owned(),
                end,
                keep,
                reading: None,
            }));
        }
        let consumer = stream
            .create_consumer(pull::Config {
                name: Some(reader_name("redrive")),
                filter_subject: subject.to_owned(),
                deliver_policy: DeliverPolicy::All,
                ack_policy: AckPolicy::None,
                memory_storage: true,
                // Left behind only by a reader that could not delete it.
                inactive_threshold: Duration::from_secs(30),
                ..Default::default()
            })
            .await
            .map_err(|err| {
                error(format!(
                    "creating a consumer on stream {stream_name}: {err}"
                ))
            })?;
        let name = consumer.cached_info().name.clone();
        let messages = consumer
            .messages()
            .await
            .map_err(|err| error(format!("reading stream {stream_name}: {err}")))?;
        Ok(Some(SubjectBacklog {
            stream: stream_name,
            stream_handle: stream,
            subject: subject.to_owned(),
            end,
            keep,
            reading: Some(Reading {
                consumer: name,
                messages: std::sync::Mutex::new(messages),
            }),
        }))
    }
}

/// A subject's messages in a stream, oldest first, up to the last one stored when the read
/// began.
pub struct SubjectBacklog {
    stream: Arc<str>,
    stream_handle: async_nats::jetstream::stream::Stream,
    subject: String,
    /// The stream sequence of the subject's last message when the read began (0: none).
    end: u64,
    keep: bool,
    /// `None` once the end is reached (or there was nothing to read).
    reading: Option<Reading>,
}

struct Reading {
    consumer: String,
    /// In a mutex only to be `Send` + `Sync` for the trait object; `next` takes `&mut self`.
    messages: std::sync::Mutex<pull::Stream>,
}

impl std::fmt::Debug for SubjectBacklog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubjectBacklog")
            .field("stream", &self.stream)
            .field("subject", &self.subject)
            .field("end", &self.end)
            .field("keep", &self.keep)
            .finish_non_exhaustive()
    }
}

impl SubjectBacklog {
    /// The stream read.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// Stops reading and deletes the consumer (within a bound: see [`remove_reader`]).
    async fn stop_reading(&mut self) {
        let Some(reading) = self.reading.take() else {
            return;
        };
        drop(reading.messages);
        remove_reader(&self.stream_handle, &reading.consumer).await;
    }
}

#[async_trait]
impl Backlog for SubjectBacklog {
    async fn next(&mut self) -> Result<Option<InboundMessage>, TransportError> {
        let Some(reading) = self.reading.as_mut() else {
            return Ok(None);
        };
        let messages = reading
            .messages
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let received = tokio::time::timeout(NEXT_TIMEOUT, messages.next()).await;
        let message = match received {
            Ok(Some(Ok(message))) => message,
            Ok(Some(Err(err))) => {
                let reason = format!("reading stream {}: {err}", self.stream);
                self.stop_reading().await;
                return Err(TransportError::Subscribe {
                    topic: self.subject.clone(),
                    reason,
                });
            }
            // Ended, or nothing more within the timeout: what was left before the end was
            // deleted meanwhile (the consumer had delivered everything up to it).
            Ok(None) | Err(_) => {
                self.stop_reading().await;
                return Ok(None);
            }
        };
        let (sequence, pending) = message
            .info()
            .map_or((0, 0), |info| (info.stream_sequence, info.pending));
        if sequence > self.end {
            self.stop_reading().await;
            return Ok(None);
        }
        let (message, _acker) = message.split();
        let inbound = stored_message(message, &self.stream, sequence);
        if sequence == self.end || pending == 0 {
            self.stop_reading().await;
        }
        Ok(Some(inbound))
    }

    async fn done(&mut self, origin: &Origin, sent: bool) -> Result<(), TransportError> {
        if !sent || self.keep {
            return Ok(());
        }
        let Origin::JetStream { sequence, .. } = origin else {
            return Err(TransportError::Settle {
                origin: origin.to_string(),
                reason: format!("not a message of stream {}", self.stream),
            });
        };
        let Err(err) = self.stream_handle.delete_message(*sequence).await else {
            return Ok(());
        };
        // Gone already is as good as deleted (another redrive of the same queue took it).
        if let Err(gone) = self.stream_handle.get_raw_message(*sequence).await {
            if gone.kind() == LastRawMessageErrorKind::NoMessageFound {
                return Ok(());
            }
        }
        Err(TransportError::Settle {
            origin: origin.to_string(),
            reason: format!("deleting it from stream {}: {err}", self.stream),
        })
    }

    async fn close(&mut self) -> Result<(), TransportError> {
        self.stop_reading().await;
        Ok(())
    }
}
