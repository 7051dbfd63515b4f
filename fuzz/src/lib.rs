//! The bodies of lade's fuzz targets, one function per target.
//!
//! They live here, not in `fuzz_targets/`, so that two drivers run the very same code: the
//! libFuzzer binaries (`cargo +nightly fuzz run <target>`, see scripts/fuzz) and the stable
//! regression test `coordinator/tests/fuzz_corpus.rs`, which includes this file and feeds it
//! every input committed under `fuzz/corpus/<target>/`.
//!
//! Each function takes arbitrary bytes and must neither panic nor allocate by a size field it
//! has not checked against the real data. Errors are the expected outcome for most inputs and
//! are ignored; panics (including the properties asserted here) are the findings.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use lade::bundle::tarindex::TarIndex;
use lade::bundle::{Bundle, LayerLimits};
use lade::hints::{Hints, Template};
use lade::reference::{target_names, Reference, RetagRule};

/// Values the `hints` target renders templates against: nested maps, a subchart-style key
/// with a dash, numbers, booleans, null, a list and a tagged value, so every lookup branch
/// is reachable.
pub const HINTS_VALUES: &str = "\
global:
  imageRegistry: 10.16.10.111
image:
  registry: release.daocloud.io
  repository: demo/app
  tag: v1
sidecar-agent:
  image:
    tag: \"1.10\"
n:
  int: 10
  float: 1.5
  big: 18446744073709551615
  yes: true
  nothing: null
  list: [a, b]
  tagged: !custom v9
10: ten
";

/// Layer limits for the fuzzed bundles: small, so a generated bomb costs a few MiB of
/// decompression rather than the production floor's hundreds.
const FUZZ_LAYER_LIMITS: LayerLimits = LayerLimits {
    max_ratio: 100,
    floor: 1 << 20,
};

/// One scratch file per process, rewritten for every input: `Bundle::open` and
/// `TarIndex::build` read from a path, and a new temp file per input would dominate the run.
fn scratch(data: &[u8]) -> std::sync::MutexGuard<'static, PathBuf> {
    static FILE: OnceLock<(tempfile::TempDir, Mutex<PathBuf>)> = OnceLock::new();
    let (_, path) = FILE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("creating a scratch dir");
        let path = dir.path().join("input.tar");
        (dir, Mutex::new(path))
    });
    // A panic in another test thread poisons the lock; the file is rewritten whole anyway.
    let guard = path.lock().unwrap_or_else(|e| e.into_inner());
    let mut file = std::fs::File::create(&*guard).expect("writing the scratch file");
    file.write_all(data).expect("writing the scratch file");
    guard
}

/// `Bundle::open` on the bytes as a file, then every blob read to its end (digests verified
/// on the way) and every image's layers checked.
pub fn bundle_open(data: &[u8]) {
    let path = scratch(data);
    bundle_open_path(&path);
}

fn bundle_open_path(path: &Path) {
    let Ok(bundle) = Bundle::open(path) else {
        return;
    };
    for digest in bundle.blobs.keys() {
        let Ok(mut reader) = bundle.read_blob(digest, 0) else {
            continue;
        };
        while let Ok(Some(chunk)) = reader.next_chunk(64 << 10) {
            assert!(
                !chunk.is_empty(),
                "an empty chunk before the end of {digest}"
            );
        }
    }
    for image in &bundle.images {
        let _ = bundle.check_layers(image, &FUZZ_LAYER_LIMITS);
    }
}

/// `TarIndex::build` on the bytes, then every member resolved and its head and (if small)
/// its whole content read.
pub fn tar_index(data: &[u8]) {
    let path = scratch(data);
    let Ok(index) = TarIndex::build(&path, "fuzz.tar", 0, data.len() as u64) else {
        return;
    };
    for member in index.members() {
        assert!(
            member.offset + member.size <= data.len() as u64,
            "member {} indexed past the end of the archive",
            member.name
        );
        let Ok(resolved) = index.resolve(&member.name) else {
            continue;
        };
        let _ = index.head(resolved, 8);
        if let Ok(bytes) = index.read_small(&member.name, 64 << 10) {
            assert_eq!(bytes.len() as u64, resolved.size, "{}", member.name);
        }
    }
}

/// `Hints::parse` of the bytes as text and every template rendered against [`HINTS_VALUES`];
/// every line is also parsed as a lone template.
pub fn hints(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    static VALUES: OnceLock<serde_yaml::Value> = OnceLock::new();
    let values =
        VALUES.get_or_init(|| serde_yaml::from_str(HINTS_VALUES).expect("HINTS_VALUES is YAML"));
    if let Ok(hints) = Hints::parse(text) {
        for template in &hints.templates {
            let _ = template.render(values);
            let _ = template.paths();
        }
        let _ = hints.render_all(values);
    }
    for line in text.lines() {
        if let Ok(template) = Template::parse(line) {
            assert_eq!(template.text(), line);
            let _ = template.render(values);
        }
    }
}

/// `Reference::parse` of the first line, with the round trips a loaded name depends on:
/// the canonical form and Docker's short form both parse back to the same reference. The
/// second line is parsed as a retag rule (it, too, must read back from its `Display`) and
/// applied to the reference.
pub fn reference(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (first, second) = text.split_once('\n').unwrap_or((text, ""));
    let image = Reference::parse(first).ok();
    if let Some(r) = &image {
        let shown = r.to_string();
        assert_eq!(
            Reference::parse(&shown).as_ref(),
            Ok(r),
            "{first:?} -> {shown:?}"
        );
        let familiar = r.familiar();
        assert_eq!(
            Reference::parse(&familiar).as_ref(),
            Ok(r),
            "{first:?} -> {familiar:?}"
        );
    }
    for candidate in [first, second] {
        let Ok(rule) = candidate.parse::<RetagRule>() else {
            continue;
        };
        let shown = rule.to_string();
        assert_eq!(shown.parse::<RetagRule>().as_ref(), Ok(&rule), "{shown:?}");
        if let Some(r) = &image {
            if let Ok(names) = target_names(r, std::slice::from_ref(&rule), false) {
                assert!(!names.is_empty(), "{rule} left {r} without a name");
                for name in names {
                    assert_eq!(Reference::parse(&name.to_string()), Ok(name));
                }
            }
        }
    }
}
