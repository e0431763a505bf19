//! `memory-hog` (test function): allocates 1 MiB chunks, writes to every page of each, and keeps
//! them all, forever, so the host's memory limit must stop it (a failed `memory.grow` makes the
//! allocator abort, which traps). Reads no config.

use std::hint::black_box;

use weir_function::prelude::*;

const CHUNK: usize = 1 << 20;
const PAGE: usize = 4096;

struct MemoryHog;

impl Function for MemoryHog {
    fn handle(_event: Event, _delivery: Delivery) -> Result<Vec<Output>, HandleError> {
        let mut hoard: Vec<Vec<u8>> = Vec::new();
        loop {
            let mut chunk = vec![0u8; CHUNK];
            // Touch every page so the memory is really used, not just reserved.
            for offset in (0..CHUNK).step_by(PAGE) {
                chunk[offset] = 1;
            }
            hoard.push(black_box(chunk));
            black_box(&hoard);
        }
    }
}

weir_function::export!(MemoryHog);
