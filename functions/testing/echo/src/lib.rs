//! `echo` (test function): republishes the input event unchanged (type, data, content type,
//! subject, extensions) on `output_topic`, keyed like the input. The host gives it a new id and
//! its own chaining extensions.
//!
//! Config: `output_topic` (default `echo.out`).

use weir_function::prelude::*;

struct Echo;

impl Function for Echo {
    fn handle(event: Event, delivery: Delivery) -> Result<Vec<Output>, HandleError> {
        let topic = config::get_or("output_topic", "echo.out");
        Ok(vec![Output::new(topic, event).with_key(delivery.key)])
    }
}

weir_function::export!(Echo);
