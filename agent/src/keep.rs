//! Keep-present: the agent puts back what is missing of every bundle version it holds.
//!
//! Kubelet's image garbage collection, an operator's `ctr images rm`, `ctr content rm` or a
//! runtime that lost its state can take away what a load put on the node. A pass goes over
//! every record [`Runtime::holds`] returns and, for each image, finds what is missing:
//! names that no longer exist (Verify), names that lost their pin (`RefStatus.pinned`, where
//! the agent pins), blobs the node no longer has ([`Runtime::present`]) and snapshots that
//! are gone (a name that exists but does not verify while its content is all here). Missing
//! blobs are fetched from a peer agent that holds them, through the same [`Fetcher`] (and so
//! the same credentials and peer admission) as the coordinator's Fetch calls; the record's
//! `peers` are asked first, then `--peers` and the agents `--peers-dns` resolves to, this
//! agent itself left out. Then the runtime's own Import, under a session of the pass's own,
//! re-creates the names, pins and snapshots from the held content.
//!
//! A name that points at other content than the record's target was moved there by someone
//! (an operator, another load with `--allow-overwrite`): it is reported, never taken back
//! (Import runs with `allow_overwrite` off and without that name).
//!
//! One pass runs at a time: a Keep call or a loop tick that comes while one runs shares it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt, Shared};
use futures::StreamExt;
use lade_proto::{
    Descriptor, FetchRequest, Held, HeldImage, ImageSpec, ImportEvent, ImportPhase, InfoRequest,
    KeepResponse, Repair,
};
use tokio::sync::mpsc;
use tonic::Status;
use tracing::{debug, info, warn};

use crate::error::Error;
use crate::fetch::Fetcher;
use crate::runtime::{canonical_name, Change, Runtime};

/// How long the loop waits after a runtime signal for more before it runs a pass: an image
/// removal by kubelet's GC or an operator comes in bursts.
const DEBOUNCE: Duration = Duration::from_secs(1);

/// Where the keep-present pass finds peers besides each record's, and how often it runs.
#[derive(Clone, Debug, Default)]
pub struct KeepConfig {
    /// Time between passes of the loop; `None`: no loop (the Keep call still runs a pass).
    pub interval: Option<Duration>,
    /// `host:port` of other agents (`--peers`).
    pub peers: Vec<String>,
    /// `name:port` whose A/AAAA records are the other agents, resolved each pass that
    /// needs a peer (`--peers-dns`: the agents' headless Service).
    pub peers_dns: Option<String>,
}

/// What a repair put back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A tag or digest reference re-created.
    Name,
    /// The CRI pin label re-applied.
    Pin,
    /// Snapshots re-created from held content.
    Unpack,
    /// Blobs fetched from a peer.
    Content,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Name => "name",
            Kind::Pin => "pin",
            Kind::Unpack => "unpack",
            Kind::Content => "content",
        }
    }
}

/// The state of one held image, for the `lade_agent_held_images` gauge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Every name, pin, blob and snapshot is there.
    Present,
    /// Some of it is.
    Incomplete,
    /// No name of it points at its target.
    Missing,
}

/// What one image lacks.
#[derive(Debug, Default)]
struct Need {
    /// Names that do not exist.
    absent: Vec<String>,
    /// Names that point at other content: (name, the digest they point at).
    moved: Vec<(String, String)>,
    /// Names that point at another held version's image of that name (a later load moved
    /// them there): that version's to keep, not this one's.
    superseded: Vec<String>,
    /// Names that point at the target without the pin, where the agent pins.
    unpinned: Vec<String>,
    /// A name points at the target but does not verify (content or snapshots missing).
    broken: bool,
    /// Blobs the node does not have.
    missing: Vec<Descriptor>,
    /// How many names the image has.
    names: usize,
}

impl Need {
    /// Whether anything but moved names (which are left alone) needs putting back.
    fn repairable(&self) -> bool {
        !self.absent.is_empty()
            || !self.unpinned.is_empty()
            || self.broken
            || !self.missing.is_empty()
    }

    fn state(&self) -> State {
        let own = self.names - self.superseded.len();
        if own > 0 && self.absent.len() + self.moved.len() >= own {
            State::Missing
        } else if self.repairable() || !self.moved.is_empty() {
            State::Incomplete
        } else {
            State::Present
        }
    }
}

type PassFuture = Shared<BoxFuture<'static, Result<KeepResponse, Status>>>;

/// Runs keep-present passes over one runtime, one at a time.
pub struct Keeper<R> {
    runtime: Arc<R>,
    fetcher: Fetcher<R>,
    config: KeepConfig,
    running: Mutex<Option<PassFuture>>,
    /// Held by a pass, and by whatever must not run beside one ([`Keeper::without_pass`]).
    quiet: tokio::sync::Mutex<()>,
    sessions: AtomicU64,
}

impl<R: Runtime> Keeper<R> {
    /// A keeper that fetches through `fetcher` (its runtime is the one kept).
    pub fn new(fetcher: Fetcher<R>, config: KeepConfig) -> Self {
        Keeper {
            runtime: fetcher.runtime.clone(),
            fetcher,
            config,
            running: Mutex::new(None),
            quiet: tokio::sync::Mutex::new(()),
            sessions: AtomicU64::new(0),
        }
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &KeepConfig {
        &self.config
    }

    /// Runs a pass, or shares the one under way; the pass goes on to its end even if every
    /// caller goes away.
    pub async fn pass(self: &Arc<Self>) -> Result<KeepResponse, Status> {
        let pass = {
            let mut running = self.running.lock().expect("keep pass lock");
            match &*running {
                Some(pass) => pass.clone(),
                None => {
                    let keeper = self.clone();
                    let task = tokio::spawn(async move {
                        let outcome = keeper.run_pass().await.map_err(Status::from);
                        *keeper.running.lock().expect("keep pass lock") = None;
                        outcome
                    });
                    let pass = async move {
                        task.await.unwrap_or_else(|e| {
                            Err(Status::internal(format!(
                                "the keep-present pass failed: {e}"
                            )))
                        })
                    }
                    .boxed()
                    .shared();
                    *running = Some(pass.clone());
                    pass
                }
            }
        };
        pass.await
    }

    /// Runs `work` while no pass runs (a Release, whose removed names a pass would otherwise
    /// put back while the record is still there).
    pub async fn without_pass<T>(&self, work: impl Future<Output = T>) -> T {
        let _quiet = self.quiet.lock().await;
        work.await
    }

    async fn run_pass(&self) -> Result<KeepResponse, Error> {
        let _quiet = self.quiet.lock().await;
        let mut held = self.runtime.holds().await?;
        held.sort_by(|a, b| (&a.bundle, &a.version).cmp(&(&b.bundle, &b.version)));
        let mut pass = Pass {
            keeper: self,
            session: format!(
                "keep-{}-{}",
                std::process::id(),
                self.sessions.fetch_add(1, Ordering::Relaxed)
            ),
            pins: false,
            response: KeepResponse::default(),
            peers: None,
            selves: HashMap::new(),
            owners: owners(&held),
        };
        if !held.is_empty() {
            pass.pins = self.runtime.info().await?.images_pinned;
        }
        let repaired = pass.repair_all(&held).await;
        let ended = self.runtime.end_session(&pass.session).await;
        repaired?;
        ended?;

        // What the node holds now, after the repairs.
        let mut counts: HashMap<&'static str, i64> = HashMap::new();
        for record in &held {
            for image in &record.images {
                let state = match pass.inspect(image).await?.state() {
                    State::Present => "present",
                    State::Incomplete => "incomplete",
                    State::Missing => "missing",
                };
                *counts.entry(state).or_default() += 1;
            }
        }
        let metrics = &self.fetcher.metrics;
        for state in ["present", "incomplete", "missing"] {
            metrics
                .held_images
                .with_label_values(&[state])
                .set(counts.get(state).copied().unwrap_or(0));
        }
        Ok(pass.response)
    }

    /// Whether `change` calls for a pass: any restart or content removal; an image removal
    /// only if a held version names the image.
    async fn matters(&self, change: &Change) -> bool {
        let Change::ImageRemoved(name) = change else {
            return true;
        };
        let name = canonical_name(name);
        match self.runtime.holds().await {
            Ok(held) => held
                .iter()
                .flat_map(|h| &h.images)
                .flat_map(|i| &i.names)
                .any(|n| canonical_name(n) == name),
            // The runtime does not answer: a pass will say why.
            Err(_) => true,
        }
    }
}

/// For each name (normalised) of the records `held`, the targets and configs of the images
/// that have it.
fn owners(held: &[Held]) -> HashMap<String, HashSet<String>> {
    let mut owners: HashMap<String, HashSet<String>> = HashMap::new();
    for image in held.iter().flat_map(|h| &h.images) {
        let digests = image
            .target
            .iter()
            .chain(
                image
                    .blobs
                    .iter()
                    .filter(|b| lade_oci::is_config(&b.media_type)),
            )
            .map(|d| d.digest.clone());
        for name in &image.names {
            owners
                .entry(canonical_name(name))
                .or_default()
                .extend(digests.clone());
        }
    }
    owners
}

/// Runs a pass every `interval`, at once when it starts, and soon after the runtime
/// signals a change that matters (debounced), until `stop` completes.
pub async fn run_loop<R: Runtime>(
    keeper: Arc<Keeper<R>>,
    interval: Duration,
    stop: impl Future<Output = ()>,
) {
    let mut changes = keeper.runtime.changes();
    tokio::pin!(stop);
    let mut next = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep_until(next) => {}
            change = changes.next() => {
                let Some(change) = change else {
                    changes = futures::stream::pending().boxed();
                    continue;
                };
                if !keeper.matters(&change).await {
                    continue;
                }
                debug!(?change, "runtime changed; keep-present pass soon");
                let settle = tokio::time::sleep(DEBOUNCE);
                tokio::pin!(settle);
                loop {
                    tokio::select! {
                        () = &mut settle => break,
                        more = changes.next() => if more.is_none() {
                            changes = futures::stream::pending().boxed();
                        },
                    }
                }
            }
        }
        let done = tokio::select! {
            () = &mut stop => return,
            done = keeper.pass() => done,
        };
        match done {
            Ok(done) => debug!(
                repairs = done.repairs.len(),
                failures = done.failures.len(),
                "keep-present pass done"
            ),
            Err(status) => warn!(error = %status.message(), "keep-present pass failed"),
        }
        next = tokio::time::Instant::now() + interval;
    }
}

/// One pass's state.
struct Pass<'a, R> {
    keeper: &'a Keeper<R>,
    /// The session the pass's fetches and imports run under.
    session: String,
    /// Whether the agent pins the images it names.
    pins: bool,
    response: KeepResponse,
    /// Configured peers, resolved once in the pass; and why DNS did not answer, if it did
    /// not.
    peers: Option<(Vec<String>, Option<String>)>,
    /// Whether each peer asked in this pass is this agent.
    selves: HashMap<String, bool>,
    /// For each name (normalised) a held version has, what its images of that name are:
    /// their targets and configs.
    owners: HashMap<String, HashSet<String>>,
}

impl<R: Runtime> Pass<'_, R> {
    async fn repair_all(&mut self, held: &[Held]) -> Result<(), Error> {
        for record in held {
            let before = self.response.repairs.len();
            for image in &record.images {
                self.repair(record, image).await?;
            }
            if self.response.repairs.len() > before {
                // The same record again: the runtime holds what was put back (containerd:
                // the snapshots re-created, the labels of the names re-created).
                if let Err(e) = self.keeper.runtime.hold(record.clone()).await {
                    let message = format!(
                        "bundle {} version {}: recording what was put back: {e}",
                        record.bundle, record.version
                    );
                    self.fail(message);
                }
            }
        }
        Ok(())
    }

    /// What `image` lacks on the node.
    async fn inspect(&self, image: &HeldImage) -> Result<Need, Error> {
        let runtime = &self.keeper.runtime;
        let target = image.target.clone().unwrap_or_default();
        let mut need = Need {
            names: image.names.len(),
            ..Default::default()
        };
        // What a name points at: its manifest (or index) where the runtime keeps one, else
        // (Docker) its image ID, the config digest.
        let config = image
            .blobs
            .iter()
            .find(|b| lade_oci::is_config(&b.media_type))
            .map(|b| b.digest.as_str());
        for status in runtime.verify(&image.names).await? {
            let (points_at, ours) = if !status.manifest_digest.is_empty() {
                let ours = status.manifest_digest == target.digest;
                (status.manifest_digest, ours)
            } else {
                let ours = config.is_none_or(|c| c == status.image_id);
                (status.image_id, ours)
            };
            if points_at.is_empty() {
                need.absent.push(status.r#ref);
            } else if !ours {
                let name = canonical_name(&status.r#ref);
                if self
                    .owners
                    .get(&name)
                    .is_some_and(|d| d.contains(&points_at))
                {
                    need.superseded.push(status.r#ref);
                } else {
                    need.moved.push((status.r#ref, points_at));
                }
            } else {
                need.broken |= !status.ok;
                if self.pins && !status.pinned {
                    need.unpinned.push(status.r#ref);
                }
            }
        }
        let mut seen = BTreeSet::new();
        let blobs: Vec<Descriptor> = std::iter::once(&target)
            .chain(&image.blobs)
            .filter(|b| seen.insert(b.digest.clone()))
            .cloned()
            .collect();
        let present = runtime.present(&blobs).await?;
        need.missing = blobs
            .into_iter()
            .zip(present)
            .filter(|(_, p)| !p)
            .map(|(b, _)| b)
            .collect();
        Ok(need)
    }

    /// Puts back what `image` of `record` lacks. Errors are the runtime's own (the pass
    /// stops); what cannot be put back is a failure in the answer.
    async fn repair(&mut self, record: &Held, image: &HeldImage) -> Result<(), Error> {
        let need = self.inspect(image).await?;
        let target = image.target.clone().unwrap_or_default();
        for (name, other) in &need.moved {
            self.failure(
                record,
                image,
                format!(
                    "name {name} points at {other}, not {}: left as it is (a name moved to \
                     other content is not taken back)",
                    target.digest
                ),
            );
        }
        if !need.repairable() {
            return Ok(());
        }
        let taken: Vec<&String> = need
            .moved
            .iter()
            .map(|(n, _)| n)
            .chain(&need.superseded)
            .collect();
        let names: Vec<String> = image
            .names
            .iter()
            .filter(|n| !taken.contains(n))
            .cloned()
            .collect();
        if !need.missing.is_empty() {
            match self.fetch(record, &need.missing).await {
                Ok(sources) => self.repaired(record, image, Kind::Content, sources),
                Err(why) => {
                    self.failure(record, image, why);
                    return Ok(());
                }
            }
        }
        if names.is_empty() {
            // Every name is another's now: the content stays held, there is nothing to name.
            return Ok(());
        }
        let spec = ImageSpec {
            manifest: Some(target),
            names,
            source: image.source.clone(),
            allow_overwrite: false,
        };
        let (tx, mut rx) = mpsc::channel::<ImportEvent>(16);
        let runtime = &self.keeper.runtime;
        let (imported, events) =
            tokio::join!(runtime.import(&self.session, vec![spec], tx), async {
                let mut events = Vec::new();
                while let Some(event) = rx.recv().await {
                    events.push(event);
                }
                events
            });
        if let Err(e) = imported {
            self.failure(record, image, format!("import: {e}"));
            return Ok(());
        }
        let phase = |e: &ImportEvent| ImportPhase::try_from(e.phase).ok();
        if let Some(failed) = events
            .iter()
            .find(|e| phase(e) == Some(ImportPhase::ImageFailed))
        {
            self.failure(record, image, format!("import: {}", failed.message));
            return Ok(());
        }
        for name in &need.absent {
            self.repaired(record, image, Kind::Name, name.clone());
        }
        for name in &need.unpinned {
            self.repaired(record, image, Kind::Pin, name.clone());
        }
        let unpacked: Vec<&str> = events
            .iter()
            .filter(|e| phase(e) == Some(ImportPhase::LayerUnpacked))
            .map(|e| e.layer_digest.as_str())
            .collect();
        if !unpacked.is_empty() {
            self.repaired(record, image, Kind::Unpack, unpacked.join(", "));
        }
        Ok(())
    }

    /// Fetches every blob of `missing` from a peer that holds it; says which blob came from
    /// where, or why one could not be fetched (every peer asked, and its answer).
    async fn fetch(&mut self, record: &Held, missing: &[Descriptor]) -> Result<String, String> {
        let (peers, dns_error) = self.peers(record).await;
        let mut sources = Vec::new();
        for blob in missing {
            let mut tried = Vec::new();
            let mut from = None;
            for peer in &peers {
                let req = FetchRequest {
                    session: self.session.clone(),
                    blob: Some(blob.clone()),
                    source: peer.clone(),
                    ..Default::default()
                };
                // Progress is not reported anywhere: the pass answers at its end.
                let (progress, _) = mpsc::channel(1);
                match self.keeper.fetcher.run(req, &progress).await {
                    Ok(done) if done.done => {
                        from = Some(peer.clone());
                        break;
                    }
                    Ok(failed) => tried.push(format!("{peer}: {}", failed.source_error)),
                    Err(e) => return Err(format!("blob {}: storing it: {e}", blob.digest)),
                }
            }
            match from {
                Some(peer) => sources.push(format!("{} from {peer}", blob.digest)),
                None => {
                    let asked = if peers.is_empty() {
                        "no peer to ask: the record names none and neither --peers nor \
                         --peers-dns gives any"
                            .to_string()
                    } else {
                        format!("peers asked: {}", tried.join("; "))
                    };
                    let dns = dns_error.map(|e| format!("; {e}")).unwrap_or_default();
                    return Err(format!(
                        "blob {} is missing and no peer served it ({asked}{dns})",
                        blob.digest
                    ));
                }
            }
        }
        Ok(sources.join(", "))
    }

    /// The peers to ask for `record`'s blobs: its own, then the configured ones, each once,
    /// without this agent; and why `--peers-dns` gave none, if it failed.
    async fn peers(&mut self, record: &Held) -> (Vec<String>, Option<String>) {
        if self.peers.is_none() {
            self.peers = Some(self.keeper.configured_peers().await);
        }
        let (configured, dns_error) = self.peers.clone().unwrap_or_default();
        let mut seen = BTreeSet::new();
        let candidates: Vec<String> = record
            .peers
            .iter()
            .chain(&configured)
            .filter(|p| seen.insert(p.to_string()))
            .cloned()
            .collect();
        let own = match self.keeper.runtime.info().await {
            Ok(info) => info.node_name,
            Err(_) => String::new(),
        };
        let mut peers = Vec::with_capacity(candidates.len());
        for peer in candidates {
            let is_self = match self.selves.get(&peer) {
                Some(known) => *known,
                None => {
                    let found = self.keeper.is_self(&peer, &own).await;
                    self.selves.insert(peer.clone(), found);
                    found
                }
            };
            if !is_self {
                peers.push(peer);
            }
        }
        (peers, dns_error)
    }

    fn repaired(&mut self, record: &Held, image: &HeldImage, kind: Kind, detail: String) {
        info!(
            bundle = %record.bundle,
            version = %record.version,
            image = %image.source,
            kind = kind.as_str(),
            %detail,
            "keep-present: put back"
        );
        self.keeper
            .fetcher
            .metrics
            .repairs
            .with_label_values(&[kind.as_str()])
            .inc();
        self.response.repairs.push(Repair {
            bundle: record.bundle.clone(),
            version: record.version.clone(),
            image: image.source.clone(),
            kind: kind.as_str().to_string(),
            detail,
        });
    }

    fn failure(&mut self, record: &Held, image: &HeldImage, why: String) {
        self.fail(format!(
            "bundle {} version {} image {}: {why}",
            record.bundle, record.version, image.source
        ));
    }

    fn fail(&mut self, message: String) {
        warn!(%message, "keep-present: could not put back");
        self.keeper
            .fetcher
            .metrics
            .failures
            .with_label_values(&["keep"])
            .inc();
        self.response.failures.push(message);
    }
}

impl<R: Runtime> Keeper<R> {
    /// `--peers`, then the addresses `--peers-dns` resolves to now; and why DNS failed.
    async fn configured_peers(&self) -> (Vec<String>, Option<String>) {
        let mut peers = self.config.peers.clone();
        let Some(name) = &self.config.peers_dns else {
            return (peers, None);
        };
        match tokio::net::lookup_host(name.as_str()).await {
            Ok(addrs) => {
                peers.extend(addrs.map(|a| a.to_string()));
                (peers, None)
            }
            Err(e) => {
                warn!(peers_dns = %name, error = %e, "cannot resolve the peers' DNS name");
                (peers, Some(format!("--peers-dns {name}: {e}")))
            }
        }
    }

    /// Whether `peer` is this agent: it answers Info with this node's name, `own`. A peer
    /// that does not answer is not taken for this agent (asking it will say why it failed).
    async fn is_self(&self, peer: &str, own: &str) -> bool {
        if own.is_empty() {
            return false;
        }
        let Ok(mut client) = self.fetcher.peers.client(peer).await else {
            return false;
        };
        let answer = tokio::time::timeout(self.fetcher.stall, client.info(InfoRequest {})).await;
        matches!(answer, Ok(Ok(info)) if info.get_ref().node_name == own)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn need(names: usize) -> Need {
        Need {
            names,
            ..Default::default()
        }
    }

    #[test]
    fn an_image_is_missing_when_no_name_points_at_it_and_incomplete_when_anything_lacks() {
        assert_eq!(need(2).state(), State::Present);
        let absent = Need {
            absent: vec!["a".into()],
            ..need(2)
        };
        assert_eq!(absent.state(), State::Incomplete);
        let gone = Need {
            absent: vec!["a".into()],
            moved: vec![("b".into(), "sha256:other".into())],
            ..need(2)
        };
        assert_eq!(gone.state(), State::Missing);
        assert!(!gone.moved.is_empty() && gone.repairable());
        let moved_only = Need {
            moved: vec![("b".into(), "sha256:other".into())],
            ..need(2)
        };
        // Reported, never repaired, and the image is not whole.
        assert!(!moved_only.repairable());
        assert_eq!(moved_only.state(), State::Incomplete);
        for lacking in [
            Need {
                unpinned: vec!["a".into()],
                ..need(1)
            },
            Need {
                broken: true,
                ..need(1)
            },
            Need {
                missing: vec![Descriptor::default()],
                ..need(1)
            },
        ] {
            assert!(lacking.repairable(), "{lacking:?}");
            assert_eq!(lacking.state(), State::Incomplete, "{lacking:?}");
        }
    }
}
