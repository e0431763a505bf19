//! `noop` (test function): succeeds with no outputs; the floor for invocation benchmarks.
//! Reads no config.

use weir_function::prelude::*;

struct Noop;

impl Function for Noop {
    fn handle(_event: Event, _delivery: Delivery) -> Result<Vec<Output>, HandleError> {
        Ok(Vec::new())
    }
}

weir_function::export!(Noop);
