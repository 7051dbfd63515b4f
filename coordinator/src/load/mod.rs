//! `lade load`: get every image of a bundle onto every node, named consistently.
//!
//! Owns the per-node procedure (Info, Have, PutBlob for what is missing, Import, Verify) and
//! running it on all nodes at once, bounded. One node's failure is recorded in its own
//! [`NodeReport`] and never stops the others. Rendering progress and the summary is
//! [`crate::progress`]'s job; naming rules are [`crate::reference`]'s.

pub mod check;
pub mod conn;
pub mod error;
pub mod relay;
pub mod report;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lade_proto::{
    put_blob_request::Msg, BlobHeader, Descriptor, HaveRequest, ImageSpec, InfoResponse,
    PutBlobRequest, UnpackHint,
};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, instrument};

use crate::bundle::{Bundle, LayerLimits, Platform};
use crate::progress::Progress;
use crate::reference::{target_names, Reference, ReferenceError, RetagRule};
use crate::select::{choose, Chosen, PlatformChoice};

use check::LayerChecks;
pub(crate) use conn::error_chain;
pub use conn::{connect, AgentConn, Credentials, Dial};
use conn::{identify, import, stream_chunks, verify_and_end};
pub use error::LoadError;
use relay::RelayMode;
pub use report::{summary_json, summary_table, FailedImage, NodeReport, Retry};

/// How a load runs.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Agent addresses, `host:port`.
    pub agents: Vec<String>,
    pub rules: Vec<RetagRule>,
    pub keep_original: bool,
    /// Nodes loaded at the same time.
    pub parallel: usize,
    pub dial: Dial,
    /// What a node gets when it is down or slow.
    pub retry: RetryPolicy,
    /// How far a layer may expand; `None` sends layers unchecked (see [`check`]).
    pub layer_check: Option<LayerLimits>,
    /// Compare what each node needs with its free space before sending (see [`space_needed`]).
    pub space_check: bool,
    /// Which platform of multi-platform images each node gets.
    pub platforms: PlatformChoice,
    /// Whether agents pass blobs on to each other ([`relay`]).
    pub relay: RelayMode,
}

/// How often and how patiently a node is tried. Retrying is safe because every step is
/// idempotent: `Have` sees what arrived, interrupted uploads resume, imports skip what is
/// unpacked.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Further attempts after a transient failure (connection refused or reset, agent
    /// unavailable); a bad bundle, a refused credential or corrupt data is never retried.
    pub retries: u32,
    /// Wait before the first retry; doubled each time, at most 30 s.
    pub backoff: Duration,
    /// Give up on a node whose attempt takes longer than this.
    pub node_timeout: Option<Duration>,
}

impl RetryPolicy {
    /// `run`, given up after `node_timeout` if there is one.
    pub(crate) async fn timed<T>(
        &self,
        agent: &str,
        run: impl std::future::Future<Output = Result<T, LoadError>>,
    ) -> Result<T, LoadError> {
        match self.node_timeout {
            Some(limit) => {
                tokio::time::timeout(limit, run)
                    .await
                    .unwrap_or(Err(LoadError::TimedOut {
                        agent: agent.to_string(),
                        limit,
                    }))
            }
            None => run.await,
        }
    }

    /// Whether attempt `attempt` (0-based) that failed with `e` is tried again; if so, says
    /// so, waits out the backoff (doubling, at most 30 s) and counts the attempt.
    pub(crate) async fn again(
        &self,
        e: &LoadError,
        attempt: &mut u32,
        agent: &str,
        progress: &dyn Progress,
    ) -> bool {
        if !e.is_transient() || *attempt >= self.retries {
            return false;
        }
        let wait = (self.backoff * 2u32.pow(*attempt)).min(Duration::from_secs(30));
        *attempt += 1;
        progress.phase(
            agent,
            &format!(
                "retry {attempt} of {} in {}: {e}",
                self.retries,
                humantime::format_duration(wait)
            ),
        );
        tokio::time::sleep(wait).await;
        true
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            retries: 2,
            backoff: Duration::from_secs(1),
            node_timeout: None,
        }
    }
}

/// One image of the bundle and every name it gets on the nodes.
#[derive(Clone, Debug, Serialize)]
pub struct PlannedImage {
    pub source: String,
    pub manifest: String,
    pub names: Vec<String>,
    /// Names may be moved from other content the node has under them (`--allow-overwrite`).
    #[serde(skip)]
    pub allow_overwrite: bool,
}

/// Why the bundle's images cannot be named as asked.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error(
        "name {name} would be given to two different images ({first} and {second}); adjust the --retag rules"
    )]
    NameClash {
        name: String,
        first: String,
        second: String,
    },
    #[error(
        "image {image}: name {name} is a digest reference to other content than the image ({manifest}); a bundle may only name an image by its own digest"
    )]
    ForeignDigest {
        image: String,
        name: String,
        manifest: String,
    },
}

/// Whether `digest` is one of `image`'s own: its manifest, its index, or one of its
/// platforms' manifests. A digest reference to anything else claims other content.
fn is_own_digest(image: &crate::bundle::Image, digest: &str) -> bool {
    image.manifest == digest
        || image.index.as_deref() == Some(digest)
        || image.platforms.iter().any(|v| v.manifest == digest)
}

/// Names every image of the bundle gets, the same on every node. Fails before anything is
/// sent if a name in the bundle or a retag result is not a valid reference, or if two
/// different images would end up under one name (the last import would silently win).
pub fn plan_names(
    bundle: &Bundle,
    rules: &[RetagRule],
    keep_original: bool,
    allow_overwrite: bool,
) -> Result<Vec<PlannedImage>, PlanError> {
    let mut owner: HashMap<String, (String, String)> = HashMap::new();
    let mut plan = Vec::with_capacity(bundle.images.len());
    for image in &bundle.images {
        let mut names = Vec::new();
        for raw in &image.names {
            let original = Reference::parse(raw)?;
            for target in target_names(&original, rules, keep_original)? {
                if target.digest().is_some_and(|d| !is_own_digest(image, d)) {
                    return Err(PlanError::ForeignDigest {
                        image: image.label().to_string(),
                        name: target.to_string(),
                        manifest: image.manifest.clone(),
                    });
                }
                let target = target.to_string();
                if let Some((manifest, first)) = owner.get(&target) {
                    if *manifest != image.manifest {
                        return Err(PlanError::NameClash {
                            name: target,
                            first: first.clone(),
                            second: image.label().to_string(),
                        });
                    }
                }
                owner.insert(
                    target.clone(),
                    (image.manifest.clone(), image.label().to_string()),
                );
                if !names.contains(&target) {
                    names.push(target);
                }
            }
        }
        plan.push(PlannedImage {
            source: image.label().to_string(),
            manifest: image.manifest.clone(),
            names,
            allow_overwrite,
        });
    }
    Ok(plan)
}

/// Loads the bundle onto every agent of `opts`; returns one report per agent, in order.
pub async fn load(
    bundle: Arc<Bundle>,
    plan: Arc<Vec<PlannedImage>>,
    opts: &LoadOptions,
    progress: Arc<dyn Progress>,
) -> Vec<NodeReport> {
    if let Some(fanout) = opts.relay.fanout(opts.agents.len()) {
        return relay::load(bundle, plan, opts, progress, fanout).await;
    }
    // One session id for the whole load, so every node's lease is named alike.
    let session = format!("load-{}", uuid::Uuid::new_v4().simple());
    let (sizes, checks) = checks_of(&bundle, opts).await;
    let mut reports: Vec<(usize, NodeReport)> =
        futures::stream::iter(opts.agents.iter().enumerate())
            .map(|(i, agent)| {
                let (bundle, plan, progress, session, checks, sizes) = (
                    bundle.clone(),
                    plan.clone(),
                    progress.clone(),
                    session.clone(),
                    checks.clone(),
                    sizes.clone(),
                );
                let space_check = opts.space_check;
                let choice = &opts.platforms;
                let (dial, retry) = (&opts.dial, &opts.retry);
                async move {
                    let mut report = NodeReport {
                        agent: agent.clone(),
                        images: plan.len(),
                        ..Default::default()
                    };
                    let started = Instant::now();
                    progress.node_started(agent);
                    let mut attempt = 0;
                    let result = loop {
                        let run = load_node(
                            &bundle,
                            &plan,
                            &session,
                            agent,
                            dial,
                            checks.as_ref(),
                            space_check.then_some(&*sizes),
                            choice,
                            &*progress,
                            &mut report,
                        );
                        match retry.timed(agent, run).await {
                            Err(e) if retry.again(&e, &mut attempt, agent, &*progress).await => {}
                            other => break other,
                        }
                    };
                    report.attempts = attempt + 1;
                    report.seconds = started.elapsed().as_secs_f64();
                    if let Err(e) = result {
                        // The summary reports it; a warning would tear through the bars.
                        info!(%agent, error = %e, "node failed");
                        report.error = Some(e.to_string());
                    }
                    report.ok = report.error.is_none() && report.failed_images.is_empty();
                    report.bytes_from_coordinator = report.bytes_sent;
                    if report.bytes_sent > 0 {
                        report.via = vec!["coordinator".into()];
                    }
                    progress.node_finished(&report);
                    (i, report)
                }
            })
            .buffer_unordered(opts.parallel.max(1))
            .collect()
            .await;
    reports.sort_by_key(|(i, _)| *i);
    reports.into_iter().map(|(_, r)| r).collect()
}

/// Every layer of the bundle, of every platform, with its diffID.
pub(crate) fn layer_diff_ids(bundle: &Bundle) -> impl Iterator<Item = (&String, &String)> {
    bundle.images.iter().flat_map(|i| {
        i.layers.iter().zip(&i.diff_ids).chain(
            i.platforms
                .iter()
                .flat_map(|v| v.layers.iter().zip(&v.diff_ids)),
        )
    })
}

/// The blobs a node is asked about (`Have`): those of the manifests chosen for it, layers
/// with their diffID so runtimes that store layers uncompressed (Docker) can recognise the
/// ones they hold.
pub(crate) fn have_descriptors<'a>(
    bundle: &Bundle,
    chosen: impl Iterator<Item = &'a Chosen>,
) -> Vec<Descriptor> {
    let diff_ids: HashMap<&str, &str> = layer_diff_ids(bundle)
        .map(|(layer, diff_id)| (layer.as_str(), diff_id.as_str()))
        .collect();
    let mut digests: Vec<&str> = chosen
        .flat_map(|c| c.blobs.iter().map(String::as_str))
        .collect();
    digests.sort_unstable();
    digests.dedup();
    digests
        .into_iter()
        .map(|d| {
            let b = &bundle.blobs[d];
            Descriptor {
                digest: b.digest.clone(),
                size: b.size,
                media_type: b.media_type.clone(),
                diff_id: diff_ids.get(d).map(|d| d.to_string()).unwrap_or_default(),
            }
        })
        .collect()
}

/// The node's platform as its agent reports it (this machine's if it says none).
pub(crate) fn node_platform(info: &InfoResponse) -> Platform {
    info.platform.parse().unwrap_or_else(|_| Platform::local())
}

/// Which manifest of each image the node of `info` gets under `choice` (or why none), and
/// whether `--all-platforms` fell back to the node's own platform because it runs Docker
/// (which holds one platform per image) while the bundle has multi-platform images.
pub(crate) fn node_choices(
    bundle: &Bundle,
    choice: &PlatformChoice,
    info: &InfoResponse,
) -> (Vec<Result<Chosen, String>>, bool) {
    let platform = node_platform(info);
    let (choice, fell_back) = match choice {
        PlatformChoice::All if info.runtime == "docker" => (
            &PlatformChoice::Node,
            bundle.images.iter().any(|i| !i.platforms.is_empty()),
        ),
        other => (other, false),
    };
    let chosen = bundle
        .images
        .iter()
        .map(|image| choose(image, choice, &platform))
        .collect();
    (chosen, fell_back)
}

/// `names` on a node whose names point at `target`: a digest reference to the image's index
/// or to one platform's manifest is true there only if that is the target, so elsewhere it
/// names the target instead (`repo@<target>`), as it would otherwise name other content.
fn node_names(names: &[String], target: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for name in names {
        let name = match name.split_once('@') {
            Some((repo, digest)) if digest != target => format!("{repo}@{target}"),
            _ => name.clone(),
        };
        if !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

/// The Import request of `planned` on a node that got `chosen`: its names on the manifest (or
/// index) chosen for the node.
pub(crate) fn import_spec(bundle: &Bundle, chosen: &Chosen, planned: &PlannedImage) -> ImageSpec {
    let blob = &bundle.blobs[&chosen.target];
    ImageSpec {
        names: node_names(&planned.names, &chosen.target),
        manifest: Some(Descriptor {
            digest: blob.digest.clone(),
            size: blob.size,
            media_type: blob.media_type.clone(),
            diff_id: String::new(),
        }),
        source: planned.source.clone(),
        allow_overwrite: planned.allow_overwrite,
    }
}

/// One warning per single-platform image whose config names a platform the node of `info`
/// cannot run (an arm64 image on an amd64 node): loaded as `ctr import` loads it, but its
/// containers will not start there.
pub(crate) fn foreign_platform_warnings(
    bundle: &Bundle,
    chosen: &[Result<Chosen, String>],
    info: &InfoResponse,
) -> Vec<String> {
    let node = node_platform(info);
    bundle
        .images
        .iter()
        .zip(chosen)
        .filter(|(image, chosen)| image.platforms.is_empty() && chosen.is_ok())
        .filter_map(|(image, _)| {
            let own = image.config_platform.as_ref()?;
            own.rank_for(&node).is_none().then(|| {
                format!(
                    "image {} is {own} (its config says so), this node is {node}: its \
                     containers will not start here",
                    image.label()
                )
            })
        })
        .collect()
}

/// The blobs of a `Have` answer the node lacks, with the offset its interrupted upload got
/// to; what it holds (whole blobs and kept prefixes) is added to `report`'s skipped counts.
pub(crate) fn missing_blobs(
    bundle: &Bundle,
    states: Vec<lade_proto::BlobState>,
    report: &mut NodeReport,
) -> HashMap<String, u64> {
    let mut missing = HashMap::new();
    for state in states {
        let Some(blob) = bundle.blobs.get(&state.digest) else {
            continue;
        };
        if state.present {
            report.blobs_skipped += 1;
            report.bytes_skipped += blob.size;
        } else {
            let offset = state.offset.min(blob.size);
            report.bytes_skipped += offset;
            missing.insert(blob.digest.clone(), offset);
        }
    }
    missing
}

/// Refuses the node of `info` if one of its filesystems lacks room for `missing` (see
/// [`space_needed`]); `sizes` is `None` when the space check is off.
pub(crate) fn check_space(
    bundle: &Bundle,
    agent: &str,
    info: &InfoResponse,
    missing: &HashMap<String, u64>,
    sizes: Option<&HashMap<String, u64>>,
) -> Result<(), LoadError> {
    let Some(sizes) = sizes else {
        return Ok(());
    };
    for need in space_needed(&info.storage, missing, bundle, sizes) {
        if need.needed > need.free {
            return Err(LoadError::NoSpace {
                agent: agent.to_string(),
                node: info.node_name.clone(),
                path: need.path,
                what: need.what,
                needed: need.needed,
                free: need.free,
            });
        }
    }
    Ok(())
}

/// For every layer a node unpacks, its diffID and the chain ID below it (from the first
/// manifest that uses it), so the agent can unpack it as soon as it arrives.
pub(crate) fn unpack_hints<'a>(
    chosen: impl Iterator<Item = &'a Chosen>,
) -> HashMap<&'a str, UnpackHint> {
    let mut hints = HashMap::new();
    for c in chosen {
        let mut parent = String::new();
        for (layer, diff_id) in &c.unpacked {
            hints.entry(layer.as_str()).or_insert_with(|| UnpackHint {
                diff_id: diff_id.clone(),
                parent_chain_id: parent.clone(),
            });
            parent = match parent.as_str() {
                "" => diff_id.clone(),
                below => crate::bundle::sha256_digest(format!("{below} {diff_id}").as_bytes()),
            };
        }
    }
    hints
}

/// About how many bytes every layer of the bundle unpacks to (see
/// [`Bundle::unpacked_size_hint`]): read from headers, once per load.
pub(crate) fn unpacked_size_hints(bundle: &Bundle) -> HashMap<String, u64> {
    layer_diff_ids(bundle)
        .map(|(l, _)| (l.clone(), bundle.unpacked_size_hint(l)))
        .collect()
}

/// What a load would write to one of a node's filesystems.
#[derive(Debug, PartialEq, Eq)]
pub struct SpaceNeed {
    pub path: String,
    /// What goes there, for messages: `blobs and unpacked layers`.
    pub what: String,
    pub needed: u64,
    pub free: u64,
}

/// For each filesystem the agent reported: the bytes the missing blobs take as stored
/// (`content`/`cache`) plus what their layers unpack to (`snapshots`/`images`), estimated
/// from `sizes`. A layer whose blob is missing is counted as not unpacked yet.
pub fn space_needed(
    storage: &[lade_proto::Storage],
    missing: &HashMap<String, u64>,
    bundle: &Bundle,
    sizes: &HashMap<String, u64>,
) -> Vec<SpaceNeed> {
    let stored: u64 = missing
        .iter()
        .map(|(d, offset)| bundle.blobs[d].size.saturating_sub(*offset))
        .sum();
    let unpacked: u64 = missing.keys().filter_map(|d| sizes.get(d)).sum();
    storage
        .iter()
        .map(|s| {
            let mut needed = 0;
            let mut what = Vec::new();
            for holds in &s.holds {
                match holds.as_str() {
                    "content" | "cache" => {
                        needed += stored;
                        what.push("blobs");
                    }
                    "snapshots" | "images" => {
                        needed += unpacked;
                        what.push("unpacked layers");
                    }
                    _ => {}
                }
            }
            SpaceNeed {
                path: s.path.clone(),
                what: what.join(" and "),
                needed,
                free: s.free_bytes,
            }
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
#[instrument(skip_all, fields(agent = %agent))]
async fn load_node(
    bundle: &Arc<Bundle>,
    plan: &[PlannedImage],
    session: &str,
    agent: &str,
    dial: &Dial,
    checks: Option<&Arc<LayerChecks>>,
    sizes: Option<&HashMap<String, u64>>,
    choice: &PlatformChoice,
    progress: &dyn Progress,
    report: &mut NodeReport,
) -> Result<(), LoadError> {
    let call_err = |call| LoadError::agent_call(agent, call);
    // A retried attempt sees the node afresh; only the bytes sent add up over attempts.
    report.images_loaded = 0;
    report.failed_images.clear();
    report.blobs_skipped = 0;
    report.bytes_skipped = 0;
    let (mut client, info) = identify(agent, dial, progress, report).await?;

    // A node that checks layers itself as it unpacks them needs no check here.
    let checks = checks.filter(|_| !info.checks_layers);
    let (chosen, docker_keeps_own) = node_choices(bundle, choice, &info);
    report.warnings = foreign_platform_warnings(bundle, &chosen, &info);
    if docker_keeps_own {
        progress.phase(
            agent,
            &format!(
                "Docker keeps one platform per image: loading {}",
                node_platform(&info)
            ),
        );
    }

    let have = client
        .have(HaveRequest {
            session: session.to_string(),
            blobs: have_descriptors(bundle, chosen.iter().flatten()),
        })
        .await
        .map_err(call_err("Have"))?
        .into_inner();

    let mut missing = missing_blobs(bundle, have.blobs, report);
    let to_send: u64 = missing
        .iter()
        .map(|(d, off)| bundle.blobs[d].size - off)
        .sum();
    check_space(bundle, agent, &info, &missing, sizes)?;
    progress.sending(agent, to_send, report.bytes_skipped);
    info!(
        missing = missing.len(),
        bytes = to_send,
        "sending missing blobs"
    );

    // Each layer the node unpacks, with what it needs to unpack it as soon as it is stored.
    let hints = unpack_hints(chosen.iter().flatten());
    if let Some(checks) = checks {
        let mut order: Vec<String> = Vec::new();
        for c in chosen.iter().flatten() {
            for d in c.blobs.iter().filter(|d| missing.contains_key(*d)) {
                if !order.contains(d) {
                    order.push(d.clone());
                }
            }
        }
        checks.prefetch(order);
    }

    // Pipelined: blobs go in the order the images need them, and each image is imported as
    // soon as all of its own are on the node, while the next image's blobs stream.
    let mut imports = tokio::task::JoinSet::new();
    // Blobs of the bundle found bad on the way (digest or layer check), with why: every image
    // using one fails, alone; the others load.
    let mut bad: HashMap<&str, String> = HashMap::new();
    for (chosen, planned) in chosen.iter().zip(plan) {
        let chosen = match chosen {
            Ok(chosen) => chosen,
            Err(reason) => {
                report.failed_images.push(FailedImage {
                    image: planned.source.clone(),
                    reason: reason.clone(),
                });
                continue;
            }
        };
        let mut failed = None;
        for digest in &chosen.blobs {
            if let Some(reason) = bad.get(digest.as_str()) {
                failed = Some(reason.clone());
                break;
            }
            if let Some(offset) = missing.remove(digest) {
                match put_blob(
                    &mut client,
                    bundle,
                    session,
                    digest,
                    offset,
                    hints.get(digest.as_str()).cloned(),
                    agent,
                    checks,
                    progress,
                )
                .await
                {
                    Ok(sent) => {
                        report.blobs_sent += 1;
                        report.bytes_sent += sent;
                    }
                    Err(e) if e.is_bad_content() => {
                        let reason = e.to_string();
                        bad.insert(digest, reason.clone());
                        failed = Some(reason);
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        if let Some(reason) = failed {
            report.failed_images.push(FailedImage {
                image: planned.source.clone(),
                reason,
            });
            continue;
        }
        let spec = import_spec(bundle, chosen, planned);
        imports.spawn(import(client.clone(), session.to_string(), spec));
    }
    progress.phase(agent, "importing");
    while let Some(joined) = imports.join_next().await {
        let events = joined
            .expect("import task panicked")
            .map_err(call_err("Import"))?;
        report.count_imports(events);
    }

    progress.phase(agent, "verifying");
    verify_and_end(&mut client, plan, &chosen, session, agent, report).await
}

/// What a load checks besides digests, set up once for all nodes: the unpacked size of
/// every layer for the space check (empty when it is off), and the shared layer checks.
pub(crate) async fn checks_of(
    bundle: &Arc<Bundle>,
    opts: &LoadOptions,
) -> (Arc<HashMap<String, u64>>, Option<Arc<LayerChecks>>) {
    let sizes = Arc::new(if opts.space_check {
        let bundle = bundle.clone();
        tokio::task::spawn_blocking(move || unpacked_size_hints(&bundle))
            .await
            .unwrap_or_default()
    } else {
        HashMap::new()
    });
    let checks = opts
        .layer_check
        .map(|limits| Arc::new(LayerChecks::new(bundle.clone(), limits)));
    (sizes, checks)
}

/// Streams one blob from `offset`; returns the bytes sent. A digest mismatch in the bundle, or
/// a layer that fails its check, withholds the last chunk, so the node never commits it.
#[allow(clippy::too_many_arguments)]
#[instrument(skip_all, fields(digest = %digest, offset = offset))]
async fn put_blob(
    client: &mut AgentConn,
    bundle: &Arc<Bundle>,
    session: &str,
    digest: &str,
    offset: u64,
    unpack: Option<UnpackHint>,
    agent: &str,
    checks: Option<&Arc<LayerChecks>>,
    progress: &dyn Progress,
) -> Result<u64, LoadError> {
    let blob = &bundle.blobs[digest];
    let (tx, rx) = mpsc::channel::<PutBlobRequest>(4);
    let header = PutBlobRequest {
        msg: Some(Msg::Header(BlobHeader {
            session: session.to_string(),
            blob: Some(Descriptor {
                digest: blob.digest.clone(),
                size: blob.size,
                media_type: blob.media_type.clone(),
                diff_id: String::new(),
            }),
            offset,
            unpack,
            ..Default::default()
        })),
    };
    tx.send(header)
        .await
        .expect("receiver is alive until the call starts");

    let (count_tx, mut count_rx) = mpsc::unbounded_channel::<u64>();
    let reader = stream_chunks(bundle, digest, offset, checks, tx, Some(count_tx));
    let call = client.put_blob(ReceiverStream::new(rx));
    tokio::pin!(call);
    let response = loop {
        tokio::select! {
            res = &mut call => break res,
            Some(n) = count_rx.recv() => progress.sent(agent, n),
        }
    };
    while let Ok(n) = count_rx.try_recv() {
        progress.sent(agent, n);
    }
    let read = reader.await.expect("blob reader task panicked");
    // The bundle's own error explains a refused upload better than the agent's view of it.
    let sent = read?;
    response.map_err(LoadError::agent_call(agent, "PutBlob"))?;
    Ok(sent)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_digest_reference_names_the_node_s_own_target() {
        let names = [
            "x.io/a:1".to_string(),
            "x.io/a@sha256:index".to_string(),
            "x.io/a@sha256:amd64".to_string(),
        ];
        assert_eq!(
            super::node_names(&names, "sha256:amd64"),
            ["x.io/a:1", "x.io/a@sha256:amd64"]
        );
        assert_eq!(
            super::node_names(&names, "sha256:index"),
            ["x.io/a:1", "x.io/a@sha256:index"]
        );
    }
}
