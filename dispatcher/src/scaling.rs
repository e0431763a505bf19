//! The lag-driven autoscaler: one control loop per function that sets its pool's slot count.
//!
//! Every [`TICK`] it reads the trigger's lag from the transport's [`LagProbe`] (JetStream
//! `num_pending + num_ack_pending`, Kafka high watermark minus committed offset, memory bus
//! depth), and computes
//!
//! ```text
//! wanted  = clamp(ceil(lag / target_lag), min, max), at least the busy instances,
//!           and at least 1 while lag > 0 (so scale-to-zero always wakes up)
//! ```
//!
//! It scales **up at once** to `wanted`, and **down only** to the largest `wanted` seen during
//! the last `scale_down_window` (the stabilisation window of Kubernetes' HPA): a burst that
//! dips for a moment does not shed instances it needs again a tick later. Each change is
//! logged with its reason and counted (`weir_scale_events_total`); the pool publishes the
//! current and desired instance gauges.
//!
//! It does not start or stop instances itself ([`InstancePool::set_desired`] does), does not
//! reap idle instances (the runtime's reaper does, after `idle_timeout`, down to `min`) and has
//! no opinion without a lag signal: a trigger without a probe (core NATS) keeps `max` slots and
//! grows instances on demand.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use weir_broker_bridge::{BrokerKind, LagProbe};

use crate::config::ScalingConfig;
use crate::pool::InstancePool;
use crate::telemetry;

/// How often the loop samples lag and decides (DESIGN.md: at most 250 ms).
pub const TICK: Duration = Duration::from_millis(100);
/// A successful lag reading older than this is not acted on (the broker is away).
const STALE: Duration = Duration::from_secs(10);

/// The latest lag reading and when it was taken.
#[derive(Debug, Clone)]
struct LagReading {
    at: Instant,
    lag: Result<u64, String>,
}

/// Read lag back to back, at most once per [`TICK`], into `readings` until `shutdown`.
async fn read_lag(
    probe: Arc<dyn LagProbe>,
    readings: tokio::sync::watch::Sender<Option<LagReading>>,
    shutdown: CancellationToken,
) {
    loop {
        let started = Instant::now();
        let lag = tokio::select! {
            lag = probe.lag() => lag.map_err(|e| e.to_string()),
            () = shutdown.cancelled() => return,
        };
        // A failure replaces an older success only when the success has gone stale, so one
        // slow or failed read does not freeze scaling.
        readings.send_modify(|latest| {
            let keep_success = lag.is_err()
                && latest
                    .as_ref()
                    .is_some_and(|l| l.lag.is_ok() && l.at.elapsed() <= STALE);
            if !keep_success {
                *latest = Some(LagReading {
                    at: Instant::now(),
                    lag,
                });
            }
        });
        tokio::select! {
            () = tokio::time::sleep_until((started + TICK).into()) => {}
            () = shutdown.cancelled() => return,
        }
    }
}

/// What the loop computes from one sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub lag: u64,
    pub busy: usize,
}

/// The pure decision rule, kept apart from the clock and the pool so it can be tested alone.
#[derive(Debug)]
pub struct Scaler {
    min: usize,
    max: usize,
    target_lag: u64,
    window: Duration,
    /// `(when, wanted)` of the samples inside the window, oldest first.
    recent: VecDeque<(Instant, usize)>,
}

/// A change the scaler asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Up(usize),
    Down(usize),
}

impl Scaler {
    pub fn new(settings: &ScalingConfig) -> Self {
        let max = settings.max.max(1) as usize;
        Self {
            min: (settings.min as usize).min(max),
            max,
            target_lag: settings.target_lag.max(1),
            window: settings.scale_down_window,
            recent: VecDeque::new(),
        }
    }

    /// The slot count one sample asks for, before stabilisation.
    pub fn wanted(&self, sample: Sample) -> usize {
        let by_lag = usize::try_from(sample.lag.div_ceil(self.target_lag)).unwrap_or(usize::MAX);
        let floor = if sample.lag > 0 { 1 } else { 0 };
        by_lag.max(sample.busy).max(floor).clamp(self.min, self.max)
    }

    /// Record `sample` taken `now` and say whether `current` should change.
    pub fn decide(&mut self, now: Instant, sample: Sample, current: usize) -> Option<Decision> {
        let wanted = self.wanted(sample);
        self.recent.push_back((now, wanted));
        while let Some(&(at, _)) = self.recent.front() {
            if now.duration_since(at) > self.window {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        if wanted > current {
            return Some(Decision::Up(wanted));
        }
        // Down only once the window holds nothing that wanted more than the target: the
        // largest recent value is what the window "remembers".
        let remembered = self.recent.iter().map(|&(_, w)| w).max().unwrap_or(wanted);
        let window_full = self
            .recent
            .front()
            .is_some_and(|&(at, _)| now.duration_since(at) + TICK >= self.window);
        if remembered < current && window_full {
            return Some(Decision::Down(remembered));
        }
        None
    }
}

/// Run the control loop of one function until `shutdown`.
pub async fn control_loop(
    function: Arc<str>,
    broker: BrokerKind,
    pool: Arc<InstancePool>,
    probe: Option<Arc<dyn LagProbe>>,
    settings: ScalingConfig,
    shutdown: CancellationToken,
) {
    let Some(probe) = probe else {
        tracing::info!(function = %function, broker = %broker, slots = pool.desired(), "no lag signal on this trigger; the slot count stays at max");
        shutdown.cancelled().await;
        return;
    };
    let mut scaler = Scaler::new(&settings);
    // Lag is read on its own task: a slow read (a Kafka broker answering in seconds) delays
    // only the next reading, never the loop, which decides on the latest value it has.
    let (readings, mut latest) = tokio::sync::watch::channel(None);
    tokio::spawn(read_lag(probe, readings, shutdown.clone()));
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_completed = pool.completed();
    let mut last_at = Instant::now();
    let mut first = true;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let reading: Option<LagReading> = latest.borrow_and_update().clone();
        let lag = match reading {
            None => continue,
            Some(LagReading { at, lag: Ok(lag) }) if at.elapsed() <= STALE => {
                if failing {
                    tracing::info!(function = %function, "consumer lag readable again; autoscaling resumes");
                }
                failing = false;
                lag
            }
            Some(LagReading { lag, at }) => {
                if !failing {
                    let error = lag
                        .err()
                        .unwrap_or_else(|| format!("no reading for {:?}", at.elapsed()));
                    tracing::warn!(function = %function, error = %error, "cannot read consumer lag; keeping the current slot count");
                }
                failing = true;
                continue;
            }
        };
        let now = Instant::now();
        let completed = pool.completed();
        let elapsed = now.duration_since(last_at).as_secs_f64().max(1e-3);
        let rate = (completed.saturating_sub(last_completed)) as f64 / elapsed;
        (last_completed, last_at) = (completed, now);

        let sample = Sample {
            lag,
            busy: pool.busy(),
        };
        let current = pool.desired();
        let wanted = scaler.wanted(sample);
        let mut decision = scaler.decide(now, sample, current);
        // The pool starts at `max` slots (it cannot know better); the first sample sets it
        // right at once instead of waiting out a window, and the log says so.
        let initial = std::mem::take(&mut first);
        if initial {
            decision = match wanted.cmp(&current) {
                std::cmp::Ordering::Greater => Some(Decision::Up(wanted)),
                std::cmp::Ordering::Less => Some(Decision::Down(wanted)),
                std::cmp::Ordering::Equal => None,
            };
        }
        let reason = |later: &'static str| if initial { "first lag reading" } else { later };
        match decision {
            Some(Decision::Up(desired)) => {
                pool.set_desired(desired);
                telemetry::scale_event(&function, "up");
                tracing::info!(function = %function, broker = %broker, lag, rate = format_args!("{rate:.0}/s"), busy = sample.busy, current, desired, reason = reason("lag above target"), "scaling up");
            }
            Some(Decision::Down(desired)) => {
                pool.set_desired(desired);
                telemetry::scale_event(&function, "down");
                tracing::info!(function = %function, broker = %broker, lag, rate = format_args!("{rate:.0}/s"), busy = sample.busy, current, desired, window = ?settings.scale_down_window, reason = reason("lower for the whole window"), "scaling down");
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(min: u32, max: u32, target_lag: u64, window_ms: u64) -> ScalingConfig {
        ScalingConfig {
            min,
            max,
            target_lag,
            scale_down_window: Duration::from_millis(window_ms),
            idle_timeout: Duration::from_secs(60),
            max_invocations: 1000,
        }
    }

    #[test]
    fn wanted_is_lag_over_target_clamped() {
        let scaler = Scaler::new(&settings(1, 8, 10, 2000));
        assert_eq!(scaler.wanted(Sample { lag: 0, busy: 0 }), 1);
        assert_eq!(scaler.wanted(Sample { lag: 11, busy: 0 }), 2);
        assert_eq!(scaler.wanted(Sample { lag: 30, busy: 0 }), 3);
        assert_eq!(
            scaler.wanted(Sample {
                lag: 20_000,
                busy: 0
            }),
            8
        );
        assert_eq!(
            scaler.wanted(Sample { lag: 5, busy: 4 }),
            4,
            "never below the busy count"
        );
    }

    #[test]
    fn scale_to_zero_wakes_up_on_any_lag() {
        let scaler = Scaler::new(&settings(0, 4, 100, 1000));
        assert_eq!(scaler.wanted(Sample { lag: 0, busy: 0 }), 0);
        assert_eq!(scaler.wanted(Sample { lag: 1, busy: 0 }), 1);
    }

    #[test]
    fn up_at_once_down_after_the_window() {
        let mut scaler = Scaler::new(&settings(1, 8, 10, 1000));
        let t0 = Instant::now();
        assert_eq!(
            scaler.decide(t0, Sample { lag: 500, busy: 0 }, 1),
            Some(Decision::Up(8))
        );
        // Lag gone: nothing changes until a whole window without demand has passed.
        let mut at = t0;
        let mut down = None;
        for _ in 0..30 {
            at += TICK;
            if let Some(d) = scaler.decide(at, Sample { lag: 0, busy: 0 }, 8) {
                down = Some((at.duration_since(t0), d));
                break;
            }
        }
        let (after, decision) = down.expect("scaled down within 3 s");
        assert_eq!(decision, Decision::Down(1));
        assert!(
            after >= Duration::from_millis(1000),
            "scaled down after {after:?}, before the window"
        );
        assert!(
            after <= Duration::from_millis(1200),
            "scaled down after {after:?}, long after the window"
        );
    }

    #[test]
    fn a_dip_inside_the_window_does_not_scale_down() {
        let mut scaler = Scaler::new(&settings(1, 8, 10, 1000));
        let t0 = Instant::now();
        scaler.decide(t0, Sample { lag: 80, busy: 0 }, 1);
        for i in 1..=20u32 {
            let lag = if i % 5 == 0 { 80 } else { 0 };
            assert_eq!(
                scaler.decide(t0 + TICK * i, Sample { lag, busy: 0 }, 8),
                None,
                "tick {i}"
            );
        }
    }

    #[test]
    fn scale_down_goes_to_the_largest_value_of_the_window() {
        let mut scaler = Scaler::new(&settings(1, 8, 10, 500));
        let t0 = Instant::now();
        scaler.decide(t0, Sample { lag: 80, busy: 0 }, 1);
        let mut at = t0;
        let mut decision = None;
        for _ in 0..10 {
            at += TICK;
            decision = scaler.decide(at, Sample { lag: 30, busy: 0 }, 8);
            if decision.is_some() {
                break;
            }
        }
        assert_eq!(decision, Some(Decision::Down(3)));
    }
}
