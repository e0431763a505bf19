//! `not-a-function` (test fixture): a valid WebAssembly component that exports `wasi:cli/run`
//! instead of `weir:function/handler`, so loading it as a function must fail with a world error.

fn main() {}
