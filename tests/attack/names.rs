//! Attacks through names: a bundle, or a caller talking to the agent directly, claiming a
//! digest reference (`repo@sha256:…`) of content the image is not — the name a pod pinned by
//! digest would then run. Needs containerd (see tests/load.rs).

use anyhow::{Context, Result};
use lade::load::connect;
use lade_proto::{Descriptor, ImageSpec, ImportRequest};
use lade_testkit::fixtures::Compression;
use lade_testkit::harness::daemon_tests_enabled;
use lade_testkit::hostile::{oci_layout, raw_tar, Member, OciImage};
use lade_testkit::nodes::{run_lade, DockerNode, Node};
use lade_tests::load_json;
use tonic::Code;

/// A digest no image of these tests has: what `docker.io/library/nginx@sha256:…` might pin.
const FOREIGN: &str = "sha256:4c0fdaa8b6341bfdeca5f18f7837462c80cff90527ee35ef185571e1c327beac";

fn image(name: &str) -> OciImage {
    OciImage::plain(name, vec![raw_tar(&[Member::file("hello", "hi")])])
}

/// A name the node holds and a bundle that claims it for other content.
struct Claim {
    /// Holds the bundles: bind it (not `..`) to keep them.
    _dir: tempfile::TempDir,
    /// The claiming bundle: other content under the name, then the images `beside` it.
    ours: std::path::PathBuf,
    /// What the node had under the name, and what the claiming bundle has there.
    before: lade::bundle::Image,
    after: lade::bundle::Image,
}

/// Loads an honest image named `name` onto the agent at `addr` (what the node had: its CNI
/// image, say), and writes a bundle claiming `name` for other content, with `beside`.
fn claim(addr: &str, name: &str, beside: &[OciImage]) -> Result<Claim> {
    let dir = tempfile::tempdir()?;
    let theirs = dir.path().join("theirs.tar");
    let ours = dir.path().join("ours.tar");
    std::fs::write(&theirs, oci_layout(&[image(name)]))?;
    let mut images = vec![OciImage::plain(
        name,
        vec![raw_tar(&[Member::file("evil", "1")])],
    )];
    images.extend(beside.iter().cloned());
    std::fs::write(&ours, oci_layout(&images))?;
    let (code, _, stderr) = load_json(&theirs, &[addr.to_string()], &[])?;
    assert_eq!(code, 0, "{stderr}");
    let first = |path: &std::path::Path| -> Result<lade::bundle::Image> {
        let mut bundle = lade::bundle::Bundle::open(path)?;
        Ok(bundle.images.swap_remove(0))
    };
    Ok(Claim {
        before: first(&theirs)?,
        after: first(&ours)?,
        ours,
        _dir: dir,
    })
}

/// `ctr images ls`'s line of `name` on `node` (name, type, digest, …).
fn listed(node: &Node, name: &str) -> Result<String> {
    let listed = node.containerd.ctr_ok(&["-n", "k8s.io", "images", "ls"])?;
    let line = listed
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .with_context(|| format!("{name} is gone: {listed}"))?;
    Ok(line.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bundle_naming_its_image_by_another_digest_is_refused_before_anything_is_sent(
) -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("images.tar");
    let claimed = format!("docker.io/library/nginx@{FOREIGN}");
    std::fs::write(&path, oci_layout(&[image(&claimed)]))?;
    let node = Node::start("attack-foreign-digest").await?;
    let out = run_lade(&[
        "load",
        path.to_str().context("utf-8")?,
        "--agent",
        &node.addr(),
    ])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("digest reference to other content") && stderr.contains(&claimed),
        "{stderr}"
    );
    assert!(
        node.all_image_names()?.iter().all(|n| !n.contains("nginx")),
        "the claimed name was created"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_import_naming_another_digest_creates_no_name() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    // The image's content is on the node (an honest load), so only the name check stands
    // between the caller and a digest reference to it.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("images.tar");
    std::fs::write(&path, oci_layout(&[image("x.io/attack/honest:1")]))?;
    let node = Node::start("attack-import-digest").await?;
    let (code, _, stderr) = load_json(&path, &[node.addr()], &[])?;
    assert_eq!(code, 0, "{stderr}");
    let bundle = lade::bundle::Bundle::open(&path)?;
    let own = &bundle.images[0].manifest;
    let blob = bundle.blobs.get(own).context("the manifest blob")?;

    let claimed = format!("docker.io/library/nginx@{FOREIGN}");
    let mut client = connect(&node.addr(), &lade_tests::dial()).await?;
    let request = ImportRequest {
        session: "attack-import-digest".into(),
        images: vec![ImageSpec {
            manifest: Some(Descriptor {
                digest: own.clone(),
                size: blob.size,
                media_type: blob.media_type.clone(),
                ..Default::default()
            }),
            names: vec!["x.io/attack/also:1".into(), claimed.clone()],
            source: "attack".into(),
            allow_overwrite: false,
        }],
    };
    let err = match client.import(request).await {
        Err(status) => status,
        Ok(events) => {
            let mut events = events.into_inner();
            loop {
                match events.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => anyhow::bail!("the import of {claimed} succeeded"),
                    Err(status) => break status,
                }
            }
        }
    };
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("own digest"), "{err}");
    let names = node.all_image_names()?;
    assert!(
        names
            .iter()
            .all(|n| !n.contains("nginx") && !n.contains("attack/also")),
        "{names:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_name_the_node_has_for_other_content_is_not_moved_unless_allowed() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let name = "x.io/attack/cni:v1";
    let node = Node::start("attack-overwrite").await?;
    // containerd's names point at the manifest.
    moved_only_when_allowed(
        &node.addr(),
        name,
        |i| &i.manifest,
        |digest| Ok(listed(&node, name)?.contains(digest)),
    )
}

/// Gives the node of the agent at `addr` an image named `name`, then loads a bundle that claims
/// `name` for other content ([`claim`]): the claimed image fails, saying the name already
/// points at what it had (`before`, its `digest` as the runtime names images), not at `after`,
/// and the name stays (`points_at(before)`); loaded again with --allow-overwrite, the name
/// moves (`points_at(after)`).
fn moved_only_when_allowed(
    addr: &str,
    name: &str,
    digest: impl Fn(&lade::bundle::Image) -> &String,
    points_at: impl Fn(&str) -> Result<bool>,
) -> Result<()> {
    let Claim {
        _dir,
        ours,
        before,
        after,
    } = claim(addr, name, &[])?;
    let (before, after, ours) = (digest(&before).as_str(), digest(&after).as_str(), &ours);
    let (code, reports, stderr) = load_json(ours, &[addr.to_string()], &[])?;
    assert_eq!(code, 1, "{stderr}");
    let reason = reports[0]["failed_images"][0]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(
        reason.contains("already points at") && reason.contains(before) && reason.contains(after),
        "{reports:#?}"
    );
    assert!(points_at(before)?, "the name was moved");

    let (code, _, stderr) = load_json(ours, &[addr.to_string()], &["--allow-overwrite"])?;
    assert_eq!(code, 0, "{stderr}");
    assert!(points_at(after)?, "--allow-overwrite did not move it");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sandbox_image_is_never_moved_even_with_allow_overwrite() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    // The node's pause image, as containerd's CRI configuration names it (its default here):
    // every new pod starts from it.
    let node = Node::start("attack-sandbox").await?;
    let sandbox = node.containerd.sandbox_image()?;
    sandbox_name_stays(&node, &sandbox)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sandbox_image_named_by_the_agent_flag_is_never_moved() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let sandbox = "x.io/attack/pause:custom";
    let node = Node::start_with("attack-sandbox-flag", &["--sandbox-image", sandbox]).await?;
    sandbox_name_stays(&node, sandbox)
}

/// The node gets `sandbox` from an honest bundle (creating it is how an air-gapped node gets
/// its pause image), then a bundle with other content under that name and another image
/// beside it, loaded with `--allow-overwrite`: the name stays, the other image is loaded.
fn sandbox_name_stays(node: &Node, sandbox: &str) -> Result<()> {
    let other = "x.io/attack/beside:1";
    let Claim {
        _dir,
        ours,
        before,
        after,
    } = claim(&node.addr(), sandbox, &[image(other)])?;
    let (before, after) = (before.manifest, after.manifest);

    let (code, reports, stderr) = load_json(&ours, &[node.addr()], &["--allow-overwrite"])?;
    assert_eq!(code, 1, "{stderr}");
    let failed = reports[0]["failed_images"]
        .as_array()
        .context("failed_images")?;
    assert_eq!(failed.len(), 1, "{reports:#?}");
    let reason = failed[0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("sandbox image")
            && reason.contains(sandbox)
            && reason.contains(&before)
            && reason.contains(&after),
        "{reports:#?}"
    );
    assert!(
        listed(node, sandbox)?.contains(&before),
        "the sandbox image was moved"
    );
    listed(node, other)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_docker_tag_for_another_image_is_not_moved_unless_allowed() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let name = "x.io/attack/cni:v1";
    let node = DockerNode::start("attack-docker-tag").await?;
    // Docker's image ID is the config digest.
    moved_only_when_allowed(
        &node.addr(),
        name,
        |i| &i.config,
        |digest| {
            let id = node
                .dockerd
                .docker_ok(&["image", "inspect", "--format", "{{.Id}}", name])?;
            Ok(id.trim() == digest)
        },
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_name_holding_the_same_image_under_other_manifest_bytes_is_moved() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    // `ctr images import` of a `docker save` archive makes its own manifest for each image;
    // the bundle (go-containerregistry's layout) carries another one for the same config and
    // layers. That is not other content: the name moves without --allow-overwrite.
    let dir = tempfile::tempdir()?;
    let imgs = lade_tests::images()?;
    let saved = lade_tests::docker_save_tar(dir.path(), &imgs)?;
    let (bundle, _) =
        lade_tests::gcr_bundle(dir.path(), "same.bundle.tar", &imgs, Compression::Gzip)?;
    let node = Node::start("attack-same-image").await?;
    let saved = saved.display().to_string();
    node.containerd
        .ctr_ok(&["-n", "k8s.io", "images", "import", &saved])?;
    let name = "release.daocloud.io/demo/app:v1";
    let imported = listed(&node, name)?;
    let ours = lade::bundle::Bundle::open(&bundle)?
        .images
        .into_iter()
        .find(|i| i.names.iter().any(|n| n == name))
        .context("app image in the bundle")?
        .manifest;
    assert!(
        !imported.contains(&ours),
        "ctr made the bundle's manifest itself, so this proves nothing: {imported}"
    );

    let (code, reports, stderr) = load_json(&bundle, &[node.addr()], &[])?;
    assert_eq!(code, 0, "{reports:#?}\n{stderr}");
    assert!(
        listed(&node, name)?.contains(&ours),
        "the name was not moved"
    );
    Ok(())
}
