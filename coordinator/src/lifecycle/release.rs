//! `lade prune` and `lade unload`: which bundle versions go, the `Release` call on every node
//! that holds each, and what every node removed, kept and freed.
//!
//! Versions are ordered by when they were last loaded, on any node (a version loaded again
//! is as new as its latest load). A node keeps a name another held version shares, and a
//! name a container uses (with the record of just that image, so a later prune takes it
//! once the container is gone): the latter is a refusal the report names, with the
//! containers.

use std::fmt::Write as _;

use futures::StreamExt;
use indicatif::HumanBytes;
use lade_proto::{InUse, ReleaseRequest, ReleaseResponse};
use serde::Serialize;

use super::status::Unanswered;
use super::{ask_all, held_on, timestamp, versions, Asked, Version};
use crate::load::Dial;

/// Which versions go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Choice {
    /// All but the `keep` most recently loaded versions of bundle `bundle`.
    Prune { bundle: String, keep: usize },
    /// This one version.
    Unload { bundle: String, version: String },
}

/// What a choice picks among `all` (as [`versions`] orders them): the versions to release,
/// and the versions of the bundle kept.
pub fn select(choice: &Choice, all: &[Version]) -> (Vec<Version>, Vec<Version>) {
    match choice {
        Choice::Prune { bundle, keep } => {
            let of: Vec<Version> = all
                .iter()
                .filter(|v| v.bundle == *bundle)
                .cloned()
                .collect();
            // Oldest first: all but the last `keep` go.
            let cut = of.len().saturating_sub(*keep);
            let (go, stay) = of.split_at(cut);
            (go.to_vec(), stay.to_vec())
        }
        Choice::Unload { bundle, version } => {
            let go: Vec<Version> = all
                .iter()
                .filter(|v| v.bundle == *bundle && v.version == *version)
                .cloned()
                .collect();
            (go, Vec::new())
        }
    }
}

/// What one node did (or would do) with one version.
#[derive(Debug, Serialize)]
pub struct NodeRelease {
    pub bundle: String,
    pub version: String,
    pub agent: String,
    pub node: String,
    /// Names removed (dry run: that would be).
    pub removed: Vec<String>,
    /// Names kept because another held version has them.
    pub shared: Vec<String>,
    /// Names kept because containers use them, with the containers.
    pub in_use: Vec<Used>,
    /// Bytes the node no longer holds (dry run: an upper bound of what it would free).
    pub freed_bytes: u64,
    /// The node held no record of the version by the time it was asked.
    pub not_held: bool,
    /// Why the node could not release it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A name kept because containers use it.
#[derive(Debug, Serialize)]
pub struct Used {
    pub name: String,
    pub containers: Vec<String>,
}

/// How a prune or unload ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every selected version was released on every node that holds it.
    Done,
    /// Only names containers use were kept: the rest was released (exit code 3).
    InUse,
    /// A node could not be asked or failed to release, or the version asked for is held
    /// nowhere (exit code 1).
    Failed,
}

/// The whole outcome.
#[derive(Debug, Serialize)]
pub struct Released {
    pub dry_run: bool,
    /// The versions released, oldest first.
    pub released: Vec<VersionOut>,
    /// The versions of the bundle kept (prune).
    pub kept: Vec<VersionOut>,
    /// Per version, per node that holds it.
    pub nodes: Vec<NodeRelease>,
    pub unanswered: Vec<Unanswered>,
    /// What was asked for is held nowhere (unload).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nothing_held: Option<String>,
    pub names_removed: usize,
    pub freed_bytes: u64,
}

/// A version in the JSON report.
#[derive(Debug, Serialize)]
pub struct VersionOut {
    pub bundle: String,
    pub version: String,
    pub loaded_at: u64,
}

impl From<&Version> for VersionOut {
    fn from(v: &Version) -> Self {
        VersionOut {
            bundle: v.bundle.clone(),
            version: v.version.clone(),
            loaded_at: v.loaded_at,
        }
    }
}

/// Asks every agent what it holds, picks the versions `choice` releases, and releases each
/// on every node that holds it (`parallel` nodes at a time; with `dry_run` the nodes only
/// say what would go).
pub async fn release(
    choice: &Choice,
    agents: &[String],
    dial: &Dial,
    parallel: usize,
    dry_run: bool,
) -> Released {
    let asked = ask_all(agents, dial, parallel).await;
    let all = versions(asked.iter().map(|a| &a.holds));
    let (go, stay) = select(choice, &all);
    let unanswered = asked
        .iter()
        .map(|a| &a.holds)
        .filter_map(|n| {
            n.result.as_ref().err().map(|e| Unanswered {
                agent: n.agent.clone(),
                error: e.clone(),
            })
        })
        .collect();
    let nothing_held = match choice {
        Choice::Unload { bundle, version } if go.is_empty() => {
            Some(format!("no node that answered holds {bundle} {version}"))
        }
        _ => None,
    };
    let go_ref = &go;
    let mut per_node: Vec<(usize, Vec<NodeRelease>)> =
        futures::stream::iter(asked.into_iter().enumerate())
            .map(|(i, a)| async move { (i, release_on(a, go_ref, dry_run).await) })
            .buffer_unordered(parallel.max(1))
            .collect()
            .await;
    per_node.sort_by_key(|(i, _)| *i);
    let mut nodes: Vec<NodeRelease> = per_node.into_iter().flat_map(|(_, r)| r).collect();
    // By version (oldest first), then node in the order given.
    nodes.sort_by_key(|r| {
        go.iter()
            .position(|v| v.bundle == r.bundle && v.version == r.version)
    });
    Released {
        dry_run,
        released: go.iter().map(VersionOut::from).collect(),
        kept: stay.iter().map(VersionOut::from).collect(),
        names_removed: nodes.iter().map(|r| r.removed.len()).sum(),
        freed_bytes: nodes.iter().map(|r| r.freed_bytes).sum(),
        nodes,
        unanswered,
        nothing_held,
    }
}

/// Releases every version of `go` the node of `asked` holds, oldest first.
async fn release_on(asked: Asked, go: &[Version], dry_run: bool) -> Vec<NodeRelease> {
    let Asked { holds, client } = asked;
    let Some(mut client) = client else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for v in go {
        if held_on(&holds, &v.bundle, &v.version).is_none() {
            continue;
        }
        let answer = client
            .release(ReleaseRequest {
                bundle: v.bundle.clone(),
                version: v.version.clone(),
                dry_run,
            })
            .await;
        let mut r = NodeRelease {
            bundle: v.bundle.clone(),
            version: v.version.clone(),
            agent: holds.agent.clone(),
            node: holds.node.clone(),
            removed: Vec::new(),
            shared: Vec::new(),
            in_use: Vec::new(),
            freed_bytes: 0,
            not_held: false,
            error: None,
        };
        match answer {
            Ok(answer) => {
                let ReleaseResponse {
                    not_held,
                    removed,
                    shared,
                    in_use,
                    freed_bytes,
                } = answer.into_inner();
                r.not_held = not_held;
                r.removed = removed;
                r.shared = shared;
                r.in_use = in_use
                    .into_iter()
                    .map(|InUse { name, containers }| Used { name, containers })
                    .collect();
                r.freed_bytes = freed_bytes;
            }
            Err(status) => {
                r.error = Some(format!(
                    "agent {}: Release failed: {}",
                    holds.agent,
                    status.message()
                ))
            }
        }
        out.push(r);
    }
    out
}

impl Released {
    pub fn verdict(&self) -> Verdict {
        if !self.unanswered.is_empty()
            || self.nothing_held.is_some()
            || self.nodes.iter().any(|r| r.error.is_some())
        {
            Verdict::Failed
        } else if self.nodes.iter().any(|r| !r.in_use.is_empty()) {
            Verdict::InUse
        } else {
            Verdict::Done
        }
    }

    /// What goes and stays, a row per node and version, the names kept and why, the
    /// failures, and the totals.
    pub fn to_text(&self) -> String {
        let released = if self.dry_run {
            "would release"
        } else {
            "released"
        };
        let kept = if self.dry_run { "would keep" } else { "kept" };
        let mut out = String::new();
        if let Some(why) = &self.nothing_held {
            let _ = writeln!(out, "{why}");
        }
        let list = |vs: &[VersionOut]| {
            vs.iter()
                .map(|v| {
                    format!(
                        "{} {} (loaded {})",
                        v.bundle,
                        v.version,
                        timestamp(v.loaded_at)
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !self.kept.is_empty() {
            let _ = writeln!(out, "keeping {}", list(&self.kept));
        }
        if self.released.is_empty() {
            if self.nothing_held.is_none() {
                let _ = writeln!(out, "nothing to release");
            }
        } else {
            let _ = writeln!(out, "{released} {}", list(&self.released));
        }
        let mut rows = vec![[
            "BUNDLE", "VERSION", "NODE", "REMOVED", "SHARED", "IN USE", "FREED", "RESULT",
        ]
        .map(String::from)
        .to_vec()];
        let mut notes = String::new();
        for r in &self.nodes {
            let node = if r.node.is_empty() { &r.agent } else { &r.node };
            let result = if r.error.is_some() {
                "FAILED"
            } else if r.not_held {
                "not held"
            } else if !r.in_use.is_empty() {
                "IN USE"
            } else {
                "ok"
            };
            rows.push(vec![
                r.bundle.clone(),
                r.version.clone(),
                node.clone(),
                r.removed.len().to_string(),
                r.shared.len().to_string(),
                r.in_use.len().to_string(),
                HumanBytes(r.freed_bytes).to_string(),
                result.to_string(),
            ]);
            let at = format!("{node}: {} {}", r.bundle, r.version);
            for u in &r.in_use {
                let _ = writeln!(
                    notes,
                    "{at}: {kept} {}: used by container {}",
                    u.name,
                    u.containers.join(", ")
                );
            }
            if !r.shared.is_empty() {
                let _ = writeln!(
                    notes,
                    "{at}: {kept} {}: another held version has them",
                    r.shared.join(", ")
                );
            }
            if let Some(e) = &r.error {
                let _ = writeln!(notes, "{at}: {e}");
            }
        }
        for n in &self.unanswered {
            let _ = writeln!(
                notes,
                "{}: not asked: {}; what it holds is left as it is",
                n.agent, n.error
            );
        }
        if !self.nodes.is_empty() {
            out.push('\n');
            out.push_str(&crate::table::render(&rows));
        }
        if !notes.is_empty() {
            out.push('\n');
            out.push_str(&notes);
        }
        let nodes: std::collections::BTreeSet<&str> =
            self.nodes.iter().map(|r| r.agent.as_str()).collect();
        let in_use: usize = self.nodes.iter().map(|r| r.in_use.len()).sum();
        let _ = writeln!(
            out,
            "\n{released} {} versions on {} nodes: {} names removed, {} kept in use, {} {}",
            self.released.len(),
            nodes.len(),
            self.names_removed,
            in_use,
            HumanBytes(self.freed_bytes),
            if self.dry_run {
                "freed at most"
            } else {
                "freed"
            }
        );
        out
    }

    pub fn to_json(&self) -> serde_json::Result<String> {
        serde_json::to_string_pretty(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(bundle: &str, version: &str, at: u64) -> Version {
        Version {
            bundle: bundle.into(),
            version: version.into(),
            loaded_at: at,
        }
    }

    #[test]
    fn prune_keeps_the_most_recently_loaded_versions_of_the_bundle_only() {
        let all = vec![
            v("base", "1", 50),
            v("mod", "v1", 100),
            v("mod", "v3", 150),
            v("mod", "v2", 200),
        ];
        let prune = |keep| {
            select(
                &Choice::Prune {
                    bundle: "mod".into(),
                    keep,
                },
                &all,
            )
        };
        let (go, stay) = prune(1);
        assert_eq!(go, [v("mod", "v1", 100), v("mod", "v3", 150)]);
        assert_eq!(stay, [v("mod", "v2", 200)]);
        let (go, stay) = prune(5);
        assert!(go.is_empty());
        assert_eq!(stay.len(), 3);
        let (go, _) = select(
            &Choice::Unload {
                bundle: "base".into(),
                version: "1".into(),
            },
            &all,
        );
        assert_eq!(go, [v("base", "1", 50)]);
    }

    fn node_release(in_use: bool, error: bool) -> NodeRelease {
        NodeRelease {
            bundle: "mod".into(),
            version: "v1".into(),
            agent: "a:7700".into(),
            node: "a".into(),
            removed: vec!["r/app:1".into()],
            shared: vec!["r/base:1".into()],
            in_use: if in_use {
                vec![Used {
                    name: "r/used:1".into(),
                    containers: vec!["web".into()],
                }]
            } else {
                Vec::new()
            },
            freed_bytes: 2048,
            not_held: false,
            error: error.then(|| "agent a:7700: Release failed: boom".to_string()),
        }
    }

    fn released(nodes: Vec<NodeRelease>, dry_run: bool) -> Released {
        Released {
            dry_run,
            released: vec![VersionOut::from(&v("mod", "v1", 100))],
            kept: vec![VersionOut::from(&v("mod", "v2", 200))],
            names_removed: nodes.iter().map(|r| r.removed.len()).sum(),
            freed_bytes: nodes.iter().map(|r| r.freed_bytes).sum(),
            nodes,
            unanswered: Vec::new(),
            nothing_held: None,
        }
    }

    #[test]
    fn the_report_names_kept_names_containers_and_totals_and_the_verdict_follows() {
        let done = released(vec![node_release(false, false)], false);
        assert_eq!(done.verdict(), Verdict::Done);
        let text = done.to_text();
        assert!(
            text.contains("keeping mod v2 (loaded 1970-01-01T00:03:20Z)"),
            "{text}"
        );
        assert!(text.contains("\nreleased mod v1"), "{text}");
        assert!(
            text.contains("a: mod v1: kept r/base:1: another held version"),
            "{text}"
        );
        assert!(
            text.contains(
                "released 1 versions on 1 nodes: 1 names removed, 0 kept in use, 2.00 KiB freed"
            ),
            "{text}"
        );

        let used = released(vec![node_release(true, false)], true);
        assert_eq!(used.verdict(), Verdict::InUse);
        let text = used.to_text();
        assert!(text.contains("would release mod v1"), "{text}");
        assert!(
            text.contains("a: mod v1: would keep r/used:1: used by container web"),
            "{text}"
        );
        assert!(text.contains("IN USE"), "{text}");
        assert!(text.contains("2.00 KiB freed at most"), "{text}");

        let failed = released(
            vec![node_release(true, false), node_release(false, true)],
            false,
        );
        assert_eq!(failed.verdict(), Verdict::Failed);
        assert!(failed.to_text().contains("FAILED"));
        let json: serde_json::Value = serde_json::from_str(&failed.to_json().unwrap()).unwrap();
        assert_eq!(json["nodes"][0]["in_use"][0]["containers"][0], "web");
        assert_eq!(json["freed_bytes"], 4096);
    }
}
