//! `--discover`'s mapping from the agent pods to agent addresses, on answers of the Kubernetes
//! API written down in `tests/fixtures/pods-*.json` (what `kubectl get pods -n lade-system -l
//! app.kubernetes.io/name=lade -o json` prints, and one `PodList` as the API server itself
//! sends it). No API server runs here: listing the pods is not tested, only what lade makes of
//! them.

use std::path::Path;

use k8s_openapi::api::core::v1::Pod;
use kube::core::ObjectList;
use lade::discover::{agents_from_pods, owned_by, DiscoverError, DiscoveredAgent, Discovery};

fn pods(fixture: &str) -> Vec<Pod> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(fixture);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_json::from_str::<ObjectList<Pod>>(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .items
}

fn agent(node: &str, pod: &str, address: &str) -> DiscoveredAgent {
    DiscoveredAgent {
        node: node.into(),
        pod: pod.into(),
        address: address.into(),
    }
}

fn discovered(fixture: &str) -> Discovery {
    agents_from_pods(&pods(fixture), &[]).unwrap()
}

#[test]
fn three_ready_pods_are_three_agents_sorted_by_node() {
    let d = discovered("pods-ready.json");
    assert_eq!(
        d.agents,
        [
            agent("node-1", "lade-b9q4m", "10.244.1.23:7700"),
            agent("node-2", "lade-7xk2p", "10.244.2.17:7700"),
            agent("node-3", "lade-tz5wd", "10.244.3.9:7700"),
        ]
    );
    assert!(d.unready.is_empty() && d.unbound.is_empty(), "{d:?}");
    assert_eq!(
        d.addresses(),
        ["10.244.1.23:7700", "10.244.2.17:7700", "10.244.3.9:7700"]
    );
}

#[test]
fn a_crashlooping_pod_leaves_its_node_unready_with_the_reason() {
    let d = discovered("pods-crashloop.json");
    let nodes: Vec<&str> = d.agents.iter().map(|a| a.node.as_str()).collect();
    assert_eq!(nodes, ["node-1", "node-2"]);
    assert_eq!(d.unready.len(), 1, "{d:?}");
    let u = &d.unready[0];
    assert_eq!((u.node.as_str(), u.pod.as_str()), ("node-3", "lade-hw8rc"));
    assert_eq!(
        u.reason,
        "not ready: container agent is waiting (CrashLoopBackOff), restarted 7 times"
    );
    let text = d.to_text("lade-system", "app.kubernetes.io/name=lade");
    assert!(
        text.starts_with(
            "discovered 3 nodes with an agent pod in namespace lade-system (app.kubernetes.io/name=lade):\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("  node-2  10.244.2.17:7700  pod lade-7xk2p\n"),
        "{text}"
    );
    assert!(
        text.contains("  node-3  NOT READY         pod lade-hw8rc: not ready: container agent is waiting (CrashLoopBackOff)"),
        "{text}"
    );
}

#[test]
fn a_pending_pod_without_ip_is_unready_and_an_unscheduled_one_names_its_node() {
    let d = discovered("pods-pending.json");
    assert_eq!(
        d.agents,
        [agent("node-1", "lade-b9q4m", "10.244.1.23:7700")]
    );
    let unready: Vec<(&str, &str, &str)> = d
        .unready
        .iter()
        .map(|u| (u.node.as_str(), u.pod.as_str(), u.reason.as_str()))
        .collect();
    assert_eq!(
        unready,
        [
            (
                "node-2",
                "lade-q2v6n",
                "pending: container agent is waiting (ContainerCreating); no pod IP yet"
            ),
            // No nodeName yet: the DaemonSet's node affinity says which node it is for.
            (
                "node-4",
                "lade-m4j8s",
                "pending: not scheduled (Unschedulable: 0/4 nodes are available: 1 Insufficient memory. \
                 preemption: 0/4 nodes are available: 1 No preemption victims found for incoming pod, \
                 3 Preemption is not helpful for scheduling.); no pod IP yet"
            ),
        ]
    );
}

#[test]
fn during_a_rollout_each_node_keeps_its_ready_newest_pod() {
    let d = discovered("pods-rollout.json");
    assert_eq!(
        d.agents,
        [
            // The old pod is being deleted: the new, ready one.
            agent("node-1", "lade-x5f7t", "10.244.1.31:7700"),
            // The new pod is still being created: the old, ready one.
            agent("node-2", "lade-7xk2p", "10.244.2.17:7700"),
            // Both ready: the newest.
            agent("node-3", "lade-c6n2w", "10.244.3.14:7700"),
        ]
    );
    assert_eq!(d.unready.len(), 1, "{d:?}");
    let u = &d.unready[0];
    // The old pod is going and the new one cannot pull its image: the new one's reason.
    assert_eq!((u.node.as_str(), u.pod.as_str()), ("node-4", "lade-k7v2b"));
    assert_eq!(
        u.reason,
        "pending: container agent is waiting (ImagePullBackOff); no pod IP yet \
         (1 other agent pod on this node: a rollout may be under way)"
    );
}

#[test]
fn node_filter_keeps_the_named_nodes_and_refuses_unknown_ones() {
    let pods = pods("pods-ready.json");
    let d = agents_from_pods(&pods, &["node-3".into(), "node-1".into()]).unwrap();
    assert_eq!(
        d.agents,
        [
            agent("node-1", "lade-b9q4m", "10.244.1.23:7700"),
            agent("node-3", "lade-tz5wd", "10.244.3.9:7700"),
        ]
    );

    let err = agents_from_pods(&pods, &["node-1".into(), "node-9".into()]).unwrap_err();
    assert!(
        matches!(&err, DiscoverError::UnknownNodes { missing, .. } if missing == &["node-9"]),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "--node node-9: no lade agent pod runs on it; agent pods run on: node-1, node-2, node-3"
    );

    // A node whose agent is not ready is known: it is kept, as unready.
    let d = agents_from_pods(&crate::pods("pods-crashloop.json"), &["node-3".into()]).unwrap();
    assert!(d.agents.is_empty(), "{d:?}");
    assert_eq!(d.unready[0].node, "node-3");
}

#[test]
fn the_port_is_the_one_named_grpc_and_ipv6_addresses_get_brackets() {
    // An API server's own PodList: items without apiVersion and kind.
    let d = discovered("pods-custom-port.json");
    assert_eq!(
        d.agents,
        [
            agent("node-1", "lade-b9q4m", "10.244.1.23:17700"),
            agent("node-2", "lade-7xk2p", "[fd00:10:244:2::11]:17700"),
            // No port named grpc (7800 is named "agent"): the chart's default.
            agent("node-3", "lade-tz5wd", "10.244.3.9:7700"),
        ]
    );
}

/// The chart's DaemonSet in the fixtures (every fixture pod's controller).
const CHART_DAEMONSET: &str = "0b7f3c52-8d1e-4a53-9f0e-2c4b6f1d9a10";

#[test]
fn only_pods_the_charts_daemonset_controls_are_agents() {
    let mut listed = pods("pods-ready.json");
    let ready = listed.len();
    // Someone who may create pods copies a ready agent pod, labels and all, minus the owner.
    let mut impostor = listed[0].clone();
    impostor.metadata.name = Some("lade-impostor".into());
    impostor.metadata.owner_references = None;
    listed.push(impostor.clone());
    // Or names a DaemonSet of its own as controller.
    let mut other = listed[0].clone();
    other.metadata.name = Some("lade-other-ds".into());
    for o in other.metadata.owner_references.iter_mut().flatten() {
        o.uid = "6f1c2d9e-0000-4000-8000-000000000000".into();
    }
    listed.push(other);

    let (owned, foreign) = owned_by(listed.clone(), &[CHART_DAEMONSET.into()]);
    assert_eq!(owned.len(), ready);
    assert_eq!(foreign, ["lade-impostor", "lade-other-ds"]);
    let d = agents_from_pods(&owned, &[]).unwrap();
    assert!(d
        .agents
        .iter()
        .all(|a| !a.pod.contains("impostor") && !a.pod.contains("other")));

    // No DaemonSet matching the selector: nothing is an agent.
    let (owned, foreign) = owned_by(listed, &[]);
    assert!(owned.is_empty());
    assert_eq!(foreign.len(), ready + 2);
}
