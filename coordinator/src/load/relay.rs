//! Relay fan-out: every missing blob leaves the coordinator once, whatever the number of
//! nodes; the agents pass it on to each other along a chain or a tree.
//!
//! With relay on, the load's entry hands over to [`load`] here, which runs the load in
//! three stages instead of one independent procedure per node:
//! 1. `Info` and `Have` on every node (retried like a plain load); a node that fails them is
//!    reported failed and left out of the topology.
//! 2. Blob by blob, in the order the images need them: one `PutBlob` to the root of the
//!    topology, whose header lists the tree below it ([`RelayHop`]): who stores, from which
//!    offset, and who only passes the stream on because it already holds the blob. The
//!    answer carries every reached node's outcome. Each image is imported on a node as soon
//!    as all of its blobs are there, while the next blobs stream.
//! 3. `Verify` and `EndSession` per node, as a plain load does.
//!
//! Failures: a node that gets no outcome was cut off by a failure above it and is sent the
//! blob again in a new tree of the nodes still lacking it (re-parented). A node whose own
//! call failed is asked `Info` by the coordinator: if it answers, its peers cannot reach it
//! and the coordinator serves it directly from then on; if not, it is dead and reported
//! failed. A node that refused the blob (its own verification or store failed) fails alone.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lade_proto::{
    put_blob_request::Msg, BlobHeader, HaveRequest, InfoRequest, PutBlobRequest, PutBlobResponse,
    RelayHop, UnpackHint,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

use crate::bundle::Bundle;
use crate::progress::Progress;
use crate::select::Chosen;

use super::check::LayerChecks;
use super::conn::{import, stream_chunks, verify_and_end, AgentConn};
use super::error::{FailureKind, LoadError};
use super::plan::{
    check_space, children, descriptor, foreign_platform_warnings, have_descriptors, import_spec,
    missing_blobs, node_choices, render_topology, unique_missing, unpack_hints, RelayMode,
};
use super::report::{FailedImage, NodeReport};
use super::run::Run;

/// One node of the load as the relay sees it.
struct Node {
    /// Position in `opts.agents` and in the reports.
    idx: usize,
    agent: String,
    client: AgentConn,
    /// Blobs it still lacks, with the bytes of each it already holds.
    missing: HashMap<String, u64>,
    /// Per image of the bundle, the manifest it gets (its platform's), or why none.
    chosen: Vec<Result<Chosen, String>>,
    /// How it unpacks each layer as soon as it is stored.
    hints: HashMap<String, UnpackHint>,
    /// Peers could not reach it, but the coordinator can: it is sent blobs directly.
    direct: bool,
    /// Why it dropped out, and what kind of failure that was; it gets nothing more.
    failed: Option<(FailureKind, String)>,
}

impl Node {
    fn alive(&self) -> bool {
        self.failed.is_none()
    }
}

/// How one node ended in one delivery of a blob.
enum Outcome {
    Stored {
        received: u64,
        already: bool,
    },
    Passed,
    /// It answered but could not store the blob.
    Refused(String),
    /// The call to it failed; its state is unknown.
    Lost(String),
}

/// Loads with relay fan-out of `fanout`; one report per agent, in the order of
/// `opts.agents`.
pub(crate) async fn load(run: &Run<'_>, fanout: usize) -> Vec<NodeReport> {
    let Run {
        bundle,
        plan,
        opts,
        progress,
        session,
        ..
    } = run;
    let started = Instant::now();
    let mut reports: Vec<NodeReport> = opts
        .agents
        .iter()
        .map(|agent| NodeReport {
            agent: agent.clone(),
            images: plan.len(),
            ..Default::default()
        })
        .collect();

    // Stage 1: who is there, which manifests each gets, and what each lacks.
    let identified: Vec<(usize, Identified, u32)> =
        futures::stream::iter(opts.agents.iter().enumerate())
            .map(|(i, agent)| {
                let report = reports[i].clone();
                async move {
                    progress.node_started(agent);
                    let (result, attempts) = identify(run, agent, report).await;
                    (i, result, attempts)
                }
            })
            .buffer_unordered(opts.parallel.max(1))
            .collect()
            .await;
    let mut nodes: Vec<Node> = Vec::new();
    // The layer check runs here only if some node does not check layers itself.
    let mut all_check_layers = true;
    for (i, result, attempts) in identified {
        reports[i].attempts = attempts;
        match result {
            Ok((client, report, known)) => {
                reports[i] = NodeReport { attempts, ..report };
                let hints = unpack_hints(known.chosen.iter().flatten())
                    .into_iter()
                    .map(|(d, h)| (d.to_string(), h))
                    .collect();
                all_check_layers &= known.checks_layers;
                nodes.push(Node {
                    idx: i,
                    agent: opts.agents[i].clone(),
                    client,
                    missing: known.missing,
                    chosen: known.chosen,
                    hints,
                    direct: false,
                    failed: None,
                });
            }
            Err(e) => {
                info!(agent = %opts.agents[i], error = %e, "node failed");
                reports[i].fail_with(&e);
            }
        }
    }
    let checks = run.checks.clone().filter(|_| !all_check_layers);
    nodes.sort_by_key(|n| n.idx);
    // An address given twice would be a tree forwarding to itself: keep the first.
    let mut seen = std::collections::HashSet::new();
    nodes.retain(|n| {
        let first = seen.insert(n.agent.clone());
        if !first {
            reports[n.idx].fail(
                FailureKind::Skipped,
                format!(
                    "agent {} is listed more than once; it is loaded once, as the first of them",
                    n.agent
                ),
            );
        }
        first
    });
    let missing: Vec<HashMap<String, u64>> = nodes.iter().map(|n| n.missing.clone()).collect();
    let names: Vec<String> = nodes.iter().map(|n| label(&reports[n.idx])).collect();
    let unique = unique_missing(bundle, &missing);
    eprint!(
        "relay {}: {}\n{}",
        RelayMode::Tree(fanout).describe(names.len().max(2)),
        if unique == 0 {
            "every node holds every blob already".to_string()
        } else {
            format!(
                "{} missing on some node, sent from here once",
                indicatif::HumanBytes(unique)
            )
        },
        render_topology(&names, fanout)
    );
    for n in &nodes {
        let to_send: u64 = n
            .missing
            .iter()
            .map(|(d, off)| bundle.blobs[d].size - off)
            .sum();
        progress.sending(&n.agent, to_send, reports[n.idx].bytes_skipped);
    }

    // Stage 2: every blob once into the topology; imports as images complete.
    if let Some(checks) = &checks {
        let mut order: Vec<String> = Vec::new();
        for i in 0..plan.len() {
            for d in image_order(&nodes, i) {
                if nodes.iter().any(|n| n.missing.contains_key(&d)) && !order.contains(&d) {
                    order.push(d);
                }
            }
        }
        checks.prefetch(order);
    }
    let mut imports = tokio::task::JoinSet::new();
    let mut relay_failures: Vec<(usize, LoadError)> = Vec::new();
    // Blobs of the bundle found bad on the way (digest or layer check), with why: every
    // image using one fails on every node, alone; the others load.
    let mut bad: HashMap<String, String> = HashMap::new();
    for (i, planned) in plan.iter().enumerate() {
        for digest in image_order(&nodes, i) {
            if bad.contains_key(&digest) {
                continue;
            }
            let delivery = Delivery {
                bundle,
                session,
                digest: &digest,
                checks: checks.as_ref(),
                fanout,
                progress: &**progress,
            };
            if let Some(reason) = delivery.run(&mut nodes, &mut reports).await {
                bad.insert(digest.clone(), reason);
            }
        }
        for n in nodes.iter().filter(|n| n.alive()) {
            let chosen = match &n.chosen[i] {
                Ok(c) => c,
                Err(reason) => {
                    reports[n.idx].failed_images.push(FailedImage {
                        image: planned.source.clone(),
                        reason: reason.clone(),
                    });
                    continue;
                }
            };
            if let Some(reason) = chosen.blobs.iter().find_map(|d| bad.get(d)) {
                reports[n.idx].failed_images.push(FailedImage {
                    image: planned.source.clone(),
                    reason: reason.clone(),
                });
                continue;
            }
            if chosen.blobs.iter().any(|d| n.missing.contains_key(d)) {
                continue; // cannot happen for a live node: a failed delivery fails it
            }
            let spec = import_spec(bundle, chosen, planned);
            let (client, session, idx) = (n.client.clone(), session.clone(), n.idx);
            imports.spawn(async move { (idx, import(client, session, spec).await) });
        }
    }
    for n in &nodes {
        if n.alive() {
            progress.phase(&n.agent, "importing");
        }
    }
    while let Some(joined) = imports.join_next().await {
        let (idx, result) = joined.expect("import task panicked");
        let report = &mut reports[idx];
        match result {
            Ok(events) => report.count_imports(events),
            Err(status) => {
                relay_failures.push((idx, LoadError::agent_call(&report.agent, "Import")(status)))
            }
        }
    }
    for (idx, error) in relay_failures {
        if let Some(n) = nodes.iter_mut().find(|n| n.idx == idx) {
            n.failed.get_or_insert((error.kind(), error.to_string()));
        }
    }

    // Stage 3: verify and release, per node.
    let finished: Vec<(usize, Result<Vec<FailedImage>, LoadError>)> =
        futures::stream::iter(nodes.iter().filter(|n| n.alive()))
            .map(|n| {
                let mut report = reports[n.idx].clone();
                let (plan, session, progress) = (plan.clone(), session.clone(), progress.clone());
                let (mut client, agent, idx) = (n.client.clone(), n.agent.clone(), n.idx);
                let chosen = n.chosen.clone();
                async move {
                    progress.phase(&agent, "verifying");
                    let r =
                        verify_and_end(&mut client, &plan, &chosen, &session, &agent, &mut report)
                            .await;
                    (idx, r.map(|()| report.failed_images))
                }
            })
            .buffer_unordered(opts.parallel.max(1))
            .collect()
            .await;
    for (idx, r) in finished {
        match r {
            Ok(failed) => reports[idx].failed_images = failed,
            Err(e) => reports[idx].fail_with(&e),
        }
    }
    for n in &nodes {
        if let Some((kind, e)) = &n.failed {
            reports[n.idx].fail(*kind, e.clone());
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    for report in &mut reports {
        report.seconds = seconds;
        report.settle();
        progress.node_finished(report);
    }
    reports
}

/// The blobs of image `i` some live node needs, in sending order (each node's chosen
/// manifest, then its config and layers; nodes of other platforms add theirs after).
fn image_order(nodes: &[Node], i: usize) -> Vec<String> {
    let mut order: Vec<String> = Vec::new();
    for n in nodes.iter().filter(|n| n.alive()) {
        if let Ok(c) = &n.chosen[i] {
            for d in &c.blobs {
                if !order.contains(d) {
                    order.push(d.clone());
                }
            }
        }
    }
    order
}

/// The node's name in messages and `via`, else its address.
fn label(report: &NodeReport) -> String {
    if report.node.is_empty() {
        report.agent.clone()
    } else {
        report.node.clone()
    }
}

/// A node's client, its report with what it is and holds, and the blobs it lacks.
type Identified = Result<(AgentConn, NodeReport, Knowledge), LoadError>;

/// What Info and Have told about a node: the manifests it gets and the blobs it lacks.
struct Knowledge {
    chosen: Vec<Result<Chosen, String>>,
    missing: HashMap<String, u64>,
    /// The node checks layers itself as it unpacks them.
    checks_layers: bool,
}

/// Connect, Info and Have on one node, retried as the load's retry policy says. Returns the
/// client, the report filled with what the node is and holds, and the blobs it lacks.
async fn identify(run: &Run<'_>, agent: &str, mut report: NodeReport) -> (Identified, u32) {
    let (bundle, opts, progress, session) = (&*run.bundle, run.opts, &*run.progress, &run.session);
    let retry = &opts.retry;
    let mut attempt = 0;
    loop {
        let run = async {
            let (mut client, info) =
                super::conn::identify(agent, &opts.dial, progress, &mut report).await?;
            // Which manifest of each image this node gets (as a plain load chooses).
            let (chosen, _) = node_choices(bundle, &opts.platforms, &info);
            report.warnings = foreign_platform_warnings(bundle, &chosen, &info);
            let have = client
                .have(HaveRequest {
                    session: session.to_string(),
                    blobs: have_descriptors(bundle, chosen.iter().flatten()),
                })
                .await
                .map_err(LoadError::agent_call(agent, "Have"))?
                .into_inner();
            report.blobs_skipped = 0;
            report.bytes_skipped = 0;
            let missing = missing_blobs(bundle, have.blobs, &mut report);
            check_space(bundle, agent, &info, &missing, run.sizes())?;
            Ok((
                client,
                report.clone(),
                Knowledge {
                    chosen,
                    missing,
                    checks_layers: info.checks_layers,
                },
            ))
        };
        match retry.timed(agent, run).await {
            Err(e) if retry.again(&e, &mut attempt, agent, progress).await => {}
            other => return (other, attempt + 1),
        }
    }
}

/// The relay tree over the live, peer-reachable nodes for `digest`: the hop of position
/// `i` and below, or `None` when nobody there needs the blob.
fn hop(nodes: &[&Node], digest: &str, i: usize, k: usize) -> Option<RelayHop> {
    let n = nodes[i];
    let forward: Vec<RelayHop> = children(i, nodes.len(), k)
        .filter_map(|c| hop(nodes, digest, c, k))
        .collect();
    let own = n.missing.get(digest).copied();
    if own.is_none() && forward.is_empty() {
        return None;
    }
    Some(RelayHop {
        address: n.agent.clone(),
        store: own.is_some(),
        offset: own.unwrap_or(0),
        forward,
    })
}

/// Who forwarded to whom in `root`'s tree: child address -> parent address.
fn parents(root: &RelayHop, out: &mut HashMap<String, String>) {
    for child in &root.forward {
        out.insert(child.address.clone(), root.address.clone());
        parents(child, out);
    }
}

/// One blob to get onto every live node that lacks it.
struct Delivery<'a> {
    bundle: &'a Arc<Bundle>,
    session: &'a str,
    digest: &'a str,
    checks: Option<&'a Arc<LayerChecks>>,
    fanout: usize,
    progress: &'a dyn Progress,
}

impl Delivery<'_> {
    /// One tree from the coordinator, then again to the nodes a failure cut off, until every
    /// live node holds the blob or failed. Returns why the blob itself is bad (its digest or
    /// its layer check failed): no node got it, and the images using it fail.
    async fn run(&self, nodes: &mut [Node], reports: &mut [NodeReport]) -> Option<String> {
        deliver(self, nodes, reports).await
    }
}

async fn deliver(
    d: &Delivery<'_>,
    nodes: &mut [Node],
    reports: &mut [NodeReport],
) -> Option<String> {
    let (bundle, digest, fanout, progress) = (d.bundle, d.digest, d.fanout, d.progress);
    let blob = &bundle.blobs[digest];
    // How the nodes unpack it as soon as it is stored (the first that needs it says).
    let hint = nodes
        .iter()
        .filter(|n| n.missing.contains_key(digest))
        .find_map(|n| n.hints.get(digest).cloned());
    let name_of: HashMap<String, String> = reports
        .iter()
        .map(|r| (r.agent.clone(), label(r)))
        .collect();
    let name = |agent: &str| {
        name_of
            .get(agent)
            .cloned()
            .unwrap_or_else(|| agent.to_string())
    };
    for round in 0..4 {
        if !nodes
            .iter()
            .any(|n| n.alive() && n.missing.contains_key(digest))
        {
            return None;
        }
        if round > 0 {
            refresh_offsets(d, nodes, reports).await;
        }
        // One tree over the nodes peers reach; each node only the coordinator reaches on
        // its own.
        // After a failure, the tree is made of the nodes still lacking the blob only: no
        // node passes it on again.
        let relayed: Vec<&Node> = nodes
            .iter()
            .filter(|n| n.alive() && !n.direct)
            .filter(|n| round == 0 || n.missing.contains_key(digest))
            .collect();
        let mut roots: Vec<RelayHop> = Vec::new();
        if !relayed.is_empty() {
            roots.extend(hop(&relayed, digest, 0, fanout));
        }
        for n in nodes.iter().filter(|n| n.alive() && n.direct) {
            if let Some(&offset) = n.missing.get(digest) {
                roots.push(RelayHop {
                    address: n.agent.clone(),
                    store: true,
                    offset,
                    forward: Vec::new(),
                });
            }
        }
        let mut parent: HashMap<String, String> = HashMap::new();
        for root in &roots {
            parents(root, &mut parent);
        }
        let calls = roots.iter().map(|root| {
            let client = nodes
                .iter()
                .find(|n| n.agent == root.address)
                .expect("root is a node")
                .client
                .clone();
            send_tree(d, client, root.clone(), hint.clone())
        });
        let answers = futures::future::join_all(calls).await;

        // Every node of the trees: its outcome, if anyone reported one.
        let mut outcomes: HashMap<String, Outcome> = HashMap::new();
        let mut bundle_error = None;
        for (root, answer) in roots.iter().zip(answers) {
            match answer {
                Ok((resp, sent)) => {
                    let idx = nodes
                        .iter()
                        .find(|n| n.agent == root.address)
                        .expect("root is a node")
                        .idx;
                    reports[idx].bytes_from_coordinator += sent;
                    outcomes.insert(
                        root.address.clone(),
                        if !resp.local_error.is_empty() {
                            Outcome::Refused(resp.local_error.clone())
                        } else if !root.store {
                            Outcome::Passed
                        } else {
                            Outcome::Stored {
                                received: resp.received,
                                already: resp.already_present,
                            }
                        },
                    );
                    for r in resp.relayed {
                        let outcome = if r.lost {
                            Outcome::Lost(r.error)
                        } else if !r.ok {
                            Outcome::Refused(r.error)
                        } else if r.pass_through {
                            Outcome::Passed
                        } else {
                            Outcome::Stored {
                                received: r.received,
                                already: r.already_present,
                            }
                        };
                        outcomes.insert(r.address, outcome);
                    }
                }
                Err(SendError::Bundle(e)) if e.is_bad_content() => {
                    return Some(e.to_string());
                }
                Err(SendError::Bundle(e)) => bundle_error = Some((e.kind(), e.to_string())),
                Err(SendError::Call(e)) => {
                    outcomes.insert(root.address.clone(), Outcome::Lost(e.to_string()));
                }
            }
        }

        let mut suspects = Vec::new();
        for n in nodes.iter_mut().filter(|n| n.alive()) {
            let Some(&offset) = n.missing.get(digest) else {
                continue;
            };
            let report = &mut reports[n.idx];
            if let Some(e) = &bundle_error {
                n.failed = Some(e.clone());
                continue;
            }
            let from = match parent.get(&n.agent) {
                Some(p) => name(p),
                None => "coordinator".to_string(),
            };
            match outcomes.remove(&n.agent) {
                Some(Outcome::Stored { received, already }) => {
                    n.missing.remove(digest);
                    if already {
                        report.blobs_skipped += 1;
                        report.bytes_skipped += blob.size - offset;
                    } else {
                        report.blobs_sent += 1;
                        report.bytes_sent += received;
                        progress.sent(&n.agent, received);
                        if !report.via.contains(&from) {
                            report.via.push(from);
                        }
                    }
                }
                Some(Outcome::Refused(e)) => {
                    n.failed = Some((FailureKind::Agent, format!("blob {digest}: {e}")));
                }
                Some(Outcome::Lost(e)) => suspects.push((n.idx, from, e)),
                // Passed cannot be: the node lacked the blob. None: cut off above.
                Some(Outcome::Passed) | None => {}
            }
        }
        // A pass-through node whose call failed is as suspect as any other.
        for n in nodes
            .iter()
            .filter(|n| n.alive() && !n.missing.contains_key(digest))
        {
            if let Some(Outcome::Lost(e)) = outcomes.remove(&n.agent) {
                let from = parent
                    .get(&n.agent)
                    .map(|p| name(p))
                    .unwrap_or_else(|| "coordinator".into());
                suspects.push((n.idx, from, e));
            }
        }
        for (idx, from, error) in suspects {
            let n = nodes.iter_mut().find(|n| n.idx == idx).expect("suspect");
            match probe(&mut n.client).await {
                Ok(()) => {
                    warn!(agent = %n.agent, %from, %error, "relay to this node failed, but the coordinator reaches it: sending to it directly");
                    n.direct = true;
                }
                Err(probe) => {
                    n.failed = Some((
                        FailureKind::Delivery,
                        format!(
                            "agent {} was lost while {from} relayed blob {digest} to it \
                             ({error}), and the coordinator cannot reach it either ({probe})",
                            n.agent
                        ),
                    ));
                }
            }
        }
    }
    for n in nodes
        .iter_mut()
        .filter(|n| n.alive() && n.missing.contains_key(digest))
    {
        n.failed = Some((
            FailureKind::Delivery,
            format!("blob {digest} could not be delivered after 4 attempts"),
        ));
    }
    None
}

/// Whether the coordinator itself still reaches the node.
async fn probe(client: &mut AgentConn) -> Result<(), String> {
    match tokio::time::timeout(Duration::from_secs(5), client.info(InfoRequest {})).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => Err(format!("Info: {}", status.message())),
        Err(_) => Err("Info: no answer within 5s".into()),
    }
}

/// After a failed delivery: how far each node still lacking `digest` got (a cut-off upload
/// keeps what arrived, and resumes from there).
async fn refresh_offsets(d: &Delivery<'_>, nodes: &mut [Node], reports: &mut [NodeReport]) {
    let (bundle, session, digest) = (d.bundle, d.session, d.digest);
    let blob = &bundle.blobs[digest];
    let desc = descriptor(blob);
    for n in nodes
        .iter_mut()
        .filter(|n| n.alive() && n.missing.contains_key(digest))
    {
        let asked = n
            .client
            .have(HaveRequest {
                session: session.to_string(),
                blobs: vec![desc.clone()],
            })
            .await;
        match asked {
            Ok(have) => {
                if let Some(state) = have.into_inner().blobs.into_iter().next() {
                    // What arrived in the failed round was sent to it all the same.
                    let before = n.missing[digest];
                    let report = &mut reports[n.idx];
                    if state.present {
                        n.missing.remove(digest);
                        report.blobs_sent += 1;
                        report.bytes_sent += blob.size - before;
                    } else {
                        let now = state.offset.min(blob.size);
                        report.bytes_sent += now.saturating_sub(before);
                        n.missing.insert(digest.to_string(), now);
                    }
                }
            }
            Err(status) => {
                let e = LoadError::agent_call(&reports[n.idx].agent, "Have")(status);
                n.failed = Some((e.kind(), e.to_string()));
            }
        }
    }
}

enum SendError {
    /// Reading or checking the blob from the bundle failed.
    Bundle(LoadError),
    /// The call to the root failed.
    Call(LoadError),
}

/// Streams the blob to `root`, which passes it down its tree; returns its answer and the
/// bytes the coordinator sent.
async fn send_tree(
    d: &Delivery<'_>,
    mut client: AgentConn,
    root: RelayHop,
    unpack: Option<UnpackHint>,
) -> Result<(PutBlobResponse, u64), SendError> {
    let (bundle, session, digest) = (d.bundle, d.session, d.digest);
    let blob = &bundle.blobs[digest];
    let start = root.stream_start().expect("a root needs the blob below it");
    let relay = !root.forward.is_empty() || !root.store;
    let header = BlobHeader {
        session: session.to_string(),
        blob: Some(descriptor(blob)),
        offset: start,
        forward: root.forward.clone(),
        pass_through: relay && !root.store,
        store_offset: if relay && root.store { root.offset } else { 0 },
        unpack,
    };
    let (tx, rx) = mpsc::channel::<PutBlobRequest>(4);
    tx.send(PutBlobRequest {
        msg: Some(Msg::Header(header)),
    })
    .await
    .expect("receiver is alive until the call starts");
    // A digest mismatch, or a layer that fails its check, withholds the last chunk: no node
    // of the tree commits it.
    let reader = stream_chunks(bundle, digest, start, d.checks, tx, None);
    let response = client.put_blob(ReceiverStream::new(rx)).await;
    let sent = reader
        .await
        .expect("blob reader task panicked")
        .map_err(SendError::Bundle)?;
    let response = response.map_err(|status| {
        SendError::Call(LoadError::agent_call(&root.address, "PutBlob")(status))
    })?;
    Ok((response.into_inner(), sent))
}
