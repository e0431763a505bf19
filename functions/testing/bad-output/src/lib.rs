//! `bad-output` (test function): emits one output to a topic the function is not allowed to
//! publish to, so the host must fail the invocation instead of publishing.
//!
//! Config: `topic` (default `forbidden.topic`). The output is JSON `{"caused_by": <input id>}`,
//! type `weir.test.bad-output`.

use serde_json::json;
use weir_function::prelude::*;

struct BadOutput;

impl Function for BadOutput {
    fn handle(event: Event, _delivery: Delivery) -> Result<Vec<Output>, HandleError> {
        let topic = config::get_or("topic", "forbidden.topic");
        let data = json!({ "caused_by": event.id });
        Ok(vec![Output::json(topic, "weir.test.bad-output", &data)?])
    }
}

weir_function::export!(BadOutput);
