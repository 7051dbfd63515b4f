//! `lade inspect`: what a bundle holds, read from its index alone (nothing is extracted or
//! sent): images, their sizes and layers, layers shared between images, and what
//! `hints.yaml` declares.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use indicatif::HumanBytes;
use serde::Serialize;

use crate::bundle::{ArchiveFormat, Bundle, BundleKind, Identity, IdentitySource};
use crate::hints::Hints;

#[derive(Debug, Serialize)]
pub struct Inspection {
    pub path: String,
    pub kind: BundleKind,
    pub format: ArchiveFormat,
    /// The bundle's name and version, as `lade load` records them on the nodes; `None` when
    /// neither its chart nor its file name gives them.
    pub identity: Option<Identity>,
    pub images: Vec<ImageInfo>,
    /// Layers used by more than one image.
    pub shared_layers: Vec<SharedLayer>,
    /// Bytes of all unique blobs: what a fresh node receives.
    pub unique_bytes: u64,
    pub hints: Option<HintsInfo>,
    pub chart_files: usize,
}

#[derive(Debug, Serialize)]
pub struct ImageInfo {
    pub names: Vec<String>,
    pub manifest: String,
    pub config: String,
    /// Sum of its layers as stored (compressed).
    pub size: u64,
    pub layers: Vec<LayerInfo>,
    /// A multi-platform image's platforms the archive carries (manifest and layers above are
    /// the default one's); empty for a single-platform image.
    pub platforms: Vec<String>,
    /// Platforms its index lists that the archive does not carry.
    pub skipped_platforms: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct LayerInfo {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
}

#[derive(Debug, Serialize)]
pub struct SharedLayer {
    pub digest: String,
    pub size: u64,
    pub images: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct HintsInfo {
    pub templates: Vec<String>,
    /// Chart value paths the templates read.
    pub value_paths: Vec<String>,
    /// Why hints.yaml could not be parsed, if it could not.
    pub error: Option<String>,
}

pub fn inspect(bundle: &Bundle) -> Inspection {
    let mut users: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let images = bundle
        .images
        .iter()
        .map(|image| {
            let layers: Vec<LayerInfo> = image
                .layers
                .iter()
                .map(|d| {
                    users.entry(d).or_default().push(image.label().to_string());
                    let blob = &bundle.blobs[d];
                    LayerInfo {
                        digest: d.clone(),
                        size: blob.size,
                        media_type: blob.media_type.clone(),
                    }
                })
                .collect();
            ImageInfo {
                names: image.names.clone(),
                manifest: image.manifest.clone(),
                config: image.config.clone(),
                size: layers.iter().map(|l| l.size).sum(),
                layers,
                platforms: image
                    .platforms
                    .iter()
                    .map(|v| v.platform.to_string())
                    .collect(),
                skipped_platforms: image.skipped_platforms.clone(),
            }
        })
        .collect();
    let shared_layers = users
        .into_iter()
        .filter(|(_, imgs)| imgs.len() > 1)
        .map(|(d, images)| SharedLayer {
            digest: d.to_string(),
            size: bundle.blobs[d].size,
            images,
        })
        .collect();
    let hints = bundle
        .hints
        .as_deref()
        .map(|text| match Hints::parse(text) {
            Ok(h) => {
                let mut paths: Vec<String> = h.templates.iter().flat_map(|t| t.paths()).collect();
                paths.sort();
                paths.dedup();
                HintsInfo {
                    templates: h.templates.iter().map(|t| t.text().to_string()).collect(),
                    value_paths: paths,
                    error: None,
                }
            }
            Err(e) => HintsInfo {
                templates: Vec::new(),
                value_paths: Vec::new(),
                error: Some(e.to_string()),
            },
        });
    Inspection {
        path: bundle.path.display().to_string(),
        kind: bundle.kind,
        format: bundle.format,
        identity: bundle.identity.clone(),
        images,
        shared_layers,
        unique_bytes: bundle.total_bytes(),
        hints,
        chart_files: bundle.chart_files.len(),
    }
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

impl Inspection {
    /// Human-readable report.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} ({:?}, {:?}): {} images, {} unique content",
            self.path,
            self.kind,
            self.format,
            self.images.len(),
            HumanBytes(self.unique_bytes)
        );
        let _ = match &self.identity {
            Some(id) => writeln!(
                s,
                "bundle {} version {} (from {})",
                id.name,
                id.version,
                match id.from {
                    IdentitySource::Chart => "original-chart/Chart.yaml",
                    IdentitySource::FileName => "the file name",
                    IdentitySource::Flags => "--bundle-name/--bundle-version",
                }
            ),
            None => writeln!(
                s,
                "bundle name and version unknown (no original-chart/Chart.yaml, and the file is not \
                 named NAME_VERSION.tar): lade load records it only with --bundle-name and \
                 --bundle-version"
            ),
        };
        for image in &self.images {
            let _ = writeln!(
                s,
                "\n{}  manifest {}  {} in {} layers",
                image.names.join(", "),
                short(&image.manifest),
                HumanBytes(image.size),
                image.layers.len()
            );
            if !image.platforms.is_empty() {
                let _ = writeln!(
                    s,
                    "  platforms: {} (layers below: the default one, this machine's if carried)",
                    image.platforms.join(", ")
                );
            }
            if !image.skipped_platforms.is_empty() {
                let _ = writeln!(
                    s,
                    "  listed but not in the archive (skipped): {}",
                    image.skipped_platforms.join(", ")
                );
            }
            for l in &image.layers {
                let _ = writeln!(
                    s,
                    "  {}  {:>10}  {}",
                    short(&l.digest),
                    HumanBytes(l.size),
                    l.media_type
                );
            }
        }
        if !self.shared_layers.is_empty() {
            let _ = writeln!(s, "\nshared layers:");
            for l in &self.shared_layers {
                let _ = writeln!(
                    s,
                    "  {}  {:>10}  used by {}",
                    short(&l.digest),
                    HumanBytes(l.size),
                    l.images.join(", ")
                );
            }
        }
        match &self.hints {
            None => {
                let _ = writeln!(s, "\nno hints.yaml");
            }
            Some(h) => {
                let _ = writeln!(s, "\nhints.yaml:");
                if let Some(e) = &h.error {
                    let _ = writeln!(s, "  unusable: {e}");
                }
                for t in &h.templates {
                    let _ = writeln!(s, "  {t}");
                }
                if !h.value_paths.is_empty() {
                    let _ = writeln!(s, "  reads values: {}", h.value_paths.join(", "));
                }
            }
        }
        if self.kind == BundleKind::Bundle {
            let _ = writeln!(s, "\noriginal-chart/: {} files", self.chart_files);
        }
        s
    }
}
