//! `always-trap` (test function): executes the wasm `unreachable` instruction on every event, so
//! every invocation traps and the host must discard the instance. Reads no config.

use weir_function::prelude::*;

struct AlwaysTrap;

impl Function for AlwaysTrap {
    fn handle(_event: Event, _delivery: Delivery) -> Result<Vec<Output>, HandleError> {
        trap()
    }
}

weir_function::export!(AlwaysTrap);

#[cfg(target_arch = "wasm32")]
fn trap() -> ! {
    core::arch::wasm32::unreachable()
}

/// Host builds (unit tests, clippy on the host) have no wasm `unreachable`; abort is the nearest.
#[cfg(not(target_arch = "wasm32"))]
fn trap() -> ! {
    std::process::abort()
}
