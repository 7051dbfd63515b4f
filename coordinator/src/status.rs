//! `lade status BUNDLE`: whether every image of a bundle is on every node, named as `lade
//! load` names it, and pinned where the agent pins. It asks each agent what kubelet would find for every name (`Verify`, the
//! upgrade preflight's own check) and sorts the answers per image and node.

use std::fmt::Write as _;

use serde::Serialize;

use crate::load::{Dial, PlannedImage};
use crate::upgrade::preflight::{self, NodeAnswer};

/// How one image stands on one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "problem", rename_all = "snake_case")]
pub enum State {
    /// Every name of the image is there, its content complete and unpacked.
    Present,
    /// None of its names is there.
    Missing,
    /// Some names are missing, or a name is there without all of its content: why.
    Incomplete(String),
    /// Whole, but not pinned where the agent pins (kubelet's image GC may take it): which.
    NotPinned(String),
    /// The node could not be asked.
    Unknown,
}

impl State {
    fn word(&self) -> &'static str {
        match self {
            State::Present => "present",
            State::Missing => "MISSING",
            State::Incomplete(_) => "INCOMPLETE",
            State::NotPinned(_) => "NOT-PINNED",
            State::Unknown => "?",
        }
    }
}

/// The answers of every node about every image of the bundle.
pub struct Status {
    images: Vec<PlannedImage>,
    nodes: Vec<NodeAnswer>,
}

/// One image's row, for `-o json`.
#[derive(Serialize)]
struct ImageRow<'a> {
    image: &'a str,
    names: &'a [String],
    /// Per node, in the order the agents were given.
    nodes: Vec<NodeCell<'a>>,
}

#[derive(Serialize)]
struct NodeCell<'a> {
    agent: &'a str,
    node: &'a str,
    #[serde(flatten)]
    state: State,
}

/// Why a node could not be asked, for `-o json`.
#[derive(Serialize)]
struct Unanswered<'a> {
    agent: &'a str,
    error: String,
}

#[derive(Serialize)]
struct Json<'a> {
    complete: bool,
    images: Vec<ImageRow<'a>>,
    unanswered: Vec<Unanswered<'a>>,
}

/// Asks every agent (`parallel` at a time) about every name of every image of `plan`.
pub async fn status(
    plan: &[PlannedImage],
    agents: &[String],
    dial: &Dial,
    parallel: usize,
    discovered: bool,
) -> Status {
    let mut names: Vec<String> = Vec::new();
    for image in plan {
        for name in &image.names {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
    }
    let report = preflight::check(&names, agents, dial, parallel, discovered).await;
    Status {
        images: plan.to_vec(),
        nodes: report.nodes,
    }
}

impl Status {
    /// How `image` stands on `node`.
    pub fn state(&self, image: &PlannedImage, node: &NodeAnswer) -> State {
        let Ok(found) = &node.result else {
            return State::Unknown;
        };
        let mut present = 0;
        let mut problems = Vec::new();
        let mut unpinned = Vec::new();
        for name in &image.names {
            match found.get(name) {
                Some(s) if s.ok => {
                    present += 1;
                    if node.pins && !s.pinned {
                        unpinned.push(name.clone());
                    }
                }
                Some(s) if s.problem == "no such image" => {
                    problems.push(format!("{name}: no such image"))
                }
                Some(s) => problems.push(format!("{name}: {}", s.problem)),
                None => problems.push(format!("{name}: not reported by the agent")),
            }
        }
        if problems.is_empty() && unpinned.is_empty() {
            State::Present
        } else if problems.is_empty() {
            State::NotPinned(unpinned.join(", "))
        } else if present == 0 && problems.iter().all(|p| p.ends_with(": no such image")) {
            State::Missing
        } else {
            State::Incomplete(problems.join("; "))
        }
    }

    /// Whether every node answered and holds every image whole.
    pub fn complete(&self) -> bool {
        self.nodes.iter().all(|n| {
            self.images
                .iter()
                .all(|i| self.state(i, n) == State::Present)
        })
    }

    /// IMAGE × node table, then each problem and each node that could not be asked, then
    /// the verdict.
    pub fn to_text(&self) -> String {
        let mut rows = vec![std::iter::once("IMAGE".to_string())
            .chain(self.nodes.iter().map(label))
            .collect::<Vec<_>>()];
        let mut problems = String::new();
        for image in &self.images {
            let mut row = vec![image.source.clone()];
            for node in &self.nodes {
                let state = self.state(image, node);
                match &state {
                    State::Incomplete(why) => {
                        let _ = writeln!(problems, "{}: {}: {why}", label(node), image.source);
                    }
                    State::NotPinned(names) => {
                        let _ = writeln!(
                            problems,
                            "{}: {}: not pinned: {names}",
                            label(node),
                            image.source
                        );
                    }
                    _ => {}
                }
                row.push(state.word().to_string());
            }
            rows.push(row);
        }
        for node in &self.nodes {
            if let Err(e) = &node.result {
                let _ = writeln!(problems, "{}: not asked: {e}", label(node));
            }
        }
        let mut out = crate::table::render(&rows);
        if !problems.is_empty() {
            out.push('\n');
            out.push_str(&problems);
        }
        let lacking = self
            .nodes
            .iter()
            .filter(|n| {
                self.images
                    .iter()
                    .any(|i| self.state(i, n) != State::Present)
            })
            .count();
        let _ = if lacking == 0 {
            writeln!(
                out,
                "every node holds all {} images of the bundle",
                self.images.len()
            )
        } else {
            writeln!(
                out,
                "{lacking} of {} nodes lack images or did not answer; `lade load` the bundle again onto them",
                self.nodes.len()
            )
        };
        out
    }

    /// The same as JSON: `complete`, per image its names and each node's state, and the
    /// nodes that could not be asked.
    pub fn to_json(&self) -> serde_json::Result<String> {
        let images = self
            .images
            .iter()
            .map(|image| ImageRow {
                image: &image.source,
                names: &image.names,
                nodes: self
                    .nodes
                    .iter()
                    .map(|n| NodeCell {
                        agent: &n.agent,
                        node: &n.node,
                        state: self.state(image, n),
                    })
                    .collect(),
            })
            .collect();
        let unanswered = self
            .nodes
            .iter()
            .filter_map(|n| {
                n.result.as_ref().err().map(|e| Unanswered {
                    agent: &n.agent,
                    error: e.to_string(),
                })
            })
            .collect();
        serde_json::to_string_pretty(&Json {
            complete: self.complete(),
            images,
            unanswered,
        })
    }
}

/// A node's column name: its name, else its agent address.
fn label(n: &NodeAnswer) -> String {
    if n.node.is_empty() {
        n.agent.clone()
    } else {
        n.node.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use lade_proto::RefStatus;

    use super::*;
    use crate::load::LoadError;

    fn image(source: &str, names: &[&str]) -> PlannedImage {
        PlannedImage {
            source: source.into(),
            manifest: String::new(),
            names: names.iter().map(|n| n.to_string()).collect(),
            allow_overwrite: false,
        }
    }

    fn node(name: &str, found: &[(&str, bool, &str)]) -> NodeAnswer {
        NodeAnswer {
            agent: format!("{name}:7700"),
            node: name.into(),
            pins: false,
            result: Ok(found
                .iter()
                .map(|(r, ok, problem)| {
                    (
                        r.to_string(),
                        RefStatus {
                            r#ref: r.to_string(),
                            ok: *ok,
                            problem: problem.to_string(),
                            ..Default::default()
                        },
                    )
                })
                .collect::<HashMap<_, _>>()),
        }
    }

    #[test]
    fn states_per_image_and_node_and_the_verdict() {
        let app = image("app", &["r/app:v1", "x/app:v1"]);
        let base = image("base", &["r/base:v1"]);
        let whole = node(
            "n1",
            &[
                ("r/app:v1", true, ""),
                ("x/app:v1", true, ""),
                ("r/base:v1", true, ""),
            ],
        );
        let partial = node(
            "n2",
            &[
                ("r/app:v1", true, ""),
                ("x/app:v1", false, "no such image"),
                ("r/base:v1", false, "no such image"),
            ],
        );
        let broken = node(
            "n3",
            &[
                ("r/app:v1", false, "layer sha256:ab is missing"),
                ("x/app:v1", false, "no such image"),
                ("r/base:v1", true, ""),
            ],
        );
        let silent = NodeAnswer {
            agent: "n4:7700".into(),
            node: String::new(),
            pins: false,
            result: Err(LoadError::Connect {
                agent: "n4:7700".into(),
                reason: "refused".into(),
            }),
        };
        let status = Status {
            images: vec![app.clone(), base.clone()],
            nodes: vec![whole, partial, broken, silent],
        };
        let n = &status.nodes;
        assert_eq!(status.state(&app, &n[0]), State::Present);
        assert_eq!(status.state(&base, &n[1]), State::Missing);
        assert!(
            matches!(status.state(&app, &n[1]), State::Incomplete(w) if w.contains("x/app:v1"))
        );
        assert!(
            matches!(status.state(&app, &n[2]), State::Incomplete(w) if w.contains("layer sha256:ab"))
        );
        assert_eq!(status.state(&app, &n[3]), State::Unknown);
        assert!(!status.complete());
        let text = status.to_text();
        assert!(text.contains("IMAGE  n1"), "{text}");
        assert!(text.contains("n4:7700: not asked"), "{text}");
        assert!(text.contains("3 of 4 nodes lack images"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&status.to_json().unwrap()).unwrap();
        assert_eq!(json["complete"], false);
        assert_eq!(json["images"][1]["nodes"][1]["state"], "missing");
        assert_eq!(json["unanswered"][0]["agent"], "n4:7700");

        let done = Status {
            images: vec![base.clone()],
            nodes: vec![node("n1", &[("r/base:v1", true, "")])],
        };
        assert!(done.complete());
        assert!(done.to_text().contains("every node holds all 1 images"));

        // Where the agent pins, a whole image without the pin label is not enough.
        let mut unpinned = node("n1", &[("r/base:v1", true, "")]);
        unpinned.pins = true;
        let status = Status {
            images: vec![base.clone()],
            nodes: vec![unpinned],
        };
        assert_eq!(
            status.state(&base, &status.nodes[0]),
            State::NotPinned("r/base:v1".into())
        );
        assert!(!status.complete());
        assert!(status.to_text().contains("NOT-PINNED"));
    }
}
