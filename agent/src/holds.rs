//! What a node holds of each bundle version, over any [`Runtime`]: the checks on a Hold
//! request, the answer to Holds, and Release (which names go, which stay, the bytes freed).
//! The runtimes keep the records; this module decides.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use lade_proto::{Descriptor, Held, HeldVersion, InUse, ReleaseRequest, ReleaseResponse};

use crate::error::Error;
use crate::runtime::Runtime;
use lade_oci as oci;

/// Longest bundle name or version a record takes.
const MAX_ID: usize = 128;

/// Checks a record before a runtime keeps it: a bundle name and version of printable
/// characters, and images with a target, at least one name and valid blob digests.
pub fn validate(held: &Held) -> Result<(), Error> {
    for (what, value) in [
        ("bundle name", &held.bundle),
        ("bundle version", &held.version),
    ] {
        let ok = !value.is_empty()
            && value.len() <= MAX_ID
            && value.chars().all(|c| c.is_ascii_graphic());
        if !ok {
            return Err(Error::InvalidRequest(format!(
                "hold: {what} {value:?} must be 1-{MAX_ID} printable characters without spaces"
            )));
        }
    }
    for image in &held.images {
        let target = image.target.as_ref().ok_or_else(|| {
            Error::InvalidRequest(format!("hold: image {}: no target", image.source))
        })?;
        if image.names.is_empty() {
            return Err(Error::InvalidRequest(format!(
                "hold: image {}: no names",
                image.source
            )));
        }
        for blob in std::iter::once(target).chain(&image.blobs) {
            oci::validate_digest(&blob.digest)
                .map_err(|r| Error::InvalidRequest(format!("hold: image {}: {r}", image.source)))?;
        }
    }
    Ok(())
}

/// The distinct blobs a record needs: every image's target and blobs, by digest.
pub fn blobs(held: &Held) -> Vec<Descriptor> {
    let mut seen = BTreeMap::new();
    for image in &held.images {
        for blob in image.target.iter().chain(&image.blobs) {
            seen.entry(blob.digest.clone())
                .or_insert_with(|| blob.clone());
        }
    }
    seen.into_values().collect()
}

/// Every name a record's images have.
pub fn names(held: &Held) -> Vec<String> {
    let names: BTreeSet<&String> = held.images.iter().flat_map(|i| &i.names).collect();
    names.into_iter().cloned().collect()
}

/// The Holds answer: every record, its bytes, the bytes the node has, and Verify of its names.
pub async fn versions<R: Runtime>(runtime: &R) -> Result<Vec<HeldVersion>, Error> {
    let mut held = runtime.holds().await?;
    held.sort_by(|a, b| (&a.bundle, a.loaded_at).cmp(&(&b.bundle, b.loaded_at)));
    let mut versions = Vec::with_capacity(held.len());
    for held in held {
        let blobs = blobs(&held);
        let present = runtime.present(&blobs).await?;
        let bytes = blobs.iter().map(|b| b.size).sum();
        let bytes_present = blobs
            .iter()
            .zip(&present)
            .filter(|(_, p)| **p)
            .map(|(b, _)| b.size)
            .sum();
        let refs = runtime.verify(&names(&held)).await?;
        versions.push(HeldVersion {
            held: Some(held),
            bytes,
            bytes_present,
            refs,
        });
    }
    Ok(versions)
}

/// Releases a bundle version (see the Release RPC). Names another held version has stay;
/// names a container uses stay, and so does a record of just their images, so that a later
/// release takes them once the containers are gone. Freed bytes are the version's blobs the
/// node had before and has no more after (with `dry_run`: those no other held version, kept
/// image or name left on the node needs, an upper bound).
pub async fn release<R: Runtime>(
    runtime: &R,
    req: &ReleaseRequest,
) -> Result<ReleaseResponse, Error> {
    let all = runtime.holds().await?;
    let Some(target) = all
        .iter()
        .find(|h| h.bundle == req.bundle && h.version == req.version)
        .cloned()
    else {
        return Ok(ReleaseResponse {
            not_held: true,
            ..Default::default()
        });
    };
    let others: Vec<&Held> = all
        .iter()
        .filter(|h| !(h.bundle == req.bundle && h.version == req.version))
        .collect();
    let other_names: HashSet<&String> = others
        .iter()
        .flat_map(|h| h.images.iter().flat_map(|i| &i.names))
        .collect();
    let (shared, candidates): (Vec<String>, Vec<String>) = names(&target)
        .into_iter()
        .partition(|n| other_names.contains(n));
    let used = runtime.containers_using(&candidates).await?;
    let removed: Vec<String> = candidates
        .into_iter()
        .filter(|n| !used.contains_key(n))
        .collect();
    let mut in_use: Vec<InUse> = used
        .into_iter()
        .map(|(name, containers)| InUse { name, containers })
        .collect();
    in_use.sort_by(|a, b| a.name.cmp(&b.name));

    let blobs = blobs(&target);
    let before = runtime.present(&blobs).await?;
    // Images that keep a name keep their record (in use) or are another version's (shared).
    let kept_images: Vec<&lade_proto::HeldImage> = target
        .images
        .iter()
        .filter(|i| i.names.iter().any(|n| !removed.contains(n)))
        .collect();
    let freed_bytes = if req.dry_run {
        let needed: HashSet<&String> = others
            .iter()
            .flat_map(|h| h.images.iter())
            .chain(kept_images.iter().copied())
            .flat_map(|i| i.target.iter().chain(&i.blobs).map(|b| &b.digest))
            .collect();
        blobs
            .iter()
            .zip(&before)
            .filter(|(b, had)| **had && !needed.contains(&b.digest))
            .map(|(b, _)| b.size)
            .sum()
    } else {
        runtime.remove_names(&removed).await?;
        runtime.drop_hold(&target.bundle, &target.version).await?;
        let in_use_names: HashSet<&String> = in_use.iter().map(|u| &u.name).collect();
        let still_used: Vec<lade_proto::HeldImage> = target
            .images
            .iter()
            .filter(|i| i.names.iter().any(|n| in_use_names.contains(n)))
            .cloned()
            .collect();
        if !still_used.is_empty() {
            runtime
                .hold(Held {
                    images: still_used,
                    ..target.clone()
                })
                .await?;
        }
        let after = runtime.present(&blobs).await?;
        blobs
            .iter()
            .zip(before.iter().zip(&after))
            .filter(|(_, (had, has))| **had && !**has)
            .map(|(b, _)| b.size)
            .sum()
    };
    Ok(ReleaseResponse {
        not_held: false,
        removed,
        shared,
        in_use,
        freed_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::memory::Memory;
    use crate::runtime::test_chunks;
    use lade_proto::{BlobHeader, HeldImage, ImageSpec};

    /// Stores `data` on `node` and returns its descriptor.
    async fn blob(node: &Memory, data: &[u8], media_type: &str) -> Descriptor {
        let desc = Descriptor {
            digest: oci::sha256_digest(data),
            size: data.len() as u64,
            media_type: media_type.to_string(),
            ..Default::default()
        };
        let header = BlobHeader {
            session: "s".into(),
            blob: Some(desc.clone()),
            ..Default::default()
        };
        node.put_blob(header, test_chunks(&[data])).await.unwrap();
        desc
    }

    /// An image of one layer `layer` named `names` on `node`, and its record entry.
    async fn image(node: &Memory, layer: &[u8], names: &[&str]) -> HeldImage {
        let layer = blob(node, layer, "application/vnd.oci.image.layer.v1.tar").await;
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
            layer.digest
        );
        let config = blob(
            node,
            config.as_bytes(),
            "application/vnd.oci.image.config.v1+json",
        )
        .await;
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"{}","digest":"{}","size":{}}},"layers":[{{"mediaType":"{}","digest":"{}","size":{}}}]}}"#,
            config.media_type,
            config.digest,
            config.size,
            layer.media_type,
            layer.digest,
            layer.size
        );
        let manifest = blob(
            node,
            manifest.as_bytes(),
            "application/vnd.oci.image.manifest.v1+json",
        )
        .await;
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let spec = ImageSpec {
            manifest: Some(manifest.clone()),
            names: names.iter().map(|n| n.to_string()).collect(),
            source: names[0].to_string(),
            allow_overwrite: true,
        };
        node.import("s", vec![spec], tx).await.unwrap();
        while let Some(e) = rx.recv().await {
            assert_ne!(e.message, "failed", "{e:?}");
        }
        node.end_session("s").await.unwrap();
        HeldImage {
            source: names[0].to_string(),
            target: Some(manifest),
            names: names.iter().map(|n| n.to_string()).collect(),
            blobs: vec![config, layer],
        }
    }

    fn held(version: &str, images: Vec<HeldImage>) -> Held {
        Held {
            bundle: "mod".into(),
            version: version.into(),
            loaded_at: 1,
            images,
            peers: vec![],
        }
    }

    #[tokio::test]
    async fn release_keeps_shared_and_used_names_and_counts_the_bytes_it_freed() {
        let node = Memory::new("n");
        let a = image(&node, b"layer a", &["r/a:1"]).await;
        let shared = image(&node, b"layer s", &["r/s:1"]).await;
        let used = image(&node, b"layer u", &["r/u:1"]).await;
        node.hold(held("1", vec![a.clone(), shared.clone(), used.clone()]))
            .await
            .unwrap();
        node.hold(held("2", vec![shared.clone()])).await.unwrap();
        node.use_image("r/u:1", "pod/web");

        let req = ReleaseRequest {
            bundle: "mod".into(),
            version: "1".into(),
            dry_run: true,
        };
        let dry = release(&node, &req).await.unwrap();
        let a_bytes: u64 = blobs(&held("x", vec![a.clone()]))
            .iter()
            .map(|b| b.size)
            .sum();
        assert_eq!(dry.freed_bytes, a_bytes);
        assert_eq!(dry.removed, vec!["r/a:1".to_string()]);
        assert!(
            node.image_names().contains_key("docker.io/r/a:1"),
            "dry run removed"
        );

        let done = release(
            &node,
            &ReleaseRequest {
                dry_run: false,
                ..req.clone()
            },
        )
        .await
        .unwrap();
        assert_eq!(done.removed, vec!["r/a:1".to_string()]);
        assert_eq!(done.shared, vec!["r/s:1".to_string()]);
        assert_eq!(done.in_use.len(), 1);
        assert_eq!(done.in_use[0].containers, vec!["pod/web".to_string()]);
        assert_eq!(done.freed_bytes, a_bytes);
        let names = node.image_names();
        assert!(!names.contains_key("docker.io/r/a:1"));
        assert!(names.contains_key("docker.io/r/s:1") && names.contains_key("docker.io/r/u:1"));
        // Version 1 is still held for the image in use, and only for it.
        let holds = node.holds().await.unwrap();
        let v1 = holds.iter().find(|h| h.version == "1").unwrap();
        assert_eq!(v1.images.len(), 1);
        assert_eq!(v1.images[0].source, "r/u:1");

        let gone = release(
            &node,
            &ReleaseRequest {
                version: "9".into(),
                ..req
            },
        )
        .await
        .unwrap();
        assert!(gone.not_held);
    }

    #[tokio::test]
    async fn versions_report_bytes_present_and_refs() {
        let node = Memory::new("n");
        let a = image(&node, b"layer a", &["r/a:1", "r/a:latest"]).await;
        node.hold(held("1", vec![a.clone()])).await.unwrap();
        let v = versions(&node).await.unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].bytes, v[0].bytes_present);
        assert!(v[0].bytes > 0);
        assert_eq!(v[0].refs.len(), 2);
        node.remove_blob(&a.blobs[1].digest);
        let v = versions(&node).await.unwrap();
        assert_eq!(v[0].bytes - v[0].bytes_present, a.blobs[1].size);
        assert!(v[0].refs.iter().all(|r| !r.ok), "{:?}", v[0].refs);
    }

    #[test]
    fn a_record_needs_an_identity_targets_and_names() {
        let mut h = held("1", vec![]);
        assert!(validate(&h).is_ok());
        h.version = "has space".into();
        assert!(validate(&h).is_err());
        let mut h = held(
            "1",
            vec![HeldImage {
                source: "x".into(),
                target: None,
                names: vec!["x".into()],
                blobs: vec![],
            }],
        );
        assert!(validate(&h)
            .unwrap_err()
            .to_string()
            .contains("image x: no target"));
        h.images[0].target = Some(Descriptor {
            digest: "sha256:zz".into(),
            ..Default::default()
        });
        assert!(validate(&h).is_err());
    }
}
