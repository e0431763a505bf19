//! `echo` (test function): republishes the input event unchanged (type, data, content type,
//! subject, extensions) on `output_topic`, keyed like the input. The host gives it a new id and
//! its own chaining extensions.
//!
//! Config: `output_topic` (default `echo.out`).

use std::sync::OnceLock;

use weir_function::prelude::*;

/// Read once per instance (config is fixed for an instance's life): the benchmarks run echo on
/// every event, and a host call (a copy into the guest) per event for an unchanging value is
/// avoidable work.
static OUTPUT_TOPIC: OnceLock<String> = OnceLock::new();

struct Echo;

impl Function for Echo {
    fn handle(event: Event, delivery: Delivery) -> Result<Vec<Output>, HandleError> {
        let topic = OUTPUT_TOPIC.get_or_init(|| config::get_or("output_topic", "echo.out"));
        Ok(vec![
            Output::new(topic.clone(), event).with_key(delivery.key)
        ])
    }
}

weir_function::export!(Echo);
