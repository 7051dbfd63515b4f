//! What a load will do, decided before and apart from any delivery: the names every image
//! gets, how blobs travel (relay mode and topology), and, per node from what its agent said
//! (`Info`, `Have`), the manifest of each image it gets, the blobs it lacks, whether they fit,
//! how it unpacks them and what it imports. Pure data: nothing here talks to an agent.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::str::FromStr;

use lade_proto::{Descriptor, ImageSpec, InfoResponse, UnpackHint};
use serde::Serialize;

use crate::bundle::{Blob, Bundle};
use crate::reference::{target_names, Reference, ReferenceError, RetagRule};
use crate::select::{choose, Chosen, PlatformChoice};
use lade_oci::Platform;

use super::error::LoadError;
use super::report::NodeReport;

/// One image of the bundle and every name it gets on the nodes.
#[derive(Clone, Debug, Serialize)]
pub struct PlannedImage {
    pub source: String,
    pub manifest: String,
    pub names: Vec<String>,
    /// Names may be moved from other content the node has under them (`--allow-overwrite`).
    #[serde(skip)]
    pub allow_overwrite: bool,
}

/// Why the bundle's images cannot be named as asked.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error(
        "name {name} would be given to two different images ({first} and {second}); adjust the --retag rules"
    )]
    NameClash {
        name: String,
        first: String,
        second: String,
    },
    #[error(
        "image {image}: name {name} is a digest reference to other content than the image ({manifest}); a bundle may only name an image by its own digest"
    )]
    ForeignDigest {
        image: String,
        name: String,
        manifest: String,
    },
}

/// Whether `digest` is one of `image`'s own: its manifest, its index, or one of its
/// platforms' manifests. A digest reference to anything else claims other content.
fn is_own_digest(image: &crate::bundle::Image, digest: &str) -> bool {
    image.manifest == digest
        || image.index.as_deref() == Some(digest)
        || image.platforms.iter().any(|v| v.manifest == digest)
}

/// Names every image of the bundle gets, the same on every node. Fails before anything is
/// sent if a name in the bundle or a retag result is not a valid reference, or if two
/// different images would end up under one name (the last import would silently win).
pub fn plan_names(
    bundle: &Bundle,
    rules: &[RetagRule],
    keep_original: bool,
    allow_overwrite: bool,
) -> Result<Vec<PlannedImage>, PlanError> {
    let mut owner: HashMap<String, (String, String)> = HashMap::new();
    let mut plan = Vec::with_capacity(bundle.images.len());
    for image in &bundle.images {
        let mut names = Vec::new();
        for raw in &image.names {
            let original = Reference::parse(raw)?;
            for target in target_names(&original, rules, keep_original)? {
                if target.digest().is_some_and(|d| !is_own_digest(image, d)) {
                    return Err(PlanError::ForeignDigest {
                        image: image.label().to_string(),
                        name: target.to_string(),
                        manifest: image.manifest.clone(),
                    });
                }
                let target = target.to_string();
                if let Some((manifest, first)) = owner.get(&target) {
                    if *manifest != image.manifest {
                        return Err(PlanError::NameClash {
                            name: target,
                            first: first.clone(),
                            second: image.label().to_string(),
                        });
                    }
                }
                owner.insert(
                    target.clone(),
                    (image.manifest.clone(), image.label().to_string()),
                );
                if !names.contains(&target) {
                    names.push(target);
                }
            }
        }
        plan.push(PlannedImage {
            source: image.label().to_string(),
            manifest: image.manifest.clone(),
            names,
            allow_overwrite,
        });
    }
    Ok(plan)
}

/// How blobs travel from the coordinator to the nodes (`lade load --relay`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RelayMode {
    /// `tree:2` for two nodes or more, off for one.
    #[default]
    Auto,
    /// The coordinator sends to every node itself.
    Off,
    /// Each node passes blobs on to the next one.
    Chain,
    /// Each node passes blobs on to up to K others.
    Tree(usize),
}

impl FromStr for RelayMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(RelayMode::Auto),
            "off" => Ok(RelayMode::Off),
            "chain" => Ok(RelayMode::Chain),
            other => {
                let k = other
                    .strip_prefix("tree:")
                    .and_then(|k| k.parse::<usize>().ok())
                    .filter(|k| (1..=64).contains(k))
                    .ok_or_else(|| {
                        format!("{other:?}: expected off, chain, tree:K (K from 1 to 64) or auto")
                    })?;
                Ok(RelayMode::Tree(k))
            }
        }
    }
}

impl RelayMode {
    /// Children per node over `nodes` nodes; `None`: no relay.
    pub fn fanout(self, nodes: usize) -> Option<usize> {
        if nodes < 2 {
            return None;
        }
        match self {
            RelayMode::Off => None,
            RelayMode::Chain => Some(1),
            RelayMode::Tree(k) => Some(k),
            RelayMode::Auto => Some(2),
        }
    }

    /// What the mode is called on the command line, resolved for `nodes` nodes.
    pub fn describe(self, nodes: usize) -> String {
        match self.fanout(nodes) {
            None => "off".into(),
            Some(1) => "chain".into(),
            Some(k) => format!("tree:{k}"),
        }
    }
}

/// Children of position `i` among `n` nodes laid out as a K-ary tree in order (a chain for
/// K = 1): the first node is the root, the one the coordinator sends to.
pub(crate) fn children(i: usize, n: usize, k: usize) -> impl Iterator<Item = usize> {
    (k * i + 1..=k * i + k).filter(move |&c| c < n)
}

/// The topology of `names` (in order) as an indented tree, for `--plan` and stderr.
pub fn render_topology(names: &[String], fanout: usize) -> String {
    fn walk(out: &mut String, names: &[String], k: usize, i: usize, prefix: &str, last: bool) {
        let _ = writeln!(
            out,
            "{prefix}{}{}",
            if last { "└─ " } else { "├─ " },
            names[i]
        );
        let kids: Vec<usize> = children(i, names.len(), k).collect();
        let deeper = format!("{prefix}{}", if last { "   " } else { "│  " });
        for (j, &c) in kids.iter().enumerate() {
            walk(out, names, k, c, &deeper, j + 1 == kids.len());
        }
    }
    let mut out = String::from("coordinator\n");
    if !names.is_empty() {
        walk(&mut out, names, fanout, 0, "", true);
    }
    out
}

/// What `lade load --plan` prints: the topology the load would use, before anything is
/// sent.
pub fn plan_text(bundle: &Bundle, agents: &[String], mode: RelayMode) -> String {
    let mut out = format!(
        "{} images, {} blobs, {} bytes in the bundle; {} nodes\n",
        bundle.images.len(),
        bundle.blobs.len(),
        bundle.total_bytes(),
        agents.len()
    );
    match mode.fanout(agents.len()) {
        None => {
            out.push_str("relay off: the coordinator sends every node what it lacks itself\n");
            for a in agents {
                let _ = writeln!(out, "coordinator -> {a}");
            }
        }
        Some(k) => {
            let _ = writeln!(
                out,
                "relay {}: each missing blob leaves the coordinator once, to {}; nodes that hold a blob pass it on",
                mode.describe(agents.len()),
                agents[0]
            );
            out.push_str(&render_topology(agents, k));
        }
    }
    out
}

/// Bytes the coordinator would send at least: every blob some node lacks, once.
pub fn unique_missing(bundle: &Bundle, missing: &[HashMap<String, u64>]) -> u64 {
    let mut need: BTreeMap<&str, u64> = BTreeMap::new();
    for m in missing {
        for (d, off) in m {
            let e = need.entry(d.as_str()).or_insert(u64::MAX);
            *e = (*e).min(*off);
        }
    }
    need.iter()
        .map(|(d, off)| bundle.blobs[*d].size - off)
        .sum()
}

/// Every layer of the bundle, of every platform, with its diffID.
pub(crate) fn layer_diff_ids(bundle: &Bundle) -> impl Iterator<Item = (&String, &String)> {
    bundle.images.iter().flat_map(|i| {
        i.layers.iter().zip(&i.diff_ids).chain(
            i.platforms
                .iter()
                .flat_map(|v| v.layers.iter().zip(&v.diff_ids)),
        )
    })
}

/// How the calls to an agent name blob `blob` of the bundle (without a diffID).
pub(crate) fn descriptor(blob: &Blob) -> Descriptor {
    Descriptor {
        digest: blob.digest.clone(),
        size: blob.size,
        media_type: blob.media_type.clone(),
        diff_id: String::new(),
    }
}

/// The blobs a node is asked about (`Have`): those of the manifests chosen for it, layers
/// with their diffID so runtimes that store layers uncompressed (Docker) can recognise the
/// ones they hold.
pub(crate) fn have_descriptors<'a>(
    bundle: &Bundle,
    chosen: impl Iterator<Item = &'a Chosen>,
) -> Vec<Descriptor> {
    let diff_ids: HashMap<&str, &str> = layer_diff_ids(bundle)
        .map(|(layer, diff_id)| (layer.as_str(), diff_id.as_str()))
        .collect();
    let mut digests: Vec<&str> = chosen
        .flat_map(|c| c.blobs.iter().map(String::as_str))
        .collect();
    digests.sort_unstable();
    digests.dedup();
    digests
        .into_iter()
        .map(|d| Descriptor {
            diff_id: diff_ids.get(d).map(|d| d.to_string()).unwrap_or_default(),
            ..descriptor(&bundle.blobs[d])
        })
        .collect()
}

/// The node's platform as its agent reports it (this machine's if it says none).
pub(crate) fn node_platform(info: &InfoResponse) -> Platform {
    info.platform.parse().unwrap_or_else(|_| Platform::local())
}

/// Which manifest of each image the node of `info` gets under `choice` (or why none), and
/// whether `--all-platforms` fell back to the node's own platform because it runs Docker
/// (which holds one platform per image) while the bundle has multi-platform images.
pub(crate) fn node_choices(
    bundle: &Bundle,
    choice: &PlatformChoice,
    info: &InfoResponse,
) -> (Vec<Result<Chosen, String>>, bool) {
    let platform = node_platform(info);
    let (choice, fell_back) = match choice {
        PlatformChoice::All if info.runtime == "docker" => (
            &PlatformChoice::Node,
            bundle.images.iter().any(|i| !i.platforms.is_empty()),
        ),
        other => (other, false),
    };
    let chosen = bundle
        .images
        .iter()
        .map(|image| choose(image, choice, &platform))
        .collect();
    (chosen, fell_back)
}

/// `names` on a node whose names point at `target`: a digest reference to the image's index
/// or to one platform's manifest is true there only if that is the target, so elsewhere it
/// names the target instead (`repo@<target>`), as it would otherwise name other content.
pub(crate) fn node_names(names: &[String], target: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for name in names {
        let name = match name.split_once('@') {
            Some((repo, digest)) if digest != target => format!("{repo}@{target}"),
            _ => name.clone(),
        };
        if !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

/// The Import request of `planned` on a node that got `chosen`: its names on the manifest (or
/// index) chosen for the node.
pub(crate) fn import_spec(bundle: &Bundle, chosen: &Chosen, planned: &PlannedImage) -> ImageSpec {
    ImageSpec {
        names: node_names(&planned.names, &chosen.target),
        manifest: Some(descriptor(&bundle.blobs[&chosen.target])),
        source: planned.source.clone(),
        allow_overwrite: planned.allow_overwrite,
    }
}

/// One warning per single-platform image whose config names a platform the node of `info`
/// cannot run (an arm64 image on an amd64 node): loaded as `ctr import` loads it, but its
/// containers will not start there.
pub(crate) fn foreign_platform_warnings(
    bundle: &Bundle,
    chosen: &[Result<Chosen, String>],
    info: &InfoResponse,
) -> Vec<String> {
    let node = node_platform(info);
    bundle
        .images
        .iter()
        .zip(chosen)
        .filter(|(image, chosen)| image.platforms.is_empty() && chosen.is_ok())
        .filter_map(|(image, _)| {
            let own = image.config_platform.as_ref()?;
            own.rank_for(&node).is_none().then(|| {
                format!(
                    "image {} is {own} (its config says so), this node is {node}: its \
                     containers will not start here",
                    image.label()
                )
            })
        })
        .collect()
}

/// The blobs of a `Have` answer the node lacks, with the offset its interrupted upload got
/// to; what it holds (whole blobs and kept prefixes) is added to `report`'s skipped counts.
pub(crate) fn missing_blobs(
    bundle: &Bundle,
    states: Vec<lade_proto::BlobState>,
    report: &mut NodeReport,
) -> HashMap<String, u64> {
    let mut missing = HashMap::new();
    for state in states {
        let Some(blob) = bundle.blobs.get(&state.digest) else {
            continue;
        };
        if state.present {
            report.blobs_skipped += 1;
            report.bytes_skipped += blob.size;
        } else {
            let offset = state.offset.min(blob.size);
            report.bytes_skipped += offset;
            missing.insert(blob.digest.clone(), offset);
        }
    }
    missing
}

/// Refuses the node of `info` if one of its filesystems lacks room for `missing` (see
/// [`space_needed`]); `sizes` is `None` when the space check is off.
pub(crate) fn check_space(
    bundle: &Bundle,
    agent: &str,
    info: &InfoResponse,
    missing: &HashMap<String, u64>,
    sizes: Option<&HashMap<String, u64>>,
) -> Result<(), LoadError> {
    let Some(sizes) = sizes else {
        return Ok(());
    };
    for need in space_needed(&info.storage, missing, bundle, sizes) {
        if need.needed > need.free {
            return Err(LoadError::NoSpace {
                agent: agent.to_string(),
                node: info.node_name.clone(),
                path: need.path,
                what: need.what,
                needed: need.needed,
                free: need.free,
            });
        }
    }
    Ok(())
}

/// For every layer a node unpacks, its diffID and the chain ID below it (from the first
/// manifest that uses it), so the agent can unpack it as soon as it arrives.
pub(crate) fn unpack_hints<'a>(
    chosen: impl Iterator<Item = &'a Chosen>,
) -> HashMap<&'a str, UnpackHint> {
    let mut hints = HashMap::new();
    for c in chosen {
        let mut parent = String::new();
        for (layer, diff_id) in &c.unpacked {
            hints.entry(layer.as_str()).or_insert_with(|| UnpackHint {
                diff_id: diff_id.clone(),
                parent_chain_id: parent.clone(),
            });
            parent = match parent.as_str() {
                "" => diff_id.clone(),
                below => lade_oci::chain_id(below, diff_id),
            };
        }
    }
    hints
}

/// About how many bytes every layer of the bundle unpacks to (see
/// [`Bundle::unpacked_size_hint`]): read from headers, once per load.
pub(crate) fn unpacked_size_hints(bundle: &Bundle) -> HashMap<String, u64> {
    layer_diff_ids(bundle)
        .map(|(l, _)| (l.clone(), bundle.unpacked_size_hint(l)))
        .collect()
}

/// What a load would write to one of a node's filesystems.
#[derive(Debug, PartialEq, Eq)]
pub struct SpaceNeed {
    pub path: String,
    /// What goes there, for messages: `blobs and unpacked layers`.
    pub what: String,
    pub needed: u64,
    pub free: u64,
}

/// For each filesystem the agent reported: the bytes the missing blobs take as stored
/// (`content`/`cache`) plus what their layers unpack to (`snapshots`/`images`), estimated
/// from `sizes`. A layer whose blob is missing is counted as not unpacked yet.
pub fn space_needed(
    storage: &[lade_proto::Storage],
    missing: &HashMap<String, u64>,
    bundle: &Bundle,
    sizes: &HashMap<String, u64>,
) -> Vec<SpaceNeed> {
    let stored: u64 = missing
        .iter()
        .map(|(d, offset)| bundle.blobs[d].size.saturating_sub(*offset))
        .sum();
    let unpacked: u64 = missing.keys().filter_map(|d| sizes.get(d)).sum();
    storage
        .iter()
        .map(|s| {
            let mut needed = 0;
            let mut what = Vec::new();
            for holds in &s.holds {
                match holds.as_str() {
                    "content" | "cache" => {
                        needed += stored;
                        what.push("blobs");
                    }
                    "snapshots" | "images" => {
                        needed += unpacked;
                        what.push("unpacked layers");
                    }
                    _ => {}
                }
            }
            SpaceNeed {
                path: s.path.clone(),
                what: what.join(" and "),
                needed,
                free: s.free_bytes,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_resolve() {
        assert_eq!("off".parse::<RelayMode>().unwrap(), RelayMode::Off);
        assert_eq!("chain".parse::<RelayMode>().unwrap(), RelayMode::Chain);
        assert_eq!("tree:3".parse::<RelayMode>().unwrap(), RelayMode::Tree(3));
        assert_eq!("auto".parse::<RelayMode>().unwrap(), RelayMode::Auto);
        for bad in ["tree", "tree:0", "tree:x", "ring", "tree:65"] {
            assert!(bad.parse::<RelayMode>().is_err(), "{bad}");
        }
        assert_eq!(RelayMode::Auto.fanout(1), None);
        assert_eq!(RelayMode::Auto.fanout(2), Some(2));
        assert_eq!(RelayMode::Chain.fanout(4), Some(1));
        assert_eq!(RelayMode::Tree(3).fanout(1), None);
        assert_eq!(RelayMode::Off.fanout(8), None);
    }

    #[test]
    fn trees_are_laid_out_in_order() {
        assert_eq!(children(0, 4, 1).collect::<Vec<_>>(), [1]);
        assert_eq!(children(3, 4, 1).count(), 0);
        assert_eq!(children(0, 7, 2).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(children(2, 7, 2).collect::<Vec<_>>(), [5, 6]);
        assert_eq!(children(2, 6, 2).collect::<Vec<_>>(), [5]);
        let names: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        assert_eq!(
            render_topology(&names, 2),
            "coordinator\n└─ a\n   ├─ b\n   │  └─ d\n   └─ c\n"
        );
        assert_eq!(
            render_topology(&names, 1),
            "coordinator\n└─ a\n   └─ b\n      └─ c\n         └─ d\n"
        );
    }

    #[test]
    fn a_digest_reference_names_the_node_s_own_target() {
        let names = [
            "x.io/a:1".to_string(),
            "x.io/a@sha256:index".to_string(),
            "x.io/a@sha256:amd64".to_string(),
        ];
        assert_eq!(
            super::node_names(&names, "sha256:amd64"),
            ["x.io/a:1", "x.io/a@sha256:amd64"]
        );
        assert_eq!(
            super::node_names(&names, "sha256:index"),
            ["x.io/a:1", "x.io/a@sha256:index"]
        );
    }

    /// A bundle of blobs `(digest, size)` only, no images: enough for what is planned per
    /// blob.
    fn blobs_only(blobs: &[(&str, u64)]) -> Bundle {
        use crate::bundle::{ArchiveFormat, Blob, BlobSource, BundleKind};
        Bundle {
            path: "bundle.tar".into(),
            kind: BundleKind::ImageArchive,
            format: ArchiveFormat::OciLayout,
            hints: None,
            chart_files: Vec::new(),
            identity: None,
            images: Vec::new(),
            blobs: blobs
                .iter()
                .map(|&(digest, size)| {
                    let blob = Blob {
                        digest: digest.to_string(),
                        size,
                        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                        source: BlobSource::Inline(Default::default()),
                        role: format!("blob {digest}"),
                    };
                    (digest.to_string(), blob)
                })
                .collect(),
            archive_label: "bundle.tar".into(),
        }
    }

    #[test]
    fn missing_blobs_resume_where_uploads_stopped_and_count_what_is_there() {
        let bundle = blobs_only(&[("sha256:a", 10), ("sha256:b", 20), ("sha256:c", 30)]);
        let state = |digest: &str, present, offset| lade_proto::BlobState {
            digest: digest.into(),
            present,
            offset,
        };
        let mut report = NodeReport::default();
        let missing = missing_blobs(
            &bundle,
            vec![
                state("sha256:a", true, 0),
                state("sha256:b", false, 5),
                // An offset past the end is the whole blob at most.
                state("sha256:c", false, 99),
                // Not the bundle's: the node's answer about it is ignored.
                state("sha256:x", true, 0),
            ],
            &mut report,
        );
        assert_eq!(
            missing,
            HashMap::from([("sha256:b".to_string(), 5), ("sha256:c".to_string(), 30)])
        );
        assert_eq!(report.blobs_skipped, 1);
        assert_eq!(report.bytes_skipped, 10 + 5 + 30);
    }

    #[test]
    fn each_missing_blob_counts_once_from_the_earliest_byte_a_node_lacks() {
        let bundle = blobs_only(&[("sha256:a", 10), ("sha256:b", 20)]);
        let one = HashMap::from([("sha256:a".to_string(), 4)]);
        let two = HashMap::from([("sha256:a".to_string(), 0), ("sha256:b".to_string(), 15)]);
        assert_eq!(unique_missing(&bundle, &[one, two]), 10 + 5);
        assert_eq!(unique_missing(&bundle, &[]), 0);
    }

    #[test]
    fn unpack_hints_name_the_chain_below_each_layer() {
        let chosen = Chosen {
            target: "sha256:m".into(),
            blobs: vec!["sha256:m".into(), "sha256:l1".into(), "sha256:l2".into()],
            platform: None,
            unpacked: vec![
                ("sha256:l1".into(), "sha256:d1".into()),
                ("sha256:l2".into(), "sha256:d2".into()),
                ("sha256:l3".into(), "sha256:d3".into()),
            ],
        };
        let hints = unpack_hints([&chosen].into_iter());
        assert_eq!(hints["sha256:l1"].diff_id, "sha256:d1");
        assert_eq!(hints["sha256:l1"].parent_chain_id, "");
        assert_eq!(hints["sha256:l2"].parent_chain_id, "sha256:d1");
        assert_eq!(
            hints["sha256:l3"].parent_chain_id,
            lade_oci::chain_id("sha256:d1", "sha256:d2")
        );
    }

    #[test]
    fn a_node_without_room_is_refused_before_anything_is_sent() {
        let bundle = blobs_only(&[("sha256:a", 100)]);
        let missing = HashMap::from([("sha256:a".to_string(), 0)]);
        let sizes = HashMap::from([("sha256:a".to_string(), 300)]);
        let info = |free_bytes| InfoResponse {
            node_name: "node-a".into(),
            storage: vec![lade_proto::Storage {
                holds: vec!["content".into(), "snapshots".into()],
                path: "/var/lib/containerd".into(),
                free_bytes,
                total_bytes: 1 << 20,
            }],
            ..Default::default()
        };
        let check =
            |free, sizes| check_space(&bundle, "10.0.0.1:7700", &info(free), &missing, sizes);
        assert!(check(400, Some(&sizes)).is_ok());
        match check(399, Some(&sizes)) {
            Err(LoadError::NoSpace {
                node,
                what,
                needed,
                free,
                ..
            }) => {
                assert_eq!(node, "node-a");
                assert_eq!(what, "blobs and unpacked layers");
                assert_eq!((needed, free), (400, 399));
            }
            other => panic!("{other:?}"),
        }
        // With the space check off, nothing is refused.
        assert!(check(0, None).is_ok());
    }
}
