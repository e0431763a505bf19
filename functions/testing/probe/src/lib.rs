//! `probe` (test function): records when it ran. It sleeps `sleep_ms` milliseconds (default
//! 20) on the WASI monotonic clock and emits one output on `output_topic` (default `probe.out`),
//! type `weir.test.probe`, with JSON `{"input": <input id>, "start_ns": <wall clock ns at
//! entry>, "end_ns": <wall clock ns at exit>}`.
//!
//! The scaling tests rebuild from these intervals how many invocations overlapped (the
//! function's own concurrency counter, independent of the host's account) and check that
//! every input was processed exactly once. It keeps no state between calls.
//!
//! Config: `sleep_ms` (default 20), `output_topic` (default `probe.out`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;
use weir_function::prelude::*;

struct Probe;

/// Wall-clock nanoseconds since the Unix epoch (WASI `wall-clock`); 0 if the clock is before
/// the epoch, which a test would notice as an impossible interval.
fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

impl Function for Probe {
    fn handle(event: Event, _delivery: Delivery) -> Result<Vec<Output>, HandleError> {
        let start_ns = now_ns();
        let sleep_ms: u64 = config::parse_or("sleep_ms", 20)?;
        let topic = config::get_or("output_topic", "probe.out");
        if sleep_ms > 0 {
            std::thread::sleep(Duration::from_millis(sleep_ms));
        }
        let end_ns = now_ns();
        let record = json!({
            "input": event.id,
            "start_ns": u64::try_from(start_ns).unwrap_or(u64::MAX),
            "end_ns": u64::try_from(end_ns).unwrap_or(u64::MAX),
        });
        Ok(vec![Output::json(topic, "weir.test.probe", &record)?])
    }
}

weir_function::export!(Probe);
