//! Relay fan-out end to end: the real `lade` and `lade-agent` binaries against
//! private containerd instances; the coordinator sends each blob to one of two root nodes
//! (the first two, in turn) and the other agents fetch it from peers over their gRPC ports.
//! The killed and frozen nodes are not roots, except in the test of a root that stops
//! reading: a root lost mid-send costs a second send of its blob under way, which the docs say. Fails when containerd, runc or busybox-static is missing, unless
//! LADE_SKIP_DAEMON_TESTS=1 says to skip.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use lade::bundle::Bundle;
use lade_proto::{
    put_blob_request::Msg, BlobHeader, Descriptor, HaveRequest, PutBlobRequest, RelayHop,
};
use lade_testkit::fixtures::Compression;
use lade_testkit::harness::daemon_tests_enabled;
use lade_testkit::nodes::{run_lade, workspace_bin, Node, TEST_TOKEN};
use lade_tests::{
    big_bundle, damaged_sample_bundle, gcr_bundle, images, load_json, metric, sample_bundle,
    start_nodes, u64_of, wait_for,
};
use serde_json::Value;

fn addrs(nodes: &[Node]) -> Vec<String> {
    nodes.iter().map(Node::addr).collect()
}

/// Every image of the load is named, complete and unpacked on `node`: containerd's own
/// check, and a container started from each name.
fn assert_has_every_image(node: &Node, expected_names: usize) -> Result<()> {
    let names: Vec<String> = node
        .image_names()?
        .into_iter()
        .filter(|n| !n.starts_with("sha256:"))
        .collect();
    ensure!(
        names.len() == expected_names,
        "{}: {} names, expected {expected_names}: {names:?}",
        node.name,
        names.len()
    );
    let check = node
        .containerd
        .ctr_ok(&["-n", "k8s.io", "images", "check"])?;
    for line in check.lines().skip(1) {
        ensure!(line.contains("complete"), "{}: {line}", node.name);
    }
    let out = node.run_container(&names[0], "relay-probe", &["/bin/echo", "relayed"])?;
    ensure!(out.contains("relayed"), "{}: {out}", node.name);
    Ok(())
}

fn via(report: &Value) -> Vec<String> {
    report["via"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn from_coordinator(reports: &[Value]) -> u64 {
    reports
        .iter()
        .map(|r| u64_of(r, "bytes_from_coordinator"))
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chain_of_four_gets_every_image_and_each_blob_leaves_the_coordinator_once() -> Result<()>
{
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (bundle, _) = sample_bundle(dir.path())?;
    let unique = Bundle::open(&bundle)?.total_bytes();
    let nodes = start_nodes(&["chain-a", "chain-b", "chain-c", "chain-d"]).await?;

    let (code, reports, stderr) = load_json(&bundle, &addrs(&nodes), &["--relay", "chain"])?;
    ensure!(code == 0, "{reports:#?}\n{stderr}");
    // The topology is printed before anything moves.
    assert!(
        stderr.contains("relay chain")
            && stderr.contains("└─ chain-a\n   └─ chain-b\n      └─ chain-c\n         └─ chain-d"),
        "{stderr}"
    );
    // Not x4: the unique bytes once, split between the two roots (the first two nodes, fed
    // in turn); each root fetched from peers what the coordinator sent the other.
    assert_eq!(from_coordinator(&reports), unique, "{reports:#?}");
    let peers = ["chain-a", "chain-b", "chain-c", "chain-d"];
    for (i, (node, report)) in nodes.iter().zip(&reports).enumerate() {
        assert_eq!(report["ok"], true, "{report}");
        assert_eq!(u64_of(report, "images_loaded"), 3, "{report}");
        // Every node stored every byte itself (and verified it).
        assert_eq!(u64_of(report, "bytes_sent"), unique, "{report}");
        let from = via(report);
        let fetched = metric(node, "lade_agent_fetched_bytes_total") as u64;
        let from_peer = |f: &String| peers.contains(&f.as_str()) && f != peers[i];
        if i < 2 {
            assert!(
                from.iter().all(|f| f == "coordinator" || from_peer(f)),
                "{report}"
            );
            assert_eq!(
                fetched + u64_of(report, "bytes_from_coordinator"),
                unique,
                "{report}"
            );
        } else {
            // The others fetched everything from peers, never from the coordinator.
            assert!(!from.is_empty() && from.iter().all(from_peer), "{report}");
            assert_eq!(fetched, unique);
        }
        assert_has_every_image(node, 3)?;
        assert_eq!(
            metric(node, "lade_agent_blobs_committed_total") as usize,
            Bundle::open(&bundle)?.blobs.len(),
            "{}",
            node.name
        );
    }
    // Peers served every byte the nodes did not get from the coordinator: three copies.
    let served: u64 = nodes
        .iter()
        .map(|n| metric(n, "lade_agent_served_bytes_total") as u64)
        .sum();
    assert_eq!(served, 3 * unique);
    assert!(metric(&nodes[0], "lade_agent_served_bytes_total") > 0.0);

    // Again: nothing is sent anywhere.
    let (code, reports, stderr) = load_json(&bundle, &addrs(&nodes), &["--relay", "chain"])?;
    ensure!(code == 0, "{reports:#?}\n{stderr}");
    assert_eq!(from_coordinator(&reports), 0);
    for r in &reports {
        assert_eq!(u64_of(r, "bytes_sent"), 0, "{r}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_binary_tree_of_four_gets_every_image_and_the_table_says_where_from() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (bundle, _) = sample_bundle(dir.path())?;
    let unique = Bundle::open(&bundle)?.total_bytes();
    let nodes = start_nodes(&["tree-a", "tree-b", "tree-c", "tree-d"]).await?;

    let mut args = vec![
        "load".to_string(),
        bundle.display().to_string(),
        "--progress".into(),
        "none".into(),
        "--relay".into(),
        "tree:2".into(),
    ];
    for a in addrs(&nodes) {
        args.extend(["--agent".to_string(), a]);
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_lade(&argv)?;
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{table}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // a and b (the two roots) from the coordinator, each the rest from the other; c from
    // a, its tree parent; c and d from peers only.
    let row = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_default()
            .to_string()
    };
    assert!(row("tree-a").contains(" coordinator"), "{table}");
    assert!(row("tree-b").contains(" coordinator"), "{table}");
    assert!(row("tree-c").contains(" tree-a"), "{table}");
    for name in ["tree-c", "tree-d"] {
        assert!(!row(name).contains("coordinator"), "{table}");
    }
    assert!(row("tree-d").contains(" tree-"), "{table}");
    assert!(table.contains("left the coordinator"), "{table}");
    for node in &nodes {
        assert_has_every_image(node, 3)?;
    }
    // Peers served three copies (c's and d's, and the halves a and b swapped); a, c's
    // parent, served at least c's.
    let served: Vec<u64> = nodes
        .iter()
        .map(|n| metric(n, "lade_agent_served_bytes_total") as u64)
        .collect();
    assert_eq!(served.iter().sum::<u64>(), 3 * unique, "{served:?}");
    assert!(served[0] > 0 && served[1] > 0, "{served:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn nodes_that_hold_blobs_serve_them_and_each_gets_only_what_it_lacks() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let imgs = images()?;
    // The first node already holds busybox (the base layer all images share).
    let (small, _) = gcr_bundle(dir.path(), "old.bundle.tar", &imgs[2..], Compression::Gzip)?;
    let (full, _) = big_bundle(dir.path(), 40 << 20, 21)?;
    let nodes = start_nodes(&["pass-a", "pass-b", "pass-c"]).await?;
    let (code, reports, stderr) = load_json(&small, &[nodes[0].addr()], &[])?;
    ensure!(code == 0, "{reports:#?}\n{stderr}");

    // The last node holds the first MiB of the big image's first own layer, as an
    // interrupted upload leaves it.
    let bundle = Bundle::open(&full)?;
    let held = Bundle::open(&small)?;
    let big_layer = bundle.images[3].layers[1].clone();
    let blob = &bundle.blobs[&big_layer];
    let desc = Descriptor {
        digest: blob.digest.clone(),
        size: blob.size,
        media_type: blob.media_type.clone(),
        ..Default::default()
    };
    {
        let mut client = lade::load::connect(&nodes[2].addr(), &lade_tests::dial()).await?;
        let first = bundle
            .read_blob(&big_layer, 0)?
            .next_chunk(lade_proto::CHUNK_SIZE)?
            .context("a first chunk")?;
        let messages = vec![
            PutBlobRequest {
                msg: Some(Msg::Header(BlobHeader {
                    session: "partial".into(),
                    blob: Some(desc.clone()),
                    ..Default::default()
                })),
            },
            PutBlobRequest {
                msg: Some(Msg::Chunk(first.into())),
            },
        ];
        let cut = client.put_blob(futures_iter(messages)).await;
        ensure!(cut.is_err(), "a short upload must not be accepted");
    }

    let total = bundle.total_bytes();
    let already_a: u64 = bundle
        .blobs
        .values()
        .filter(|b| held.blobs.contains_key(&b.digest))
        .map(|b| b.size)
        .sum();
    assert!(already_a > 0);
    let chunk = lade_proto::CHUNK_SIZE as u64;
    // The big bundle's busybox is the same content under another manifest (written anew), so
    // moving the first node's busybox name to it is an overwrite.
    let (code, reports, stderr) = load_json(
        &full,
        &addrs(&nodes),
        &["--relay", "chain", "--allow-overwrite"],
    )?;
    ensure!(code == 0, "{reports:#?}\n{stderr}");
    // The coordinator sent only the blobs no node held, once: not busybox, which a holds
    // and served to the others.
    assert_eq!(
        from_coordinator(&reports),
        total - already_a,
        "{reports:#?}"
    );
    // a stored only what it lacked.
    assert_eq!(u64_of(&reports[0], "bytes_sent"), total - already_a);
    assert_eq!(u64_of(&reports[0], "bytes_skipped"), already_a);
    assert!(metric(&nodes[0], "lade_agent_served_bytes_total") as u64 >= already_a);
    assert_eq!(u64_of(&reports[1], "bytes_sent"), total);
    // c got only the part of the big layer it did not hold: it fetched from its offset.
    assert_eq!(u64_of(&reports[2], "bytes_sent"), total - chunk);
    assert_eq!(u64_of(&reports[2], "bytes_skipped"), chunk);
    assert_eq!(
        metric(&nodes[2], "lade_agent_fetched_bytes_total") as u64,
        total - chunk
    );
    let served: u64 = nodes
        .iter()
        .map(|n| metric(n, "lade_agent_served_bytes_total") as u64)
        .sum();
    assert_eq!(served, 2 * total - chunk);
    for (node, report) in nodes.iter().zip(&reports) {
        assert_eq!(report["ok"], true, "{report}");
        assert_eq!(u64_of(report, "images_loaded"), 4, "{report}");
        assert_has_every_image(node, 4)?;
    }
    // The base layer a already had was not written again.
    assert!(holding(&nodes[0], &desc).await?.present);
    Ok(())
}

/// What `node`'s agent holds of blob `desc` (asked in a throwaway session).
async fn holding(node: &Node, desc: &Descriptor) -> Result<lade_proto::BlobState> {
    let mut have = lade::load::connect(&node.addr(), &lade_tests::dial())
        .await?
        .have(HaveRequest {
            session: "check".into(),
            blobs: vec![desc.clone()],
        })
        .await?
        .into_inner();
    have.blobs.pop().context("Have answered nothing")
}

/// A stream of `messages`, for client-streaming calls.
fn futures_iter(
    messages: Vec<PutBlobRequest>,
) -> tokio_stream::Iter<std::vec::IntoIter<PutBlobRequest>> {
    tokio_stream::iter(messages)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_node_killed_mid_transfer_is_named_and_the_nodes_behind_it_complete() -> Result<()>
{
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (bundle, _) = big_bundle(dir.path(), 40 << 20, 21)?;
    let index = Bundle::open(&bundle)?;
    let mut nodes = start_nodes(&["kill-a", "kill-b", "kill-c", "kill-d"]).await?;
    // c: not a root (those are a and b), and the chain's way to d.
    let dead = nodes[2].addr();

    let load = spawn_load(&bundle, &nodes, &["--relay", "chain"])?;
    // Well into the big layers on c, which it fetches from peers.
    wait_for(
        "c to fetch part of the big layers",
        Duration::from_secs(120),
        || metric(&nodes[2], "lade_agent_fetched_bytes_total") > (12 << 20) as f64,
    )?;
    nodes[2].agent.kill();

    let out = load.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let reports: Vec<Value> = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("no JSON report; stderr: {stderr}"))?;
    assert_eq!(out.status.code(), Some(1), "{reports:#?}\n{stderr}");
    // The dead node is named, with what happened.
    assert_eq!(reports[2]["ok"], false, "{}", reports[2]);
    let error = reports[2]["error"].as_str().unwrap_or_default();
    assert!(error.contains(&dead) || error.contains("kill-c"), "{error}");
    assert!(error.contains("cannot reach"), "{error}");
    // What c imported before it died is whole; nothing half-done carries a name there.
    let check = nodes[2]
        .containerd
        .ctr_ok(&["-n", "k8s.io", "images", "check"])?;
    for line in check.lines().skip(1) {
        ensure!(line.contains("complete"), "kill-c: {line}");
    }
    // Everyone else completed, d (behind c in the chain) through another path.
    for i in [0, 1, 3] {
        assert_eq!(reports[i]["ok"], true, "{}\n{stderr}", reports[i]);
        assert_eq!(u64_of(&reports[i], "images_loaded"), 4);
        assert_has_every_image(&nodes[i], 4)?;
    }
    // d was fed by the peers left, never by the coordinator: it sent the bundle once.
    let d = &reports[3];
    let from = via(d);
    assert!(
        !from.is_empty() && !from.contains(&"coordinator".to_string()),
        "{from:?}"
    );
    // Every byte counts once, whoever sent it and however often it was cut off.
    assert_eq!(u64_of(d, "bytes_sent"), index.total_bytes(), "{d}");
    assert_eq!(
        from_coordinator(&reports),
        index.total_bytes(),
        "{reports:#?}"
    );
    Ok(())
}

/// `lade load BUNDLE -o json` onto every node with `extra` flags, started in the background.
fn spawn_load(
    bundle: &std::path::Path,
    nodes: &[Node],
    extra: &[&str],
) -> Result<std::process::Child> {
    let mut cmd = Command::new(workspace_bin("lade")?);
    cmd.arg("load")
        .arg(bundle)
        .args(["--progress", "none", "-o", "json"])
        .args(extra)
        .env("LADE_AUTH_TOKEN", TEST_TOKEN)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for a in addrs(nodes) {
        cmd.args(["--agent", &a]);
    }
    Ok(cmd.spawn()?)
}

/// Sends `signal` (STOP or CONT) to `node`'s agent process.
fn signal(node: &Node, signal: &str) -> Result<()> {
    let pid = node.agent.pid().context("the agent is not running")?;
    let status = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill -{signal} {pid}");
    Ok(())
}

/// Loads `bundle` onto `nodes` with `flags`, freezing node `frozen`'s agent (SIGSTOP) once its
/// counter `metric` passes `bytes` and thawing it when the load has ended: the exit code, the
/// JSON reports and lade's stderr.
fn load_freezing(
    bundle: &std::path::Path,
    nodes: &[Node],
    flags: &[&str],
    frozen: usize,
    metric_name: &str,
    bytes: f64,
) -> Result<(Option<i32>, Vec<Value>, String)> {
    let load = spawn_load(bundle, nodes, flags)?;
    wait_for(
        &format!("node {frozen}'s {metric_name} to pass {bytes} bytes"),
        Duration::from_secs(120),
        || metric(&nodes[frozen], metric_name) > bytes,
    )?;
    // The agent stops reading anything (its connections stay open: the kernel still takes
    // the bytes it has room for), whether it receives or serves a peer.
    signal(&nodes[frozen], "STOP")?;
    let out = load.wait_with_output();
    signal(&nodes[frozen], "CONT")?;
    let out = out?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let reports: Vec<Value> = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("no JSON report; stderr: {stderr}"))?;
    Ok((out.status.code(), reports, stderr))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_stops_reading_fails_alone_and_a_rerun_completes_it() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (bundle, _) = big_bundle(dir.path(), 40 << 20, 21)?;
    let index = Bundle::open(&bundle)?;
    let nodes = start_nodes(&["stop-a", "stop-b", "stop-c", "stop-d"]).await?;
    // c: not a root (a and b are), so the bundle still leaves the coordinator once.
    let frozen = nodes[2].addr();

    // c stops once it has fetched part of the bundle.
    let flags = ["--stall-timeout", "4s"];
    let fetched = "lade_agent_fetched_bytes_total";
    let (code, reports, stderr) =
        load_freezing(&bundle, &nodes, &flags, 2, fetched, (4 << 20) as f64)?;
    assert_eq!(code, Some(1), "{reports:#?}\n{stderr}");
    // c failed alone, named, saying why.
    assert_eq!(reports[2]["ok"], false, "{}", reports[2]);
    let error = reports[2]["error"].as_str().unwrap_or_default();
    assert!(error.contains(&frozen), "{error}");
    assert!(error.contains("cannot reach it"), "{error}");
    for i in [0, 1, 3] {
        assert_eq!(reports[i]["ok"], true, "{}\n{stderr}", reports[i]);
        assert_has_every_image(&nodes[i], 4)?;
    }
    // The others finished before c was given up: their times are their own.
    let seconds = |r: &Value| r["seconds"].as_f64().unwrap_or_default();
    for i in [0, 1, 3] {
        assert!(seconds(&reports[i]) < seconds(&reports[2]), "{reports:#?}");
    }
    assert_eq!(
        from_coordinator(&reports),
        index.total_bytes(),
        "{reports:#?}"
    );

    // Thawed, c completes on a re-run, which sends it only what it lacks.
    let (code, again, stderr) = load_json(&bundle, &addrs(&nodes), &[])?;
    ensure!(code == 0, "{again:#?}\n{stderr}");
    for i in [0, 1, 3] {
        assert_eq!(u64_of(&again[i], "bytes_sent"), 0, "{}", again[i]);
    }
    assert!(u64_of(&again[2], "bytes_skipped") > 0, "{}", again[2]);
    assert_eq!(
        u64_of(&again[2], "bytes_sent") + u64_of(&again[2], "bytes_skipped"),
        index.total_bytes(),
        "{}",
        again[2]
    );
    assert_has_every_image(&nodes[2], 4)?;
    Ok(())
}

/// The second root (b) stops reading in the middle of the coordinator's send of a big layer.
/// Once that send has moved nothing for a few seconds while nothing else is stuck, the
/// coordinator sends the layer to another root, so the others finish while b is still
/// being waited for (before, they waited with it for `--stall-timeout` and finished after
/// it was given up). b fails alone, named, and a re-run completes it.
#[tokio::test(flavor = "multi_thread")]
async fn a_root_that_stops_reading_does_not_hold_the_others() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (bundle, _) = big_bundle(dir.path(), 40 << 20, 23)?;
    let index = Bundle::open(&bundle)?;
    let nodes = start_nodes(&["halt-a", "halt-b", "halt-c", "halt-d"]).await?;
    let frozen = nodes[1].addr();

    // b stops once it has taken part of a big layer from the coordinator.
    let flags = ["--stall-timeout", "20s"];
    let received = "lade_agent_received_bytes_total";
    let (code, reports, stderr) =
        load_freezing(&bundle, &nodes, &flags, 1, received, (4 << 20) as f64)?;
    assert_eq!(code, Some(1), "{reports:#?}\n{stderr}");
    assert_eq!(reports[1]["ok"], false, "{}", reports[1]);
    let error = reports[1]["error"].as_str().unwrap_or_default();
    assert!(error.contains(&frozen), "{error}");
    let seconds = |r: &Value| r["seconds"].as_f64().unwrap_or_default();
    for i in [0, 2, 3] {
        assert_eq!(reports[i]["ok"], true, "{}\n{stderr}", reports[i]);
        assert_has_every_image(&nodes[i], 4)?;
        // Before, the layer b held up came only once --stall-timeout (20 s) had cut its
        // send off.
        assert!(
            seconds(&reports[i]) < 20.0 && seconds(&reports[i]) < seconds(&reports[1]),
            "node {i} waited for the stopped root: {reports:#?}\n{stderr}"
        );
    }
    assert!(
        stderr.contains("stopped reading"),
        "the coordinator did not see b stop: {stderr}"
    );

    let (code, again, stderr) = load_json(&bundle, &addrs(&nodes), &[])?;
    ensure!(code == 0, "{again:#?}\n{stderr}");
    for i in [0, 2, 3] {
        assert_eq!(u64_of(&again[i], "bytes_sent"), 0, "{}", again[i]);
    }
    assert_eq!(
        u64_of(&again[1], "bytes_sent") + u64_of(&again[1], "bytes_skipped"),
        index.total_bytes(),
        "{}",
        again[1]
    );
    assert_has_every_image(&nodes[1], 4)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_answers_late_joins_the_load_and_fetches_from_peers() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (bundle, _) = big_bundle(dir.path(), 24 << 20, 21)?;
    let unique = Bundle::open(&bundle)?.total_bytes();
    let mut nodes = start_nodes(&["late-a", "late-b", "late-c"]).await?;
    // c is down when the load starts; its retries find it up later.
    nodes[2].agent.kill();
    let load = spawn_load(&bundle, &nodes, &["--retries", "4"])?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    nodes[2].agent.restart().await?;
    let out = load.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let reports: Vec<Value> = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("no JSON report; stderr: {stderr}"))?;
    assert_eq!(out.status.code(), Some(0), "{reports:#?}\n{stderr}");
    assert!(u64_of(&reports[2], "attempts") >= 2, "{}", reports[2]);
    // It joined the load under way and was fed by peers: the bundle left the coordinator once.
    let from = via(&reports[2]);
    assert!(
        !from.is_empty() && !from.contains(&"coordinator".to_string()),
        "{from:?}"
    );
    assert_eq!(from_coordinator(&reports), unique, "{reports:#?}");
    for node in &nodes {
        assert_has_every_image(node, 4)?;
    }
    Ok(())
}

#[test]
fn plan_prints_the_topology_and_contacts_nobody() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (bundle, _) = sample_bundle(dir.path())?;
    // Nothing listens on these: --plan must not try.
    let agents: Vec<String> = (1..=5).map(|i| format!("192.0.2.{i}:7700")).collect();
    let started = Instant::now();
    let mut args = vec![
        "load".to_string(),
        bundle.display().to_string(),
        "--plan".into(),
        "--relay".into(),
        "tree:2".into(),
    ];
    for a in &agents {
        args.extend(["--agent".to_string(), a.clone()]);
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_lade(&argv)?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(text.contains("relay tree:2"), "{text}");
    assert!(
        text.contains(
            "coordinator\n└─ 192.0.2.1:7700\n   ├─ 192.0.2.2:7700\n   │  ├─ 192.0.2.4:7700\n   │  └─ 192.0.2.5:7700\n   └─ 192.0.2.3:7700\n"
        ),
        "{text}"
    );
    // Off: every node from the coordinator.
    let mut off = argv.clone();
    let pos = off.iter().position(|a| *a == "tree:2").expect("mode");
    off[pos] = "off";
    let out = run_lade(&off)?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("relay off") && text.contains("coordinator -> 192.0.2.5:7700"),
        "{text}"
    );
    // A bad mode is refused as an argument error.
    let mut bad = argv.clone();
    bad[pos] = "tree:0";
    assert_eq!(run_lade(&bad)?.status.code(), Some(2));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unauthenticated_relay_request_writes_nothing_on_any_node() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (bundle_path, _) = sample_bundle(dir.path())?;
    let bundle = Bundle::open(&bundle_path)?;
    let nodes = start_nodes(&["auth-a", "auth-b"]).await?;
    let blob = bundle
        .blobs
        .values()
        .max_by_key(|b| b.size)
        .expect("a blob");
    let desc = Descriptor {
        digest: blob.digest.clone(),
        size: blob.size,
        media_type: blob.media_type.clone(),
        ..Default::default()
    };
    let data = bundle
        .read_blob(&blob.digest, 0)?
        .next_chunk(blob.size as usize + 1)?
        .context("blob bytes")?;
    let request = |data: bytes::Bytes| {
        vec![
            PutBlobRequest {
                msg: Some(Msg::Header(BlobHeader {
                    session: "intruder".into(),
                    blob: Some(desc.clone()),
                    forward: vec![RelayHop {
                        address: nodes[1].addr(),
                        store: true,
                        offset: 0,
                        forward: vec![],
                    }],
                    ..Default::default()
                })),
            },
            PutBlobRequest {
                msg: Some(Msg::Chunk(data)),
            },
        ]
    };
    let data: bytes::Bytes = data.into();
    for token in [None, Some("not-the-token")] {
        let credentials = match token {
            None => lade::load::Credentials::default(),
            Some(t) => lade::load::Credentials::token(t)?,
        };
        let dial = lade::load::Dial {
            timeout: Duration::from_secs(5),
            credentials,
        };
        let mut client = lade::load::connect(&nodes[0].addr(), &dial).await?;
        let err = client
            .put_blob(futures_iter(request(data.clone())))
            .await
            .expect_err("an unauthenticated relay must be refused");
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    }
    for node in &nodes {
        let held = holding(node, &desc).await?;
        assert!(!held.present, "{}", node.name);
        assert_eq!(held.offset, 0, "{}", node.name);
        assert_eq!(metric(node, "lade_agent_received_bytes_total"), 0.0);
    }
    // The same request with the token is relayed: both nodes then hold the blob.
    let mut client = lade::load::connect(&nodes[0].addr(), &lade_tests::dial()).await?;
    let resp = client
        .put_blob(futures_iter(request(data.clone())))
        .await?
        .into_inner();
    assert!(resp.local_error.is_empty(), "{resp:?}");
    assert_eq!(resp.relayed.len(), 1, "{resp:?}");
    assert!(resp.relayed[0].ok, "{resp:?}");
    for node in &nodes {
        assert!(holding(node, &desc).await?.present, "{}", node.name);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_relay_to_each_other_over_mutual_tls() -> Result<()> {
    use lade_testkit::certs::make_certs;
    use lade_testkit::harness::Containerd;

    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (bundle, _) = sample_bundle(dir.path())?;
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs)?;
    // The agents' certificate serves and, towards their peers, identifies them: both uses.
    make_certs(
        &certs,
        &[
            (
                "agent",
                "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth",
            ),
            ("admin", "extendedKeyUsage=clientAuth"),
        ],
    )?;
    let (cert, key, ca) = (
        certs.join("agent.crt"),
        certs.join("agent.key"),
        certs.join("ca.crt"),
    );
    // (agent, containerd): the agent is dropped first.
    let mut nodes = Vec::new();
    let mut agents = Vec::new();
    for name in ["tls-a", "tls-b", "tls-c"] {
        let containerd = Containerd::start(name).await?;
        let (agent, addr) =
            lade_tests::spawn_tls_agent(name, &containerd, &cert, &key, &ca).await?;
        agents.push(addr);
        nodes.push((agent, containerd));
    }
    let (ca_s, admin_crt, admin_key) = (
        ca.display().to_string(),
        certs.join("admin.crt").display().to_string(),
        certs.join("admin.key").display().to_string(),
    );
    let (code, reports, stderr) = load_json(
        &bundle,
        &agents,
        &[
            "--relay",
            "chain",
            "--tls-ca",
            &ca_s,
            "--tls-cert",
            &admin_crt,
            "--tls-key",
            &admin_key,
        ],
    )?;
    ensure!(code == 0, "{reports:#?}\n{stderr}");
    // c fetched everything from peers, and b (the second root) what the coordinator sent a,
    // over mutual TLS.
    for r in &reports[1..] {
        let from = via(r);
        assert!(from.iter().any(|f| f.starts_with("tls-")), "{r}");
        assert!(
            from.iter()
                .all(|f| f.starts_with("tls-") || f == "coordinator"),
            "{r}"
        );
    }
    assert!(!via(&reports[2]).contains(&"coordinator".to_string()));
    assert_eq!(
        from_coordinator(&reports),
        Bundle::open(&bundle)?.total_bytes()
    );
    for (_, containerd) in &nodes {
        let check = containerd.ctr_ok(&["-n", "k8s.io", "images", "check"])?;
        let lines: Vec<&str> = check.lines().skip(1).collect();
        ensure!(lines.len() >= 3, "{check}");
        ensure!(lines.iter().all(|l| l.contains("complete")), "{check}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_altered_layer_reaches_no_node_of_the_tree_and_only_its_image_fails() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    // The app image's own layer is damaged inside the nested images.tar.
    let (bundle_path, layer_digest, member) = damaged_sample_bundle(dir.path())?;

    let nodes = start_nodes(&["bad-a", "bad-b", "bad-c"]).await?;
    let (code, reports, stderr) = load_json(&bundle_path, &addrs(&nodes), &["--relay", "chain"])?;
    assert_eq!(code, 1, "{reports:#?}\n{stderr}");
    for (node, report) in nodes.iter().zip(&reports) {
        // The node itself is fine; the damaged image fails on it, by name, alone.
        assert_eq!(report["error"], Value::Null, "{report}");
        assert_eq!(u64_of(report, "images_loaded"), 2, "{report}");
        let failed = report["failed_images"]
            .as_array()
            .context("failed_images")?;
        assert_eq!(failed.len(), 1, "{report}");
        let reason = failed[0]["reason"].as_str().unwrap_or_default();
        assert!(reason.contains(&member), "{reason}");
        // No name for it, and the damaged blob was committed nowhere down the chain.
        let names = node.image_names()?;
        assert!(
            !names.contains(&"release.daocloud.io/demo/app:v1".to_string()),
            "{}: {names:?}",
            node.name
        );
        let content = node
            .containerd
            .ctr_ok(&["-n", "k8s.io", "content", "ls", "-q"])?;
        assert!(!content.contains(&layer_digest), "{}: {content}", node.name);
    }
    Ok(())
}

/// All of `digest` from `offset` as `node`'s agent serves it to a peer (`ReadBlob`).
async fn read_from_peer(node: &Node, digest: &str, offset: u64) -> Result<Vec<u8>, tonic::Status> {
    let mut client = lade::load::connect(&node.addr(), &lade_tests::dial())
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut chunks = client
        .read_blob(lade_proto::ReadBlobRequest {
            digest: digest.to_string(),
            offset,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = chunks.message().await? {
        out.extend_from_slice(&chunk.data);
    }
    Ok(out)
}

/// What a peer reads from a node on containerd: a committed blob's bytes from any offset,
/// whether the agent reads containerd's blob file itself (it sees the content store) or has
/// containerd stream them (`--unpack containerd`); never a blob committed only in another
/// containerd namespace (its file is in the same directory), one nobody holds, or bytes past
/// the end.
#[tokio::test(flavor = "multi_thread")]
async fn a_peer_reads_committed_blobs_from_any_offset_and_nothing_else() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (path, _) = big_bundle(dir.path(), 3 << 20, 31)?;
    let bundle = Bundle::open(&path)?;
    let nodes = vec![
        Node::start("serve-file").await?,
        Node::start_with("serve-ctr", &["--unpack", "containerd"]).await?,
    ];
    let (code, reports, stderr) = load_json(&path, &addrs(&nodes), &["--relay", "off"])?;
    ensure!(code == 0, "{reports:#?}\n{stderr}");

    let layer = bundle
        .images
        .iter()
        .flat_map(|i| &i.layers)
        .map(|d| &bundle.blobs[d])
        .max_by_key(|b| b.size)
        .context("a layer")?;
    ensure!(
        layer.size > 2 * lade_proto::SERVE_CHUNK_SIZE as u64,
        "{}",
        layer.size
    );
    let bytes = bundle
        .read_blob(&layer.digest, 0)?
        .next_chunk(layer.size as usize + 1)?
        .context("layer bytes")?;
    assert_eq!(bytes.len() as u64, layer.size);

    // A blob committed in another namespace only: containerd keeps its file beside the others.
    let other = dir.path().join("other-blob");
    std::fs::write(&other, b"committed in another namespace only")?;
    let other_digest = format!(
        "sha256:{}",
        lade_testkit::fixtures::sha256_hex(&std::fs::read(&other)?)
    );
    for node in &nodes {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ctr --address {} -n elsewhere content ingest --expected-digest {other_digest} other < {}",
                node.containerd.socket().display(),
                other.display()
            ))
            .output()?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let file = node
            .containerd
            .root()
            .join("io.containerd.content.v1.content/blobs/sha256")
            .join(other_digest.trim_start_matches("sha256:"));
        ensure!(file.is_file(), "{} is not there", file.display());

        let whole = read_from_peer(node, &layer.digest, 0).await?;
        assert!(whole == bytes, "{}: the blob read back differs", node.name);
        let from = lade_proto::SERVE_CHUNK_SIZE as u64 + 7;
        let tail = read_from_peer(node, &layer.digest, from).await?;
        assert!(
            tail == bytes[from as usize..],
            "{}: the tail differs",
            node.name
        );
        assert!(read_from_peer(node, &layer.digest, layer.size)
            .await?
            .is_empty());

        let past = read_from_peer(node, &layer.digest, layer.size + 1).await;
        assert!(past.is_err(), "{}: read past the end: {past:?}", node.name);
        for missing in [other_digest.clone(), format!("sha256:{}", "0".repeat(64))] {
            let status = read_from_peer(node, &missing, 0)
                .await
                .expect_err("not served");
            assert_eq!(
                status.code(),
                tonic::Code::NotFound,
                "{}: {status}",
                node.name
            );
        }
    }
    Ok(())
}
