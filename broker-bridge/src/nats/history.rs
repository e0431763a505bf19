//! Reading what a JetStream stream holds for a subject, from its first message on, then
//! following it: what `weir tail --nats` shows for a subject a stream captures (outputs, dead
//! letters), so that an event published before the tail started is not missed.
//!
//! It uses an ordered consumer: ephemeral, unacknowledged, recreated by async-nats when it
//! sees a gap, so reading leaves no durable state on the server and takes nothing from the
//! functions' durable consumers. It is for inspection only: it is not a trigger (no acks, no
//! redelivery, no lag) and deliberately does not implement the delivery contract.

use std::sync::Arc;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::context::{
    GetStreamByNameError, GetStreamByNameErrorKind, RequestError, RequestErrorKind,
};
use async_trait::async_trait;
use futures::StreamExt;

use super::core_nats::CoreSettle;
use super::NatsTransport;
use crate::{
    BrokerKind, Delivery, Headers, InboundMessage, Origin, RetryStyle, Subscription, TransportError,
};

impl NatsTransport {
    /// The stream that captures `subject`, read from its first message on (then followed), or
    /// `None` when no stream captures it or the server has no JetStream (a core subject: only
    /// new messages can be seen).
    pub async fn read_subject_history(
        &self,
        subject: &str,
    ) -> Result<Option<SubjectHistory>, TransportError> {
        let subscribe_error = |reason: String| TransportError::Subscribe {
            topic: subject.to_owned(),
            reason,
        };
        let stream_name = match self.jetstream.stream_by_subject(subject).await {
            Ok(name) => name,
            Err(err) if err.kind() == GetStreamByNameErrorKind::NotFound => return Ok(None),
            Err(err) if jetstream_absent(&err) => return Ok(None),
            Err(err) => {
                return Err(subscribe_error(format!(
                    "looking up the JetStream stream that captures it: {err}"
                )))
            }
        };
        let stream = self
            .jetstream
            .get_stream(&stream_name)
            .await
            .map_err(|err| subscribe_error(format!("opening stream {stream_name}: {err}")))?;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: subject.to_owned(),
                deliver_policy: DeliverPolicy::All,
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
            messages: Some(std::sync::Mutex::new(messages)),
        }))
    }
}

/// Whether the lookup failed because nothing answers JetStream's API on this server (started
/// without JetStream, or an account without it): core subjects are all there is then.
fn jetstream_absent(err: &GetStreamByNameError) -> bool {
    // async-nats wraps the no-responders error in a second request error; look down the
    // whole chain rather than rely on that depth.
    let mut source = std::error::Error::source(err);
    while let Some(error) = source {
        if error
            .downcast_ref::<RequestError>()
            .is_some_and(|request| request.kind() == RequestErrorKind::NoResponders)
        {
            return true;
        }
        source = error.source();
    }
    false
}

/// A stream's messages on one subject, oldest first, then new ones as they are stored.
pub struct SubjectHistory {
    stream: Arc<str>,
    subject: String,
    /// `None` once ended. In a mutex only to be `Sync` (the trait's `&self` methods need it;
    /// the stream is not): `next` takes `&mut self` and reaches it without locking.
    messages: Option<std::sync::Mutex<pull::Ordered>>,
}

impl std::fmt::Debug for SubjectHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubjectHistory")
            .field("stream", &self.stream)
            .field("subject", &self.subject)
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
    /// Ends (`None`) when the ordered consumer gives up (the stream was deleted, the server
    /// went away for good); the error is logged. Gaps and reconnects it rides out itself.
    async fn next(&mut self) -> Option<Delivery> {
        let messages = self
            .messages
            .as_mut()?
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match messages.next().await {
            Some(Ok(message)) => {
                let sequence = message.info().map_or(0, |info| info.stream_sequence);
                let (message, _acker) = message.split();
                let inbound = InboundMessage {
                    topic: message.subject.to_string(),
                    key: None,
                    headers: Headers::from_nats(message.headers),
                    payload: Some(message.payload),
                    origin: Origin::JetStream {
                        stream: Arc::clone(&self.stream),
                        sequence,
                    },
                    delivery_count: 1,
                };
                Some(Delivery::new(inbound, Box::new(CoreSettle)))
            }
            Some(Err(err)) => {
                super::events::record_history_ended(&self.stream, &self.subject, &err.to_string());
                self.messages = None;
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

    async fn close(&mut self) {
        // Dropping the ordered stream stops its pulls; the ephemeral consumer is removed by
        // the server after its inactivity threshold.
        self.messages = None;
    }
}
