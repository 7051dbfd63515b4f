//! Discovery: the cluster's agent pods, turned into agent addresses.
//!
//! Owns asking the Kubernetes API for the pods of the lade chart's DaemonSet ([`discover`],
//! with the admin's kubeconfig or, inside a pod, its service account), the mapping from those
//! pods to one agent per node ([`agents_from_pods`]: pure, no I/O), and what a load through
//! discovered agents tells the admin that a load through `--agent` addresses does not: which
//! node an unready pod leaves out, and that pod IPs may not be reachable from where `lade`
//! runs ([`Discovery::complete`], [`pod_network_hint`]). It does not own connecting to agents
//! or loading ([`crate::load`]).
//!
//! Only pods a DaemonSet matching the selector controls (by owner UID) count as agents: anyone
//! who can create a pod with the chart's labels could otherwise have `lade` send it the
//! agents' token and the images. Other matching pods are named in a warning and ignored
//! ([`owned_by`]).
//!
//! A node whose agent pod is not ready is never skipped silently: it stays in the
//! [`Discovery`] as an [`UnreadyAgent`], and a load reports it as a failed node.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::ListParams;
use kube::config::{KubeConfigOptions, Kubeconfig, KubeconfigError};
use kube::{Api, Client, Config};
use serde::Serialize;

use crate::load::{error_chain, FailureKind, NodeReport};

/// Namespace the lade chart is installed in by default.
pub const DEFAULT_NAMESPACE: &str = "lade-system";
/// Label selecting the chart's agent pods (`app.kubernetes.io/name`, the chart's name).
pub const DEFAULT_SELECTOR: &str = "app.kubernetes.io/name=lade";
/// Name of the agent's gRPC container port in the chart's DaemonSet.
pub const PORT_NAME: &str = "grpc";
/// The chart's default gRPC port (`ports.grpc`), for a pod that names no `grpc` port.
pub const DEFAULT_PORT: u16 = 7700;

/// Why the agents could not be discovered. Nothing was loaded.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error(
        "--discover needs the Kubernetes API, and lade found no way to reach it: \
         kubeconfig {origin}: {kubeconfig}; and lade is not running in a pod ({in_cluster}). \
         Pass --kubeconfig FILE (and --kube-context NAME), or give the agents with --agent HOST:PORT"
    )]
    NoConfig {
        /// Where the kubeconfig was looked for: `$KUBECONFIG (…)` or `~/.kube/config`.
        origin: String,
        kubeconfig: KubeconfigError,
        in_cluster: kube::config::InClusterError,
    },
    #[error("--discover: kubeconfig {origin}: {problem}")]
    Kubeconfig {
        origin: String,
        problem: KubeconfigError,
    },
    #[error("--discover: cannot make a Kubernetes client for {server}: {reason}")]
    Client { server: String, reason: String },
    #[error(
        "--discover: listing the pods {selector} in namespace {namespace} through {server} failed: {reason}"
    )]
    List {
        namespace: String,
        selector: String,
        server: String,
        reason: String,
    },
    #[error(
        "--discover: no pod in namespace {namespace} matches {selector}; is the lade chart installed \
         there? (--discover-namespace, --selector)"
    )]
    NoPods { namespace: String, selector: String },
    #[error(
        "--discover: listing the DaemonSets {selector} in namespace {namespace} through {server} \
         failed (lade sends only to pods a DaemonSet of the chart controls): {reason}"
    )]
    ListDaemonSets {
        namespace: String,
        selector: String,
        server: String,
        reason: String,
    },
    #[error(
        "--discover: pods in namespace {namespace} match {selector}, but no DaemonSet matching it \
         controls any of them ({}); lade sends only to the chart's agent pods",
        .foreign.join(", ")
    )]
    NoOwnedPods {
        namespace: String,
        selector: String,
        foreign: Vec<String>,
    },
    #[error(
        "--node {}: no lade agent pod runs on {}; agent pods run on: {}",
        .missing.join(", "),
        if .missing.len() == 1 { "it" } else { "them" },
        if .known.is_empty() { "no node".to_string() } else { .known.join(", ") }
    )]
    UnknownNodes {
        missing: Vec<String>,
        known: Vec<String>,
    },
}

/// Where to look for the agents, and with which credentials.
#[derive(Clone, Debug)]
pub struct DiscoverOptions {
    pub namespace: String,
    /// Label selector of the agent pods.
    pub selector: String,
    /// Kubeconfig file; default `$KUBECONFIG` or `~/.kube/config`, then in-cluster.
    pub kubeconfig: Option<PathBuf>,
    /// Kubeconfig context; default the current one.
    pub context: Option<String>,
    /// Only the agents of these nodes (all when empty).
    pub nodes: Vec<String>,
}

/// A ready agent pod: the node it serves and the address `lade` connects to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DiscoveredAgent {
    pub node: String,
    pub pod: String,
    /// `podIP:port`; with `hostNetwork` the pod IP is the node's.
    pub address: String,
}

/// A node whose agent pod cannot take a load now, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UnreadyAgent {
    pub node: String,
    pub pod: String,
    /// What the pod is doing instead, e.g. `not ready: container agent is waiting
    /// (CrashLoopBackOff), restarted 7 times`.
    pub reason: String,
}

/// Every node the agent pods are on, each sorted by node name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Discovery {
    /// Nodes with a ready agent pod.
    pub agents: Vec<DiscoveredAgent>,
    /// Nodes whose agent pod is not ready: they get nothing, and count as failed.
    pub unready: Vec<UnreadyAgent>,
    /// Pods matching the selector that are bound to no node (and are not a DaemonSet's pod
    /// waiting for one): they stand for no node, so they are only mentioned.
    pub unbound: Vec<String>,
    /// Pods matching the selector that no DaemonSet matching it controls: not agents, so
    /// they get nothing and are only mentioned.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub foreign: Vec<String>,
}

/// Lists the agent pods through the Kubernetes API and maps them ([`agents_from_pods`]).
pub async fn discover(opts: &DiscoverOptions) -> Result<Discovery, DiscoverError> {
    let config = kube_config(opts).await?;
    let server = config.cluster_url.to_string();
    let client = Client::try_from(config).map_err(|e| DiscoverError::Client {
        server: server.clone(),
        reason: error_chain(&e),
    })?;
    let pods = Api::<Pod>::namespaced(client.clone(), &opts.namespace)
        .list(&ListParams::default().labels(&opts.selector))
        .await
        .map_err(|e| DiscoverError::List {
            namespace: opts.namespace.clone(),
            selector: opts.selector.clone(),
            server: server.clone(),
            reason: error_chain(&e),
        })?;
    if pods.items.is_empty() {
        return Err(DiscoverError::NoPods {
            namespace: opts.namespace.clone(),
            selector: opts.selector.clone(),
        });
    }
    let daemonsets = Api::<DaemonSet>::namespaced(client, &opts.namespace)
        .list(&ListParams::default().labels(&opts.selector))
        .await
        .map_err(|e| DiscoverError::ListDaemonSets {
            namespace: opts.namespace.clone(),
            selector: opts.selector.clone(),
            server,
            reason: error_chain(&e),
        })?;
    let owners: Vec<String> = daemonsets
        .items
        .iter()
        .filter_map(|d| d.metadata.uid.clone())
        .collect();
    let (owned, foreign) = owned_by(pods.items, &owners);
    if owned.is_empty() {
        return Err(DiscoverError::NoOwnedPods {
            namespace: opts.namespace.clone(),
            selector: opts.selector.clone(),
            foreign,
        });
    }
    let mut discovery = agents_from_pods(&owned, &opts.nodes)?;
    discovery.foreign = foreign;
    Ok(discovery)
}

/// Splits `pods` into those whose controller is a DaemonSet with one of the UIDs `owners`
/// and the names of the others.
pub fn owned_by(pods: Vec<Pod>, owners: &[String]) -> (Vec<Pod>, Vec<String>) {
    let (owned, foreign): (Vec<Pod>, Vec<Pod>) =
        pods.into_iter().partition(|pod| {
            pod.metadata.owner_references.iter().flatten().any(|o| {
                o.controller == Some(true) && o.kind == "DaemonSet" && owners.contains(&o.uid)
            })
        });
    let names = foreign
        .into_iter()
        .map(|p| p.metadata.name.unwrap_or_default())
        .collect();
    (owned, names)
}

/// The client configuration, as kubectl and helm find it: `--kubeconfig`, else `$KUBECONFIG`
/// or `~/.kube/config`, else (no kubeconfig and no `--kube-context`) the service account of
/// the pod lade runs in.
async fn kube_config(opts: &DiscoverOptions) -> Result<Config, DiscoverError> {
    let options = KubeConfigOptions {
        context: opts.context.clone(),
        ..Default::default()
    };
    if let Some(path) = &opts.kubeconfig {
        let origin = format!("--kubeconfig {}", path.display());
        let kubeconfig =
            Kubeconfig::read_from(path).map_err(|problem| DiscoverError::Kubeconfig {
                origin: origin.clone(),
                problem,
            })?;
        return Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .map_err(|problem| DiscoverError::Kubeconfig { origin, problem });
    }
    let origin = match std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) {
        Some(value) => format!("$KUBECONFIG ({})", value.to_string_lossy()),
        None => "~/.kube/config".to_string(),
    };
    match Config::from_kubeconfig(&options).await {
        Ok(config) => Ok(config),
        // A context names a kubeconfig's entry: there is nothing to fall back to.
        Err(problem) if opts.context.is_some() => {
            Err(DiscoverError::Kubeconfig { origin, problem })
        }
        Err(kubeconfig) => Config::incluster().map_err(|in_cluster| DiscoverError::NoConfig {
            origin,
            kubeconfig,
            in_cluster,
        }),
    }
}

/// One agent per node from the pods the API listed: the ready ones with their `podIP:port`
/// (the container port named `grpc`, else 7700), the others with why they cannot be used.
/// A ready pod is Running, its Ready condition is true, every container is ready, it has a
/// pod IP and it is not being deleted. When a node has several pods (during a rollout), the
/// ready one wins, then the newest. `nodes`, when not empty, keeps only those nodes and
/// fails if one of them has no agent pod at all.
pub fn agents_from_pods(pods: &[Pod], nodes: &[String]) -> Result<Discovery, DiscoverError> {
    let mut by_node: BTreeMap<String, Vec<Candidate>> = BTreeMap::new();
    let mut unbound = Vec::new();
    for pod in pods {
        let name = pod.metadata.name.clone().unwrap_or_default();
        match node_of(pod) {
            Some(node) => by_node.entry(node).or_default().push(Candidate {
                pod: name,
                usable: usable(pod),
                deleting: pod.metadata.deletion_timestamp.is_some(),
                created: pod.metadata.creation_timestamp.clone(),
            }),
            None => unbound.push(name),
        }
    }
    if !nodes.is_empty() {
        let mut missing: Vec<String> = nodes
            .iter()
            .filter(|n| !by_node.contains_key(*n))
            .cloned()
            .collect();
        if !missing.is_empty() {
            missing.sort();
            missing.dedup();
            return Err(DiscoverError::UnknownNodes {
                missing,
                known: by_node.keys().cloned().collect(),
            });
        }
        by_node.retain(|node, _| nodes.contains(node));
    }
    let mut discovery = Discovery {
        unbound,
        ..Default::default()
    };
    // BTreeMap: nodes come out sorted by name.
    for (node, candidates) in by_node {
        let others = candidates.len() - 1;
        let best = candidates
            .into_iter()
            .max_by(|a, b| a.rank().cmp(&b.rank()))
            .expect("a node is listed only with a pod");
        match best.usable {
            Ok(address) => discovery.agents.push(DiscoveredAgent {
                node,
                pod: best.pod,
                address,
            }),
            Err(mut reason) => {
                if others > 0 {
                    let plural = if others == 1 { "" } else { "s" };
                    reason.push_str(&format!(
                        " ({others} other agent pod{plural} on this node: a rollout may be under way)"
                    ));
                }
                discovery.unready.push(UnreadyAgent {
                    node,
                    pod: best.pod,
                    reason,
                });
            }
        }
    }
    Ok(discovery)
}

/// One pod on a node, as far as choosing between a node's pods goes.
struct Candidate {
    pod: String,
    /// The address, or why the pod cannot be used.
    usable: Result<String, String>,
    deleting: bool,
    created: Option<Time>,
}

impl Candidate {
    /// Higher is better: usable, then not being deleted, then newest.
    fn rank(&self) -> (bool, bool, Option<&Time>, &str) {
        (
            self.usable.is_ok(),
            !self.deleting,
            self.created.as_ref(),
            &self.pod,
        )
    }
}

/// The node a pod is on, or is meant for: `spec.nodeName`, else, for a DaemonSet pod not yet
/// scheduled, the node its required affinity names (`metadata.name In [node]`).
fn node_of(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    if let Some(node) = spec.node_name.as_ref().filter(|n| !n.is_empty()) {
        return Some(node.clone());
    }
    let terms = &spec
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms;
    terms
        .iter()
        .flat_map(|t| t.match_fields.iter().flatten())
        .find(|f| f.key == "metadata.name" && f.operator == "In")
        .and_then(|f| f.values.as_ref()?.first().cloned())
}

/// The pod's agent address, or why it cannot take a load.
fn usable(pod: &Pod) -> Result<String, String> {
    if pod.metadata.deletion_timestamp.is_some() {
        return Err("terminating (being deleted)".into());
    }
    let status = pod.status.clone().unwrap_or_default();
    let containers = status.container_statuses.unwrap_or_default();
    let condition = |kind: &str| status.conditions.iter().flatten().find(|c| c.type_ == kind);
    let phase = status.phase.as_deref().unwrap_or("Unknown");
    match phase {
        "Running" => {}
        "Pending" => {
            let why = container_problem(&containers).or_else(|| {
                condition("PodScheduled")
                    .filter(|c| c.status != "True")
                    .map(|c| condition_text("not scheduled", &c.reason, &c.message))
            });
            return Err(match why {
                Some(why) => format!("pending: {why}; no pod IP yet"),
                None => "pending; no pod IP yet".into(),
            });
        }
        other => {
            let what = format!("phase {other}");
            return Err(condition_text(&what, &status.reason, &status.message));
        }
    }
    let ready_condition = condition("Ready").is_some_and(|c| c.status == "True");
    let containers_ready = containers.iter().all(|c| c.ready);
    if !ready_condition || !containers_ready {
        let why = container_problem(&containers).unwrap_or_else(|| {
            match condition("Ready").filter(|c| c.status != "True") {
                Some(c) => condition_text("readiness", &c.reason, &c.message),
                None => "readiness probe failing".into(),
            }
        });
        return Err(format!("not ready: {why}"));
    }
    let ip = status
        .pod_ip
        .filter(|ip| !ip.is_empty())
        .ok_or("running and ready, but has no pod IP")?;
    let ip: IpAddr = ip
        .parse()
        .map_err(|_| format!("pod IP {ip:?} is not an IP address"))?;
    Ok(SocketAddr::new(ip, grpc_port(pod)).to_string())
}

/// The container port named `grpc` (the chart's `ports.grpc`), else the chart's default.
fn grpc_port(pod: &Pod) -> u16 {
    pod.spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(PORT_NAME))
        .and_then(|p| u16::try_from(p.container_port).ok())
        .unwrap_or(DEFAULT_PORT)
}

/// The first container that is not running or not ready, said as kubectl would show it.
fn container_problem(containers: &[ContainerStatus]) -> Option<String> {
    let c = containers.iter().find(|c| !c.ready)?;
    let state = c.state.as_ref();
    let mut text = if let Some(waiting) = state.and_then(|s| s.waiting.as_ref()) {
        let reason = waiting.reason.as_deref().unwrap_or("waiting");
        format!("container {} is waiting ({reason})", c.name)
    } else if let Some(done) = state.and_then(|s| s.terminated.as_ref()) {
        let reason = done.reason.as_deref().unwrap_or("terminated");
        format!(
            "container {} exited ({reason}, exit code {})",
            c.name, done.exit_code
        )
    } else {
        format!("container {} is running but not ready", c.name)
    };
    if c.restart_count > 0 {
        let plural = if c.restart_count == 1 { "" } else { "s" };
        text.push_str(&format!(", restarted {} time{plural}", c.restart_count));
    }
    Some(text)
}

/// `what (Reason: message)`, with whichever of reason and message is there.
fn condition_text(what: &str, reason: &Option<String>, message: &Option<String>) -> String {
    match (reason.as_deref(), message.as_deref()) {
        (Some(r), Some(m)) => format!("{what} ({r}: {m})"),
        (Some(t), None) | (None, Some(t)) => format!("{what} ({t})"),
        (None, None) => what.to_string(),
    }
}

impl Discovery {
    /// The addresses to load through, in node order.
    pub fn addresses(&self) -> Vec<String> {
        self.agents.iter().map(|a| a.address.clone()).collect()
    }

    /// What was found, one node a line, for stderr before anything is sent.
    pub fn to_text(&self, namespace: &str, selector: &str) -> String {
        let nodes = self.agents.len() + self.unready.len();
        let mut out = format!(
            "discovered {nodes} node{} with an agent pod in namespace {namespace} ({selector}):\n",
            if nodes == 1 { "" } else { "s" }
        );
        let mut rows: Vec<[&str; 3]> = self
            .agents
            .iter()
            .map(|a| [a.node.as_str(), a.address.as_str(), a.pod.as_str()])
            .chain(
                self.unready
                    .iter()
                    .map(|u| [u.node.as_str(), "NOT READY", u.pod.as_str()]),
            )
            .collect();
        rows.sort();
        let width = |i: usize| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0);
        let (node_w, address_w) = (width(0), width(1));
        for [node, address, pod] in &rows {
            let reason = self
                .unready
                .iter()
                .find(|u| u.pod == *pod)
                .map(|u| format!(": {}", u.reason))
                .unwrap_or_default();
            out.push_str(&format!(
                "  {node:<node_w$}  {address:<address_w$}  pod {pod}{reason}\n"
            ));
        }
        for pod in &self.unbound {
            out.push_str(&format!(
                "warning: pod {pod} matches {selector} but is bound to no node; ignored\n"
            ));
        }
        for pod in &self.foreign {
            out.push_str(&format!(
                "warning: pod {pod} matches {selector} but no DaemonSet of the chart controls it; \
                 ignored\n"
            ));
        }
        out
    }

    /// Completes the reports of a load through [`Self::addresses`]: names the node of every
    /// report (an agent that could not be reached never said it), says of each agent that
    /// could not be reached that its pod IP may not be routable from here, adds a failed
    /// report for every node whose agent pod is not ready, and sorts by node. Returns whether
    /// some agent could not be reached (then [`pod_network_hint`] is worth printing once).
    pub fn complete(&self, reports: &mut Vec<NodeReport>, images: usize) -> bool {
        let mut unreachable = false;
        for report in reports.iter_mut() {
            let Some(agent) = self.agents.iter().find(|a| a.address == report.agent) else {
                continue;
            };
            if report.node.is_empty() {
                report.node = agent.node.clone();
            }
            if let (Some(error), Some(FailureKind::Connect)) =
                (&mut report.error, report.error_kind)
            {
                unreachable = true;
                error.push_str(&format!(
                    " (the IP of pod {}: this machine may not reach the pod network; see below)",
                    agent.pod
                ));
            }
        }
        reports.extend(self.unready.iter().map(|u| NodeReport {
            agent: format!("pod/{}", u.pod),
            node: u.node.clone(),
            images,
            error: Some(format!(
                "agent pod {} is {}; nothing was loaded on this node",
                u.pod, u.reason
            )),
            error_kind: Some(FailureKind::Skipped),
            ..Default::default()
        }));
        reports.sort_by(|a, b| a.node.cmp(&b.node));
        unreachable
    }
}

/// What to do when the agents were found by pod IP and some could not be reached.
pub fn pod_network_hint(namespace: &str) -> String {
    format!(
        "note: --discover connects to the agents' pod IPs, and this machine could not reach some. \
         If it is outside the pod network, either:\n\
         \x20 - run lade where pod IPs are routable: on a cluster node, or in a pod or Job of the lade \
         image (it holds the lade CLI; the bundle on a volume, a service account that may list pods in \
         {namespace}, or --agent);\n\
         \x20 - install the chart with hostNetwork: true (helm upgrade ... --set hostNetwork=true), so the \
         agents listen on the node IPs;\n\
         \x20 - or forward one local port per agent, `kubectl -n {namespace} port-forward pod/POD \
         PORT:grpc` (the agent's port, by the name the chart gives it), and pass --agent 127.0.0.1:PORT for each instead of --discover (slower: \
         the bytes go through the API server).\n\
         If this machine is in the pod network, check that the chart's NetworkPolicy admits it \
         (networkPolicy.allowedCIDRs)."
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::LoadError;

    #[test]
    fn complete_names_nodes_marks_unreachable_and_adds_unready_nodes() {
        let discovery = Discovery {
            agents: vec![
                DiscoveredAgent {
                    node: "node-a".into(),
                    pod: "lade-aaaaa".into(),
                    address: "10.244.1.5:7700".into(),
                },
                DiscoveredAgent {
                    node: "node-c".into(),
                    pod: "lade-ccccc".into(),
                    address: "10.244.3.5:7700".into(),
                },
                DiscoveredAgent {
                    node: "node-d".into(),
                    pod: "lade-ddddd".into(),
                    address: "10.244.4.5:7700".into(),
                },
            ],
            unready: vec![UnreadyAgent {
                node: "node-b".into(),
                pod: "lade-bbbbb".into(),
                reason: "not ready: container agent is waiting (CrashLoopBackOff)".into(),
            }],
            unbound: vec![],
            foreign: vec![],
        };
        let mut reports = vec![NodeReport {
            agent: "10.244.1.5:7700".into(),
            node: "node-a".into(),
            images: 3,
            images_loaded: 3,
            ok: true,
            ..Default::default()
        }];
        let failed = |agent: &str, e: LoadError| {
            let mut report = NodeReport {
                agent: agent.into(),
                images: 3,
                ..Default::default()
            };
            report.fail_with(&e);
            report
        };
        let connect = LoadError::Connect {
            agent: "10.244.3.5:7700".into(),
            reason: "timed out".into(),
        };
        reports.push(failed("10.244.3.5:7700", connect));
        // Answered, so reached: no word of the pod network.
        let answered = LoadError::agent_call("10.244.4.5:7700", "Info")(
            tonic::Status::unauthenticated("wrong bearer token"),
        );
        reports.push(failed("10.244.4.5:7700", answered));
        assert!(discovery.complete(&mut reports, 3));
        let nodes: Vec<&str> = reports.iter().map(|r| r.node.as_str()).collect();
        assert_eq!(nodes, ["node-a", "node-b", "node-c", "node-d"]);
        assert!(reports[0].ok && reports[0].error.is_none());
        let unready = &reports[1];
        assert!(!unready.ok);
        assert_eq!(unready.agent, "pod/lade-bbbbb");
        assert_eq!(unready.images, 3);
        assert_eq!(unready.error_kind, Some(FailureKind::Skipped));
        assert_eq!(
            unready.error.as_deref(),
            Some(
                "agent pod lade-bbbbb is not ready: container agent is waiting (CrashLoopBackOff); \
                 nothing was loaded on this node"
            )
        );
        let error = reports[2].error.as_deref().unwrap();
        assert!(
            error.starts_with(
                "cannot reach agent 10.244.3.5:7700: timed out (the IP of pod lade-ccccc:"
            ),
            "{error}"
        );
        assert!(error.contains("may not reach the pod network"), "{error}");
        let answered = &reports[3];
        assert_eq!(answered.error_kind, Some(FailureKind::Auth));
        let error = answered.error.as_deref().unwrap();
        assert!(!error.contains("pod network"), "{error}");
    }

    #[test]
    fn unbound_and_evicted_pods_are_told_apart() {
        let pod = |value: serde_json::Value| -> Pod { serde_json::from_value(value).unwrap() };
        let pods = [
            // Matches the selector, bound to no node, and no DaemonSet's pod.
            pod(serde_json::json!({
                "metadata": {"name": "lade-debug", "creationTimestamp": "2025-06-02T09:12:44Z"},
                "spec": {"containers": [{"name": "shell", "image": "busybox"}]},
                "status": {"phase": "Pending"}
            })),
            pod(serde_json::json!({
                "metadata": {"name": "lade-evict", "creationTimestamp": "2025-06-02T09:12:44Z"},
                "spec": {"nodeName": "node-5", "containers": [{"name": "agent", "image": "lade"}]},
                "status": {
                    "phase": "Failed",
                    "reason": "Evicted",
                    "message": "The node was low on resource: memory."
                }
            })),
        ];
        let d = agents_from_pods(&pods, &[]).unwrap();
        assert!(d.agents.is_empty());
        assert_eq!(d.unbound, ["lade-debug"]);
        assert_eq!(
            d.unready,
            [UnreadyAgent {
                node: "node-5".into(),
                pod: "lade-evict".into(),
                reason: "phase Failed (Evicted: The node was low on resource: memory.)".into(),
            }]
        );
        let text = d.to_text("lade-system", "app.kubernetes.io/name=lade");
        assert!(
            text.ends_with(
                "warning: pod lade-debug matches app.kubernetes.io/name=lade but is bound to no node; ignored\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn hint_names_the_three_ways_out() {
        let hint = pod_network_hint("lade-system");
        assert!(hint.contains("on a cluster node"), "{hint}");
        assert!(hint.contains("--set hostNetwork=true"), "{hint}");
        assert!(
            hint.contains("kubectl -n lade-system port-forward pod/POD PORT:grpc"),
            "{hint}"
        );
        assert!(hint.contains("--agent 127.0.0.1:PORT"), "{hint}");
    }
}
