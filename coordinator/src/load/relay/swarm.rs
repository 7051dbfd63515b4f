//! The relay's scheduler: one event loop that starts transfers (the coordinator's sends to
//! the root, peers' fetches), follows their progress, cuts off what stalls, and settles each
//! node (imports, then verify and end) as soon as it holds what it needs.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lade_proto::FetchRequest;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::super::check::LayerChecks;
use super::super::conn::{import, verify_and_end};
use super::super::error::{FailureKind, LoadError};
use super::super::plan::{descriptor, import_spec};
use super::super::record::held;
use super::super::report::{FailedImage, NodeReport};
use super::super::run::Run;
use super::transfer::{fetch, probe, Send};
use super::{label, Node};

/// Blobs one node receives at a time (from the coordinator or from peers).
pub(crate) const PER_NODE: usize = 2;

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

/// How long a transfer must have run before the rates of its two ends are steady enough to
/// act on at a cost (bytes sent again by the coordinator, a send cut off): short transfers
/// on a busy machine show passing dips that are no property of a node.
pub(super) const PROOF_TIME: Duration = Duration::from_secs(2);

/// A send from the coordinator into a root that moves nothing for this long, while no other
/// send is stuck (so the coordinator's link is not at fault), shows a node that stopped
/// reading (frozen, a hung disk): its blob goes to another root instead of waiting for
/// `--stall-timeout`.
pub(super) const STOP_EVIDENCE: Duration = Duration::from_secs(4);

/// Once every byte of a blob is handed to the connection, up to this many may still be on
/// their way to the root (the HTTP/2 stream window, the chunks queued before it, the
/// kernel's socket buffers): it drains them before it commits.
const IN_FLIGHT: u64 = 16 << 20;

/// A root commits a blob (containerd syncs the file) before it answers: a second per this
/// many bytes of the blob is allowed for that.
const COMMIT_RATE: u64 = 64 << 20;

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
    /// Cut off because its node proved slow or stopped reading, or its source stopped: not a
    /// failure, the blob comes another way.
    demoted: bool,
    abort: tokio::task::AbortHandle,
}

/// How a transfer ended.
pub(super) enum Ended {
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
    /// Cut off because its node proved slow or stopped (the coordinator's send), or its
    /// source stopped (a fetch).
    Demoted,
}

/// How a transfer is cut off.
#[derive(Clone, Copy)]
enum Cut {
    /// Not a failure: the blob comes another way.
    Demoted,
    /// It moved nothing for the stall timeout.
    Stalled,
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

/// How many peers each node serves right now (by position).
struct Serving {
    /// Those not slow: what counts against `fanout`.
    fast: Vec<usize>,
    /// All of them, slow ones included: at most `fanout` + [`PER_NODE`] (room for one slow
    /// node beside `fanout` fast ones), which bounds a source's memory.
    all: Vec<usize>,
}

/// A progress report from a transfer task: the node now holds `held` bytes of the blob.
struct Moved {
    id: tokio::task::Id,
    held: u64,
}

/// The scheduler of stage 2.
pub(super) struct Swarm<'r, 'a> {
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
    /// The best rate of a send from the coordinator into a node.
    best_coord_rate: f64,
}

impl<'r, 'a> Swarm<'r, 'a> {
    /// The scheduler for `nodes` (as identified, in tree order), blobs in `order`.
    pub(super) fn new(
        run: &'r Run<'a>,
        nodes: Vec<Node>,
        reports: Vec<NodeReport>,
        order: Vec<String>,
        fanout: usize,
        checks: Option<Arc<LayerChecks>>,
        started: Instant,
    ) -> Self {
        Swarm {
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
            stall: run.opts.stall_timeout,
            announced: HashSet::new(),
            best_rate: 0.0,
            best_coord_rate: 0.0,
        }
    }

    /// The nodes, the reports, and which reports are final and were shown as finished.
    pub(super) fn into_parts(self) -> (Vec<Node>, Vec<NodeReport>, HashSet<usize>) {
        (self.nodes, self.reports, self.announced)
    }

    /// Moves blobs until every live node is done or failed; the nodes still being
    /// identified (`pending`) join as they answer.
    pub(super) async fn run(&mut self, mut pending: Option<super::Pending<'r>>) {
        let (moved_tx, mut moved_rx) = mpsc::unbounded_channel::<Moved>();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for n in 0..self.nodes.len() {
            self.settle_images(n);
        }
        loop {
            self.schedule(&moved_tx);
            if self.tasks.is_empty() && self.node_tasks.is_empty() && pending.is_none() {
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
                        Err(e) if self.transfers.get(&e.id()).is_some_and(|t| t.demoted) => {
                            (e.id(), Ended::Demoted)
                        }
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
                joined = next_pending(&mut pending), if pending.is_some() => match joined {
                    Some((i, result, attempts)) => self.join(i, result, attempts),
                    None => pending = None,
                },
                _ = tick.tick() => self.watch(),
            }
        }
    }

    /// Node `i` answered Info and Have after the load started: it joins (or fails).
    fn join(&mut self, i: usize, result: super::Identified, attempts: u32) {
        let (run, bundle) = (self.run, &self.run.bundle);
        self.reports[i].attempts = attempts;
        let (client, report, known) = match result {
            Ok(ok) => ok,
            Err(e) => {
                info!(agent = %run.opts.agents[i], error = %e, "node failed");
                self.reports[i].fail_with(&e);
                return;
            }
        };
        self.reports[i] = NodeReport { attempts, ..report };
        let mut node = Node::new(i, run.opts.agents[i].clone(), client, known);
        if !node.checks_layers && self.checks.is_none() && run.checks.is_some() {
            // The blobs sent so far went unchecked (every node then checked layers itself):
            // this node gets its own, checked copies from here.
            self.checks = run.checks.clone();
            node.direct = true;
        }
        let mut added = Vec::new();
        for c in node.chosen.iter().flatten() {
            for d in &c.blobs {
                if node.missing.contains_key(d) && !self.order.contains(d) && !added.contains(d) {
                    added.push(d.clone());
                }
            }
        }
        if let Some(checks) = &self.checks {
            checks.prefetch(added.clone());
        }
        self.order.extend(added);
        let to_send: u64 = node
            .missing
            .iter()
            .map(|(d, off)| bundle.blobs[d].size - off)
            .sum();
        run.progress
            .sending(&node.agent, to_send, self.reports[i].bytes_skipped);
        info!(agent = %node.agent, "node joined the load late");
        self.nodes.push(node);
        self.settle_images(self.nodes.len() - 1);
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
            // Held where peers can fetch it at speed: a blob only slow nodes hold is sent
            // again, to a node that is not.
            let held = (0..self.nodes.len()).any(|j| {
                let n = &self.nodes[j];
                n.alive() && n.serves && n.holds.contains(digest) && !self.proven_slow(j)
            });
            let seeded = self.transfers.values().any(|t| {
                t.source == Source::Coordinator
                    && &t.digest == digest
                    && self.nodes[t.node].serves
                    && !t.demoted
            });
            let candidates: Vec<usize> = (0..self.nodes.len())
                .filter(|&i| {
                    let n = &self.nodes[i];
                    n.free() && n.missing.contains_key(digest) && !n.receiving.contains(digest)
                })
                .collect();
            let roots = self.roots();
            let needing: Vec<usize> = roots
                .iter()
                .copied()
                .filter(|&r| self.nodes[r].missing.contains_key(digest))
                .collect();
            let pick = if held || seeded {
                // Only a node peers cannot feed gets it from here.
                candidates.into_iter().find(|&i| self.nodes[i].direct)
            } else if !needing.is_empty() {
                // The two roots take turns, one coordinator stream each, so that there is
                // always a second copy to measure the first against; while both are busy,
                // the blob waits.
                needing.into_iter().find(|&r| {
                    candidates.contains(&r)
                        && !self
                            .transfers
                            .values()
                            .any(|t| t.node == r && t.source == Source::Coordinator && !t.demoted)
                })
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
        let mut serving = self.serving();
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
                if let Some(src) = self.source_for(i, digest, &serving) {
                    serving.fast[src] += 1;
                    serving.all[src] += 1;
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
        self.roots().first().copied()
    }

    /// The two nodes the coordinator sends to, in turn: the first two live ones in tree order
    /// that serve peers and have not proven slow (a root that turns out slow hands the role
    /// on).
    fn roots(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| {
                let n = &self.nodes[i];
                n.alive() && !n.done && n.serves && !n.direct && !self.slow(i)
            })
            .take(2)
            .collect()
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
    fn source_for(&self, i: usize, digest: &str, serving: &Serving) -> Option<usize> {
        let n = &self.nodes[i];
        let excluded = n.bad_sources.get(digest);
        let usable = |j: usize| {
            let s = &self.nodes[j];
            j != i
                && s.alive()
                && s.serves
                && !s.probing
                && !s.stopped
                && s.holds.contains(digest)
                && serving.fast[j] < self.fanout
                && serving.all[j] < self.fanout + PER_NODE
                && !excluded.is_some_and(|e| e.contains(&j))
        };
        let parent = (i > 0).then(|| (i - 1) / self.fanout);
        (0..self.nodes.len())
            .filter(|&j| usable(j))
            .min_by_key(|&j| (self.slow(j), Some(j) != parent, serving.fast[j], j))
    }

    /// Whether node `j` looks slow: its peer transfers (either end) under [`SLOW_SHARE`] of
    /// the typical rate, or, for a root, the coordinator's sends into it under that share of
    /// the best such send. This steers only choices that cost nothing (which node is a root,
    /// a source, takes a source's slot).
    fn slow(&self, j: usize) -> bool {
        self.nodes[j].stopped || self.slow_among_peers(j) || self.slow_from_coordinator(j)
    }

    fn slow_from_coordinator(&self, j: usize) -> bool {
        self.nodes[j]
            .coord_rate
            .is_some_and(|r| r < self.best_coord_rate * SLOW_SHARE)
    }

    fn slow_among_peers(&self, j: usize) -> bool {
        let n = &self.nodes[j];
        let reference = self.typical_rate();
        let below = |r: f64| r < reference * SLOW_SHARE;
        n.rate.is_some_and(below) || n.serve_rate.is_some_and(below)
    }

    /// Whether node `j` is slow on steady evidence (among peer transfers, or among the
    /// coordinator's sends, one of which ran [`PROOF_TIME`]), or stopped reading: what the
    /// costly remedies (the coordinator sending a blob again, a send into the node cut off)
    /// wait for.
    fn proven_slow(&self, j: usize) -> bool {
        let n = &self.nodes[j];
        n.stopped
            || (n.steady && self.slow_among_peers(j))
            || (n.coord_steady && self.slow_from_coordinator(j))
    }

    /// The median of the nodes' best rates (receiving or serving), the upper one of an even
    /// count: what "slow" is measured against, so that one fast outlier does not make every
    /// other node look slow.
    fn typical_rate(&self) -> f64 {
        let mut rates: Vec<f64> = self
            .nodes
            .iter()
            .filter_map(|n| match (n.rate, n.serve_rate) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            })
            .collect();
        if rates.is_empty() {
            return 0.0;
        }
        rates.sort_by(f64::total_cmp);
        rates[rates.len() / 2]
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
                demoted: false,
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
            n.stopped = false;
            n.last_received = Some(Instant::now());
            self.run.progress.sent(&n.agent, m.held - t.held);
            t.held = m.held;
            t.last_progress = Instant::now();
            let elapsed = t.started.elapsed();
            // Peer transfers are compared with each other; the coordinator's sends only
            // with each other (the admin's link paces them all).
            if elapsed >= RATE_WINDOW {
                let rate = (t.held - t.from) as f64 / elapsed.as_secs_f64();
                let (node, source) = (t.node, t.source);
                if source == Source::Coordinator {
                    self.best_coord_rate = self.best_coord_rate.max(rate);
                    let n = &mut self.nodes[node];
                    n.coord_rate = Some(n.coord_rate.map_or(rate, |r| r.max(rate)));
                    n.coord_steady |= elapsed >= PROOF_TIME;
                } else {
                    self.observe(node, source, rate, elapsed);
                }
            }
        }
    }

    /// A peer transfer from `source` into node `node` ran at `rate`. A transfer is as slow
    /// as the slower of its two ends, so each end keeps the best rate it reached: a node is
    /// slow only when every transfer it took part in was. A transfer that has run
    /// [`PROOF_TIME`] makes both ends' rates steady.
    fn observe(&mut self, node: usize, source: Source, rate: f64, elapsed: Duration) {
        self.best_rate = self.best_rate.max(rate);
        let steady = elapsed >= PROOF_TIME;
        let n = &mut self.nodes[node];
        n.rate = Some(n.rate.map_or(rate, |r| r.max(rate)));
        n.steady |= steady;
        if let Source::Peer(src) = source {
            let s = &mut self.nodes[src];
            s.serve_rate = Some(s.serve_rate.map_or(rate, |r| r.max(rate)));
            s.steady |= steady;
        }
    }

    /// Whether transfer `t` has run long enough to tell, and moves slowly.
    fn slow_transfer(&self, t: &Transfer) -> bool {
        let elapsed = t.started.elapsed();
        t.source != Source::Coordinator
            && elapsed >= RATE_WINDOW
            && ((t.held - t.from) as f64 / elapsed.as_secs_f64()) < self.best_rate * SLOW_SHARE
    }

    /// Per node, the peers it serves right now.
    fn serving(&self) -> Serving {
        let mut serving = Serving {
            fast: vec![0; self.nodes.len()],
            all: vec![0; self.nodes.len()],
        };
        for t in self.transfers.values() {
            if let Source::Peer(j) = t.source {
                serving.all[j] += 1;
                if !self.slow_transfer(t) {
                    serving.fast[j] += 1;
                }
            }
        }
        serving
    }

    /// Cuts off transfers that stalled and nodes past `--node-timeout`.
    fn watch(&mut self) {
        // The agent gives up on a stalled source after the stall timeout; the coordinator
        // waits a little longer, so that the agent's finer verdict comes first.
        let limit = self.stall + (self.stall / 4).max(Duration::from_secs(2));
        let stalled = self.transfers_where(|_, t| !t.stalled && t.last_progress.elapsed() > limit);
        self.mark_stopped_root();
        self.mark_silent_sources();
        // Peers reading from a stopped node, or one that serves no more, get the blob
        // elsewhere (from another holder, or from the coordinator if that node was its only
        // one) instead of waiting for `--stall-timeout`.
        let readers = self.transfers_where(|swarm, t| {
            !t.demoted
                && matches!(t.source, Source::Peer(j)
                    if swarm.nodes[j].stopped || !swarm.nodes[j].serves)
        });
        self.cut_off(
            readers,
            Cut::Demoted,
            "its source serves nothing; fetching elsewhere",
        );
        // The coordinator's sends into a node that proved slow stop (what arrived stays for a
        // resume) while another node can take them: the blobs go to a root instead.
        let demoted = self.transfers_where(|swarm, t| {
            swarm.root_send(t)
                && swarm.proven_slow(t.node)
                && swarm.root().is_some_and(|r| r != t.node)
        });
        self.cut_off(
            demoted,
            Cut::Demoted,
            "node proved slow; its blob goes to another node",
        );
        self.cut_off(
            stalled,
            Cut::Stalled,
            "no progress; cutting the transfer off",
        );
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

    /// Whether `t` is a send from the coordinator into a root that has moved nothing for
    /// [`STOP_EVIDENCE`]; once every byte is out, plus the time to drain what may be in flight
    /// at a quarter of the best send's rate (a node slower than that is slow anyway) and to
    /// commit the blob, so that a healthy root on a slow link or a busy machine is not taken
    /// for a stopped one.
    fn stuck(&self, t: &Transfer) -> bool {
        if !self.root_send(t) {
            return false;
        }
        let size = self.run.bundle.blobs[&t.digest].size;
        let mut quiet = STOP_EVIDENCE;
        if t.held >= size {
            let in_flight = (size - t.from).min(IN_FLIGHT) as f64;
            let drain = match self.best_coord_rate * SLOW_SHARE {
                r if r > 0.0 => in_flight / r,
                _ => 0.0,
            };
            quiet += Duration::from_secs_f64(drain + size as f64 / COMMIT_RATE as f64);
        }
        t.last_progress.elapsed() >= quiet
    }

    /// Whether `t` is a send from the coordinator, still under way, into a node that serves
    /// peers (a root).
    fn root_send(&self, t: &Transfer) -> bool {
        t.source == Source::Coordinator
            && !t.demoted
            && self.nodes[t.node].serves
            && !self.nodes[t.node].direct
    }

    /// A root that took the coordinator's send and then moved nothing, while no other send
    /// is stuck, has stopped reading (two stuck at once point at the coordinator's own link,
    /// which another root would not help).
    fn mark_stopped_root(&mut self) {
        let stuck: Vec<usize> = self
            .transfers
            .values()
            .filter(|t| self.stuck(t))
            .map(|t| t.node)
            .collect();
        if let [i] = stuck[..] {
            if !self.nodes[i].stopped {
                warn!(node = %self.nodes[i].agent, "node took the coordinator's send and stopped reading; its blob goes to another node, its readers to other sources");
                self.nodes[i].stopped = true;
            }
        }
    }

    /// A source that serves nothing: fetches from it into two nodes have both moved nothing
    /// for [`STOP_EVIDENCE`] (one slow receiver does not stall two), or one has while its
    /// receiver took bytes from elsewhere since. It serves no more in this load.
    fn mark_silent_sources(&mut self) {
        let mut silent: HashMap<usize, (HashSet<usize>, bool)> = HashMap::new();
        for t in self.transfers.values() {
            let Source::Peer(src) = t.source else {
                continue;
            };
            let size = self.run.bundle.blobs[&t.digest].size;
            if t.demoted || t.held >= size || t.last_progress.elapsed() < STOP_EVIDENCE {
                continue;
            }
            let (receivers, receiver_moved) = silent.entry(src).or_default();
            receivers.insert(t.node);
            *receiver_moved |= self.nodes[t.node]
                .last_received
                .is_some_and(|at| at > t.last_progress + STOP_EVIDENCE / 4);
        }
        for (src, (receivers, receiver_moved)) in silent {
            if self.nodes[src].serves && (receivers.len() >= 2 || receiver_moved) {
                warn!(node = %self.nodes[src].agent, "peers reading from this node get nothing; they fetch elsewhere and it serves no more in this load");
                self.nodes[src].serves = false;
            }
        }
    }

    /// The transfers `which` picks.
    fn transfers_where(&self, which: impl Fn(&Self, &Transfer) -> bool) -> Vec<tokio::task::Id> {
        self.transfers
            .iter()
            .filter(|(_, t)| which(self, t))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Cuts transfers `ids` off, saying `why`: demoted (the blob comes another way) or
    /// stalled (a failure of the transfer).
    fn cut_off(&mut self, ids: Vec<tokio::task::Id>, cut: Cut, why: &str) {
        for id in ids {
            if let Some(t) = self.transfers.get_mut(&id) {
                let node = &self.nodes[t.node].agent;
                match cut {
                    Cut::Demoted => {
                        t.demoted = true;
                        info!(%node, digest = %t.digest, "{why}");
                    }
                    Cut::Stalled => {
                        t.stalled = true;
                        warn!(%node, digest = %t.digest, "{why}");
                    }
                }
            }
            self.abort(id);
        }
    }

    fn abort(&mut self, id: tokio::task::Id) {
        if let Some(t) = self.transfers.get(&id) {
            t.abort.abort();
        }
    }

    /// Node `i` failed: what moves into it stops.
    fn drop_node(&mut self, i: usize) {
        for id in self.transfers_where(|_, t| t.node == i) {
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
                n.last_received = Some(Instant::now());
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
                        let elapsed = t.started.elapsed();
                        let rate = received as f64 / elapsed.as_secs_f64().max(1e-3);
                        self.observe(i, t.source, rate, elapsed);
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
            Ended::Demoted => {}
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
            let record = held(bundle, plan, &n.chosen, &n.agent, &self.run.opts.agents);
            let (plan, session, progress) =
                (plan.clone(), session.clone(), self.run.progress.clone());
            let (mut client, agent, chosen) = (n.client.clone(), n.agent.clone(), n.chosen.clone());
            self.node_tasks.spawn(async move {
                progress.phase(&agent, "verifying");
                let r = verify_and_end(
                    &mut client,
                    &plan,
                    &chosen,
                    &session,
                    &agent,
                    record,
                    &mut report,
                )
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

/// The next answer of the nodes still being identified (never called without any).
async fn next_pending<'r>(
    pending: &mut Option<super::Pending<'r>>,
) -> Option<(usize, super::Identified, u32)> {
    use futures::StreamExt;
    match pending {
        Some(p) => p.next().await,
        None => std::future::pending().await,
    }
}
