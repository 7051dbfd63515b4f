//! The `apply_entries` fuzz corpus as regression inputs on stable: every file under
//! `fuzz/corpus/apply_entries/` goes through the very function the libFuzzer target runs
//! (`fuzz/src/apply_entries.rs`, included below). Run as root to reach every entry kind.

#[path = "../../fuzz/src/apply_entries.rs"]
mod body;

#[test]
fn the_apply_entries_corpus_passes() {
    lade_testkit::hostile::replay_fuzz_corpus("apply_entries", body::apply_entries);
}
