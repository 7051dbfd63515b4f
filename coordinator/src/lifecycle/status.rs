//! `lade status` without a bundle: every bundle version each node holds a record of, whether
//! it is still whole there (every name of every image as kubelet would find it, every blob
//! present), and when it was loaded.

use std::collections::HashMap;
use std::fmt::Write as _;

use indicatif::HumanBytes;
use lade_proto::HeldVersion;
use serde::Serialize;

use super::{held_on, timestamp, versions, NodeHolds, Version};

/// How a held version stands on one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Every image whole, every blob present.
    Held,
    /// Some name missing or broken, or some blob gone.
    Incomplete,
}

impl State {
    fn word(self) -> &'static str {
        match self {
            State::Held => "held",
            State::Incomplete => "INCOMPLETE",
        }
    }
}

/// One version on one node.
#[derive(Debug, Serialize)]
pub struct Row {
    pub bundle: String,
    pub version: String,
    pub agent: String,
    pub node: String,
    /// Images all of whose names kubelet finds whole, of the images recorded.
    pub images_whole: usize,
    pub images: usize,
    /// Bytes of the version's distinct blobs the node has, of those it needs.
    pub bytes_present: u64,
    pub bytes: u64,
    pub state: State,
    /// When the load that recorded it on this node ended (seconds since the Unix epoch).
    pub loaded_at: u64,
    /// What is wrong: each broken name with why, the bytes missing.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// A node that could not say what it holds.
#[derive(Debug, Serialize)]
pub struct Unanswered {
    pub agent: String,
    pub error: String,
}

/// Every node's records, sorted by version.
#[derive(Debug, Serialize)]
pub struct Holdings {
    /// Every node answered and holds every version it has a record of whole.
    pub complete: bool,
    pub rows: Vec<Row>,
    pub unanswered: Vec<Unanswered>,
    /// Versions some nodes hold and others (that answered) do not: by version, those nodes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_held: Vec<NotHeld>,
}

/// A version some answering nodes hold no record of.
#[derive(Debug, Serialize)]
pub struct NotHeld {
    pub bundle: String,
    pub version: String,
    pub nodes: Vec<String>,
}

/// One version's row on one node from its record.
fn row(node: &NodeHolds, held: &HeldVersion) -> Row {
    let record = held.held.clone().unwrap_or_default();
    let refs: HashMap<&str, &lade_proto::RefStatus> =
        held.refs.iter().map(|r| (r.r#ref.as_str(), r)).collect();
    let mut problems = Vec::new();
    let mut whole = 0;
    for image in &record.images {
        let mut ok = true;
        for name in &image.names {
            match refs.get(name.as_str()) {
                Some(r) if r.ok => {}
                Some(r) => {
                    ok = false;
                    problems.push(format!("{}: {name}: {}", image.source, r.problem));
                }
                None => {
                    ok = false;
                    problems.push(format!(
                        "{}: {name}: not reported by the agent",
                        image.source
                    ));
                }
            }
        }
        whole += usize::from(ok);
    }
    if held.bytes_present < held.bytes {
        problems.push(format!(
            "{} of its content is missing",
            HumanBytes(held.bytes - held.bytes_present)
        ));
    }
    let state = if whole == record.images.len() && held.bytes_present >= held.bytes {
        State::Held
    } else {
        State::Incomplete
    };
    Row {
        bundle: record.bundle,
        version: record.version,
        agent: node.agent.clone(),
        node: node.node.clone(),
        images_whole: whole,
        images: record.images.len(),
        bytes_present: held.bytes_present,
        bytes: held.bytes,
        state,
        loaded_at: record.loaded_at,
        problems,
    }
}

/// Sorts the nodes' answers into rows: by bundle, oldest version first, then the nodes in
/// the order given.
pub fn holdings(nodes: &[NodeHolds]) -> Holdings {
    let all: Vec<Version> = versions(nodes);
    let mut rows = Vec::new();
    let mut not_held = Vec::new();
    for v in &all {
        let mut lacking = Vec::new();
        for node in nodes {
            match held_on(node, &v.bundle, &v.version) {
                Some(held) => rows.push(row(node, held)),
                None if node.result.is_ok() => lacking.push(node.label().to_string()),
                None => {}
            }
        }
        if !lacking.is_empty() {
            not_held.push(NotHeld {
                bundle: v.bundle.clone(),
                version: v.version.clone(),
                nodes: lacking,
            });
        }
    }
    let unanswered: Vec<Unanswered> = nodes
        .iter()
        .filter_map(|n| {
            n.result.as_ref().err().map(|e| Unanswered {
                agent: n.agent.clone(),
                error: e.clone(),
            })
        })
        .collect();
    Holdings {
        complete: unanswered.is_empty() && rows.iter().all(|r| r.state == State::Held),
        rows,
        unanswered,
        not_held,
    }
}

impl Holdings {
    /// The table, then each problem, the versions some nodes lack, the nodes that could
    /// not be asked, and the verdict.
    pub fn to_text(&self) -> String {
        let mut rows = vec![[
            "BUNDLE",
            "VERSION",
            "NODE",
            "IMAGES",
            "BYTES",
            "STATE",
            "LOADED AT",
        ]
        .map(String::from)
        .to_vec()];
        let mut notes = String::new();
        for r in &self.rows {
            let node = if r.node.is_empty() { &r.agent } else { &r.node };
            rows.push(vec![
                r.bundle.clone(),
                r.version.clone(),
                node.clone(),
                format!("{}/{}", r.images_whole, r.images),
                format!("{}/{}", HumanBytes(r.bytes_present), HumanBytes(r.bytes)),
                r.state.word().to_string(),
                timestamp(r.loaded_at),
            ]);
            for p in &r.problems {
                let _ = writeln!(notes, "{node}: {} {}: {p}", r.bundle, r.version);
            }
        }
        for n in &self.unanswered {
            rows.push(vec![
                "?".into(),
                "?".into(),
                n.agent.clone(),
                "-".into(),
                "-".into(),
                "?".into(),
                "-".into(),
            ]);
            let _ = writeln!(notes, "{}: not asked: {}", n.agent, n.error);
        }
        for v in &self.not_held {
            let _ = writeln!(
                notes,
                "{} {}: no record on {} (load it there to hold it)",
                v.bundle,
                v.version,
                v.nodes.join(", ")
            );
        }
        let mut out = if self.rows.is_empty() && self.unanswered.is_empty() {
            "no node holds a record of any bundle\n".to_string()
        } else {
            crate::table::render(&rows)
        };
        if !notes.is_empty() {
            out.push('\n');
            out.push_str(&notes);
        }
        let incomplete = self.rows.iter().filter(|r| r.state != State::Held).count();
        let _ = if self.complete {
            writeln!(
                out,
                "every node answered; every version it holds is whole there"
            )
        } else {
            writeln!(
                out,
                "{incomplete} held versions are incomplete and {} nodes did not answer; `lade load` \
                 the bundle again onto those nodes",
                self.unanswered.len()
            )
        };
        out
    }

    pub fn to_json(&self) -> serde_json::Result<String> {
        serde_json::to_string_pretty(self)
    }
}

#[cfg(test)]
mod tests {
    use lade_proto::{Descriptor, Held, HeldImage, RefStatus};

    use super::*;

    fn version(bundle: &str, version: &str, at: u64, names: &[(&str, bool)]) -> HeldVersion {
        HeldVersion {
            held: Some(Held {
                bundle: bundle.into(),
                version: version.into(),
                loaded_at: at,
                images: vec![HeldImage {
                    source: "app".into(),
                    target: Some(Descriptor::default()),
                    names: names.iter().map(|(n, _)| n.to_string()).collect(),
                    blobs: Vec::new(),
                }],
                peers: Vec::new(),
            }),
            bytes: 100,
            bytes_present: 100,
            refs: names
                .iter()
                .map(|(n, ok)| RefStatus {
                    r#ref: n.to_string(),
                    ok: *ok,
                    problem: if *ok {
                        String::new()
                    } else {
                        "no such image".into()
                    },
                    ..Default::default()
                })
                .collect(),
        }
    }

    fn node(name: &str, versions: Vec<HeldVersion>) -> NodeHolds {
        NodeHolds {
            agent: format!("{name}:7700"),
            node: name.into(),
            result: Ok(versions),
        }
    }

    #[test]
    fn versions_sort_by_bundle_then_latest_load_on_any_node() {
        let a = node(
            "a",
            vec![
                version("mod", "v2", 200, &[("r/app:2", true)]),
                version("mod", "v10", 100, &[("r/app:10", true)]),
                version("mod", "v1", 100, &[("r/app:1", true)]),
                version("base", "1", 300, &[("r/base:1", true)]),
            ],
        );
        // Loaded again on b, later: v1 counts from then.
        let b = node("b", vec![version("mod", "v1", 150, &[("r/app:1", true)])]);
        let all = versions(&[a, b]);
        let order: Vec<(&str, &str, u64)> = all
            .iter()
            .map(|v| (v.bundle.as_str(), v.version.as_str(), v.loaded_at))
            .collect();
        assert_eq!(
            order,
            [
                ("base", "1", 300),
                ("mod", "v10", 100),
                ("mod", "v1", 150),
                ("mod", "v2", 200)
            ]
        );
    }

    #[test]
    fn the_table_says_what_is_held_what_is_broken_and_who_did_not_answer() {
        let a = node(
            "a",
            vec![
                version("mod", "v1", 100, &[("r/app:1", true)]),
                version("mod", "v2", 200, &[("r/app:2", true)]),
            ],
        );
        let mut broken = version("mod", "v1", 100, &[("r/app:1", false)]);
        broken.bytes_present = 40;
        let b = node("b", vec![broken]);
        let silent = NodeHolds {
            agent: "c:7700".into(),
            node: String::new(),
            result: Err("cannot reach agent c:7700: refused".into()),
        };
        let h = holdings(&[a, b, silent]);
        assert!(!h.complete);
        assert_eq!(h.rows.len(), 3);
        assert_eq!(h.rows[1].node, "b");
        assert_eq!(h.rows[1].state, State::Incomplete);
        assert_eq!(h.rows[1].images_whole, 0);
        let text = h.to_text();
        assert!(text.starts_with("BUNDLE  VERSION  NODE"), "{text}");
        assert!(text.contains("mod     v1       a       1/1"), "{text}");
        assert!(text.contains("INCOMPLETE"), "{text}");
        assert!(
            text.contains("b: mod v1: app: r/app:1: no such image"),
            "{text}"
        );
        assert!(
            text.contains("b: mod v1: 60 B of its content is missing"),
            "{text}"
        );
        assert!(text.contains("c:7700: not asked: cannot reach"), "{text}");
        assert!(text.contains("mod v2: no record on b"), "{text}");
        assert!(text.contains("1970-01-01T00:01:40Z"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&h.to_json().unwrap()).unwrap();
        assert_eq!(json["complete"], false);
        assert_eq!(json["rows"][1]["state"], "incomplete");
        assert_eq!(json["unanswered"][0]["agent"], "c:7700");

        let whole = holdings(&[node("a", vec![version("mod", "v1", 1, &[("x", true)])])]);
        assert!(whole.complete);
        assert!(whole.to_text().contains("every node answered"));
        let empty = holdings(&[node("a", vec![])]);
        assert!(empty.complete);
        assert!(empty.to_text().starts_with("no node holds a record"));
    }
}
