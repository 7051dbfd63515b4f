//! Shared setup of lade's end-to-end tests: bundles built from the testkit fixtures.
//! The tests themselves are the `[[test]]` targets of this package.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use anyhow::Result;
use lade_testkit::fixtures::{
    sample_chart, sample_hints, sample_images, write_bundle, ArchiveFormat, Compression,
    ImageFixture, WrittenArchive,
};

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
