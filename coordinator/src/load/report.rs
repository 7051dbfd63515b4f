//! What a load tells about each node: its [`NodeReport`] (filled in by either delivery), and
//! the summary at the end, as a table or as JSON.

use indicatif::HumanBytes;
use lade_proto::{ImportEvent, ImportPhase};
use serde::Serialize;

use super::error::{FailureKind, LoadError};

/// What happened on one node.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NodeReport {
    pub agent: String,
    /// Node name the agent reported (empty if it could not be reached).
    pub node: String,
    pub runtime: String,
    /// The node's platform, as its agent reports it.
    pub platform: String,
    /// Loaded images are pinned against kubelet's image garbage collection.
    pub images_pinned: bool,
    pub images: usize,
    pub images_loaded: usize,
    pub blobs_sent: usize,
    pub bytes_sent: u64,
    pub blobs_skipped: usize,
    /// Bytes the node already had (whole blobs, plus resumed prefixes of partial uploads).
    pub bytes_skipped: u64,
    pub seconds: f64,
    pub ok: bool,
    /// Attempts it took (more than 1 after transient failures).
    pub attempts: u32,
    /// Why the node failed as a whole, if it did.
    pub error: Option<String>,
    /// What kind of failure that was.
    pub error_kind: Option<FailureKind>,
    /// Where the blobs it stored came from: `coordinator`, or the node that relayed them
    /// (several after a relay node failed and it was re-parented).
    pub via: Vec<String>,
    /// Bytes the coordinator itself sent to this node (with relay, the root of the tree gets
    /// them all, including what it only passes on).
    pub bytes_from_coordinator: u64,
    /// Images that failed on this node, with the reason.
    pub failed_images: Vec<FailedImage>,
    /// Images named on this node: the digest their names point at there (what a pod pinned
    /// by digest needs) and every name, digest references included.
    pub loaded_images: Vec<LoadedImage>,
    /// What loaded but deserves a look: images whose only manifest is for another platform,
    /// an agent that keeps no bundle records.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The node holds a record of this load (bundle, version, images; see
    /// [`super::record`]), which `lade status`, `prune` and `unload` read.
    pub recorded: bool,
    /// Why the record could not be made on a node that loaded every image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record_error: Option<String>,
}

impl NodeReport {
    /// Records that the node failed as a whole: `reason`, of `kind`. The first failure
    /// recorded stands.
    pub(crate) fn fail(&mut self, kind: FailureKind, reason: String) {
        if self.error.is_none() {
            self.error = Some(reason);
            self.error_kind = Some(kind);
        }
    }

    /// Records that the node failed as a whole with `e`.
    pub(crate) fn fail_with(&mut self, e: &LoadError) {
        self.fail(e.kind(), e.to_string());
    }

    /// Settles the outcome once the node is done: ok when neither the node nor any of its
    /// images failed.
    pub(crate) fn settle(&mut self) {
        self.ok = self.error.is_none() && self.failed_images.is_empty();
    }

    /// Counts the images an Import's `events` say were named, and records the failed ones.
    pub(crate) fn count_imports(&mut self, events: Vec<ImportEvent>) {
        for event in events {
            match ImportPhase::try_from(event.phase) {
                Ok(ImportPhase::ImageDone) => {
                    self.images_loaded += 1;
                    self.loaded_images.push(LoadedImage {
                        image: event.image,
                        digest: event.digest,
                        names: event.names,
                    });
                }
                Ok(ImportPhase::ImageFailed) => self.failed_images.push(FailedImage {
                    image: event.image,
                    reason: event.message,
                }),
                _ => {}
            }
        }
    }
}

/// One image named on a node.
#[derive(Clone, Debug, Serialize)]
pub struct LoadedImage {
    /// How the bundle names it.
    pub image: String,
    /// The manifest or index digest its names point at (Docker graph driver: the image ID).
    pub digest: String,
    pub names: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FailedImage {
    pub image: String,
    pub reason: String,
}

/// How the summary says which flags retry only the failed nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// `--agent ADDRESS` for each failed node.
    ByAgent,
    /// `--discover --node NAME` for each failed node: the agents were discovered, and a
    /// restarted pod comes back with a new IP.
    ByNode,
}

/// The summary table: one row per node, then the reasons of every failure and the flags that
/// retry only the failed nodes.
pub fn summary_table(reports: &[NodeReport], retry: Retry) -> String {
    let mut out = String::new();
    let rows: Vec<[String; 8]> = reports
        .iter()
        .map(|r| {
            [
                if r.node.is_empty() {
                    "?".into()
                } else {
                    r.node.clone()
                },
                r.agent.clone(),
                format!("{}/{}", r.images_loaded, r.images),
                format!("{} ({} blobs)", HumanBytes(r.bytes_sent), r.blobs_sent),
                format!(
                    "{} ({} blobs)",
                    HumanBytes(r.bytes_skipped),
                    r.blobs_skipped
                ),
                if r.via.is_empty() {
                    "-".into()
                } else {
                    r.via.join(", ")
                },
                format!("{:.1}s", r.seconds),
                if r.ok { "ok".into() } else { "FAILED".into() },
            ]
        })
        .collect();
    let header = [
        "NODE",
        "AGENT",
        "IMAGES",
        "SENT",
        "ALREADY THERE",
        "VIA",
        "TIME",
        "RESULT",
    ];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let fmt_row = |cells: &[String]| {
        cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    out.push_str(&fmt_row(&header.map(String::from)));
    out.push('\n');
    for row in &rows {
        out.push_str(&fmt_row(row));
        out.push('\n');
    }
    let sent: u64 = reports.iter().map(|r| r.bytes_sent).sum();
    let skipped: u64 = reports.iter().map(|r| r.bytes_skipped).sum();
    if sent == 0 && reports.iter().all(|r| r.ok) {
        out.push_str(&format!(
            "\nnothing sent: every node already held every blob ({} in all)\n",
            HumanBytes(skipped)
        ));
    } else {
        out.push_str(&format!(
            "\nsent {} in all; {} was already on the nodes\n",
            HumanBytes(sent),
            HumanBytes(skipped)
        ));
    }
    let from_here: u64 = reports.iter().map(|r| r.bytes_from_coordinator).sum();
    if from_here != sent {
        out.push_str(&format!(
            "relay: {} left the coordinator; the agents passed the rest on to each other\n",
            HumanBytes(from_here)
        ));
    }
    let unpinned: Vec<&str> = reports
        .iter()
        .filter(|r| r.ok && !r.images_pinned && r.runtime.starts_with("containerd"))
        .map(|r| r.node.as_str())
        .collect();
    if !unpinned.is_empty() {
        out.push_str(&format!(
            "note: images on {} are not pinned (the CRI pin label needs containerd 1.7.3 or later): \
             kubelet's image garbage collection may delete them under disk pressure\n",
            unpinned.join(", ")
        ));
    }
    for r in reports {
        for w in &r.warnings {
            out.push_str(&format!("warning: {}: {w}\n", r.node));
        }
    }
    for r in reports.iter().filter(|r| !r.ok) {
        let who = who(r);
        if let Some(e) = &r.error {
            out.push_str(&format!("\n{who}: {e}"));
        }
        for f in &r.failed_images {
            out.push_str(&format!("\n{who}: image {}: {}", f.image, f.reason));
        }
    }
    let unrecorded: Vec<&NodeReport> = reports
        .iter()
        .filter(|r| r.record_error.is_some())
        .collect();
    for r in &unrecorded {
        let e = r.record_error.as_deref().unwrap_or_default();
        out.push_str(&format!("\n{}: {e}", who(r)));
    }
    if !unrecorded.is_empty() {
        out.push_str(&format!(
            "\n{} of {} nodes hold the images but no record of the load (lade status, prune \
             and unload will not see it there); load the bundle again onto them to record it\n",
            unrecorded.len(),
            reports.len()
        ));
    }
    let failed: Vec<String> = reports
        .iter()
        .filter(|r| !r.ok)
        .map(|r| match retry {
            Retry::ByAgent => format!("--agent {}", r.agent),
            Retry::ByNode => format!("--node {}", r.node),
        })
        .collect();
    if !failed.is_empty() {
        let discover = if retry == Retry::ByNode {
            "--discover "
        } else {
            ""
        };
        out.push_str(&format!(
            "\n\n{} of {} nodes failed; re-run with only those to retry (what they already hold is not sent again): {discover}{}\n",
            failed.len(),
            reports.len(),
            failed.join(" ")
        ));
    }
    out
}

/// A node in the summary's messages: its name and agent, or only the agent.
fn who(r: &NodeReport) -> String {
    if r.node.is_empty() {
        r.agent.clone()
    } else {
        format!("{} ({})", r.node, r.agent)
    }
}

/// Whether every node that loaded every image also holds the load's record (a node whose
/// agent keeps no records aside): the load's exit is non-zero otherwise.
pub fn all_recorded(reports: &[NodeReport]) -> bool {
    reports.iter().all(|r| r.record_error.is_none())
}

/// The summary as JSON: the reports, one object per node.
pub fn summary_json(reports: &[NodeReport]) -> serde_json::Result<String> {
    serde_json::to_string_pretty(reports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_failed_nodes_and_reasons() {
        let ok = NodeReport {
            agent: "10.0.0.1:7700".into(),
            node: "node-a".into(),
            images: 3,
            images_loaded: 3,
            ok: true,
            ..Default::default()
        };
        let down = NodeReport {
            agent: "10.0.0.2:7700".into(),
            images: 3,
            error: Some("cannot reach agent 10.0.0.2:7700: connection refused".into()),
            ..Default::default()
        };
        let partial = NodeReport {
            agent: "10.0.0.3:7700".into(),
            node: "node-c".into(),
            images: 3,
            images_loaded: 2,
            failed_images: vec![FailedImage {
                image: "busybox".into(),
                reason: "layer diffID mismatch".into(),
            }],
            ..Default::default()
        };
        let table = summary_table(&[ok.clone(), down.clone(), partial.clone()], Retry::ByAgent);
        assert!(table.starts_with("NODE"), "{table}");
        assert!(table.contains("node-a") && table.contains("ok"), "{table}");
        assert!(table.contains("connection refused"), "{table}");
        assert!(
            table.contains("node-c (10.0.0.3:7700): image busybox: layer diffID mismatch"),
            "{table}"
        );
        assert!(table.contains("2 of 3 nodes failed"), "{table}");
        assert!(
            table.contains("--agent 10.0.0.2:7700 --agent 10.0.0.3:7700"),
            "{table}"
        );

        let down = NodeReport {
            node: "node-b".into(),
            ..down
        };
        let table = summary_table(&[ok, down, partial], Retry::ByNode);
        assert!(
            table.contains("re-run with only those to retry (what they already hold is not sent again): --discover --node node-b --node node-c\n"),
            "{table}"
        );
    }

    #[test]
    fn table_names_nodes_that_hold_no_record_of_the_load() {
        let recorded = NodeReport {
            agent: "10.0.0.1:7700".into(),
            node: "node-a".into(),
            ok: true,
            recorded: true,
            ..Default::default()
        };
        let unrecorded = NodeReport {
            agent: "10.0.0.2:7700".into(),
            node: "node-b".into(),
            ok: true,
            record_error: Some("the record of the load is missing: disk full".into()),
            ..Default::default()
        };
        let table = summary_table(&[recorded.clone(), unrecorded.clone()], Retry::ByAgent);
        assert!(
            table.contains("node-b (10.0.0.2:7700): the record of the load is missing: disk full"),
            "{table}"
        );
        assert!(
            table.contains("1 of 2 nodes hold the images but no record"),
            "{table}"
        );
        assert!(!all_recorded(&[recorded.clone(), unrecorded]));
        assert!(all_recorded(&[recorded]));
    }

    #[test]
    fn table_says_which_path_each_node_took() {
        let root = NodeReport {
            agent: "10.0.0.1:7700".into(),
            node: "node-a".into(),
            bytes_sent: 100,
            bytes_from_coordinator: 100,
            via: vec!["coordinator".into()],
            ok: true,
            ..Default::default()
        };
        let moved = NodeReport {
            agent: "10.0.0.3:7700".into(),
            node: "node-c".into(),
            bytes_sent: 100,
            via: vec!["node-b".into(), "coordinator".into()],
            ok: true,
            ..Default::default()
        };
        let table = summary_table(&[root, moved], Retry::ByAgent);
        assert!(table.lines().next().unwrap().contains("VIA"), "{table}");
        assert!(table.contains("node-b, coordinator"), "{table}");
        assert!(
            table.contains("relay: 100 B left the coordinator; the agents passed the rest on"),
            "{table}"
        );
    }

    #[test]
    fn table_says_when_nothing_was_sent() {
        let again = NodeReport {
            agent: "10.0.0.1:7700".into(),
            node: "node-a".into(),
            bytes_skipped: 3 << 20,
            ok: true,
            ..Default::default()
        };
        let table = summary_table(&[again], Retry::ByAgent);
        assert!(
            table.contains("nothing sent: every node already held every blob (3.00 MiB in all)"),
            "{table}"
        );
    }

    #[test]
    fn table_says_which_nodes_cannot_pin_images() {
        let old = NodeReport {
            agent: "10.0.0.1:7700".into(),
            node: "node-old".into(),
            runtime: "containerd 1.6.20".into(),
            ok: true,
            ..Default::default()
        };
        let new = NodeReport {
            agent: "10.0.0.2:7700".into(),
            node: "node-new".into(),
            runtime: "containerd 1.7.13".into(),
            images_pinned: true,
            ok: true,
            ..Default::default()
        };
        let table = summary_table(&[old, new], Retry::ByAgent);
        assert!(
            table.contains("note: images on node-old are not pinned"),
            "{table}"
        );
        assert!(!table.contains("node-new are not pinned"), "{table}");
    }
}
