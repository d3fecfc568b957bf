//! Values generated from the bytes survive flat nodes, an rkyv `op` frame and JSON.
//! The property itself lives in `fuzz/checks.rs`, shared with the stable corpus replay.

#![no_main]

// Each target calls one of the shared checks; the others are unused here.
#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check_wire_value_roundtrip(data));
