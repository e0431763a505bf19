//! How an event reached the function. Informational: the host has already decoded the event
//! and decides retries; a function reads `attempt` only to behave differently on a retry.

use crate::bindings::weir::function::types as wit;

/// The kind of broker an event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    /// Weir's in-process bus (tests, HTTP ingress).
    Memory,
    /// Core NATS: at-most-once, no redelivery after a crash.
    Nats,
    /// NATS JetStream.
    Jetstream,
    /// Kafka.
    Kafka,
}

/// How this event reached the function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub broker: Broker,
    /// The topic (Kafka topic, NATS subject) the event was consumed from.
    pub topic: String,
    /// The message key, when the transport carried one.
    pub key: Option<String>,
    /// 1 on the first attempt, 2 on the first retry, and so on.
    pub attempt: u32,
}

impl From<wit::Broker> for Broker {
    fn from(broker: wit::Broker) -> Self {
        match broker {
            wit::Broker::Memory => Broker::Memory,
            wit::Broker::Nats => Broker::Nats,
            wit::Broker::Jetstream => Broker::Jetstream,
            wit::Broker::Kafka => Broker::Kafka,
        }
    }
}

impl From<wit::Delivery> for Delivery {
    fn from(delivery: wit::Delivery) -> Self {
        Delivery {
            broker: delivery.broker.into(),
            topic: delivery.topic,
            key: delivery.key,
            attempt: delivery.attempt,
        }
    }
}
