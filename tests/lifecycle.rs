//! Bundles as a lifecycle: `lade load` records the version on every node, `lade status`
//! without a bundle lists what every node holds, `lade prune` and `lade unload` release old
//! versions (keeping names another version shares and names a container uses). The `lade`
//! binary runs against agents served in this process over the in-memory runtime
//! (`inproc_*`), and against real agents over private containerd instances (`containerd_*`,
//! which fail when containerd, runc or busybox-static is missing, unless
//! LADE_SKIP_DAEMON_TESTS=1).

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use lade_testkit::fixtures::{
    layer_tar, sample_chart, sample_hints, write_bundle, ArchiveFormat, Compression, Entry,
    ImageFixture, WrittenArchive,
};
use lade_testkit::harness::daemon_tests_enabled;
use lade_testkit::nodes::{run_lade, Node};
use lade_tests::inproc::{load_json_async, Fault, MemoryNode};
use lade_tests::{images, load, names, start_nodes, write_images_tar};
use serde_json::Value;

/// The name of version 2's own app image.
const APP_V2: &str = "release.daocloud.io/demo/app:v2";

/// Version 1: the three sample images (app, sidecar, busybox; one base layer). Version 2:
/// a new app image on the same base, and busybox again (a name both versions have).
fn versions() -> Result<(Vec<ImageFixture>, Vec<ImageFixture>)> {
    let v1 = images()?;
    let app2 = layer_tar(&[
        Entry::dir("app", 0o755),
        Entry::file("app/hello.txt", 0o644, "hello from v2\n"),
    ]);
    let v2 = vec![
        ImageFixture::new(APP_V2, vec![v1[0].layers[0].clone(), app2], &["/bin/sh"]),
        v1[2].clone(),
    ];
    Ok((v1, v2))
}

/// A bundle of `images` whose chart is `demo` version `version`, at `dir/<file>`.
fn bundle(
    dir: &Path,
    file: &str,
    version: &str,
    images: &[ImageFixture],
) -> Result<(PathBuf, WrittenArchive)> {
    let parts = dir.join(format!("{file}.parts"));
    std::fs::create_dir_all(&parts)?;
    let (images_tar, written) =
        write_images_tar(&parts, images, ArchiveFormat::Gcr, Compression::Gzip)?;
    let chart: Vec<(String, Vec<u8>)> = sample_chart()
        .into_iter()
        .map(|(path, data)| match path.as_str() {
            "Chart.yaml" => (
                path,
                format!("apiVersion: v2\nname: demo\nversion: {version}\n").into_bytes(),
            ),
            _ => (path, data),
        })
        .collect();
    let path = dir.join(file);
    let mut out = std::fs::File::create(&path)?;
    write_bundle(&images_tar, &sample_hints(), &chart, &mut out)?;
    Ok((path, written))
}

/// `lade ARGS --agent …` on a blocking thread (the agents are served in this process):
/// exit code, stdout, stderr.
async fn lade(args: &[&str], nodes: &[&MemoryNode]) -> Result<(i32, String, String)> {
    let mut argv: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    for n in nodes {
        argv.extend(["--agent".to_string(), n.addr()]);
    }
    tokio::task::spawn_blocking(move || {
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let out = run_lade(&argv)?;
        Ok((
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    })
    .await?
}

/// `lade ARGS -o json`: exit code and the JSON.
async fn lade_json(args: &[&str], nodes: &[&MemoryNode]) -> Result<(i32, Value)> {
    let mut args = args.to_vec();
    args.extend(["-o", "json"]);
    let (code, out, err) = lade(&args, nodes).await?;
    let json = serde_json::from_str(&out)
        .with_context(|| format!("no JSON from lade {args:?}: {out}\n{err}"))?;
    Ok((code, json))
}

/// The (bundle, version, images) records node `n` holds, sorted.
async fn records(n: &MemoryNode) -> Vec<(String, String, Vec<String>)> {
    use lade_agent::runtime::Runtime;
    let mut held: Vec<(String, String, Vec<String>)> = n
        .runtime
        .holds()
        .await
        .expect("memory holds")
        .into_iter()
        .map(|h| {
            let mut images: Vec<String> = h.images.into_iter().map(|i| i.source).collect();
            images.sort();
            (h.bundle, h.version, images)
        })
        .collect();
    held.sort();
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inproc_two_versions_are_listed_pruned_and_unloaded() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (v1, v2) = versions()?;
    let (b1, w1) = bundle(dir.path(), "demo-1.bundle.tar", "0.1.0", &v1)?;
    let (b2, w2) = bundle(dir.path(), "demo-2.bundle.tar", "0.2.0", &v2)?;
    let nodes = MemoryNode::start_all(&["life-a", "life-b"]).await?;
    let all: Vec<&MemoryNode> = nodes.iter().collect();

    // Two loads, one per version: relayed, then direct. Each node records each.
    for (b, relay) in [(&b1, "auto"), (&b2, "off")] {
        let (code, reports, stderr) = load_json_async(b, &all, &["--relay", relay]).await?;
        ensure!(code == 0, "{reports:#?}\n{stderr}");
        for r in &reports {
            ensure!(r["recorded"] == true, "not recorded: {r}");
        }
        // loaded_at has a resolution of seconds: keep the versions apart.
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    }
    let held = records(&nodes[0]).await;
    assert_eq!(held.len(), 2, "{held:?}");
    assert_eq!(held[0].1, "0.1.0");
    assert_eq!(held[0].2.len(), 3);

    // `lade status` without a bundle lists both versions on both nodes, whole.
    let (code, out, err) = lade(&["status"], &all).await?;
    ensure!(code == 0, "{out}\n{err}");
    assert!(out.starts_with("BUNDLE  VERSION  NODE"), "{out}");
    for (version, images) in [("0.1.0", "3/3"), ("0.2.0", "2/2")] {
        for node in ["life-a", "life-b"] {
            assert!(
                out.lines().any(|l| l.starts_with("demo")
                    && l.contains(&format!(" {version} "))
                    && l.contains(node)
                    && l.contains(images)
                    && l.contains(" held ")),
                "{version} on {node}: {out}"
            );
        }
    }

    // A container on life-a uses the sidecar, which only version 1 has.
    nodes[0]
        .runtime
        .use_image(names::SIDECAR, "default/web/sidecar");
    let names_before: Vec<_> = nodes.iter().map(|n| n.runtime.image_names()).collect();

    // Dry run: says what would go, changes nothing; exit 3 for the name in use.
    let (code, dry) = lade_json(&["prune", "demo", "--keep", "1", "--dry-run"], &all).await?;
    assert_eq!(code, 3, "{dry:#}");
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["released"][0]["version"], "0.1.0");
    assert_eq!(dry["kept"][0]["version"], "0.2.0");
    assert!(dry["freed_bytes"].as_u64().unwrap() > 0, "{dry:#}");
    for (n, before) in nodes.iter().zip(&names_before) {
        assert_eq!(
            &n.runtime.image_names(),
            before,
            "the dry run changed names"
        );
        assert_eq!(records(n).await.len(), 2, "the dry run changed records");
    }

    // Prune for real: version 1 goes except the sidecar on life-a (in use, container named)
    // and busybox (version 2 has it); the base layer version 2 needs stays.
    let app1_own = w1.images[0].layers[1].digest.clone();
    let base = w1.images[0].layers[0].digest.clone();
    let (code, pruned) = lade_json(&["prune", "demo", "--keep", "1"], &all).await?;
    assert_eq!(code, 3, "{pruned:#}");
    let rows = pruned["nodes"].as_array().context("nodes")?;
    assert_eq!(rows.len(), 2, "{pruned:#}");
    for row in rows {
        let removed: Vec<&str> = row["removed"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(removed.contains(&names::APP), "{row}");
        assert!(!removed.contains(&names::BUSYBOX), "{row}");
        assert_eq!(row["shared"][0], names::BUSYBOX, "{row}");
        assert!(row["freed_bytes"].as_u64().unwrap() > 0, "{row}");
        if row["node"] == "life-a" {
            assert_eq!(row["in_use"][0]["name"], names::SIDECAR, "{row}");
            assert_eq!(row["in_use"][0]["containers"][0], "default/web/sidecar");
        } else {
            assert!(removed.contains(&names::SIDECAR), "{row}");
        }
    }
    for n in &nodes {
        let names = n.runtime.image_names();
        assert!(!names.contains_key(names::APP), "{names:?}");
        assert!(names.contains_key(names::BUSYBOX) && names.contains_key(APP_V2));
        assert!(!n.runtime.has_blob(&app1_own), "app v1's own layer stays");
        assert!(n.runtime.has_blob(&base), "the shared base layer went");
    }
    assert!(nodes[0].runtime.image_names().contains_key(names::SIDECAR));
    assert!(!nodes[1].runtime.image_names().contains_key(names::SIDECAR));
    let (_, text, _) = lade(&["prune", "demo", "--keep", "1", "--dry-run"], &all).await?;
    assert!(
        text.contains("life-a: demo 0.1.0: would keep release.daocloud.io/demo/sidecar:v1: used by container default/web/sidecar"),
        "{text}"
    );

    // Status: version 1 is left on life-a for the sidecar alone; everything held is whole.
    let (code, status) = lade_json(&["status"], &all).await?;
    ensure!(code == 0, "{status:#}");
    assert_eq!(status["rows"].as_array().unwrap().len(), 3, "{status:#}");
    assert_eq!(status["not_held"][0]["nodes"][0], "life-b", "{status:#}");

    // Unload version 2 by its bundle file, then an unknown version.
    let (code, out, err) = lade(&["unload", &b2.display().to_string()], &all).await?;
    ensure!(code == 0, "{out}\n{err}");
    assert!(out.contains("released demo 0.2.0"), "{out}");
    for n in &nodes {
        let names = n.runtime.image_names();
        assert!(!names.contains_key(APP_V2) && !names.contains_key(names::BUSYBOX));
        assert!(!n.runtime.has_blob(&w2.images[0].layers[1].digest));
    }
    assert_eq!(records(&nodes[1]).await, vec![]);
    let (code, out, _) = lade(&["unload", "demo@9.9.9"], &all).await?;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("no node that answered holds demo 9.9.9"),
        "{out}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inproc_a_bare_archive_is_recorded_under_the_name_it_is_given() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (archive, _) = write_images_tar(
        dir.path(),
        &images()?,
        ArchiveFormat::Gcr,
        Compression::None,
    )?;
    let nodes = MemoryNode::start_all(&["bare-a"]).await?;
    let all: Vec<&MemoryNode> = nodes.iter().collect();

    // images.tar names no version: loaded, not recorded, and the load says how to record it.
    let (code, reports, stderr) = load_json_async(&archive, &all, &[]).await?;
    ensure!(code == 0, "{reports:#?}\n{stderr}");
    assert_eq!(reports[0]["recorded"], false);
    assert!(
        stderr.contains("pass --bundle-name and --bundle-version"),
        "{stderr}"
    );
    assert!(records(&nodes[0]).await.is_empty());

    // One of the two is not enough: refused before any node is contacted.
    let path = archive.display().to_string();
    let (code, _, stderr) = lade(&["load", &path, "--bundle-name", "base"], &all).await?;
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("pass both --bundle-name and --bundle-version"),
        "{stderr}"
    );

    let named = ["--bundle-name", "base", "--bundle-version", "2026.12"];
    let (code, reports, stderr) = load_json_async(&archive, &all, &named).await?;
    ensure!(code == 0, "{reports:#?}\n{stderr}");
    assert_eq!(reports[0]["recorded"], true);
    let held = records(&nodes[0]).await;
    assert_eq!(held.len(), 1);
    assert_eq!(
        (held[0].0.as_str(), held[0].1.as_str()),
        ("base", "2026.12")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inproc_a_node_that_fails_to_record_is_named_and_the_load_exits_1() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (v1, _) = versions()?;
    let (b1, _) = bundle(dir.path(), "demo-1.bundle.tar", "0.1.0", &v1)?;
    let nodes = MemoryNode::start_all(&["rec-a", "rec-b"]).await?;
    nodes[1].runtime.inject(Fault::FailHold);
    let all: Vec<&MemoryNode> = nodes.iter().collect();

    let (code, reports, stderr) = load_json_async(&b1, &all, &[]).await?;
    assert_eq!(code, 1, "{reports:#?}\n{stderr}");
    // Both nodes hold every image; only rec-b lacks the record, and says so.
    for r in &reports {
        assert_eq!(r["ok"], true, "{r}");
    }
    assert_eq!(reports[0]["recorded"], true);
    assert_eq!(reports[1]["recorded"], false);
    let why = reports[1]["record_error"].as_str().unwrap_or_default();
    assert!(
        why.contains("the images are loaded, but the record of the load is missing")
            && why.contains("injected fault"),
        "{why}"
    );
    assert!(records(&nodes[1]).await.is_empty());

    // The text summary names the node; a load once the fault is gone records it.
    let path = b1.display().to_string();
    let (code, out, _) = lade(&["load", &path, "--progress", "none"], &all).await?;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("1 of 2 nodes hold the images but no record"),
        "{out}"
    );
    nodes[1].runtime.clear_faults();
    let (code, reports, stderr) = load_json_async(&b1, &all, &[]).await?;
    ensure!(code == 0, "{reports:#?}\n{stderr}");
    assert_eq!(records(&nodes[1]).await.len(), 1);
    Ok(())
}

/// `lade ARGS --agent …` against containerd nodes: exit code, stdout (and stderr in errors).
fn lade_on(args: &[&str], nodes: &[&Node]) -> Result<(i32, String)> {
    let mut argv: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    for n in nodes {
        argv.extend(["--agent".to_string(), n.addr()]);
    }
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = run_lade(&argv)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = out.status.code().with_context(|| {
        format!(
            "lade {args:?} was killed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok((code, stdout))
}

/// Digests of the blobs in `node`'s containerd content store.
fn content(node: &Node) -> Result<Vec<String>> {
    let out = node
        .containerd
        .ctr_ok(&["-n", "k8s.io", "content", "ls", "-q"])?;
    Ok(out.lines().map(str::to_string).collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn containerd_versions_are_recorded_pruned_and_survive_an_agent_restart() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (v1, v2) = versions()?;
    let (b1, w1) = bundle(dir.path(), "demo-1.bundle.tar", "0.1.0", &v1)?;
    let (b2, _) = bundle(dir.path(), "demo-2.bundle.tar", "0.2.0", &v2)?;
    let mut nodes = start_nodes(&["life-1", "life-2"]).await?;

    for b in [&b1, &b2] {
        let (code, reports, stderr) = load(b, &[&nodes[0], &nodes[1]], &[])?;
        ensure!(code == 0, "{reports:#?}\n{stderr}");
        for r in &reports {
            ensure!(r["recorded"] == true, "not recorded: {r}");
        }
        std::thread::sleep(std::time::Duration::from_millis(1100));
    }
    let both = [&nodes[0], &nodes[1]];
    let (code, listed) = lade_on(&["status"], &both)?;
    ensure!(code == 0, "{listed}");
    for version in ["0.1.0", "0.2.0"] {
        for node in ["life-1", "life-2"] {
            assert!(
                listed.lines().any(|l| l.starts_with("demo")
                    && l.contains(&format!(" {version} "))
                    && l.contains(node)
                    && l.contains(" held ")),
                "{version} on {node}: {listed}"
            );
        }
    }

    // A container of the sidecar (only version 1 has it) on life-1.
    nodes[0].containerd.ctr_ok(&[
        "-n",
        "k8s.io",
        "containers",
        "create",
        names::SIDECAR,
        "life-web",
    ])?;
    let base = w1.images[0].layers[0].digest.clone();
    let app1_own = w1.images[0].layers[1].digest.clone();
    let (code, out) = lade_on(&["prune", "demo", "--keep", "1", "-o", "json"], &both)?;
    let pruned: Value = serde_json::from_str(&out).context(out.clone())?;
    assert_eq!(code, 3, "{pruned:#}");
    let mut freed = 0;
    for row in pruned["nodes"].as_array().context("nodes")? {
        let removed = row["removed"].to_string();
        assert!(removed.contains(names::APP), "{row}");
        assert_eq!(row["shared"][0], names::BUSYBOX, "{row}");
        freed += row["freed_bytes"].as_u64().unwrap_or_default();
        if row["node"] == "life-1" {
            assert_eq!(row["in_use"][0]["name"], names::SIDECAR, "{row}");
            let containers = row["in_use"][0]["containers"].to_string();
            assert!(containers.contains("life-web"), "{row}");
        }
    }
    assert!(freed > 0, "{pruned:#}");
    for n in &nodes {
        let held = content(n)?;
        assert!(
            held.contains(&base),
            "{}: the shared base layer went",
            n.name
        );
        assert!(
            !held.contains(&app1_own),
            "{}: app v1's layer stayed",
            n.name
        );
        let names = n.image_names()?;
        assert!(!names.iter().any(|x| x == names::APP), "{names:?}");
        assert!(names.iter().any(|x| x == APP_V2), "{names:?}");
    }
    assert!(nodes[0].image_names()?.iter().any(|x| x == names::SIDECAR));

    // The records live in containerd: a restarted agent reports the same.
    let (code, before) = lade_on(&["status"], &both)?;
    ensure!(code == 0, "{before}");
    nodes[0].agent.kill();
    nodes[0].agent.restart().await?;
    let both = [&nodes[0], &nodes[1]];
    let (code, after) = lade_on(&["status"], &both)?;
    assert_eq!(code, 0, "{after}");
    assert_eq!(before, after);

    // A node with an empty containerd joins: a load fills it and records it; status is whole.
    nodes.push(Node::start("life-3").await?);
    let all: Vec<&Node> = nodes.iter().collect();
    let (code, reports, stderr) = load(&b2, &all, &[])?;
    ensure!(code == 0, "{reports:#?}\n{stderr}");
    let (code, out) = lade_on(&["status"], &all)?;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.lines()
            .any(|l| l.contains(" 0.2.0 ") && l.contains("life-3") && l.contains(" held ")),
        "{out}"
    );
    Ok(())
}
