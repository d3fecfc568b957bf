//! Op sequences generated from the bytes, against a room of each kind: reducers never
//! panic, and `undo` after `apply` restores the state.
//! The property itself lives in `fuzz/checks.rs`, shared with the stable corpus replay.

#![no_main]

// Each target calls one of the shared checks; the others are unused here.
#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check_reduce_state(data));
