//! `sleepy` (test function): sleeps `sleep_ms` milliseconds (default 50) on the WASI monotonic
//! clock, then succeeds with no outputs; a slow consumer for lag and scaling tests.
//!
//! Config: `sleep_ms` (default 50).

use std::time::Duration;

use weir_function::prelude::*;

struct Sleepy;

impl Function for Sleepy {
    fn handle(_event: Event, _delivery: Delivery) -> Result<Vec<Output>, HandleError> {
        let sleep_ms: u64 = config::parse_or("sleep_ms", 50)?;
        std::thread::sleep(Duration::from_millis(sleep_ms));
        Ok(Vec::new())
    }
}

weir_function::export!(Sleepy);
