//! Replays the committed fuzz seed corpora (`fuzz/corpus/<target>/`) through the same
//! checks the libFuzzer targets run, so CI guards those properties on stable without
//! cargo-fuzz or nightly. The checks live in `fuzz/checks.rs`; a crash input found by
//! fuzzing belongs in the corpus of its target once fixed, and is replayed here forever.

#[path = "../fuzz/checks.rs"]
mod checks;

use std::path::Path;

/// Runs `check` on every file of `fuzz/corpus/<target>/`, naming the file that fails.
fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a corpus entry can be read").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "the {target} corpus is empty");
    for path in files {
        let data = std::fs::read(&path).expect("a corpus file can be read");
        let outcome = std::panic::catch_unwind(|| check(&data));
        assert!(outcome.is_ok(), "{target} fails on {}", path.display());
    }
}

#[test]
fn json_decoder_survives_its_corpus() {
    replay("decode_json", checks::check_decode_json);
}

#[test]
fn rkyv_decoder_survives_its_corpus() {
    replay("decode_rkyv", checks::check_decode_rkyv);
}

#[test]
fn wire_values_round_trip_over_their_corpus() {
    replay("wire_value_roundtrip", checks::check_wire_value_roundtrip);
}

#[test]
fn reducers_survive_their_corpus_and_undo_restores_apply() {
    replay("reduce_state", checks::check_reduce_state);
}

#[test]
fn the_store_keeps_what_it_acked_under_io_faults_over_its_corpus() {
    replay("store_faults", checks::check_store_faults);
}
