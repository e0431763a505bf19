//! Reading a Kafka topic once, from a consumer group's committed offsets to the high
//! watermarks of when the read began, then committing how far it got: a dead-letter topic as
//! `weir dlq redrive` drains it.
//!
//! Kafka cannot delete a record, so what a redrive has sent back is remembered as the group's
//! offsets (one group per function: `weir-redrive-<function>`), and the next redrive starts
//! after it. The read ends at the high watermarks taken when it began, so records of events
//! that fail again while it runs wait for the next redrive. The consumer assigns itself the
//! partitions and commits to the group without joining it (Kafka's "simple consumer"
//! commits), so it triggers no rebalance and needs no group membership; two redrives of one
//! function at once would each send what they read.
//!
//! A partition is one sequence, so the cursor moves past every record read, sent on or not
//! (another function's record on a shared topic, one the reader filtered out); the reader says
//! which is which and the dispatcher reports what it did not send.
//!
//! It does not decide what is sent where (the dispatcher's `redrive`), and it is not a trigger.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::{Offset, TopicPartitionList};

use super::history::topic_partitions;
use super::record::Record;
use super::{KafkaTransport, LogContext, ADMIN_TIMEOUT};
use crate::{Backlog, InboundMessage, Origin, TransportError};

/// How long a read waits for a record it knows is there before it gives up.
const NEXT_TIMEOUT: Duration = Duration::from_secs(30);

/// Offsets are committed after this many records, and at the end.
const COMMIT_EVERY: usize = 100;

impl KafkaTransport {
    /// `topic` from `group`'s committed offsets (the earliest retained record where it has
    /// none) to its high watermarks now. Fails when the topic does not exist. With `keep`,
    /// nothing is committed: the next read starts where this one did.
    pub async fn read_backlog(
        &self,
        topic: &str,
        group: &str,
        keep: bool,
    ) -> Result<TopicBacklog, TransportError> {
        let error = |reason: String| TransportError::Subscribe {
            topic: topic.to_owned(),
            reason,
        };
        let consumer = self
            .reader_consumer(group)
            .map_err(|e| error(format!("creating the reader: {e}")))?;
        let consumer = Arc::new(consumer);
        let topic_name = topic.to_owned();
        let setup = Arc::clone(&consumer);
        // Metadata, watermarks and committed offsets are blocking librdkafka calls.
        let (remaining, partitions) =
            tokio::task::spawn_blocking(move || assign_unread(&setup, &topic_name))
                .await
                .map_err(|e| error(format!("the reader's setup task failed: {e}")))?
                .map_err(error)?;
        Ok(TopicBacklog {
            topic: topic.to_owned(),
            group: group.to_owned(),
            partitions,
            remaining,
            done: BTreeMap::new(),
            uncommitted: 0,
            keep,
            consumer: Some(consumer),
        })
    }
}

/// Assigns each partition of `topic` that has records past the group's offset, at that
/// offset; returns the high watermark each must be read to, and how many partitions the
/// topic has.
fn assign_unread(
    consumer: &StreamConsumer<LogContext>,
    topic: &str,
) -> Result<(BTreeMap<i32, i64>, usize), String> {
    let partitions = topic_partitions(consumer, topic)?;
    let mut all = TopicPartitionList::new();
    for &partition in &partitions {
        all.add_partition(topic, partition);
    }
    let committed = consumer
        .committed_offsets(all, ADMIN_TIMEOUT)
        .map_err(|e| format!("reading the group's committed offsets: {e}"))?;
    let mut remaining = BTreeMap::new();
    let mut assignment = TopicPartitionList::new();
    for &id in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, id, ADMIN_TIMEOUT)
            .map_err(|e| format!("reading partition {id}'s offsets: {e}"))?;
        let from = match committed.find_partition(topic, id).map(|p| p.offset()) {
            Some(Offset::Offset(offset)) => offset.max(low),
            _ => low,
        };
        if from < high {
            remaining.insert(id, high);
            assignment
                .add_partition_offset(topic, id, Offset::Offset(from))
                .map_err(|e| format!("starting partition {id} at {from}: {e}"))?;
        }
    }
    consumer
        .assign(&assignment)
        .map_err(|e| format!("assigning the topic's partitions: {e}"))?;
    Ok((remaining, partitions.len()))
}

/// A topic's records past a group's offsets, each partition oldest first, up to the high
/// watermarks of when the read began.
pub struct TopicBacklog {
    topic: String,
    group: String,
    partitions: usize,
    /// Partitions not read to their end yet → the offset that ends them.
    remaining: BTreeMap<i32, i64>,
    /// Partitions → the offset to commit (the one after the last record done).
    done: BTreeMap<i32, i64>,
    uncommitted: usize,
    keep: bool,
    /// `None` once closed.
    consumer: Option<Arc<StreamConsumer<LogContext>>>,
}

impl std::fmt::Debug for TopicBacklog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicBacklog")
            .field("topic", &self.topic)
            .field("group", &self.group)
            .field("remaining", &self.remaining)
            .finish_non_exhaustive()
    }
}

impl TopicBacklog {
    /// How many partitions the topic has.
    pub fn partitions(&self) -> usize {
        self.partitions
    }

    /// Commits the offsets of what is done so far (a blocking librdkafka call).
    async fn commit(&mut self) -> Result<(), TransportError> {
        let Some(consumer) = self.consumer.as_ref() else {
            return Ok(());
        };
        if self.uncommitted == 0 {
            return Ok(());
        }
        let mut offsets = TopicPartitionList::new();
        for (&partition, &offset) in &self.done {
            offsets
                .add_partition_offset(&self.topic, partition, Offset::Offset(offset))
                .map_err(|e| self.commit_error(e.to_string()))?;
        }
        let consumer = Arc::clone(consumer);
        tokio::task::spawn_blocking(move || consumer.commit(&offsets, CommitMode::Sync))
            .await
            .map_err(|e| self.commit_error(format!("the commit task failed: {e}")))?
            .map_err(|e| self.commit_error(e.to_string()))?;
        self.uncommitted = 0;
        Ok(())
    }

    fn commit_error(&self, reason: String) -> TransportError {
        TransportError::Settle {
            origin: format!("kafka://{}", self.topic),
            reason: format!("committing group {}'s offsets: {reason}", self.group),
        }
    }
}

#[async_trait]
impl Backlog for TopicBacklog {
    async fn next(&mut self) -> Result<Option<InboundMessage>, TransportError> {
        loop {
            if self.remaining.is_empty() {
                return Ok(None);
            }
            let Some(consumer) = self.consumer.as_ref() else {
                return Ok(None);
            };
            let received = tokio::time::timeout(NEXT_TIMEOUT, consumer.recv()).await;
            let record = match received {
                Ok(Ok(message)) => Record::copy_from(&message),
                Ok(Err(e)) => {
                    return Err(TransportError::Subscribe {
                        topic: self.topic.clone(),
                        reason: format!("reading the topic: {e}"),
                    })
                }
                Err(_) => {
                    return Err(TransportError::Subscribe {
                        topic: self.topic.clone(),
                        reason: format!(
                            "no record within {NEXT_TIMEOUT:?} though partitions {:?} hold more \
                             (records removed by retention meanwhile, or the broker is down)",
                            self.remaining.keys().collect::<Vec<_>>()
                        ),
                    })
                }
            };
            let Some(&end) = self.remaining.get(&record.partition) else {
                // A partition read to its end goes on fetching what came after.
                continue;
            };
            if record.offset >= end {
                self.remaining.remove(&record.partition);
                continue;
            }
            if record.offset + 1 >= end {
                self.remaining.remove(&record.partition);
            }
            return Ok(Some(record.to_message(&self.topic)));
        }
    }

    async fn done(&mut self, origin: &Origin, _sent: bool) -> Result<(), TransportError> {
        let Origin::Kafka {
            partition, offset, ..
        } = origin
        else {
            return Err(TransportError::Settle {
                origin: origin.to_string(),
                reason: format!("not a record of topic {}", self.topic),
            });
        };
        if self.keep {
            return Ok(());
        }
        self.done.insert(*partition, offset + 1);
        self.uncommitted += 1;
        if self.uncommitted >= COMMIT_EVERY {
            self.commit().await?;
        }
        Ok(())
    }

    async fn close(&mut self) -> Result<(), TransportError> {
        let committed = self.commit().await;
        self.consumer = None;
        committed
    }
}
