//! One conformance suite for every runtime behind the agent: the same gRPC-level assertions
//! run against an agent on containerd, an agent on Docker and an in-process agent on the
//! in-memory runtime, so all keep the contract `agent.proto` documents (verified uploads,
//! resumable uploads, Have after PutBlob, idempotent Import, names only for complete images,
//! Verify of what is missing). The containerd and Docker runs need the same daemons as the
//! other end-to-end tests; the in-memory one needs neither root nor a daemon.

use anyhow::{ensure, Result};
use lade::bundle::Bundle;
use lade_proto::{
    put_blob_request::Msg, BlobHeader, Descriptor, HaveRequest, ImageSpec, ImportPhase,
    ImportRequest, PutBlobRequest, PutBlobResponse, VerifyRequest, CHUNK_SIZE,
};
use lade_testkit::cri;
use lade_testkit::fixtures::Compression;
use lade_testkit::harness::{daemon_tests_enabled, Containerd};
use lade_testkit::nodes::{DockerNode, Node};
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
