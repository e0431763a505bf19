//! The in-process memory bus: the embedded default broker of `weir up`, with no server.
//!
//! Each topic is an append-only log (sequence numbers from 1) with a bounded, browsable history
//! ([`MemoryBus::history`], [`MemoryBus::watch`], [`MemoryBus::tail`]). Consumers read through
//! consumer **groups**, which behave like JetStream durable consumers: a group is created by its
//! first subscription and then keeps its own queue of every message not yet acknowledged, so
//! history eviction never loses pending work. Subscriptions of one group compete for messages;
//! different groups each get every message. Deliveries follow the crate's delivery contract:
//! settled once (ack, retry after a delay, term), redelivered with `delivery_count + 1` when
//! dropped unsettled, handed out one at a time per key under key/partition ordering.
//!
//! It deliberately does not persist anything (a process restart forgets every topic), does not
//! match subjects with wildcards (a topic is an exact name), and emits no metrics (the
//! dispatcher reads [`MemoryBus::depth`] and [`MemoryBus::topics`] and reports them itself).

use std::cmp::Reverse;
use std::collections::hash_map::{DefaultHasher, Entry};
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{broadcast, Notify};
use tokio::time::Instant;

use crate::{
    BrokerKind, Delivery, InboundMessage, LagProbe, Ordering, Origin, OutboundMessage, Published,
    Publisher, RetryStyle, Settle, Subscription, TransportError,
};

/// The header that carries the CloudEvents `partitionkey` extension in binary mode; it orders
/// messages that have no broker key.
const PARTITION_KEY_HEADER: &str = "ce-partitionkey";

/// The lane of messages with neither a key nor a partition key: they share one lane.
const UNKEYED_LANE: u64 = 0;

/// How many messages a slow [`MemoryBus::watch`] receiver may fall behind before it sees
/// `RecvError::Lagged` (it can then re-read [`MemoryBus::history`]).
const WATCH_CAPACITY: usize = 4096;

/// Sizing of the memory bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryBusConfig {
    /// Messages retained per topic for users to look at (`weir tail`), and the size of the
    /// per-topic de-duplication window. Pending messages are kept by their groups regardless.
    pub history: usize,
    /// The most messages a consumer group may have outstanding (queued, in flight or waiting
    /// for a retry); publishing beyond it fails instead of growing without bound.
    pub max_pending: usize,
}

impl Default for MemoryBusConfig {
    fn default() -> Self {
        Self {
            history: 10_000,
            max_pending: 1_000_000,
        }
    }
}

/// Where a new consumer group starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartFrom {
    /// Every message still retained in the topic's history, then new ones.
    Beginning,
    /// Only messages published after the group was created.
    #[default]
    New,
}

/// How a subscription consumes its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscribeOptions {
    /// Fixed when the group is created; `Key` and `Partition` mean the same here.
    pub ordering: Ordering,
    /// The most deliveries this subscription has handed out and not yet settled (at least 1).
    pub max_in_flight: usize,
    /// Only used when this subscription creates the group; an existing group keeps its place.
    pub start: StartFrom,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        Self {
            ordering: Ordering::default(),
            max_in_flight: 64,
            start: StartFrom::default(),
        }
    }
}

/// A message as appended to a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Position in the topic, from 1, without gaps.
    pub seq: u64,
    pub key: Option<Bytes>,
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
    pub published_at: SystemTime,
}

/// A consumer group's counters, for stats pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStats {
    pub name: String,
    pub ordering: Ordering,
    /// Outstanding messages: queued + in flight + waiting for a retry (the group's lag).
    pub depth: u64,
    pub in_flight: u64,
    pub waiting_retry: u64,
    pub subscriptions: usize,
}

/// A topic's counters, for stats pages and `weir tail`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicStats {
    pub name: String,
    /// The sequence of the newest message (0 when nothing was published yet).
    pub last_seq: u64,
    /// Messages currently retained in history.
    pub retained: usize,
    pub groups: Vec<GroupStats>,
}

/// The in-process broker. Cloning is cheap and every clone is the same bus.
#[derive(Clone)]
pub struct MemoryBus {
    inner: Arc<BusInner>,
}

struct BusInner {
    config: MemoryBusConfig,
    topics: RwLock<HashMap<String, Arc<Topic>>>,
}

impl fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBus")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Default for MemoryBus {
    fn default() -> Self {
        Self::new(MemoryBusConfig::default())
    }
}

impl MemoryBus {
    pub fn new(config: MemoryBusConfig) -> Self {
        Self {
            inner: Arc::new(BusInner {
                config,
                topics: RwLock::new(HashMap::new()),
            }),
        }
    }

    pub fn config(&self) -> MemoryBusConfig {
        self.inner.config
    }

    /// A confirmed publisher onto this bus.
    pub fn publisher(&self) -> MemoryPublisher {
        MemoryPublisher { bus: self.clone() }
    }

    /// Appends a message to its topic and queues it for every group of the topic; returns its
    /// sequence. A message whose `dedup_id` was already seen within the de-duplication window
    /// is not appended again: the first copy's sequence is returned.
    pub fn publish(&self, message: OutboundMessage) -> Result<u64, TransportError> {
        self.append(message).map(|(seq, _)| seq)
    }

    /// [`MemoryBus::publish`], also saying whether the message was appended or was a duplicate.
    fn append(&self, message: OutboundMessage) -> Result<(u64, Published), TransportError> {
        let topic = self.topic_or_create(&message.topic);
        let mut state = topic.lock();
        if let Some(id) = &message.dedup_id {
            if let Some(&seq) = state.dedup.get(id) {
                return Ok((seq, Published::Duplicate));
            }
        }
        let max_pending = self.inner.config.max_pending;
        if let Some(full) = state.groups.iter().find(|g| g.outstanding >= max_pending) {
            return Err(TransportError::Publish {
                topic: message.topic,
                reason: format!(
                    "memory bus backlog full for group {}: {} messages outstanding, max_pending is {max_pending}",
                    full.name, full.outstanding
                ),
            });
        }
        state.last_seq += 1;
        let seq = state.last_seq;
        let stored = Arc::new(StoredMessage {
            seq,
            key: message.key,
            headers: message
                .headers
                .into_iter()
                .map(|(name, value)| (name.into_owned(), value))
                .collect(),
            payload: message.payload,
            published_at: SystemTime::now(),
        });
        for group in &mut state.groups {
            group.outstanding += 1;
            group.queue.push_new(Pending::new(&stored, &group.queue));
            group.notify.notify_waiters();
        }
        let history = self.inner.config.history;
        if history > 0 {
            if state.history.len() >= history {
                state.history.pop_front();
            }
            state.history.push_back(Arc::clone(&stored));
        }
        if let Some(id) = message.dedup_id {
            state.remember_dedup_id(id, seq, history);
        }
        if topic.watch.receiver_count() > 0 {
            // An error only means every receiver left in the meantime.
            let _ = topic.watch.send(stored);
        }
        Ok((seq, Published::Stored))
    }

    /// Joins (or creates) consumer group `group` of `topic`. The group's ordering is fixed by
    /// the subscription that creates it; it can only change while the group has no live
    /// subscription, nothing in flight and nothing waiting for a retry.
    pub fn subscribe(
        &self,
        topic: &str,
        group: &str,
        options: SubscribeOptions,
    ) -> Result<MemorySubscription, TransportError> {
        let topic_handle = self.topic_or_create(topic);
        let ordering = LaneMode::of(options.ordering);
        let (group_index, notify) = {
            let mut state = topic_handle.lock();
            let index = match state.groups.iter().position(|g| g.name == group) {
                Some(index) => {
                    let existing = &mut state.groups[index];
                    if existing.queue.mode() != ordering {
                        existing.change_ordering(ordering).map_err(|reason| {
                            TransportError::Subscribe {
                                topic: topic.to_owned(),
                                reason: format!("group {group}: {reason}"),
                            }
                        })?;
                    }
                    index
                }
                None => {
                    let mut created = Group::new(group, ordering);
                    if options.start == StartFrom::Beginning {
                        for stored in &state.history {
                            created.outstanding += 1;
                            created.queue.push_new(Pending::new(stored, &created.queue));
                        }
                    }
                    state.groups.push(created);
                    state.groups.len() - 1
                }
            };
            let joined = &mut state.groups[index];
            joined.ordering = options.ordering;
            joined.subscriptions += 1;
            (index, Arc::clone(&joined.notify))
        };
        tracing::debug!(topic, group, ordering = ?options.ordering, "memory bus subscription opened");
        Ok(MemorySubscription {
            topic: topic_handle,
            group: group_index,
            notify,
            in_flight: Arc::new(AtomicUsize::new(0)),
            max_in_flight: options.max_in_flight.max(1),
            closed: false,
        })
    }

    /// Messages of `group` on `topic` not yet acknowledged or terminated (0 for an unknown
    /// group): the autoscaler's lag signal.
    pub fn depth(&self, topic: &str, group: &str) -> u64 {
        let Some(topic) = self.topic(topic) else {
            return 0;
        };
        let state = topic.lock();
        state
            .groups
            .iter()
            .find(|g| g.name == group)
            .map_or(0, |g| g.outstanding as u64)
    }

    /// Retained messages of `topic` in sequence order: from `from_seq` on (or the oldest
    /// retained one, if it was evicted) when given, else the newest `limit`.
    pub fn history(
        &self,
        topic: &str,
        from_seq: Option<u64>,
        limit: usize,
    ) -> Vec<Arc<StoredMessage>> {
        let Some(topic) = self.topic(topic) else {
            return Vec::new();
        };
        let state = topic.lock();
        state.history_slice(from_seq, limit)
    }

    /// New messages of `topic` as they are appended (the topic is created if needed, so a tail
    /// can wait for a topic nobody published to yet). A receiver that falls more than a few
    /// thousand messages behind gets `RecvError::Lagged`.
    pub fn watch(&self, topic: &str) -> broadcast::Receiver<Arc<StoredMessage>> {
        self.topic_or_create(topic).watch.subscribe()
    }

    /// The newest `limit` retained messages and a receiver of every later one, taken at the
    /// same instant: no message is missed or seen twice between the two.
    pub fn tail(
        &self,
        topic: &str,
        limit: usize,
    ) -> (
        Vec<Arc<StoredMessage>>,
        broadcast::Receiver<Arc<StoredMessage>>,
    ) {
        let topic = self.topic_or_create(topic);
        let state = topic.lock();
        let receiver = topic.watch.subscribe();
        (state.history_slice(None, limit), receiver)
    }

    /// Every topic with its counters, sorted by name.
    pub fn topics(&self) -> Vec<TopicStats> {
        let topics: Vec<Arc<Topic>> = self
            .inner
            .topics
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect();
        let mut stats: Vec<TopicStats> = topics
            .iter()
            .map(|topic| {
                let state = topic.lock();
                TopicStats {
                    name: topic.name.clone(),
                    last_seq: state.last_seq,
                    retained: state.history.len(),
                    groups: state.groups.iter().map(Group::stats).collect(),
                }
            })
            .collect();
        stats.sort_by(|a, b| a.name.cmp(&b.name));
        stats
    }

    fn topic(&self, name: &str) -> Option<Arc<Topic>> {
        self.inner
            .topics
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    fn topic_or_create(&self, name: &str) -> Arc<Topic> {
        if let Some(topic) = self.topic(name) {
            return topic;
        }
        let mut topics = self
            .inner
            .topics
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(
            topics
                .entry(name.to_owned())
                .or_insert_with(|| Arc::new(Topic::new(name))),
        )
    }
}

/// Confirmed publishing onto a [`MemoryBus`]: confirmed means appended.
#[derive(Debug, Clone)]
pub struct MemoryPublisher {
    bus: MemoryBus,
}

#[async_trait]
impl Publisher for MemoryPublisher {
    async fn publish(&self, message: OutboundMessage) -> Result<Published, TransportError> {
        self.bus.append(message).map(|(_seq, published)| published)
    }

    fn broker(&self) -> BrokerKind {
        BrokerKind::Memory
    }
}

/// One subscription of a consumer group.
pub struct MemorySubscription {
    topic: Arc<Topic>,
    group: usize,
    notify: Arc<Notify>,
    /// Deliveries handed out by this subscription and not settled yet; only changed under the
    /// topic lock, atomic so that settle handles can share it.
    in_flight: Arc<AtomicUsize>,
    max_in_flight: usize,
    closed: bool,
}

impl fmt::Debug for MemorySubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemorySubscription")
            .field("topic", &self.topic.name)
            .field("group", &self.group)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

impl MemorySubscription {
    /// The delivery of a message taken from the queue.
    fn delivery(&self, pending: Pending) -> Delivery {
        let stored = &pending.message;
        let message = InboundMessage {
            topic: self.topic.name.clone(),
            key: stored.key.clone(),
            headers: stored.headers.clone().into(),
            payload: Some(stored.payload.clone()),
            origin: Origin::Memory {
                topic: self.topic.name.clone(),
                seq: stored.seq,
            },
            delivery_count: pending.deliveries,
        };
        let settle = MemorySettle {
            topic: Arc::clone(&self.topic),
            group: self.group,
            subscription_in_flight: Arc::clone(&self.in_flight),
            pending: Some(pending),
        };
        Delivery::new(message, Box::new(settle))
    }

    /// Takes the next message this subscription may hand out, or says until when to wait.
    fn try_take(&self) -> Result<Pending, Option<Instant>> {
        let mut state = self.topic.lock();
        let group = &mut state.groups[self.group];
        if !group.retries.is_empty() {
            group.promote_due_retries(Instant::now());
        }
        if self.in_flight.load(AtomicOrdering::Relaxed) < self.max_in_flight {
            if let Some(mut pending) = group.queue.take() {
                pending.deliveries += 1;
                group.in_flight += 1;
                self.in_flight.fetch_add(1, AtomicOrdering::Relaxed);
                return Ok(pending);
            }
        }
        Err(group.retries.peek().map(|Reverse(retry)| retry.due))
    }

    fn detach(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        let mut state = self.topic.lock();
        let group = &mut state.groups[self.group];
        group.subscriptions = group.subscriptions.saturating_sub(1);
    }
}

/// A group's outstanding messages: queued, in flight or waiting for a retry.
fn group_depth(topic: &Topic, group: usize) -> u64 {
    let state = topic.lock();
    state.groups[group].outstanding as u64
}

/// A group's depth, readable while its subscription is busy.
struct MemoryLag {
    topic: Arc<Topic>,
    group: usize,
}

#[async_trait]
impl LagProbe for MemoryLag {
    async fn lag(&self) -> Result<u64, TransportError> {
        Ok(group_depth(&self.topic, self.group))
    }
}

#[async_trait]
impl Subscription for MemorySubscription {
    /// Cancel-safe: a delivery is taken from the queue and returned without an await in
    /// between, so dropping this future never loses a message.
    async fn next(&mut self) -> Option<Delivery> {
        loop {
            if self.closed {
                return None;
            }
            // Registered before looking at the queue, so a publish or settle that happens
            // between the look and the wait still wakes us.
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.try_take() {
                Ok(pending) => return Some(self.delivery(pending)),
                Err(Some(retry_due)) => {
                    tokio::select! {
                        () = &mut notified => {}
                        () = tokio::time::sleep_until(retry_due) => {}
                    }
                }
                Err(None) => notified.await,
            }
        }
    }

    fn try_next(&mut self) -> Option<Delivery> {
        if self.closed {
            return None;
        }
        let pending = self.try_take().ok()?;
        Some(self.delivery(pending))
    }

    async fn lag(&self) -> Result<u64, TransportError> {
        Ok(group_depth(&self.topic, self.group))
    }

    fn lag_probe(&self) -> Option<Arc<dyn LagProbe>> {
        Some(Arc::new(MemoryLag {
            topic: Arc::clone(&self.topic),
            group: self.group,
        }))
    }

    fn retry_style(&self) -> RetryStyle {
        RetryStyle::Redeliver
    }

    fn broker(&self) -> BrokerKind {
        BrokerKind::Memory
    }

    async fn close(&mut self) {
        self.detach();
    }
}

impl Drop for MemorySubscription {
    fn drop(&mut self) {
        self.detach();
    }
}

/// How one delivery ends.
enum Outcome {
    /// Acked or terminated: the group is done with the message.
    Done,
    /// Redeliver once `Instant` has passed.
    RetryAt(Instant),
    /// Dropped unsettled: redeliver at once.
    HandBack,
}

/// The settle handle of a memory bus delivery. Dropping it unsettled hands the message back.
struct MemorySettle {
    topic: Arc<Topic>,
    group: usize,
    subscription_in_flight: Arc<AtomicUsize>,
    /// `None` once settled, so that `Drop` does not settle a second time.
    pending: Option<Pending>,
}

impl MemorySettle {
    fn finish(&mut self, outcome: Outcome) {
        let Some(pending) = self.pending.take() else {
            return;
        };
        let mut state = self.topic.lock();
        let group = &mut state.groups[self.group];
        group.in_flight = group.in_flight.saturating_sub(1);
        self.subscription_in_flight
            .fetch_sub(1, AtomicOrdering::Relaxed);
        match outcome {
            Outcome::Done => {
                group.outstanding = group.outstanding.saturating_sub(1);
                group.queue.finish(pending.lane);
            }
            Outcome::RetryAt(due) => group.retries.push(Reverse(Retry { due, pending })),
            Outcome::HandBack => group.queue.hand_back(pending),
        }
        group.notify.notify_waiters();
    }
}

#[async_trait]
impl Settle for MemorySettle {
    async fn ack(mut self: Box<Self>) -> Result<(), TransportError> {
        self.finish(Outcome::Done);
        Ok(())
    }

    async fn retry_after(mut self: Box<Self>, delay: Duration) -> Result<(), TransportError> {
        self.finish(Outcome::RetryAt(Instant::now() + delay));
        Ok(())
    }

    async fn term(mut self: Box<Self>) -> Result<(), TransportError> {
        self.finish(Outcome::Done);
        Ok(())
    }
}

impl Drop for MemorySettle {
    fn drop(&mut self) {
        if let Some(pending) = &self.pending {
            tracing::debug!(
                topic = %self.topic.name,
                seq = pending.message.seq,
                "memory bus delivery dropped unsettled; handing it back"
            );
        }
        self.finish(Outcome::HandBack);
    }
}

struct Topic {
    name: String,
    state: Mutex<TopicState>,
    watch: broadcast::Sender<Arc<StoredMessage>>,
}

impl Topic {
    fn new(name: &str) -> Self {
        let (watch, _) = broadcast::channel(WATCH_CAPACITY);
        Self {
            name: name.to_owned(),
            state: Mutex::new(TopicState::default()),
            watch,
        }
    }

    fn lock(&self) -> MutexGuard<'_, TopicState> {
        // Nothing under this lock can leave the state half-changed in a way a panic would
        // make worse than stopping the bus, so a poisoned lock is used as is.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Default)]
struct TopicState {
    last_seq: u64,
    history: VecDeque<Arc<StoredMessage>>,
    groups: Vec<Group>,
    dedup: HashMap<String, u64>,
    dedup_order: VecDeque<String>,
}

impl TopicState {
    fn remember_dedup_id(&mut self, id: String, seq: u64, window: usize) {
        if window == 0 {
            return;
        }
        while self.dedup_order.len() >= window {
            if let Some(old) = self.dedup_order.pop_front() {
                self.dedup.remove(&old);
            }
        }
        self.dedup_order.push_back(id.clone());
        self.dedup.insert(id, seq);
    }

    fn history_slice(&self, from_seq: Option<u64>, limit: usize) -> Vec<Arc<StoredMessage>> {
        let Some(oldest) = self.history.front().map(|m| m.seq) else {
            return Vec::new();
        };
        let start = match from_seq {
            // History holds consecutive sequences, so the position is an offset.
            Some(seq) => usize::try_from(seq.saturating_sub(oldest)).unwrap_or(usize::MAX),
            None => self.history.len().saturating_sub(limit),
        };
        self.history
            .iter()
            .skip(start)
            .take(limit)
            .cloned()
            .collect()
    }
}

/// A consumer group: its own queue of every message it has not finished.
struct Group {
    name: String,
    ordering: Ordering,
    queue: GroupQueue,
    retries: BinaryHeap<Reverse<Retry>>,
    /// Queued + in flight + waiting for a retry.
    outstanding: usize,
    in_flight: usize,
    subscriptions: usize,
    /// Woken on anything a waiting subscription may act on: a new message, a settle, a retry.
    notify: Arc<Notify>,
}

impl Group {
    fn new(name: &str, mode: LaneMode) -> Self {
        Self {
            name: name.to_owned(),
            ordering: match mode {
                LaneMode::Keyed => Ordering::Key,
                LaneMode::Unordered => Ordering::None,
            },
            queue: GroupQueue::new(mode),
            retries: BinaryHeap::new(),
            outstanding: 0,
            in_flight: 0,
            subscriptions: 0,
            notify: Arc::new(Notify::new()),
        }
    }

    fn promote_due_retries(&mut self, now: Instant) {
        while let Some(Reverse(retry)) = self.retries.peek() {
            if retry.due > now {
                break;
            }
            if let Some(Reverse(retry)) = self.retries.pop() {
                self.queue.hand_back(retry.pending);
            }
        }
    }

    fn change_ordering(&mut self, mode: LaneMode) -> Result<(), String> {
        if self.subscriptions > 0 || self.in_flight > 0 || !self.retries.is_empty() {
            return Err(format!(
                "it is consumed with ordering {:?} ({} subscriptions, {} in flight, {} waiting for a retry); \
                 the ordering can only change once it is idle",
                self.ordering,
                self.subscriptions,
                self.in_flight,
                self.retries.len()
            ));
        }
        let mut queued = self.queue.drain();
        queued.sort_by_key(|p| p.message.seq);
        self.queue = GroupQueue::new(mode);
        for mut pending in queued {
            pending.lane = self.queue.lane_of(&pending.message);
            self.queue.push_new(pending);
        }
        Ok(())
    }

    fn stats(&self) -> GroupStats {
        GroupStats {
            name: self.name.clone(),
            ordering: self.ordering,
            depth: self.outstanding as u64,
            in_flight: self.in_flight as u64,
            waiting_retry: self.retries.len() as u64,
            subscriptions: self.subscriptions,
        }
    }
}

/// A message a group still has to finish.
struct Pending {
    message: Arc<StoredMessage>,
    /// Times handed out so far (the next delivery's count is one more).
    deliveries: u32,
    /// The ordering lane (hash of the key) under keyed ordering; unused otherwise.
    lane: u64,
}

impl Pending {
    fn new(message: &Arc<StoredMessage>, queue: &GroupQueue) -> Self {
        Self {
            message: Arc::clone(message),
            deliveries: 0,
            lane: queue.lane_of(message),
        }
    }
}

/// A message waiting for its retry delay; ordered by due time, then sequence.
struct Retry {
    due: Instant,
    pending: Pending,
}

impl PartialEq for Retry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}

impl Eq for Retry {}

impl PartialOrd for Retry {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Retry {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.pending.message.seq).cmp(&(other.due, other.pending.message.seq))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LaneMode {
    Unordered,
    Keyed,
}

impl LaneMode {
    fn of(ordering: Ordering) -> Self {
        match ordering {
            Ordering::None => LaneMode::Unordered,
            Ordering::Key | Ordering::Partition => LaneMode::Keyed,
        }
    }
}

/// What a group has queued, scheduled for its ordering.
enum GroupQueue {
    /// Any message to anyone, oldest (or handed back) first.
    Unordered(VecDeque<Pending>),
    Keyed(KeyedQueue),
}

/// Per-key lanes: a lane is *busy* while one of its messages is in flight or waiting for a
/// retry, and only lanes that are not busy and have messages sit in `ready`.
#[derive(Default)]
struct KeyedQueue {
    lanes: HashMap<u64, Lane>,
    ready: VecDeque<u64>,
}

#[derive(Default)]
struct Lane {
    queue: VecDeque<Pending>,
    busy: bool,
}

impl GroupQueue {
    fn new(mode: LaneMode) -> Self {
        match mode {
            LaneMode::Unordered => GroupQueue::Unordered(VecDeque::new()),
            LaneMode::Keyed => GroupQueue::Keyed(KeyedQueue::default()),
        }
    }

    fn mode(&self) -> LaneMode {
        match self {
            GroupQueue::Unordered(_) => LaneMode::Unordered,
            GroupQueue::Keyed(_) => LaneMode::Keyed,
        }
    }

    /// The lane of a message: its key, else its partition key header, else the shared
    /// unkeyed lane. Lanes are 64-bit hashes of the key bytes; two keys whose hashes collide
    /// share a lane, which only serialises them, never reorders them.
    fn lane_of(&self, message: &StoredMessage) -> u64 {
        if matches!(self, GroupQueue::Unordered(_)) {
            return UNKEYED_LANE;
        }
        let key: &[u8] = match &message.key {
            Some(key) => key,
            None => match message
                .headers
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(PARTITION_KEY_HEADER))
            {
                Some((_, value)) => value.as_bytes(),
                None => return UNKEYED_LANE,
            },
        };
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        hasher.finish()
    }

    fn push_new(&mut self, pending: Pending) {
        match self {
            GroupQueue::Unordered(queue) => queue.push_back(pending),
            GroupQueue::Keyed(keyed) => {
                let lane_id = pending.lane;
                let lane = keyed.lanes.entry(lane_id).or_default();
                lane.queue.push_back(pending);
                if !lane.busy && lane.queue.len() == 1 {
                    keyed.ready.push_back(lane_id);
                }
            }
        }
    }

    fn take(&mut self) -> Option<Pending> {
        match self {
            GroupQueue::Unordered(queue) => queue.pop_front(),
            GroupQueue::Keyed(keyed) => {
                while let Some(lane_id) = keyed.ready.pop_front() {
                    if let Some(lane) = keyed.lanes.get_mut(&lane_id) {
                        if lane.busy {
                            // Not reachable while the `ready` invariant holds; never hand out
                            // a second message of a key if it breaks.
                            continue;
                        }
                        if let Some(pending) = lane.queue.pop_front() {
                            lane.busy = true;
                            return Some(pending);
                        }
                    }
                }
                None
            }
        }
    }

    /// A message goes back to the head of its lane, to be delivered again before anything
    /// else of its key.
    fn hand_back(&mut self, pending: Pending) {
        match self {
            GroupQueue::Unordered(queue) => queue.push_front(pending),
            GroupQueue::Keyed(keyed) => {
                let lane_id = pending.lane;
                let lane = keyed.lanes.entry(lane_id).or_default();
                lane.queue.push_front(pending);
                lane.busy = false;
                keyed.ready.push_front(lane_id);
            }
        }
    }

    /// A message of `lane_id` was acked or terminated: the lane's next message may go.
    fn finish(&mut self, lane_id: u64) {
        if let GroupQueue::Keyed(keyed) = self {
            if let Entry::Occupied(mut lane) = keyed.lanes.entry(lane_id) {
                lane.get_mut().busy = false;
                if lane.get().queue.is_empty() {
                    lane.remove();
                } else {
                    keyed.ready.push_back(lane_id);
                }
            }
        }
    }

    fn drain(&mut self) -> Vec<Pending> {
        match self {
            GroupQueue::Unordered(queue) => queue.drain(..).collect(),
            GroupQueue::Keyed(keyed) => {
                keyed.ready.clear();
                keyed
                    .lanes
                    .drain()
                    .flat_map(|(_, lane)| lane.queue)
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::future::Future;

    use super::*;

    const TEST_TIMEOUT: Duration = Duration::from_secs(20);

    async fn within<F: Future>(future: F) -> F::Output {
        match tokio::time::timeout(TEST_TIMEOUT, future).await {
            Ok(output) => output,
            Err(_) => panic!("test did not finish within {TEST_TIMEOUT:?}"),
        }
    }

    fn message(topic: &str, key: Option<&str>, payload: &str) -> OutboundMessage {
        OutboundMessage {
            topic: topic.to_owned(),
            key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
            headers: Vec::new(),
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            dedup_id: None,
        }
    }

    fn options(ordering: Ordering, max_in_flight: usize) -> SubscribeOptions {
        SubscribeOptions {
            ordering,
            max_in_flight,
            start: StartFrom::New,
        }
    }

    fn seq_of(delivery: &Delivery) -> u64 {
        match &delivery.message.origin {
            Origin::Memory { seq, .. } => *seq,
            other => panic!("not a memory origin: {other}"),
        }
    }

    async fn next(sub: &mut MemorySubscription) -> Delivery {
        match tokio::time::timeout(Duration::from_secs(5), sub.next()).await {
            Ok(Some(delivery)) => delivery,
            Ok(None) => panic!("subscription closed"),
            Err(_) => panic!("no delivery within 5s"),
        }
    }

    /// Asserts nothing is delivered within `wait`.
    async fn assert_idle(sub: &mut MemorySubscription, wait: Duration) {
        if let Ok(delivery) = tokio::time::timeout(wait, sub.next()).await {
            panic!("unexpected delivery: {delivery:?}");
        }
    }

    /// Small deterministic pseudo-random numbers (xorshift) for processing times.
    fn jitter(seed: u64) -> u64 {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }

    #[tokio::test]
    async fn publish_subscribe_ack_keeps_message_fields() {
        within(async {
            let bus = MemoryBus::default();
            let mut sub = bus
                .subscribe("orders", "g", options(Ordering::None, 8))
                .unwrap();
            assert_eq!(sub.retry_style(), RetryStyle::Redeliver);
            assert_eq!(Subscription::broker(&sub), BrokerKind::Memory);
            let publisher = bus.publisher();
            assert_eq!(publisher.broker(), BrokerKind::Memory);
            let mut first = message("orders", Some("k1"), "one");
            first.headers = vec![("ce-id".into(), "42".to_owned())];
            publisher.publish(first).await.unwrap();
            publisher
                .publish(message("orders", None, "two"))
                .await
                .unwrap();

            let d1 = next(&mut sub).await;
            assert_eq!(d1.message.topic, "orders");
            assert_eq!(d1.message.key.as_deref(), Some(&b"k1"[..]));
            assert_eq!(
                d1.message.headers,
                vec![("ce-id".to_owned(), "42".to_owned())]
            );
            assert_eq!(d1.message.payload.as_deref(), Some(&b"one"[..]));
            assert_eq!(
                d1.message.origin,
                Origin::Memory {
                    topic: "orders".to_owned(),
                    seq: 1
                }
            );
            assert_eq!(d1.message.delivery_count, 1);
            let d2 = next(&mut sub).await;
            assert_eq!(seq_of(&d2), 2);
            assert_eq!(d2.message.key, None);
            assert_eq!(sub.lag().await.unwrap(), 2);
            d1.ack().await.unwrap();
            d2.ack().await.unwrap();
            assert_eq!(sub.lag().await.unwrap(), 0);
            assert_idle(&mut sub, Duration::from_millis(50)).await;
        })
        .await;
    }

    #[tokio::test]
    async fn start_from_beginning_reads_retained_history_and_new_skips_it() {
        within(async {
            let bus = MemoryBus::default();
            for i in 0..3 {
                bus.publish(message("t", None, &i.to_string())).unwrap();
            }
            let mut from_start = bus
                .subscribe(
                    "t",
                    "old",
                    SubscribeOptions {
                        start: StartFrom::Beginning,
                        ..options(Ordering::None, 8)
                    },
                )
                .unwrap();
            let mut only_new = bus
                .subscribe("t", "new", options(Ordering::None, 8))
                .unwrap();
            bus.publish(message("t", None, "3")).unwrap();
            for expected in 1..=4 {
                let d = next(&mut from_start).await;
                assert_eq!(seq_of(&d), expected);
                d.ack().await.unwrap();
            }
            let d = next(&mut only_new).await;
            assert_eq!(seq_of(&d), 4);
            d.ack().await.unwrap();
            assert_idle(&mut only_new, Duration::from_millis(30)).await;
        })
        .await;
    }

    #[tokio::test]
    async fn two_groups_each_get_every_message() {
        within(async {
            let bus = MemoryBus::default();
            let mut a = bus.subscribe("t", "a", options(Ordering::Key, 4)).unwrap();
            let mut b = bus.subscribe("t", "b", options(Ordering::None, 4)).unwrap();
            for i in 0..20 {
                bus.publish(message("t", Some("k"), &i.to_string()))
                    .unwrap();
            }
            for sub in [&mut a, &mut b] {
                for expected in 1..=20 {
                    let d = next(sub).await;
                    assert_eq!(seq_of(&d), expected);
                    d.ack().await.unwrap();
                }
                assert_eq!(sub.lag().await.unwrap(), 0);
            }
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn subscribers_of_one_group_split_the_work_without_loss_or_duplicates() {
        const MESSAGES: u64 = 10_000;
        within(async {
            let bus = MemoryBus::default();
            let mut workers = Vec::new();
            let seen = Arc::new(Mutex::new(Vec::new()));
            for worker in 0..2 {
                let mut sub = bus
                    .subscribe("t", "g", options(Ordering::None, 16))
                    .unwrap();
                let seen = Arc::clone(&seen);
                workers.push(tokio::spawn(async move {
                    let mut count = 0_u64;
                    while let Some(d) = sub.next().await {
                        seen.lock().unwrap().push((worker, seq_of(&d)));
                        d.ack().await.unwrap();
                        count += 1;
                        // Give the other worker a chance on a busy runtime.
                        tokio::task::yield_now().await;
                        if seen.lock().unwrap().len() as u64 >= MESSAGES {
                            sub.close().await;
                        }
                    }
                    count
                }));
            }
            for i in 0..MESSAGES {
                bus.publish(message("t", None, &i.to_string())).unwrap();
                if i % 100 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            // Both workers stop once everything was seen; one may be waiting for a message
            // that never comes, so publish nothing more and close through the counter above.
            let deadline = Instant::now() + Duration::from_secs(15);
            while (seen.lock().unwrap().len() as u64) < MESSAGES {
                assert!(Instant::now() < deadline, "not all messages consumed");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // Wake an idle worker so it notices it should close.
            bus.publish(message("t", None, "wake")).unwrap();
            bus.publish(message("t", None, "wake")).unwrap();
            let mut counts = Vec::new();
            for worker in workers {
                counts.push(worker.await.unwrap());
            }
            let seen = seen.lock().unwrap();
            let seqs: HashSet<u64> = seen.iter().map(|(_, seq)| *seq).collect();
            assert_eq!(seqs.len(), seen.len(), "a message was delivered twice");
            for seq in 1..=MESSAGES {
                assert!(seqs.contains(&seq), "message {seq} was lost");
            }
            assert!(
                counts.iter().all(|&c| c > 0),
                "both subscribers should get work: {counts:?}"
            );
        })
        .await;
    }

    #[tokio::test]
    async fn retry_after_delays_redelivery_and_counts_it() {
        within(async {
            let bus = MemoryBus::default();
            let mut sub = bus.subscribe("t", "g", options(Ordering::None, 4)).unwrap();
            bus.publish(message("t", None, "x")).unwrap();
            let d = next(&mut sub).await;
            assert_eq!(d.message.delivery_count, 1);
            let delay = Duration::from_millis(80);
            let retried_at = std::time::Instant::now();
            d.retry_after(delay).await.unwrap();
            assert_eq!(sub.lag().await.unwrap(), 1);
            let again = next(&mut sub).await;
            assert!(
                retried_at.elapsed() >= delay,
                "redelivered after {:?}, before the {delay:?} delay",
                retried_at.elapsed()
            );
            assert_eq!(seq_of(&again), 1);
            assert_eq!(again.message.delivery_count, 2);
            again.retry_after(Duration::ZERO).await.unwrap();
            let third = next(&mut sub).await;
            assert_eq!(third.message.delivery_count, 3);
            third.ack().await.unwrap();
            assert_eq!(sub.lag().await.unwrap(), 0);
        })
        .await;
    }

    #[tokio::test]
    async fn dropped_delivery_is_redelivered_with_the_next_count_and_settled_ones_are_not() {
        within(async {
            let bus = MemoryBus::default();
            let mut sub = bus.subscribe("t", "g", options(Ordering::Key, 4)).unwrap();
            bus.publish(message("t", Some("k"), "x")).unwrap();
            bus.publish(message("t", Some("k"), "y")).unwrap();
            let d = next(&mut sub).await;
            assert_eq!(seq_of(&d), 1);
            drop(d);
            let again = next(&mut sub).await;
            assert_eq!(
                seq_of(&again),
                1,
                "the dropped message comes back before its key's next"
            );
            assert_eq!(again.message.delivery_count, 2);
            // An ack future dropped before it ran has not settled anything either.
            drop(again.ack());
            let third = next(&mut sub).await;
            assert_eq!(seq_of(&third), 1);
            assert_eq!(third.message.delivery_count, 3);
            third.ack().await.unwrap();
            let second = next(&mut sub).await;
            assert_eq!(seq_of(&second), 2);
            assert_eq!(second.message.delivery_count, 1);
            second.term().await.unwrap();
            assert_idle(&mut sub, Duration::from_millis(50)).await;
            assert_eq!(sub.lag().await.unwrap(), 0);
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn key_ordering_holds_under_random_processing_times_and_retries() {
        const KEYS: u64 = 8;
        const PER_KEY: u64 = 40;
        within(async {
            let bus = MemoryBus::default();
            let mut sub = bus.subscribe("t", "g", options(Ordering::Key, 6)).unwrap();
            for i in 0..KEYS * PER_KEY {
                let key = format!("k{}", i % KEYS);
                let mut m = message("t", None, &i.to_string());
                // Half the keys travel as broker keys, half as CloudEvents partition keys.
                if (i % KEYS).is_multiple_of(2) {
                    m.key = Some(Bytes::from(key));
                } else {
                    m.headers = vec![(PARTITION_KEY_HEADER.into(), key)];
                }
                bus.publish(m).unwrap();
            }
            // Per key: is a delivery of it out right now, every seq it saw, and the acked seqs.
            let busy = Arc::new(Mutex::new(HashMap::<String, bool>::new()));
            let seen = Arc::new(Mutex::new(HashMap::<String, Vec<u64>>::new()));
            let acked = Arc::new(Mutex::new(HashMap::<String, Vec<u64>>::new()));
            let mut tasks = Vec::new();
            let mut retries = 0;
            let mut total_acked = 0;
            while total_acked < KEYS * PER_KEY {
                let d = next(&mut sub).await;
                let seq = seq_of(&d);
                let key = format!("k{}", (seq - 1) % KEYS);
                {
                    let mut busy = busy.lock().unwrap();
                    let was_busy = busy.insert(key.clone(), true).unwrap_or(false);
                    assert!(!was_busy, "two deliveries of {key} out at once");
                }
                seen.lock()
                    .unwrap()
                    .entry(key.clone())
                    .or_default()
                    .push(seq);
                let retry = d.message.delivery_count == 1 && jitter(seq).is_multiple_of(4);
                if retry {
                    retries += 1;
                } else {
                    total_acked += 1;
                }
                let (busy, acked) = (Arc::clone(&busy), Arc::clone(&acked));
                tasks.push(tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_micros(jitter(seq + 7) % 3000)).await;
                    busy.lock().unwrap().insert(key.clone(), false);
                    if retry {
                        let delay = Duration::from_millis(jitter(seq + 3) % 5);
                        d.retry_after(delay).await.unwrap();
                    } else {
                        acked.lock().unwrap().entry(key).or_default().push(seq);
                        d.ack().await.unwrap();
                    }
                }));
            }
            for task in tasks {
                task.await.unwrap();
            }
            assert!(
                retries > 10,
                "the test should exercise retries, had {retries}"
            );
            assert_eq!(sub.lag().await.unwrap(), 0);
            let seen = seen.lock().unwrap();
            let acked = acked.lock().unwrap();
            for k in 0..KEYS {
                let key = format!("k{k}");
                let expected: Vec<u64> = (0..PER_KEY).map(|i| i * KEYS + k + 1).collect();
                assert_eq!(acked[&key], expected, "acks of {key} out of order");
                assert!(
                    seen[&key].windows(2).all(|w| w[0] <= w[1]),
                    "deliveries of {key} went backwards: {:?}",
                    seen[&key]
                );
            }
        })
        .await;
    }

    #[tokio::test]
    async fn a_key_waiting_on_a_retry_blocks_only_itself() {
        within(async {
            let bus = MemoryBus::default();
            let mut sub = bus.subscribe("t", "g", options(Ordering::Key, 4)).unwrap();
            bus.publish(message("t", Some("slow"), "s1")).unwrap();
            bus.publish(message("t", Some("slow"), "s2")).unwrap();
            for i in 0..30 {
                let key = ["a", "b", "c"][i % 3];
                bus.publish(message("t", Some(key), &i.to_string())).unwrap();
            }
            let slow = next(&mut sub).await;
            assert_eq!(slow.message.key.as_deref(), Some(&b"slow"[..]));
            let retry_delay = Duration::from_millis(300);
            let started = std::time::Instant::now();
            slow.retry_after(retry_delay).await.unwrap();
            let mut others_done_at = None;
            let mut slow_seen = Vec::new();
            let mut others = 0;
            while slow_seen.len() < 2 {
                let d = next(&mut sub).await;
                if d.message.key.as_deref() == Some(&b"slow"[..]) {
                    slow_seen.push((seq_of(&d), d.message.delivery_count, started.elapsed()));
                } else {
                    others += 1;
                    if others == 30 {
                        others_done_at = Some(started.elapsed());
                    }
                }
                d.ack().await.unwrap();
            }
            let others_done_at = others_done_at.unwrap();
            assert_eq!(slow_seen[0].0, 1);
            assert_eq!(slow_seen[0].1, 2);
            assert!(slow_seen[0].2 >= retry_delay);
            assert_eq!(slow_seen[1].0, 2, "the key's next message waits for the retry");
            assert!(
                others_done_at < retry_delay,
                "other keys finished after {others_done_at:?}, while the slow key waited {retry_delay:?}"
            );
        })
        .await;
    }

    #[tokio::test]
    async fn max_in_flight_bounds_outstanding_deliveries() {
        within(async {
            let bus = MemoryBus::default();
            let mut sub = bus.subscribe("t", "g", options(Ordering::None, 3)).unwrap();
            for i in 0..10 {
                bus.publish(message("t", None, &i.to_string())).unwrap();
            }
            let mut out = Vec::new();
            for _ in 0..3 {
                out.push(next(&mut sub).await);
            }
            assert_idle(&mut sub, Duration::from_millis(50)).await;
            out.remove(0).ack().await.unwrap();
            out.push(next(&mut sub).await);
            assert_idle(&mut sub, Duration::from_millis(30)).await;
            // A retry frees the slot too.
            out.remove(0)
                .retry_after(Duration::from_secs(60))
                .await
                .unwrap();
            out.push(next(&mut sub).await);
            assert_idle(&mut sub, Duration::from_millis(30)).await;
            assert_eq!(sub.lag().await.unwrap(), 9);

            // Under key ordering, one key is one at a time even with slots free.
            let mut keyed = bus.subscribe("k", "g", options(Ordering::Key, 8)).unwrap();
            bus.publish(message("k", Some("x"), "1")).unwrap();
            let first = next(&mut keyed).await;
            // Published while its key is out: it must wait all the same.
            bus.publish(message("k", Some("x"), "2")).unwrap();
            assert_idle(&mut keyed, Duration::from_millis(50)).await;
            first.ack().await.unwrap();
            assert_eq!(seq_of(&next(&mut keyed).await), 2);
        })
        .await;
    }

    #[tokio::test]
    async fn unkeyed_messages_share_one_lane_under_key_ordering() {
        within(async {
            let bus = MemoryBus::default();
            let mut sub = bus
                .subscribe("t", "g", options(Ordering::Partition, 8))
                .unwrap();
            bus.publish(message("t", None, "1")).unwrap();
            bus.publish(message("t", None, "2")).unwrap();
            let first = next(&mut sub).await;
            assert_idle(&mut sub, Duration::from_millis(50)).await;
            first.ack().await.unwrap();
            assert_eq!(seq_of(&next(&mut sub).await), 2);
        })
        .await;
    }

    #[tokio::test]
    async fn lag_counts_queued_in_flight_and_waiting_then_drops_to_zero() {
        within(async {
            let bus = MemoryBus::default();
            let mut sub = bus.subscribe("t", "g", options(Ordering::None, 8)).unwrap();
            assert_eq!(sub.lag().await.unwrap(), 0);
            for i in 0..5 {
                bus.publish(message("t", None, &i.to_string())).unwrap();
            }
            assert_eq!(sub.lag().await.unwrap(), 5);
            let a = next(&mut sub).await;
            let b = next(&mut sub).await;
            assert_eq!(sub.lag().await.unwrap(), 5, "in-flight messages are lag");
            a.retry_after(Duration::from_millis(10)).await.unwrap();
            assert_eq!(
                sub.lag().await.unwrap(),
                5,
                "messages waiting for a retry are lag"
            );
            assert_eq!(bus.depth("t", "g"), 5);
            assert_eq!(bus.depth("t", "nobody"), 0);
            assert_eq!(bus.depth("nowhere", "g"), 0);
            b.ack().await.unwrap();
            assert_eq!(sub.lag().await.unwrap(), 4);
            for _ in 0..4 {
                next(&mut sub).await.ack().await.unwrap();
            }
            assert_eq!(sub.lag().await.unwrap(), 0);
            assert_eq!(bus.depth("t", "g"), 0);
            let stats = bus.topics();
            assert_eq!(stats.len(), 1);
            assert_eq!(stats[0].groups[0].depth, 0);
            assert_eq!(stats[0].groups[0].subscriptions, 1);
        })
        .await;
    }

    #[tokio::test]
    async fn history_is_bounded_but_pending_messages_survive_eviction() {
        within(async {
            let bus = MemoryBus::new(MemoryBusConfig {
                history: 10,
                ..MemoryBusConfig::default()
            });
            let mut sub = bus.subscribe("t", "g", options(Ordering::Key, 4)).unwrap();
            for i in 0..100 {
                bus.publish(message("t", Some("k"), &i.to_string()))
                    .unwrap();
            }
            let newest: Vec<u64> = bus.history("t", None, 1000).iter().map(|m| m.seq).collect();
            assert_eq!(newest, (91..=100).collect::<Vec<_>>());
            let last3: Vec<u64> = bus.history("t", None, 3).iter().map(|m| m.seq).collect();
            assert_eq!(last3, vec![98, 99, 100]);
            let from: Vec<u64> = bus
                .history("t", Some(95), 3)
                .iter()
                .map(|m| m.seq)
                .collect();
            assert_eq!(from, vec![95, 96, 97]);
            let evicted: Vec<u64> = bus.history("t", Some(1), 2).iter().map(|m| m.seq).collect();
            assert_eq!(
                evicted,
                vec![91, 92],
                "an evicted start begins at the oldest retained"
            );
            assert!(bus.history("t", Some(101), 5).is_empty());
            assert!(bus.history("none", None, 5).is_empty());
            let stats = bus.topics();
            assert_eq!((stats[0].last_seq, stats[0].retained), (100, 10));
            for expected in 1..=100 {
                let d = next(&mut sub).await;
                assert_eq!(seq_of(&d), expected);
                assert_eq!(
                    d.message.payload.as_deref(),
                    Some((expected - 1).to_string().as_bytes())
                );
                d.ack().await.unwrap();
            }
        })
        .await;
    }

    #[tokio::test]
    async fn watch_and_tail_follow_new_messages() {
        within(async {
            let bus = MemoryBus::default();
            bus.publish(message("t", None, "old")).unwrap();
            let (past, mut follow) = bus.tail("t", 10);
            assert_eq!(past.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![1]);
            let mut watcher = bus.watch("t");
            bus.publish(message("t", None, "new")).unwrap();
            assert_eq!(follow.recv().await.unwrap().seq, 2);
            let got = watcher.recv().await.unwrap();
            assert_eq!((got.seq, &got.payload[..]), (2, &b"new"[..]));
        })
        .await;
    }

    #[tokio::test]
    async fn full_backlog_rejects_publish_with_the_group_named() {
        within(async {
            let bus = MemoryBus::new(MemoryBusConfig {
                max_pending: 5,
                ..MemoryBusConfig::default()
            });
            // Without groups there is no backlog to bound.
            for i in 0..20 {
                bus.publish(message("t", None, &i.to_string())).unwrap();
            }
            let mut sub = bus
                .subscribe("t", "slowpoke", options(Ordering::None, 4))
                .unwrap();
            for i in 0..5 {
                bus.publish(message("t", None, &i.to_string())).unwrap();
            }
            let err = bus
                .publisher()
                .publish(message("t", None, "over"))
                .await
                .unwrap_err();
            match &err {
                TransportError::Publish { topic, reason } => {
                    assert_eq!(topic, "t");
                    assert!(
                        reason.contains("memory bus backlog full for group slowpoke"),
                        "{reason}"
                    );
                }
                other => panic!("unexpected error {other:?}"),
            }
            assert_eq!(
                bus.topics()[0].last_seq,
                25,
                "a rejected message is not appended"
            );
            next(&mut sub).await.ack().await.unwrap();
            bus.publish(message("t", None, "fits")).unwrap();
            assert_eq!(bus.depth("t", "slowpoke"), 5);
        })
        .await;
    }

    #[tokio::test]
    async fn duplicate_dedup_ids_are_appended_once() {
        within(async {
            let bus = MemoryBus::default();
            let mut sub = bus.subscribe("t", "g", options(Ordering::None, 4)).unwrap();
            let mut m = message("t", None, "x");
            m.dedup_id = Some("out-1".to_owned());
            assert_eq!(bus.publish(m.clone()).unwrap(), 1);
            assert_eq!(bus.publish(m.clone()).unwrap(), 1);
            assert_eq!(
                bus.publisher().publish(m).await.unwrap(),
                Published::Duplicate,
                "a publisher says the bus already held it"
            );
            assert_eq!(bus.depth("t", "g"), 1);
            next(&mut sub).await.ack().await.unwrap();
            assert_idle(&mut sub, Duration::from_millis(30)).await;
        })
        .await;
    }

    #[tokio::test]
    async fn close_stops_the_subscription_and_hands_back_unsettled_deliveries() {
        within(async {
            let bus = MemoryBus::default();
            let mut a = bus.subscribe("t", "g", options(Ordering::None, 8)).unwrap();
            for i in 0..4 {
                bus.publish(message("t", None, &i.to_string())).unwrap();
            }
            let d1 = next(&mut a).await;
            let d2 = next(&mut a).await;
            let d3 = next(&mut a).await;
            a.close().await;
            assert!(a.next().await.is_none());
            assert_eq!(bus.topics()[0].groups[0].subscriptions, 0);
            // Settling after close still works.
            d1.ack().await.unwrap();
            let mut b = bus.subscribe("t", "g", options(Ordering::None, 8)).unwrap();
            let fourth = next(&mut b).await;
            assert_eq!(seq_of(&fourth), 4);
            fourth.ack().await.unwrap();
            drop(d2);
            drop(d3);
            let mut back = [next(&mut b).await, next(&mut b).await];
            back.sort_by_key(seq_of);
            assert_eq!(back.iter().map(seq_of).collect::<Vec<_>>(), vec![2, 3]);
            assert!(back.iter().all(|d| d.message.delivery_count == 2));
            assert_idle(&mut b, Duration::from_millis(30)).await;
        })
        .await;
    }

    #[tokio::test]
    async fn ordering_of_a_busy_group_cannot_change_but_an_idle_one_can() {
        within(async {
            let bus = MemoryBus::default();
            let keyed = bus.subscribe("t", "g", options(Ordering::Key, 4)).unwrap();
            // Partition is the same as key here.
            let same = bus
                .subscribe("t", "g", options(Ordering::Partition, 4))
                .unwrap();
            let err = bus
                .subscribe("t", "g", options(Ordering::None, 4))
                .unwrap_err();
            assert!(matches!(err, TransportError::Subscribe { .. }), "{err}");
            drop((keyed, same));
            bus.publish(message("t", Some("x"), "1")).unwrap();
            bus.publish(message("t", Some("x"), "2")).unwrap();
            let mut unordered = bus.subscribe("t", "g", options(Ordering::None, 4)).unwrap();
            let d1 = next(&mut unordered).await;
            let d2 = next(&mut unordered).await;
            assert_eq!(
                (seq_of(&d1), seq_of(&d2)),
                (1, 2),
                "both out at once, in order"
            );
        })
        .await;
    }
}
