//! What stops a node's load, and which of those are worth another attempt.

use std::sync::Arc;
use std::time::Duration;

use indicatif::HumanBytes;
use serde::Serialize;

use crate::bundle::BundleError;
use crate::reference::ReferenceError;

/// What kind of failure stopped a node, so that what acts on it (the pod-network hint, the
/// preflight, readers of the JSON report) need not read the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// No connection to the agent could be made.
    Connect,
    /// The agent refused the coordinator's credentials.
    Auth,
    /// The coordinator's own credentials could not be used, or not sent to this address.
    Credentials,
    /// The agent answered a call with an error.
    Agent,
    /// The agent gave no result in time.
    Timeout,
    /// A blob could not be delivered: the node dropped out mid-transfer and could not be
    /// reached again, or the attempts ran out.
    Delivery,
    /// The node lacks room for the load.
    NoSpace,
    /// The bundle's content or an image name is at fault.
    Bundle,
    /// Nothing was tried on the node: its agent pod is not ready, or its address was listed
    /// twice.
    Skipped,
}

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

    /// What kind of failure this is.
    pub fn kind(&self) -> FailureKind {
        match self {
            LoadError::Connect { .. } => FailureKind::Connect,
            LoadError::Agent { status, .. } => match status.code() {
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => FailureKind::Auth,
                _ => FailureKind::Agent,
            },
            LoadError::Credentials(_) => FailureKind::Credentials,
            LoadError::TimedOut { .. } => FailureKind::Timeout,
            LoadError::NoSpace { .. } => FailureKind::NoSpace,
            LoadError::Bundle(_) | LoadError::Layer(_) | LoadError::Reference(_) => {
                FailureKind::Bundle
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_tell_connect_errors_from_agent_errors() {
        let agent = "10.244.1.5:7700";
        let connect = LoadError::Connect {
            agent: agent.into(),
            reason: "transport error: tcp connect error: timed out".into(),
        };
        assert_eq!(connect.kind(), FailureKind::Connect);
        let call = |status| LoadError::agent_call(agent, "Info")(status).kind();
        assert_eq!(
            call(tonic::Status::unauthenticated("bad token")),
            FailureKind::Auth
        );
        assert_eq!(
            call(tonic::Status::permission_denied("no")),
            FailureKind::Auth
        );
        assert_eq!(
            call(tonic::Status::unavailable("going away")),
            FailureKind::Agent
        );
        let timed_out = LoadError::TimedOut {
            agent: agent.into(),
            limit: Duration::from_secs(5),
        };
        assert_eq!(timed_out.kind(), FailureKind::Timeout);
        assert_eq!(
            serde_json::to_value(FailureKind::NoSpace).unwrap(),
            "no_space"
        );
    }
}
