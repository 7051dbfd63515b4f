//! How `lade load` handles a node that fails under it, with faults injected into agents served
//! in this process over the in-memory runtime (no root, no daemon): a node that refuses a
//! blob, is lost mid-stream, stalls, or fails an image's import is named in the JSON summary,
//! the load exits non-zero, the other nodes load every image, and a second load completes the
//! failed node. Each case runs with `--relay off` and with the default relay.

use std::path::PathBuf;

use anyhow::{ensure, Result};
use lade_proto::CHUNK_SIZE;
use lade_testkit::fixtures::{Compression, WrittenArchive};
use lade_tests::inproc::{load_json_async, Fault, MemoryNode};
use lade_tests::{gcr_bundle, images_and_big, BIG_IMAGE};
use serde_json::Value;

/// Nodes per cluster: with the default relay, a tree of three has a root and two children.
const NODES: usize = 3;

/// The node the faults strike: not one of the relay's two roots (the first two nodes), a
/// child of the first. [`a_relay_root_that_stops_reading_fails_alone`] strikes a root.
const BAD: usize = 2;

/// The relay's second root: the coordinator's second send goes to it.
const SECOND_ROOT: usize = 1;

/// `--relay off`.
const DIRECT: &[&str] = &["--relay", "off"];

/// The default relay (a tree).
const RELAY: &[&str] = &[];

/// In-process nodes and a bundle of the sample images plus [`BIG_IMAGE`], whose own layer
/// spans several chunks, so a transfer can be cut inside it.
struct Cluster {
    _dir: tempfile::TempDir,
    bundle: PathBuf,
    written: WrittenArchive,
    nodes: Vec<MemoryNode>,
    /// The node the fault strikes.
    bad: usize,
}

impl Cluster {
    async fn start(name: &str) -> Result<Cluster> {
        Cluster::start_with(name, BAD).await
    }

    /// As [`Cluster::start`], the fault striking node `bad`.
    async fn start_with(name: &str, bad: usize) -> Result<Cluster> {
        let dir = tempfile::tempdir()?;
        let imgs = images_and_big(31, &[3 * CHUNK_SIZE])?;
        let (bundle, written) =
            gcr_bundle(dir.path(), "faults.bundle.tar", &imgs, Compression::None)?;
        let names: Vec<String> = (0..NODES).map(|i| format!("{name}-{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let nodes = MemoryNode::start_all(&names).await?;
        Ok(Cluster {
            _dir: dir,
            bundle,
            written,
            nodes,
            bad,
        })
    }

    /// The big image's own layer.
    fn big_layer(&self) -> String {
        self.written.images[3].layers[1].digest.clone()
    }

    fn bad(&self) -> &MemoryNode {
        &self.nodes[self.bad]
    }

    /// `lade load -o json` onto every node with `extra` flags: (exit code, reports, stderr).
    async fn load(&self, extra: &[&str]) -> Result<(i32, Vec<Value>, String)> {
        let nodes: Vec<&MemoryNode> = self.nodes.iter().collect();
        load_json_async(&self.bundle, &nodes, extra).await
    }

    /// The load failed on the bad node alone: exit code 1, its report not ok and its reason
    /// passing `why`; every other node loaded every image, and holds the big image's name.
    fn failed_alone(
        &self,
        (code, reports, stderr): &(i32, Vec<Value>, String),
        why: impl Fn(&Value) -> bool,
    ) -> Result<()> {
        ensure!(*code == 1, "a failed node must fail the load\n{stderr}");
        ensure!(reports.len() == NODES, "{reports:#?}");
        for (i, (node, report)) in self.nodes.iter().zip(reports).enumerate() {
            ensure!(report["agent"] == node.addr().as_str(), "{report:#}");
            if i == self.bad {
                ensure!(
                    report["ok"] == false,
                    "the bad node counts as loaded: {report:#}"
                );
                ensure!(
                    why(report),
                    "the bad node's report does not say why: {report:#}"
                );
            } else {
                ensure!(
                    report["ok"] == true && report["images_loaded"] == report["images"],
                    "node {i} did not load: {report:#}\n{stderr}"
                );
                ensure!(
                    node.runtime.image_names().contains_key(BIG_IMAGE),
                    "node {i} lacks {BIG_IMAGE}"
                );
            }
        }
        Ok(())
    }

    /// A second load, the faults cleared: every node ends complete, the nodes that had
    /// everything are sent nothing, and the bad node is sent blobs again if `resend`.
    async fn rerun(&self, extra: &[&str], resend: bool) -> Result<Vec<Value>> {
        self.bad().revive().await?;
        let (code, reports, stderr) = self.load(extra).await?;
        ensure!(code == 0, "{reports:#?}\n{stderr}");
        for (i, (node, report)) in self.nodes.iter().zip(&reports).enumerate() {
            ensure!(
                report["ok"] == true && report["images_loaded"] == report["images"],
                "node {i}: {report:#}"
            );
            ensure!(node.runtime.image_names().contains_key(BIG_IMAGE));
            if i != self.bad {
                ensure!(
                    report["blobs_sent"] == 0,
                    "node {i} was sent blobs again: {report:#}"
                );
            }
        }
        let bad = &reports[self.bad];
        ensure!(
            (bad["blobs_sent"].as_u64() > Some(0)) == resend,
            "the bad node was sent {} blobs: {bad:#}",
            bad["blobs_sent"]
        );
        Ok(reports)
    }
}

/// Whether the report's node error, or one of its failed images' reasons, contains `text`.
fn says(report: &Value, text: &str) -> bool {
    let error = report["error"].as_str().unwrap_or_default();
    let images = report["failed_images"].as_array().into_iter().flatten();
    error.contains(text)
        || images
            .filter_map(|f| f["reason"].as_str())
            .any(|r| r.contains(text))
}

async fn refused_blob(name: &str, relay: &[&str]) -> Result<()> {
    let cluster = Cluster::start(name).await?;
    let layer = cluster.big_layer();
    cluster
        .bad()
        .runtime
        .inject(Fault::RefuseBlob(layer.clone()));
    let outcome = cluster.load(relay).await?;
    cluster.failed_alone(&outcome, |r| says(r, &layer))?;
    ensure!(
        !cluster.bad().runtime.image_names().contains_key(BIG_IMAGE),
        "the image whose blob was refused got a name"
    );
    cluster.rerun(relay, true).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_refuses_a_blob_fails_alone() -> Result<()> {
    refused_blob("refuse-direct", DIRECT).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_refuses_a_relayed_blob_fails_alone() -> Result<()> {
    refused_blob("refuse-relay", RELAY).await
}

/// Bytes of uploads the lost node takes before it drops off: inside the big layer's second
/// chunk whatever came before it.
const LOST_AFTER: u64 = CHUNK_SIZE as u64 + 4096;

async fn lost_mid_stream(name: &str, relay: &[&str]) -> Result<()> {
    let cluster = Cluster::start(name).await?;
    cluster.bad().runtime.inject(Fault::LoseAfter(LOST_AFTER));
    let outcome = cluster.load(relay).await?;
    cluster.failed_alone(&outcome, |r| r["error"].is_string())?;
    ensure!(
        *cluster.bad().runtime.lost().borrow(),
        "the fault never struck"
    );
    let reports = cluster.rerun(relay, true).await?;
    // What arrived before the loss was kept and not sent again.
    let bad = &reports[BAD];
    ensure!(bad["bytes_skipped"].as_u64() >= Some(LOST_AFTER), "{bad:#}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_lost_mid_stream_is_named_and_the_others_load() -> Result<()> {
    lost_mid_stream("lost-direct", DIRECT).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_node_lost_mid_stream_is_named_and_the_others_load() -> Result<()> {
    lost_mid_stream("lost-relay", RELAY).await
}

/// The stalled node is given up after this; no retry.
const STALL_FLAGS: [&str; 4] = ["--node-timeout", "5s", "--retries", "0"];

async fn stalled(name: &str, relay: &[&str]) -> Result<()> {
    let cluster = Cluster::start(name).await?;
    cluster
        .bad()
        .runtime
        .inject(Fault::Stall(Some(cluster.big_layer())));
    let flags: Vec<&str> = relay.iter().chain(&STALL_FLAGS).copied().collect();
    let outcome = cluster.load(&flags).await?;
    cluster.failed_alone(&outcome, |r| r["error_kind"] == "timeout")?;
    cluster.rerun(relay, true).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_stalls_is_given_up_and_the_others_load() -> Result<()> {
    stalled("stall-direct", DIRECT).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_node_that_stalls_is_given_up_and_the_others_load() -> Result<()> {
    stalled("stall-relay", RELAY).await
}

/// The relay's second root takes the coordinator's send of its first blob and never reads
/// another byte (every upload into it stalls). Its blob goes to the first root once the
/// others move bytes without it, so the other nodes load everything well before the stalled
/// one is given up at `--node-timeout` (before, they waited with it until `--stall-timeout`,
/// here 60 s, and timed out with it).
#[tokio::test(flavor = "multi_thread")]
async fn a_relay_root_that_stops_reading_fails_alone() -> Result<()> {
    let cluster = Cluster::start_with("stopped-root", SECOND_ROOT).await?;
    cluster.bad().runtime.inject(Fault::Stall(None));
    let flags = [
        "--node-timeout",
        "15s",
        "--retries",
        "0",
        "--stall-timeout",
        "60s",
    ];
    let outcome = cluster.load(&flags).await?;
    cluster.failed_alone(&outcome, |r| r["error_kind"] == "timeout")?;
    for (i, report) in outcome.1.iter().enumerate() {
        let seconds = report["seconds"].as_f64().unwrap_or(f64::MAX);
        ensure!(
            i == SECOND_ROOT || seconds < 12.0,
            "node {i} finished only after {seconds} s, waiting for the stopped root: {report:#}\n{}",
            outcome.2
        );
    }
    cluster.rerun(RELAY, true).await?;
    Ok(())
}

async fn failed_import(name: &str, relay: &[&str]) -> Result<()> {
    let cluster = Cluster::start(name).await?;
    cluster
        .bad()
        .runtime
        .inject(Fault::FailImport(BIG_IMAGE.to_string()));
    let outcome = cluster.load(relay).await?;
    cluster.failed_alone(&outcome, |r| {
        let failed = r["failed_images"].as_array();
        failed.is_some_and(|f| f.len() == 1 && f[0]["image"] == BIG_IMAGE)
            && r["images_loaded"].as_u64() == r["images"].as_u64().map(|n| n - 1)
    })?;
    ensure!(!cluster.bad().runtime.image_names().contains_key(BIG_IMAGE));
    // Its blobs were all there: only the import was missing.
    cluster.rerun(relay, false).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_whose_import_fails_names_the_image_and_the_others_load() -> Result<()> {
    failed_import("import-direct", DIRECT).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_node_whose_import_fails_names_the_image_and_the_others_load() -> Result<()> {
    failed_import("import-relay", RELAY).await
}

/// The relay's first root stores every blob it is sent but serves its peers nothing (their
/// reads of it hang). Fetches from it into both other nodes stall, so it serves no more in
/// this load: the blobs only it holds go to another root, and every node loads well before
/// `--stall-timeout` (60 s here; before, the others waited that long for it).
#[tokio::test(flavor = "multi_thread")]
async fn a_source_that_serves_nothing_is_given_up_as_a_source() -> Result<()> {
    let cluster = Cluster::start_with("silent-source", 0).await?;
    cluster.bad().runtime.inject(Fault::StallServe);
    let (code, reports, stderr) = cluster.load(&["--stall-timeout", "60s"]).await?;
    ensure!(code == 0, "every node loads\n{reports:#?}\n{stderr}");
    for (i, report) in reports.iter().enumerate() {
        ensure!(
            report["ok"] == true && report["images_loaded"] == report["images"],
            "node {i}: {report:#}\n{stderr}"
        );
        let seconds = report["seconds"].as_f64().unwrap_or(f64::MAX);
        ensure!(
            seconds < 20.0,
            "node {i} took {seconds} s: it waited for the silent source\n{stderr}"
        );
    }
    ensure!(
        stderr.contains("peers reading from this node get nothing"),
        "the silent source was never read from, so this shows nothing: {stderr}"
    );
    Ok(())
}

/// A slow node's link: bytes per second it stores and serves.
const SLOW_RATE: u64 = CHUNK_SIZE as u64 / 2;

/// The relay's first node (its first root) takes and serves bytes at [`SLOW_RATE`], far below
/// the others: once its transfers prove it slow, the coordinator feeds another node and the
/// fast nodes stop waiting for it. They finish in well under half the slow node's time
/// (the big image alone is 12 chunks, at half a chunk a second on the slow node); before, every
/// blob went through the first node and everyone finished with it.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_first_node_does_not_hold_the_others_back() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let imgs = images_and_big(41, &[6 * CHUNK_SIZE, 6 * CHUNK_SIZE])?;
    let (bundle, _) = gcr_bundle(dir.path(), "slow.bundle.tar", &imgs, Compression::None)?;
    let names = ["slow-0", "slow-1", "slow-2", "slow-3"];
    let nodes = MemoryNode::start_all(&names).await?;
    nodes[0].runtime.inject(Fault::Throttle(SLOW_RATE));
    let refs: Vec<&MemoryNode> = nodes.iter().collect();
    let (code, reports, stderr) = load_json_async(&bundle, &refs, RELAY).await?;
    ensure!(code == 0, "every node loads, the slow one too\n{stderr}");
    let seconds = |r: &Value| r["seconds"].as_f64().unwrap_or(f64::MAX);
    let slow = seconds(&reports[0]);
    ensure!(
        slow >= 10.0,
        "the slow node took {slow} s: not slow, the test shows nothing: {reports:#?}"
    );
    for report in &reports[1..] {
        ensure!(
            seconds(report) * 2.0 < slow,
            "a fast node waited for the slow first node ({} s vs {slow} s): {report:#}\n{stderr}",
            seconds(report)
        );
    }
    Ok(())
}
