//! Shared setup of lade's end-to-end tests: bundles built from the testkit fixtures.
//! The tests themselves are the `[[test]]` targets of this package.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lade_testkit::fixtures::{
    random_layer, sample_chart, sample_hints, sample_images, write_bundle, ArchiveFormat,
    Compression, ImageFixture, WrittenArchive,
};
use lade_testkit::nodes::{run_lade, Node};

pub mod inproc;
use serde_json::Value;

/// Static busybox from Debian's busybox-static, the one binary the test images run.
pub const BUSYBOX: &str = "/bin/busybox";

/// The names the sample images carry, and where the retag rules the tests pass move them.
pub mod names {
    pub const APP: &str = "release.daocloud.io/demo/app:v1";
    pub const APP_RETAGGED: &str = "10.16.10.111/demo/app:v1";
    pub const SIDECAR: &str = "release.daocloud.io/demo/sidecar:v1";
    pub const SIDECAR_RETAGGED: &str = "10.16.10.111/demo/sidecar:v1";
    pub const BUSYBOX: &str = "docker.io/library/busybox:latest";
    pub const BUSYBOX_RETAGGED: &str = "10.16.10.111/library/busybox:latest";
    pub const RETAG_DEMO: &str = "release.daocloud.io/demo=10.16.10.111/demo";
    pub const RETAG_LIBRARY: &str = "docker.io/library=10.16.10.111/library";
    /// Both rules as `lade load` flags.
    pub const RETAG: [&str; 4] = ["--retag", RETAG_DEMO, "--retag", RETAG_LIBRARY];
}

/// The three sample images (app, sidecar, busybox; one shared base layer).
pub fn images() -> Result<Vec<ImageFixture>> {
    lade_testkit::harness::require_binary("busybox")?;
    sample_images(Path::new(BUSYBOX))
}

/// A bundle of the sample images (go-containerregistry layout, gzip) at `dir/bad.bundle.tar`
/// whose app image's own layer has one byte altered inside the nested images.tar; returns
/// the bundle, the damaged layer's digest and the name of its member.
pub fn damaged_sample_bundle(dir: &Path) -> Result<(PathBuf, String, String)> {
    let (bundle_path, written) = gcr_bundle(dir, "bad.bundle.tar", &images()?, Compression::Gzip)?;
    let layer = &written.images[0].layers[1];
    let bundle = lade::bundle::Bundle::open(&bundle_path)?;
    let lade::bundle::BlobSource::Member { member, offset } =
        bundle.blobs[&layer.digest].source.clone()
    else {
        bail!("layer {} is not a member of the bundle", layer.digest);
    };
    let mut bytes = std::fs::read(&bundle_path)?;
    bytes[(offset + layer.size / 2) as usize] ^= 0x55;
    std::fs::write(&bundle_path, bytes)?;
    Ok((bundle_path, layer.digest.clone(), member))
}

/// Starts an agent for `containerd` that serves TLS with `cert`/`key` and requires client
/// certificates signed by `ca` (and the test token); returns it and its address.
pub async fn spawn_tls_agent(
    name: &str,
    containerd: &lade_testkit::harness::Containerd,
    cert: &Path,
    key: &Path,
    ca: &Path,
) -> Result<(lade_testkit::harness::ChildGuard, String)> {
    use std::ffi::OsStr;
    let port = lade_testkit::harness::free_port();
    let socket = containerd.socket();
    let args = [
        OsStr::new("--containerd-socket"),
        socket.as_os_str(),
        OsStr::new("--tls-cert"),
        cert.as_os_str(),
        OsStr::new("--tls-key"),
        key.as_os_str(),
        OsStr::new("--tls-client-ca"),
        ca.as_os_str(),
    ];
    let agent = lade_testkit::nodes::spawn_agent(
        name,
        port,
        lade_testkit::harness::free_port(),
        &args,
        &containerd.dir().join("agent.log"),
    )
    .await?;
    Ok((agent, format!("127.0.0.1:{port}")))
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

/// Writes `images` as an image archive of `format` in `dir` ([`write_images_tar`]), loads it
/// onto the agent at `agent` and checks that every image loaded; returns the archive.
pub fn load_archive_form(
    dir: &Path,
    images: &[ImageFixture],
    format: ArchiveFormat,
    compression: Compression,
    agent: &str,
) -> Result<PathBuf> {
    let (archive, _) = write_images_tar(dir, images, format, compression)?;
    let (code, reports, stderr) = load_json(&archive, &[agent.to_string()], &[])?;
    anyhow::ensure!(
        code == 0,
        "{format:?}/{compression:?}: {reports:#?}\n{stderr}"
    );
    assert_eq!(
        u64_of(&reports[0], "images_loaded"),
        images.len() as u64,
        "{format:?}"
    );
    Ok(archive)
}

/// Writes `images` as an uncompressed `docker save` archive at `dir/images.tar`.
pub fn docker_save_tar(dir: &Path, images: &[ImageFixture]) -> Result<PathBuf> {
    let (path, _) = write_images_tar(dir, images, ArchiveFormat::DockerSave, Compression::None)?;
    Ok(path)
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

/// A bundle of `images` in the go-containerregistry layout, layers compressed with
/// `compression`, at `dir/<name>`.
pub fn gcr_bundle(
    dir: &Path,
    name: &str,
    images: &[ImageFixture],
    compression: Compression,
) -> Result<(PathBuf, WrittenArchive)> {
    write_sample_bundle(dir, name, images, ArchiveFormat::Gcr, compression)
}

/// The bundle most tests load: the three sample images ([`images`]), go-containerregistry
/// layout, gzip, at `dir/demo.bundle.tar`.
pub fn sample_bundle(dir: &Path) -> Result<(PathBuf, WrittenArchive)> {
    gcr_bundle(dir, "demo.bundle.tar", &images()?, Compression::Gzip)
}

/// Starts one containerd [`Node`] per name, in order.
pub async fn start_nodes(names: &[&str]) -> Result<Vec<Node>> {
    let mut nodes = Vec::new();
    for name in names {
        nodes.push(Node::start(name).await?);
    }
    Ok(nodes)
}

/// [`load_json`] against the agents of `nodes`.
pub fn load(bundle: &Path, nodes: &[&Node], extra: &[&str]) -> Result<(i32, Vec<Value>, String)> {
    let agents: Vec<String> = nodes.iter().map(|n| n.addr()).collect();
    load_json(bundle, &agents, extra)
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

/// Name of the image [`images_and_big`] adds.
pub const BIG_IMAGE: &str = "release.daocloud.io/demo/big:v1";

/// The sample images plus [`BIG_IMAGE`]: the busybox base and one incompressible random layer
/// of each size in `layer_bytes` (seeds `seed`, `seed + 1`, …), so a transfer lasts long
/// enough to be interrupted.
pub fn images_and_big(seed: u64, layer_bytes: &[usize]) -> Result<Vec<ImageFixture>> {
    let mut imgs = images()?;
    let mut layers = vec![imgs[2].layers[0].clone()];
    layers.extend(
        (seed..)
            .zip(layer_bytes)
            .map(|(seed, &bytes)| random_layer(seed, bytes, 0.0)),
    );
    imgs.push(ImageFixture::new(BIG_IMAGE, layers, &["/bin/sh"]));
    Ok(imgs)
}

/// [`images_and_big`] with two layers of `layer_bytes` each, as a bundle at
/// `dir/big.bundle.tar`, layers uncompressed.
pub fn big_bundle(dir: &Path, layer_bytes: usize, seed: u64) -> Result<(PathBuf, WrittenArchive)> {
    let imgs = images_and_big(seed, &[layer_bytes, layer_bytes])?;
    gcr_bundle(dir, "big.bundle.tar", &imgs, Compression::None)
}

/// A plain HTTP/1.1 GET on 127.0.0.1; returns (status code, body).
pub fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP answer: {text}"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((status, body.to_string()))
}

/// A counter of the agent's /metrics (0 when not exported yet or the agent is gone).
pub fn metric(node: &Node, name: &str) -> f64 {
    metric_at(node.agent.metrics_port(), name)
}

/// A counter of the /metrics served on 127.0.0.1:`port`, labels included in `name`
/// (`lade_agent_repairs_total{kind="name"}`); 0 when not exported yet or the agent is gone.
pub fn metric_at(port: u16, name: &str) -> f64 {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return 0.0;
    };
    let _ = write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    );
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// Waits until `condition` holds (polling every 5 ms), at most `limit`.
pub fn wait_for(what: &str, limit: Duration, condition: impl FnMut() -> bool) -> Result<()> {
    wait_for_unless(what, limit, condition, || Ok(None))
}

/// [`wait_for`], but fails at once when `ended` says why `condition` can no longer come (a
/// process it waits on ended); a condition met just before that still counts.
pub fn wait_for_unless(
    what: &str,
    limit: Duration,
    mut condition: impl FnMut() -> bool,
    mut ended: impl FnMut() -> Result<Option<String>>,
) -> Result<()> {
    let deadline = Instant::now() + limit;
    while !condition() {
        if let Some(why) = ended()? {
            if condition() {
                break;
            }
            bail!("{why} before {what}");
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// The directories of the layers of the snapshot chain `top` on `node`, lowest first: the
/// `lowerdir`s of a scratch snapshot prepared on it.
pub fn layer_dirs(node: &Node, top: &str) -> Result<Vec<PathBuf>> {
    let key = format!("compare-{}", std::process::id());
    let out = node.containerd.ctr_ok(&[
        "-n",
        "k8s.io",
        "snapshots",
        "prepare",
        "--mounts",
        &key,
        top,
    ])?;
    node.containerd
        .ctr_ok(&["-n", "k8s.io", "snapshots", "rm", &key])?;
    let mounts: serde_json::Value = serde_json::from_str(&out)?;
    let lower = mounts[0]["Options"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|o| o.as_str()?.strip_prefix("lowerdir="))
        .with_context(|| format!("no lowerdir in {out}"))?;
    let mut dirs: Vec<PathBuf> = lower.trim().split(':').map(PathBuf::from).collect();
    dirs.reverse();
    Ok(dirs)
}

/// A node report's failed images, image name → reason.
pub fn failed_images(report: &Value) -> Result<std::collections::HashMap<String, String>> {
    Ok(report["failed_images"]
        .as_array()
        .context("failed_images")?
        .iter()
        .map(|f| {
            (
                f["image"].as_str().unwrap_or_default().to_string(),
                f["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}
