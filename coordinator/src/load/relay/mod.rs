//! Relay fan-out: every missing blob leaves the coordinator once, whatever the number of
//! nodes, and no node waits for a slower one.
//!
//! With relay on, the load's entry hands over to [`load`] here, which runs in two stages:
//! 1. `Info` and `Have` on every node (retried like a plain load); a node that fails them is
//!    reported failed and left out.
//! 2. A scheduler (`swarm::Swarm`) moves blobs until every live node holds what it needs.
//!    The coordinator sends each blob to one node (the *root*: the first in tree order that
//!    serves peers and has not proven slow); every other node `Fetch`es it from a peer that
//!    holds it, at its own pace: its tree parent when that one holds it, else the holder
//!    serving the fewest (`transfer` runs one transfer either way). Each node takes up to [`PER_NODE`] blobs at a time, each
//!    holder serves up to `fanout` peers at a time, and a node fetches any blob it needs
//!    that someone holds, not only the next one. So a slow node slows its own reads only,
//!    and the others fetch from whoever is ahead. Each node imports an image as soon as it
//!    holds its blobs, then verifies and ends its session on its own, and its `seconds` in
//!    the summary are its own.
//!
//! Failures: a source that cannot serve (unreachable, stalled, broke off, bad bytes) is
//! probed; dead, it is reported failed, alive, the fetching node tries another holder, and
//! after three sources failed it is served by the coordinator directly. A transfer that
//! makes no progress for the stall timeout is cut off; the node is probed: gone, it fails
//! (named), alive, it is tried again, up to four times per blob. A node that refuses a blob
//! (its own store failed) fails alone. `--node-timeout` bounds each node's whole load. A
//! blob the coordinator finds bad (digest or layer check) reaches no node, and only the
//! images using it fail. Agents that do not serve peers (older versions) are sent
//! everything directly.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use futures::StreamExt;
use lade_proto::{HaveRequest, UnpackHint};
use tracing::info;

use crate::select::Chosen;

use super::conn::AgentConn;
use super::error::{FailureKind, LoadError};
use super::plan::{
    check_space, foreign_platform_warnings, have_descriptors, missing_blobs, node_choices,
    render_topology, unique_missing, unpack_hints, RelayMode,
};
use super::report::NodeReport;
use super::run::Run;

mod swarm;
mod transfer;

use swarm::{Swarm, PER_NODE};

/// One node of the load as the scheduler sees it.
struct Node {
    /// Position in `opts.agents` and in the reports.
    idx: usize,
    agent: String,
    client: AgentConn,
    /// Blobs it still lacks, with the bytes of each it already holds.
    missing: HashMap<String, u64>,
    /// What it held of each blob it lacked when the load began: every byte past that counts
    /// as sent to it, over however many attempts and sources.
    lacked: HashMap<String, u64>,
    /// Blobs it holds (of those it needs): it may serve them to peers.
    holds: HashSet<String>,
    /// Per image of the bundle, the manifest it gets (its platform's), or why none.
    chosen: Vec<Result<Chosen, String>>,
    /// How it unpacks each layer as soon as it is stored.
    hints: HashMap<String, UnpackHint>,
    /// Peers cannot feed it (its agent does not fetch, or three sources failed it): the
    /// coordinator sends it what it lacks.
    direct: bool,
    /// Its agent serves peers, and it has not failed as a source.
    serves: bool,
    /// It checks layers itself as it unpacks them.
    checks_layers: bool,
    /// Why it dropped out, and what kind of failure that was; it gets nothing more.
    failed: Option<(FailureKind, String)>,
    /// Transfers into it under way, by blob.
    receiving: HashSet<String>,
    /// Sources that failed it, per blob, and in all.
    bad_sources: HashMap<String, HashSet<usize>>,
    sources_failed: usize,
    /// Attempts per blob.
    tries: HashMap<String, u32>,
    /// Bytes per second of its larger transfers, as measured here.
    rate: Option<f64>,
    /// Bytes per second of the best transfer it served to a peer: a slow link shows here
    /// for a node that otherwise receives only from the coordinator (a root).
    serve_rate: Option<f64>,
    /// Bytes per second of the best send from the coordinator into it (a root's), compared
    /// only with other such sends: they share the admin's link.
    coord_rate: Option<f64>,
    /// A send from the coordinator into it has run for [`swarm::PROOF_TIME`].
    coord_steady: bool,
    /// It took a send from the coordinator and then moved nothing for
    /// [`swarm::STOP_EVIDENCE`] while other transfers moved bytes: it stopped reading (frozen,
    /// or its disk hangs). Cleared as soon as bytes move into it again.
    stopped: bool,
    /// When bytes last moved into it (progress or a stored blob), from any source.
    last_received: Option<std::time::Instant>,
    /// A transfer it took part in (either end) has run for [`swarm::PROOF_TIME`]: its rates
    /// are steady enough to act on at a cost (see `Swarm::proven_slow`).
    steady: bool,
    /// Being probed: nothing is started on it until the answer.
    probing: bool,
    /// Images imported or given up, and imports under way.
    settled: Vec<bool>,
    importing: usize,
    /// Verify and EndSession started, or the node is done.
    verifying: bool,
    done: bool,
}

impl Node {
    /// Node `idx` (its position in `opts.agents`) at `agent`, as Info and Have found it.
    fn new(idx: usize, agent: String, client: AgentConn, known: Knowledge) -> Node {
        let hints = unpack_hints(known.chosen.iter().flatten())
            .into_iter()
            .map(|(d, h)| (d.to_string(), h))
            .collect();
        let holds = known
            .chosen
            .iter()
            .flatten()
            .flat_map(|c| c.blobs.iter())
            .filter(|d| !known.missing.contains_key(*d))
            .cloned()
            .collect();
        let images = known.chosen.len();
        Node {
            idx,
            agent,
            client,
            lacked: known.missing.clone(),
            missing: known.missing,
            holds,
            chosen: known.chosen,
            hints,
            direct: !known.fetches,
            serves: known.fetches,
            checks_layers: known.checks_layers,
            failed: None,
            receiving: HashSet::new(),
            bad_sources: HashMap::new(),
            sources_failed: 0,
            tries: HashMap::new(),
            rate: None,
            serve_rate: None,
            coord_rate: None,
            coord_steady: false,
            stopped: false,
            last_received: None,
            steady: false,
            probing: false,
            settled: vec![false; images],
            importing: 0,
            verifying: false,
            done: false,
        }
    }

    fn alive(&self) -> bool {
        self.failed.is_none()
    }

    /// Whether it can take one more blob now.
    fn free(&self) -> bool {
        self.alive() && !self.done && !self.probing && self.receiving.len() < PER_NODE
    }
}

/// How long the load waits, after the first node answered Info and Have, for the others
/// before it starts; the rest join as they answer.
const JOIN_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// Nodes still being identified: position in `opts.agents`, outcome, attempts.
type Pending<'r> = futures::stream::BoxStream<'r, (usize, Identified, u32)>;

/// Loads with relay fan-out of `fanout`; one report per agent, in the order of
/// `opts.agents`.
pub(crate) async fn load(run: &Run<'_>, fanout: usize) -> Vec<NodeReport> {
    let Run {
        bundle,
        plan,
        opts,
        progress,
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

    // Stage 1: who is there, which manifests each gets, and what each lacks. A node that is
    // slow to answer does not hold the others: JOIN_GRACE after the first node answered,
    // the load starts, and the nodes still identifying join it when they answer.
    // An address given twice would be a node fetching from itself: the first is loaded.
    let mut seen = HashSet::new();
    let mut firsts = Vec::new();
    for (i, agent) in opts.agents.iter().enumerate() {
        if seen.insert(agent.clone()) {
            firsts.push((i, agent, reports[i].clone()));
        } else {
            reports[i].fail(
                FailureKind::Skipped,
                format!(
                    "agent {agent} is listed more than once; it is loaded once, as the first of them"
                ),
            );
        }
    }
    let mut pending: Pending<'_> = futures::stream::iter(firsts)
        .map(|(i, agent, report)| async move {
            progress.node_started(agent);
            let (result, attempts) = identify(run, agent, report).await;
            (i, result, attempts)
        })
        .buffer_unordered(opts.parallel.max(1))
        .boxed();
    let mut identified = Vec::new();
    let grace = opts
        .retry
        .node_timeout
        .map_or(JOIN_GRACE, |limit| JOIN_GRACE.min(limit / 4));
    let mut first_answer: Option<Instant> = None;
    let mut all_answered = false;
    loop {
        let next = match first_answer {
            Some(t) => match tokio::time::timeout_at((t + grace).into(), pending.next()).await {
                Ok(next) => next,
                Err(_) => break,
            },
            None => pending.next().await,
        };
        let Some(answer) = next else {
            all_answered = true;
            break;
        };
        if answer.1.is_ok() {
            first_answer.get_or_insert_with(Instant::now);
        }
        identified.push(answer);
    }
    let mut nodes: Vec<Node> = Vec::new();
    // The layer check runs here only if some node does not check layers itself.
    let mut all_check_layers = true;
    for (i, result, attempts) in identified {
        reports[i].attempts = attempts;
        match result {
            Ok((client, report, known)) => {
                reports[i] = NodeReport { attempts, ..report };
                all_check_layers &= known.checks_layers;
                nodes.push(Node::new(i, opts.agents[i].clone(), client, known));
            }
            Err(e) => {
                info!(agent = %opts.agents[i], error = %e, "node failed");
                reports[i].fail_with(&e);
            }
        }
    }
    let checks = run.checks.clone().filter(|_| !all_check_layers);
    nodes.sort_by_key(|n| n.idx);
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

    // The order blobs go in: as the images need them.
    let mut order: Vec<String> = Vec::new();
    for i in 0..plan.len() {
        for d in image_order(&nodes, i) {
            if nodes.iter().any(|n| n.missing.contains_key(&d)) && !order.contains(&d) {
                order.push(d);
            }
        }
    }
    if let Some(checks) = &checks {
        checks.prefetch(order.clone());
    }

    // Stage 2: move blobs until every node holds what it needs, importing as images complete.
    let pending = (!all_answered).then_some(pending);
    let mut swarm = Swarm::new(run, nodes, reports, order, fanout, checks, started);
    swarm.run(pending).await;
    let (nodes, mut reports, announced) = swarm.into_parts();
    for n in &nodes {
        if let Some((kind, e)) = &n.failed {
            reports[n.idx].fail(*kind, e.clone());
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    for (idx, report) in reports.iter_mut().enumerate() {
        if !announced.contains(&idx) {
            if report.seconds == 0.0 {
                report.seconds = seconds;
            }
            report.settle();
            progress.node_finished(report);
        }
    }
    reports
}

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
    /// Its agent fetches from peers and serves them.
    fetches: bool,
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
                    fetches: info.fetches_from_peers,
                },
            ))
        };
        match retry.timed(agent, run).await {
            Err(e) if retry.again(&e, &mut attempt, agent, progress).await => {}
            other => return (other, attempt + 1),
        }
    }
}
