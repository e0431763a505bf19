//! Reading what a Kafka topic retains, from its earliest offset on (or from the last N records
//! of each partition), then following it: what `weir tail --kafka` shows.
//!
//! The reader assigns itself every partition the topic has when it starts, at offsets it
//! computed from the watermarks, so it never joins a consumer group: it takes no partition
//! from a function's group, triggers no rebalance and commits nothing, so the broker keeps no
//! state for it once it is gone. (librdkafka wants a `group.id` even for assign-only
//! consumers; the one set here is never joined or committed to.) Partitions added to the topic
//! after the start are not read.
//!
//! It is for inspection only: it is not a trigger (no acks, no redelivery, no lag) and
//! deliberately does not implement the delivery contract.

use std::time::Duration;

use async_trait::async_trait;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::record::Record;
use super::{KafkaTransport, LogContext, ADMIN_TIMEOUT};
use crate::{BrokerKind, Delivery, RetryStyle, StatelessSettle, Subscription, TransportError};

/// The `group.id` librdkafka requires before it lets a consumer assign partitions itself.
/// Never joined and never committed to, so the broker creates no group for it.
const READER_GROUP: &str = "weir-reader-unjoined";

/// How long the reader waits after a consume error before asking again, so a broker that is
/// down is not asked in a tight loop (librdkafka reconnects by itself meanwhile).
const ERROR_PAUSE: Duration = Duration::from_secs(1);

impl KafkaTransport {
    /// Every partition of `topic`, read from its earliest retained offset (with `last`, from
    /// the last `last` records of each partition), then followed. Fails when the topic does
    /// not exist.
    pub async fn read_topic_history(
        &self,
        topic: &str,
        last: Option<u64>,
    ) -> Result<TopicHistory, TransportError> {
        let subscribe_error = |reason: String| TransportError::Subscribe {
            topic: topic.to_owned(),
            reason,
        };
        let mut client = self.client.clone();
        client
            .set("group.id", READER_GROUP)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        let consumer: StreamConsumer<LogContext> = client
            .create_with_context(LogContext)
            .map_err(|e| subscribe_error(format!("creating the reader: {e}")))?;
        let topic_name = topic.to_owned();
        // Metadata and watermarks are blocking librdkafka calls.
        let (consumer, partitions) = tokio::task::spawn_blocking(move || {
            let partitions = assign_from(&consumer, &topic_name, last)?;
            Ok::<_, String>((consumer, partitions))
        })
        .await
        .map_err(|e| subscribe_error(format!("the reader's setup task failed: {e}")))?
        .map_err(subscribe_error)?;
        Ok(TopicHistory {
            topic: topic.to_owned(),
            partitions,
            consumer: Some(consumer),
        })
    }
}

/// Assign every partition of `topic` to `consumer` at its start offset; returns how many.
fn assign_from(
    consumer: &StreamConsumer<LogContext>,
    topic: &str,
    last: Option<u64>,
) -> Result<usize, String> {
    let metadata = consumer
        .fetch_metadata(Some(topic), ADMIN_TIMEOUT)
        .map_err(|e| format!("reading the topic's metadata: {e}"))?;
    let Some(meta) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Err("the broker's metadata does not list the topic".to_owned());
    };
    if let Some(error) = meta.error() {
        return Err(match RDKafkaErrorCode::from(error) {
            RDKafkaErrorCode::UnknownTopicOrPartition => "no such topic".to_owned(),
            code => format!("reading the topic's metadata: {code}"),
        });
    }
    if meta.partitions().is_empty() {
        return Err("no such topic (the broker lists no partitions for it)".to_owned());
    }
    let mut assignment = TopicPartitionList::new();
    for partition in meta.partitions() {
        let offset = match last {
            None => Offset::Beginning,
            Some(last) => {
                let (low, high) = consumer
                    .fetch_watermarks(topic, partition.id(), ADMIN_TIMEOUT)
                    .map_err(|e| format!("reading partition {}'s offsets: {e}", partition.id()))?;
                let back = i64::try_from(last).unwrap_or(i64::MAX);
                Offset::Offset(high.saturating_sub(back).max(low))
            }
        };
        assignment
            .add_partition_offset(topic, partition.id(), offset)
            .map_err(|e| format!("starting partition {} at {offset:?}: {e}", partition.id()))?;
    }
    consumer
        .assign(&assignment)
        .map_err(|e| format!("assigning the topic's partitions: {e}"))?;
    Ok(meta.partitions().len())
}

/// A topic's records, each partition oldest first, then new ones as they arrive.
pub struct TopicHistory {
    topic: String,
    partitions: usize,
    /// `None` once closed.
    consumer: Option<StreamConsumer<LogContext>>,
}

impl std::fmt::Debug for TopicHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicHistory")
            .field("topic", &self.topic)
            .field("partitions", &self.partitions)
            .field("closed", &self.consumer.is_none())
            .finish()
    }
}

impl TopicHistory {
    /// How many partitions are read (all the topic had at the start).
    pub fn partitions(&self) -> usize {
        self.partitions
    }
}

#[async_trait]
impl Subscription for TopicHistory {
    /// Waits for the next record for as long as it takes (a follow has no end); errors are
    /// logged and the read goes on, as librdkafka reconnects by itself.
    async fn next(&mut self) -> Option<Delivery> {
        let consumer = self.consumer.as_ref()?;
        loop {
            match consumer.recv().await {
                Ok(message) => {
                    let inbound = Record::copy_from(&message).to_message(&self.topic);
                    return Some(Delivery::new(inbound, Box::new(StatelessSettle)));
                }
                Err(error) => {
                    tracing::warn!(topic = %self.topic, %error, "reading the topic failed; trying again");
                    tokio::time::sleep(ERROR_PAUSE).await;
                }
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
        BrokerKind::Kafka
    }

    async fn close(&mut self) {
        self.consumer = None;
    }
}
