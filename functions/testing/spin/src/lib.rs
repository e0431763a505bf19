//! `spin` (test function): loops forever on every event, so only the host's timeout (epoch
//! interruption) ends the invocation. Reads no config.

use std::hint::black_box;

use weir_function::prelude::*;

struct Spin;

impl Function for Spin {
    fn handle(_event: Event, _delivery: Delivery) -> Result<Vec<Output>, HandleError> {
        let mut turns: u64 = 0;
        loop {
            // black_box keeps the optimiser from proving the loop does nothing.
            turns = black_box(turns.wrapping_add(1));
        }
    }
}

weir_function::export!(Spin);
