//! Relay fan-out: every missing blob leaves the coordinator once, whatever the number of
//! nodes, and no node waits for a slower one.
//!
//! With relay on, the load's entry hands over to [`load`] here, which runs in two stages:
//! 1. `Info` and `Have` on every node (retried like a plain load); a node that fails them is
//!    reported failed and left out.
//! 2. A scheduler ([`Swarm`]) moves blobs until every live node holds what it needs. The
//!    coordinator sends each blob to one node (a *seed*: the first in the tree order that
//!    has a free slot and has not proven slow); every other node `Fetch`es it from a peer
//!    that holds it, at its own pace: its tree parent when that one holds it, else the
//!    holder serving the fewest. Each node takes up to [`PER_NODE`] blobs at a time, each
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
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lade_proto::{
    put_blob_request::Msg, BlobHeader, FetchRequest, HaveRequest, InfoRequest, PutBlobRequest,
    UnpackHint,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use crate::select::Chosen;

use super::check::LayerChecks;
use super::conn::{import, stream_chunks, verify_and_end, AgentConn};
use super::error::{FailureKind, LoadError};
use super::plan::{
    check_space, descriptor, foreign_platform_warnings, have_descriptors, import_spec,
    missing_blobs, node_choices, render_topology, unique_missing, unpack_hints, RelayMode,
};
use super::report::{FailedImage, NodeReport};
use super::run::Run;

/// Blobs one node receives at a time (from the coordinator or from peers).
pub const PER_NODE: usize = 2;

/// Blobs the coordinator sends at a time (each to one seed node).
const COORDINATOR_STREAMS: usize = 2;

/// Attempts at one blob on one node before the node is given up.
const ATTEMPTS: u32 = 4;

/// Sources that may fail one node before the coordinator serves it directly.
const SOURCE_FAILURES: usize = 3;

/// A transfer this size or larger tells how fast its node takes bytes.
const RATE_SAMPLE: u64 = 1 << 20;

/// A transfer or node moving bytes at less than this share of the best rate seen is slow:
/// a slow node is neither a seed nor a source while others can be, and a slow transfer
/// does not count against its source's `fanout` (a straggler must not take the slots the
/// fast nodes fetch through).
const SLOW_SHARE: f64 = 0.25;

/// A transfer's rate is judged once it has run this long.
const RATE_WINDOW: Duration = Duration::from_millis(700);

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
    /// Why it dropped out, and what kind of failure that was; it gets nothing more.
    failed: Option<(FailureKind, String)>,
    /// Transfers into it under way, by blob.
    receiving: HashSet<String>,
    /// Peers reading from it right now, slow ones included: at most `fanout` + [`PER_NODE`]
    /// (room for one slow node beside `fanout` fast ones), which bounds a source's memory.
    serving: usize,
    /// Sources that failed it, per blob, and in all.
    bad_sources: HashMap<String, HashSet<usize>>,
    sources_failed: usize,
    /// Attempts per blob.
    tries: HashMap<String, u32>,
    /// Bytes per second of its larger transfers, as measured here.
    rate: Option<f64>,
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
    fn alive(&self) -> bool {
        self.failed.is_none()
    }

    /// Whether it can take one more blob now.
    fn free(&self) -> bool {
        self.alive() && !self.done && !self.probing && self.receiving.len() < PER_NODE
    }
}

/// Where a transfer's bytes come from: the coordinator, or the node at this position.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Source {
    Coordinator,
    Peer(usize),
}

/// One blob on its way to one node.
struct Transfer {
    node: usize,
    digest: String,
    source: Source,
    started: Instant,
    last_progress: Instant,
    /// Bytes the node held when it started, and holds now, as last reported.
    from: u64,
    held: u64,
    stalled: bool,
    abort: tokio::task::AbortHandle,
}

/// How a transfer ended.
enum Ended {
    Stored {
        received: u64,
        already: bool,
    },
    /// The source could not serve it (Fetch's `source_error`).
    SourceFailed(String),
    /// The node answered, but could not store the blob.
    Refused(String),
    /// The call to the node failed; its state is unknown.
    Lost(String),
    /// The coordinator found the blob in the bundle bad: it reaches no node.
    Bad(String),
    /// Reading the bundle failed otherwise.
    Bundle(FailureKind, String),
}

/// What the scheduler waits for besides transfers.
enum NodeEvent {
    Imported(
        usize,
        usize,
        Result<Vec<lade_proto::ImportEvent>, tonic::Status>,
    ),
    Verified(usize, Box<NodeReport>, Result<(), LoadError>),
    Probed(usize, Result<(), String>, Probe),
}

/// Why a node was probed, to act on its answer.
enum Probe {
    /// It failed as a source; the error it gave.
    Source(String),
    /// A transfer into it was lost (`digest`, what the transfer said).
    Receiver(String, String),
}

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
                let holds = known
                    .chosen
                    .iter()
                    .flatten()
                    .flat_map(|c| c.blobs.iter())
                    .filter(|d| !known.missing.contains_key(*d))
                    .cloned()
                    .collect();
                let images = known.chosen.len();
                nodes.push(Node {
                    idx: i,
                    agent: opts.agents[i].clone(),
                    client,
                    lacked: known.missing.clone(),
                    missing: known.missing,
                    holds,
                    chosen: known.chosen,
                    hints,
                    direct: !known.fetches,
                    serves: known.fetches,
                    failed: None,
                    receiving: HashSet::new(),
                    serving: 0,
                    bad_sources: HashMap::new(),
                    sources_failed: 0,
                    tries: HashMap::new(),
                    rate: None,
                    probing: false,
                    settled: vec![false; images],
                    importing: 0,
                    verifying: false,
                    done: false,
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
    // An address given twice would be a node fetching from itself: keep the first.
    let mut seen = HashSet::new();
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
    let mut swarm = Swarm {
        run,
        nodes,
        reports,
        order,
        fanout,
        checks,
        started,
        transfers: HashMap::new(),
        tasks: JoinSet::new(),
        node_tasks: JoinSet::new(),
        bad: HashMap::new(),
        stall: opts.stall_timeout,
        announced: HashSet::new(),
        best_rate: 0.0,
    };
    swarm.run().await;
    let Swarm {
        nodes,
        mut reports,
        announced,
        ..
    } = swarm;
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

/// A progress report from a transfer task: the node now holds `held` bytes of the blob.
struct Moved {
    id: tokio::task::Id,
    held: u64,
}

/// The scheduler of stage 2.
struct Swarm<'r, 'a> {
    run: &'r Run<'a>,
    nodes: Vec<Node>,
    reports: Vec<NodeReport>,
    /// Blobs some node lacks, in the order the images need them.
    order: Vec<String>,
    fanout: usize,
    checks: Option<Arc<LayerChecks>>,
    started: Instant,
    transfers: HashMap<tokio::task::Id, Transfer>,
    tasks: JoinSet<Ended>,
    node_tasks: JoinSet<NodeEvent>,
    /// Blobs found bad on the way, with why: every image using one fails, alone.
    bad: HashMap<String, String>,
    stall: Duration,
    /// Reports already final and shown as finished.
    announced: HashSet<usize>,
    /// The best rate any transfer reached, bytes per second: what "slow" is measured against.
    best_rate: f64,
}

impl Swarm<'_, '_> {
    async fn run(&mut self) {
        let (moved_tx, mut moved_rx) = mpsc::unbounded_channel::<Moved>();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for n in 0..self.nodes.len() {
            self.settle_images(n);
        }
        loop {
            self.schedule(&moved_tx);
            if self.tasks.is_empty() && self.node_tasks.is_empty() {
                if self.nodes.iter().all(|n| n.done || !n.alive()) {
                    break;
                }
                // Nothing moves, yet some node is not done: what it lacks cannot be had.
                for n in self.nodes.iter_mut().filter(|n| n.alive() && !n.done) {
                    let lacking: Vec<&String> = n.missing.keys().collect();
                    n.failed = Some((
                        FailureKind::Delivery,
                        format!("no source left for blob(s) {lacking:?}"),
                    ));
                }
                break;
            }
            tokio::select! {
                Some(m) = moved_rx.recv() => self.moved(m),
                Some(joined) = self.tasks.join_next_with_id() => {
                    let (id, ended) = match joined {
                        Ok((id, ended)) => (id, ended),
                        Err(e) => {
                            let stalled = self.transfers.get(&e.id()).is_some_and(|t| t.stalled);
                            let why = if stalled {
                                format!("no progress for {:?}", self.stall)
                            } else {
                                format!("transfer task ended: {e}")
                            };
                            (e.id(), Ended::Lost(why))
                        }
                    };
                    if let Some(t) = self.transfers.remove(&id) {
                        self.ended(t, ended);
                    }
                }
                Some(joined) = self.node_tasks.join_next() => {
                    self.node_event(joined.expect("node task panicked"));
                }
                _ = tick.tick() => self.watch(),
            }
        }
    }

    /// Starts what can start: the coordinator's sends to seeds, then fetches from peers.
    fn schedule(&mut self, moved: &mpsc::UnboundedSender<Moved>) {
        // Seeds: each blob nobody alive holds or is getting from the coordinator goes to
        // one node; a node peers cannot feed gets its own copy.
        let order = self.order.clone();
        for digest in &order {
            if self.coordinator_streams() >= COORDINATOR_STREAMS {
                break;
            }
            if self.bad.contains_key(digest) {
                continue;
            }
            let held = self
                .nodes
                .iter()
                .any(|n| n.alive() && n.serves && n.holds.contains(digest));
            let seeded = self.transfers.values().any(|t| {
                t.source == Source::Coordinator && &t.digest == digest && self.nodes[t.node].serves
            });
            let candidates: Vec<usize> = (0..self.nodes.len())
                .filter(|&i| {
                    let n = &self.nodes[i];
                    n.free() && n.missing.contains_key(digest) && !n.receiving.contains(digest)
                })
                .collect();
            let root = self.root();
            let pick = if held || seeded {
                // Only a node peers cannot feed gets it from here.
                candidates.into_iter().find(|&i| self.nodes[i].direct)
            } else if let Some(r) = root.filter(|&r| self.nodes[r].missing.contains_key(digest)) {
                // The root takes every blob it needs from here; while it is busy, the blob
                // waits (the coordinator's streams are the root's slots).
                candidates.into_iter().find(|&i| i == r)
            } else {
                // Nobody the root could feed needs it from the root (another platform's).
                self.seed_for(candidates)
            };
            if let Some(i) = pick {
                self.start(i, digest, Source::Coordinator, moved);
            }
        }
        // Fetches: every node takes what a peer holds, up to PER_NODE at a time; fast nodes
        // choose first.
        let mut busy = self.busy_serving();
        let mut takers: Vec<usize> = (0..self.nodes.len()).collect();
        takers.sort_by_key(|&i| self.slow(i));
        for i in takers {
            for digest in &order {
                if !self.nodes[i].free() || self.nodes[i].direct {
                    break;
                }
                let n = &self.nodes[i];
                if !n.missing.contains_key(digest) || n.receiving.contains(digest) {
                    continue;
                }
                if let Some(src) = self.source_for(i, digest, &busy) {
                    busy[src] += 1;
                    self.start(i, digest, Source::Peer(src), moved);
                } else if self.all_holders_failed(i, digest) {
                    warn!(agent = %self.nodes[i].agent, %digest, "every peer holding this blob failed to feed this node; sending to it directly");
                    self.nodes[i].direct = true;
                }
            }
        }
        self.settle_all();
    }

    fn coordinator_streams(&self) -> usize {
        self.transfers
            .values()
            .filter(|t| t.source == Source::Coordinator)
            .count()
    }

    /// The node the coordinator sends to: the first live one in tree order that serves
    /// peers and has not proven slow (a root that turns out slow hands the role on).
    fn root(&self) -> Option<usize> {
        (0..self.nodes.len()).find(|&i| {
            let n = &self.nodes[i];
            n.alive() && !n.done && n.serves && !n.direct && !self.slow(i)
        })
    }

    /// The seed among `candidates` (positions): the first in tree order that serves peers
    /// and has not proven slow, else the first.
    fn seed_for(&self, candidates: Vec<usize>) -> Option<usize> {
        candidates
            .iter()
            .copied()
            .find(|&i| !self.slow(i) && self.nodes[i].serves)
            .or_else(|| candidates.first().copied())
    }

    /// The peer node `i` fetches `digest` from: among the holders with a free slot, one
    /// that has not proven slow, its tree parent first, else the one serving the fewest.
    fn source_for(&self, i: usize, digest: &str, busy: &[usize]) -> Option<usize> {
        let n = &self.nodes[i];
        let excluded = n.bad_sources.get(digest);
        let usable = |j: usize| {
            let s = &self.nodes[j];
            j != i
                && s.alive()
                && s.serves
                && !s.probing
                && s.holds.contains(digest)
                && busy[j] < self.fanout
                && s.serving < self.fanout + PER_NODE
                && !excluded.is_some_and(|e| e.contains(&j))
        };
        let parent = (i > 0).then(|| (i - 1) / self.fanout);
        (0..self.nodes.len())
            .filter(|&j| usable(j))
            .min_by_key(|&j| (self.slow(j), Some(j) != parent, busy[j], j))
    }

    /// Whether node `j` takes bytes at less than [`SLOW_SHARE`] of the best rate seen.
    fn slow(&self, j: usize) -> bool {
        self.nodes[j]
            .rate
            .is_some_and(|r| r < self.best_rate * SLOW_SHARE)
    }

    /// Whether peers hold `digest` but every one of them failed to feed it to node `i`.
    fn all_holders_failed(&self, i: usize, digest: &str) -> bool {
        let Some(excluded) = self.nodes[i].bad_sources.get(digest) else {
            return false;
        };
        (0..self.nodes.len())
            .filter(|&j| {
                let s = &self.nodes[j];
                j != i && s.alive() && s.serves && s.holds.contains(digest)
            })
            .all(|j| excluded.contains(&j))
    }

    /// Starts moving `digest` into node `i` from `source`.
    fn start(
        &mut self,
        i: usize,
        digest: &str,
        source: Source,
        moved: &mpsc::UnboundedSender<Moved>,
    ) {
        let run = self.run;
        let n = &mut self.nodes[i];
        let offset = n.missing[digest];
        n.receiving.insert(digest.to_string());
        let n_tries = {
            let t = n.tries.entry(digest.to_string()).or_default();
            *t += 1;
            *t
        };
        let hint = n.hints.get(digest).cloned();
        let client = n.client.clone();
        let agent = n.agent.clone();
        let moved = moved.clone();
        let now = Instant::now();
        let abort = match source {
            Source::Coordinator => {
                let send = Send {
                    bundle: run.bundle.clone(),
                    session: run.session.clone(),
                    digest: digest.to_string(),
                    offset,
                    hint,
                    checks: self.checks.clone(),
                    agent,
                    refresh: n_tries > 1,
                };
                self.tasks.spawn(async move {
                    let id = tokio::task::id();
                    send.run(client, |held| {
                        let _ = moved.send(Moved { id, held });
                    })
                    .await
                })
            }
            Source::Peer(src) => {
                self.nodes[src].serving += 1;
                let req = FetchRequest {
                    session: run.session.clone(),
                    blob: Some(descriptor(&run.bundle.blobs[digest])),
                    source: self.nodes[src].agent.clone(),
                    unpack: hint,
                    stall_seconds: self.stall.as_secs().max(1) as u32,
                };
                self.tasks.spawn(async move {
                    let id = tokio::task::id();
                    fetch(client, &agent, req, |held| {
                        let _ = moved.send(Moved { id, held });
                    })
                    .await
                })
            }
        };
        debug!(node = %self.nodes[i].agent, %digest, ?source, "transfer started");
        self.transfers.insert(
            abort.id(),
            Transfer {
                node: i,
                digest: digest.to_string(),
                source,
                started: now,
                last_progress: now,
                from: offset,
                held: offset,
                stalled: false,
                abort,
            },
        );
    }

    fn moved(&mut self, m: Moved) {
        let Some(t) = self.transfers.get_mut(&m.id) else {
            return;
        };
        if m.held > t.held {
            let n = &mut self.nodes[t.node];
            self.run.progress.sent(&n.agent, m.held - t.held);
            t.held = m.held;
            t.last_progress = Instant::now();
            let elapsed = t.started.elapsed();
            // Rates are compared between peer transfers only: what comes from the
            // coordinator is paced by the admin's link, not by the node.
            if elapsed >= RATE_WINDOW && t.source != Source::Coordinator {
                let rate = (t.held - t.from) as f64 / elapsed.as_secs_f64();
                self.best_rate = self.best_rate.max(rate);
                n.rate = Some(match n.rate {
                    Some(r) => (r + rate) / 2.0,
                    None => rate,
                });
            }
        }
    }

    /// Whether transfer `t` has run long enough to tell, and moves slowly.
    fn slow_transfer(&self, t: &Transfer) -> bool {
        let elapsed = t.started.elapsed();
        t.source != Source::Coordinator
            && elapsed >= RATE_WINDOW
            && ((t.held - t.from) as f64 / elapsed.as_secs_f64()) < self.best_rate * SLOW_SHARE
    }

    /// Per node, the peers it serves that are not slow: what counts against `fanout`.
    fn busy_serving(&self) -> Vec<usize> {
        let mut busy = vec![0; self.nodes.len()];
        for t in self.transfers.values() {
            if let Source::Peer(j) = t.source {
                if !self.slow_transfer(t) {
                    busy[j] += 1;
                }
            }
        }
        busy
    }

    /// Cuts off transfers that stalled and nodes past `--node-timeout`.
    fn watch(&mut self) {
        // The agent gives up on a stalled source after the stall timeout; the coordinator
        // waits a little longer, so that the agent's finer verdict comes first.
        let limit = self.stall + (self.stall / 4).max(Duration::from_secs(2));
        let stalled: Vec<tokio::task::Id> = self
            .transfers
            .iter()
            .filter(|(_, t)| !t.stalled && t.last_progress.elapsed() > limit)
            .map(|(id, _)| *id)
            .collect();
        for id in stalled {
            if let Some(t) = self.transfers.get_mut(&id) {
                t.stalled = true;
                warn!(node = %self.nodes[t.node].agent, digest = %t.digest, "no progress; cutting the transfer off");
            }
            self.abort(id);
        }
        if let Some(limit) = self.run.opts.retry.node_timeout {
            if self.started.elapsed() > limit {
                for i in 0..self.nodes.len() {
                    let n = &mut self.nodes[i];
                    if n.alive() && !n.done {
                        let e = LoadError::TimedOut {
                            agent: n.agent.clone(),
                            limit,
                        };
                        n.failed = Some((e.kind(), e.to_string()));
                        self.drop_node(i);
                    }
                }
            }
        }
    }

    fn abort(&mut self, id: tokio::task::Id) {
        if let Some(t) = self.transfers.get(&id) {
            t.abort.abort();
        }
    }

    /// Node `i` failed: what moves into it stops.
    fn drop_node(&mut self, i: usize) {
        let ids: Vec<tokio::task::Id> = self
            .transfers
            .iter()
            .filter(|(_, t)| t.node == i)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.abort(id);
        }
        let idx = self.nodes[i].idx;
        self.reports[idx].seconds = self.started.elapsed().as_secs_f64();
    }
}

impl Swarm<'_, '_> {
    /// Acts on how transfer `t` ended.
    fn ended(&mut self, t: Transfer, ended: Ended) {
        let i = t.node;
        let digest = t.digest.clone();
        self.nodes[i].receiving.remove(&digest);
        if let Source::Peer(src) = t.source {
            self.nodes[src].serving -= 1;
        }
        let from = match t.source {
            Source::Coordinator => "coordinator".to_string(),
            Source::Peer(src) => label(&self.reports[self.nodes[src].idx]),
        };
        let blob_size = self.run.bundle.blobs[&digest].size;
        let tries = self.nodes[i].tries.get(&digest).copied().unwrap_or(0);
        match ended {
            Ended::Stored { received, already } => {
                let n = &mut self.nodes[i];
                if n.missing.remove(&digest).is_none() {
                    return;
                }
                let offset = n.lacked.get(&digest).copied().unwrap_or(0);
                n.holds.insert(digest.clone());
                let report = &mut self.reports[n.idx];
                if already {
                    report.blobs_skipped += 1;
                    report.bytes_skipped += blob_size - offset;
                } else {
                    report.blobs_sent += 1;
                    report.bytes_sent += blob_size - offset;
                    if t.source == Source::Coordinator {
                        report.bytes_from_coordinator += received;
                    }
                    if !report.via.contains(&from) {
                        report.via.push(from);
                    }
                    self.run
                        .progress
                        .sent(&n.agent, blob_size.saturating_sub(t.held));
                    if received >= RATE_SAMPLE && t.source != Source::Coordinator {
                        let rate = received as f64 / t.started.elapsed().as_secs_f64().max(1e-3);
                        self.best_rate = self.best_rate.max(rate);
                        n.rate = Some(match n.rate {
                            Some(r) => (r + rate) / 2.0,
                            None => rate,
                        });
                    }
                }
                self.settle_images(i);
            }
            Ended::SourceFailed(why) => {
                let Source::Peer(src) = t.source else {
                    return;
                };
                let n = &mut self.nodes[i];
                n.bad_sources.entry(digest.clone()).or_default().insert(src);
                n.sources_failed += 1;
                if n.sources_failed >= SOURCE_FAILURES && !n.direct {
                    warn!(agent = %n.agent, "{SOURCE_FAILURES} peers failed to feed this node; sending to it directly");
                    n.direct = true;
                }
                if !self.nodes[src].probing {
                    self.nodes[src].probing = true;
                    let client = self.nodes[src].client.clone();
                    self.node_tasks.spawn(async move {
                        let mut client = client;
                        NodeEvent::Probed(src, probe(&mut client).await, Probe::Source(why))
                    });
                }
            }
            Ended::Refused(e) => {
                self.nodes[i].failed = Some((FailureKind::Agent, format!("blob {digest}: {e}")));
                self.drop_node(i);
            }
            Ended::Lost(why) => {
                if tries >= ATTEMPTS {
                    self.nodes[i].failed = Some((
                        FailureKind::Delivery,
                        format!(
                            "blob {digest} could not be delivered after {ATTEMPTS} attempts \
                             (last, from {from}: {why})"
                        ),
                    ));
                    self.drop_node(i);
                } else if !self.nodes[i].probing {
                    self.nodes[i].probing = true;
                    let client = self.nodes[i].client.clone();
                    let context = Probe::Receiver(digest, format!("from {from}: {why}"));
                    self.node_tasks.spawn(async move {
                        let mut client = client;
                        NodeEvent::Probed(i, probe(&mut client).await, context)
                    });
                }
            }
            Ended::Bad(reason) => {
                self.bad.insert(digest.clone(), reason);
                for n in 0..self.nodes.len() {
                    self.nodes[n].missing.remove(&digest);
                    self.settle_images(n);
                }
            }
            Ended::Bundle(kind, e) => {
                for n in 0..self.nodes.len() {
                    if self.nodes[n].alive() && self.nodes[n].missing.contains_key(&digest) {
                        self.nodes[n].failed = Some((kind, e.clone()));
                        self.drop_node(n);
                    }
                }
            }
        }
    }

    fn node_event(&mut self, event: NodeEvent) {
        match event {
            NodeEvent::Imported(i, image, result) => {
                let n = &mut self.nodes[i];
                n.importing -= 1;
                n.settled[image] = true;
                let report = &mut self.reports[n.idx];
                match result {
                    Ok(events) => report.count_imports(events),
                    Err(status) => {
                        let e = LoadError::agent_call(&report.agent, "Import")(status);
                        n.failed.get_or_insert((e.kind(), e.to_string()));
                        self.drop_node(i);
                    }
                }
                self.settle_images(i);
            }
            NodeEvent::Verified(i, report, result) => {
                let n = &mut self.nodes[i];
                n.done = true;
                let idx = n.idx;
                self.reports[idx] = *report;
                if let Err(e) = result {
                    self.reports[idx].fail_with(&e);
                }
                self.finish(idx);
            }
            NodeEvent::Probed(i, answer, why) => {
                self.nodes[i].probing = false;
                match (answer, why) {
                    (Ok(()), Probe::Source(_)) => {}
                    (Ok(()), Probe::Receiver(digest, why)) => {
                        info!(agent = %self.nodes[i].agent, %digest, %why, "transfer lost, but the node answers: trying again");
                    }
                    (Err(probe), Probe::Source(why)) => {
                        let n = &mut self.nodes[i];
                        n.serves = false;
                        n.failed = Some((
                            FailureKind::Delivery,
                            format!(
                                "agent {} failed while serving a peer ({why}), and the \
                                 coordinator cannot reach it either ({probe})",
                                n.agent
                            ),
                        ));
                        self.drop_node(i);
                    }
                    (Err(probe), Probe::Receiver(digest, why)) => {
                        let n = &mut self.nodes[i];
                        n.failed = Some((
                            FailureKind::Delivery,
                            format!(
                                "agent {} was lost while receiving blob {digest} ({why}), and \
                                 the coordinator cannot reach it either ({probe})",
                                n.agent
                            ),
                        ));
                        self.drop_node(i);
                    }
                }
            }
        }
    }

    fn settle_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.settle_images(i);
        }
    }

    /// Node `i`: imports the images whose blobs it now holds; once every image is settled
    /// and nothing moves into it, verifies and ends its session.
    fn settle_images(&mut self, i: usize) {
        let (bundle, plan, session) = (&self.run.bundle, &self.run.plan, &self.run.session);
        let n = &mut self.nodes[i];
        if !n.alive() || n.done || n.verifying {
            return;
        }
        let report = &mut self.reports[n.idx];
        for (image, planned) in plan.iter().enumerate() {
            if n.settled[image] {
                continue;
            }
            let chosen = match &n.chosen[image] {
                Ok(c) => c,
                Err(reason) => {
                    n.settled[image] = true;
                    report.failed_images.push(FailedImage {
                        image: planned.source.clone(),
                        reason: reason.clone(),
                    });
                    continue;
                }
            };
            if let Some(reason) = chosen.blobs.iter().find_map(|d| self.bad.get(d)) {
                n.settled[image] = true;
                report.failed_images.push(FailedImage {
                    image: planned.source.clone(),
                    reason: reason.clone(),
                });
                continue;
            }
            if chosen.blobs.iter().any(|d| n.missing.contains_key(d)) {
                continue;
            }
            // Marked settled now so it is imported once; the import's outcome is counted
            // when it ends.
            n.settled[image] = true;
            n.importing += 1;
            let spec = import_spec(bundle, chosen, planned);
            let (client, session) = (n.client.clone(), session.clone());
            self.node_tasks.spawn(async move {
                NodeEvent::Imported(i, image, import(client, session, spec).await)
            });
            self.run.progress.phase(&n.agent, "importing");
        }
        if n.importing == 0
            && n.receiving.is_empty()
            && n.missing.is_empty()
            && n.settled.iter().all(|s| *s)
        {
            n.verifying = true;
            let mut report = report.clone();
            let (plan, session, progress) =
                (plan.clone(), session.clone(), self.run.progress.clone());
            let (mut client, agent, chosen) = (n.client.clone(), n.agent.clone(), n.chosen.clone());
            self.node_tasks.spawn(async move {
                progress.phase(&agent, "verifying");
                let r = verify_and_end(&mut client, &plan, &chosen, &session, &agent, &mut report)
                    .await;
                NodeEvent::Verified(i, Box::new(report), r)
            });
        }
    }

    /// Node report `idx` is final: its own time, and the progress display says so.
    fn finish(&mut self, idx: usize) {
        let report = &mut self.reports[idx];
        report.seconds = self.started.elapsed().as_secs_f64();
        report.settle();
        self.run.progress.node_finished(report);
        self.announced.insert(idx);
    }
}

/// The coordinator's own send of one blob to one node.
struct Send {
    bundle: Arc<crate::bundle::Bundle>,
    session: String,
    digest: String,
    offset: u64,
    hint: Option<UnpackHint>,
    checks: Option<Arc<LayerChecks>>,
    agent: String,
    /// A retry: ask the node first how much of the blob it holds.
    refresh: bool,
}

impl Send {
    /// Streams the blob from the node's offset, calling `moved` with the bytes the node
    /// holds as chunks go out. A digest mismatch in the bundle, or a layer that fails its
    /// check, withholds the last chunk, so the node never commits it.
    async fn run(mut self, mut client: AgentConn, moved: impl Fn(u64)) -> Ended {
        let blob = &self.bundle.blobs[&self.digest];
        if self.refresh {
            let asked = client
                .have(HaveRequest {
                    session: self.session.clone(),
                    blobs: vec![descriptor(blob)],
                })
                .await;
            match asked.map(|r| r.into_inner().blobs.into_iter().next()) {
                Ok(Some(state)) if state.present => {
                    return Ended::Stored {
                        received: 0,
                        already: false,
                    }
                }
                Ok(Some(state)) => self.offset = state.offset.min(blob.size),
                Ok(None) => {}
                Err(status) => return classify(&self.agent, "Have", status),
            }
        }
        let (tx, rx) = mpsc::channel::<PutBlobRequest>(4);
        let header = PutBlobRequest {
            msg: Some(Msg::Header(BlobHeader {
                session: self.session.clone(),
                blob: Some(descriptor(blob)),
                offset: self.offset,
                unpack: self.hint.clone(),
                ..Default::default()
            })),
        };
        tx.send(header)
            .await
            .expect("receiver is alive until the call starts");
        let (count_tx, mut count_rx) = mpsc::unbounded_channel::<u64>();
        let reader = stream_chunks(
            &self.bundle,
            &self.digest,
            self.offset,
            self.checks.as_ref(),
            tx,
            Some(count_tx),
        );
        let call = client.put_blob(ReceiverStream::new(rx));
        tokio::pin!(call);
        let mut held = self.offset;
        let response = loop {
            tokio::select! {
                res = &mut call => break res,
                Some(n) = count_rx.recv() => {
                    held += n;
                    moved(held);
                }
            }
        };
        // The bundle's own error explains a refused upload better than the agent's view.
        match reader.await.expect("blob reader task panicked") {
            Err(e) if e.is_bad_content() => return Ended::Bad(e.to_string()),
            Err(e) => return Ended::Bundle(e.kind(), e.to_string()),
            Ok(_) => {}
        }
        match response {
            Ok(r) => {
                let r = r.into_inner();
                if !r.local_error.is_empty() {
                    return Ended::Refused(r.local_error);
                }
                Ended::Stored {
                    received: r.received,
                    already: r.already_present,
                }
            }
            Err(status) => classify(&self.agent, "PutBlob", status),
        }
    }
}

/// A failed call to the receiving node: lost when the call itself broke (the node may be
/// gone), refused when the node answered with an error.
fn classify(agent: &str, call: &'static str, status: tonic::Status) -> Ended {
    use tonic::Code;
    let lost = matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    ) || status.code() == Code::ResourceExhausted;
    let e = LoadError::agent_call(agent, call)(status);
    if lost {
        Ended::Lost(e.to_string())
    } else {
        Ended::Refused(e.to_string())
    }
}

/// Has the node fetch one blob from a peer, calling `moved` with what it holds as it goes.
async fn fetch(
    mut client: AgentConn,
    agent: &str,
    req: FetchRequest,
    moved: impl Fn(u64),
) -> Ended {
    let mut stream = match client.fetch(req).await {
        Ok(r) => r.into_inner(),
        Err(status) => return classify(agent, "Fetch", status),
    };
    loop {
        match stream.message().await {
            Ok(Some(p)) if p.done => {
                return Ended::Stored {
                    received: p.received,
                    already: p.already_present,
                }
            }
            Ok(Some(p)) if !p.source_error.is_empty() => {
                return Ended::SourceFailed(p.source_error)
            }
            Ok(Some(p)) => moved(p.held),
            Ok(None) => return Ended::Lost(format!("agent {agent}: Fetch ended without a result")),
            Err(status) => return classify(agent, "Fetch", status),
        }
    }
}

/// Whether the coordinator itself still reaches the node.
async fn probe(client: &mut AgentConn) -> Result<(), String> {
    match tokio::time::timeout(Duration::from_secs(5), client.info(InfoRequest {})).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => Err(format!("Info: {}", status.message())),
        Err(_) => Err("Info: no answer within 5s".into()),
    }
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
