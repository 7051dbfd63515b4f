//! The `lade` binary's command line: `inspect` output, exit codes on bad input, and `--help`
//! snapshots (set LADE_UPDATE_SNAPSHOTS=1 to rewrite them after an intended change).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::{Command, Output};

use lade_testkit::fixtures::{
    sample_chart, sample_hints, sample_images_from_bytes, write_bundle, ArchiveFormat, Compression,
};

fn lade(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lade"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .expect("running lade")
}

fn sample_bundle(dir: &Path) -> std::path::PathBuf {
    let images = sample_images_from_bytes(b"not busybox".repeat(50));
    let images_tar = dir.join("images.tar");
    let mut out = BufWriter::new(File::create(&images_tar).unwrap());
    ArchiveFormat::Gcr
        .write(&images, Compression::Gzip, &mut out)
        .unwrap();
    out.flush().unwrap();
    let path = dir.join("demo.bundle.tar");
    let mut out = BufWriter::new(File::create(&path).unwrap());
    write_bundle(&images_tar, &sample_hints(), &sample_chart(), &mut out).unwrap();
    out.flush().unwrap();
    path
}

#[test]
fn inspect_lists_images_shared_layers_and_hints() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = sample_bundle(dir.path());
    let out = lade(&["inspect", bundle.to_str().unwrap(), "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["kind"], "bundle");
    assert_eq!(doc["format"], "docker-archive");
    assert_eq!(doc["images"].as_array().unwrap().len(), 3);
    let shared = doc["shared_layers"].as_array().unwrap();
    assert_eq!(shared.len(), 1, "{shared:?}");
    assert_eq!(shared[0]["images"].as_array().unwrap().len(), 3);
    let hints = &doc["hints"];
    assert_eq!(hints["templates"].as_array().unwrap().len(), 2);
    let paths: Vec<&str> = hints["value_paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(paths.contains(&".app.image.tag"), "{paths:?}");
    assert!(
        paths.contains(&".sidecar-agent.image.repository"),
        "{paths:?}"
    );
    assert_eq!(doc["chart_files"], 2);

    let text = lade(&["inspect", bundle.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("release.daocloud.io/demo/app:v1"), "{text}");
    assert!(text.contains("shared layers:"), "{text}");
    assert!(
        text.contains(
            "used by release.daocloud.io/demo/app:v1, release.daocloud.io/demo/sidecar:v1, busybox"
        ),
        "{text}"
    );
}

#[test]
fn bad_input_exits_2_and_names_the_culprit() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.tar");
    let out = lade(&["inspect", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope.tar"), "{err}");

    let bundle = sample_bundle(dir.path());
    let out = lade(&[
        "load",
        bundle.to_str().unwrap(),
        "--agent",
        "127.0.0.1:1",
        "--retag",
        "release.daocloud.io/demo=10.0.0.1/Demo",
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a bad rule stops before any node is contacted"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("10.0.0.1/Demo"), "{err}");
}

fn check_snapshot(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(name);
    if std::env::var_os("LADE_UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "no snapshot {}; run with LADE_UPDATE_SNAPSHOTS=1",
            path.display()
        )
    });
    assert_eq!(
        actual, expected,
        "help changed; if intended, rerun with LADE_UPDATE_SNAPSHOTS=1"
    );
}

#[test]
fn help_matches_snapshots() {
    for (args, name) in [
        (&["--help"][..], "help.txt"),
        (&["load", "--help"][..], "load-help.txt"),
        (&["upgrade", "--help"][..], "upgrade-help.txt"),
        (&["inspect", "--help"][..], "inspect-help.txt"),
    ] {
        let out = lade(args);
        assert!(out.status.success());
        check_snapshot(name, &String::from_utf8_lossy(&out.stdout));
    }
}

#[test]
fn retag_rules_that_merge_two_images_under_one_name_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = sample_bundle(dir.path());
    // Two repositories mapped onto one: app:v1 and sidecar:v1 would both be one/…:v1.
    let out = lade(&[
        "load",
        bundle.to_str().unwrap(),
        "--agent",
        "127.0.0.1:1",
        "--retag",
        "release.daocloud.io/demo/app=10.0.0.1/demo/one",
        "--retag",
        "release.daocloud.io/demo/sidecar=10.0.0.1/demo/one",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("10.0.0.1/demo/one:v1") && err.contains("two different images"),
        "{err}"
    );
}
