//! Arbitrary bytes as a `roomd.v1.rkyv` binary frame (client or server message):
//! validation and decoding never panic or abort, however deep the value nests.
//! The property itself lives in `fuzz/checks.rs`, shared with the stable corpus replay.

#![no_main]

// Each target calls one of the shared checks; the others are unused here.
#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check_decode_rkyv(data));
