//! `lade load`: get every image of a bundle onto every node, named consistently.
//!
//! Owns the per-node procedure (Info, Have, PutBlob for what is missing, Import, Verify) and
//! running it on all nodes at once, bounded. One node's failure is recorded in its own
//! [`NodeReport`] and never stops the others. Rendering progress and the summary is
//! [`crate::progress`]'s job; naming rules are [`crate::reference`]'s.

pub mod check;
pub mod conn;
pub mod error;
pub mod plan;
pub mod relay;
pub mod report;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lade_proto::{
    put_blob_request::Msg, BlobHeader, Descriptor, HaveRequest, PutBlobRequest, UnpackHint,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, instrument};

use crate::bundle::{Bundle, LayerLimits};
use crate::progress::Progress;
use crate::reference::RetagRule;
use crate::select::PlatformChoice;

use check::LayerChecks;
pub(crate) use conn::error_chain;
pub use conn::{connect, AgentConn, Credentials, Dial};
use conn::{identify, import, stream_chunks, verify_and_end};
pub use error::LoadError;
use plan::{
    check_space, foreign_platform_warnings, have_descriptors, import_spec, missing_blobs,
    node_choices, node_platform, unpack_hints, unpacked_size_hints,
};
pub use plan::{
    plan_names, plan_text, space_needed, PlanError, PlannedImage, RelayMode, SpaceNeed,
};
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
