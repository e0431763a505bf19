//! A function's instance pool: warm instances, the slots that bound concurrency, and the
//! lifecycle rules of DESIGN.md (one event at a time per instance; discarded after any failure
//! that interrupted the guest; recycled after `max_invocations`; reaped after idling, down to
//! `min`).
//!
//! The number of slots is the concurrency limit: an invocation holds a slot from before its
//! delivery is fetched until it is settled, so in-flight invocations never exceed the slots.
//! The slot count is *resizable*: [`InstancePool::set_desired`] grows it by adding permits at
//! once, and shrinks it by forgetting free permits at once and busy ones as they come back, so
//! a running invocation is never interrupted and the count of permits in existence never
//! exceeds the last size asked for once the busy ones are back. On growth it also pre-starts
//! instances in the background (cold starts overlap with the work that asked for them); on
//! shrinking it retires idle instances beyond the new size.
//!
//! Deciding how many slots there should be (lag-driven scaling) is [`crate::scaling`]'s job;
//! the pool only applies the number it is given.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use crate::config::Isolation;
use crate::engine::{FunctionModule, Instance, InvocationError, SandboxLimits};
use crate::telemetry;

/// How a pool is sized and recycled.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub min: usize,
    pub max: usize,
    pub idle_timeout: Duration,
    pub max_invocations: u64,
    pub isolation: Isolation,
}

/// A snapshot for the admin API and the status page.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct PoolStats {
    /// Instances alive (idle, busy, or being started ahead of need).
    pub live: usize,
    pub idle: usize,
    pub busy: usize,
    /// Concurrency limit currently applied: slots in existence, free or held. Above `desired`
    /// only while busy slots of a scale-down are still to come back.
    pub slots: usize,
    /// The slot count the autoscaler asked for (between `min` and `max`).
    pub desired: usize,
    pub starts: u64,
    pub discarded: u64,
    pub recycled: u64,
}

/// The instances of one function.
#[derive(Debug)]
pub struct InstancePool {
    function: Arc<str>,
    module: FunctionModule,
    config: Arc<BTreeMap<String, String>>,
    limits: SandboxLimits,
    settings: PoolSettings,
    gate: Arc<SlotGate>,
    idle: Mutex<Vec<Instance>>,
    live: AtomicUsize,
    /// Instances checked out for an invocation. Counted, not derived from `live - idle`: an
    /// instance being pre-started is live and not yet idle, but runs nothing.
    busy: AtomicUsize,
    /// Instances being pre-started in the background.
    starting: AtomicUsize,
    starts: AtomicU64,
    discarded: AtomicU64,
    recycled: AtomicU64,
    /// Invocations handed back (any outcome), for the autoscaler's processing rate.
    completed: AtomicU64,
}

/// The semaphore behind the slots, and the bookkeeping that lets it shrink.
#[derive(Debug)]
struct SlotGate {
    semaphore: Arc<Semaphore>,
    sizing: Mutex<Sizing>,
}

#[derive(Debug, Clone, Copy)]
struct Sizing {
    /// Permits in existence: free in the semaphore or held by a [`Slot`].
    capacity: usize,
    /// Held permits to forget when they come back (a shrink that could not take them yet).
    owed: usize,
    /// The last size asked for: `capacity - owed`.
    desired: usize,
}

impl SlotGate {
    fn new(size: usize) -> Self {
        Self {
            semaphore: Arc::new(Semaphore::new(size)),
            sizing: Mutex::new(Sizing {
                capacity: size,
                owed: 0,
                desired: size,
            }),
        }
    }

    fn sizing(&self) -> std::sync::MutexGuard<'_, Sizing> {
        self.sizing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Make `desired` slots exist, now for free ones, later for held ones.
    fn resize(&self, desired: usize) {
        let mut sizing = self.sizing();
        let current = sizing.capacity - sizing.owed;
        if desired > current {
            // Cancel what is still owed before minting new permits: those permits exist.
            let mut missing = desired - current;
            let cancelled = missing.min(sizing.owed);
            sizing.owed -= cancelled;
            missing -= cancelled;
            if missing > 0 {
                self.semaphore.add_permits(missing);
                sizing.capacity += missing;
            }
        } else if desired < current {
            let excess = current - desired;
            let forgotten = self.semaphore.forget_permits(excess);
            sizing.capacity -= forgotten;
            sizing.owed += excess - forgotten;
        }
        sizing.desired = desired;
    }

    /// A held permit comes back: forget it if a shrink is owed, else free it.
    fn give_back(&self, permit: OwnedSemaphorePermit) {
        let mut sizing = self.sizing();
        if sizing.owed > 0 {
            sizing.owed -= 1;
            sizing.capacity -= 1;
            permit.forget();
        } else {
            // Dropped under the lock so a concurrent resize sees a consistent count.
            drop(permit);
        }
    }
}

/// The right to run one invocation.
#[derive(Debug)]
pub struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    gate: Arc<SlotGate>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.gate.give_back(permit);
        }
    }
}

impl InstancePool {
    pub fn new(
        function: Arc<str>,
        module: FunctionModule,
        config: Arc<BTreeMap<String, String>>,
        limits: SandboxLimits,
        settings: PoolSettings,
    ) -> Self {
        // Until the autoscaler speaks, the pool behaves as before it existed: `max` slots.
        // Without a lag signal (core NATS) that is also where it stays.
        let gate = Arc::new(SlotGate::new(settings.max.max(1)));
        Self {
            function,
            module,
            config,
            limits,
            settings,
            gate,
            idle: Mutex::new(Vec::new()),
            live: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            starting: AtomicUsize::new(0),
            starts: AtomicU64::new(0),
            discarded: AtomicU64::new(0),
            recycled: AtomicU64::new(0),
            completed: AtomicU64::new(0),
        }
    }

    pub fn settings(&self) -> &PoolSettings {
        &self.settings
    }

    pub fn module(&self) -> &FunctionModule {
        &self.module
    }

    /// Start `min` instances ahead of the first event.
    pub async fn prewarm(&self) -> Result<(), InvocationError> {
        if self.settings.isolation == Isolation::PerEvent {
            return Ok(());
        }
        let mut warmed = Vec::with_capacity(self.settings.min);
        for _ in 0..self.settings.min {
            warmed.push(self.start().await?);
        }
        self.lock_idle().extend(warmed);
        self.publish_gauges();
        Ok(())
    }

    /// Wait for a free slot.
    pub async fn acquire(&self) -> Option<Slot> {
        let permit = self.gate.semaphore.clone().acquire_owned().await.ok()?;
        Some(Slot {
            permit: Some(permit),
            gate: self.gate.clone(),
        })
    }

    /// A free slot, if there is one now.
    pub fn try_acquire(&self) -> Option<Slot> {
        let permit = self.gate.semaphore.clone().try_acquire_owned().ok()?;
        Some(Slot {
            permit: Some(permit),
            gate: self.gate.clone(),
        })
    }

    /// Whether a slot coming free may be handed straight to another invocation: not while a
    /// scale-down is waiting for busy slots to come back.
    pub fn slot_still_wanted(&self) -> bool {
        self.gate.sizing().owed == 0
    }

    /// The slot count asked for last.
    pub fn desired(&self) -> usize {
        self.gate.sizing().desired
    }

    /// Set the slot count, clamped to `0..=max`. Growth takes effect at once and pre-starts
    /// instances up to the new count in the background (warm isolation only); shrinking takes
    /// free slots at once and busy ones as their invocations finish, and retires idle instances
    /// beyond the new count. Returns the count applied.
    pub fn set_desired(self: &Arc<Self>, desired: usize) -> usize {
        let desired = desired.min(self.settings.max);
        let before = self.desired();
        self.gate.resize(desired);
        if desired > before {
            self.prestart(desired);
        } else if desired < before {
            self.retire_idle_beyond(desired);
        }
        self.publish_gauges();
        desired
    }

    /// Invocations handed back so far (any outcome).
    pub fn completed(&self) -> u64 {
        self.completed.load(Ordering::Relaxed)
    }

    /// Start instances in the background until `target` are alive or starting. Each start is
    /// its own task, so cold starts overlap each other and the invocations already running.
    fn prestart(self: &Arc<Self>, target: usize) {
        if self.settings.isolation == Isolation::PerEvent {
            return;
        }
        let alive = self.live.load(Ordering::Relaxed) + self.starting.load(Ordering::Relaxed);
        let missing = target.saturating_sub(alive);
        for _ in 0..missing {
            self.starting.fetch_add(1, Ordering::Relaxed);
            let pool = Arc::clone(self);
            tokio::spawn(async move {
                let started = pool.start().await;
                pool.starting.fetch_sub(1, Ordering::Relaxed);
                match started {
                    Ok(instance) => {
                        // A scale-down may have come while it started: keep it only if wanted.
                        if pool.live.load(Ordering::Relaxed) > pool.desired().max(pool.settings.min)
                        {
                            pool.retire(instance, "idle");
                        } else {
                            pool.lock_idle().push(instance);
                        }
                        pool.publish_gauges();
                    }
                    Err(e) => {
                        // Not fatal: an invocation starts its own instance when none is idle.
                        tracing::warn!(function = %pool.function, error = %e, "pre-starting an instance failed");
                    }
                }
            });
        }
    }

    /// Retire idle instances (oldest first) while more than `keep` instances (and `min`) live.
    fn retire_idle_beyond(&self, keep: usize) -> usize {
        let keep = keep.max(self.settings.min);
        let mut retired = Vec::new();
        {
            let mut idle = self.lock_idle();
            let live = self.live.load(Ordering::Relaxed);
            let excess = live.saturating_sub(keep).min(idle.len());
            // The idle stack is LIFO: the bottom has waited longest.
            retired.extend(idle.drain(..excess));
        }
        let count = retired.len();
        for instance in retired {
            self.retire(instance, "idle");
        }
        count
    }

    /// A warm instance, or a new one.
    pub async fn checkout(&self) -> Result<Instance, InvocationError> {
        if self.settings.isolation == Isolation::Warm {
            if let Some(instance) = self.lock_idle().pop() {
                self.busy.fetch_add(1, Ordering::Relaxed);
                return Ok(instance);
            }
        }
        // Boxed: instantiation is the cold path here, and its future is large enough that
        // inlining it would grow every invocation's future (copied on each spawn).
        let instance = Box::pin(self.start()).await;
        if instance.is_ok() {
            self.busy.fetch_add(1, Ordering::Relaxed);
        }
        self.publish_gauges();
        instance
    }

    /// Hand an instance back after a call that ended with `outcome`.
    pub fn checkin(&self, instance: Instance, outcome: Result<(), &InvocationError>) {
        self.completed.fetch_add(1, Ordering::Relaxed);
        self.busy.fetch_sub(1, Ordering::Relaxed);
        let reason = match outcome {
            Err(e) if !e.instance_reusable() => Some(e.outcome()),
            _ if self.settings.isolation == Isolation::PerEvent => Some("per_event"),
            _ if instance.invocations() >= self.settings.max_invocations => Some("recycled"),
            _ => None,
        };
        match reason {
            Some(reason) => {
                self.retire(instance, reason);
                // Only a retirement changes the counts; a gauge lookup per event would cost
                // more than the rest of a warm checkin.
                self.publish_gauges();
            }
            None => self.lock_idle().push(instance),
        }
    }

    /// Drop instances idle longer than the idle timeout, keeping at least `min` alive.
    pub fn reap_idle(&self) -> usize {
        let now = Instant::now();
        let busy = self.busy();
        let mut idle = self.lock_idle();
        let mut reaped = Vec::new();
        // Oldest first: the idle stack is LIFO, so the bottom has waited longest.
        let mut index = 0;
        while index < idle.len() {
            let alive = idle.len() + busy - reaped.len();
            let expired = now.duration_since(idle[index].last_used) >= self.settings.idle_timeout;
            if expired && alive > self.settings.min {
                reaped.push(idle.remove(index));
            } else {
                index += 1;
            }
        }
        drop(idle);
        let count = reaped.len();
        for instance in reaped {
            self.retire(instance, "idle");
        }
        if count > 0 {
            self.publish_gauges();
        }
        count
    }

    pub fn stats(&self) -> PoolStats {
        let idle = self.lock_idle().len();
        let live = self.live.load(Ordering::Relaxed);
        let sizing = *self.gate.sizing();
        PoolStats {
            live,
            idle,
            busy: self.busy(),
            slots: sizing.capacity,
            desired: sizing.desired,
            starts: self.starts.load(Ordering::Relaxed),
            discarded: self.discarded.load(Ordering::Relaxed),
            recycled: self.recycled.load(Ordering::Relaxed),
        }
    }

    async fn start(&self) -> Result<Instance, InvocationError> {
        let started = Instant::now();
        let instance = self
            .module
            .instantiate(
                self.function.clone(),
                self.config.clone(),
                self.limits.clone(),
            )
            .await?;
        self.live.fetch_add(1, Ordering::Relaxed);
        self.starts.fetch_add(1, Ordering::Relaxed);
        telemetry::instance_started(&self.function, started.elapsed());
        Ok(instance)
    }

    fn retire(&self, instance: Instance, reason: &'static str) {
        drop(instance);
        self.live.fetch_sub(1, Ordering::Relaxed);
        match reason {
            "recycled" | "idle" | "per_event" => self.recycled.fetch_add(1, Ordering::Relaxed),
            _ => self.discarded.fetch_add(1, Ordering::Relaxed),
        };
        telemetry::instance_discarded(&self.function, reason);
    }

    /// Instances running an invocation right now.
    pub fn busy(&self) -> usize {
        self.busy.load(Ordering::Relaxed)
    }

    fn publish_gauges(&self) {
        let live = self.live.load(Ordering::Relaxed);
        telemetry::instances(&self.function, live, self.desired());
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Instance>> {
        // A poisoned lock only means a panic elsewhere while holding it; the Vec is still valid.
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(gate: &Arc<SlotGate>) -> Option<Slot> {
        let permit = gate.semaphore.clone().try_acquire_owned().ok()?;
        Some(Slot {
            permit: Some(permit),
            gate: gate.clone(),
        })
    }

    fn take_all(gate: &Arc<SlotGate>) -> Vec<Slot> {
        std::iter::from_fn(|| slot(gate)).collect()
    }

    #[test]
    fn growing_adds_slots_at_once() {
        let gate = Arc::new(SlotGate::new(1));
        gate.resize(4);
        assert_eq!(take_all(&gate).len(), 4);
    }

    #[test]
    fn shrinking_takes_free_slots_at_once_and_busy_ones_as_they_come_back() {
        let gate = Arc::new(SlotGate::new(4));
        let mut held = take_all(&gate);
        assert_eq!(held.len(), 4);
        held.truncate(3); // one comes back free
        gate.resize(1);
        assert_eq!(
            gate.sizing().capacity,
            3,
            "the free one is forgotten at once"
        );
        assert_eq!(gate.sizing().owed, 2);
        held.truncate(1); // two come back: both forgotten
        assert_eq!(gate.sizing().capacity, 1);
        assert!(slot(&gate).is_none(), "the last slot is still held");
        held.clear();
        assert_eq!(take_all(&gate).len(), 1);
    }

    #[test]
    fn growing_again_cancels_what_is_owed_first() {
        let gate = Arc::new(SlotGate::new(4));
        let held = take_all(&gate);
        gate.resize(0);
        assert_eq!(gate.sizing().owed, 4);
        gate.resize(2);
        let sizing = *gate.sizing();
        assert_eq!((sizing.capacity, sizing.owed), (4, 2));
        drop(held);
        assert_eq!(
            take_all(&gate).len(),
            2,
            "never more than the size asked for"
        );
    }
}
