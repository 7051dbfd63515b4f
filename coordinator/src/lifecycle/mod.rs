//! Bundles as a lifecycle on the nodes: what each node holds of which bundle version (the
//! records `lade load` leaves, see [`crate::load::record`]), and letting go of versions.
//!
//! - This module asks every node for its records (`Info` for its name, then `Holds`).
//! - [`status`]: `lade status` without a bundle, the BUNDLE × VERSION × node table.
//! - [`release`]: `lade prune` and `lade unload`: which versions go, the `Release` calls and
//!   what every node removed, kept and freed.
//!
//! What a node keeps or frees is the agent's decision (names another version shares, names
//! containers use); the coordinator chooses versions and reports.

pub mod release;
pub mod status;

use futures::StreamExt;
use lade_proto::{HeldVersion, HoldsRequest, InfoRequest};
use tonic::Code;
use tracing::instrument;

use crate::load::{connect, AgentConn, Dial};

/// What one node answered about the bundle versions it holds.
#[derive(Debug)]
pub struct NodeHolds {
    pub agent: String,
    /// Node name its agent reported; empty when it could not be asked.
    pub node: String,
    /// Every version it holds, or why it could not say.
    pub result: Result<Vec<HeldVersion>, String>,
}

impl NodeHolds {
    /// The node's name, else its agent's address.
    pub fn label(&self) -> &str {
        if self.node.is_empty() {
            &self.agent
        } else {
            &self.node
        }
    }
}

/// A node that answered, with a client to call it again.
pub(crate) struct Asked {
    pub holds: NodeHolds,
    pub client: Option<AgentConn>,
}

/// Asks every agent (`parallel` at a time) which bundle versions its node holds; one answer
/// per agent, in order.
pub async fn holds(agents: &[String], dial: &Dial, parallel: usize) -> Vec<NodeHolds> {
    ask_all(agents, dial, parallel)
        .await
        .into_iter()
        .map(|a| a.holds)
        .collect()
}

pub(crate) async fn ask_all(agents: &[String], dial: &Dial, parallel: usize) -> Vec<Asked> {
    let mut answers: Vec<(usize, Asked)> = futures::stream::iter(agents.iter().enumerate())
        .map(|(i, agent)| async move { (i, ask(agent, dial).await) })
        .buffer_unordered(parallel.max(1))
        .collect()
        .await;
    answers.sort_by_key(|(i, _)| *i);
    answers.into_iter().map(|(_, a)| a).collect()
}

#[instrument(skip_all, fields(agent = %agent))]
async fn ask(agent: &str, dial: &Dial) -> Asked {
    let mut holds = NodeHolds {
        agent: agent.to_string(),
        node: String::new(),
        result: Ok(Vec::new()),
    };
    let mut client = match connect(agent, dial).await {
        Ok(client) => client,
        Err(e) => {
            holds.result = Err(e.to_string());
            return Asked {
                holds,
                client: None,
            };
        }
    };
    match client.info(InfoRequest {}).await {
        Ok(info) => holds.node = info.into_inner().node_name,
        Err(status) => {
            holds.result = Err(format!("agent {agent}: Info failed: {}", status.message()));
            return Asked {
                holds,
                client: None,
            };
        }
    }
    holds.result = match client.holds(HoldsRequest {}).await {
        Ok(answer) => Ok(answer.into_inner().versions),
        Err(status) if status.code() == Code::Unimplemented => Err(format!(
            "agent {agent} keeps no bundle records (an older version): upgrade the lade chart"
        )),
        Err(status) => Err(format!("agent {agent}: Holds failed: {}", status.message())),
    };
    Asked {
        holds,
        client: Some(client),
    }
}

/// One bundle version as every node that answered holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    pub bundle: String,
    pub version: String,
    /// When it was last loaded, on any node: seconds since the Unix epoch.
    pub loaded_at: u64,
}

/// Every version some node holds, by bundle name, then oldest load first (a version loaded
/// again counts from its latest load; equal times by version text).
pub fn versions<'a>(nodes: impl IntoIterator<Item = &'a NodeHolds>) -> Vec<Version> {
    let mut latest: std::collections::BTreeMap<(&str, &str), u64> = Default::default();
    for held in nodes
        .into_iter()
        .filter_map(|n| n.result.as_ref().ok())
        .flatten()
        .filter_map(|v| v.held.as_ref())
    {
        let at = latest
            .entry((held.bundle.as_str(), held.version.as_str()))
            .or_default();
        *at = (*at).max(held.loaded_at);
    }
    let mut versions: Vec<Version> = latest
        .into_iter()
        .map(|((bundle, version), loaded_at)| Version {
            bundle: bundle.to_string(),
            version: version.to_string(),
            loaded_at,
        })
        .collect();
    versions.sort_by(|a, b| {
        (&a.bundle, a.loaded_at, &a.version).cmp(&(&b.bundle, b.loaded_at, &b.version))
    });
    versions
}

/// A node's record of `bundle` `version`, if it holds one.
pub fn held_on<'a>(node: &'a NodeHolds, bundle: &str, version: &str) -> Option<&'a HeldVersion> {
    node.result.as_ref().ok()?.iter().find(|v| {
        v.held
            .as_ref()
            .is_some_and(|h| h.bundle == bundle && h.version == version)
    })
}

/// A time in seconds since the Unix epoch as UTC, to the second (`-` for none).
pub(crate) fn timestamp(secs: u64) -> String {
    if secs == 0 {
        return "-".into();
    }
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    humantime::format_rfc3339_seconds(at).to_string()
}
