//! `reject-all` (test function): rejects every event with `reject("rejected by test")`, so every
//! event goes to the dead-letter queue at once, without retries. Reads no config.

use weir_function::prelude::*;

struct RejectAll;

impl Function for RejectAll {
    fn handle(_event: Event, _delivery: Delivery) -> Result<Vec<Output>, HandleError> {
        Err(HandleError::reject("rejected by test"))
    }
}

weir_function::export!(RejectAll);
