//! Core NATS subjects: subscribe (optionally in a queue group) and publish.
//!
//! Core NATS is at-most-once by nature: the server keeps nothing, so a message published
//! while no subscriber listens, or dropped because a subscriber fell behind, is gone. There is
//! no redelivery, hence settling a core delivery is a no-op and retries happen in place
//! ([`RetryStyle::InPlace`]) while the process lives; a delivery dropped unsettled is lost. Publishing has
//! no broker confirmation either: [`NatsPublisher`] hands the message to the live connection,
//! which writes it before anything sent later on it (such as the JetStream ack of the input
//! that caused it), and refuses while the connection is down. Use JetStream for events that
//! must not be lost.

use std::time::Duration;

use async_nats::Client;
use async_trait::async_trait;
use futures::{FutureExt as _, StreamExt};

use super::{events, pairs_to_headers, NatsTransport};
use crate::{
    BrokerKind, Delivery, Headers, InboundMessage, Origin, OutboundMessage, Published, Publisher,
    RetryStyle, StatelessSettle, Subscription, TransportError,
};

impl NatsTransport {
    /// Subscribes to a core subject (wildcards allowed). With a queue group, each message goes
    /// to one member of the group; without one, every subscriber gets every message. The
    /// subscription survives reconnects (async-nats re-subscribes); messages published while
    /// disconnected are lost.
    pub async fn subscribe_core(
        &self,
        subject: &str,
        queue_group: Option<String>,
    ) -> Result<NatsCoreSubscription, TransportError> {
        let subscribe_error = |err: String| TransportError::Subscribe {
            topic: subject.to_owned(),
            reason: err,
        };
        let subscriber = match queue_group {
            Some(group) => self.client.queue_subscribe(subject.to_owned(), group).await,
            None => self.client.subscribe(subject.to_owned()).await,
        }
        .map_err(|err| subscribe_error(err.to_string()))?;
        // Make sure the server registered the interest before the caller starts publishing.
        self.flush()
            .await
            .map_err(|err| subscribe_error(err.to_string()))?;
        Ok(NatsCoreSubscription {
            subscriber: Some(subscriber),
            subject: subject.to_owned(),
        })
    }
}

/// A core NATS subscription: at-most-once, no redelivery (see the module docs).
///
/// Deliveries come straight from async-nats' subscriber (no task or buffer of ours in between:
/// each hop between tasks costs a wake-up per message); async-nats buffers what the dispatcher
/// has not taken yet and reports a slow consumer when that buffer overflows.
pub struct NatsCoreSubscription {
    /// `None` once closed.
    subscriber: Option<async_nats::Subscriber>,
    subject: String,
}

impl std::fmt::Debug for NatsCoreSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsCoreSubscription")
            .field("subject", &self.subject)
            .field("closed", &self.subscriber.is_none())
            .finish()
    }
}

#[async_trait]
impl Subscription for NatsCoreSubscription {
    async fn next(&mut self) -> Option<Delivery> {
        let subscriber = self.subscriber.as_mut()?;
        match subscriber.next().await {
            Some(message) => Some(core_delivery(message)),
            None => {
                events::record_core_subscription_ended(&self.subject);
                self.subscriber = None;
                None
            }
        }
    }

    fn try_next(&mut self) -> Option<Delivery> {
        // Polled once: the subscriber is a channel receiver, so not waiting loses nothing; an
        // ended subscription is noticed by the next `next`.
        let message = self.subscriber.as_mut()?.next().now_or_never()??;
        Some(core_delivery(message))
    }

    /// Always 0: core NATS keeps no backlog on the server, and what async-nats buffered for
    /// this subscriber is not counted (a core trigger is not scaled on lag).
    async fn lag(&self) -> Result<u64, TransportError> {
        Ok(0)
    }

    fn retry_style(&self) -> RetryStyle {
        RetryStyle::InPlace
    }

    fn broker(&self) -> BrokerKind {
        BrokerKind::Nats
    }

    /// Unsubscribes; messages async-nats buffered but not handed out are dropped (core NATS
    /// cannot hand them back).
    async fn close(&mut self) {
        if let Some(mut subscriber) = self.subscriber.take() {
            // Best effort: the connection may already be gone, which unsubscribes anyway.
            let _ = tokio::time::timeout(Duration::from_secs(5), subscriber.unsubscribe()).await;
        }
    }
}

fn core_delivery(message: async_nats::Message) -> Delivery {
    let subject = message.subject.to_string();
    let inbound = InboundMessage {
        topic: subject.clone(),
        key: None,
        headers: Headers::from_nats(message.headers),
        payload: Some(message.payload),
        origin: Origin::Nats { subject },
        delivery_count: 1,
    };
    Delivery::new(inbound, Box::new(StatelessSettle))
}

/// Publishes to core subjects. There is no broker confirmation: `publish` returns once the
/// message is queued on a connected client (not flushed one by one: a write per message costs
/// more than the rest of the path, and flushing proves no more than in-order queueing does,
/// since neither says anyone received it). While the client is reconnecting it returns an
/// error, so the dispatcher retries instead of piling messages into the reconnect buffer.
#[derive(Clone)]
pub struct NatsPublisher {
    client: Client,
    flush_timeout: Duration,
    counters: events::PublishCounters,
}

impl std::fmt::Debug for NatsPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsPublisher")
            .field("flush_timeout", &self.flush_timeout)
            .finish()
    }
}

impl NatsPublisher {
    pub(super) fn new(client: Client, flush_timeout: Duration) -> Self {
        Self {
            client,
            flush_timeout,
            counters: events::PublishCounters::new(BrokerKind::Nats),
        }
    }
}

#[async_trait]
impl Publisher for NatsPublisher {
    /// The key is not sent (core NATS has none); put it in a header if the receiver needs it.
    /// `dedup_id` is ignored: core NATS does not de-duplicate, so a sent message is
    /// [`Published::Stored`].
    async fn publish(&self, message: OutboundMessage) -> Result<Published, TransportError> {
        let OutboundMessage {
            topic,
            headers,
            payload,
            ..
        } = message;
        let headers = match pairs_to_headers(&topic, headers) {
            Ok(headers) => headers,
            Err(err) => {
                self.counters.error();
                return Err(err);
            }
        };
        if self.client.connection_state() != async_nats::connection::State::Connected {
            self.counters.error();
            return Err(TransportError::Publish {
                topic,
                reason: "not connected to NATS (reconnecting)".into(),
            });
        }
        // The subject takes the topic's buffer over; errors below name it from there.
        let subject = async_nats::Subject::from(topic);
        // Queueing blocks only when the client's command queue is full.
        let queued = tokio::time::timeout(
            self.flush_timeout,
            self.client
                .publish_with_headers(subject.clone(), headers, payload),
        )
        .await;
        match queued {
            Ok(Ok(())) => {
                self.counters.ok();
                Ok(Published::Stored)
            }
            Ok(Err(err)) => {
                self.counters.error();
                let topic = subject.to_string();
                let reason = err.to_string();
                Err(
                    if err.kind() == async_nats::client::PublishErrorKind::MaxPayloadExceeded {
                        TransportError::TooLarge { topic, reason }
                    } else {
                        TransportError::Publish { topic, reason }
                    },
                )
            }
            Err(_) => {
                self.counters.timeout();
                Err(TransportError::PublishTimeout {
                    topic: subject.to_string(),
                    timeout: self.flush_timeout,
                })
            }
        }
    }

    fn broker(&self) -> BrokerKind {
        BrokerKind::Nats
    }
}
