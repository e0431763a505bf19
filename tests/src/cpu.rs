//! CPU time of processes, read from `/proc/<pid>/stat`, for benchmarks that say where the time
//! goes (this process against the broker) beside their throughput.
//!
//! Linux only, 10 ms resolution (clock ticks): meant for phases that run for seconds.

use std::time::Duration;

use anyhow::{bail, Context};

/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ, 100 on every Linux we run on).
const TICKS_PER_SECOND: u64 = 100;

/// `/proc/<pid>/<file>`, or this process's with `None`.
fn proc_path(pid: Option<u32>, file: &str) -> String {
    match pid {
        Some(pid) => format!("/proc/{pid}/{file}"),
        None => format!("/proc/self/{file}"),
    }
}

/// User plus system CPU time `pid` has used so far (`None`: this process).
pub fn cpu_time(pid: Option<u32>) -> anyhow::Result<Duration> {
    let path = proc_path(pid, "stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may hold spaces; the fields after its closing parenthesis
    // start with field 3 (state), so utime (14) and stime (15) are the 12th and 13th.
    let Some((_, after_name)) = stat.rsplit_once(')') else {
        bail!("{path}: no command name in `{stat}`");
    };
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |index: usize| -> anyhow::Result<u64> {
        fields
            .get(index)
            .with_context(|| format!("{path}: field {} missing", index + 3))?
            .parse::<u64>()
            .with_context(|| format!("{path}: field {} is not a number", index + 3))
    };
    let total = ticks(11)? + ticks(12)?;
    Ok(Duration::from_millis(total * 1000 / TICKS_PER_SECOND))
}

/// Write and read system calls `pid` has made so far (`/proc/<pid>/io`; `None`: this process).
pub fn io_calls(pid: Option<u32>) -> anyhow::Result<(u64, u64)> {
    let path = proc_path(pid, "io");
    let io = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        io.lines()
            .find_map(|line| line.strip_prefix(name))
            .with_context(|| format!("{path}: no {name}"))?
            .trim()
            .parse()
            .with_context(|| format!("{path}: {name} is not a number"))
    };
    Ok((field("syscw:")?, field("syscr:")?))
}

/// CPU used by this process and by one other (the broker) between two points in time, and
/// the system calls they made to write and read (few per event means the I/O is batched).
#[derive(Debug, Clone, Copy)]
pub struct CpuMeter {
    other: u32,
    own_start: Duration,
    other_start: Duration,
    own_io_start: (u64, u64),
    other_io_start: (u64, u64),
}

/// What a [`CpuMeter`] measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuUsed {
    pub own: Duration,
    pub other: Duration,
    /// (writes, reads) system calls.
    pub own_io: (u64, u64),
    pub other_io: (u64, u64),
}

impl CpuUsed {
    /// Microseconds of CPU per event: (this process, the other).
    pub fn per_event_micros(&self, events: u64) -> (f64, f64) {
        let events = events.max(1) as f64;
        (
            self.own.as_secs_f64() * 1e6 / events,
            self.other.as_secs_f64() * 1e6 / events,
        )
    }
}

impl CpuMeter {
    /// Starts measuring this process and `other`.
    pub fn start(other: u32) -> anyhow::Result<CpuMeter> {
        Ok(CpuMeter {
            other,
            own_start: cpu_time(None)?,
            other_start: cpu_time(Some(other))?,
            own_io_start: io_calls(None)?,
            other_io_start: io_calls(Some(other))?,
        })
    }

    pub fn stop(&self) -> anyhow::Result<CpuUsed> {
        let since = |now: (u64, u64), start: (u64, u64)| {
            (now.0.saturating_sub(start.0), now.1.saturating_sub(start.1))
        };
        Ok(CpuUsed {
            own: cpu_time(None)?.saturating_sub(self.own_start),
            other: cpu_time(Some(self.other))?.saturating_sub(self.other_start),
            own_io: since(io_calls(None)?, self.own_io_start),
            other_io: since(io_calls(Some(self.other))?, self.other_io_start),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cpu_time_grows_with_work() -> anyhow::Result<()> {
        let before = cpu_time(None)?;
        let spin_until = std::time::Instant::now() + Duration::from_millis(200);
        let mut x = 0u64;
        while std::time::Instant::now() < spin_until {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        let after = cpu_time(None)?;
        assert!(
            after.saturating_sub(before) >= Duration::from_millis(100),
            "200 ms of spinning showed as {:?} of CPU",
            after.saturating_sub(before)
        );
        Ok(())
    }
}
