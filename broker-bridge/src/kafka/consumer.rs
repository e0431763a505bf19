//! The Kafka subscription: one consumer-group member per trigger, scheduled for its ordering,
//! committing only up to the watermark.
//!
//! A dedicated OS thread owns the rdkafka `BaseConsumer` and polls it all the time, even while
//! functions run, so the member never exceeds `max.poll.interval.ms` and leaves its group. It
//! moves received messages into a [`LaneScheduler`] (which decides what may be handed out) and a
//! [`WatermarkTracker`] per partition (which decides what may be committed), pauses partitions
//! whose buffer is full, and commits every `commit_interval`, on revoke and on close. Rebalance
//! callbacks run on that thread too, which is why they may block (bounded) while in-flight
//! deliveries of revoked partitions settle.
//!
//! Settling a delivery only touches the shared state; it never talks to the broker. A delivery
//! of a partition that was revoked meanwhile settles nothing: the new owner resumes at the
//! committed offset and may deliver it again (at-least-once).
//!
//! It does not retry or decode anything: retries are the dispatcher's policy (in place for
//! Kafka, see [`RetryStyle::InPlace`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{oneshot, Notify};

use super::lanes::{LaneId, LaneScheduler};
use super::watermark::WatermarkTracker;
use super::{forward_log, metrics_events};
use crate::{
    BrokerKind, Delivery, InboundMessage, LagProbe, Ordering, Origin, RetryStyle, Settle,
    Subscription, TransportError,
};

/// How long one poll of the consumer thread may block; bounds how late a stop request or a
/// commit round is noticed.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// How long `lag()` waits for the broker.
const LAG_TIMEOUT: Duration = Duration::from_secs(5);

/// What the subscription needs beyond the rdkafka client config.
#[derive(Debug, Clone)]
pub(super) struct SubscriptionSettings {
    pub topic: String,
    pub group_id: String,
    pub ordering: Ordering,
    pub max_in_flight: usize,
    pub commit_interval: Duration,
    pub drain_timeout: Duration,
    pub max_buffered_per_partition: usize,
}

/// The lag of one assigned partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionLag {
    pub partition: i32,
    /// The next offset the broker will write.
    pub high_watermark: i64,
    /// The group's committed offset, or the low watermark when the group has none.
    pub committed: i64,
    /// `high_watermark - committed`, never negative.
    pub lag: u64,
}

struct ConsumerState {
    scheduler: LaneScheduler<InboundMessage>,
    /// One per owned partition, for its current assignment generation.
    trackers: HashMap<i32, WatermarkTracker>,
    paused: BTreeSet<i32>,
    /// No more deliveries are handed out (close was called).
    closed: bool,
}

struct Shared {
    settings: SubscriptionSettings,
    state: Mutex<ConsumerState>,
    /// Signalled whenever a handed-out delivery settles; revoke and close wait on it.
    settled: Condvar,
    /// Wakes `next()` when something may be ready.
    ready: Notify,
    /// Asks the consumer thread to drain, commit and leave.
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ConsumerState> {
        // A panic while holding the lock cannot leave the bookkeeping half-updated in a way
        // that loses messages (the worst case is a redelivery), so keep going.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Mark a handed-out message finished and free its lane.
    fn finish(&self, partition: i32, offset: i64, lane: &LaneId, generation: u64) {
        {
            let mut state = self.lock();
            if state.scheduler.generation(partition) == Some(generation) {
                if let Some(tracker) = state.trackers.get_mut(&partition) {
                    tracker.finished(offset);
                }
            } else {
                tracing::debug!(
                    topic = %self.settings.topic,
                    partition,
                    offset,
                    "settled a message of a partition no longer owned; its new owner may \
                     deliver it again"
                );
            }
            state.scheduler.release(partition, lane, generation);
        }
        self.settled.notify_all();
        self.ready.notify_one();
    }

    /// Put a handed-out message back at the head of its lane, one delivery later.
    fn requeue(&self, lane: LaneId, generation: u64, mut message: InboundMessage) {
        let Origin::Kafka { partition, .. } = message.origin else {
            return;
        };
        message.delivery_count = message.delivery_count.saturating_add(1);
        {
            let mut state = self.lock();
            if state.closed {
                // Leave it unfinished: the committed offset stays below it, so the next member
                // of the group delivers it again.
                state.scheduler.release(partition, &lane, generation);
            } else if state
                .scheduler
                .requeue_front(partition, lane, generation, message)
                .is_err()
            {
                tracing::debug!(
                    topic = %self.settings.topic,
                    partition,
                    "a message handed back after its partition was revoked is left to the new owner"
                );
            }
        }
        self.settled.notify_all();
        self.ready.notify_one();
    }
}

/// The consumer's rdkafka context: rebalance and commit callbacks, logs into tracing.
struct ConsumerCallbacks {
    shared: Arc<Shared>,
}

impl ClientContext for ConsumerCallbacks {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        forward_log(level, fac, log_message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::warn!(topic = %self.shared.settings.topic, %error, reason, "kafka consumer error");
    }
}

impl ConsumerContext for ConsumerCallbacks {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(list) => {
                let partitions = partitions_of(list, &self.shared.settings.topic);
                let lost = consumer.assignment_lost();
                metrics_events::rebalance(if lost { "lost" } else { "revoke" });
                revoke_partitions(consumer, &self.shared, &partitions, lost);
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(error) => {
                metrics_events::rebalance("error");
                tracing::warn!(topic = %self.shared.settings.topic, %error, "rebalance error");
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            let partitions = partitions_of(list, &self.shared.settings.topic);
            metrics_events::rebalance("assign");
            let mut state = self.shared.lock();
            for partition in &partitions {
                if !state.scheduler.owns(*partition) {
                    state.scheduler.assign(*partition);
                    state.trackers.insert(*partition, WatermarkTracker::new());
                }
            }
            tracing::info!(
                topic = %self.shared.settings.topic,
                group = %self.shared.settings.group_id,
                ?partitions,
                "partitions assigned"
            );
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => metrics_events::commit("ok"),
            Err(error) => {
                metrics_events::commit("error");
                tracing::warn!(
                    topic = %self.shared.settings.topic,
                    %error,
                    "offset commit failed; retrying at the next commit round"
                );
                let partitions = partitions_of(offsets, &self.shared.settings.topic);
                let mut state = self.shared.lock();
                for partition in partitions {
                    if let Some(tracker) = state.trackers.get_mut(&partition) {
                        tracker.commit_failed();
                    }
                }
            }
        }
    }
}

fn partitions_of(list: &TopicPartitionList, topic: &str) -> Vec<i32> {
    list.elements()
        .iter()
        .filter(|e| e.topic() == topic)
        .map(|e| e.partition())
        .collect()
}

/// Stop handing out the revoked partitions, wait (bounded) for their in-flight deliveries,
/// commit their watermark, then forget them. Runs inside the rebalance callback.
fn revoke_partitions(
    consumer: &BaseConsumer<ConsumerCallbacks>,
    shared: &Shared,
    partitions: &[i32],
    lost: bool,
) {
    let deadline = Instant::now() + shared.settings.drain_timeout;
    let mut state = shared.lock();
    for partition in partitions {
        state.scheduler.stop_partition(*partition);
    }
    if !lost {
        loop {
            let in_flight: usize = partitions
                .iter()
                .map(|p| state.scheduler.in_flight_of(*p))
                .sum();
            let now = Instant::now();
            if in_flight == 0 || now >= deadline {
                if in_flight > 0 {
                    tracing::warn!(
                        topic = %shared.settings.topic,
                        in_flight,
                        "revoked partitions still had deliveries in flight after the drain \
                         timeout; the new owner will deliver them again"
                    );
                }
                break;
            }
            state = shared
                .settled
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
    let commit = if lost {
        TopicPartitionList::new()
    } else {
        commit_list(shared, &mut state, Some(partitions))
    };
    for partition in partitions {
        state.scheduler.revoke(*partition);
        state.trackers.remove(partition);
        state.paused.remove(partition);
    }
    drop(state);
    if commit.count() > 0 {
        // Synchronous: the rebalance must not proceed before the new owner can see it.
        match consumer.commit(&commit, CommitMode::Sync) {
            Ok(()) => metrics_events::commit("ok"),
            Err(error) => {
                metrics_events::commit("error");
                tracing::warn!(topic = %shared.settings.topic, %error, "commit on revoke failed");
            }
        }
    }
    tracing::info!(topic = %shared.settings.topic, ?partitions, lost, "partitions revoked");
}

/// The offsets to commit now (all owned partitions, or only `only`), marked as committed.
fn commit_list(
    shared: &Shared,
    state: &mut ConsumerState,
    only: Option<&[i32]>,
) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    for (partition, tracker) in &mut state.trackers {
        if only.is_some_and(|only| !only.contains(partition)) {
            continue;
        }
        if let Some(position) = tracker.commit_candidate() {
            if list
                .add_partition_offset(&shared.settings.topic, *partition, Offset::Offset(position))
                .is_ok()
            {
                tracker.mark_committed(position);
            }
        }
    }
    list
}

fn commit_now(consumer: &BaseConsumer<ConsumerCallbacks>, shared: &Shared, mode: CommitMode) {
    let list = {
        let mut state = shared.lock();
        commit_list(shared, &mut state, None)
    };
    if list.count() == 0 {
        return;
    }
    if let Err(error) = consumer.commit(&list, mode) {
        metrics_events::commit("error");
        tracing::warn!(topic = %shared.settings.topic, %error, "offset commit failed");
        let mut state = shared.lock();
        for partition in partitions_of(&list, &shared.settings.topic) {
            if let Some(tracker) = state.trackers.get_mut(&partition) {
                tracker.commit_failed();
            }
        }
    } else if matches!(mode, CommitMode::Sync) {
        metrics_events::commit("ok");
    }
}

/// Copy a borrowed rdkafka message into an owned inbound message.
fn to_inbound(message: &rdkafka::message::BorrowedMessage<'_>) -> InboundMessage {
    let mut headers = Vec::new();
    if let Some(list) = message.headers() {
        for header in list.iter() {
            let value = match header.value {
                None => String::new(),
                Some(bytes) => match std::str::from_utf8(bytes) {
                    Ok(text) => text.to_owned(),
                    Err(_) => {
                        metrics_events::lossy_header();
                        String::from_utf8_lossy(bytes).into_owned()
                    }
                },
            };
            headers.push((header.key.to_owned(), value));
        }
    }
    InboundMessage {
        topic: message.topic().to_owned(),
        key: message.key().map(Bytes::copy_from_slice),
        headers,
        payload: message.payload().map(Bytes::copy_from_slice),
        origin: Origin::Kafka {
            topic: message.topic().to_owned(),
            partition: message.partition(),
            offset: message.offset(),
        },
        delivery_count: 1,
    }
}

/// Take a received message into the scheduler and tracker.
fn ingest(shared: &Shared, message: InboundMessage) {
    let Origin::Kafka {
        partition, offset, ..
    } = message.origin
    else {
        return;
    };
    let mut state = shared.lock();
    let Some(tracker) = state.trackers.get_mut(&partition) else {
        tracing::debug!(
            partition,
            offset,
            "message of a partition not owned; ignored"
        );
        return;
    };
    if !tracker.received(offset) {
        return;
    }
    let lane = state.scheduler.lane_of(message.key.as_ref());
    if state.scheduler.push(partition, lane, message).is_err() {
        // Being revoked: it stays unfinished, so the watermark stays below it and the next
        // owner reads it.
        return;
    }
    drop(state);
    shared.ready.notify_one();
}

/// Pause partitions whose buffer is full, resume those drained to half.
fn apply_backpressure(consumer: &BaseConsumer<ConsumerCallbacks>, shared: &Shared) {
    let limit = shared.settings.max_buffered_per_partition;
    let (pause, resume) = {
        let mut state = shared.lock();
        let owned: Vec<i32> = state.scheduler.partitions().collect();
        let mut pause = Vec::new();
        let mut resume = Vec::new();
        for partition in owned {
            let buffered = state.scheduler.buffered(partition);
            let paused = state.paused.contains(&partition);
            if !paused && buffered >= limit {
                state.paused.insert(partition);
                pause.push(partition);
            } else if paused && buffered <= limit / 2 {
                state.paused.remove(&partition);
                resume.push(partition);
            }
        }
        (pause, resume)
    };
    let topic = &shared.settings.topic;
    if !pause.is_empty() {
        let list = partition_list(topic, &pause);
        match consumer.pause(&list) {
            Ok(()) => {
                metrics_events::partitions_paused(pause.len());
                tracing::debug!(%topic, partitions = ?pause, "buffer full, partitions paused");
            }
            Err(error) => tracing::warn!(%topic, %error, "pausing partitions failed"),
        }
    }
    if !resume.is_empty() {
        let list = partition_list(topic, &resume);
        if let Err(error) = consumer.resume(&list) {
            tracing::warn!(%topic, %error, "resuming partitions failed");
            let mut state = shared.lock();
            state.paused.extend(resume);
        }
    }
}

fn partition_list(topic: &str, partitions: &[i32]) -> TopicPartitionList {
    let mut list = TopicPartitionList::new();
    for partition in partitions {
        list.add_partition(topic, *partition);
    }
    list
}

/// The consumer thread: poll, schedule, commit; drain and commit on stop.
fn run_consumer(consumer: Arc<BaseConsumer<ConsumerCallbacks>>, shared: Arc<Shared>) {
    let mut last_commit = Instant::now();
    while !shared.stop.load(AtomicOrdering::Acquire) {
        apply_backpressure(&consumer, &shared);
        match consumer.poll(POLL_INTERVAL) {
            None => {}
            Some(Ok(message)) => ingest(&shared, to_inbound(&message)),
            Some(Err(error)) => {
                tracing::warn!(topic = %shared.settings.topic, %error, "kafka poll error; retrying");
            }
        }
        if last_commit.elapsed() >= shared.settings.commit_interval {
            commit_now(&consumer, &shared, CommitMode::Async);
            last_commit = Instant::now();
        }
    }
    shutdown_consumer(&consumer, &shared);
}

fn shutdown_consumer(consumer: &BaseConsumer<ConsumerCallbacks>, shared: &Shared) {
    let topic = &shared.settings.topic;
    // Fetch nothing more, but keep polling so the group still sees a live member while the
    // last deliveries finish.
    if let Ok(assignment) = consumer.assignment() {
        if let Err(error) = consumer.pause(&assignment) {
            tracing::debug!(%topic, %error, "pausing before close failed");
        }
    }
    let deadline = Instant::now() + shared.settings.drain_timeout;
    loop {
        let in_flight = shared.lock().scheduler.in_flight();
        if in_flight == 0 {
            break;
        }
        if Instant::now() >= deadline {
            tracing::warn!(
                %topic,
                in_flight,
                "closing with deliveries still in flight; they will be delivered again"
            );
            break;
        }
        if let Some(Ok(message)) = consumer.poll(POLL_INTERVAL) {
            ingest(shared, to_inbound(&message));
        }
    }
    commit_now(consumer, shared, CommitMode::Sync);
    consumer.unsubscribe();
    // Serve the revoke that unsubscribing triggers, so its commit runs here, bounded.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until
        && !consumer
            .assignment()
            .map(|a| a.count() == 0)
            .unwrap_or(true)
    {
        let _ = consumer.poll(POLL_INTERVAL);
    }
    tracing::info!(%topic, group = %shared.settings.group_id, "kafka subscription closed");
}

/// Reads the lag of a subscription's partitions, detached from the subscription. It keeps the
/// consumer handle alive: after close it reads no partitions (lag 0).
pub struct KafkaLagProbe {
    shared: Arc<Shared>,
    consumer: Arc<BaseConsumer<ConsumerCallbacks>>,
}

impl std::fmt::Debug for KafkaLagProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaLagProbe")
            .field("topic", &self.shared.settings.topic)
            .finish()
    }
}

impl KafkaLagProbe {
    /// The lag of every partition this member owns: high watermark minus committed offset
    /// (the low watermark where the group committed nothing).
    pub async fn partition_lag(&self) -> Result<Vec<PartitionLag>, TransportError> {
        let partitions: Vec<i32> = self.shared.lock().scheduler.partitions().collect();
        let topic = self.shared.settings.topic.clone();
        let lag_error = |reason: String| TransportError::Lag {
            topic: topic.clone(),
            reason,
        };
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        let consumer = self.consumer.clone();
        let query_topic = topic.clone();
        let result = tokio::task::spawn_blocking(move || -> KafkaResult<Vec<PartitionLag>> {
            let committed = consumer
                .committed_offsets(partition_list(&query_topic, &partitions), LAG_TIMEOUT)?;
            let committed: BTreeMap<i32, Offset> = committed
                .elements()
                .iter()
                .map(|e| (e.partition(), e.offset()))
                .collect();
            let mut lags = Vec::with_capacity(partitions.len());
            for partition in partitions {
                let (low, high) =
                    consumer.fetch_watermarks(&query_topic, partition, LAG_TIMEOUT)?;
                let committed = match committed.get(&partition) {
                    Some(Offset::Offset(offset)) if *offset >= 0 => *offset,
                    _ => low,
                };
                let lag = u64::try_from(high.saturating_sub(committed)).unwrap_or(0);
                lags.push(PartitionLag {
                    partition,
                    high_watermark: high,
                    committed,
                    lag,
                });
            }
            Ok(lags)
        })
        .await
        .map_err(|e| lag_error(e.to_string()))?;
        result.map_err(|e| lag_error(e.to_string()))
    }
}

#[async_trait]
impl LagProbe for KafkaLagProbe {
    async fn lag(&self) -> Result<u64, TransportError> {
        Ok(self.partition_lag().await?.iter().map(|p| p.lag).sum())
    }
}

/// A trigger's stream of Kafka deliveries. See the module docs.
pub struct KafkaSubscription {
    shared: Arc<Shared>,
    lag_probe: Arc<KafkaLagProbe>,
    finished: Option<oneshot::Receiver<()>>,
}

impl std::fmt::Debug for KafkaSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSubscription")
            .field("topic", &self.shared.settings.topic)
            .field("group_id", &self.shared.settings.group_id)
            .field("ordering", &self.shared.settings.ordering)
            .finish()
    }
}

impl KafkaSubscription {
    /// Join the group and start the consumer thread. `client` carries the connection settings
    /// (and secrets); the group and commit settings are added here.
    pub(super) fn start(
        mut client: ClientConfig,
        settings: SubscriptionSettings,
    ) -> Result<Self, TransportError> {
        let subscribe_error = |reason: String| TransportError::Subscribe {
            topic: settings.topic.clone(),
            reason,
        };
        client
            .set("group.id", &settings.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("partition.assignment.strategy", "cooperative-sticky");
        let shared = Arc::new(Shared {
            state: Mutex::new(ConsumerState {
                scheduler: LaneScheduler::new(settings.ordering, settings.max_in_flight),
                trackers: HashMap::new(),
                paused: BTreeSet::new(),
                closed: false,
            }),
            settled: Condvar::new(),
            ready: Notify::new(),
            stop: AtomicBool::new(false),
            settings: settings.clone(),
        });
        let consumer: BaseConsumer<ConsumerCallbacks> = client
            .create_with_context(ConsumerCallbacks {
                shared: shared.clone(),
            })
            .map_err(|e| subscribe_error(e.to_string()))?;
        consumer
            .subscribe(&[settings.topic.as_str()])
            .map_err(|e| subscribe_error(e.to_string()))?;
        let consumer = Arc::new(consumer);
        let (done_tx, done_rx) = oneshot::channel();
        let thread_consumer = consumer.clone();
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("weir-kafka-{}", settings.topic))
            .spawn(move || {
                run_consumer(thread_consumer, thread_shared);
                let _ = done_tx.send(());
            })
            .map_err(|e| subscribe_error(format!("starting the consumer thread: {e}")))?;
        tracing::info!(
            topic = %settings.topic,
            group = %settings.group_id,
            ordering = ?settings.ordering,
            "kafka subscription started"
        );
        let lag_probe = Arc::new(KafkaLagProbe {
            shared: shared.clone(),
            consumer,
        });
        Ok(Self {
            shared,
            lag_probe,
            finished: Some(done_rx),
        })
    }

    /// The lag of every partition this member owns: high watermark minus committed offset.
    pub async fn partition_lag(&self) -> Result<Vec<PartitionLag>, TransportError> {
        self.lag_probe.partition_lag().await
    }

    /// The partitions this member owns right now.
    pub fn assigned_partitions(&self) -> Vec<i32> {
        self.shared.lock().scheduler.partitions().collect()
    }

    fn request_stop(&self) {
        self.shared.lock().closed = true;
        self.shared.stop.store(true, AtomicOrdering::Release);
        self.shared.ready.notify_one();
    }
}

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn next(&mut self) -> Option<Delivery> {
        loop {
            let notified = self.shared.ready.notified();
            {
                let mut state = self.shared.lock();
                if state.closed {
                    return None;
                }
                if let Some(popped) = state.scheduler.pop() {
                    drop(state);
                    let message = popped.item;
                    let offset = match message.origin {
                        Origin::Kafka { offset, .. } => offset,
                        _ => -1,
                    };
                    let settle = KafkaSettle {
                        shared: self.shared.clone(),
                        partition: popped.partition,
                        offset,
                        lane: popped.lane,
                        generation: popped.generation,
                        unsettled: Some(message.clone()),
                    };
                    return Some(Delivery::new(message, Box::new(settle)));
                }
            }
            notified.await;
        }
    }

    async fn lag(&self) -> Result<u64, TransportError> {
        self.lag_probe.lag().await
    }

    fn lag_probe(&self) -> Option<Arc<dyn LagProbe>> {
        Some(self.lag_probe.clone())
    }

    fn retry_style(&self) -> RetryStyle {
        RetryStyle::InPlace
    }

    fn broker(&self) -> BrokerKind {
        BrokerKind::Kafka
    }

    async fn close(&mut self) {
        self.request_stop();
        let Some(finished) = self.finished.take() else {
            return;
        };
        let bound = self.shared.settings.drain_timeout + Duration::from_secs(10);
        if tokio::time::timeout(bound, finished).await.is_err() {
            tracing::warn!(
                topic = %self.shared.settings.topic,
                "kafka consumer thread did not finish in time; leaving it to finish alone"
            );
        }
    }
}

impl Drop for KafkaSubscription {
    fn drop(&mut self) {
        // The thread drains, commits and leaves the group on its own.
        self.request_stop();
    }
}

/// The right to settle one Kafka delivery.
struct KafkaSettle {
    shared: Arc<Shared>,
    partition: i32,
    offset: i64,
    lane: LaneId,
    generation: u64,
    /// The message while it is unsettled: handed back on drop.
    unsettled: Option<InboundMessage>,
}

impl KafkaSettle {
    fn done(mut self: Box<Self>) {
        self.unsettled = None;
        self.shared
            .finish(self.partition, self.offset, &self.lane, self.generation);
    }
}

#[async_trait]
impl Settle for KafkaSettle {
    async fn ack(self: Box<Self>) -> Result<(), TransportError> {
        self.done();
        Ok(())
    }

    async fn retry_after(mut self: Box<Self>, delay: Duration) -> Result<(), TransportError> {
        let Some(message) = self.unsettled.take() else {
            return Ok(());
        };
        metrics_events::redelivered("retry");
        let shared = self.shared.clone();
        let lane = self.lane.clone();
        let generation = self.generation;
        // The lane stays blocked by this message until it is back at its head.
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            shared.requeue(lane, generation, message);
        });
        Ok(())
    }

    async fn term(self: Box<Self>) -> Result<(), TransportError> {
        // The DLQ record is confirmed before term is called: the message is done.
        self.done();
        Ok(())
    }
}

impl Drop for KafkaSettle {
    fn drop(&mut self) {
        if let Some(message) = self.unsettled.take() {
            metrics_events::redelivered("dropped");
            self.shared
                .requeue(self.lane.clone(), self.generation, message);
        }
    }
}
