//! Real crashes in the middle of a load: `kill -9` of the agent during an upload and
//! during an import, of containerd during an import, and of the coordinator during a
//! transfer. Afterwards no name may point at missing or un-unpacked content, the load's lease
//! carries its expiry, and a re-run completes, re-sending at most what was in flight.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use lade::bundle::Bundle;
use lade_testkit::harness::daemon_tests_enabled;
use lade_testkit::nodes::{workspace_bin, Node, TEST_TOKEN};
use lade_tests::{big_bundle, load_json, metric, u64_of, wait_for, wait_for_unless};

/// A `lade load` running in the background; its stderr goes to a file so a failure can say
/// what the load printed.
struct BackgroundLoad {
    child: Child,
    stderr: PathBuf,
}

impl BackgroundLoad {
    fn spawn(bundle: &Path, node: &Node) -> Result<BackgroundLoad> {
        let stderr = bundle.with_extension("load.stderr");
        let child = Command::new(workspace_bin("lade")?)
            .arg("load")
            .arg(bundle)
            .args(["--agent", &node.addr(), "--progress", "lines", "-o", "json"])
            .env("LADE_AUTH_TOKEN", TEST_TOKEN)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr)?)
            .spawn()?;
        Ok(BackgroundLoad { child, stderr })
    }

    /// What the load and `node`'s agent printed, for a failure message: first the load's last
    /// line and the agent's last warning or error on one line, then the ends of both logs.
    fn logs(&self, node: &Node) -> String {
        let load = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let agent = std::fs::read_to_string(node.agent.log()).unwrap_or_default();
        let last_load = load.lines().rev().find(|l| !l.trim().is_empty());
        let last_agent = agent
            .lines()
            .rev()
            .find(|l| l.contains("WARN") || l.contains("ERROR"));
        let tail = |text: &str| {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        format!(
            "lade load's last line: {}; agent's last warning: {}\n--- lade load stderr (end):\n{}\n--- agent log (end):\n{}",
            last_load.unwrap_or("(none)"),
            last_agent.unwrap_or("(none)"),
            tail(&load),
            tail(&agent)
        )
    }

    /// Waits up to a minute for `condition` while the load runs; fails at once, with the load's
    /// output, if the load ends first.
    fn wait_while_running(
        &mut self,
        node: &Node,
        what: &str,
        condition: impl FnMut() -> bool,
    ) -> Result<()> {
        let child = &mut self.child;
        let ended = || Ok(child.try_wait()?.map(|s| format!("the load ended ({s})")));
        wait_for_unless(what, Duration::from_secs(60), condition, ended)
            .map_err(|e| anyhow!("{e}; {}", self.logs(node)))
    }

    /// Waits for the load to end; its exit code.
    fn exit_code(&mut self) -> Result<Option<i32>> {
        Ok(self.child.wait()?.code())
    }
}

/// No name may point at missing content or at layers that were not unpacked.
fn assert_nothing_dangling(node: &Node) -> Result<()> {
    let check = node
        .containerd
        .ctr_ok(&["-n", "k8s.io", "images", "check"])?;
    for line in check.lines().skip(1) {
        ensure!(line.contains("complete"), "dangling image: {line}");
    }
    // Every name lade made is unpacked: ask the agent what kubelet would find.
    let names: Vec<String> = node
        .image_names()?
        .into_iter()
        .filter(|n| !n.starts_with("sha256:"))
        .collect();
    for name in names {
        let out = node.run_container(&name, "probe", &["/bin/echo", "ok"]);
        ensure!(out.is_ok(), "{name} is named but cannot run: {out:?}");
    }
    Ok(())
}

/// The load's lease is there and will expire on its own.
fn assert_lease_expires(node: &Node) -> Result<()> {
    let leases = node.containerd.ctr_ok(&["-n", "k8s.io", "leases", "ls"])?;
    let line = leases
        .lines()
        .find(|l| l.contains("lade-load-"))
        .ok_or_else(|| anyhow::anyhow!("no lade lease left: {leases}"))?;
    ensure!(line.contains("containerd.io/gc.expire="), "{line}");
    Ok(())
}

/// Re-runs the load; returns the bytes it sent.
fn rerun(bundle: &Path, node: &Node) -> Result<u64> {
    let (code, reports, stderr) = load_json(bundle, &[node.addr()], &[])?;
    ensure!(code == 0, "re-run failed: {reports:#?}\n{stderr}");
    assert_eq!(u64_of(&reports[0], "images_loaded"), 4);
    Ok(u64_of(&reports[0], "bytes_sent"))
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_killed_mid_upload_then_rerun_resumes() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (bundle, _) = big_bundle(dir.path(), 48 << 20, 11)?;
    let total = Bundle::open(&bundle)?.total_bytes();
    let mut node = Node::start("crash-upload").await?;
    let mut load = BackgroundLoad::spawn(&bundle, &node)?;
    // Past the first few MiB of the big layers, well before the end.
    load.wait_while_running(&node, "an upload in progress", || {
        metric(&node, "lade_agent_received_bytes_total") > (16 << 20) as f64
    })?;
    node.agent.kill();
    let code = load.exit_code()?;
    assert_eq!(
        code,
        Some(1),
        "the node must be reported failed; {}",
        load.logs(&node)
    );
    assert_nothing_dangling(&node)?;

    node.agent.restart().await?;
    assert_lease_expires(&node)?;
    let sent = rerun(&bundle, &node)?;
    // Only what was not yet on the node crossed again: the finished blobs and the kept part
    // of the interrupted one were skipped.
    assert!(sent < total, "sent {sent} of {total}: nothing was resumed");
    assert_nothing_dangling(&node)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_killed_mid_import_leaves_no_dangling_name() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (bundle, _) = big_bundle(dir.path(), 48 << 20, 11)?;
    let mut node = Node::start("crash-import").await?;
    let mut load = BackgroundLoad::spawn(&bundle, &node)?;
    // The first images are imported while the big one still uploads: kill then.
    load.wait_while_running(&node, "an import in progress", || {
        metric(&node, "lade_agent_layer_unpack_duration_seconds_count") >= 1.0
    })?;
    node.agent.kill();
    assert_eq!(load.exit_code()?, Some(1), "{}", load.logs(&node));
    assert_nothing_dangling(&node)?;

    node.agent.restart().await?;
    rerun(&bundle, &node)?;
    assert_nothing_dangling(&node)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn containerd_killed_mid_import_then_rerun_completes() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (bundle, _) = big_bundle(dir.path(), 48 << 20, 11)?;
    let mut node = Node::start("crash-containerd").await?;
    let mut load = BackgroundLoad::spawn(&bundle, &node)?;
    load.wait_while_running(&node, "an import in progress", || {
        metric(&node, "lade_agent_layer_unpack_duration_seconds_count") >= 1.0
    })?;
    node.containerd.kill_9();
    assert_eq!(load.exit_code()?, Some(1), "{}", load.logs(&node));
    node.containerd.restart().await?;
    assert_nothing_dangling(&node)?;

    // The agent reconnects to the restarted containerd by itself.
    rerun(&bundle, &node)?;
    assert_nothing_dangling(&node)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_directories_left_by_a_containerd_crash_do_not_block_a_load() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    // containerd 1.6's overlayfs snapshotter renames a new snapshot's directory into place
    // before recording it; killed in between (which `containerd_killed_mid_import…` hits
    // now and then), it leaves a directory under an ID it hands out again, and every later
    // Prepare fails with "file exists". Made here on purpose: directories for the next IDs
    // on a fresh node, which the load's first Prepares run into.
    let dir = tempfile::tempdir()?;
    let (bundle, _) = big_bundle(dir.path(), 4 << 20, 12)?;
    let node = Node::start("crash-orphans").await?;
    let snapshots = node
        .containerd
        .root()
        .join("io.containerd.snapshotter.v1.overlayfs/snapshots");
    for id in 1..=2 {
        std::fs::create_dir_all(snapshots.join(id.to_string()).join("fs/left-over"))?;
    }
    rerun(&bundle, &node)?;
    assert_nothing_dangling(&node)?;
    // What the orphans held is gone: the IDs now name snapshots the load made.
    for id in 1..=2 {
        assert!(!snapshots.join(format!("{id}/fs/left-over")).exists());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn coordinator_killed_mid_transfer_then_rerun_resumes() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (bundle, _) = big_bundle(dir.path(), 48 << 20, 11)?;
    let total = Bundle::open(&bundle)?.total_bytes();
    let node = Node::start("crash-coordinator").await?;
    let mut load = BackgroundLoad::spawn(&bundle, &node)?;
    load.wait_while_running(&node, "an upload in progress", || {
        metric(&node, "lade_agent_received_bytes_total") > (16 << 20) as f64
    })?;
    load.child.kill()?;
    load.child.wait()?;
    // The agent sees the stream end early and keeps what it got for the next attempt.
    wait_for(
        "the upload to end on the agent",
        Duration::from_secs(60),
        || metric(&node, "lade_agent_inflight_uploads") == 0.0,
    )?;
    assert_nothing_dangling(&node)?;
    assert_lease_expires(&node)?;

    let sent = rerun(&bundle, &node)?;
    assert!(sent < total, "sent {sent} of {total}: nothing was resumed");
    assert_nothing_dangling(&node)?;
    Ok(())
}
