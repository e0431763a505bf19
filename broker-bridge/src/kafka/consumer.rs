//! The Kafka subscription: one consumer-group member per trigger, scheduled for its ordering,
//! committing only up to the watermark.
//!
//! A dedicated OS thread owns the rdkafka `BaseConsumer` and polls it all the time, even while
//! functions run, so the member never exceeds `max.poll.interval.ms` and leaves its group. It
//! moves received messages into a [`LaneScheduler`] (which decides what may be handed out) and a
//! [`WatermarkTracker`] per partition (which decides what may be committed), and commits every
//! `commit_interval`, on revoke and on close. Rebalance callbacks run on that thread too, which
//! is why they may block (bounded) while in-flight deliveries of revoked partitions settle.
//!
//! Backpressure without refetching: before it joins the group, the thread splits every
//! partition of the topic into its own librdkafka queue, so the consumer queue carries only
//! events (rebalances, commits, errors). It takes records from a partition's queue only while
//! that partition's buffer has room; the rest waits in librdkafka, which stops fetching by its
//! own limits (`queued.max.messages.kbytes`). Pausing a partition instead would make
//! librdkafka discard everything it had prefetched for it and fetch it again on resume.
//! Partitions that appear after start (the topic grew) are not split: their records come
//! through the consumer queue, and their backpressure is pause/resume. The thread sleeps when
//! there is nothing to take, and is woken by librdkafka when a queue becomes non-empty, and by
//! [`KafkaSubscription::next`] when a full buffer drained to half.
//!
//! Settling a delivery only touches the shared state; it never talks to the broker. A delivery
//! of a partition that was revoked meanwhile settles nothing: the new owner resumes at the
//! committed offset and may deliver it again (at-least-once).
//!
//! It does not retry or decode anything: retries are the dispatcher's policy (in place for
//! Kafka, see [`RetryStyle::InPlace`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::StreamExt as _;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{oneshot, Notify};

use super::lanes::{LaneId, LaneScheduler};
use super::record::Record;
use super::watermark::WatermarkTracker;
use super::{forward_log, metrics_events, report_client_error};
use crate::{
    BrokerKind, Delivery, LagProbe, Ordering, RetryStyle, Settle, Subscription, TransportError,
};

/// How long one poll of the consumer thread may block; bounds how late a stop request or a
/// commit round is noticed.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// At most this many records already in librdkafka's queue are taken in one go (one lock, one
/// wake-up of the dispatcher) before the thread looks at commits and backpressure again.
const MAX_BATCH: usize = 256;

/// How long the consumer thread waits for the topic's partition list before it joins (to split
/// the partitions' queues); without one, every partition goes through the consumer queue.
const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

/// How long `lag()` waits for the broker.
const LAG_TIMEOUT: Duration = Duration::from_secs(5);
/// Most watermark requests of one lag reading in flight at once.
const LAG_QUERIES: usize = 8;

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
    scheduler: LaneScheduler<Record>,
    /// One per owned partition, for its current assignment generation.
    trackers: HashMap<i32, WatermarkTracker>,
    paused: BTreeSet<i32>,
    /// No more deliveries are handed out (close was called).
    closed: bool,
    /// Threads blocked on [`Shared::settled`] (revoke); settling signals the condvar only
    /// then, as signalling costs a system call even with nobody waiting.
    settle_waiters: usize,
    /// Partitions read from their own queue (see the module docs); never paused.
    split: BTreeSet<i32>,
    /// Split partitions whose buffer was full when the thread last looked: `next()` wakes the
    /// thread once such a buffer drained to half.
    throttled: BTreeSet<i32>,
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
    /// Bumped by every rebalance callback: the consumer thread stops a batch there, so records
    /// polled before a rebalance are never taken into the state after it.
    rebalances: AtomicU64,
    /// Bumped by every callback served by a poll of the consumer queue (rebalance, commit), so
    /// the thread can tell "served an event" from "nothing there" (both poll to `None`).
    events: AtomicU64,
    /// The consumer thread, to wake it from librdkafka's queue callbacks and from `next()`.
    thread: OnceLock<std::thread::Thread>,
}

impl Shared {
    /// Wake the consumer thread if it sleeps (cheap when it does not).
    fn wake_consumer(&self) {
        if let Some(thread) = self.thread.get() {
            thread.unpark();
        }
    }

    fn lock(&self) -> MutexGuard<'_, ConsumerState> {
        // A panic while holding the lock cannot leave the bookkeeping half-updated in a way
        // that loses messages (the worst case is a redelivery), so keep going.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Mark a handed-out message finished and free its lane.
    fn finish(&self, partition: i32, offset: i64, lane: &LaneId, generation: u64) {
        let waiters = {
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
            state.settle_waiters
        };
        if waiters > 0 {
            self.settled.notify_all();
        }
        self.ready.notify_one();
    }

    /// Put a handed-out message back at the head of its lane, one delivery later.
    fn requeue(&self, lane: LaneId, generation: u64, mut record: Record) {
        let partition = record.partition;
        record.delivery_count = record.delivery_count.saturating_add(1);
        let waiters = {
            let mut state = self.lock();
            if state.closed {
                // Leave it unfinished: the committed offset stays below it, so the next member
                // of the group delivers it again.
                state.scheduler.release(partition, &lane, generation);
            } else if state
                .scheduler
                .requeue_front(partition, lane, generation, record)
                .is_err()
            {
                tracing::debug!(
                    topic = %self.settings.topic,
                    partition,
                    "a message handed back after its partition was revoked is left to the new owner"
                );
            }
            state.settle_waiters
        };
        if waiters > 0 {
            self.settled.notify_all();
        }
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
        report_client_error(Some(&self.shared.settings.topic), &error, reason);
    }
}

impl ConsumerContext for ConsumerCallbacks {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.shared.rebalances.fetch_add(1, AtomicOrdering::Relaxed);
        self.shared.events.fetch_add(1, AtomicOrdering::Relaxed);
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
        self.shared.rebalances.fetch_add(1, AtomicOrdering::Relaxed);
        self.shared.events.fetch_add(1, AtomicOrdering::Relaxed);
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
        self.shared.events.fetch_add(1, AtomicOrdering::Relaxed);
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
            state.settle_waiters += 1;
            state = shared
                .settled
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            state.settle_waiters -= 1;
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
        state.throttled.remove(partition);
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

/// Take received records into the scheduler and trackers (one lock for the batch), then pause
/// partitions whose buffer is full and resume those drained to half (partitions read through
/// the consumer queue only; split ones are throttled by [`pull_partitions`]).
fn ingest(consumer: &BaseConsumer<ConsumerCallbacks>, shared: &Shared, batch: &mut Vec<Record>) {
    let limit = shared.settings.max_buffered_per_partition;
    let mut pause = Vec::new();
    let mut resume = Vec::new();
    let received = !batch.is_empty();
    {
        let mut state = shared.lock();
        let state = &mut *state;
        for record in batch.drain(..) {
            let Some(tracker) = state.trackers.get_mut(&record.partition) else {
                tracing::debug!(
                    partition = record.partition,
                    offset = record.offset,
                    "message of a partition not owned; ignored"
                );
                continue;
            };
            if !tracker.received(record.offset) {
                continue;
            }
            let lane = state.scheduler.lane_of(record.key.as_ref());
            // Refused while being revoked: it stays unfinished, so the watermark stays below
            // it and the next owner reads it.
            let _ = state.scheduler.push(record.partition, lane, record);
        }
        for partition in state.scheduler.partitions() {
            if state.split.contains(&partition) {
                continue;
            }
            let buffered = state.scheduler.buffered(partition);
            if buffered >= limit {
                if state.paused.insert(partition) {
                    pause.push(partition);
                }
            } else if buffered <= limit / 2 && state.paused.remove(&partition) {
                resume.push(partition);
            }
        }
    }
    if received {
        shared.ready.notify_one();
    }
    let topic = &shared.settings.topic;
    if !pause.is_empty() {
        let list = partition_list(topic, &pause);
        match consumer.pause(&list) {
            Ok(()) => {
                metrics_events::partitions_paused(pause.len());
                tracing::debug!(%topic, partitions = ?pause, "buffer full, partitions paused");
            }
            Err(error) => {
                tracing::warn!(%topic, %error, "pausing partitions failed");
                let mut state = shared.lock();
                for partition in &pause {
                    state.paused.remove(partition);
                }
            }
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

/// Split every partition `topic` has now into its own queue, waking the thread when one
/// becomes non-empty. Runs before the thread's first poll, so before any partition is assigned
/// and fetched: no record of a split partition can already sit in the consumer queue.
fn split_partitions(
    consumer: &Arc<BaseConsumer<ConsumerCallbacks>>,
    shared: &Arc<Shared>,
) -> BTreeMap<i32, PartitionQueue<ConsumerCallbacks>> {
    let topic = &shared.settings.topic;
    let mut queues = BTreeMap::new();
    let metadata = match consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT) {
        Ok(metadata) => metadata,
        Err(error) => {
            tracing::warn!(
                %topic,
                %error,
                "could not read the topic's partitions; its records go through the consumer \
                 queue, with pause/resume as backpressure"
            );
            return queues;
        }
    };
    for meta in metadata.topics().iter().filter(|t| t.name() == topic) {
        for partition in meta.partitions() {
            let Some(mut queue) = consumer.split_partition_queue(topic, partition.id()) else {
                continue;
            };
            let waker = shared.clone();
            queue.set_nonempty_callback(move || waker.wake_consumer());
            queues.insert(partition.id(), queue);
        }
    }
    shared.lock().split = queues.keys().copied().collect();
    tracing::debug!(%topic, partitions = queues.len(), "partition queues split");
    queues
}

/// Serve the consumer queue without waiting: rebalance and commit callbacks, and the records
/// of partitions that are not split. Stops at a rebalance (see [`Shared::rebalances`]) and at
/// [`MAX_BATCH`] records. True when anything was served.
fn poll_consumer_queue(
    consumer: &BaseConsumer<ConsumerCallbacks>,
    shared: &Shared,
    batch: &mut Vec<Record>,
) -> bool {
    let mut served = false;
    while batch.len() < MAX_BATCH {
        let events = shared.events.load(AtomicOrdering::Relaxed);
        let rebalances = shared.rebalances.load(AtomicOrdering::Relaxed);
        match consumer.poll(Duration::ZERO) {
            Some(Ok(message)) => batch.push(Record::copy_from(&message)),
            Some(Err(error)) => {
                tracing::warn!(topic = %shared.settings.topic, %error, "kafka poll error; retrying");
            }
            None if shared.events.load(AtomicOrdering::Relaxed) == events => break,
            None => {}
        }
        served = true;
        if shared.rebalances.load(AtomicOrdering::Relaxed) != rebalances {
            break;
        }
    }
    served
}

/// Take records from the split partitions' queues, as many as each owned partition's buffer has
/// room for. True when any came.
fn pull_partitions(
    shared: &Shared,
    queues: &BTreeMap<i32, PartitionQueue<ConsumerCallbacks>>,
    rooms: &mut Vec<(i32, usize)>,
    batch: &mut Vec<Record>,
) -> bool {
    let limit = shared.settings.max_buffered_per_partition.max(1);
    rooms.clear();
    {
        let mut state = shared.lock();
        let state = &mut *state;
        for partition in queues.keys() {
            if !state.scheduler.owns(*partition) {
                continue;
            }
            let room = limit.saturating_sub(state.scheduler.buffered(*partition));
            if room == 0 {
                state.throttled.insert(*partition);
            } else {
                rooms.push((*partition, room.min(MAX_BATCH)));
            }
        }
    }
    let mut pulled = false;
    for (partition, room) in rooms.iter() {
        let Some(queue) = queues.get(partition) else {
            continue;
        };
        for _ in 0..*room {
            match queue.poll(Duration::ZERO) {
                None => break,
                Some(Ok(message)) => batch.push(Record::copy_from(&message)),
                Some(Err(error)) => {
                    tracing::warn!(
                        topic = %shared.settings.topic,
                        partition,
                        %error,
                        "kafka fetch error; retrying"
                    );
                }
            }
            pulled = true;
        }
    }
    pulled
}

/// The consumer thread: poll, schedule, commit; drain and commit on stop.
fn run_consumer(consumer: Arc<BaseConsumer<ConsumerCallbacks>>, shared: Arc<Shared>) {
    let _ = shared.thread.set(std::thread::current());
    // Subscribed already, but assignments are served only by this thread's polls, so nothing
    // is fetched before the split.
    let queues = split_partitions(&consumer, &shared);
    let mut last_commit = Instant::now();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut rooms = Vec::with_capacity(queues.len());
    while !shared.stop.load(AtomicOrdering::Acquire) {
        let mut busy = poll_consumer_queue(&consumer, &shared, &mut batch);
        busy |= pull_partitions(&shared, &queues, &mut rooms, &mut batch);
        ingest(&consumer, &shared, &mut batch);
        if last_commit.elapsed() >= shared.settings.commit_interval {
            commit_now(&consumer, &shared, CommitMode::Async);
            last_commit = Instant::now();
        }
        if !busy {
            // Woken early by a queue becoming non-empty, by `next()` (room again) or by stop;
            // the timeout bounds how late a commit round is.
            std::thread::park_timeout(POLL_INTERVAL);
        }
    }
    shutdown_consumer(&consumer, &shared);
    drop(queues);
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
        // A record still arriving is dropped untracked: it lies past every offset received,
        // so the commit position never reaches it and the next member reads it.
        let _ = consumer.poll(POLL_INTERVAL);
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
        // The committed offsets and each partition's watermarks are separate broker round
        // trips; asked one after another they made a reading (and so a scale-up) take several
        // round trips under load. They are independent, so they are asked at once.
        let committed = {
            let consumer = self.consumer.clone();
            let list = partition_list(&topic, &partitions);
            tokio::task::spawn_blocking(move || consumer.committed_offsets(list, LAG_TIMEOUT))
        };
        let probe_consumer = self.consumer.clone();
        let probe_topic = topic.clone();
        let watermarks = partitions.clone().into_iter().map(move |partition| {
            let consumer = probe_consumer.clone();
            let topic = probe_topic.clone();
            tokio::task::spawn_blocking(move || {
                consumer
                    .fetch_watermarks(&topic, partition, LAG_TIMEOUT)
                    .map(|(low, high)| (partition, low, high))
            })
        });
        // Bounded, so a topic with many partitions does not hold a blocking thread per
        // partition on every reading.
        let watermarks = futures::stream::iter(watermarks)
            .buffered(LAG_QUERIES)
            .collect::<Vec<_>>();
        let (committed, watermarks) = tokio::join!(committed, watermarks);
        let committed = committed
            .map_err(|e| lag_error(e.to_string()))?
            .map_err(|e| lag_error(e.to_string()))?;
        let committed: BTreeMap<i32, Offset> = committed
            .elements()
            .iter()
            .map(|e| (e.partition(), e.offset()))
            .collect();
        let mut lags = Vec::with_capacity(partitions.len());
        for watermark in watermarks {
            let (partition, low, high) = watermark
                .map_err(|e| lag_error(e.to_string()))?
                .map_err(|e| lag_error(e.to_string()))?;
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
                settle_waiters: 0,
                split: BTreeSet::new(),
                throttled: BTreeSet::new(),
            }),
            settled: Condvar::new(),
            ready: Notify::new(),
            stop: AtomicBool::new(false),
            rebalances: AtomicU64::new(0),
            events: AtomicU64::new(0),
            thread: OnceLock::new(),
            settings: settings.clone(),
        });
        let mut consumer: BaseConsumer<ConsumerCallbacks> = client
            .create_with_context(ConsumerCallbacks {
                shared: shared.clone(),
            })
            .map_err(|e| subscribe_error(e.to_string()))?;
        let waker = shared.clone();
        consumer.set_nonempty_callback(move || waker.wake_consumer());
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
        self.shared.wake_consumer();
    }
}

/// What [`KafkaSubscription::take_ready`] found.
// Unpacked by the caller at once; boxing the delivery would cost an allocation per record.
#[allow(clippy::large_enum_variant)]
enum Ready {
    Delivery(Delivery),
    Nothing,
    Closed,
}

impl KafkaSubscription {
    /// The next record whose lane is free, without waiting.
    fn take_ready(&self) -> Ready {
        let mut state = self.shared.lock();
        if state.closed {
            return Ready::Closed;
        }
        let Some(popped) = state.scheduler.pop() else {
            return Ready::Nothing;
        };
        let limit = self.shared.settings.max_buffered_per_partition;
        let refill = !state.throttled.is_empty()
            && state.scheduler.buffered(popped.partition) <= limit / 2
            && state.throttled.remove(&popped.partition);
        drop(state);
        if refill {
            self.shared.wake_consumer();
        }
        let record = popped.item;
        let message = record.to_message(&self.shared.settings.topic);
        let settle = KafkaSettle {
            shared: self.shared.clone(),
            partition: popped.partition,
            offset: record.offset,
            lane: popped.lane,
            generation: popped.generation,
            unsettled: Some(record),
        };
        Ready::Delivery(Delivery::new(message, Box::new(settle)))
    }
}

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn next(&mut self) -> Option<Delivery> {
        loop {
            let notified = self.shared.ready.notified();
            match self.take_ready() {
                Ready::Delivery(delivery) => return Some(delivery),
                Ready::Closed => return None,
                Ready::Nothing => notified.await,
            }
        }
    }

    fn try_next(&mut self) -> Option<Delivery> {
        match self.take_ready() {
            Ready::Delivery(delivery) => Some(delivery),
            Ready::Closed | Ready::Nothing => None,
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
    /// The record while it is unsettled: handed back on drop.
    unsettled: Option<Record>,
}

impl KafkaSettle {
    fn done(&mut self) {
        self.unsettled = None;
        self.shared
            .finish(self.partition, self.offset, &self.lane, self.generation);
    }
}

#[async_trait]
impl Settle for KafkaSettle {
    async fn ack(mut self: Box<Self>) -> Result<(), TransportError> {
        self.done();
        Ok(())
    }

    async fn retry_after(mut self: Box<Self>, delay: Duration) -> Result<(), TransportError> {
        let Some(record) = self.unsettled.take() else {
            return Ok(());
        };
        metrics_events::redelivered("retry");
        let shared = self.shared.clone();
        let lane = self.lane.clone();
        let generation = self.generation;
        // The lane stays blocked by this message until it is back at its head.
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            shared.requeue(lane, generation, record);
        });
        Ok(())
    }

    async fn term(mut self: Box<Self>) -> Result<(), TransportError> {
        // The DLQ record is confirmed before term is called: the message is done.
        self.done();
        Ok(())
    }
}

impl Drop for KafkaSettle {
    fn drop(&mut self) {
        if let Some(record) = self.unsettled.take() {
            metrics_events::redelivered("dropped");
            self.shared
                .requeue(self.lane.clone(), self.generation, record);
        }
    }
}
