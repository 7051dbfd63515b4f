//! Which manifest of each image a node gets: the one for its own platform by default, a
//! platform the admin names (`--platform`), or every platform the archive carries behind the
//! image's index (`--all-platforms`).
//!
//! Owns the choice and the blobs it implies, in the order they are sent (each manifest's
//! config and layers after it; an index last, after everything it lists). Platform
//! normalising and ranking is [`lade_oci::platform`]'s.

use crate::bundle::Image;
use lade_oci::Platform;

/// What the admin asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PlatformChoice {
    /// Each node's own platform, from its agent's Info.
    #[default]
    Node,
    /// This platform on every node.
    Fixed(Platform),
    /// Every platform the archive carries, named by the image's index.
    All,
}

/// The manifest (or index) a node's names will point at, and the blobs that takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chosen {
    /// Digest of the manifest or index the names point at.
    pub target: String,
    /// Blobs to have on the node, in sending order; `target` is among them.
    pub blobs: Vec<String>,
    /// The platform chosen from a multi-platform image (`None`: single-platform image, or
    /// every platform).
    pub platform: Option<Platform>,
    /// (layer, diffID) of the manifest the node unpacks, base first: with every platform,
    /// the node's own.
    pub unpacked: Vec<(String, String)>,
}

/// The manifest of `image` for a node of platform `node` under `choice`; `all` is
/// [`PlatformChoice::All`] where the runtime can hold an index (not Docker). An error says
/// which platforms the archive carries and which it lists but lacks.
pub fn choose(image: &Image, choice: &PlatformChoice, node: &Platform) -> Result<Chosen, String> {
    let single = |manifest: &str, config: &str, layers: &[String]| {
        std::iter::once(manifest.to_string())
            .chain(std::iter::once(config.to_string()))
            .chain(layers.iter().cloned())
            .collect::<Vec<_>>()
    };
    let pairs = |layers: &[String], diff_ids: &[String]| {
        layers
            .iter()
            .cloned()
            .zip(diff_ids.iter().cloned())
            .collect::<Vec<_>>()
    };
    if image.platforms.is_empty() {
        return Ok(Chosen {
            target: image.manifest.clone(),
            blobs: single(&image.manifest, &image.config, &image.layers),
            platform: None,
            unpacked: pairs(&image.layers, &image.diff_ids),
        });
    }
    let best_for = |wanted: &Platform| {
        image
            .platforms
            .iter()
            .filter_map(|v| v.platform.rank_for(wanted).map(|rank| (rank, v)))
            .min_by_key(|(rank, _)| *rank)
            .map(|(_, v)| v)
    };
    let wanted = match choice {
        PlatformChoice::All => {
            // The index, provided the node finds its own platform behind it.
            if let (Some(index), Some(own)) = (&image.index, best_for(node)) {
                let mut blobs: Vec<String> = Vec::new();
                for v in &image.platforms {
                    for b in single(&v.manifest, &v.config, &v.layers) {
                        if !blobs.contains(&b) {
                            blobs.push(b);
                        }
                    }
                }
                blobs.push(index.clone());
                return Ok(Chosen {
                    target: index.clone(),
                    blobs,
                    platform: None,
                    unpacked: pairs(&own.layers, &own.diff_ids),
                });
            }
            node
        }
        PlatformChoice::Node => node,
        PlatformChoice::Fixed(p) => p,
    };
    match best_for(wanted) {
        Some(v) => Ok(Chosen {
            target: v.manifest.clone(),
            blobs: single(&v.manifest, &v.config, &v.layers),
            platform: Some(v.platform.clone()),
            unpacked: pairs(&v.layers, &v.diff_ids),
        }),
        None => {
            let carried: Vec<String> = image
                .platforms
                .iter()
                .map(|v| v.platform.to_string())
                .collect();
            let mut reason = format!(
                "no {wanted} manifest: the archive carries {}",
                carried.join(", ")
            );
            if !image.skipped_platforms.is_empty() {
                reason.push_str(&format!(
                    " (its index also lists {}, which the archive does not carry)",
                    image.skipped_platforms.join(", ")
                ));
            }
            Err(reason)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::Variant;

    fn variant(platform: &str, n: u8) -> Variant {
        Variant {
            platform: platform.parse().unwrap(),
            manifest: format!("m{n}"),
            config: format!("c{n}"),
            layers: vec!["base".into(), format!("l{n}")],
            diff_ids: vec!["d0".into(), format!("d{n}")],
        }
    }

    fn multi() -> Image {
        let platforms = vec![variant("linux/amd64", 1), variant("linux/arm64", 2)];
        Image {
            names: vec!["x.io/a:1".into()],
            manifest: "m1".into(),
            config: "c1".into(),
            layers: platforms[0].layers.clone(),
            diff_ids: platforms[0].diff_ids.clone(),
            config_platform: Some(platforms[0].platform.clone()),
            platforms,
            skipped_platforms: vec!["linux/s390x".into()],
            index: Some("idx".into()),
        }
    }

    #[test]
    fn each_node_gets_its_own_platform() {
        let image = multi();
        let amd = choose(
            &image,
            &PlatformChoice::Node,
            &"linux/amd64".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(amd.target, "m1");
        assert_eq!(amd.blobs, ["m1", "c1", "base", "l1"]);
        let arm = choose(
            &image,
            &PlatformChoice::Node,
            &"linux/arm64/v8".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(arm.target, "m2");
        assert_eq!(arm.platform.unwrap().to_string(), "linux/arm64/v8");
    }

    #[test]
    fn a_fixed_platform_overrides_the_node() {
        let image = multi();
        let fixed = PlatformChoice::Fixed("linux/arm64".parse().unwrap());
        let got = choose(&image, &fixed, &"linux/amd64".parse().unwrap()).unwrap();
        assert_eq!(got.target, "m2");
    }

    #[test]
    fn all_platforms_send_every_carried_manifest_then_the_index() {
        let got = choose(
            &multi(),
            &PlatformChoice::All,
            &"linux/amd64".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(got.target, "idx");
        assert_eq!(
            got.blobs,
            ["m1", "c1", "base", "l1", "m2", "c2", "l2", "idx"]
        );
        assert_eq!(got.platform, None);
        // Only the node's own platform is unpacked.
        assert_eq!(
            got.unpacked,
            [
                ("base".to_string(), "d0".to_string()),
                ("l1".into(), "d1".into())
            ]
        );
    }

    #[test]
    fn all_platforms_still_need_the_node_s_own() {
        let err = choose(
            &multi(),
            &PlatformChoice::All,
            &"linux/s390x".parse().unwrap(),
        )
        .unwrap_err();
        assert!(err.starts_with("no linux/s390x manifest"), "{err}");
    }

    #[test]
    fn a_platform_the_archive_lacks_is_named_with_what_it_carries() {
        let err = choose(
            &multi(),
            &PlatformChoice::Node,
            &"linux/s390x".parse().unwrap(),
        )
        .unwrap_err();
        assert_eq!(
            err,
            "no linux/s390x manifest: the archive carries linux/amd64, linux/arm64/v8 (its index also lists linux/s390x, which the archive does not carry)"
        );
    }

    #[test]
    fn single_platform_images_go_to_every_node() {
        let mut image = multi();
        image.platforms.clear();
        image.index = None;
        let got = choose(
            &image,
            &PlatformChoice::Node,
            &"linux/riscv64".parse().unwrap(),
        )
        .unwrap();
        assert_eq!(got.target, "m1");
        assert_eq!(got.platform, None);
    }
}
