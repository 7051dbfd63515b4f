//! How a load shows itself to the admin while it runs: bars per node on a terminal, plain
//! lines otherwise. The summary at the end is [`crate::load::report`]'s. A push
//! ([`crate::push`]) shows its live progress the same way, the registry being its one
//! "node"; its summary is its own.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::load::report::NodeReport;

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
