//! `lade load` end to end: the real `lade` and `lade-agent` binaries against private
//! containerd instances, one per simulated node. Needs containerd, runc and busybox-static
//! (`scripts/test` installs them); fails when they are missing unless
//! LADE_SKIP_DAEMON_TESTS=1 says to skip.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use lade::bundle::Bundle;
use lade_testkit::cri;
use lade_testkit::fixtures::{ArchiveFormat, Compression, APP_HELLO};
use lade_testkit::harness::daemon_tests_enabled;
use lade_testkit::nodes::{run_lade, Node};
use lade_tests::{images, write_sample_bundle};
use serde_json::Value;

const APP: &str = "release.daocloud.io/demo/app:v1";
const APP_RETAGGED: &str = "10.16.10.111/demo/app:v1";
const SIDECAR: &str = "release.daocloud.io/demo/sidecar:v1";
const SIDECAR_RETAGGED: &str = "10.16.10.111/demo/sidecar:v1";
const BUSYBOX: &str = "docker.io/library/busybox:latest";
const BUSYBOX_RETAGGED: &str = "10.16.10.111/library/busybox:latest";
const RETAG_DEMO: &str = "release.daocloud.io/demo=10.16.10.111/demo";
const RETAG_LIBRARY: &str = "docker.io/library=10.16.10.111/library";

/// Runs `lade load` with JSON output; returns (exit code, per-node reports, stderr).
fn load(bundle: &Path, nodes: &[&Node], extra: &[&str]) -> Result<(i32, Vec<Value>, String)> {
    let mut args = vec![
        "load".to_string(),
        bundle.display().to_string(),
        "-o".into(),
        "json".into(),
        "--progress".into(),
        "lines".into(),
    ];
    for n in nodes {
        args.push("--agent".into());
        args.push(n.addr());
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

fn u64_of(report: &Value, key: &str) -> u64 {
    report[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {report}"))
}

async fn start_nodes(names: &[&str]) -> Result<Vec<Node>> {
    let mut nodes = Vec::new();
    for name in names {
        nodes.push(Node::start(name).await?);
    }
    Ok(nodes)
}

#[tokio::test(flavor = "multi_thread")]
async fn three_nodes_get_every_image_and_retag_then_nothing_is_resent() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let imgs = images()?;
    let (bundle, _) = write_sample_bundle(
        dir.path(),
        "demo.bundle.tar",
        &imgs,
        ArchiveFormat::Gcr,
        Compression::Gzip,
    )?;
    let unique_bytes = Bundle::open(&bundle)?.total_bytes();
    let nodes = start_nodes(&["node-a", "node-b", "node-c"]).await?;
    let refs: Vec<&Node> = nodes.iter().collect();

    let retag = ["--retag", RETAG_DEMO, "--retag", RETAG_LIBRARY];
    let (code, reports, stderr) = load(&bundle, &refs, &retag)?;
    ensure!(code == 0, "first load failed: {reports:#?}\n{stderr}");
    let mut expected = vec![
        APP,
        APP_RETAGGED,
        SIDECAR,
        SIDECAR_RETAGGED,
        BUSYBOX,
        BUSYBOX_RETAGGED,
    ];
    expected.sort();
    for (node, report) in nodes.iter().zip(&reports) {
        assert_eq!(report["node"], node.name.as_str());
        assert_eq!(report["ok"], true, "{report}");
        assert_eq!(u64_of(report, "images_loaded"), 3);
        assert_eq!(u64_of(report, "bytes_sent"), unique_bytes, "{report}");
        // CRI adds a `sha256:<config>` record per image it sees; everything else is lade's.
        let (ids, names): (Vec<String>, Vec<String>) = node
            .image_names()?
            .into_iter()
            .partition(|n| n.starts_with("sha256:"));
        assert_eq!(names, expected, "names on {}", node.name);
        let mut configs: Vec<String> = imgs.iter().map(|i| i.config_digest()).collect();
        configs.sort();
        assert_eq!(ids, configs, "CRI image ids on {}", node.name);
        // containerd itself finds all content of every image present.
        let check = node
            .containerd
            .ctr_ok(&["-n", "k8s.io", "images", "check"])?;
        for line in check.lines().skip(1) {
            assert!(line.contains("complete"), "{}: {line}", node.name);
        }
        // What kubelet would see, through the CRI plugin on the same socket.
        let mut seen = None;
        for _ in 0..50 {
            seen = cri::image_status(&node.containerd.socket(), APP_RETAGGED).await?;
            if seen.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let seen =
            seen.with_context(|| format!("CRI on {} does not know {APP_RETAGGED}", node.name))?;
        assert_eq!(seen.id, imgs[0].config_digest());
        assert!(
            seen.repo_tags.contains(&APP_RETAGGED.to_string()),
            "{:?}",
            seen.repo_tags
        );
    }

    // A loaded image runs: the app layer's file is there on top of busybox.
    let out = nodes[1].run_container(
        APP_RETAGGED,
        "smoke",
        &["/bin/busybox", "cat", "/app/hello.txt"],
    )?;
    assert_eq!(out.as_bytes(), APP_HELLO);
    let out = nodes[2].run_container(BUSYBOX_RETAGGED, "echo", &["/bin/echo", "ok"])?;
    assert_eq!(out.trim(), "ok");

    // Second run of the same bundle: nothing crosses the network again.
    let (code, reports, stderr) = load(&bundle, &refs, &retag)?;
    ensure!(code == 0, "second load failed: {reports:#?}\n{stderr}");
    for report in &reports {
        assert_eq!(u64_of(report, "bytes_sent"), 0, "{report}");
        assert_eq!(u64_of(report, "blobs_sent"), 0, "{report}");
        assert_eq!(u64_of(report, "bytes_skipped"), unique_bytes, "{report}");
    }
    Ok(())
}
