//! Batches written through the real store onto redb over an in-memory file that fails
//! writes and syncs, crashes (keeping only what was synced) and has bytes flipped,
//! checked against a model of what was acknowledged; nothing may panic.
//! The property itself lives in `fuzz/checks.rs`, shared with the stable corpus replay.

#![no_main]

// Each target calls one of the shared checks; the others are unused here.
#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::check_store_faults(data));
