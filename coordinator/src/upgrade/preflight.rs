//! The preflight: before helm runs, prove that every image the chart will pull is on every
//! node, as kubelet would find it, or, where the cluster pulls from a registry (`lade push`),
//! that the registry holds it.
//!
//! This module owns deriving the images (rendering `hints.yaml` against the values tree helm
//! will compute, and normalising each result as the CRI plugin does), asking every agent
//! (`Info`, then `Verify` with all the references) or the registry (a manifest `HEAD` per
//! reference), and the reference × node table. It does not own computing the values tree
//! ([`super::values`]) or what happens after a verdict.

use std::collections::HashMap;
use std::fmt::Write as _;

use futures::StreamExt;
use lade_proto::{InfoRequest, RefStatus, VerifyRequest};
use serde_yaml::Value;
use tracing::instrument;

use super::UpgradeError;
use crate::hints::Hints;
use crate::load::{connect, Dial, FailureKind, LoadError};
use crate::push::registry::{Access, Registry};
use crate::reference::Reference;

/// Renders every template of `hints` against `values` and normalises the results, in order
/// and without repeats. Every template that cannot be rendered, or renders to something that
/// is not an image reference, is reported, not only the first.
pub fn derive_images(hints: &Hints, values: &Value) -> Result<Vec<String>, UpgradeError> {
    let mut images = Vec::new();
    let mut problems = Vec::new();
    for template in &hints.templates {
        match template.render(values) {
            Ok(text) => match Reference::parse(&text) {
                Ok(reference) => {
                    let reference = reference.cri_name();
                    if !images.contains(&reference) {
                        images.push(reference);
                    }
                }
                Err(e) => problems.push(format!("template {:?}: {e}", template.text())),
            },
            Err(e) => problems.push(e.to_string()),
        }
    }
    if problems.is_empty() {
        Ok(images)
    } else {
        Err(UpgradeError::PreflightHints { problems })
    }
}

/// What one agent answered.
#[derive(Debug)]
pub struct NodeAnswer {
    pub agent: String,
    /// Node name the agent reported; empty when it could not be reached.
    pub node: String,
    /// The agent pins the images it loads (Info), so an unpinned one is worth reporting.
    pub pins: bool,
    /// Status per reference, or why the agent could not answer.
    pub result: Result<HashMap<String, RefStatus>, LoadError>,
}

impl NodeAnswer {
    fn label(&self) -> String {
        if self.node.is_empty() {
            self.agent.clone()
        } else {
            format!("{} ({})", self.node, self.agent)
        }
    }

    fn has(&self, image: &str) -> bool {
        matches!(&self.result, Ok(found) if found.get(image).is_some_and(|s| s.ok))
    }
}

/// The preflight's findings: every image against every node.
#[derive(Debug)]
pub struct Report {
    pub images: Vec<String>,
    pub nodes: Vec<NodeAnswer>,
    pub checked: Checked,
}

/// Where the preflight looked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Checked {
    /// The nodes, through their agents (found with `--discover`, or given with `--agent`).
    Nodes { discovered: bool },
    /// The registry of `--image-registry` (the value given): no agent was asked.
    Registry(String),
}

/// Connects to the registry of `image_registry` (`HOST[:PORT][/PROJECT]`) for
/// [`check_registry`]; when it cannot be reached or refuses the login, the preflight cannot
/// run, and says why.
pub async fn connect_registry(
    image_registry: &str,
    access: &Access,
) -> Result<Registry, UpgradeError> {
    let host = image_registry.split('/').next().unwrap_or(image_registry);
    Registry::connect(host, access)
        .await
        .map_err(|e| UpgradeError::PreflightCannotCheck {
            reason: format!(
                "no --agent was given, and the registry of --image-registry {image_registry} cannot be checked: {e}"
            ),
        })
}

/// Asks `registry` whether it holds each image: a manifest `HEAD` by tag (or digest). An
/// image named on another host is missing, since the chart would pull it from there.
pub async fn check_registry(images: &[String], registry: &Registry) -> Report {
    let mut found = HashMap::new();
    for image in images {
        let status = |ok: bool, problem: String| RefStatus {
            r#ref: image.clone(),
            ok,
            problem,
            ..Default::default()
        };
        let answer = match Reference::parse(image) {
            Err(e) => status(false, e.to_string()),
            Ok(r) if !r.domain().eq_ignore_ascii_case(registry.host()) => status(
                false,
                format!(
                    "the chart would pull it from {}, not from {}",
                    r.domain(),
                    registry.host()
                ),
            ),
            Ok(r) => {
                let reference = r.digest().or(r.tag()).expect("a tag or a digest");
                match registry.manifest_digest(r.path(), reference).await {
                    Ok(Some(_)) => status(true, String::new()),
                    Ok(None) => status(false, "no such manifest in the registry".into()),
                    Err(e) => status(false, e.to_string()),
                }
            }
        };
        found.insert(image.clone(), answer);
    }
    Report {
        images: images.to_vec(),
        nodes: vec![NodeAnswer {
            agent: format!("registry {}", registry.host()),
            node: registry.host().to_string(),
            pins: false,
            result: Ok(found),
        }],
        checked: Checked::Registry(registry.host().to_string()),
    }
}

/// Asks every agent, `parallel` at a time, about every image.
pub async fn check(
    images: &[String],
    agents: &[String],
    dial: &Dial,
    parallel: usize,
    discovered: bool,
) -> Report {
    let mut nodes: Vec<(usize, NodeAnswer)> = futures::stream::iter(agents.iter().enumerate())
        .map(|(i, agent)| async move { (i, ask(agent, images, dial).await) })
        .buffer_unordered(parallel.max(1))
        .collect()
        .await;
    nodes.sort_by_key(|(i, _)| *i);
    Report {
        images: images.to_vec(),
        nodes: nodes.into_iter().map(|(_, n)| n).collect(),
        checked: Checked::Nodes { discovered },
    }
}

#[instrument(skip_all, fields(agent = %agent))]
async fn ask(agent: &str, images: &[String], dial: &Dial) -> NodeAnswer {
    let mut answer = NodeAnswer {
        agent: agent.to_string(),
        node: String::new(),
        pins: false,
        result: Ok(HashMap::new()),
    };
    let mut client = match connect(agent, dial).await {
        Ok(client) => client,
        Err(e) => {
            answer.result = Err(e);
            return answer;
        }
    };
    match client.info(InfoRequest {}).await {
        Ok(info) => {
            let info = info.into_inner();
            answer.node = info.node_name;
            answer.pins = info.images_pinned;
        }
        Err(status) => {
            answer.result = Err(LoadError::agent_call(agent, "Info")(status));
            return answer;
        }
    }
    answer.result = client
        .verify(VerifyRequest {
            refs: images.to_vec(),
        })
        .await
        .map(|r| {
            r.into_inner()
                .refs
                .into_iter()
                .map(|s| (s.r#ref.clone(), s))
                .collect()
        })
        .map_err(LoadError::agent_call(agent, "Verify"));
    answer
}

impl Report {
    /// Whether some agent could not be connected to at all.
    pub fn unreachable(&self) -> bool {
        self.nodes
            .iter()
            .any(|n| matches!(&n.result, Err(e) if e.kind() == FailureKind::Connect))
    }

    /// Why the upgrade must not start, or `None` when every node holds every image.
    pub fn failure(&self) -> Option<String> {
        let missing = self
            .images
            .iter()
            .filter(|i| self.nodes.iter().any(|n| !n.has(i)))
            .count();
        let failing: Vec<&NodeAnswer> = self
            .nodes
            .iter()
            .filter(|n| self.images.iter().any(|i| !n.has(i)))
            .collect();
        if failing.is_empty() {
            return None;
        }
        if let Checked::Registry(host) = &self.checked {
            return Some(format!(
                "{missing} of {} not in registry {host}; push the bundle there (lade push BUNDLE \
                 --registry {host}/PROJECT) or fix the values",
                count(self.images.len(), "image"),
            ));
        }
        // Named as this run found them: with --discover by node name, unless a node never
        // said its name (then by agent address: --discover and --agent do not mix).
        let by_name = matches!(self.checked, Checked::Nodes { discovered: true })
            && failing.iter().all(|n| !n.node.is_empty());
        let retry: Vec<String> = if by_name {
            std::iter::once("--discover".to_string())
                .chain(failing.iter().map(|n| format!("--node {}", n.node)))
                .collect()
        } else {
            failing
                .iter()
                .map(|n| format!("--agent {}", n.agent))
                .collect()
        };
        Some(format!(
            "{missing} of {} not on {} of {}; load the bundle onto them (lade load BUNDLE {}) \
             or fix the values",
            count(self.images.len(), "image"),
            failing.len(),
            count(self.nodes.len(), "node"),
            retry.join(" ")
        ))
    }

    /// The table (image × node: `ok`, `MISSING`, or `?` for a node that did not answer),
    /// then every problem, then the verdict.
    pub fn to_text(&self) -> String {
        let mut header = vec!["IMAGE (from hints.yaml)".to_string()];
        header.extend(self.nodes.iter().map(|n| {
            if n.node.is_empty() {
                n.agent.clone()
            } else {
                n.node.clone()
            }
        }));
        let mut rows = vec![header];
        for image in &self.images {
            let mut row = vec![image.clone()];
            row.extend(self.nodes.iter().map(|n| match &n.result {
                Err(_) => "?".to_string(),
                Ok(_) if n.has(image) => "ok".to_string(),
                Ok(_) => "MISSING".to_string(),
            }));
            rows.push(row);
        }
        let mut widths = vec![0; rows[0].len()];
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let place = match &self.checked {
            Checked::Nodes { .. } => format!("on {}", count(self.nodes.len(), "node")),
            Checked::Registry(host) => format!("in registry {host} (no --agent was given)"),
        };
        let mut out = format!(
            "preflight: {} the chart will pull, {place}\n",
            count(self.images.len(), "image"),
        );
        for row in &rows {
            let line: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, w)| format!("{cell:<w$}"))
                .collect();
            let _ = writeln!(out, "{}", line.join("  ").trim_end());
        }
        let mut problems = String::new();
        for node in &self.nodes {
            match &node.result {
                Err(reason) => {
                    let _ = writeln!(problems, "{}: {reason}", node.label());
                }
                Ok(found) => {
                    for image in self.images.iter().filter(|i| !node.has(i)) {
                        let problem = found
                            .get(image)
                            .map(|s| s.problem.as_str())
                            .filter(|p| !p.is_empty())
                            .unwrap_or("not reported by the agent");
                        let _ = writeln!(problems, "{}: {image}: {problem}", node.label());
                    }
                }
            }
        }
        if !problems.is_empty() {
            out.push('\n');
            out.push_str(&problems);
        }
        match self.failure() {
            None if matches!(self.checked, Checked::Registry(_)) => {
                let _ = writeln!(
                    out,
                    "preflight passed: the registry holds every image the chart will pull"
                );
            }
            None => {
                let _ = writeln!(
                    out,
                    "preflight passed: every node holds every image the chart will pull"
                );
            }
            Some(summary) => {
                let _ = writeln!(out, "preflight FAILED: {summary}");
            }
        }
        out
    }
}

/// `1 image`, `2 images`.
fn count(n: usize, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(r: &str, ok: bool) -> (String, RefStatus) {
        (
            r.to_string(),
            RefStatus {
                r#ref: r.to_string(),
                ok,
                problem: if ok { "" } else { "no such image" }.to_string(),
                ..Default::default()
            },
        )
    }

    #[test]
    fn hints_render_to_normalised_references_once_each() {
        let hints = Hints::parse(
            "- \"{{ .global.imageRegistry }}/demo/app:{{ .app.tag }}\"\n\
             - \"{{ .sidecar-agent.image }}\"\n\
             - \"{{ .global.imageRegistry }}/demo/app:{{ .app.tag }}\"\n\
             - \"{{ .global.imageRegistry }}/demo/app:{{ .app.tag }}@{{ .app.digest }}\"\n\
             - \"{{ .global.imageRegistry }}/demo/app@{{ .app.digest }}\"\n",
        )
        .unwrap();
        let digest = format!("sha256:{}", "a".repeat(64));
        let values: Value = serde_yaml::from_str(&format!(
            "global: {{imageRegistry: 10.0.0.1}}\napp: {{tag: v1, digest: \"{digest}\"}}\n\
             sidecar-agent: {{image: busybox}}\n"
        ))
        .unwrap();
        // With a digest, CRI looks the image up by repository and digest: the tag goes.
        assert_eq!(
            derive_images(&hints, &values).unwrap(),
            [
                "10.0.0.1/demo/app:v1".to_string(),
                "docker.io/library/busybox:latest".to_string(),
                format!("10.0.0.1/demo/app@{digest}"),
            ]
        );
    }

    #[test]
    fn every_unrenderable_template_is_reported() {
        let hints =
            Hints::parse("- \"{{ .a.missing }}\"\n- \"{{ .b }}/X:1\"\n- \"{{ .b }}/ok:1\"\n")
                .unwrap();
        let values: Value = serde_yaml::from_str("a: {}\nb: r.io\n").unwrap();
        let UpgradeError::PreflightHints { problems } = derive_images(&hints, &values).unwrap_err()
        else {
            panic!("wrong error");
        };
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].contains(".a.missing is not set"),
            "{problems:?}"
        );
        assert!(problems[1].contains("must be lowercase"), "{problems:?}");
    }

    /// The flags a failed preflight tells to load with.
    fn retry_of(report: &Report) -> String {
        let failure = report.failure().expect("a failing report");
        let (_, after) = failure.split_once("(lade load BUNDLE ").expect(&failure);
        after.split_once(')').expect(&failure).0.to_string()
    }

    #[test]
    fn table_marks_missing_images_and_silent_nodes() {
        let images = vec!["r.io/a:1".to_string(), "r.io/b:1".to_string()];
        let report = Report {
            images: images.clone(),
            nodes: vec![
                NodeAnswer {
                    agent: "10.0.0.1:7700".into(),
                    node: "node-a".into(),
                    pins: false,
                    result: Ok([status("r.io/a:1", true), status("r.io/b:1", true)].into()),
                },
                NodeAnswer {
                    agent: "10.0.0.2:7700".into(),
                    node: "node-b".into(),
                    pins: false,
                    result: Ok([status("r.io/a:1", true), status("r.io/b:1", false)].into()),
                },
                NodeAnswer {
                    agent: "10.0.0.3:7700".into(),
                    node: String::new(),
                    pins: false,
                    result: Err(LoadError::Connect {
                        agent: "10.0.0.3:7700".into(),
                        reason: "refused".into(),
                    }),
                },
            ],
            checked: Checked::Nodes { discovered: false },
        };
        let text = report.to_text();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[1..4],
            [
                "IMAGE (from hints.yaml)  node-a  node-b   10.0.0.3:7700",
                "r.io/a:1                 ok      ok       ?",
                "r.io/b:1                 ok      MISSING  ?",
            ]
        );
        assert!(
            text.contains("node-b (10.0.0.2:7700): r.io/b:1: no such image"),
            "{text}"
        );
        assert!(
            text.contains("10.0.0.3:7700: cannot reach agent 10.0.0.3:7700: refused"),
            "{text}"
        );
        let failure = report.failure().unwrap();
        assert!(
            failure.starts_with("2 of 2 images not on 2 of 3 nodes")
                && failure.contains("--agent 10.0.0.2:7700 --agent 10.0.0.3:7700"),
            "{failure}"
        );
        // Found with --discover: a node that never said its name can only be named by
        // address, and --discover and --agent do not mix, so every node is.
        let mut discovered = report;
        discovered.checked = Checked::Nodes { discovered: true };
        assert_eq!(
            retry_of(&discovered),
            "--agent 10.0.0.2:7700 --agent 10.0.0.3:7700"
        );
        // When every node said its name: by name, as --discover selects them.
        discovered.nodes[2].node = "node-c".into();
        assert_eq!(
            retry_of(&discovered),
            "--discover --node node-b --node node-c"
        );
        let mut report = discovered;
        report.checked = Checked::Nodes { discovered: false };
        report.nodes[2].node = String::new();

        let all_there = Report {
            images,
            nodes: vec![NodeAnswer {
                agent: "a:1".into(),
                node: "n".into(),
                pins: false,
                result: Ok([status("r.io/a:1", true), status("r.io/b:1", true)].into()),
            }],
            checked: Checked::Nodes { discovered: false },
        };
        assert_eq!(all_there.failure(), None);
        assert!(all_there.to_text().contains("preflight passed"));
        assert!(
            report.unreachable(),
            "10.0.0.3:7700 could not be connected to"
        );
        assert!(!all_there.unreachable());
    }
}
