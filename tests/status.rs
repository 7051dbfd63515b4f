//! `lade status` end to end: real agents over private containerd instances, before a load,
//! after it, and after names were removed on a node as kubelet's image GC removes them.
//! Fails when containerd, runc or busybox-static is missing, unless LADE_SKIP_DAEMON_TESTS=1.

use anyhow::{Context, Result};
use lade_testkit::harness::daemon_tests_enabled;
use lade_testkit::nodes::{run_lade, Node};
use lade_tests::{load_json, sample_bundle, start_nodes};
use serde_json::Value;

const RETAG: [&str; 2] = ["--retag", "release.daocloud.io/demo=10.16.10.111/demo"];

/// `lade status BUNDLE -o json` (or text) over `nodes`: exit code and stdout.
fn status(bundle: &std::path::Path, nodes: &[Node], json: bool) -> Result<(i32, String)> {
    let mut args = vec!["status".to_string(), bundle.display().to_string()];
    if json {
        args.extend(["-o".into(), "json".into()]);
    }
    args.extend(RETAG.iter().map(|s| s.to_string()));
    for n in nodes {
        args.extend(["--agent".to_string(), n.addr()]);
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_lade(&argv)?;
    let code = out.status.code().context("lade status was killed")?;
    Ok((code, String::from_utf8_lossy(&out.stdout).into_owned()))
}

/// The state of `image` on node `i` in a `-o json` answer.
fn state<'a>(json: &'a Value, image: &str, i: usize) -> &'a str {
    json["images"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["image"] == image))
        .and_then(|r| r["nodes"][i]["state"].as_str())
        .unwrap_or("(absent)")
}

#[tokio::test(flavor = "multi_thread")]
async fn status_shows_each_image_on_each_node_and_exits_0_only_when_all_are_whole() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (bundle, _) = sample_bundle(dir.path())?;
    let nodes = start_nodes(&["status-a", "status-b"]).await?;
    let images = [
        "release.daocloud.io/demo/app:v1",
        "release.daocloud.io/demo/sidecar:v1",
        "busybox",
    ];

    // Nothing loaded yet: every image missing everywhere.
    let (code, out) = status(&bundle, &nodes, true)?;
    let json: Value = serde_json::from_str(&out).context(out.clone())?;
    assert_eq!(code, 1, "{out}");
    assert_eq!(json["complete"], false);
    for image in images {
        for i in 0..2 {
            assert_eq!(state(&json, image, i), "missing", "{image} on {i}: {out}");
        }
    }

    let addrs: Vec<String> = nodes.iter().map(Node::addr).collect();
    let (code, reports, stderr) = load_json(&bundle, &addrs, &RETAG)?;
    anyhow::ensure!(code == 0, "{reports:#?}\n{stderr}");
    let (code, out) = status(&bundle, &nodes, false)?;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("every node holds all 3 images"), "{out}");

    // What kubelet's image GC does on b: one name of app goes, and busybox entirely.
    let ctr = |args: &[&str]| {
        let mut all = vec!["-n", "k8s.io", "images", "rm"];
        all.extend(args);
        nodes[1].containerd.ctr_ok(&all)
    };
    ctr(&["10.16.10.111/demo/app:v1"])?;
    let busybox: Vec<String> = nodes[1]
        .all_image_names()?
        .into_iter()
        .filter(|n| n.contains("busybox"))
        .collect();
    assert!(!busybox.is_empty());
    ctr(&busybox.iter().map(String::as_str).collect::<Vec<_>>())?;

    let (code, out) = status(&bundle, &nodes, true)?;
    let json: Value = serde_json::from_str(&out).context(out.clone())?;
    assert_eq!(code, 1, "{out}");
    for image in images {
        assert_eq!(state(&json, image, 0), "present", "{out}");
    }
    assert_eq!(
        state(&json, "release.daocloud.io/demo/app:v1", 1),
        "incomplete"
    );
    let app_b = &json["images"][0]["nodes"][1]["problem"];
    assert!(
        app_b
            .as_str()
            .unwrap_or_default()
            .contains("10.16.10.111/demo/app:v1"),
        "{out}"
    );
    assert_eq!(
        state(&json, "release.daocloud.io/demo/sidecar:v1", 1),
        "present"
    );
    assert_eq!(state(&json, "busybox", 1), "missing", "{out}");
    let (_, text) = status(&bundle, &nodes, false)?;
    assert!(
        text.contains("MISSING") && text.contains("INCOMPLETE") && text.contains("1 of 2 nodes"),
        "{text}"
    );

    // Where the agent pins (containerd 1.7.3 and newer), a whole image whose pin label is
    // gone is reported: kubelet's image GC may take it.
    let pins = lade::load::connect(&nodes[0].addr(), &lade_tests::dial())
        .await?
        .info(lade_proto::InfoRequest {})
        .await?
        .into_inner()
        .images_pinned;
    if pins {
        nodes[0].containerd.ctr_ok(&[
            "-n",
            "k8s.io",
            "images",
            "label",
            "release.daocloud.io/demo/sidecar:v1",
            "io.cri-containerd.pinned=",
        ])?;
        let (code, out) = status(&bundle, &nodes, true)?;
        let json: Value = serde_json::from_str(&out).context(out.clone())?;
        assert_eq!(code, 1, "{out}");
        assert_eq!(
            state(&json, "release.daocloud.io/demo/sidecar:v1", 0),
            "not_pinned",
            "{out}"
        );
        assert_eq!(
            state(&json, "release.daocloud.io/demo/app:v1", 0),
            "present"
        );
    }

    // A load again puts back what was removed; status is whole again.
    let (code, reports, stderr) = load_json(&bundle, &addrs, &RETAG)?;
    anyhow::ensure!(code == 0, "{reports:#?}\n{stderr}");
    let (code, out) = status(&bundle, &nodes, false)?;
    assert_eq!(code, 0, "{out}");
    Ok(())
}
