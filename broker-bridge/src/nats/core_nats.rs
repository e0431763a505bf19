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
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{events, headers_to_pairs, pairs_to_headers, NatsTransport};
use crate::{
    BrokerKind, Delivery, InboundMessage, Origin, OutboundMessage, Publisher, RetryStyle, Settle,
    Subscription, TransportError,
};

/// Messages taken from async-nats but not yet handed to the dispatcher. Bounded so that lag is
/// a real count; beyond it, async-nats buffers (and reports slow consumers).
const CORE_BUFFER: usize = 4096;

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
        self.client
            .flush()
            .await
            .map_err(|err| subscribe_error(err.to_string()))?;

        let (sender, receiver) = mpsc::channel(CORE_BUFFER);
        let cancel = CancellationToken::new();
        let pump = tokio::spawn(pump(subscriber, sender, cancel.clone(), subject.to_owned()));
        Ok(NatsCoreSubscription {
            receiver,
            cancel,
            pump: Some(pump),
            closed: false,
        })
    }
}

/// Moves messages from async-nats into our bounded buffer, whose length is the lag.
async fn pump(
    mut subscriber: async_nats::Subscriber,
    sender: mpsc::Sender<async_nats::Message>,
    cancel: CancellationToken,
    subject: String,
) {
    loop {
        let message = tokio::select! {
            () = cancel.cancelled() => {
                // Best effort: the connection may already be gone, which unsubscribes anyway.
                let _ = subscriber.unsubscribe().await;
                return;
            }
            message = subscriber.next() => message,
        };
        let Some(message) = message else {
            events::record_core_subscription_ended(&subject);
            return;
        };
        tokio::select! {
            () = cancel.cancelled() => {
                let _ = subscriber.unsubscribe().await;
                return;
            }
            sent = sender.send(message) => if sent.is_err() { return },
        }
    }
}

/// A core NATS subscription: at-most-once, no redelivery (see the module docs).
pub struct NatsCoreSubscription {
    receiver: mpsc::Receiver<async_nats::Message>,
    cancel: CancellationToken,
    pump: Option<JoinHandle<()>>,
    closed: bool,
}

impl std::fmt::Debug for NatsCoreSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsCoreSubscription")
            .field("closed", &self.closed)
            .finish()
    }
}

impl Drop for NatsCoreSubscription {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[async_trait]
impl Subscription for NatsCoreSubscription {
    async fn next(&mut self) -> Option<Delivery> {
        if self.closed {
            return None;
        }
        let message = self.receiver.recv().await?;
        let subject = message.subject.to_string();
        let inbound = InboundMessage {
            topic: subject.clone(),
            key: None,
            headers: headers_to_pairs(message.headers.as_ref()),
            payload: Some(message.payload),
            origin: Origin::Nats { subject },
            delivery_count: 1,
        };
        Some(Delivery::new(inbound, Box::new(CoreSettle)))
    }

    /// Messages received from the server but not yet handed out (at most 4096; core NATS has
    /// no server-side backlog to read).
    async fn lag(&self) -> Result<u64, TransportError> {
        Ok(u64::try_from(self.receiver.len()).unwrap_or(u64::MAX))
    }

    fn retry_style(&self) -> RetryStyle {
        RetryStyle::InPlace
    }

    fn broker(&self) -> BrokerKind {
        BrokerKind::Nats
    }

    /// Unsubscribes; messages buffered but not handed out are dropped (core NATS cannot hand
    /// them back).
    async fn close(&mut self) {
        self.closed = true;
        self.cancel.cancel();
        if let Some(pump) = self.pump.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), pump).await;
        }
        self.receiver.close();
    }
}

/// Settling a core message: nothing to tell the server, which keeps no state about it.
struct CoreSettle;

#[async_trait]
impl Settle for CoreSettle {
    async fn ack(self: Box<Self>) -> Result<(), TransportError> {
        Ok(())
    }

    /// Core NATS cannot redeliver: the message is gone after this. Core subscriptions use
    /// [`RetryStyle::InPlace`], so the dispatcher retries before settling.
    async fn retry_after(self: Box<Self>, _delay: Duration) -> Result<(), TransportError> {
        Ok(())
    }

    async fn term(self: Box<Self>) -> Result<(), TransportError> {
        Ok(())
    }
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
        }
    }
}

#[async_trait]
impl Publisher for NatsPublisher {
    /// The key is not sent (core NATS has none); put it in a header if the receiver needs it.
    /// `dedup_id` is ignored: core NATS does not de-duplicate.
    async fn publish(&self, message: OutboundMessage) -> Result<(), TransportError> {
        let topic = message.topic.clone();
        let headers = pairs_to_headers(&topic, &message.headers)?;
        if self.client.connection_state() != async_nats::connection::State::Connected {
            events::record_publish(BrokerKind::Nats, "error");
            return Err(TransportError::Publish {
                topic,
                reason: "not connected to NATS (reconnecting)".into(),
            });
        }
        let publish = async {
            self.client
                .publish_with_headers(message.topic, headers, message.payload)
                .await
                .map_err(|err| TransportError::Publish {
                    topic: topic.clone(),
                    reason: err.to_string(),
                })
        };
        // Queueing blocks only when the client's command queue is full.
        let result = match tokio::time::timeout(self.flush_timeout, publish).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::PublishTimeout {
                topic: topic.clone(),
                timeout: self.flush_timeout,
            }),
        };
        events::record_publish(
            BrokerKind::Nats,
            match &result {
                Ok(()) => "ok",
                Err(TransportError::PublishTimeout { .. }) => "timeout",
                Err(_) => "error",
            },
        );
        result
    }

    fn broker(&self) -> BrokerKind {
        BrokerKind::Nats
    }
}
