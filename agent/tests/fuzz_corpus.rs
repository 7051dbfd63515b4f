//! The `apply_entries` fuzz corpus as regression inputs on stable: every file under
//! `fuzz/corpus/apply_entries/` goes through the very function the libFuzzer target runs
//! (`fuzz/src/apply_entries.rs`, included below). Run as root to reach every entry kind.

#[path = "../../fuzz/src/apply_entries.rs"]
mod body;

#[test]
fn the_apply_entries_corpus_passes() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/apply_entries");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", dir.display());
    for file in files {
        println!("{}", file.display());
        body::apply_entries(&std::fs::read(&file).unwrap());
    }
}
