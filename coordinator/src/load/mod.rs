//! `lade load`: get every image of a bundle onto every node, named consistently.
//!
//! Data flows one way through this module: bundle → plan → deliver → report.
//! - [`plan`] decides, as pure data, what a load does: the names every image gets, how blobs
//!   travel, and per node (from what its agent said) which manifests it gets, which blobs it
//!   lacks, whether they fit, and what it imports.
//! - Then one delivery carries the plan out on every node: `direct` (the coordinator
//!   sends each node what it lacks itself) or [`relay`] (each missing blob leaves the
//!   coordinator once; the agents pass it on). Both reach agents through [`conn`], check
//!   layers through [`check`], and read what was set up once for the load from [`run`];
//!   neither calls the other.
//! - A node whose session ended gets the load's record ([`record`]: the bundle version, its
//!   images, names and blobs), which `lade status`, `prune` and `unload` read back.
//! - Each node's outcome is a [`NodeReport`] ([`report`]), which also renders the summary.
//!
//! One node's failure is recorded in its own report and never stops the others. Live
//! progress is [`crate::progress`]'s job; naming rules are [`crate::reference`]'s.

pub mod check;
pub mod conn;
mod direct;
pub mod error;
pub mod plan;
pub mod record;
pub mod relay;
pub mod report;
pub mod run;

use std::sync::Arc;

use crate::bundle::Bundle;
use crate::progress::Progress;

pub(crate) use conn::error_chain;
pub use conn::{connect, AgentConn, Credentials, Dial};
pub use error::{FailureKind, LoadError};
pub use plan::{
    plan_names, plan_text, space_needed, PlanError, PlannedImage, RelayMode, SpaceNeed,
};
pub use report::{
    all_recorded, summary_json, summary_table, FailedImage, LoadedImage, NodeReport, Retry,
};
pub use run::{LoadOptions, RetryPolicy};

/// Loads the bundle onto every agent of `opts` as `plan` names its images, by one delivery:
/// relayed when `opts.relay` resolves to a fan-out for this many nodes, direct otherwise.
/// Returns one report per agent, in order.
pub async fn load(
    bundle: Arc<Bundle>,
    plan: Arc<Vec<PlannedImage>>,
    opts: &LoadOptions,
    progress: Arc<dyn Progress>,
) -> Vec<NodeReport> {
    let run = run::Run::new(bundle, plan, opts, progress).await;
    match opts.relay.fanout(opts.agents.len()) {
        Some(fanout) => relay::load(&run, fanout).await,
        None => direct::load(&run).await,
    }
}
