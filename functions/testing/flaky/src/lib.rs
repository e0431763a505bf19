//! `flaky` (test function): fails with `retry("attempt N failed")` while
//! `delivery.attempt <= fail_attempts`, then succeeds with one output echoing the input data.
//!
//! Config: `fail_attempts` (default 2; a huge value makes it fail forever), `output_topic`
//! (default `flaky.out`). The output is the input event itself (type, data, content type), keyed
//! like the input; the host gives it a new id.

use weir_function::prelude::*;

struct Flaky;

impl Function for Flaky {
    fn handle(event: Event, delivery: Delivery) -> Result<Vec<Output>, HandleError> {
        let fail_attempts: u64 = config::parse_or("fail_attempts", 2)?;
        if u64::from(delivery.attempt) <= fail_attempts {
            return Err(HandleError::retry(format!(
                "attempt {} failed",
                delivery.attempt
            )));
        }
        let topic = config::get_or("output_topic", "flaky.out");
        Ok(vec![Output::new(topic, event).with_key(delivery.key)])
    }
}

weir_function::export!(Flaky);
