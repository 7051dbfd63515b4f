//! The body of the `apply_entries` fuzz target: the agent's layer applier
//! (`lade_agent::apply::apply_layer`) on arbitrary bytes, into a fresh scratch directory per
//! input (a plain target, no lower layers) with a 16 MiB expansion limit.
//!
//! It is not in `lib.rs`, which the coordinator's stable corpus test compiles and which
//! therefore cannot depend on the agent: `fuzz_targets/apply_entries.rs` includes this file,
//! and so does `agent/tests/fuzz_corpus.rs`, which replays `fuzz/corpus/apply_entries/` on
//! stable. Without root the applier's chown fails at the first entry; as root it reaches
//! everything (device nodes and xattrs included, all inside the scratch directory).

use lade_agent::apply::{apply_layer, Target};

/// Applies `data` as a layer; panics only on a broken property.
pub fn apply_entries(data: &[u8]) {
    let dir = tempfile::tempdir().expect("creating a scratch dir");
    let target = Target {
        root: dir.path().to_path_buf(),
        parents: vec![],
        overlay: false,
    };
    let plain = !data.starts_with(&[0x1f, 0x8b]) && !data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]);
    if let Ok(applied) = apply_layer(data, &target, 16 << 20) {
        // A plain layer's decompressed stream is the input itself, to its last byte.
        if plain {
            assert_eq!(applied.size, data.len() as u64);
        }
    }
}
