//! One conformance suite for every runtime behind the agent: the same gRPC-level assertions
//! run against an agent on containerd, an agent on Docker and an in-process agent on the
//! in-memory runtime, so all keep the contract `agent.proto` documents (verified uploads,
//! resumable uploads, Have after PutBlob, idempotent Import, names only for complete images,
//! Verify of what is missing). The containerd and Docker runs need the same daemons as the
//! other end-to-end tests; the in-memory one needs neither root nor a daemon.

use anyhow::{ensure, Result};
use lade::bundle::Bundle;
use lade_agent::runtime::Runtime;
use lade_proto::{
    put_blob_request::Msg, BlobHeader, Descriptor, HaveRequest, Held, HeldImage, HeldVersion,
    HoldRequest, HoldsRequest, ImageSpec, ImportPhase, ImportRequest, ListRequest, PutBlobRequest,
    PutBlobResponse, ReleaseRequest, ReleaseResponse, VerifyRequest, CHUNK_SIZE,
};
use lade_testkit::cri;
use lade_testkit::fixtures::{self, Compression};
use lade_testkit::harness::{daemon_tests_enabled, Containerd};
use lade_testkit::nodes::{DockerNode, Node};
use lade_testkit::runtimes::DockerStore;
use lade_tests::inproc::MemoryNode;
use lade_tests::{gcr_bundle, images_and_big, load_json};

const MISSING_REF: &str = "docker.io/library/lade-never-loaded:v0";

#[tokio::test(flavor = "multi_thread")]
async fn containerd_runtime_conforms() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let node = Node::start("conform-ctr").await?;
    conformance(&node.addr()).await
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_runtime_conforms() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let node = DockerNode::start("conform-dkr").await?;
    conformance(&node.addr()).await
}

/// The in-memory runtime the fault tests use keeps the same contract; served in this process.
#[tokio::test(flavor = "multi_thread")]
async fn memory_runtime_conforms() -> Result<()> {
    let node = MemoryNode::start("conform-mem").await?;
    conformance(&node.addr()).await
}

/// The CRI plugin takes the harness's config on every containerd version: a version 2 config
/// on 1.x, a version 3 one on 2.x, and a version 2 one that 2.x migrates at startup (with
/// LADE_CONTAINERD_CONFIG_VERSION=2). The snapshotter CRI keeps images in is the one the agent
/// must unpack into, so a setting lost in migration would leave loaded images unusable.
#[tokio::test(flavor = "multi_thread")]
async fn containerd_cri_takes_the_configured_snapshotter() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    // `native`, not containerd's default: a config that did not apply would show overlayfs.
    let node = Containerd::start_with_cri_snapshotter("cri-native", "native").await?;
    let filesystems = cri::image_filesystems(&node.socket()).await?;
    assert_eq!(
        filesystems,
        vec![node.root().join("io.containerd.snapshotter.v1.native")],
        "containerd {} with a version {} config",
        node.version(),
        node.config_version()?
    );
    Ok(())
}

/// Uploads `data` as blob `desc` from `offset` in one PutBlob call.
async fn put(
    client: &mut lade::load::AgentConn,
    session: &str,
    desc: &Descriptor,
    offset: u64,
    data: &[u8],
) -> Result<PutBlobResponse, tonic::Status> {
    let mut msgs = vec![PutBlobRequest {
        msg: Some(Msg::Header(BlobHeader {
            session: session.to_string(),
            blob: Some(desc.clone()),
            offset,
            unpack: None,
            ..Default::default()
        })),
    }];
    msgs.extend(data.chunks(CHUNK_SIZE).map(|c| PutBlobRequest {
        msg: Some(Msg::Chunk(c.to_vec().into())),
    }));
    client
        .put_blob(tokio_stream::iter(msgs))
        .await
        .map(|r| r.into_inner())
}

/// The blob states `Have` reports for `blobs`, in order.
async fn have(
    client: &mut lade::load::AgentConn,
    session: &str,
    blobs: &[Descriptor],
) -> Result<Vec<(bool, u64)>> {
    let states = client
        .have(HaveRequest {
            session: session.to_string(),
            blobs: blobs.to_vec(),
        })
        .await?
        .into_inner()
        .blobs;
    Ok(states.into_iter().map(|s| (s.present, s.offset)).collect())
}

/// Runs Import for `images`; returns the final phase and message of each image, in order.
async fn import(
    client: &mut lade::load::AgentConn,
    session: &str,
    images: Vec<ImageSpec>,
) -> Result<Vec<(ImportPhase, String)>> {
    let mut events = client
        .import(ImportRequest {
            session: session.to_string(),
            images,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(e) = events.message().await? {
        let phase = ImportPhase::try_from(e.phase)?;
        if matches!(phase, ImportPhase::ImageDone | ImportPhase::ImageFailed) {
            out.push((phase, e.message));
        }
    }
    Ok(out)
}

async fn verify(client: &mut lade::load::AgentConn, refs: &[&str]) -> Result<Vec<(bool, String)>> {
    let refs = refs.iter().map(|r| r.to_string()).collect();
    let statuses = client
        .verify(VerifyRequest { refs })
        .await?
        .into_inner()
        .refs;
    Ok(statuses.into_iter().map(|s| (s.ok, s.problem)).collect())
}

fn descriptor(bundle: &Bundle, digest: &str) -> Descriptor {
    let blob = &bundle.blobs[digest];
    Descriptor {
        digest: blob.digest.clone(),
        size: blob.size,
        media_type: blob.media_type.clone(),
        ..Default::default()
    }
}

fn read_all(bundle: &Bundle, digest: &str) -> Result<Vec<u8>> {
    let mut reader = bundle.read_blob(digest, 0)?;
    let mut out = Vec::new();
    while let Some(chunk) = reader.next_chunk(CHUNK_SIZE)? {
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// The contract every runtime keeps, checked through the agent at `agent`.
async fn conformance(agent: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    // One image with a layer of a few chunks, so an upload can stop half-way.
    let imgs = images_and_big(11, &[3 * CHUNK_SIZE])?;
    let (bundle_path, written) =
        gcr_bundle(dir.path(), "conform.bundle.tar", &imgs, Compression::None)?;
    let bundle = Bundle::open(&bundle_path)?;
    let big = written.images[3].layers[1].clone();
    let big_desc = descriptor(&bundle, &big.digest);
    let big_bytes = read_all(&bundle, &big.digest)?;
    let mut client = lade::load::connect(agent, &lade_tests::dial()).await?;
    let session = "conformance";

    // Verify of a name never loaded: not ok, and says why; the call itself succeeds.
    let missing = verify(&mut client, &[MISSING_REF]).await?;
    ensure!(!missing[0].0 && !missing[0].1.is_empty(), "{missing:?}");

    // Wrong bytes are refused as data loss and leave nothing, not even a resume point.
    let mut wrong = big_bytes.clone();
    wrong[CHUNK_SIZE + 7] ^= 0x55;
    let status = put(&mut client, session, &big_desc, 0, &wrong)
        .await
        .expect_err("corrupt bytes must be refused");
    ensure!(status.code() == tonic::Code::DataLoss, "{status}");
    ensure!(
        have(&mut client, session, std::slice::from_ref(&big_desc)).await? == vec![(false, 0)],
        "a refused upload left something"
    );

    // An upload cut short keeps its bytes; a wrong resume offset is refused; the right one
    // completes the blob, and Have then reports it present.
    let status = put(&mut client, session, &big_desc, 0, &big_bytes[..CHUNK_SIZE])
        .await
        .expect_err("a short blob must not count");
    ensure!(status.code() == tonic::Code::DataLoss, "{status}");
    ensure!(
        have(&mut client, session, std::slice::from_ref(&big_desc)).await?
            == vec![(false, CHUNK_SIZE as u64)],
        "the interrupted upload's bytes were not kept"
    );
    let status = put(&mut client, session, &big_desc, 1, &big_bytes[1..])
        .await
        .expect_err("a resume offset the node does not hold must be refused");
    ensure!(status.code() == tonic::Code::FailedPrecondition, "{status}");
    let done = put(
        &mut client,
        session,
        &big_desc,
        CHUNK_SIZE as u64,
        &big_bytes[CHUNK_SIZE..],
    )
    .await?;
    ensure!(
        done.received == (big_bytes.len() - CHUNK_SIZE) as u64 && !done.already_present,
        "{done:?}"
    );
    ensure!(have(&mut client, session, std::slice::from_ref(&big_desc)).await? == vec![(true, 0)]);
    let again = put(&mut client, session, &big_desc, 0, &big_bytes).await?;
    ensure!(again.already_present, "{again:?}");

    // Import of an image whose blobs never came: it fails alone, and gets no name.
    let nothing = ImageSpec {
        manifest: Some(Descriptor {
            digest: format!("sha256:{}", "0".repeat(64)),
            size: 100,
            ..Default::default()
        }),
        names: vec![MISSING_REF.to_string()],
        source: "never-uploaded".to_string(),
        allow_overwrite: false,
    };
    let outcome = import(&mut client, session, vec![nothing]).await?;
    ensure!(
        outcome.len() == 1 && outcome[0].0 == ImportPhase::ImageFailed,
        "{outcome:?}"
    );
    ensure!(!verify(&mut client, &[MISSING_REF]).await?[0].0);

    // A whole load, then Import again: idempotent, and every name verifies.
    // `lade` runs as a child; an agent served in this process goes on meanwhile.
    let (code, reports, stderr) =
        tokio::task::block_in_place(|| load_json(&bundle_path, &[agent.to_string()], &[]))?;
    ensure!(code == 0, "{reports:#?}\n{stderr}");
    let specs: Vec<ImageSpec> = bundle
        .images
        .iter()
        .map(|i| ImageSpec {
            manifest: Some(descriptor(&bundle, &i.manifest)),
            names: vec![lade::reference::Reference::parse(&i.names[0])
                .expect("fixture names parse")
                .to_string()],
            source: i.label().to_string(),
            allow_overwrite: false,
        })
        .collect();
    let names: Vec<String> = specs.iter().map(|s| s.names[0].clone()).collect();
    let outcome = import(&mut client, "conformance-again", specs).await?;
    ensure!(
        outcome.iter().all(|(p, _)| *p == ImportPhase::ImageDone),
        "{outcome:?}"
    );
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let verified = verify(&mut client, &refs).await?;
    ensure!(verified.iter().all(|(ok, _)| *ok), "{verified:?}");

    // Everything the load brought now counts as present.
    let all: Vec<Descriptor> = bundle
        .blobs
        .keys()
        .map(|d| descriptor(&bundle, d))
        .collect();
    let states = have(
        &mut client,
        "conformance-have",
        &with_diff_ids(&bundle, all),
    )
    .await?;
    ensure!(
        states.iter().all(|(present, _)| *present),
        "not all present after a load: {states:?}"
    );
    Ok(())
}

/// Layer descriptors with their diffIDs, as `lade load` sends them.
fn with_diff_ids(bundle: &Bundle, mut blobs: Vec<Descriptor>) -> Vec<Descriptor> {
    for image in &bundle.images {
        for (layer, diff_id) in image.layers.iter().zip(&image.diff_ids) {
            if let Some(d) = blobs.iter_mut().find(|d| &d.digest == layer) {
                d.diff_id = diff_id.clone();
            }
        }
    }
    blobs
}

/// What the hold conformance suite needs of a node beyond its agent's API: restarting the
/// agent, acting on the runtime behind lade's back, and looking into it.
trait HoldsNode {
    fn addr(&self) -> String;
    /// Restarts the agent (a fresh runtime instance on the same runtime).
    async fn restart(&mut self) -> Result<()>;
    /// Removes `names` as a user would (`ctr images rm`, `docker rmi`), then has the runtime
    /// collect garbage.
    async fn remove_and_collect(&self, names: &[String]) -> Result<()>;
    /// Whether the runtime has layer blob `digest` (uncompressed: `diff_id`): containerd's
    /// content store; Docker's graph driver: the agent's blob cache, or an image's layer.
    async fn has_layer(&self, digest: &str, diff_id: &str) -> Result<bool>;
    /// Creates a container of `image`; returns how Release names it.
    fn create_container(&self, image: &str) -> Result<String>;
}

/// Runs containerd's garbage collection synchronously in `namespace`: a lease deleted with
/// `--sync` waits for it.
fn containerd_collect(containerd: &Containerd, namespace: &str) -> Result<()> {
    containerd.ctr_ok(&["-n", namespace, "leases", "create", "--id", "lade-test-gc"])?;
    containerd.ctr_ok(&["-n", namespace, "leases", "rm", "--sync", "lade-test-gc"])?;
    Ok(())
}

fn containerd_has_blob(containerd: &Containerd, namespace: &str, digest: &str) -> Result<bool> {
    let listed = containerd.ctr_ok(&["-n", namespace, "content", "ls", "-q"])?;
    Ok(listed.lines().any(|l| l.trim() == digest))
}

impl HoldsNode for Node {
    fn addr(&self) -> String {
        Node::addr(self)
    }

    async fn restart(&mut self) -> Result<()> {
        self.agent.kill();
        self.agent.restart().await
    }

    async fn remove_and_collect(&self, names: &[String]) -> Result<()> {
        let mut args = vec!["-n", "k8s.io", "images", "rm"];
        args.extend(names.iter().map(String::as_str));
        self.containerd.ctr_ok(&args)?;
        containerd_collect(&self.containerd, "k8s.io")
    }

    async fn has_layer(&self, digest: &str, _: &str) -> Result<bool> {
        containerd_has_blob(&self.containerd, "k8s.io", digest)
    }

    fn create_container(&self, image: &str) -> Result<String> {
        self.containerd.ctr_ok(&[
            "-n",
            "k8s.io",
            "containers",
            "create",
            "--label",
            "io.kubernetes.pod.name=holds-0",
            "--label",
            "io.kubernetes.container.name=app",
            image,
            "lade-holds-user",
            "true",
        ])?;
        Ok("holds-0/app".to_string())
    }
}

impl HoldsNode for DockerNode {
    fn addr(&self) -> String {
        DockerNode::addr(self)
    }

    async fn restart(&mut self) -> Result<()> {
        self.agent.kill();
        self.agent.restart().await
    }

    async fn remove_and_collect(&self, names: &[String]) -> Result<()> {
        let mut args = vec!["rmi"];
        args.extend(names.iter().map(String::as_str));
        self.dockerd.docker_ok(&args)?;
        if self.dockerd.store() == DockerStore::Containerd {
            containerd_collect(self.dockerd.containerd(), "moby")?;
        }
        Ok(())
    }

    async fn has_layer(&self, digest: &str, diff_id: &str) -> Result<bool> {
        match self.dockerd.store() {
            DockerStore::Containerd => {
                containerd_has_blob(self.dockerd.containerd(), "moby", digest)
            }
            DockerStore::Overlay2 => {
                let hex = digest.trim_start_matches("sha256:");
                if self.cache_dir().join("blobs/sha256").join(hex).exists() {
                    return Ok(true);
                }
                let ids = self.dockerd.docker_ok(&["images", "-aq", "--no-trunc"])?;
                for id in ids.lines().filter(|l| !l.trim().is_empty()) {
                    let layers = self.dockerd.docker_ok(&[
                        "image",
                        "inspect",
                        "--format",
                        "{{json .RootFS.Layers}}",
                        id.trim(),
                    ])?;
                    if layers.contains(diff_id) {
                        return Ok(true);
                    }
                }
                Ok(false)
            }
        }
    }

    fn create_container(&self, image: &str) -> Result<String> {
        self.dockerd
            .docker_ok(&["create", "--name", "lade-holds-user", image, "true"])?;
        Ok("lade-holds-user".to_string())
    }
}

impl HoldsNode for MemoryNode {
    fn addr(&self) -> String {
        MemoryNode::addr(self)
    }

    /// The in-process agent keeps its runtime; its records live there, as they would in a
    /// runtime that outlives the agent.
    async fn restart(&mut self) -> Result<()> {
        self.revive().await
    }

    async fn remove_and_collect(&self, names: &[String]) -> Result<()> {
        self.runtime.remove_names(names).await?;
        self.runtime.collect();
        Ok(())
    }

    async fn has_layer(&self, digest: &str, _: &str) -> Result<bool> {
        let blob = Descriptor {
            digest: digest.to_string(),
            ..Default::default()
        };
        Ok(self.runtime.present(&[blob]).await?[0])
    }

    fn create_container(&self, image: &str) -> Result<String> {
        self.runtime.use_image(image, "holds-0/app");
        Ok("holds-0/app".to_string())
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn containerd_runtime_holds() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let mut node = Node::start("holds-ctr").await?;
    holds_conformance(&mut node).await
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_runtime_holds() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let mut node = DockerNode::start("holds-dkr").await?;
    holds_conformance(&mut node).await
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_runtime_holds() -> Result<()> {
    let mut node = MemoryNode::start("holds-mem").await?;
    holds_conformance(&mut node).await
}

/// The record of one bundle image: its target, `names` and every blob (layers with diffIDs).
fn held_image(bundle: &Bundle, image: &lade::bundle::Image, names: Vec<String>) -> HeldImage {
    let mut blobs = vec![descriptor(bundle, &image.config)];
    for (layer, diff_id) in image.layers.iter().zip(&image.diff_ids) {
        blobs.push(Descriptor {
            diff_id: diff_id.clone(),
            ..descriptor(bundle, layer)
        });
    }
    HeldImage {
        source: image.label().to_string(),
        target: Some(descriptor(bundle, &image.manifest)),
        names,
        blobs,
    }
}

fn held(version: &str, loaded_at: u64, images: Vec<HeldImage>) -> Held {
    Held {
        bundle: "holds-demo".into(),
        version: version.into(),
        loaded_at,
        images,
        peers: vec!["10.0.0.9:7070".into()],
    }
}

async fn hold(client: &mut lade::load::AgentConn, held: &Held) -> Result<()> {
    client
        .hold(HoldRequest {
            held: Some(held.clone()),
        })
        .await?;
    Ok(())
}

/// Every version the node holds, sorted by version.
async fn holds(client: &mut lade::load::AgentConn) -> Result<Vec<HeldVersion>> {
    let mut versions = client.holds(HoldsRequest {}).await?.into_inner().versions;
    versions.sort_by(|a, b| {
        let v = |h: &HeldVersion| h.held.as_ref().map(|h| h.version.clone());
        v(a).cmp(&v(b))
    });
    Ok(versions)
}

async fn release(
    client: &mut lade::load::AgentConn,
    version: &str,
    dry_run: bool,
) -> Result<ReleaseResponse> {
    Ok(client
        .release(ReleaseRequest {
            bundle: "holds-demo".into(),
            version: version.into(),
            dry_run,
        })
        .await?
        .into_inner())
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Hold, Holds and Release against one node: records outlive the agent and are replaced
/// whole; a held blob outlives every name of its image and the runtime's garbage collection,
/// and goes with its record; Release removes the names of a version but those another held
/// version has or a container uses.
async fn holds_conformance<N: HoldsNode>(node: &mut N) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (bundle_path, _) = lade_tests::sample_bundle(dir.path())?;
    let bundle = Bundle::open(&bundle_path)?;
    let image = |name: &str| -> Result<&lade::bundle::Image> {
        bundle
            .images
            .iter()
            .find(|i| i.names.iter().any(|n| n == name))
            .ok_or_else(|| anyhow::anyhow!("no image {name} in the sample bundle"))
    };
    let (busybox, sidecar, app) = (
        image(fixtures::BUSYBOX_IMAGE)?,
        image(fixtures::SIDECAR_IMAGE)?,
        image(fixtures::APP_IMAGE)?,
    );
    let tag = |i: &lade::bundle::Image| {
        lade::reference::Reference::parse(&i.names[0])
            .expect("fixture names parse")
            .to_string()
    };
    let mut client = lade::load::connect(&node.addr(), &lade_tests::dial()).await?;

    // Held before the load: what the load brings is kept from cleaning (Docker) at once.
    let v2_early = held(
        "2",
        1,
        vec![held_image(&bundle, sidecar, vec![tag(sidecar)])],
    );
    hold(&mut client, &v2_early).await?;
    let (code, reports, stderr) =
        tokio::task::block_in_place(|| load_json(&bundle_path, &[node.addr()], &[]))?;
    ensure!(code == 0, "{reports:#?}\n{stderr}");
    // The load recorded the sample bundle's own version, which has every name the load made;
    // this case makes its records by hand, so that one is emptied and let go (no name goes).
    ensure!(reports[0]["recorded"] == true, "{reports:#?}");
    let own = Held {
        bundle: "demo".into(),
        version: "0.1.0".into(),
        loaded_at: 1,
        images: vec![],
        peers: vec![],
    };
    hold(&mut client, &own).await?;
    let gone = client
        .release(ReleaseRequest {
            bundle: own.bundle.clone(),
            version: own.version.clone(),
            dry_run: false,
        })
        .await?
        .into_inner();
    ensure!(!gone.not_held && gone.removed.is_empty(), "{gone:?}");

    // Every name the load made for each image, as List shows them.
    let records = client.list(ListRequest {}).await?.into_inner().images;
    let names_of = |i: &lade::bundle::Image| -> Vec<String> {
        sorted(
            records
                .iter()
                .filter(|r| {
                    let target = r.target.as_ref().map(|t| t.digest.as_str());
                    target == Some(i.manifest.as_str()) || target == Some(i.config.as_str())
                })
                .map(|r| r.name.clone())
                .filter(|n| !n.starts_with("sha256:"))
                .collect(),
        )
    };
    let (busybox_names, sidecar_names, app_names) =
        (names_of(busybox), names_of(sidecar), names_of(app));
    ensure!(
        !busybox_names.is_empty() && !sidecar_names.is_empty() && !app_names.is_empty(),
        "names after the load: {records:?}"
    );
    let v1 = held(
        "1",
        2,
        vec![
            held_image(&bundle, busybox, busybox_names.clone()),
            held_image(&bundle, sidecar, sidecar_names.clone()),
            held_image(&bundle, app, app_names.clone()),
        ],
    );
    let v2 = held(
        "2",
        2,
        vec![held_image(&bundle, sidecar, sidecar_names.clone())],
    );
    hold(&mut client, &v1).await?;
    hold(&mut client, &v2).await?;

    // Holds: both, whole, every name verified; and the same after an agent restart.
    let listed = holds(&mut client).await?;
    let records_of =
        |l: &[HeldVersion]| -> Vec<Held> { l.iter().filter_map(|v| v.held.clone()).collect() };
    ensure!(
        records_of(&listed) == vec![v1.clone(), v2.clone()],
        "{listed:#?}"
    );
    for v in &listed {
        ensure!(v.bytes > 0 && v.bytes == v.bytes_present, "{v:#?}");
        ensure!(!v.refs.is_empty() && v.refs.iter().all(|r| r.ok), "{v:#?}");
    }
    node.restart().await?;
    let mut client = lade::load::connect(&node.addr(), &lade_tests::dial()).await?;
    let after_restart = holds(&mut client).await?;
    ensure!(
        records_of(&after_restart) == vec![v1.clone(), v2.clone()],
        "records lost or changed by an agent restart: {after_restart:#?}"
    );

    // A record is replaced whole, never added to.
    let app_only = held("1", 3, vec![held_image(&bundle, app, app_names.clone())]);
    hold(&mut client, &app_only).await?;
    ensure!(
        records_of(&holds(&mut client).await?) == vec![app_only.clone(), v2.clone()],
        "the record was not replaced"
    );
    hold(&mut client, &v1).await?;
    ensure!(records_of(&holds(&mut client).await?) == vec![v1.clone(), v2.clone()]);

    // Release of version 1: the app's names go; the sidecar's stay (version 2 has them); the
    // busybox's stay (a container uses the image), with a record of just that image.
    let user = node.create_container(&busybox_names[0])?;
    let app_layer = app.layers.last().expect("the app image has layers").clone();
    let app_diff_id = app
        .diff_ids
        .last()
        .expect("the app image has layers")
        .clone();
    let app_layer_size = bundle.blobs[&app_layer].size;
    let dry = release(&mut client, "1", true).await?;
    let check = |what: &str, r: &ReleaseResponse| -> Result<()> {
        ensure!(!r.not_held, "{what}: {r:?}");
        ensure!(sorted(r.removed.clone()) == app_names, "removed: {r:?}");
        ensure!(sorted(r.shared.clone()) == sidecar_names, "shared: {r:?}");
        let in_use: Vec<String> = sorted(r.in_use.iter().map(|u| u.name.clone()).collect());
        ensure!(in_use == busybox_names, "in use: {r:?}");
        ensure!(
            r.in_use.iter().all(|u| u.containers == vec![user.clone()]),
            "containers: {r:?}"
        );
        ensure!(
            r.freed_bytes >= app_layer_size,
            "{what}: freed less than the app layer's {app_layer_size} bytes: {r:?}"
        );
        Ok(())
    };
    check("dry run", &dry)?;
    let app_refs: Vec<&str> = app_names.iter().map(String::as_str).collect();
    ensure!(
        verify(&mut client, &app_refs)
            .await?
            .iter()
            .all(|(ok, _)| *ok),
        "a dry run removed names"
    );
    ensure!(
        node.has_layer(&app_layer, &app_diff_id).await?,
        "a dry run dropped content"
    );
    let done = release(&mut client, "1", false).await?;
    check("release", &done)?;
    ensure!(
        verify(&mut client, &app_refs)
            .await?
            .iter()
            .all(|(ok, _)| !*ok),
        "released names are still there"
    );
    ensure!(
        !node.has_layer(&app_layer, &app_diff_id).await?,
        "the released app layer {app_layer} is still on the node"
    );
    let left = records_of(&holds(&mut client).await?);
    ensure!(left.len() == 2, "{left:#?}");
    ensure!(
        left[0].images.len() == 1 && left[0].images[0].names == busybox_names,
        "version 1 should be held for the image in use only: {left:#?}"
    );

    // A held blob outlives every name of its image and the runtime's garbage collection...
    let sidecar_layer = sidecar
        .layers
        .last()
        .expect("the sidecar image has layers")
        .clone();
    let sidecar_diff_id = sidecar
        .diff_ids
        .last()
        .expect("the sidecar image has layers")
        .clone();
    // Every name, CRI's image ID record included.
    let every_sidecar_name: Vec<String> = client
        .list(ListRequest {})
        .await?
        .into_inner()
        .images
        .into_iter()
        .filter(|r| {
            let target = r.target.as_ref().map(|t| t.digest.as_str());
            target == Some(sidecar.manifest.as_str()) || target == Some(sidecar.config.as_str())
        })
        .map(|r| r.name)
        .collect();
    node.remove_and_collect(&every_sidecar_name).await?;
    ensure!(
        node.has_layer(&sidecar_layer, &sidecar_diff_id).await?,
        "the held sidecar layer {sidecar_layer} was collected"
    );
    let v = holds(&mut client).await?;
    ensure!(
        v[1].bytes == v[1].bytes_present,
        "version 2 lost content: {v:#?}"
    );
    // ...and goes with its record.
    let done = release(&mut client, "2", false).await?;
    ensure!(sorted(done.removed.clone()) == sidecar_names, "{done:?}");
    ensure!(
        !node.has_layer(&sidecar_layer, &sidecar_diff_id).await?,
        "the sidecar layer {sidecar_layer} outlived its record"
    );
    ensure!(records_of(&holds(&mut client).await?).len() == 1);
    ensure!(release(&mut client, "9", false).await?.not_held);
    Ok(())
}
