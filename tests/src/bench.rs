//! What the benchmarks share beyond servers: their environment knobs and a watch on the host's
//! own stalls.
//!
//! A small shared machine now and then stops running anything for tens of milliseconds; a
//! latency p99 taken across such a stall says more about the host than about the path
//! measured. [`StallWatch`] notices stalls in the same run as the measurement, so a latency
//! line can say whether the host stalled while it was taken. It does not correct or filter any
//! measurement.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// A positive number from the environment variable `name`, or `default` when it is not set.
pub fn env_number(name: &str, default: u32) -> anyhow::Result<u32> {
    match std::env::var(name) {
        Err(std::env::VarError::NotPresent) => Ok(default),
        Ok(text) => match text.parse::<u32>() {
            Ok(number) if number > 0 => Ok(number),
            _ => bail!("{name} must be a positive whole number, not `{text}`"),
        },
        Err(err) => bail!("{name}: {err}"),
    }
}

/// How long the watch sleeps between looks at the clock.
const NAP: Duration = Duration::from_millis(1);
/// A wake-up this late counts as a stall: well past what scheduling a ready thread among a
/// busy process's threads takes (a few milliseconds at most), well under the stalls it is for.
pub const STALL: Duration = Duration::from_millis(10);
/// The watch stops by itself after this long, should its owner be stuck before `finish` (a
/// watch dropped unfinished stops at its next wake-up).
const WATCH_LIMIT: Duration = Duration::from_secs(600);

/// A thread that naps for a millisecond at a time and records how late each wake-up came.
///
/// It costs about a thousand wake-ups a second, a percent or two of one core.
#[derive(Debug)]
pub struct StallWatch {
    stop: Arc<AtomicBool>,
    /// `None` once finished.
    thread: Option<JoinHandle<Stalls>>,
}

/// What a [`StallWatch`] saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stalls {
    pub wakeups: u64,
    /// Wake-ups at least [`STALL`] late.
    pub stalls: u64,
    /// The longest delay of a wake-up past its nap.
    pub longest: Duration,
}

impl StallWatch {
    pub fn start() -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("bench-stall-watch".into())
            .spawn(move || {
                let started = Instant::now();
                let mut seen = Stalls::default();
                while !stopped.load(Ordering::Relaxed) && started.elapsed() < WATCH_LIMIT {
                    let before = Instant::now();
                    std::thread::sleep(NAP);
                    seen.record(before.elapsed().saturating_sub(NAP));
                }
                seen
            })
            .context("starting the stall watch thread")?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the watch and returns what it saw.
    pub fn finish(mut self) -> anyhow::Result<Stalls> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self
            .thread
            .take()
            .context("the stall watch was already finished")?;
        let seen = thread
            .join()
            .map_err(|_| anyhow::anyhow!("the stall watch thread panicked"))?;
        if seen.wakeups == 0 {
            bail!("the stall watch never woke up");
        }
        Ok(seen)
    }
}

/// A measurement that fails between `start` and `finish` drops the watch: its thread stops.
impl Drop for StallWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Stalls {
    /// Counts one wake-up that came `late` past its nap.
    fn record(&mut self, late: Duration) {
        self.wakeups += 1;
        if late >= STALL {
            self.stalls += 1;
        }
        self.longest = self.longest.max(late);
    }
}

impl std::fmt::Display for Stalls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "host: {} of {} {} ms naps woke ≥ {} ms late, the longest delay {:.1} ms",
            self.stalls,
            self.wakeups,
            NAP.as_millis(),
            STALL.as_millis(),
            self.longest.as_secs_f64() * 1e3
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_number_reads_positive_numbers_only() {
        // Names no one sets, so the test does not race other tests over the environment.
        assert_eq!(env_number("WEIR_TEST_BENCH_UNSET_7F3A", 5).unwrap(), 5);
        std::env::set_var("WEIR_TEST_BENCH_ZERO_7F3A", "0");
        let zero = env_number("WEIR_TEST_BENCH_ZERO_7F3A", 5).unwrap_err();
        assert!(zero.to_string().contains("positive whole number"), "{zero}");
        std::env::set_var("WEIR_TEST_BENCH_TEXT_7F3A", "many");
        assert!(env_number("WEIR_TEST_BENCH_TEXT_7F3A", 5).is_err());
        std::env::set_var("WEIR_TEST_BENCH_OK_7F3A", "12");
        assert_eq!(env_number("WEIR_TEST_BENCH_OK_7F3A", 5).unwrap(), 12);
    }

    /// Stopping the process to make a real stall would stop every other test in it too, so
    /// the counting is checked on its own and the thread only for waking up at all.
    #[test]
    fn late_wakeups_count_as_stalls_from_the_threshold() {
        let mut seen = Stalls::default();
        seen.record(Duration::from_micros(80));
        seen.record(STALL - Duration::from_micros(1));
        seen.record(STALL);
        seen.record(Duration::from_millis(73));
        assert_eq!((seen.wakeups, seen.stalls), (4, 2));
        assert_eq!(seen.longest, Duration::from_millis(73));
        assert_eq!(
            seen.to_string(),
            "host: 2 of 4 1 ms naps woke ≥ 10 ms late, the longest delay 73.0 ms"
        );
    }

    #[test]
    fn the_watch_naps_until_finished() {
        let started = Instant::now();
        let watch = StallWatch::start().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let seen = watch.finish().unwrap();
        // Naps of at least 1 ms: no more of them than milliseconds passed (and the one under
        // way when it was told to stop); a loaded test machine may give far fewer.
        let most = started.elapsed().as_millis() as u64 + 1;
        assert!(
            (5..=most).contains(&seen.wakeups),
            "{seen:?}, at most {most}"
        );
    }
}
