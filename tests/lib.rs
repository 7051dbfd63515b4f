//! Shared setup of lade's end-to-end tests: bundles built from the testkit fixtures.
//! The tests themselves are the `[[test]]` targets of this package.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use lade_testkit::fixtures::{
    sample_chart, sample_hints, sample_images, write_bundle, ArchiveFormat, Compression,
    ImageFixture, WrittenArchive,
};
use lade_testkit::nodes::run_lade;
use serde_json::Value;

/// Static busybox from Debian's busybox-static, the one binary the test images run.
pub const BUSYBOX: &str = "/bin/busybox";

/// The three sample images (app, sidecar, busybox; one shared base layer).
pub fn images() -> Result<Vec<ImageFixture>> {
    lade_testkit::harness::require_binary("busybox")?;
    sample_images(Path::new(BUSYBOX))
}

/// Writes `images` as an image archive of `format` at `dir/images.tar`.
pub fn write_images_tar(
    dir: &Path,
    images: &[ImageFixture],
    format: ArchiveFormat,
    compression: Compression,
) -> Result<(PathBuf, WrittenArchive)> {
    let path = dir.join("images.tar");
    let mut out = BufWriter::new(File::create(&path)?);
    let written = format.write(images, compression, &mut out)?;
    out.into_inner()?.sync_all()?;
    Ok((path, written))
}

/// Writes a DaoCloud-style bundle around `images` at `dir/<name>`.
pub fn write_sample_bundle(
    dir: &Path,
    name: &str,
    images: &[ImageFixture],
    format: ArchiveFormat,
    compression: Compression,
) -> Result<(PathBuf, WrittenArchive)> {
    let sub = dir.join(format!("{name}.parts"));
    std::fs::create_dir_all(&sub)?;
    let (images_tar, written) = write_images_tar(&sub, images, format, compression)?;
    let path = dir.join(name);
    let mut out = BufWriter::new(File::create(&path)?);
    write_bundle(&images_tar, &sample_hints(), &sample_chart(), &mut out)?;
    out.into_inner()?.sync_all()?;
    Ok((path, written))
}

/// Runs `lade load BUNDLE` against `agents` with JSON output and line progress, plus `extra`
/// arguments; returns (exit code, per-node reports, stderr).
pub fn load_json(
    bundle: &Path,
    agents: &[String],
    extra: &[&str],
) -> Result<(i32, Vec<Value>, String)> {
    let mut args = vec![
        "load".to_string(),
        bundle.display().to_string(),
        "-o".into(),
        "json".into(),
        "--progress".into(),
        "lines".into(),
    ];
    for agent in agents {
        args.extend(["--agent".to_string(), agent.clone()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_lade(&argv)?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let reports: Vec<Value> = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "lade printed no JSON summary; stdout: {} stderr: {stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    Ok((out.status.code().unwrap_or(-1), reports, stderr))
}

/// A number field of a node report.
pub fn u64_of(report: &Value, key: &str) -> u64 {
    report[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {report}"))
}

/// How tests reach the simulated agents: they all require the harness's token.
pub fn dial() -> lade::load::Dial {
    lade::load::Dial {
        timeout: std::time::Duration::from_secs(5),
        credentials: lade::load::Credentials::token(lade_testkit::nodes::TEST_TOKEN)
            .expect("the test token is ASCII"),
    }
}
