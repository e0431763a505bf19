//! Reading what a Kafka topic retains, from its earliest offset on (or from the last N records
//! of each partition), then following it: what `weir tail --kafka` shows.
//!
//! The reader assigns itself every partition the topic has when it starts, at offsets it
//! computed from the watermarks, so it never joins a consumer group: it takes no partition
//! from a function's group, triggers no rebalance and commits nothing, so the broker keeps no
//! state for it once it is gone. (librdkafka wants a `group.id` even for assign-only
//! consumers; the one set here is never joined or committed to.)
//!
//! librdkafka reports a deleted topic only as fetch errors, which a follow rides out (a broker
//! restarting gives the same ones), so every [`TOPIC_CHECK`] the reader looks its topic up and
//! ends, with [`Subscription::ended_by`] saying why, once it is gone or has another number of
//! partitions (created again, or partitions added: those would not be read, as the assignment
//! is made once). A reader whose offset falls out of the partition's range (its records
//! removed by retention, or the topic created again with fewer records between two checks)
//! reads on from the earliest record retained, as the triggers do, rather than librdkafka's
//! default of jumping to the end. (A topic created again and filled past the reader's offsets
//! between two checks cannot be told apart from the old one: Kafka's topic ids are not in the
//! metadata librdkafka gives.) On Tansu 0.6 a deleted topic crashes librdkafka before any of
//! this can see it (README, "Delivery, retries and dead letters").
//!
//! It is for inspection only: it is not a trigger (no acks, no redelivery, no lag) and
//! deliberately does not implement the delivery contract.

use std::sync::Arc;
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

/// How often the reader looks whether its topic still exists as it was (one metadata request).
const TOPIC_CHECK: Duration = Duration::from_secs(2);

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
        let consumer = self
            .reader_consumer(READER_GROUP)
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
            consumer: Some(Arc::new(consumer)),
            next_check: tokio::time::Instant::now() + TOPIC_CHECK,
            ended_by: None,
        })
    }
}

impl KafkaTransport {
    /// A consumer that assigns itself partitions and never commits by itself; `group` is the
    /// group it may commit to. An offset out of range reads on from the earliest record, as
    /// the triggers do (see the module docs).
    pub(super) fn reader_consumer(
        &self,
        group: &str,
    ) -> rdkafka::error::KafkaResult<StreamConsumer<LogContext>> {
        let mut client = self.client.clone();
        client
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest");
        client.create_with_context(LogContext)
    }
}

/// The partition ids of `topic` (a blocking librdkafka call); an error saying so when the
/// topic does not exist.
pub(super) fn topic_partitions(
    consumer: &StreamConsumer<LogContext>,
    topic: &str,
) -> Result<Vec<i32>, String> {
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
    Ok(meta.partitions().iter().map(|p| p.id()).collect())
}

/// Assign every partition of `topic` to `consumer` at its start offset; returns how many.
fn assign_from(
    consumer: &StreamConsumer<LogContext>,
    topic: &str,
    last: Option<u64>,
) -> Result<usize, String> {
    let partitions = topic_partitions(consumer, topic)?;
    let mut assignment = TopicPartitionList::new();
    for &partition in &partitions {
        let offset = match last {
            None => Offset::Beginning,
            Some(last) => {
                let (low, high) = consumer
                    .fetch_watermarks(topic, partition, ADMIN_TIMEOUT)
                    .map_err(|e| format!("reading partition {partition}'s offsets: {e}"))?;
                let back = i64::try_from(last).unwrap_or(i64::MAX);
                Offset::Offset(high.saturating_sub(back).max(low))
            }
        };
        assignment
            .add_partition_offset(topic, partition, offset)
            .map_err(|e| format!("starting partition {partition} at {offset:?}: {e}"))?;
    }
    consumer
        .assign(&assignment)
        .map_err(|e| format!("assigning the topic's partitions: {e}"))?;
    Ok(partitions.len())
}

/// A topic's records, each partition oldest first, then new ones as they arrive.
pub struct TopicHistory {
    topic: String,
    partitions: usize,
    /// `None` once closed or ended. Shared with the blocking metadata lookups.
    consumer: Option<Arc<StreamConsumer<LogContext>>>,
    next_check: tokio::time::Instant,
    /// Why the read ended by itself.
    ended_by: Option<String>,
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

    /// Why reading cannot go on, if the topic is gone or has another number of partitions
    /// (deleted and created again). A lookup that fails otherwise (the broker restarting) is
    /// logged and asked again at the next check.
    async fn topic_gone(&self, consumer: &Arc<StreamConsumer<LogContext>>) -> Option<String> {
        let consumer = Arc::clone(consumer);
        let topic = self.topic.clone();
        // A blocking librdkafka call. Found with no partitions: gone.
        let lookup = tokio::task::spawn_blocking(move || -> Result<usize, String> {
            let metadata = consumer
                .fetch_metadata(Some(&topic), ADMIN_TIMEOUT)
                .map_err(|e| e.to_string())?;
            let Some(meta) = metadata.topics().iter().find(|t| t.name() == topic) else {
                return Ok(0);
            };
            match meta.error().map(RDKafkaErrorCode::from) {
                None => Ok(meta.partitions().len()),
                Some(RDKafkaErrorCode::UnknownTopicOrPartition) => Ok(0),
                Some(code) => Err(code.to_string()),
            }
        })
        .await
        .unwrap_or_else(|e| Err(format!("the lookup task failed: {e}")));
        let found = match lookup {
            Ok(found) => found,
            Err(error) => {
                tracing::debug!(topic = %self.topic, %error, "looking the topic up failed; asking again at the next check");
                return None;
            }
        };
        if found == 0 {
            Some(format!("topic {} was deleted", self.topic))
        } else if found != self.partitions {
            Some(format!(
                "topic {} now has {found} partitions where it had {} (deleted and created \
                 again, or partitions were added); run weir tail again to read them all",
                self.topic, self.partitions
            ))
        } else {
            None
        }
    }
}

#[async_trait]
impl Subscription for TopicHistory {
    /// Waits for the next record for as long as it takes (a follow has no end); errors are
    /// logged and the read goes on, as librdkafka reconnects by itself. Ends (`None`, with
    /// [`Subscription::ended_by`] saying why) when the topic was deleted or is found with
    /// another number of partitions.
    async fn next(&mut self) -> Option<Delivery> {
        let consumer = Arc::clone(self.consumer.as_ref()?);
        let gone = loop {
            tokio::select! {
                received = consumer.recv() => match received {
                    Ok(message) => {
                        let inbound = Record::copy_from(&message).to_message(&self.topic);
                        return Some(Delivery::new(inbound, Box::new(StatelessSettle)));
                    }
                    Err(error) => {
                        tracing::warn!(topic = %self.topic, %error, "reading the topic failed; trying again");
                        if matches!(
                            error.rdkafka_error_code(),
                            Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic)
                        ) {
                            // Most likely deleted: look now rather than at the next check.
                            self.next_check = tokio::time::Instant::now();
                        } else {
                            tokio::time::sleep(ERROR_PAUSE).await;
                        }
                    }
                },
                () = tokio::time::sleep_until(self.next_check) => {
                    self.next_check = tokio::time::Instant::now() + TOPIC_CHECK;
                    if let Some(gone) = self.topic_gone(&consumer).await {
                        break gone;
                    }
                }
            }
        };
        tracing::debug!(topic = %self.topic, reason = %gone, "reading the topic ended");
        self.consumer = None;
        self.ended_by = Some(gone);
        None
    }

    fn ended_by(&self) -> Option<&str> {
        self.ended_by.as_deref()
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
