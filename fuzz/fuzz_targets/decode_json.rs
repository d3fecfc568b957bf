//! Arbitrary bytes as a `roomd.v1.json` text frame: decoding never panics, and the
//! values a frame carries round-trip through JSON and flat nodes.
//! The property itself lives in `fuzz/checks.rs`, shared with the stable corpus replay.

#![no_main]

// Each target calls one of the shared checks; the others are unused here.
#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check_decode_json(data));
