//! Images and their labels: importing a manifest or index (GC references, distribution
//! source labels), the checks on names before any is written (other content, the CRI sandbox
//! image), image records with their pins and digest references, Verify and List.

use std::collections::HashMap;

use containerd_client::services::v1::{
    images_client::ImagesClient, CreateImageRequest, GetImageRequest, Image, ListImagesRequest,
    UpdateImageRequest,
};
use containerd_client::types::Descriptor as CtrDescriptor;
use lade_proto::{Descriptor, ImageRecord, ImageSpec, ImportEvent, ImportPhase, RefStatus};
use tokio::sync::mpsc;
use tonic::Code;
use tracing::{instrument, warn};

use super::info::{major_version, pins_images};
use super::unpack::LayerUnpack;
use super::{Containerd, ImageStore, RUNTIME};
use crate::error::Error;
use crate::runtime::{canonical_name, manifest_descriptor, Named};
use lade_oci::{self as oci, chain_ids, ImageConfig, Manifest};
use lade_proto::cri;

/// Label containerd's unpacker sets on a layer blob once its diffID was verified by applying it.
const LABEL_UNCOMPRESSED: &str = "containerd.io/uncompressed";

/// CRI's image label that kubelet's image garbage collection respects (containerd >= 1.7.3).
const LABEL_PINNED: &str = "io.cri-containerd.pinned";

/// Where content came from, per registry, as `ctr pull` records it: lets a registry mirror on
/// the node (spegel, for one) serve the loaded images to other nodes.
const LABEL_SOURCE_PREFIX: &str = "containerd.io/distribution.source.";

/// The sandbox image named by CRI's verbose status `info`, whose values are JSON documents:
/// containerd 1.x reports its CRI configuration there, with `sandboxImage`. containerd 2.1
/// reports only the runtime part (the image part holds `pinned_images.sandbox`); that key is
/// taken too, at any depth, should a later version report it.
fn sandbox_image_in(info: &HashMap<String, String>) -> Option<String> {
    fn find(value: &serde_json::Value) -> Option<String> {
        match value {
            serde_json::Value::Object(map) => {
                for (key, inner) in map {
                    let found = match (key.as_str(), inner) {
                        ("sandboxImage" | "sandbox_image", serde_json::Value::String(s)) => {
                            Some(s.clone())
                        }
                        ("pinned_images" | "pinnedImages", serde_json::Value::Object(pins)) => pins
                            .get("sandbox")
                            .and_then(|s| s.as_str())
                            .map(str::to_string),
                        _ => find(inner),
                    };
                    if let Some(name) = found.filter(|n| !n.is_empty()) {
                        return Some(name);
                    }
                }
                None
            }
            serde_json::Value::Array(items) => items.iter().find_map(find),
            _ => None,
        }
    }
    let mut keys: Vec<&String> = info.keys().collect();
    keys.sort();
    keys.into_iter()
        .filter_map(|k| serde_json::from_str::<serde_json::Value>(&info[k]).ok())
        .find_map(|v| find(&v))
}

/// containerd 2.x's default `pinned_images.sandbox` (2.0 and 2.1), what its CRI runs pods
/// from unless configured otherwise. Its CRI status does not report the configured one.
const CONTAINERD2_SANDBOX_IMAGE: &str = "registry.k8s.io/pause:3.10";

/// `containerd.io/distribution.source.<registry>` labels for content named by `names`
/// (normalised references), merged with the repositories `existing` labels already list.
fn source_labels(
    names: &[String],
    existing: Option<&HashMap<String, String>>,
) -> HashMap<String, String> {
    let mut repos: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    for name in names {
        let Some((registry, rest)) = name.split_once('/') else {
            continue;
        };
        let rest = rest.split_once('@').map_or(rest, |(r, _)| r);
        // A tag follows the last ':' after the last '/'.
        let repo = match rest.rsplit_once(':') {
            Some((r, tag)) if !tag.contains('/') => r,
            _ => rest,
        };
        repos
            .entry(registry.to_string())
            .or_default()
            .insert(repo.to_string());
    }
    repos
        .into_iter()
        .map(|(registry, mut set)| {
            let key = format!("{LABEL_SOURCE_PREFIX}{registry}");
            if let Some(old) = existing.and_then(|l| l.get(&key)) {
                set.extend(old.split(',').filter(|r| !r.is_empty()).map(str::to_string));
            }
            (key, set.into_iter().collect::<Vec<_>>().join(","))
        })
        .collect()
}

/// `names` and, for each tagged one, its digest reference `repo@<digest>`, as a registry pull
/// records both: CRI lists those in `repoDigests`, and a pod that pins the image by digest
/// finds it instead of pulling.
fn with_digest_references(names: &[String], digest: &str) -> Vec<String> {
    let mut all = names.to_vec();
    for name in names {
        if name.contains('@') {
            continue;
        }
        let last = name.rfind('/').map_or(0, |i| i + 1);
        let repo = match name[last..].rfind(':') {
            Some(i) => &name[..last + i],
            None => name.as_str(),
        };
        let reference = format!("{repo}@{digest}");
        if !all.contains(&reference) {
            all.push(reference);
        }
    }
    all
}

impl Containerd {
    /// Imports one image: every layer unpacked, GC labels set, then (only then) its names.
    /// The target is a manifest, or an index whose every manifest is present (the node's
    /// own platform is unpacked, the others are kept as content).
    #[instrument(skip_all, fields(image = %spec.source))]
    pub(super) async fn import_one(
        &self,
        lease: &str,
        spec: &ImageSpec,
        events: &mpsc::Sender<ImportEvent>,
    ) -> Result<Named, Error> {
        let mdesc = manifest_descriptor(spec)?;
        self.check_names(spec, &mdesc).await?;
        let media_type = if oci::is_index(&mdesc.media_type) {
            self.import_index(lease, spec, &mdesc, events).await?;
            mdesc.media_type.clone()
        } else {
            let manifest = self
                .import_manifest(lease, spec, &mdesc, true, events)
                .await?;
            match (mdesc.media_type.is_empty(), manifest.media_type.is_empty()) {
                (false, _) => mdesc.media_type.clone(),
                (true, false) => manifest.media_type,
                (true, true) => oci::MEDIA_TYPE_OCI_MANIFEST.to_string(),
            }
        };
        let target = CtrDescriptor {
            media_type,
            digest: mdesc.digest.clone(),
            size: mdesc.size as i64,
            annotations: HashMap::new(),
        };
        let pin = self.pins().await?;
        let names = match self.cfg.store {
            ImageStore::Cri => with_digest_references(&spec.names, &mdesc.digest),
            // `docker pull` makes the tag alone; a digest record would show as a second image.
            ImageStore::Docker { .. } => spec.names.clone(),
        };
        for name in &names {
            self.put_image(name, &target, pin).await?;
        }
        Ok(Named {
            names,
            digest: mdesc.digest,
        })
    }

    /// Every manifest of index `idesc`, then the index's own GC references to them. Only the
    /// manifest for this node's platform is unpacked: the others are content for a registry
    /// mirror or a later export, as `ctr import --all-platforms` keeps them.
    pub(super) async fn import_index(
        &self,
        lease: &str,
        spec: &ImageSpec,
        idesc: &oci::Descriptor,
        events: &mpsc::Sender<ImportEvent>,
    ) -> Result<(), Error> {
        let image = spec.source.as_str();
        let index = oci::Index::parse(&idesc.digest, &self.read_small(image, idesc).await?)?;
        let own = self
            .cfg
            .platform
            .parse::<oci::Platform>()
            .ok()
            .and_then(|node| index.entry_for(&node))
            .map(|e| e.digest.clone());
        if own.is_none() {
            warn!(%image, platform = %self.cfg.platform, "the index has no manifest for this node");
        }
        for entry in &index.manifests {
            let unpack = own.as_deref() == Some(entry.digest.as_str());
            self.import_manifest(lease, spec, &entry.descriptor(), unpack, events)
                .await?;
        }
        let existing = self.content_info(&idesc.digest).await?.map(|i| i.labels);
        let mut refs = source_labels(&spec.names, existing.as_ref());
        for (i, entry) in index.manifests.iter().enumerate() {
            refs.insert(
                format!("containerd.io/gc.ref.content.m.{i}"),
                entry.digest.clone(),
            );
        }
        self.set_labels(&idesc.digest, refs).await
    }

    /// One manifest's content: checked present, its layers unpacked when `unpack`, and GC
    /// labels set as containerd's own importer and unpacker set them.
    pub(super) async fn import_manifest(
        &self,
        lease: &str,
        spec: &ImageSpec,
        mdesc: &oci::Descriptor,
        unpack: bool,
        events: &mpsc::Sender<ImportEvent>,
    ) -> Result<Manifest, Error> {
        let image = spec.source.as_str();
        let manifest = Manifest::parse(&mdesc.digest, &self.read_small(image, mdesc).await?)?;
        let config_bytes = self.read_small(image, &manifest.config).await?;
        let diff_ids = manifest.layer_diff_ids(&mdesc.digest, &config_bytes)?;
        let mut layer_labels = Vec::with_capacity(manifest.layers.len());
        for layer in &manifest.layers {
            let Some(info) = self.content_info(&layer.digest).await? else {
                return Err(Error::MissingBlob {
                    image: image.to_string(),
                    digest: layer.digest.clone(),
                });
            };
            layer_labels.push(source_labels(&spec.names, Some(&info.labels)));
        }

        let chains = chain_ids(&diff_ids);
        for (i, layer) in manifest.layers.iter().enumerate() {
            let mut labels = std::mem::take(&mut layer_labels[i]);
            if unpack {
                let started = std::time::Instant::now();
                let parent = i.checked_sub(1).map(|p| chains[p].as_str());
                let phase = self
                    .unpack_chain(&LayerUnpack {
                        lease,
                        image,
                        layer,
                        diff_id: &diff_ids[i],
                        parent,
                        chain_id: &chains[i],
                    })
                    .await
                    .map(|unpacked| match unpacked {
                        true => ImportPhase::LayerUnpacked,
                        false => ImportPhase::LayerPresent,
                    });
                if let Err(e) = phase {
                    if e.blob_is_bad() {
                        // Whatever image names it, this blob cannot be unpacked: drop it
                        // rather than keep a bomb or an escape on the node.
                        self.discard(&layer.digest).await;
                    }
                    return Err(e);
                }
                let phase = phase?;
                labels.insert(LABEL_UNCOMPRESSED.to_string(), diff_ids[i].clone());
                let _ = events
                    .send(ImportEvent {
                        image: image.to_string(),
                        phase: phase as i32,
                        layer_digest: layer.digest.clone(),
                        duration_ms: Some(started.elapsed().as_millis() as u64),
                        ..Default::default()
                    })
                    .await;
            }
            self.set_labels(&layer.digest, labels).await?;
        }

        // GC references: image record -> manifest -> config and layers; config -> the top
        // snapshot (which holds its parents), where unpacked.
        let existing = |digest: String| async move {
            Ok::<_, Error>(self.content_info(&digest).await?.map(|i| i.labels))
        };
        let mut refs = source_labels(&spec.names, existing(mdesc.digest.clone()).await?.as_ref());
        refs.insert(
            "containerd.io/gc.ref.content.config".to_string(),
            manifest.config.digest.clone(),
        );
        for (i, layer) in manifest.layers.iter().enumerate() {
            refs.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                layer.digest.clone(),
            );
        }
        self.set_labels(&mdesc.digest, refs).await?;
        let mut config_labels = source_labels(
            &spec.names,
            existing(manifest.config.digest.clone()).await?.as_ref(),
        );
        if let (true, Some(top)) = (unpack, chains.last()) {
            config_labels.insert(
                format!("containerd.io/gc.ref.snapshot.{}", self.cfg.snapshotter),
                top.clone(),
            );
        }
        self.set_labels(&manifest.config.digest, config_labels)
            .await?;
        Ok(manifest)
    }

    /// Creates image `name` pointing at `target`, or moves an existing one there.
    pub(super) async fn put_image(
        &self,
        name: &str,
        target: &CtrDescriptor,
        pin: bool,
    ) -> Result<(), Error> {
        let labels = if pin {
            HashMap::from([(LABEL_PINNED.to_string(), "pinned".to_string())])
        } else {
            HashMap::new()
        };
        let mut paths = vec!["target".to_string()];
        paths.extend(labels.keys().map(|k| format!("labels.{k}")));
        let image = Image {
            name: name.to_string(),
            target: Some(target.clone()),
            labels,
            ..Default::default()
        };
        let mut images = ImagesClient::new(self.channel.clone());
        let created = images
            .create(self.req(
                CreateImageRequest {
                    image: Some(image.clone()),
                    ..Default::default()
                },
                None,
            ))
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => {
                // Only the target (and the pin) change: labels others put on the record
                // (CRI's) stay.
                images
                    .update(self.req(
                        UpdateImageRequest {
                            image: Some(image),
                            update_mask: Some(prost_types::FieldMask { paths }),
                            ..Default::default()
                        },
                        None,
                    ))
                    .await
                    .map_err(Error::runtime(RUNTIME, format!("Images.Update {name}")))?;
                Ok(())
            }
            Err(s) => Err(Error::runtime(RUNTIME, format!("Images.Create {name}"))(s)),
        }
    }

    /// Whether loaded images get the CRI pin label: asked for, and honoured by this
    /// containerd (1.7.3 and later).
    pub(super) async fn pins(&self) -> Result<bool, Error> {
        if !self.cfg.pin_images || self.cfg.store != ImageStore::Cri {
            return Ok(false);
        }
        Ok(pins_images(&self.version().await?))
    }

    /// Refuses `spec` before anything of it is written when one of its names already points
    /// at other content than `digest`: always for CRI's sandbox image (every new pod runs
    /// it), otherwise unless the caller allows overwriting. A name the node lacks, or has for
    /// this very digest (a re-run), is fine.
    ///
    /// A name whose content is this very image under other manifest bytes (the same config on
    /// this node's platform, as `docker load` or `ctr import` of a docker-archive make their
    /// own manifest) is not other content: it moves to the bundle's manifest like a re-run.
    pub(super) async fn check_names(
        &self,
        spec: &ImageSpec,
        mdesc: &oci::Descriptor,
    ) -> Result<(), Error> {
        let digest = mdesc.digest.as_str();
        let mut sandbox = None;
        let mut ours = None;
        for name in &spec.names {
            let Some(existing) = self.image_target(name).await? else {
                continue;
            };
            if existing.digest == digest {
                continue;
            }
            if ours.is_none() {
                ours = Some(self.config_on_node(&spec.source, mdesc).await);
            }
            if let Some(Some(config)) = &ours {
                if self.config_on_node(name, &existing).await.as_ref() == Some(config) {
                    continue;
                }
            }
            let existing = existing.digest;
            if sandbox.is_none() {
                sandbox = Some(self.sandbox_image().await?);
            }
            if sandbox.as_ref().and_then(Option::as_deref) == Some(name.as_str()) {
                return Err(Error::SandboxImage {
                    image: spec.source.clone(),
                    name: name.clone(),
                    existing,
                    wanted: digest.to_string(),
                });
            }
            if !spec.allow_overwrite {
                return Err(Error::NameTaken {
                    image: spec.source.clone(),
                    name: name.clone(),
                    existing,
                    wanted: digest.to_string(),
                });
            }
        }
        Ok(())
    }

    /// The snapshotter CRI keeps images in, from its image filesystem
    /// (`ImageService.ImageFsInfo`: `<root>/io.containerd.snapshotter.v1.<name>`); `None`
    /// when containerd serves no CRI or names no such directory.
    pub async fn cri_snapshotter(&self) -> Result<Option<String>, Error> {
        let info = cri::image_service_client::ImageServiceClient::new(self.channel.clone())
            .image_fs_info(cri::ImageFsInfoRequest {})
            .await;
        let filesystems = match info {
            Ok(r) => r.into_inner().image_filesystems,
            Err(s) if s.code() == Code::Unimplemented => return Ok(None),
            Err(s) => return Err(Error::runtime(RUNTIME, "CRI ImageService.ImageFsInfo")(s)),
        };
        Ok(filesystems
            .iter()
            .filter_map(|fs| fs.fs_id.as_ref())
            .find_map(|id| snapshotter_of(&id.mountpoint)))
    }

    /// The CRI pod sandbox image in its full form: `--sandbox-image`; else what CRI's
    /// configuration says (RuntimeService.Status, verbose: containerd 1.x); else, on
    /// containerd 2.x, whose CRI status leaves the image configuration out, its built-in
    /// default. `None` when containerd serves no CRI.
    pub(super) async fn sandbox_image(&self) -> Result<Option<String>, Error> {
        if self.cfg.store != ImageStore::Cri {
            return Ok(None);
        }
        if let Some(name) = &self.cfg.sandbox_image {
            return Ok(Some(canonical_name(name)));
        }
        let status = cri::runtime_service_client::RuntimeServiceClient::new(self.channel.clone())
            .status(cri::StatusRequest { verbose: true })
            .await;
        let reported = match status {
            Ok(r) => sandbox_image_in(&r.into_inner().info),
            Err(s) if s.code() == Code::Unimplemented => return Ok(None),
            Err(s) => return Err(Error::runtime(RUNTIME, "CRI RuntimeService.Status")(s)),
        };
        if let Some(name) = reported {
            return Ok(Some(canonical_name(&name)));
        }
        let version = self.version().await?;
        if major_version(&version) >= 2 {
            warn!(
                %version,
                default = CONTAINERD2_SANDBOX_IMAGE,
                "containerd's CRI status does not name its sandbox image; protecting its built-in default (set --sandbox-image if pinned_images.sandbox says otherwise)"
            );
            return Ok(Some(CONTAINERD2_SANDBOX_IMAGE.to_string()));
        }
        Ok(None)
    }

    /// The config digest of the image `desc` (a manifest, or an index whose entry for this
    /// node's platform is read) on this node; `None` when its content is not all here or
    /// does not parse.
    pub(super) async fn config_on_node(
        &self,
        image: &str,
        desc: &oci::Descriptor,
    ) -> Option<String> {
        let mut desc = desc.clone();
        if oci::is_index(&desc.media_type) {
            let bytes = self.read_small(image, &desc).await.ok()?;
            let index = oci::Index::parse(&desc.digest, &bytes).ok()?;
            let node = self.cfg.platform.parse::<oci::Platform>().ok()?;
            desc = index.entry_for(&node)?.descriptor();
        }
        let bytes = self.read_small(image, &desc).await.ok()?;
        Some(Manifest::parse(&desc.digest, &bytes).ok()?.config.digest)
    }

    /// The target of image record `name`, if it exists.
    pub(super) async fn image_target(&self, name: &str) -> Result<Option<oci::Descriptor>, Error> {
        match ImagesClient::new(self.channel.clone())
            .get(self.req(
                GetImageRequest {
                    name: name.to_string(),
                },
                None,
            ))
            .await
        {
            Ok(r) => Ok(r
                .into_inner()
                .image
                .and_then(|i| i.target)
                .map(|t| oci::Descriptor {
                    media_type: t.media_type,
                    digest: t.digest,
                    size: u64::try_from(t.size).unwrap_or(0),
                })),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(Error::runtime(RUNTIME, format!("Images.Get {name}"))(s)),
        }
    }

    pub(super) async fn verify_one(&self, name: &str) -> Result<RefStatus, Error> {
        let mut status = RefStatus {
            r#ref: name.to_string(),
            ..Default::default()
        };
        let image = match ImagesClient::new(self.channel.clone())
            .get(self.req(
                GetImageRequest {
                    name: name.to_string(),
                },
                None,
            ))
            .await
        {
            Ok(r) => r.into_inner().image,
            Err(s) if s.code() == Code::NotFound => None,
            Err(s) => return Err(Error::runtime(RUNTIME, format!("Images.Get {name}"))(s)),
        };
        let Some(image) = image else {
            status.problem = "no such image".to_string();
            return Ok(status);
        };
        status.pinned = image.labels.get(LABEL_PINNED).map(String::as_str) == Some("pinned");
        let Some(target) = image.target else {
            status.problem = "no such image".to_string();
            return Ok(status);
        };
        status.manifest_digest = target.digest.clone();
        let tref = oci::Descriptor {
            media_type: target.media_type,
            digest: target.digest,
            size: target.size.max(0) as u64,
        };
        // A broken record is a finding to report, not a failure of the Verify call.
        let checked = async {
            // An index: what kubelet runs here is the manifest for this node's platform.
            let mref = if oci::is_index(&tref.media_type) {
                let index = oci::Index::parse(&tref.digest, &self.read_small(name, &tref).await?)?;
                let node = self.cfg.platform.parse::<oci::Platform>().ok();
                match node.as_ref().and_then(|n| index.entry_for(n)) {
                    Some(entry) => entry.descriptor(),
                    None => {
                        return Err(Error::BadManifest {
                            digest: tref.digest.clone(),
                            reason: format!(
                                "the index has no manifest for this node's platform {}",
                                self.cfg.platform
                            ),
                        })
                    }
                }
            } else {
                tref.clone()
            };
            let manifest = Manifest::parse(&mref.digest, &self.read_small(name, &mref).await?)?;
            let config = self.read_small(name, &manifest.config).await?;
            let diff_ids = ImageConfig::diff_ids(&manifest.config.digest, &config)?;
            for layer in &manifest.layers {
                if self.content_info(&layer.digest).await?.is_none() {
                    return Err(Error::MissingBlob {
                        image: name.to_string(),
                        digest: layer.digest.clone(),
                    });
                }
            }
            let unpacked = match chain_ids(&diff_ids).last() {
                Some(top) => self.snapshot_exists(top).await?,
                None => true,
            };
            Ok::<_, Error>((manifest.config.digest, unpacked))
        }
        .await;
        match checked {
            Ok((config, true)) => {
                status.image_id = config;
                status.ok = true;
            }
            Ok((config, false)) => {
                status.image_id = config;
                status.problem =
                    format!("not unpacked into the {} snapshotter", self.cfg.snapshotter);
            }
            Err(e) => status.problem = e.to_string(),
        }
        Ok(status)
    }

    /// Every image record in the namespace.
    pub(super) async fn list_images(&self) -> Result<Vec<ImageRecord>, Error> {
        let images = ImagesClient::new(self.channel.clone())
            .list(self.req(ListImagesRequest { filters: vec![] }, None))
            .await
            .map_err(Error::runtime(RUNTIME, "Images.List"))?
            .into_inner()
            .images;
        Ok(images
            .into_iter()
            .map(|i| ImageRecord {
                name: i.name,
                target: i.target.map(|t| Descriptor {
                    digest: t.digest,
                    size: t.size.max(0) as u64,
                    media_type: t.media_type,
                    ..Default::default()
                }),
            })
            .collect())
    }
}

/// The snapshotter whose root directory is `mountpoint` (`.../io.containerd.snapshotter.v1.<name>`).
fn snapshotter_of(mountpoint: &str) -> Option<String> {
    let dir = mountpoint.trim_end_matches('/').rsplit('/').next()?;
    let name = dir.strip_prefix("io.containerd.snapshotter.v1.")?;
    (!name.is_empty()).then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_snapshotter_is_read_from_cris_image_filesystem() {
        let root = "/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs";
        assert_eq!(snapshotter_of(root).as_deref(), Some("overlayfs"));
        assert_eq!(
            snapshotter_of(&format!("{root}/")).as_deref(),
            Some("overlayfs")
        );
        let native = "/tmp/x/root/io.containerd.snapshotter.v1.native";
        assert_eq!(snapshotter_of(native).as_deref(), Some("native"));
        assert_eq!(snapshotter_of("/var/lib/containerd"), None);
        assert_eq!(snapshotter_of("/x/io.containerd.snapshotter.v1."), None);
    }

    #[test]
    fn the_sandbox_image_is_read_from_cri_status_info() {
        let one = HashMap::from([
            ("golang".to_string(), "\"go1.20\"".to_string()),
            (
                "config".to_string(),
                r#"{"containerd":{"snapshotter":"overlayfs"},"sandboxImage":"registry.k8s.io/pause:3.6"}"#
                    .to_string(),
            ),
        ]);
        assert_eq!(
            sandbox_image_in(&one).as_deref(),
            Some("registry.k8s.io/pause:3.6")
        );
        let two = HashMap::from([(
            "imageConfig".to_string(),
            r#"{"snapshotter":"overlayfs","pinned_images":{"sandbox":"registry.k8s.io/pause:3.10"}}"#
                .to_string(),
        )]);
        assert_eq!(
            sandbox_image_in(&two).as_deref(),
            Some("registry.k8s.io/pause:3.10")
        );
        let none = HashMap::from([
            ("config".to_string(), r#"{"sandboxImage":""}"#.to_string()),
            ("lastCNILoadStatus".to_string(), "OK".to_string()),
        ]);
        assert_eq!(sandbox_image_in(&none), None);
        assert_eq!(major_version("2.1.9+ds1-5"), 2);
        assert_eq!(major_version("v1.7.13"), 1);
        assert_eq!(major_version("devel"), 0);
    }

    #[test]
    fn source_labels_group_repositories_by_registry_and_keep_old_ones() {
        let names = [
            "10.16.10.111/demo/app:v1".to_string(),
            "10.16.10.111/demo/app-extra:v1".to_string(),
            "docker.io/library/busybox:latest".to_string(),
            "localhost:5000/x/y@sha256:0000000000000000000000000000000000000000000000000000000000000000".to_string(),
        ];
        let existing = HashMap::from([(
            "containerd.io/distribution.source.docker.io".to_string(),
            "library/alpine".to_string(),
        )]);
        let labels = source_labels(&names, Some(&existing));
        assert_eq!(
            labels["containerd.io/distribution.source.10.16.10.111"],
            "demo/app,demo/app-extra"
        );
        assert_eq!(
            labels["containerd.io/distribution.source.docker.io"],
            "library/alpine,library/busybox"
        );
        assert_eq!(
            labels["containerd.io/distribution.source.localhost:5000"],
            "x/y"
        );
        assert_eq!(labels.len(), 3);
    }
}

#[cfg(test)]
mod digest_reference_tests {
    use super::with_digest_references;

    #[test]
    fn every_tagged_name_gets_its_repository_at_the_digest_once() {
        let d = format!("sha256:{}", "a".repeat(64));
        let names = [
            "10.6.0.9:5000/ghippo/api:v1".to_string(),
            "10.6.0.9:5000/ghippo/api:v2".to_string(),
            format!("docker.io/library/busybox@{d}"),
        ];
        assert_eq!(
            with_digest_references(&names, &d),
            [
                names[0].clone(),
                names[1].clone(),
                names[2].clone(),
                format!("10.6.0.9:5000/ghippo/api@{d}"),
            ]
        );
    }
}
