//! `fail-key` (test function): fails with `retry("key K attempt N failed")` while the event's
//! partition key equals `fail_key` and `delivery.attempt <= fail_attempts`; every other event
//! (and that key's events once the attempts are spent) is echoed unchanged to `output_topic`,
//! keyed like the input. Optionally sleeps first, so events finish out of order.
//!
//! It exists so that per-key ordering can be tested: one key retries in place while the others
//! must go on. `flaky` cannot do that, since it fails every event by attempt number.
//!
//! Config: `fail_key` (unset: nothing fails), `fail_attempts` (default 2), `output_topic`
//! (default `fail-key.out`), `max_sleep_ms` (default 0: a sleep of `hash(event id) %
//! max_sleep_ms` ms before answering, deterministic per event).

use std::time::Duration;

use weir_function::prelude::*;

struct FailKey;

impl Function for FailKey {
    fn handle(event: Event, delivery: Delivery) -> Result<Vec<Output>, HandleError> {
        let fail_attempts: u64 = config::parse_or("fail_attempts", 2)?;
        let max_sleep_ms: u64 = config::parse_or("max_sleep_ms", 0)?;
        if max_sleep_ms > 0 {
            std::thread::sleep(Duration::from_millis(fnv1a(&event.id) % max_sleep_ms));
        }
        let failing = config::get("fail_key")
            .is_some_and(|fail_key| delivery.key.as_deref() == Some(fail_key.as_str()));
        if failing && u64::from(delivery.attempt) <= fail_attempts {
            return Err(HandleError::retry(format!(
                "key {} attempt {} failed",
                delivery.key.as_deref().unwrap_or_default(),
                delivery.attempt
            )));
        }
        let topic = config::get_or("output_topic", "fail-key.out");
        Ok(vec![Output::new(topic, event).with_key(delivery.key)])
    }
}

/// FNV-1a: a stable spread of sleep times without any dependency.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

weir_function::export!(FailKey);
