//! The keep-present pass: an agent puts back the names, pins, snapshots and content of the
//! bundle versions it holds, fetching missing blobs from a peer agent.
//!
//! The first tests run agents over the in-memory runtime in this process (no daemon): two
//! nodes load the sample bundle and hold it, then one loses names, blobs, pins or snapshots
//! and a Keep call (or the loop) repairs it. They run on a multi-threaded runtime: reading
//! an agent's /metrics blocks a thread while the agents are served in this process.
//!
//! The `containerd_` tests run the real agent on private containerd nodes: images and
//! content removed with `ctr` come back from a peer by the loop, and a containerd restart
//! or the removal of a held name starts a pass at once. On Docker, a tag removed with
//! `docker rmi` comes back at once (dockerd's image events).

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use lade_agent::keep::KeepConfig;
use lade_agent::runtime::memory::Memory;
use lade_agent::runtime::Runtime;
use lade_proto::{
    AgentConn, Held, HeldImage, HoldRequest, HoldsRequest, ImageSpec, KeepRequest, KeepResponse,
    VerifyRequest,
};
use lade_testkit::nodes::{DockerNode, Node};
use lade_tests::inproc::{load_json_async, MemoryNode};
use lade_tests::{metric, metric_at, names, sample_bundle, wait_for};

async fn client(addr: &str) -> Result<AgentConn> {
    lade::load::connect(addr, &lade_tests::dial())
        .await
        .with_context(|| format!("connecting to {addr}"))
}

/// The one bundle version the agent at `addr` holds: the record the load made.
async fn record(addr: &str) -> Result<Held> {
    let versions = client(addr)
        .await?
        .holds(HoldsRequest {})
        .await?
        .into_inner()
        .versions;
    ensure!(versions.len() == 1, "{addr} holds {versions:?}");
    versions[0]
        .held
        .clone()
        .with_context(|| format!("{addr}: a version without its record"))
}

async fn keep(addr: &str) -> Result<KeepResponse> {
    Ok(client(addr).await?.keep(KeepRequest {}).await?.into_inner())
}

/// The (image, kind) of every repair, sorted.
fn repairs(done: &KeepResponse) -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = done
        .repairs
        .iter()
        .map(|r| (r.image.clone(), r.kind.clone()))
        .collect();
    all.sort();
    all.dedup();
    all
}

/// Two pinning in-memory nodes that loaded the sample bundle, whose load recorded it on
/// each, naming the other as peer.
struct Pair {
    _dir: tempfile::TempDir,
    a: MemoryNode,
    b: MemoryNode,
    held: Held,
}

impl Pair {
    async fn start(name: &str, keep_a: KeepConfig) -> Result<Pair> {
        let dir = tempfile::tempdir()?;
        let (bundle, _) = sample_bundle(dir.path())?;
        let a = MemoryNode::start_with(Memory::new(&format!("{name}-a")).pinning(), keep_a).await?;
        let b = MemoryNode::start_with(
            Memory::new(&format!("{name}-b")).pinning(),
            KeepConfig::default(),
        )
        .await?;
        let (code, _, stderr) = load_json_async(&bundle, &[&a, &b], &[]).await?;
        ensure!(code == 0, "load failed: {stderr}");
        let held = record(&a.addr()).await?;
        ensure!(held.peers.contains(&b.addr()), "{held:?}");
        ensure!(held.images.len() == 3, "{held:?}");
        Ok(Pair {
            _dir: dir,
            a,
            b,
            held,
        })
    }

    fn image(&self, name: &str) -> &HeldImage {
        self.held
            .images
            .iter()
            .find(|i| i.names.iter().any(|n| n == name))
            .unwrap_or_else(|| panic!("{name} is not in {:?}", self.held))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_and_content_come_back_from_a_peer() -> Result<()> {
    let pair = Pair::start("keep-content", KeepConfig::default()).await?;
    let before = pair.a.runtime.image_names();
    let served = || metric_at(pair.b.metrics_port, "lade_agent_served_bytes_total");
    let served_before = served();
    let (app, sidecar) = (pair.image(names::APP), pair.image(names::SIDECAR));
    for image in [app, sidecar] {
        pair.a.runtime.remove_names(&image.names).await?;
        for blob in image.target.iter().chain(&image.blobs) {
            pair.a.runtime.remove_blob(&blob.digest);
        }
    }
    pair.a.runtime.collect();
    ensure!(pair.a.runtime.image_names() != before);

    let done = keep(&pair.a.addr()).await?;
    ensure!(done.failures.is_empty(), "{:?}", done.failures);
    let got = repairs(&done);
    for image in [app, sidecar] {
        for kind in ["name", "content"] {
            ensure!(
                got.contains(&(image.source.clone(), kind.to_string())),
                "no {kind} repair of {}: {got:?}",
                image.source
            );
        }
    }
    ensure!(pair.a.runtime.image_names() == before, "names not put back");
    for blob in pair.held.images.iter().flat_map(|i| &i.blobs) {
        ensure!(
            pair.a.runtime.has_blob(&blob.digest),
            "{} missing",
            blob.digest
        );
    }
    ensure!(served() > served_before, "B served no bytes");
    let port = pair.a.metrics_port;
    ensure!(metric_at(port, r#"lade_agent_repairs_total{kind="content"}"#) >= 2.0);
    ensure!(metric_at(port, r#"lade_agent_held_images{state="present"}"#) == 3.0);

    // Nothing is left to put back.
    let again = keep(&pair.a.addr()).await?;
    ensure!(
        again.repairs.is_empty() && again.failures.is_empty(),
        "{again:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_pin_and_lost_snapshots_are_put_back() -> Result<()> {
    let pair = Pair::start("keep-pin", KeepConfig::default()).await?;
    let app = pair.image(names::APP);
    pair.a.runtime.unpin(names::APP);
    async fn pinned(client: &mut AgentConn) -> Result<bool> {
        let refs = client
            .verify(VerifyRequest {
                refs: vec![names::APP.to_string()],
            })
            .await?
            .into_inner()
            .refs;
        Ok(refs[0].pinned)
    }
    let mut a = client(&pair.a.addr()).await?;
    ensure!(!pinned(&mut a).await?, "still pinned");
    let done = keep(&pair.a.addr()).await?;
    ensure!(
        repairs(&done) == vec![(app.source.clone(), "pin".to_string())],
        "{done:?}"
    );
    ensure!(pinned(&mut a).await?, "pin not put back");

    // Unpacking one image may unpack another's shared layers: the pass unpacks what is
    // still missing when it comes to each image.
    pair.a.runtime.forget_unpacked();
    let done = keep(&pair.a.addr()).await?;
    let got = repairs(&done);
    ensure!(
        !got.is_empty() && got.iter().all(|(_, kind)| kind == "unpack"),
        "{done:?}"
    );
    let names: Vec<String> = pair
        .held
        .images
        .iter()
        .flat_map(|i| i.names.clone())
        .collect();
    let refs = a
        .verify(VerifyRequest { refs: names })
        .await?
        .into_inner()
        .refs;
    ensure!(refs.iter().all(|r| r.ok), "{refs:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_moved_to_other_content_is_reported_not_taken_back() -> Result<()> {
    let pair = Pair::start("keep-moved", KeepConfig::default()).await?;
    let (app, sidecar) = (pair.image(names::APP), pair.image(names::SIDECAR));
    let (tx, _rx) = tokio::sync::mpsc::channel(64);
    pair.a
        .runtime
        .import(
            "operator",
            vec![ImageSpec {
                manifest: sidecar.target.clone(),
                names: vec![names::APP.to_string()],
                source: "operator's retag".into(),
                allow_overwrite: true,
            }],
            tx,
        )
        .await?;
    let sidecar_digest = sidecar.target.as_ref().unwrap().digest.clone();
    let points_at = |node: &MemoryNode| node.runtime.image_names().get(names::APP).cloned();
    ensure!(points_at(&pair.a) == Some(sidecar_digest.clone()));

    let done = keep(&pair.a.addr()).await?;
    ensure!(done.repairs.is_empty(), "{done:?}");
    ensure!(done.failures.len() == 1, "{done:?}");
    let failure = &done.failures[0];
    let bundle = pair.held.bundle.as_str();
    for part in [
        names::APP,
        &sidecar_digest,
        &app.source,
        bundle,
        "not taken back",
    ] {
        ensure!(failure.contains(part), "{failure:?} does not name {part}");
    }
    ensure!(
        points_at(&pair.a) == Some(sidecar_digest.clone()),
        "the moved name was taken back"
    );

    // A later version holds the name at that content: it is that version's now, no failure.
    let mut later = pair.held.clone();
    later.version = format!("{}-later", later.version);
    later.images = vec![HeldImage {
        names: vec![names::APP.to_string()],
        ..sidecar.clone()
    }];
    client(&pair.a.addr())
        .await?
        .hold(HoldRequest { held: Some(later) })
        .await?;
    let done = keep(&pair.a.addr()).await?;
    ensure!(
        done.repairs.is_empty() && done.failures.is_empty(),
        "{done:?}"
    );
    ensure!(points_at(&pair.a) == Some(sidecar_digest));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_no_peer_holds_is_a_failure_naming_blob_and_peers() -> Result<()> {
    let pair = Pair::start("keep-nopeer", KeepConfig::default()).await?;
    let app = pair.image(names::APP);
    let layer = app.blobs.last().unwrap().digest.clone();
    for node in [&pair.a, &pair.b] {
        node.runtime.remove_blob(&layer);
    }
    // A's record also names A itself, which is never asked.
    let mut a = client(&pair.a.addr()).await?;
    let mut record = pair.held.clone();
    record.peers = vec![pair.a.addr(), pair.b.addr()];
    a.hold(HoldRequest { held: Some(record) }).await?;

    let done = keep(&pair.a.addr()).await?;
    let failure = done
        .failures
        .iter()
        .find(|f| f.contains(&layer))
        .with_context(|| format!("no failure names {layer}: {done:?}"))?;
    ensure!(failure.contains(&pair.b.addr()), "{failure}");
    ensure!(
        !failure.contains(&pair.a.addr()),
        "A asked itself: {failure}"
    );
    ensure!(
        metric_at(
            pair.a.metrics_port,
            r#"lade_agent_failures_total{reason="keep"}"#
        ) >= 1.0
    );
    ensure!(
        metric_at(
            pair.a.metrics_port,
            r#"lade_agent_held_images{state="incomplete"}"#
        ) >= 1.0
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loop_puts_back_a_removed_image_by_itself() -> Result<()> {
    let every = KeepConfig {
        interval: Some(Duration::from_millis(200)),
        ..Default::default()
    };
    let pair = Pair::start("keep-loop", every).await?;
    let app = pair.image(names::APP);
    pair.a.runtime.remove_names(&app.names).await?;
    for blob in &app.blobs {
        pair.a.runtime.remove_blob(&blob.digest);
    }
    let node = &pair.a;
    let back = || {
        node.runtime.image_names().contains_key(names::APP)
            && app.blobs.iter().all(|b| node.runtime.has_blob(&b.digest))
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !back() {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the loop did not put {} back",
            names::APP
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Loads the sample bundle onto `nodes` (which records it on each, naming the others as
/// peers); returns the first node's record.
async fn load_and_hold(dir: &std::path::Path, nodes: &[&Node]) -> Result<Held> {
    let (bundle, _) = sample_bundle(dir)?;
    let (code, reports, stderr) = lade_tests::load(&bundle, nodes, &[])?;
    ensure!(code == 0, "{reports:#?}\n{stderr}");
    let held = record(&nodes[0].addr()).await?;
    for peer in &nodes[1..] {
        ensure!(held.peers.contains(&peer.addr()), "{held:?}");
    }
    Ok(held)
}

/// The digests in node's content store.
fn content(node: &Node) -> Result<Vec<String>> {
    let out = node
        .containerd
        .ctr_ok(&["-n", "k8s.io", "content", "ls", "-q"])?;
    Ok(out.lines().map(str::to_string).collect())
}

/// Whether the agent of `node` pins the images it names.
async fn pins(node: &Node) -> Result<bool> {
    let info = client(&node.addr())
        .await?
        .info(lade_proto::InfoRequest {})
        .await?;
    Ok(info.into_inner().images_pinned)
}

/// Whether every name of `held` verifies on `node` (and carries the pin where it pins).
async fn all_ok(node: &Node, held: &Held) -> Result<bool> {
    let pins = pins(node).await?;
    let mut client = client(&node.addr()).await?;
    let names: Vec<String> = held.images.iter().flat_map(|i| i.names.clone()).collect();
    let refs = client
        .verify(VerifyRequest { refs: names })
        .await?
        .into_inner()
        .refs;
    Ok(refs.iter().all(|r| r.ok && (r.pinned || !pins)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_nodes_put_back_removed_images_and_content_from_each_other() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let every = ["--keep-interval", "2s"];
    let nodes = [
        Node::start_with("keep-ctr-0", &every).await?,
        Node::start_with("keep-ctr-1", &every).await?,
    ];
    let held = load_and_hold(dir.path(), &[&nodes[0], &nodes[1]]).await?;
    let (lost, peer) = (&nodes[0], &nodes[1]);
    let names_before = lost.all_image_names()?;
    let served_before = metric(peer, "lade_agent_served_bytes_total");

    let gone: Vec<&HeldImage> = held
        .images
        .iter()
        .filter(|i| {
            i.names
                .iter()
                .any(|n| n == names::APP || n == names::SIDECAR)
        })
        .collect();
    ensure!(gone.len() == 2, "{held:?}");
    let mut rm = vec!["-n", "k8s.io", "images", "rm"];
    rm.extend(gone.iter().flat_map(|i| i.names.iter().map(String::as_str)));
    lost.containerd.ctr_ok(&rm)?;
    let blobs: Vec<&str> = gone
        .iter()
        .flat_map(|i| i.target.iter().chain(&i.blobs))
        .map(|b| b.digest.as_str())
        .collect();
    let mut rm = vec!["-n", "k8s.io", "content", "rm"];
    rm.extend(&blobs);
    lost.containerd.ctr_ok(&rm)?;
    let left = content(lost)?;
    ensure!(
        blobs.iter().all(|b| !left.iter().any(|l| l == b)),
        "ctr content rm left blobs"
    );

    wait_for(
        "the removed names and content back on keep-ctr-0",
        Duration::from_secs(60),
        || {
            let names = lost.all_image_names().unwrap_or_default();
            let content = content(lost).unwrap_or_default();
            names == names_before && blobs.iter().all(|b| content.iter().any(|c| c == b))
        },
    )?;
    ensure!(all_ok(lost, &held).await?, "names do not verify");
    ensure!(
        metric(peer, "lade_agent_served_bytes_total") > served_before,
        "keep-ctr-1 served nothing"
    );
    ensure!(metric(lost, r#"lade_agent_repairs_total{kind="content"}"#) >= 2.0);
    ensure!(metric(lost, r#"lade_agent_repairs_total{kind="name"}"#) >= 2.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_restart_or_a_removed_held_name_starts_a_pass_at_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // No pass comes from the interval during the test.
    let mut node = Node::start_with("keep-restart", &["--keep-interval", "1h"]).await?;
    let held = load_and_hold(dir.path(), &[&node]).await?;
    let present = r#"lade_agent_held_images{state="present"}"#;
    // The pass at the agent's start found nothing held.
    ensure!(metric(&node, present) == 0.0);
    let pins = pins(&node).await?;
    if pins {
        node.containerd.ctr_ok(&[
            "-n",
            "k8s.io",
            "images",
            "label",
            names::SIDECAR,
            "io.cri-containerd.pinned=",
        ])?;
        ensure!(!all_ok(&node, &held).await?, "the pin is still there");
    }

    node.containerd.restart().await?;
    wait_for(
        "a pass after containerd's restart",
        Duration::from_secs(30),
        || metric(&node, present) == 3.0,
    )
    .with_context(|| {
        let log = std::fs::read_to_string(node.agent.log()).unwrap_or_default();
        format!("agent log:\n{log}")
    })?;
    ensure!(
        all_ok(&node, &held).await?,
        "not all put back after the restart"
    );
    if pins {
        ensure!(metric(&node, r#"lade_agent_repairs_total{kind="pin"}"#) == 1.0);
    }

    node.containerd
        .ctr_ok(&["-n", "k8s.io", "images", "rm", names::SIDECAR])?;
    wait_for(
        "the removed held name back",
        Duration::from_secs(30),
        || {
            node.all_image_names()
                .is_ok_and(|n| n.iter().any(|n| n == names::SIDECAR))
        },
    )?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_removed_from_docker_comes_back_at_once() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (bundle, _) = sample_bundle(dir.path())?;
    let source = Node::start("keep-docker-src").await?;
    // No pass comes from the interval during the test: only dockerd's untag event.
    let docker = DockerNode::start_with("keep-docker", &["--keep-interval", "1h"]).await?;
    let agents = [source.addr(), docker.addr()];
    let (code, reports, stderr) = lade_tests::load_json(&bundle, &agents, &[])?;
    ensure!(code == 0, "{reports:#?}\n{stderr}");
    let held = record(&docker.addr()).await?;
    ensure!(held.peers.contains(&source.addr()), "{held:?}");
    let before = docker.docker_image_names()?;
    ensure!(before.iter().any(|n| n == names::SIDECAR), "{before:?}");

    docker.dockerd.docker_ok(&["rmi", names::SIDECAR])?;
    ensure!(!docker
        .docker_image_names()?
        .iter()
        .any(|n| n == names::SIDECAR));
    wait_for(
        "the removed tag back on Docker",
        Duration::from_secs(30),
        || docker.docker_image_names().is_ok_and(|n| n == before),
    )
    .with_context(|| {
        let log = std::fs::read_to_string(docker.agent.log()).unwrap_or_default();
        format!("agent log:\n{log}")
    })?;
    // The pass under way (if any) ends, then one more finds nothing to put back.
    keep(&docker.addr()).await?;
    let again = keep(&docker.addr()).await?;
    ensure!(
        again.repairs.is_empty() && again.failures.is_empty(),
        "{again:?}"
    );
    let repaired = metric_at(
        docker.agent.metrics_port(),
        r#"lade_agent_repairs_total{kind="name"}"#,
    );
    ensure!(repaired == 1.0, "{repaired} name repairs");
    let failed = metric_at(
        docker.agent.metrics_port(),
        r#"lade_agent_failures_total{reason="keep"}"#,
    );
    ensure!(failed == 0.0, "{failed} failures");
    Ok(())
}
