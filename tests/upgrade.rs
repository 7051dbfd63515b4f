//! `lade load --then-upgrade` and `lade upgrade` end to end: the real `lade` and `lade-agent`
//! binaries against private containerd instances, one per simulated node, with the recording
//! stand-in `helm` (lade-testkit's `FakeHelm`) on PATH, since no helm binary or API server is
//! available. The preflight asks the real agents, so it sees what kubelet would. Needs what
//! tests/load.rs needs; LADE_SKIP_DAEMON_TESTS=1 skips it explicitly.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use lade_testkit::fixtures::{sample_chart, write_bundle, ArchiveFormat, Compression};
use lade_testkit::harness::daemon_tests_enabled;
use lade_testkit::helm::{FakeHelm, HelmCall, Reply};
use lade_testkit::nodes::{workspace_bin, Node, TEST_TOKEN};
use lade_tests::{images, write_images_tar};

/// Every image of the sample chart, named through global.imageRegistry (the sidecar through a
/// dashed, subchart-style key), as the chart would pull them.
const HINTS: &str = "\
- \"{{ .global.imageRegistry }}/demo/app:{{ .app.image.tag }}\"
- \"{{ .global.imageRegistry }}/demo/sidecar:{{ .sidecar-agent.image.tag }}\"
- \"{{ .global.imageRegistry }}/library/busybox:latest\"
";
const RETAG: [&str; 4] = [
    "--retag",
    "release.daocloud.io/demo=10.16.10.111/demo",
    "--retag",
    "docker.io/library=10.16.10.111/library",
];
const SIDECAR_RETAGGED: &str = "10.16.10.111/demo/sidecar:v1";
const CURRENT_VALUES: &str = "replicas: 2\nglobal:\n  imageRegistry: release.daocloud.io\n";

/// The stand-in helm answering an upgrade of release `demo` (revision 5) that succeeds.
fn upgrading_helm() -> Result<FakeHelm> {
    let helm = FakeHelm::new()?;
    helm.reply("get values", Reply::ok(CURRENT_VALUES))?;
    helm.reply("status", Reply::ok(r#"{"name":"demo","version":5}"#))?;
    helm.reply(
        "upgrade",
        Reply::ok("Release \"demo\" has been upgraded.\n"),
    )?;
    Ok(helm)
}

/// A bundle of the sample images and chart with `hints` as its hints.yaml.
fn write_hinted_bundle(dir: &Path, hints: &str) -> Result<PathBuf> {
    let parts = dir.join("parts");
    std::fs::create_dir(&parts)?;
    let (images_tar, _) =
        write_images_tar(&parts, &images()?, ArchiveFormat::Gcr, Compression::Gzip)?;
    let path = dir.join("demo.bundle.tar");
    let mut out = BufWriter::new(File::create(&path)?);
    write_bundle(&images_tar, hints, &sample_chart(), &mut out)?;
    out.into_inner()?.sync_all()?;
    Ok(path)
}

/// Runs the real `lade` with the stand-in helm first on PATH; (exit code, stdout, stderr).
fn lade(helm: &FakeHelm, args: &[String]) -> Result<(i32, String, String)> {
    let out = Command::new(workspace_bin("lade")?)
        .args(args)
        .env("PATH", helm.path_env()?)
        .env("RUST_LOG", "warn")
        .env("LADE_AUTH_TOKEN", TEST_TOKEN)
        .output()
        .context("running lade")?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn args(command: &str, bundle: &Path, nodes: &[&Node], extra: &[&str]) -> Vec<String> {
    let mut all = vec![command.to_string(), bundle.display().to_string()];
    for node in nodes {
        all.extend(["--agent".to_string(), node.addr()]);
    }
    all.extend(RETAG.iter().chain(extra).map(|s| s.to_string()));
    all.extend(
        ["--release", "demo", "-n", "demo-system"]
            .iter()
            .map(|s| s.to_string()),
    );
    all
}

fn subcommands(calls: &[HelmCall]) -> Vec<String> {
    calls.iter().map(HelmCall::subcommand).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn load_then_upgrade_runs_helm_once_every_node_holds_every_image() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let bundle = write_hinted_bundle(dir.path(), HINTS)?;
    let a = Node::start("up-a").await?;
    let b = Node::start("up-b").await?;
    let helm = upgrading_helm()?;

    // Load and upgrade in one run; the registry comes from the retag rules.
    let load = args(
        "load",
        &bundle,
        &[&a, &b],
        &["--progress", "none", "--then-upgrade"],
    );
    let (code, stdout, stderr) = lade(&helm, &load)?;
    ensure!(code == 0, "load --then-upgrade failed:\n{stdout}\n{stderr}");
    for node in [&a, &b] {
        ensure!(
            node.image_names()?.contains(&SIDECAR_RETAGGED.to_string()),
            "{} lacks {SIDECAR_RETAGGED}",
            node.name
        );
    }
    let table: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("IMAGE"))
        .take(4)
        .collect();
    assert_eq!(
        table,
        [
            "IMAGE (from hints.yaml)              up-a  up-b",
            "10.16.10.111/demo/app:v1             ok    ok",
            "10.16.10.111/demo/sidecar:v1         ok    ok",
            "10.16.10.111/library/busybox:latest  ok    ok",
        ],
        "{stdout}"
    );
    let calls = helm.calls()?;
    assert_eq!(subcommands(&calls), ["get values", "status", "upgrade"]);
    let upgrade = &calls[2];
    assert_eq!(
        upgrade.argv[..3],
        ["upgrade", "--install", "demo"].map(String::from)
    );
    assert!(upgrade.argv[3].ends_with("/original-chart"), "{upgrade:?}");
    assert_eq!(
        upgrade.values,
        [Some(
            "replicas: 2\nglobal:\n  imageRegistry: 10.16.10.111\n".to_string()
        )]
    );
    assert!(
        stdout.contains("to return to revision 5: helm rollback demo 5 -n demo-system"),
        "{stdout}"
    );

    // An image name lost on one node: the preflight (real Verify) stops the next upgrade.
    b.containerd
        .ctr_ok(&["-n", "k8s.io", "images", "rm", SIDECAR_RETAGGED])?;
    let (code, stdout, stderr) = lade(&helm, &args("upgrade", &bundle, &[&a, &b], &[]))?;
    assert_eq!(code, 3, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("10.16.10.111/demo/sidecar:v1         ok    MISSING"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "up-b ({}): 10.16.10.111/demo/sidecar:v1: ",
            b.addr()
        )),
        "{stdout}"
    );
    assert!(
        stderr.contains(&format!("lade load BUNDLE --agent {}", b.addr())),
        "{stderr}"
    );
    assert_eq!(subcommands(&helm.calls()?).len(), 5, "no new upgrade ran");

    // Loading again puts the name back (its content never left), and the upgrade goes on.
    let (code, stdout, stderr) = lade(&helm, &load)?;
    ensure!(
        code == 0,
        "second load --then-upgrade failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("nothing sent: every node already held every blob"),
        "{stdout}"
    );
    let calls = helm.calls()?;
    assert_eq!(
        subcommands(&calls[5..]),
        ["get values", "status", "upgrade"]
    );
    Ok(())
}

/// The manifest digest of the bundle image named `name` (before retagging).
fn manifest_of(bundle: &Path, name: &str) -> Result<String> {
    let opened = lade::bundle::Bundle::open(bundle)?;
    opened
        .images
        .iter()
        .find(|i| i.names.iter().any(|n| n == name))
        .map(|i| i.manifest.clone())
        .with_context(|| format!("no image {name} in {}", bundle.display()))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_preflight_finds_digest_pinned_images_and_only_by_their_own_digest() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    // A chart pinning images by digest: by repository and digest, and by tag and digest
    // (which CRI resolves by the digest alone).
    const DIGEST_HINTS: &str = "\
- \"{{ .global.imageRegistry }}/demo/app@{{ .app.image.digest }}\"
- \"{{ .global.imageRegistry }}/demo/sidecar:{{ .sidecar-agent.image.tag }}@{{ .sidecar-agent.image.digest }}\"
";
    let dir = tempfile::tempdir()?;
    let bundle = write_hinted_bundle(dir.path(), DIGEST_HINTS)?;
    let app = manifest_of(&bundle, "release.daocloud.io/demo/app:v1")?;
    let sidecar = manifest_of(&bundle, "release.daocloud.io/demo/sidecar:v1")?;

    let node = Node::start("up-pinned").await?;
    let helm = upgrading_helm()?;
    let digests = format!("app.image.digest={app},sidecar-agent.image.digest={sidecar}");
    let load = args(
        "load",
        &bundle,
        &[&node],
        &["--progress", "none", "--then-upgrade", "--set", &digests],
    );
    let (code, stdout, stderr) = lade(&helm, &load)?;
    ensure!(code == 0, "load --then-upgrade failed:\n{stdout}\n{stderr}");
    for pinned in [
        format!("10.16.10.111/demo/app@{app}"),
        format!("10.16.10.111/demo/sidecar@{sidecar}"),
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&pinned))
            .with_context(|| format!("{pinned} not in the preflight table:\n{stdout}"))?;
        assert!(line.ends_with(" ok"), "{stdout}");
    }
    assert_eq!(
        subcommands(&helm.calls()?),
        ["get values", "status", "upgrade"]
    );

    // The app's repository at the sidecar's digest is no image the node holds.
    let swapped = format!("app.image.digest={sidecar},sidecar-agent.image.digest={sidecar}");
    let upgrade = args("upgrade", &bundle, &[&node], &["--set", &swapped]);
    let (code, stdout, stderr) = lade(&helm, &upgrade)?;
    assert_eq!(code, 3, "{stdout}\n{stderr}");
    let wrong = format!("10.16.10.111/demo/app@{sidecar}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with(&wrong) && l.ends_with("MISSING")),
        "{stdout}"
    );
    assert_eq!(
        subcommands(&helm.calls()?)[3..],
        ["get values", "status"],
        "no new upgrade ran"
    );
    Ok(())
}
