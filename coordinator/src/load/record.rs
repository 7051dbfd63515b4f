//! What a load leaves on each node besides the images: a record of the bundle version it
//! loaded there (the agent's `Hold`), which `lade status`, `prune` and `unload` read back and
//! which keeps the version's content from the runtime's garbage collection.
//!
//! A node gets its record once its session ended (every image whole on it): the bundle's
//! name and version, when the load ended, every image with the manifest or index its names
//! point at on that node, those names and every blob it needs, and the other agents of the
//! load. A failed `Hold` leaves the images in place and is reported on the node
//! ([`NodeReport::record_error`]); an agent that predates records gets a warning.

use std::collections::HashMap;

use lade_proto::{Descriptor, Held, HeldImage, HoldRequest};
use tonic::Code;

use crate::bundle::Bundle;
use crate::select::Chosen;

use super::conn::AgentConn;
use super::plan::{descriptor, layer_diff_ids, node_names, PlannedImage};
use super::report::{LoadedImage, NodeReport};

/// The record of a load on the node at `agent`, whose images got `chosen`, without its time
/// (set when it is made); `None` when the bundle has no name and version. `agents` are every
/// agent of the load: the others are the record's peers.
pub(crate) fn held(
    bundle: &Bundle,
    plan: &[PlannedImage],
    chosen: &[Result<Chosen, String>],
    agent: &str,
    agents: &[String],
) -> Option<Held> {
    let id = bundle.identity.as_ref()?;
    let diff_ids: HashMap<&str, &str> = layer_diff_ids(bundle)
        .map(|(layer, diff_id)| (layer.as_str(), diff_id.as_str()))
        .collect();
    let blob = |digest: &str| Descriptor {
        diff_id: diff_ids
            .get(digest)
            .map(|d| d.to_string())
            .unwrap_or_default(),
        ..descriptor(&bundle.blobs[digest])
    };
    let images = plan
        .iter()
        .zip(chosen)
        .filter_map(|(planned, chosen)| {
            let chosen = chosen.as_ref().ok()?;
            Some(HeldImage {
                source: planned.source.clone(),
                target: Some(blob(&chosen.target)),
                names: node_names(&planned.names, &chosen.target),
                blobs: chosen.blobs.iter().map(|d| blob(d)).collect(),
            })
        })
        .collect();
    let mut peers: Vec<String> = Vec::new();
    for peer in agents.iter().filter(|a| *a != agent) {
        if !peers.contains(peer) {
            peers.push(peer.clone());
        }
    }
    Some(Held {
        bundle: id.name.clone(),
        version: id.version.clone(),
        loaded_at: 0,
        images,
        peers,
    })
}

/// `held` with every name the node's imports reported for each image added to the names
/// the plan gave it: the node may make more (a containerd node adds a `repo@sha256:`
/// digest reference beside each tag, as a registry pull does), and a release must find them.
fn with_names_made(mut held: Held, loaded: &[LoadedImage]) -> Held {
    for image in &mut held.images {
        for made in loaded.iter().filter(|l| l.image == image.source) {
            for name in &made.names {
                if !image.names.contains(name) {
                    image.names.push(name.clone());
                }
            }
        }
    }
    held
}

/// Seconds since the Unix epoch, now.
pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Makes the record `held` on the node at `agent`, stamped now, and says in `report` how
/// that went: recorded, a warning when the agent predates records, or why it failed.
pub(crate) async fn hold(client: &mut AgentConn, held: Held, agent: &str, report: &mut NodeReport) {
    let held = Held {
        loaded_at: now(),
        ..with_names_made(held, &report.loaded_images)
    };
    match client.hold(HoldRequest { held: Some(held) }).await {
        Ok(_) => report.recorded = true,
        Err(status) if status.code() == Code::Unimplemented => report.warnings.push(
            "its agent keeps no bundle records (an older version): lade status, prune and \
             unload will not see this load there"
                .into(),
        ),
        Err(status) => {
            report.record_error = Some(format!(
                "the images are loaded, but the record of the load is missing: agent {agent}: \
                 Hold: {}",
                status.message()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::{
        ArchiveFormat, Blob, BlobSource, BundleKind, Identity, IdentitySource, Image,
    };

    fn bundle(identity: Option<Identity>) -> Bundle {
        let blob = |digest: &str, media_type: &str| Blob {
            digest: digest.into(),
            size: 10,
            media_type: media_type.into(),
            source: BlobSource::Inline(Default::default()),
            role: digest.into(),
        };
        Bundle {
            path: "b.tar".into(),
            kind: BundleKind::ImageArchive,
            format: ArchiveFormat::OciLayout,
            hints: None,
            chart_files: Vec::new(),
            identity,
            images: vec![Image {
                names: vec!["x.io/a:1".into()],
                manifest: "m".into(),
                config: "c".into(),
                layers: vec!["l".into()],
                diff_ids: vec!["d".into()],
                config_platform: None,
                platforms: Vec::new(),
                skipped_platforms: Vec::new(),
                index: None,
            }],
            blobs: [
                blob("m", "manifest"),
                blob("c", "config"),
                blob("l", "layer"),
            ]
            .into_iter()
            .map(|b| (b.digest.clone(), b))
            .collect(),
            archive_label: "b.tar".into(),
        }
    }

    #[test]
    fn a_record_names_each_whole_image_its_blobs_and_the_other_agents() {
        let id = Identity {
            name: "mod".into(),
            version: "v1".into(),
            from: IdentitySource::FileName,
        };
        let b = bundle(Some(id));
        let plan = vec![PlannedImage {
            source: "x.io/a:1".into(),
            manifest: "m".into(),
            names: vec!["x.io/a:1".into(), "x.io/a@idx".into()],
            allow_overwrite: false,
        }];
        let chosen = vec![Ok(Chosen {
            target: "m".into(),
            blobs: vec!["m".into(), "c".into(), "l".into()],
            platform: None,
            unpacked: vec![("l".into(), "d".into())],
        })];
        let agents = ["a:1".to_string(), "b:1".into(), "a:1".into(), "c:1".into()];
        let held = held(&b, &plan, &chosen, "a:1", &agents).unwrap();
        assert_eq!((held.bundle.as_str(), held.version.as_str()), ("mod", "v1"));
        assert_eq!(held.peers, ["b:1", "c:1"]);
        let image = &held.images[0];
        assert_eq!(image.target.as_ref().unwrap().digest, "m");
        // The digest reference names the node's own target.
        assert_eq!(image.names, ["x.io/a:1", "x.io/a@m"]);
        let layer = image.blobs.iter().find(|d| d.digest == "l").unwrap();
        assert_eq!(layer.diff_id, "d");
        assert_eq!(image.blobs.len(), 3);

        // An image the node did not get is not in its record.
        let none = held_without(&b, &plan);
        assert!(none.images.is_empty());
        assert!(super::held(&bundle(None), &plan, &chosen, "a:1", &agents).is_none());
    }

    #[test]
    fn the_names_a_node_made_join_the_record() {
        let held = Held {
            images: vec![HeldImage {
                source: "x.io/a:1".into(),
                names: vec!["x.io/a:1".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        let loaded = [
            LoadedImage {
                image: "x.io/a:1".into(),
                digest: "sha256:m".into(),
                names: vec!["x.io/a:1".into(), "x.io/a@sha256:m".into()],
            },
            LoadedImage {
                image: "x.io/b:1".into(),
                digest: "sha256:n".into(),
                names: vec!["x.io/b:1".into()],
            },
        ];
        let held = with_names_made(held, &loaded);
        assert_eq!(held.images[0].names, ["x.io/a:1", "x.io/a@sha256:m"]);
    }

    fn held_without(b: &Bundle, plan: &[PlannedImage]) -> Held {
        held(
            b,
            plan,
            &[Err("no linux/arm64 manifest".into())],
            "a:1",
            &[],
        )
        .unwrap()
    }
}
