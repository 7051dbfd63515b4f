//! The fuzz corpora as regression inputs, on stable and in every CI run: each file committed
//! under `fuzz/corpus/<target>/` goes through the very function its libFuzzer target runs
//! (`fuzz/src/lib.rs`, included below), so a crash found once by `scripts/fuzz` and added to
//! the corpus stays fixed. Real fuzzing needs nightly and is `scripts/fuzz`.
//!
//! The seeds were written by `write_seeds` (ignored; run it with
//! `cargo test -p lade --test fuzz_corpus -- --ignored write_seeds`) from the testkit's
//! fixtures, then extended by fuzzing and minimised with `cargo fuzz cmin`.

#[path = "../../fuzz/src/lib.rs"]
mod targets;

use lade_testkit::fixtures::{
    sample_chart, sample_hints, sample_images_from_bytes, write_bundle_from_reader, ArchiveFormat,
    Compression, ImageFixture, MEDIA_TYPE_OCI_CONFIG,
};
use lade_testkit::hostile::{
    escaping_layer, fuzz_corpus_dir, gzip_bomb, gzip_image, nested_json, oci_layout, raw_tar,
    replay_fuzz_corpus, Member, OciImage,
};

#[test]
fn bundle_open_corpus() {
    replay_fuzz_corpus("bundle_open", targets::bundle_open);
}

#[test]
fn tar_index_corpus() {
    replay_fuzz_corpus("tar_index", targets::tar_index);
}

#[test]
fn hints_corpus() {
    replay_fuzz_corpus("hints", targets::hints);
}

#[test]
fn reference_corpus() {
    replay_fuzz_corpus("reference", targets::reference);
}

fn tiny_images() -> Vec<ImageFixture> {
    sample_images_from_bytes(b"\x7fELF".to_vec())
}

/// Writes the seed corpora: every archive form lade reads, a bundle, and the hostile shapes
/// of `hostile.rs`, all tiny; sample hints and references. Overwrites seeds of the same name
/// and leaves inputs found by fuzzing alone.
#[test]
#[ignore = "writes fuzz/corpus; run by hand when the archive forms change"]
fn write_seeds() {
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = fuzz_corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    let images = tiny_images();
    let one = &images[..1];
    for format in ArchiveFormat::ALL {
        for compression in Compression::ALL {
            let mut out = Vec::new();
            format.write(one, compression, &mut out).unwrap();
            let name = format!("{format:?}-{compression:?}.tar").to_lowercase();
            write("bundle_open", &name, &out);
            if compression == Compression::None {
                write("tar_index", &name, &out);
            }
        }
    }
    let mut inner = Vec::new();
    ArchiveFormat::Gcr
        .write(&images, Compression::Gzip, &mut inner)
        .unwrap();
    let mut bundle = Vec::new();
    write_bundle_from_reader(
        &inner[..],
        inner.len() as u64,
        &sample_hints(),
        &sample_chart(),
        &mut bundle,
    )
    .unwrap();
    write("bundle_open", "bundle.tar", &bundle);

    let (bomb, diff_id) = gzip_bomb(4);
    let mut wrong_type = OciImage::plain("x.io/a:1", vec![b"layer".to_vec()]);
    wrong_type.layers[0].0 = MEDIA_TYPE_OCI_CONFIG.into();
    let hostile: [(&str, Vec<u8>); 6] = [
        (
            "oci-bomb.tar",
            oci_layout(&[gzip_image("x.io/a:1", bomb, &diff_id)]),
        ),
        (
            "oci-escaping-layer.tar",
            oci_layout(&[OciImage::plain("x.io/a:1", vec![escaping_layer("/tmp/x")])]),
        ),
        ("oci-wrong-media-type.tar", oci_layout(&[wrong_type])),
        (
            "docker-symlink-outside.tar",
            raw_tar(&[
                Member::file(
                    "manifest.json",
                    br#"[{"Config":"c.json","RepoTags":["a:1"],"Layers":["l/layer.tar"]}]"#
                        .to_vec(),
                ),
                Member::file(
                    "c.json",
                    br#"{"rootfs":{"diff_ids":["sha256:00"]}}"#.to_vec(),
                ),
                Member::symlink("l/layer.tar", "../../etc/passwd"),
            ]),
        ),
        (
            "nested-json.tar",
            raw_tar(&[Member::file("manifest.json", nested_json(200))]),
        ),
        ("links.tar", {
            let mut pax = Member::file("pax", b"18 path=long/name\n".to_vec());
            pax.kind = tar::EntryType::XHeader;
            raw_tar(&[
                Member::file("a/b", b"data".to_vec()),
                Member::symlink("a/c", "b"),
                Member::hardlink("d", "a/c"),
                Member::dir("e/"),
                pax,
                Member::file("short", b"named by pax".to_vec()),
            ])
        }),
    ];
    for (name, bytes) in &hostile {
        write("bundle_open", name, bytes);
        write("tar_index", name, bytes);
    }

    write("hints", "sample.yaml", sample_hints().as_bytes());
    for (name, text) in [
        ("empty.yaml", ""),
        ("null.yaml", "null\n"),
        ("mapping.yaml", "image: x\n"),
        (
            "mixed.yaml",
            "- \"{{ .global.imageRegistry }}/a:{{ .n.int }}\"\n- \"{{.n.float}}{{ .n.yes }}\"\n\
             - \"{{ .image.tag | quote }}\"\n- \"{{ .sidecar-agent.image.tag }}\"\n- 7\n\
             - \"{{ .10 }}{{ .n.tagged }}{{ .n.nothing }}{{ .n.list }}\"\n- \"a }} b {{\"\n",
        ),
    ] {
        write("hints", name, text.as_bytes());
    }
    // YAML's own bombs: nesting past serde_yaml's recursion limit, and aliases that would
    // expand to 9^9 strings (serde_yaml refuses both).
    write(
        "hints",
        "deep.yaml",
        format!("{}x\n", "- ".repeat(1000)).as_bytes(),
    );
    let mut laughs = String::from(
        "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    for (prev, cur) in ('a'..='h').zip('b'..='i') {
        let refs = vec![format!("*{prev}"); 9].join(",");
        laughs.push_str(&format!("{cur}: &{cur} [{refs}]\n"));
    }
    write("hints", "laughs.yaml", laughs.as_bytes());

    for (i, text) in [
        "busybox",
        "release.daocloud.io/mspider/api:v0.20.1",
        "localhost:5000/a/b:c@sha256:7cc4b5aefd1d0cadf8d97d4350462ba51c694ebca145b08d7d41b41acc8db5aa",
        "[::1]:5000/x\nrelease.daocloud.io/mspider=10.16.10.111/mspider",
        "UPPER/case\ndocker.io/library=reg.io/lib",
        "index.docker.io/library/busybox:1.36\nlibrary/busybox=reg.io/tools/bb",
        "ghcr.io/a/b\nghcr.io/a/b=other.io",
    ]
    .iter()
    .enumerate()
    {
        write("reference", &format!("seed-{i}"), text.as_bytes());
    }
}
