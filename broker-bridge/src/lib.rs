//! The transport vocabulary every broker speaks to the dispatcher, and the brokers themselves.
//!
//! The dispatcher sees one vocabulary whatever the broker:
//! - a [`Subscription`] yields [`Delivery`]s, already scheduled for the ordering the trigger
//!   asked for (a delivery is handed out only when its lane is free);
//! - a delivery is settled exactly once: [`Delivery::ack`], [`Delivery::retry_after`] (the
//!   broker redelivers later, or the caller retries in place: see [`RetryStyle`]) or
//!   [`Delivery::term`] (give up after the DLQ record was confirmed). A delivery dropped without
//!   being settled is handed back for redelivery, never lost;
//! - a [`Publisher`] returns only once the broker confirmed the message, and says whether the
//!   broker stored it or already held it ([`Published`]);
//! - [`Subscription::lag`] says how much work is waiting;
//! - a [`Backlog`] reads what a topic held when the read began, once, to its end, and removes
//!   or moves past what its reader is done with (what `weir dlq redrive` needs).
//!
//! This crate is the only one that imports async-nats or rdkafka. It does not decode events
//! (that is `weir-schemas`) and does not decide retries (that is the dispatcher's policy).

pub mod kafka;
pub mod memory;
pub mod nats;

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

/// Which broker a message travelled on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    Memory,
    Nats,
    JetStream,
    Kafka,
}

impl BrokerKind {
    /// A short label for metrics and logs (`memory`, `nats`, `jetstream`, `kafka`).
    pub fn as_str(self) -> &'static str {
        match self {
            BrokerKind::Memory => "memory",
            BrokerKind::Nats => "nats",
            BrokerKind::JetStream => "jetstream",
            BrokerKind::Kafka => "kafka",
        }
    }
}

impl fmt::Display for BrokerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a message sits in its broker: enough to find it again, and the seed of derived ids.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Origin {
    Memory {
        topic: String,
        seq: u64,
    },
    Nats {
        subject: String,
    },
    JetStream {
        /// Shared: every message of a stream names the same one.
        stream: std::sync::Arc<str>,
        sequence: u64,
    },
    Kafka {
        topic: String,
        partition: i32,
        offset: i64,
    },
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Memory { topic, seq } => write!(f, "memory://{topic}/{seq}"),
            Origin::Nats { subject } => write!(f, "nats://{subject}"),
            Origin::JetStream { stream, sequence } => write!(f, "jetstream://{stream}/{sequence}"),
            Origin::Kafka {
                topic,
                partition,
                offset,
            } => {
                write!(f, "kafka://{topic}/{partition}/{offset}")
            }
        }
    }
}

/// The headers of a received message, kept in the form the broker client delivered them
/// (owned pairs from the memory bus and Kafka, NATS' own header map) and read without copying.
#[derive(Debug, Clone, Default)]
pub struct Headers(HeadersRepr);

#[derive(Debug, Clone, Default)]
enum HeadersRepr {
    #[default]
    Empty,
    Pairs(Vec<(String, String)>),
    Nats(async_nats::HeaderMap),
}

impl Headers {
    pub fn from_pairs(pairs: Vec<(String, String)>) -> Self {
        Self(HeadersRepr::Pairs(pairs))
    }

    pub(crate) fn from_nats(headers: Option<async_nats::HeaderMap>) -> Self {
        match headers {
            Some(headers) if !headers.is_empty() => Self(HeadersRepr::Nats(headers)),
            _ => Self::default(),
        }
    }

    /// Every header as (name, value), each value of a multi-valued header in turn. NATS headers
    /// come in no particular order (their map has none), except that names equal but for case
    /// are sorted, so that which of them counts as the first (and so what a message decodes
    /// to) never depends on a hash.
    pub fn view(&self) -> Vec<(&str, &str)> {
        match &self.0 {
            HeadersRepr::Empty => Vec::new(),
            HeadersRepr::Pairs(pairs) => pairs
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_str()))
                .collect(),
            HeadersRepr::Nats(map) => {
                // Nearly always one value per name.
                let mut view = Vec::with_capacity(map.len());
                for (name, values) in map.iter() {
                    let name: &str = name.as_ref();
                    view.extend(values.iter().map(|value| (name, value.as_str())));
                }
                // The order only matters between names equal but for case (which one wins is
                // "the first"); sort only then, stably so the values of one name keep theirs.
                let case_twins = view.iter().enumerate().any(|(i, (name, _))| {
                    view[i + 1..].iter().any(|(other, _)| {
                        other.len() == name.len() && other.eq_ignore_ascii_case(name)
                    })
                });
                if case_twins {
                    view.sort_by(|a, b| a.0.cmp(b.0));
                }
                view
            }
        }
    }

    /// The first value of a header, by case-insensitive name (in [`Headers::view`] order).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.view()
            .into_iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value)
    }

    pub fn is_empty(&self) -> bool {
        match &self.0 {
            HeadersRepr::Empty => true,
            HeadersRepr::Pairs(pairs) => pairs.is_empty(),
            HeadersRepr::Nats(map) => map.is_empty(),
        }
    }
}

impl From<Vec<(String, String)>> for Headers {
    fn from(pairs: Vec<(String, String)>) -> Self {
        Self::from_pairs(pairs)
    }
}

/// Equal when they hold the same headers, in any order but the order of each name's values.
impl PartialEq for Headers {
    fn eq(&self, other: &Self) -> bool {
        sorted(self.view()) == sorted(other.view())
    }
}

impl PartialEq<Vec<(String, String)>> for Headers {
    fn eq(&self, other: &Vec<(String, String)>) -> bool {
        sorted(self.view())
            == sorted(
                other
                    .iter()
                    .map(|(name, value)| (name.as_str(), value.as_str()))
                    .collect(),
            )
    }
}

fn sorted<'a>(mut view: Vec<(&'a str, &'a str)>) -> Vec<(&'a str, &'a str)> {
    view.sort_by(|a, b| a.0.cmp(b.0));
    view
}

/// A message as received, before decoding.
#[derive(Debug, Clone)]
pub struct InboundMessage {
    /// Subject (NATS) or topic (Kafka, memory).
    pub topic: String,
    pub key: Option<Bytes>,
    pub headers: Headers,
    /// `None` is a null value (a Kafka tombstone).
    pub payload: Option<Bytes>,
    pub origin: Origin,
    /// 1 on first delivery. Counted by the broker where it can (JetStream metadata), else by
    /// the transport.
    pub delivery_count: u32,
}

/// A message to publish.
#[derive(Debug, Clone)]
pub struct OutboundMessage {
    pub topic: String,
    pub key: Option<Bytes>,
    /// Names are `'static` where they are well known (CloudEvents attributes): a transport
    /// then need not copy or check them per message.
    pub headers: Vec<(std::borrow::Cow<'static, str>, String)>,
    pub payload: Bytes,
    /// Broker-side de-duplication id (JetStream `Nats-Msg-Id`); a redelivered input republishes
    /// its outputs with the same ids, so they are not duplicated.
    pub dedup_id: Option<String>,
}

/// How a retry happens on this transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryStyle {
    /// The broker redelivers after the delay (JetStream NAK-with-delay, the memory bus); the
    /// caller settles the delivery with [`Delivery::retry_after`] and moves on.
    Redeliver,
    /// The broker cannot redeliver one message (Kafka, core NATS): the caller keeps the
    /// delivery, waits and invokes again, which blocks only the lane ordering requires.
    InPlace,
}

/// Errors from a transport, with enough context to log them.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("connecting to {broker}: {reason}")]
    Connect { broker: BrokerKind, reason: String },
    /// TLS with the broker failed: its certificate was not trusted, the handshake was refused,
    /// or a certificate or key could not be loaded. Retrying with the same settings fails again.
    #[error("TLS with {broker} failed: {reason}")]
    Tls { broker: BrokerKind, reason: String },
    /// The broker refused the credentials or the SASL mechanism. Retrying with the same
    /// settings fails again.
    #[error("authenticating with {broker} failed: {reason}")]
    Authentication { broker: BrokerKind, reason: String },
    #[error("publishing to {topic}: {reason}")]
    Publish { topic: String, reason: String },
    #[error("publish to {topic} not confirmed within {timeout:?}")]
    PublishTimeout { topic: String, timeout: Duration },
    /// The message (payload and headers) is larger than the broker takes, NATS's
    /// `max_payload` or Kafka's `message.max.bytes`. Sending it again fails again: what sends
    /// it must send something smaller or give up.
    #[error("publishing to {topic}: the message is too large for the broker: {reason}")]
    TooLarge { topic: String, reason: String },
    #[error("settling {origin}: {reason}")]
    Settle { origin: String, reason: String },
    #[error("subscribing to {topic}: {reason}")]
    Subscribe { topic: String, reason: String },
    #[error("reading lag of {topic}: {reason}")]
    Lag { topic: String, reason: String },
    #[error("{0}")]
    Config(String),
    #[error("transport closed")]
    Closed,
}

/// The broker-specific half of a delivery: how to settle it.
#[async_trait]
pub trait Settle: Send + Sync {
    async fn ack(self: Box<Self>) -> Result<(), TransportError>;
    async fn retry_after(self: Box<Self>, delay: Duration) -> Result<(), TransportError>;
    /// Give up on this message for good (only after its DLQ record was confirmed).
    async fn term(self: Box<Self>) -> Result<(), TransportError>;
    /// Tell the broker the message is still being worked on (JetStream `+WPI`); a no-op where
    /// the broker has no ack deadline.
    async fn in_progress(&self) -> Result<(), TransportError> {
        Ok(())
    }
}

/// A received message and the right to settle it, once.
pub struct Delivery {
    pub message: InboundMessage,
    settle: Box<dyn Settle>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("origin", &self.message.origin)
            .finish()
    }
}

impl Delivery {
    pub fn new(message: InboundMessage, settle: Box<dyn Settle>) -> Self {
        Self { message, settle }
    }

    pub async fn ack(self) -> Result<(), TransportError> {
        self.settle.ack().await
    }

    pub async fn retry_after(self, delay: Duration) -> Result<(), TransportError> {
        self.settle.retry_after(delay).await
    }

    pub async fn term(self) -> Result<(), TransportError> {
        self.settle.term().await
    }

    pub async fn in_progress(&self) -> Result<(), TransportError> {
        self.settle.in_progress().await
    }
}

/// Settling a message the broker keeps no delivery state for (a core NATS message, one read by
/// a JetStream ordered consumer, or one a Kafka reader outside any consumer group fetched):
/// there is nothing to tell the broker.
pub(crate) struct StatelessSettle;

#[async_trait]
impl Settle for StatelessSettle {
    async fn ack(self: Box<Self>) -> Result<(), TransportError> {
        Ok(())
    }

    /// The broker cannot redeliver: the message is gone after this. Such subscriptions use
    /// [`RetryStyle::InPlace`], so the dispatcher retries before settling.
    async fn retry_after(self: Box<Self>, _delay: Duration) -> Result<(), TransportError> {
        Ok(())
    }

    async fn term(self: Box<Self>) -> Result<(), TransportError> {
        Ok(())
    }
}

/// A stream of deliveries for one trigger.
#[async_trait]
pub trait Subscription: Send {
    /// The next delivery; `None` once the subscription was closed (shutdown), or once it ended
    /// by itself ([`Subscription::ended_by`] says why). Transient broker trouble is retried
    /// inside the transport and logged, not returned.
    async fn next(&mut self) -> Option<Delivery>;

    /// A delivery that is ready now, without waiting; `None` when none is (or the transport
    /// does not say). The dispatcher takes what is ready in one go, so a busy trigger is handled
    /// in batches.
    fn try_next(&mut self) -> Option<Delivery> {
        None
    }

    /// Messages waiting or in flight for this subscription.
    async fn lag(&self) -> Result<u64, TransportError>;

    fn retry_style(&self) -> RetryStyle;

    fn broker(&self) -> BrokerKind;

    /// How often a long-running delivery must be reported in progress
    /// ([`Delivery::in_progress`]) so the broker does not redeliver it concurrently; `None`
    /// where the broker has no ack deadline. For JetStream: a third of the ack wait.
    fn progress_interval(&self) -> Option<Duration> {
        None
    }

    /// A handle that reads this subscription's lag while the subscription itself is busy
    /// handing out deliveries (the autoscaler and the lag gauge sample it on their own clock).
    fn lag_probe(&self) -> Option<std::sync::Arc<dyn LagProbe>> {
        None
    }

    /// A handle to change how many deliveries the transport may hold unsettled (fetched and
    /// not yet settled), for transports whose messages time out while they wait: the autoscaler
    /// keeps it equal to the function's current slots so nothing sits in a local buffer past
    /// its ack deadline. `None` where waiting costs nothing.
    fn flow_control(&self) -> Option<std::sync::Arc<dyn FlowControl>> {
        None
    }

    /// Why `next` returned `None` by itself, for a subscription that can end while no one
    /// closed it (a read of a stream that was deleted): a reader must then fail rather than
    /// look finished. `None` while it runs, once closed, and for triggers, whose transports
    /// ride out broker trouble instead of ending.
    fn ended_by(&self) -> Option<&str> {
        None
    }

    /// Stop fetching; deliveries already handed out may still be settled.
    async fn close(&mut self);
}

/// What a topic held when reading it began, read once, oldest first, to its end: a dead-letter
/// queue as `weir dlq redrive` reads it. Unlike a [`Subscription`] it ends, and it is not a
/// trigger: nothing is redelivered. What the reader is done with is removed from the broker
/// (JetStream deletes the message, unless the backlog keeps what it reads) or moved past (a
/// Kafka consumer group's committed offsets), so that the next read starts where this one
/// left off.
#[async_trait]
pub trait Backlog: Send {
    /// The next message stored before the read began; `None` once there is none.
    async fn next(&mut self) -> Result<Option<InboundMessage>, TransportError>;

    /// The reader is done with the message at `origin`. `sent`: it was sent on, so the
    /// broker may forget it (JetStream: deleted). Not sent: it stays (JetStream); a Kafka
    /// cursor moves past it all the same, as a partition is one sequence.
    async fn done(&mut self, origin: &Origin, sent: bool) -> Result<(), TransportError>;

    /// Release the reader, saving how far it got where the broker keeps that (Kafka: the
    /// group's offsets). Without it a Kafka read starts again where the last close left it.
    async fn close(&mut self) -> Result<(), TransportError>;
}

/// Resizes a subscription's bound on unsettled deliveries.
pub trait FlowControl: Send + Sync {
    /// At least 1 is always kept.
    fn set_max_in_flight(&self, max: usize);
}

/// Reads a subscription's lag, detached from the subscription.
#[async_trait]
pub trait LagProbe: Send + Sync {
    async fn lag(&self) -> Result<u64, TransportError>;
}

/// What the broker did with a confirmed publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Stored (core NATS: sent; it confirms nothing).
    Stored,
    /// Not stored again: the broker already held a message with the same
    /// [`OutboundMessage::dedup_id`] inside its de-duplication window (JetStream `Nats-Msg-Id`,
    /// the memory bus). For a redelivered input's outputs that is the point; for an event a
    /// client sent, the client should hear of it.
    Duplicate,
}

/// Confirmed publishing.
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Returns once the broker confirmed the message (JetStream ack, Kafka delivery report,
    /// memory bus append). Core NATS has no confirmation: the flush is the best it offers.
    async fn publish(&self, message: OutboundMessage) -> Result<Published, TransportError>;

    fn broker(&self) -> BrokerKind;
}

/// How a trigger wants its deliveries ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ordering {
    /// Strict per partition (Kafka's default; on other brokers the same as `key`).
    #[default]
    Partition,
    /// Strict per key, parallel across keys.
    Key,
    /// Maximum parallelism.
    None,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nats(pairs: &[(&str, &str)]) -> Headers {
        let mut map = async_nats::HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, *value);
        }
        Headers::from_nats(Some(map))
    }

    #[test]
    fn nats_headers_view_every_value_and_compare_in_any_order() {
        let headers = nats(&[("ce-id", "1"), ("x-multi", "a"), ("x-multi", "b")]);
        let mut view = headers.view();
        view.sort();
        assert_eq!(
            view,
            vec![("ce-id", "1"), ("x-multi", "a"), ("x-multi", "b")]
        );
        assert_eq!(headers.get("CE-ID"), Some("1"));
        assert_eq!(headers.get("missing"), None);
        let pairs = vec![
            ("x-multi".to_owned(), "a".to_owned()),
            ("x-multi".to_owned(), "b".to_owned()),
            ("ce-id".to_owned(), "1".to_owned()),
        ];
        assert_eq!(headers, pairs);
        assert_eq!(headers, Headers::from_pairs(pairs));
        assert!(Headers::from_nats(None).is_empty());
        assert!(Headers::from_nats(Some(async_nats::HeaderMap::new())).is_empty());
    }

    /// Names equal but for case come in a fixed order whatever the hash map's order, so "the
    /// first" of them (which decoding keeps) is the same for every copy of a message.
    #[test]
    fn nats_names_equal_but_for_case_come_sorted() {
        for _ in 0..20 {
            let headers = nats(&[("ce-id", "lower"), ("CE-ID", "upper"), ("ce-type", "t")]);
            let view = headers.view();
            let ids: Vec<&str> = view
                .iter()
                .filter(|(name, _)| name.eq_ignore_ascii_case("ce-id"))
                .map(|(_, value)| *value)
                .collect();
            assert_eq!(ids, vec!["upper", "lower"]);
            assert_eq!(headers.get("ce-id"), Some("upper"));
        }
    }
}
