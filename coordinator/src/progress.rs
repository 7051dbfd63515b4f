//! How a load shows itself to the admin: live progress while it runs (bars per node on a
//! terminal, plain lines otherwise) and the per-node summary at the end (a table, or JSON).
//! A push ([`crate::push`]) shows its live progress the same way, the registry being its one
//! "node"; its summary is its own.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::load::NodeReport;

/// Receives a load's (or a push's) progress. Called concurrently from every node's task.
pub trait Progress: Send + Sync {
    fn node_started(&self, agent: &str);
    fn node_identified(&self, agent: &str, node: &str);
    /// `bytes` will be sent; `skipped` bytes the node already holds.
    fn sending(&self, agent: &str, bytes: u64, skipped: u64);
    fn sent(&self, agent: &str, bytes: u64);
    fn phase(&self, agent: &str, phase: &str);
    fn node_finished(&self, report: &NodeReport);
}

/// One progress bar per node: bytes, rate and ETA.
pub struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<String, ProgressBar>>,
}

impl Bars {
    pub fn new() -> Bars {
        Bars {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            bars: Mutex::new(HashMap::new()),
        }
    }

    fn bar(&self, agent: &str) -> ProgressBar {
        let mut bars = self.bars.lock().expect("progress lock");
        bars.entry(agent.to_string())
            .or_insert_with(|| {
                // A spinner until the node says how much it lacks; then a byte bar.
                let bar = self.multi.add(ProgressBar::new_spinner());
                bar.set_style(
                    ProgressStyle::with_template("{prefix:<32} {spinner} {msg}")
                        .expect("valid template"),
                );
                bar.set_prefix(agent.to_string());
                bar.enable_steady_tick(Duration::from_millis(200));
                bar
            })
            .clone()
    }
}

impl Default for Bars {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress for Bars {
    fn node_started(&self, agent: &str) {
        self.bar(agent).set_message("connecting");
    }
    fn node_identified(&self, agent: &str, node: &str) {
        self.bar(agent).set_prefix(format!("{node} ({agent})"));
    }
    fn sending(&self, agent: &str, bytes: u64, skipped: u64) {
        let bar = self.bar(agent);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:<32} [{bar:30}] {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12} eta {eta:>4} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_length(bytes);
        bar.set_message(format!("sending ({} already there)", HumanBytes(skipped)));
    }
    fn sent(&self, agent: &str, bytes: u64) {
        self.bar(agent).inc(bytes);
    }
    fn phase(&self, agent: &str, phase: &str) {
        self.bar(agent).set_message(phase.to_string());
    }
    fn node_finished(&self, report: &NodeReport) {
        let bar = self.bar(&report.agent);
        let msg = if report.ok {
            "done".to_string()
        } else {
            "FAILED".to_string()
        };
        bar.finish_with_message(msg);
    }
}

/// Plain lines on stderr, for logs and pipes: one per phase and per 25% of bytes.
#[derive(Default)]
pub struct Lines {
    state: Mutex<HashMap<String, (u64, u64, u8)>>,
}

impl Lines {
    fn line(&self, agent: &str, text: &str) {
        let _ = writeln!(std::io::stderr(), "[{agent}] {text}");
    }
}

impl Progress for Lines {
    fn node_started(&self, agent: &str) {
        self.line(agent, "connecting");
    }
    fn node_identified(&self, agent: &str, node: &str) {
        self.line(agent, &format!("node {node}"));
    }
    fn sending(&self, agent: &str, bytes: u64, skipped: u64) {
        self.state
            .lock()
            .expect("progress lock")
            .insert(agent.to_string(), (bytes, 0, 0));
        self.line(
            agent,
            &format!(
                "sending {} ({} already there)",
                HumanBytes(bytes),
                HumanBytes(skipped)
            ),
        );
    }
    fn sent(&self, agent: &str, bytes: u64) {
        let quarter = {
            let mut state = self.state.lock().expect("progress lock");
            let Some((total, done, shown)) = state.get_mut(agent) else {
                return;
            };
            *done += bytes;
            let q = (*done * 4).checked_div(*total).unwrap_or(4).min(4) as u8;
            (q > *shown).then(|| {
                *shown = q;
                (*done, *total)
            })
        };
        if let Some((done, total)) = quarter {
            self.line(
                agent,
                &format!("sent {} of {}", HumanBytes(done), HumanBytes(total)),
            );
        }
    }
    fn phase(&self, agent: &str, phase: &str) {
        self.line(agent, phase);
    }
    fn node_finished(&self, report: &NodeReport) {
        let result = if report.ok { "done" } else { "FAILED" };
        self.line(&report.agent, result);
    }
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
        let who = if r.node.is_empty() {
            r.agent.clone()
        } else {
            format!("{} ({})", r.node, r.agent)
        };
        if let Some(e) = &r.error {
            out.push_str(&format!("\n{who}: {e}"));
        }
        for f in &r.failed_images {
            out.push_str(&format!("\n{who}: image {}: {}", f.image, f.reason));
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::FailedImage;

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
