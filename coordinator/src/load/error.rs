//! What stops a node's load, and which of those are worth another attempt.

use std::sync::Arc;
use std::time::Duration;

use indicatif::HumanBytes;

use crate::bundle::BundleError;
use crate::reference::ReferenceError;

/// What can stop a node's load. Bundle errors name the member; agent errors the call.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot reach agent {agent}: {reason}")]
    Connect { agent: String, reason: String },
    #[error("agent {agent}: {call} failed: {status}")]
    Agent {
        agent: String,
        call: &'static str,
        status: tonic::Status,
    },
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// A layer that failed its check (one outcome shared by every node that needed it).
    #[error(transparent)]
    Layer(Arc<BundleError>),
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error("credentials: {0}")]
    Credentials(String),
    #[error("agent {agent}: no result within {}", humantime::format_duration(*limit))]
    TimedOut { agent: String, limit: Duration },
    /// The node lacks room for what this load would write; nothing was sent to it.
    #[error(
        "node {node} (agent {agent}): needs about {} for {what} on {path}, which has {} free; nothing was sent (free space, e.g. remove unused images with `crictl rmi --prune`, or pass --no-space-check)",
        HumanBytes(*needed),
        HumanBytes(*free)
    )]
    NoSpace {
        agent: String,
        node: String,
        path: String,
        what: String,
        needed: u64,
        free: u64,
    },
}

impl LoadError {
    /// Wraps a failed call `call` to `agent`, naming both.
    pub(crate) fn agent_call(
        agent: &str,
        call: &'static str,
    ) -> impl FnOnce(tonic::Status) -> LoadError {
        let agent = agent.to_string();
        move |status| LoadError::Agent {
            agent,
            call,
            status,
        }
    }

    /// Whether the bundle's own bytes are at fault (a blob or a layer that fails its check):
    /// the images using that blob fail, the rest of the load goes on.
    pub fn is_bad_content(&self) -> bool {
        matches!(
            self,
            LoadError::Layer(_) | LoadError::Bundle(BundleError::DigestMismatch { .. })
        )
    }

    /// Whether trying the node again may succeed: it was unreachable or dropped the
    /// connection, not refused what it was given.
    pub fn is_transient(&self) -> bool {
        match self {
            LoadError::Connect { .. } | LoadError::TimedOut { .. } => true,
            LoadError::Agent { status, .. } => matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
            ),
            LoadError::Bundle(_)
            | LoadError::Layer(_)
            | LoadError::NoSpace { .. }
            | LoadError::Reference(_)
            | LoadError::Credentials(_) => false,
        }
    }
}
