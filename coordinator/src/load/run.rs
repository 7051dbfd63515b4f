//! A load under way: how it runs ([`LoadOptions`], [`RetryPolicy`]) and what is set up once
//! for all of its nodes before either delivery starts (`Run`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::bundle::{Bundle, LayerLimits};
use crate::progress::Progress;
use crate::reference::RetagRule;
use crate::select::PlatformChoice;

use super::check::LayerChecks;
use super::conn::Dial;
use super::error::LoadError;
use super::plan::{unpacked_size_hints, PlannedImage, RelayMode};

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
    /// How far a layer may expand; `None` sends layers unchecked (see [`LayerChecks`]).
    pub layer_check: Option<LayerLimits>,
    /// Compare what each node needs with its free space before sending (see
    /// [`super::plan::space_needed`]).
    pub space_check: bool,
    /// Which platform of multi-platform images each node gets.
    pub platforms: PlatformChoice,
    /// Whether agents pass blobs on to each other (`--relay`).
    pub relay: RelayMode,
    /// A relayed transfer that moves no byte for this long is cut off (`--stall-timeout`).
    pub stall_timeout: Duration,
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

/// One load under way: what every node's delivery reads, set up once for all nodes.
pub(crate) struct Run<'a> {
    pub bundle: Arc<Bundle>,
    pub plan: Arc<Vec<PlannedImage>>,
    pub opts: &'a LoadOptions,
    pub progress: Arc<dyn Progress>,
    /// One session id for the whole load, so every node's lease is named alike.
    pub session: String,
    /// The unpacked size of every layer, for the space check (empty when it is off).
    sizes: HashMap<String, u64>,
    /// The layer checks shared by every node's uploads; `None` when they are off.
    pub checks: Option<Arc<LayerChecks>>,
}

impl<'a> Run<'a> {
    /// Sets up the load: its session id, and what it checks besides digests (the layer sizes
    /// for the space check, the shared layer checks).
    pub async fn new(
        bundle: Arc<Bundle>,
        plan: Arc<Vec<PlannedImage>>,
        opts: &'a LoadOptions,
        progress: Arc<dyn Progress>,
    ) -> Run<'a> {
        let session = format!("load-{}", uuid::Uuid::new_v4().simple());
        let sizes = if opts.space_check {
            let bundle = bundle.clone();
            tokio::task::spawn_blocking(move || unpacked_size_hints(&bundle))
                .await
                .unwrap_or_default()
        } else {
            HashMap::new()
        };
        let checks = opts
            .layer_check
            .map(|limits| Arc::new(LayerChecks::new(bundle.clone(), limits)));
        Run {
            bundle,
            plan,
            opts,
            progress,
            session,
            sizes,
            checks,
        }
    }

    /// The layer sizes the space check compares with a node's free space; `None` when the
    /// space check is off.
    pub fn sizes(&self) -> Option<&HashMap<String, u64>> {
        self.opts.space_check.then_some(&self.sizes)
    }
}
