//! A function's instance pool: warm instances, the slots that bound concurrency, and the
//! lifecycle rules of DESIGN.md (one event at a time per instance; discarded after any failure
//! that interrupted the guest; recycled after `max_invocations`; reaped after idling, down to
//! `min`).
//!
//! The number of slots is the concurrency limit: an invocation holds a slot from before its
//! delivery is fetched until it is settled, so in-flight invocations never exceed the slots.
//! Deciding how many slots there should be (lag-driven scaling) is the autoscaler's job; the
//! pool only applies the number it is given.

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
    /// Instances alive (idle + busy).
    pub live: usize,
    pub idle: usize,
    pub busy: usize,
    /// Concurrency limit currently applied.
    pub slots: usize,
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
    slots: Arc<Semaphore>,
    idle: Mutex<Vec<Instance>>,
    live: AtomicUsize,
    starts: AtomicU64,
    discarded: AtomicU64,
    recycled: AtomicU64,
}

/// The right to run one invocation.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

impl InstancePool {
    pub fn new(
        function: Arc<str>,
        module: FunctionModule,
        config: Arc<BTreeMap<String, String>>,
        limits: SandboxLimits,
        settings: PoolSettings,
    ) -> Self {
        let slots = Arc::new(Semaphore::new(settings.max.max(1)));
        Self {
            function,
            module,
            config,
            limits,
            settings,
            slots,
            idle: Mutex::new(Vec::new()),
            live: AtomicUsize::new(0),
            starts: AtomicU64::new(0),
            discarded: AtomicU64::new(0),
            recycled: AtomicU64::new(0),
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
        let permit = self.slots.clone().acquire_owned().await.ok()?;
        Some(Slot { _permit: permit })
    }

    /// A warm instance, or a new one.
    pub async fn checkout(&self) -> Result<Instance, InvocationError> {
        if self.settings.isolation == Isolation::Warm {
            if let Some(instance) = self.lock_idle().pop() {
                return Ok(instance);
            }
        }
        let instance = self.start().await;
        self.publish_gauges();
        instance
    }

    /// Hand an instance back after a call that ended with `outcome`.
    pub fn checkin(&self, instance: Instance, outcome: Result<(), &InvocationError>) {
        let reason = match outcome {
            Err(e) if !e.instance_reusable() => Some(e.outcome()),
            _ if self.settings.isolation == Isolation::PerEvent => Some("per_event"),
            _ if instance.invocations() >= self.settings.max_invocations => Some("recycled"),
            _ => None,
        };
        match reason {
            Some(reason) => self.retire(instance, reason),
            None => self.lock_idle().push(instance),
        }
        self.publish_gauges();
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
        PoolStats {
            live,
            idle,
            busy: live.saturating_sub(idle),
            slots: self.settings.max,
            starts: self.starts.load(Ordering::Relaxed),
            discarded: self.discarded.load(Ordering::Relaxed),
            recycled: self.recycled.load(Ordering::Relaxed),
        }
    }

    async fn start(&self) -> Result<Instance, InvocationError> {
        let started = Instant::now();
        let instance =
            self.module.instantiate(self.function.clone(), self.config.clone(), self.limits.clone()).await?;
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

    fn busy(&self) -> usize {
        self.live.load(Ordering::Relaxed).saturating_sub(self.lock_idle().len())
    }

    fn publish_gauges(&self) {
        let live = self.live.load(Ordering::Relaxed);
        telemetry::instances(&self.function, live, self.settings.max);
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Instance>> {
        // A poisoned lock only means a panic elsewhere while holding it; the Vec is still valid.
        self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
