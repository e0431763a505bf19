//! The per-function delivery loop: the delivery contract of DESIGN.md in code.
//!
//! For each delivery: decode → (hop limit, max age) → invoke on an instance → check and stamp
//! outputs → publish them, each confirmed → ack. A `reject`, an undecodable input, a hop-limit
//! breach or an expired event go to the dead-letter queue at once; other failures are retried
//! under the function's [`RetryPolicy`] (by redelivery or in place, as the transport says) and
//! dead-lettered when attempts run out. The source message is acknowledged only after the
//! outputs or the dead-letter record were confirmed. When the DLQ cannot be written the
//! delivery is held (its lane pauses, a gauge says so) until it can, or until shutdown hands
//! the delivery back unsettled.
//!
//! It does not know any broker's API (only the transport vocabulary) nor wasmtime's (only the
//! [`crate::pool`] and [`crate::engine`] call surface).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt as _};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use weir_broker_bridge::{
    BrokerKind, Delivery, OutboundMessage, Publisher, RetryStyle, Subscription, TransportError,
};
use weir_schemas::{ext, Event, Format, HeaderStyle, WireMessage};

use crate::chain::{self, OutputRules};
use crate::deadletter::{self, DeadLetter, DeadLetterReason, RawInput};
use crate::engine::{self, InvocationError, WitDelivery};
use crate::pool::{InstancePool, Slot};
use crate::redrive::Redrive;
use crate::retry::RetryPolicy;
use crate::telemetry;

/// Everything the loop needs to know about one function.
#[derive(Debug, Clone)]
pub struct FunctionSpec {
    pub name: Arc<str>,
    pub trigger_broker: BrokerKind,
    pub trigger_topic: String,
    pub format: Format,
    pub retry: RetryPolicy,
    pub rules: OutputRules,
    pub hop_limit: u32,
    pub dead_letter_topic: String,
    /// Bound on how long shutdown waits for in-flight invocations.
    pub shutdown_grace: Duration,
}

/// Counters behind `GET /v1/functions` and the status page.
#[derive(Debug, Default)]
pub struct FunctionCounters {
    pub received: AtomicU64,
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub outputs: AtomicU64,
    pub dlq_paused: AtomicBool,
}

/// The most recent failures, for the admin API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecentFailure {
    pub at: String,
    pub event_id: String,
    pub outcome: &'static str,
    pub error: String,
}

const RECENT_FAILURES: usize = 20;
/// First-failure times are remembered for this many messages awaiting redelivery.
const FIRST_FAILURES: usize = 100_000;

/// One function at run time.
pub struct FunctionRunner {
    pub spec: FunctionSpec,
    pub pool: Arc<InstancePool>,
    outputs: Arc<dyn Publisher>,
    dead_letters: Arc<dyn Publisher>,
    pub counters: FunctionCounters,
    metrics: telemetry::FunctionMetrics,
    /// `source` for trigger messages that carry none, made once: every message on a trigger
    /// without wildcards has the same.
    trigger_default_source: String,
    recent: Mutex<Vec<RecentFailure>>,
    /// origin → first failure time, for redelivered messages (best effort: a restart forgets).
    first_failures: Mutex<HashMap<String, String>>,
}

impl std::fmt::Debug for FunctionRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FunctionRunner")
            .field("function", &self.spec.name)
            .finish_non_exhaustive()
    }
}

/// How one event fared.
enum EventOutcome {
    Done,
    Failed(InvocationError),
}

/// The DLQ could not be written before shutdown: hand the delivery back unsettled.
struct HandBack;

/// Where we are in handling one delivery, for logs and DLQ records.
struct DeliveryContext<'a> {
    origin: &'a str,
    broker: BrokerKind,
    topic: &'a str,
    key: Option<String>,
    /// The dead-letter position a redriven message was sent back from.
    redriven_from: Option<&'a str>,
}

impl FunctionRunner {
    pub fn new(
        spec: FunctionSpec,
        pool: Arc<InstancePool>,
        outputs: Arc<dyn Publisher>,
        dead_letters: Arc<dyn Publisher>,
    ) -> Self {
        let metrics = telemetry::FunctionMetrics::new(&spec.name, spec.trigger_broker.as_str());
        let trigger_default_source =
            weir_schemas::wire::default_source(spec.trigger_broker.as_str(), &spec.trigger_topic);
        Self {
            trigger_default_source,
            spec,
            pool,
            outputs,
            dead_letters,
            counters: FunctionCounters::default(),
            metrics,
            recent: Mutex::new(Vec::new()),
            first_failures: Mutex::new(HashMap::new()),
        }
    }

    pub fn recent_failures(&self) -> Vec<RecentFailure> {
        lock(&self.recent).clone()
    }

    /// Consume until `shutdown`; then stop fetching, let in-flight work finish (bounded by the
    /// shutdown grace) and return. Work still unfinished is dropped unsettled, which hands it
    /// back to the broker for redelivery.
    ///
    /// Deliveries are handled in *batch tasks*. When a delivery comes, the runner takes it and
    /// whatever else is ready (up to `batch_limit`, each with a free slot) and spawns a task
    /// that runs them concurrently. When one of them is settled, the task keeps its slot and
    /// takes the next ready delivery itself, if any, for up to `BATCH_TASK_DELIVERIES`; then
    /// it ends. Under load that replaces a spawn and a scheduler hop per delivery with a loop,
    /// and lets the connection's writer send many outputs and acks in one write (it runs when
    /// the task yields) instead of one write each; an idle trigger still gets each delivery
    /// handled at once. A guest yields every epoch tick, so a slow delivery never holds up its
    /// batch-mates (their heartbeats included) for longer than a tick.
    pub async fn run(
        self: Arc<Self>,
        subscription: Box<dyn Subscription>,
        shutdown: CancellationToken,
    ) {
        let batch = Batching {
            style: subscription.retry_style(),
            progress: subscription.progress_interval(),
            limit: batch_limit(self.pool.settings().max),
            subscription: Arc::new(tokio::sync::Mutex::new(subscription)),
            shutdown,
        };
        let mut tasks = JoinSet::new();
        loop {
            let slot = tokio::select! {
                slot = self.pool.acquire() => match slot { Some(slot) => slot, None => break },
                () = batch.shutdown.cancelled() => break,
            };
            let mut subscription = batch.subscription.lock().await;
            let delivery = tokio::select! {
                delivery = subscription.next() => match delivery { Some(d) => d, None => break },
                () = batch.shutdown.cancelled() => break,
            };
            let mut first = vec![(slot, delivery)];
            while first.len() < batch.limit {
                let Some(slot) = self.pool.try_acquire() else {
                    break;
                };
                let Some(delivery) = subscription.try_next() else {
                    break;
                };
                first.push((slot, delivery));
            }
            drop(subscription);
            tasks.spawn(self.clone().run_batch(first, batch.clone()));
            while let Some(finished) = tasks.try_join_next() {
                log_task_end(&self.spec.name, finished);
            }
        }
        // Batch tasks hold the subscription only for a `try_next`, never across an await.
        batch.subscription.lock().await.close().await;
        let drained = tokio::time::timeout(self.spec.shutdown_grace, async {
            while let Some(finished) = tasks.join_next().await {
                log_task_end(&self.spec.name, finished);
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(function = %self.spec.name, in_flight = tasks.len(), "shutdown grace elapsed; handing unfinished deliveries back");
            tasks.abort_all();
        }
    }

    /// One batch task: runs `first` concurrently; each settled delivery's slot goes to the next
    /// ready delivery while there is one (and the task's budget lasts), else back to the pool.
    async fn run_batch(self: Arc<Self>, first: Vec<(Slot, Delivery)>, batch: Batching) {
        let one = |slot: Slot, delivery: Delivery| {
            // Debug level: at the default `info` a span per event would cost more than the rest
            // of a warm invocation's bookkeeping; every log line below names its function.
            let span = tracing::debug_span!(
                "invocation",
                function = %self.spec.name,
                "messaging.system" = delivery.message.origin_system(),
                outcome = tracing::field::Empty,
            );
            let runner = &self;
            let batch = &batch;
            async move {
                runner
                    .process(delivery, batch.style, batch.progress, &batch.shutdown)
                    .await;
                slot
            }
            .instrument(span)
        };
        let mut taken = first.len();
        let mut running: FuturesUnordered<_> = first
            .into_iter()
            .map(|(slot, delivery)| one(slot, delivery))
            .collect();
        while let Some(slot) = running.next().await {
            if taken >= BATCH_TASK_DELIVERIES
                || batch.shutdown.is_cancelled()
                || !self.pool.slot_still_wanted()
            {
                continue;
            }
            // Not waiting: when the runner holds the subscription it is waiting for a delivery
            // itself, so none is ready.
            let next = batch
                .subscription
                .try_lock()
                .ok()
                .and_then(|mut subscription| subscription.try_next());
            if let Some(delivery) = next {
                taken += 1;
                running.push(one(slot, delivery));
            }
        }
    }

    async fn process(
        &self,
        delivery: Delivery,
        style: RetryStyle,
        progress: Option<Duration>,
        shutdown: &CancellationToken,
    ) {
        // JetStream redelivers a message whose ack deadline passes; keep telling it we are
        // still on it so a slow function never runs twice at once for one event.
        let settlement = {
            let work = self.handle(&delivery, style, shutdown);
            tokio::pin!(work);
            // Most deliveries are done on their first poll: they never make a heartbeat timer.
            match futures::poll!(&mut work) {
                std::task::Poll::Ready(settlement) => settlement,
                std::task::Poll::Pending => match progress {
                    None => work.await,
                    Some(every) => {
                        // The first heartbeat is due one period from now. (Not `interval()` plus an
                        // awaited first tick: that tick waits for the timer wheel, about 1 ms.)
                        let mut ticker =
                            tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                        loop {
                            tokio::select! {
                                biased;
                                settlement = &mut work => break settlement,
                                _ = ticker.tick() => {
                                    if let Err(e) = delivery.in_progress().await {
                                        tracing::warn!(function = %self.spec.name, error = %e, "could not extend the ack deadline");
                                    }
                                }
                            }
                        }
                    }
                },
            }
        };
        let result = match settlement {
            Settlement::Ack => delivery.ack().await,
            Settlement::Term => delivery.term().await,
            Settlement::RetryAfter(delay) => delivery.retry_after(delay).await,
            Settlement::HandBack => {
                drop(delivery);
                Ok(())
            }
        };
        if let Err(e) = result {
            // The broker will redeliver: at-least-once, never lost. Transport errors name the
            // message they were about.
            tracing::warn!(function = %self.spec.name, error = %e, "settling failed; the message will be redelivered");
        }
    }

    async fn handle(
        &self,
        delivery: &Delivery,
        style: RetryStyle,
        shutdown: &CancellationToken,
    ) -> Settlement {
        let message = &delivery.message;
        let headers = message.headers.view();
        let redrive = Redrive::of(&headers);
        if let Some(other) = redrive.for_function.filter(|f| *f != &*self.spec.name) {
            // Sent back to the function that failed it; the others on this topic had it, so
            // for them it is not an event received (the counters would not add up).
            telemetry::redrive_passed_over(&self.spec.name);
            tracing::debug!(function = %self.spec.name, origin = %message.origin, redriven_for = other, "a redriven message for another function; acknowledged without running");
            return Settlement::Ack;
        }
        let broker = message.origin_broker();
        self.metrics.event_received();
        self.counters.received.fetch_add(1, AtomicOrdering::Relaxed);
        let origin = message.origin.to_string();
        let default_source =
            if broker == self.spec.trigger_broker && message.topic == self.spec.trigger_topic {
                std::borrow::Cow::Borrowed(self.trigger_default_source.as_str())
            } else {
                std::borrow::Cow::Owned(weir_schemas::wire::default_source(
                    broker.as_str(),
                    &message.topic,
                ))
            };
        let wire = WireMessage {
            headers: &headers,
            payload: message.payload.as_deref(),
            key: message.key.as_deref(),
            origin: &origin,
            default_source: &default_source,
        };
        let ctx = DeliveryContext {
            redriven_from: redrive.from,
            origin: &origin,
            broker,
            topic: &message.topic,
            key: message
                .key
                .as_ref()
                .map(|k| String::from_utf8_lossy(k).into_owned()),
        };
        let mut pending = match weir_schemas::decode(&wire, self.spec.format) {
            Ok(events) => events,
            Err(e) => {
                telemetry::undecodable(&self.spec.name, e.kind());
                let now = now_rfc3339();
                let letter = self.letter(
                    DeadLetterReason::Undecodable,
                    e.to_string(),
                    message.delivery_count.max(1),
                    &ctx,
                    now.clone(),
                    now,
                );
                let raw = RawInput {
                    payload: message.payload.as_deref(),
                    content_type: weir_schemas::cloudevents::header(
                        &headers,
                        weir_schemas::cloudevents::CONTENT_TYPE_HEADER,
                    ),
                    default_source: &default_source,
                };
                return match self
                    .dead_letter(
                        letter.record_raw(&raw),
                        DeadLetterReason::Undecodable,
                        shutdown,
                    )
                    .await
                {
                    Ok(()) => Settlement::Term,
                    Err(HandBack) => Settlement::HandBack,
                };
            }
        };
        let mut attempt = message.delivery_count.max(1);
        loop {
            let mut failed = Vec::new();
            let mut last_error = None;
            for mut event in pending {
                match self.handle_event(&mut event, &ctx, attempt, shutdown).await {
                    Ok(EventOutcome::Done) => {}
                    Ok(EventOutcome::Failed(e)) => {
                        failed.push(event);
                        last_error = Some(e);
                    }
                    Err(HandBack) => return Settlement::HandBack,
                }
            }
            let Some(error) = last_error else {
                // Only a message that failed before can have an entry (a lock and a hash
                // lookup per event otherwise).
                if attempt > 1 {
                    lock(&self.first_failures).remove(&origin);
                }
                return Settlement::Ack;
            };
            let first_failure = self.first_failure(&origin);
            if self.spec.retry.may_retry(attempt) {
                let delay = self.spec.retry.delay_after(attempt);
                telemetry::retry_scheduled(&self.spec.name, broker.as_str());
                self.counters.retried.fetch_add(1, AtomicOrdering::Relaxed);
                tracing::debug!(function = %self.spec.name, attempt, delay = ?delay, error = %error, "retrying");
                match style {
                    RetryStyle::Redeliver => return Settlement::RetryAfter(delay),
                    RetryStyle::InPlace => {
                        tokio::select! {
                            () = tokio::time::sleep(delay) => {}
                            () = shutdown.cancelled() => return Settlement::HandBack,
                        }
                        attempt += 1;
                        pending = failed;
                        continue;
                    }
                }
            }
            let reason = match &error {
                InvocationError::Timeout(_) => DeadLetterReason::Timeout,
                InvocationError::Trap(_) | InvocationError::MemoryLimit(_) => {
                    DeadLetterReason::Trap
                }
                _ => DeadLetterReason::RetriesExhausted,
            };
            for event in failed {
                let letter = self.letter(
                    reason,
                    error.to_string(),
                    attempt,
                    &ctx,
                    first_failure.clone(),
                    now_rfc3339(),
                );
                if self
                    .dead_letter(letter.record(&event), reason, shutdown)
                    .await
                    .is_err()
                {
                    return Settlement::HandBack;
                }
            }
            lock(&self.first_failures).remove(&origin);
            return Settlement::Term;
        }
    }

    /// Run one event through the function; dead-letter it when it must not be run or was
    /// rejected. `Err(HandBack)` only when the DLQ stayed unwritable until shutdown.
    async fn handle_event(
        &self,
        event: &mut Event,
        ctx: &DeliveryContext<'_>,
        attempt: u32,
        shutdown: &CancellationToken,
    ) -> Result<EventOutcome, HandBack> {
        let hops = chain::hops(event);
        if hops >= self.spec.hop_limit {
            let error = format!(
                "event has travelled {hops} hops; the limit is {}",
                self.spec.hop_limit
            );
            let now = now_rfc3339();
            let letter = self.letter(
                DeadLetterReason::HopLimit,
                error,
                attempt,
                ctx,
                now.clone(),
                now,
            );
            self.dead_letter(letter.record(event), DeadLetterReason::HopLimit, shutdown)
                .await?;
            return Ok(EventOutcome::Done);
        }
        if let Some(age) = self.expired(event) {
            let error = format!(
                "event is {} old; max age is {}",
                humantime::format_duration(age),
                humantime::format_duration(self.spec.retry.max_age.unwrap_or_default())
            );
            let now = now_rfc3339();
            let letter = self.letter(
                DeadLetterReason::Expired,
                error,
                attempt,
                ctx,
                now.clone(),
                now,
            );
            self.dead_letter(letter.record(event), DeadLetterReason::Expired, shutdown)
                .await?;
            return Ok(EventOutcome::Done);
        }

        let started = std::time::Instant::now();
        let outcome = self.invoke(event, ctx, attempt).await;
        let label = match &outcome {
            Ok(_) => {
                self.metrics.invocation_succeeded(started.elapsed());
                "success"
            }
            Err(e) => {
                telemetry::invocation_finished(&self.spec.name, e.outcome(), started.elapsed());
                e.outcome()
            }
        };
        tracing::Span::current().record("outcome", label);
        match outcome {
            Ok(outputs) => match self.publish_outputs(outputs).await {
                Ok(()) => {
                    self.counters
                        .succeeded
                        .fetch_add(1, AtomicOrdering::Relaxed);
                    Ok(EventOutcome::Done)
                }
                Err(e) => {
                    let outcome = match &e {
                        InvocationError::OutputRule(_) => e.outcome(),
                        _ => "publish",
                    };
                    self.note_failure(event, outcome, &e.to_string());
                    self.remember_first_failure(ctx.origin);
                    Ok(EventOutcome::Failed(e))
                }
            },
            Err(InvocationError::Reject(reason)) => {
                self.counters.failed.fetch_add(1, AtomicOrdering::Relaxed);
                self.note_failure(event, "reject", &reason);
                let now = now_rfc3339();
                let first = self.first_failure(ctx.origin);
                let letter =
                    self.letter(DeadLetterReason::Rejected, reason, attempt, ctx, first, now);
                self.dead_letter(letter.record(event), DeadLetterReason::Rejected, shutdown)
                    .await?;
                Ok(EventOutcome::Done)
            }
            Err(e) => {
                self.counters.failed.fetch_add(1, AtomicOrdering::Relaxed);
                self.note_failure(event, e.outcome(), &e.to_string());
                self.remember_first_failure(ctx.origin);
                tracing::info!(function = %self.spec.name, event = %event.id, attempt, error = %e, "invocation failed");
                Ok(EventOutcome::Failed(e))
            }
        }
    }

    async fn invoke(
        &self,
        event: &mut Event,
        ctx: &DeliveryContext<'_>,
        attempt: u32,
    ) -> Result<Vec<chain::ChainedOutput>, InvocationError> {
        let mut instance = self.pool.checkout().await?;
        let key = ctx
            .key
            .clone()
            .or_else(|| event.extension(ext::PARTITION_KEY).map(str::to_owned));
        let delivery = WitDelivery {
            broker: engine::to_wit_broker(ctx.broker),
            topic: ctx.topic.to_owned(),
            key,
            attempt,
        };
        // The event's fields move into the guest's type for the call and back after it: no
        // copy of the event per invocation.
        let wit_event = engine::take_wit_event(event);
        let result = instance.handle(&wit_event, &delivery).await;
        engine::restore_event(event, wit_event);
        let checked = result.and_then(|outputs| {
            chain::check_outputs(
                &self.spec.rules,
                outputs
                    .iter()
                    .map(|o| (o.topic.as_str(), o.event.data.as_ref().map_or(0, Vec::len))),
            )
            .map_err(InvocationError::OutputRule)?;
            Ok(outputs)
        });
        self.pool.checkin(instance, checked.as_ref().map(|_| ()));
        let outputs = checked?;
        if outputs.is_empty() {
            return Ok(Vec::new());
        }
        let outputs = outputs
            .into_iter()
            .map(|o| (o.topic, o.key, engine::from_wit_event(o.event)))
            .collect();
        Ok(chain::chain_outputs(
            &self.spec.name,
            event,
            outputs,
            &now_rfc3339(),
        ))
    }

    /// Publish every output, each confirmed by its broker. The ids are deterministic, so a
    /// retry after a partial failure republishes the same events (de-duplicated where the broker
    /// can). An output larger than its broker takes is refused like one over
    /// `max_output_bytes` (an [`InvocationError::OutputRule`]); any other failure is the
    /// broker's, and retried.
    async fn publish_outputs(
        &self,
        outputs: Vec<chain::ChainedOutput>,
    ) -> Result<(), InvocationError> {
        let count = outputs.len() as u64;
        let style = header_style(self.outputs.broker());
        for output in outputs {
            let (headers, payload) = weir_schemas::encode_binary(&output.event, style);
            let message = OutboundMessage {
                topic: output.topic.clone(),
                key: Some(Bytes::from(output.key.into_bytes())),
                headers,
                payload: Bytes::from(payload),
                dedup_id: Some(output.event.id.clone()),
            };
            // A duplicate is success: this output was stored by an earlier run of the input.
            if let Err(e) = self.outputs.publish(message).await {
                telemetry::output_publish_failed(&self.spec.name);
                return Err(match e {
                    TransportError::TooLarge { reason, .. } => {
                        InvocationError::OutputRule(format!(
                            "the output to {} is too large for its broker: {reason}",
                            output.topic
                        ))
                    }
                    e => InvocationError::Retry(format!(
                        "publishing output to {}: {e}",
                        output.topic
                    )),
                });
            }
        }
        if count > 0 {
            self.metrics.outputs_published(count);
            self.counters
                .outputs
                .fetch_add(count, AtomicOrdering::Relaxed);
        }
        Ok(())
    }

    /// Write a dead-letter record, holding the lane until the DLQ confirms it.
    ///
    /// Boxed: the DLQ is the cold path, and inlined its state would grow every delivery's
    /// future (which each spawn copies) by its size.
    fn dead_letter<'a>(
        &'a self,
        record: Event,
        reason: DeadLetterReason,
        shutdown: &'a CancellationToken,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), HandBack>> + Send + 'a>>
    {
        Box::pin(self.write_dead_letter(record, reason, shutdown))
    }

    async fn write_dead_letter(
        &self,
        mut record: Event,
        reason: DeadLetterReason,
        shutdown: &CancellationToken,
    ) -> Result<(), HandBack> {
        let mut message = self.dead_letter_message(&record);
        let mut wait = Duration::from_millis(50);
        let mut paused = false;
        loop {
            match self.dead_letters.publish(message.clone()).await {
                // A duplicate is this record, kept by an earlier attempt of this event.
                Ok(_) => break,
                Err(e) => {
                    telemetry::dead_letter_publish_failed(&self.spec.name);
                    // Holding the lane for a record that can never fit would stop the function
                    // for good on one event; a record without the data still says what failed
                    // and where the original is.
                    if let TransportError::TooLarge { reason, .. } = &e {
                        if let Some(dropped) = deadletter::shrink(&mut record) {
                            telemetry::dead_letter_shrunk(&self.spec.name, dropped);
                            tracing::warn!(function = %self.spec.name, event = %record.id, topic = %self.spec.dead_letter_topic, dropped, error = %reason, "dead-letter record too large for its broker; writing it without the original's {dropped}");
                            message = self.dead_letter_message(&record);
                            continue;
                        }
                    }
                    if !paused {
                        paused = true;
                        self.counters
                            .dlq_paused
                            .store(true, AtomicOrdering::Relaxed);
                        telemetry::lane_paused(&self.spec.name, true);
                        tracing::error!(function = %self.spec.name, topic = %self.spec.dead_letter_topic, error = %e, "dead-letter queue unavailable; pausing this lane until it recovers");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = shutdown.cancelled() => return Err(HandBack),
                    }
                    wait = (wait * 2).min(Duration::from_secs(2));
                }
            }
        }
        if paused {
            self.counters
                .dlq_paused
                .store(false, AtomicOrdering::Relaxed);
            telemetry::lane_paused(&self.spec.name, false);
            tracing::info!(function = %self.spec.name, "dead-letter queue recovered; lane resumed");
        }
        telemetry::dead_lettered(&self.spec.name, reason.as_str());
        self.counters
            .dead_lettered
            .fetch_add(1, AtomicOrdering::Relaxed);
        tracing::warn!(function = %self.spec.name, event = %record.id, reason = reason.as_str(), "event dead-lettered");
        Ok(())
    }

    /// A dead-letter record as its broker takes it. Its de-duplication id depends on the
    /// original's source and id only, so a record cut down by [`deadletter::shrink`] keeps it.
    fn dead_letter_message(&self, record: &Event) -> OutboundMessage {
        let style = header_style(self.dead_letters.broker());
        let (headers, payload) = weir_schemas::encode_binary(record, style);
        OutboundMessage {
            topic: self.spec.dead_letter_topic.clone(),
            key: Some(Bytes::from(record.id.clone().into_bytes())),
            headers,
            payload: Bytes::from(payload),
            dedup_id: Some(deadletter::dedup_id(&self.spec.name, record)),
        }
    }

    fn letter(
        &self,
        reason: DeadLetterReason,
        error: String,
        attempts: u32,
        ctx: &DeliveryContext<'_>,
        first_failure: String,
        last_failure: String,
    ) -> DeadLetter {
        DeadLetter {
            reason,
            error,
            attempts,
            function: self.spec.name.to_string(),
            module: self.pool.module().sha256().to_owned(),
            origin: ctx.origin.to_owned(),
            topic: ctx.topic.to_owned(),
            redriven_from: ctx.redriven_from.map(str::to_owned),
            first_failure,
            last_failure,
        }
    }

    fn expired(&self, event: &Event) -> Option<Duration> {
        let max_age = self.spec.retry.max_age?;
        let time = humantime::parse_rfc3339_weak(event.time.as_deref()?).ok()?;
        let age = SystemTime::now().duration_since(time).ok()?;
        (age > max_age).then_some(age)
    }

    fn remember_first_failure(&self, origin: &str) {
        let mut map = lock(&self.first_failures);
        if map.len() >= FIRST_FAILURES {
            // Bounded memory beats perfect timestamps: a forgotten entry only means the DLQ
            // record's first-failure time becomes the time of a later failure.
            map.clear();
        }
        map.entry(origin.to_owned()).or_insert_with(now_rfc3339);
    }

    fn first_failure(&self, origin: &str) -> String {
        lock(&self.first_failures)
            .get(origin)
            .cloned()
            .unwrap_or_else(now_rfc3339)
    }

    fn note_failure(&self, event: &Event, outcome: &'static str, error: &str) {
        let mut recent = lock(&self.recent);
        if recent.len() >= RECENT_FAILURES {
            recent.remove(0);
        }
        recent.push(RecentFailure {
            at: now_rfc3339(),
            event_id: event.id.clone(),
            outcome,
            error: error.chars().take(300).collect(),
        });
    }
}

/// What the batch tasks of one runner share.
#[derive(Clone)]
struct Batching {
    style: RetryStyle,
    progress: Option<Duration>,
    limit: usize,
    subscription: Arc<tokio::sync::Mutex<Box<dyn Subscription>>>,
    shutdown: CancellationToken,
}

/// How many deliveries one batch task handles before it ends (and so yields its thread to the
/// connection's writer, which then sends their outputs and acks together). Bounds how long an
/// output or ack can wait in the connection's queue under load: at a few microseconds per
/// delivery, well under a millisecond.
const BATCH_TASK_DELIVERIES: usize = 64;

/// Most deliveries one task handles together: enough that every runtime worker thread still
/// gets a batch of its own when all of a function's slots are busy (a batch runs on one thread
/// at a time), and at most 64.
fn batch_limit(max_slots: usize) -> usize {
    let threads = tokio::runtime::Handle::try_current()
        .map(|runtime| runtime.metrics().num_workers())
        .unwrap_or(1)
        .max(1);
    (max_slots / threads).clamp(1, 64)
}

/// What to do with a delivery once handled.
enum Settlement {
    Ack,
    Term,
    RetryAfter(Duration),
    HandBack,
}

fn log_task_end(function: &str, finished: Result<(), tokio::task::JoinError>) {
    if let Err(e) = finished {
        if e.is_panic() {
            // A bug in Weir, not in the guest; the delivery was dropped unsettled and so will be
            // redelivered.
            tracing::error!(function, error = %e, "invocation task panicked");
        }
    }
}

/// The header convention of a broker's CloudEvents binary mode.
pub fn header_style(broker: BrokerKind) -> HeaderStyle {
    match broker {
        BrokerKind::Kafka => HeaderStyle::Underscore,
        BrokerKind::Memory | BrokerKind::Nats | BrokerKind::JetStream => HeaderStyle::Dash,
    }
}

/// Now, as RFC 3339 with milliseconds (UTC).
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Small conveniences on the transport's message, kept here so the transport vocabulary stays
/// free of dispatcher concerns.
trait MessageExt {
    fn origin_broker(&self) -> BrokerKind;
    fn origin_system(&self) -> &'static str;
}

impl MessageExt for weir_broker_bridge::InboundMessage {
    fn origin_broker(&self) -> BrokerKind {
        match self.origin {
            weir_broker_bridge::Origin::Memory { .. } => BrokerKind::Memory,
            weir_broker_bridge::Origin::Nats { .. } => BrokerKind::Nats,
            weir_broker_bridge::Origin::JetStream { .. } => BrokerKind::JetStream,
            weir_broker_bridge::Origin::Kafka { .. } => BrokerKind::Kafka,
        }
    }

    /// OpenTelemetry `messaging.system` values.
    fn origin_system(&self) -> &'static str {
        match self.origin_broker() {
            BrokerKind::Memory => "weir_memory",
            BrokerKind::Nats | BrokerKind::JetStream => "nats",
            BrokerKind::Kafka => "kafka",
        }
    }
}
