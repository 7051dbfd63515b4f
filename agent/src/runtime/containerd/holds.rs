//! Hold records in containerd itself, so they outlive the agent and need no host file.
//!
//! A bundle version held on the node is one lease that never expires (no
//! `containerd.io/gc.expire` label), named `lade-hold.<bundle hash>.<record hash>` and
//! labelled with the bundle, the version and the digest of the record: the [`Held`] message,
//! prost-encoded, stored as a content blob the lease holds. The lease also holds every blob
//! of the version and the committed snapshots of its unpacked layers (keyed by chain ID, as
//! [`unpack`](super::unpack) commits them), so containerd's garbage collection takes none of
//! them while the record lasts, whatever happens to the image names.
//!
//! containerd cannot relabel a lease, so a changed record is a new lease: created and filled
//! before the old one is deleted, leaving no moment where the version's content is unheld.
//! Should the agent stop in between, two leases name the version; the newer one counts and
//! the next hold or drop removes the other.
//!
//! Images the records name carry `lade.io/bundle.<bundle>=<versions>` so that `ctr images
//! ls` shows what holds them.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use containerd_client::services::v1::{
    containers_client::ContainersClient, images_client::ImagesClient, leases_client::LeasesClient,
    AddResourceRequest, CreateRequest as CreateLeaseRequest, DeleteImageRequest,
    DeleteRequest as DeleteLeaseRequest, Image, Lease, ListContainersRequest,
    ListRequest as ListLeasesRequest, Resource, UpdateImageRequest, WriteAction,
    WriteContentRequest,
};
use containerd_client::types::Descriptor as CtrDescriptor;
use lade_proto::{Descriptor, Held};
use prost::Message;
use tonic::Code;
use tracing::{debug, warn};

use super::{Containerd, ImageStore, RUNTIME};
use crate::error::Error;
use crate::holds;
use crate::runtime::users_of;
use lade_oci::{self as oci, chain_ids, Manifest, MAX_METADATA_BYTES};

/// Prefix of every hold lease's id.
const LEASE_PREFIX: &str = "lade-hold.";
/// Lease labels: the bundle and version held, and the digest of the record blob.
const LABEL_BUNDLE: &str = "lade.io/hold.bundle";
const LABEL_VERSION: &str = "lade.io/hold.version";
const LABEL_RECORD: &str = "lade.io/hold.record";
/// Image label prefix naming a bundle that holds the image; the value lists its versions.
const LABEL_IMAGE_BUNDLE: &str = "lade.io/bundle.";
/// CRI's container labels naming the pod and container.
const LABEL_POD: &str = "io.kubernetes.pod.name";
const LABEL_CONTAINER: &str = "io.kubernetes.container.name";

/// The first 16 hex digits of the sha256 of `bytes`.
fn short_hash(bytes: &[u8]) -> String {
    let digest = oci::sha256_digest(bytes);
    digest["sha256:".len().."sha256:".len() + 16].to_string()
}

/// The lease id of record `record` (its blob's digest) of `bundle` `version`: a containerd
/// identifier whatever the names are, unique per version and record.
fn lease_id(bundle: &str, version: &str, record: &str) -> String {
    let who = short_hash(format!("{bundle}\0{version}").as_bytes());
    let what = record.strip_prefix("sha256:").unwrap_or(record);
    format!("{LEASE_PREFIX}{who}.{}", &what[..what.len().min(16)])
}

/// The image label key naming `bundle`: characters other than `[A-Za-z0-9._-]` become `_`
/// (the label only informs; records are the truth).
fn image_label(bundle: &str) -> String {
    let safe: String = bundle
        .chars()
        .map(|c| match c {
            'A'..='Z' | 'a'..='z' | '0'..='9' | '.' | '_' | '-' => c,
            _ => '_',
        })
        .collect();
    format!("{LABEL_IMAGE_BUNDLE}{safe}")
}

/// How a container is named to the user: `pod/container` under CRI, else its id.
fn container_name(id: &str, labels: &HashMap<String, String>) -> String {
    match (labels.get(LABEL_POD), labels.get(LABEL_CONTAINER)) {
        (Some(pod), Some(container)) => format!("{pod}/{container}"),
        (Some(pod), None) => format!("{pod} (pod sandbox {id})"),
        _ => id.to_string(),
    }
}

/// Whether image record `name` is an image ID (`sha256:<hex>`), as CRI names its records.
fn is_image_id(name: &str) -> bool {
    oci::validate_digest(name).is_ok()
}

/// One hold lease as listed.
struct HoldLease {
    id: String,
    bundle: String,
    version: String,
    record: String,
    created: (i64, i32),
}

impl HoldLease {
    fn from_lease(lease: Lease) -> Option<HoldLease> {
        if !lease.id.starts_with(LEASE_PREFIX) {
            return None;
        }
        let label = |k: &str| lease.labels.get(k).cloned();
        let created = lease.created_at.map_or((0, 0), |t| (t.seconds, t.nanos));
        Some(HoldLease {
            bundle: label(LABEL_BUNDLE)?,
            version: label(LABEL_VERSION)?,
            record: label(LABEL_RECORD)?,
            created,
            id: lease.id,
        })
    }
}

impl Containerd {
    fn leases(&self) -> LeasesClient<tonic::transport::Channel> {
        LeasesClient::new(self.channel.clone())
    }

    /// Every hold lease in the namespace.
    async fn hold_leases(&self) -> Result<Vec<HoldLease>, Error> {
        let leases = self
            .leases()
            .list(self.req(ListLeasesRequest { filters: vec![] }, None))
            .await
            .map_err(Error::runtime(RUNTIME, "Leases.List"))?
            .into_inner()
            .leases;
        Ok(leases
            .into_iter()
            .filter_map(HoldLease::from_lease)
            .collect())
    }

    /// Adds resource `id` of `type` (`content`, `snapshots/<snapshotter>`) to `lease`.
    pub(super) async fn add_resource(
        &self,
        lease: &str,
        r#type: &str,
        id: &str,
    ) -> Result<(), Error> {
        self.leases()
            .add_resource(self.req(
                AddResourceRequest {
                    id: lease.to_string(),
                    resource: Some(Resource {
                        id: id.to_string(),
                        r#type: r#type.to_string(),
                    }),
                },
                None,
            ))
            .await
            .map_err(Error::runtime(
                RUNTIME,
                format!("Leases.AddResource {lease} {type} {id}"),
            ))?;
        Ok(())
    }

    async fn delete_lease(&self, id: &str, sync: bool) -> Result<(), Error> {
        match self
            .leases()
            .delete(self.req(
                DeleteLeaseRequest {
                    id: id.to_string(),
                    sync,
                },
                None,
            ))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(Error::runtime(RUNTIME, format!("Leases.Delete {id}"))(s)),
        }
    }

    /// Stores the small blob `bytes` (digest `digest`) under `lease`, which then holds it.
    async fn write_record(&self, lease: &str, digest: &str, bytes: Vec<u8>) -> Result<(), Error> {
        let total = bytes.len() as i64;
        let first = WriteContentRequest {
            action: WriteAction::Commit as i32,
            r#ref: format!("lade-hold-{digest}"),
            total,
            expected: digest.to_string(),
            offset: 0,
            data: bytes,
            ..Default::default()
        };
        let written = self
            .content()
            .write(self.req(tokio_stream::iter(vec![first]), Some(lease)))
            .await;
        let outcome = match written {
            Ok(r) => {
                let mut responses = r.into_inner();
                loop {
                    match responses.message().await {
                        Ok(Some(_)) => continue,
                        Ok(None) => break Ok(()),
                        Err(s) => break Err(s),
                    }
                }
            }
            Err(s) => Err(s),
        };
        match outcome {
            Ok(()) => Ok(()),
            // Stored already (the same record held before): hold it explicitly.
            Err(s) if s.code() == Code::AlreadyExists => {
                self.add_resource(lease, "content", digest).await
            }
            Err(s) => Err(Error::runtime(
                RUNTIME,
                format!("Content.Write hold record {digest}"),
            )(s)),
        }
    }

    /// The chain IDs of the layers of `target` this node unpacks (the manifest for its
    /// platform); `None` when the image's metadata is not all here.
    async fn unpacked_chains(&self, image: &str, target: &Descriptor) -> Option<Vec<String>> {
        let mut desc = oci::Descriptor {
            media_type: target.media_type.clone(),
            digest: target.digest.clone(),
            size: target.size,
        };
        if oci::is_index(&desc.media_type) {
            let bytes = self.read_small(image, &desc).await.ok()?;
            let index = oci::Index::parse(&desc.digest, &bytes).ok()?;
            let node = self.cfg.platform.parse::<oci::Platform>().ok()?;
            desc = index.entry_for(&node)?.descriptor();
        }
        let bytes = self.read_small(image, &desc).await.ok()?;
        let manifest = Manifest::parse(&desc.digest, &bytes).ok()?;
        let config = self.read_small(image, &manifest.config).await.ok()?;
        let diff_ids = manifest.layer_diff_ids(&desc.digest, &config).ok()?;
        Some(chain_ids(&diff_ids))
    }

    /// Records `held`: a lease holding its record, blobs and snapshots, then the end of any
    /// earlier lease of the same version, then the image labels.
    pub(super) async fn hold_version(&self, held: Held) -> Result<(), Error> {
        let bytes = held.encode_to_vec();
        if bytes.len() as u64 > MAX_METADATA_BYTES {
            return Err(Error::InvalidRequest(format!(
                "hold: the record of {} {} is {} bytes, more than {MAX_METADATA_BYTES}",
                held.bundle,
                held.version,
                bytes.len()
            )));
        }
        let digest = oci::sha256_digest(&bytes);
        let id = lease_id(&held.bundle, &held.version, &digest);
        let earlier: Vec<HoldLease> = self
            .hold_leases()
            .await?
            .into_iter()
            .filter(|l| l.bundle == held.bundle && l.version == held.version && l.id != id)
            .collect();
        let labels = HashMap::from([
            (LABEL_BUNDLE.to_string(), held.bundle.clone()),
            (LABEL_VERSION.to_string(), held.version.clone()),
            (LABEL_RECORD.to_string(), digest.clone()),
        ]);
        match self
            .leases()
            .create(self.req(
                CreateLeaseRequest {
                    id: id.clone(),
                    labels,
                },
                None,
            ))
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == Code::AlreadyExists => {}
            Err(s) => return Err(Error::runtime(RUNTIME, format!("Leases.Create {id}"))(s)),
        }
        for blob in holds::blobs(&held) {
            self.add_resource(&id, "content", &blob.digest).await?;
        }
        let snapshots = format!("snapshots/{}", self.cfg.snapshotter);
        let mut chains = BTreeSet::new();
        for image in &held.images {
            let Some(target) = &image.target else {
                continue;
            };
            match self.unpacked_chains(&image.source, target).await {
                Some(c) => chains.extend(c),
                None => {
                    debug!(image = %image.source, "metadata not all here: holding no snapshots")
                }
            }
        }
        for chain in &chains {
            self.add_resource(&id, &snapshots, chain).await?;
        }
        self.write_record(&id, &digest, bytes).await?;
        for old in &earlier {
            self.delete_lease(&old.id, false).await?;
        }
        let names: BTreeSet<String> = holds::names(&held).into_iter().collect();
        self.label_images(&held.bundle, &names).await
    }

    /// The record a hold lease points at. A record blob removed by hand (`ctr content rm`)
    /// leaves a record of just the bundle and version, so that it can still be released.
    async fn read_record(&self, lease: &HoldLease) -> Result<Held, Error> {
        let bad = |reason: String| Error::BadHoldRecord {
            record: format!("lease {} ({})", lease.id, lease.record),
            reason,
        };
        let Some(info) = self.content_info(&lease.record).await? else {
            warn!(lease = %lease.id, record = %lease.record, "the record blob of a hold is gone; only its bundle and version are known");
            return Ok(Held {
                bundle: lease.bundle.clone(),
                version: lease.version.clone(),
                ..Default::default()
            });
        };
        let size = u64::try_from(info.size).unwrap_or(0);
        if size > MAX_METADATA_BYTES {
            return Err(bad(format!("{size} bytes, more than {MAX_METADATA_BYTES}")));
        }
        let desc = oci::Descriptor {
            media_type: String::new(),
            digest: lease.record.clone(),
            size,
        };
        let bytes = self.read_small(&lease.id, &desc).await?;
        let held = Held::decode(bytes.as_slice()).map_err(|e| bad(e.to_string()))?;
        if held.bundle != lease.bundle || held.version != lease.version {
            return Err(bad(format!(
                "records {} {} but the lease is labelled {} {}",
                held.bundle, held.version, lease.bundle, lease.version
            )));
        }
        Ok(held)
    }

    /// The newest lease of each held version, and the older ones a stopped replacement left.
    async fn current_leases(&self) -> Result<(Vec<HoldLease>, Vec<HoldLease>), Error> {
        let mut by_version: BTreeMap<(String, String), Vec<HoldLease>> = BTreeMap::new();
        for lease in self.hold_leases().await? {
            by_version
                .entry((lease.bundle.clone(), lease.version.clone()))
                .or_default()
                .push(lease);
        }
        let (mut current, mut stale) = (Vec::new(), Vec::new());
        for (_, mut leases) in by_version {
            leases.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
            if let Some(newest) = leases.pop() {
                current.push(newest);
            }
            stale.extend(leases);
        }
        Ok((current, stale))
    }

    pub(super) async fn held_versions(&self) -> Result<Vec<Held>, Error> {
        let (current, _) = self.current_leases().await?;
        let mut out = Vec::with_capacity(current.len());
        for lease in &current {
            out.push(self.read_record(lease).await?);
        }
        Ok(out)
    }

    /// Deletes every lease of `bundle` `version`, collecting garbage before returning, and
    /// updates the labels of the images its records named.
    pub(super) async fn drop_version(&self, bundle: &str, version: &str) -> Result<(), Error> {
        let (current, stale) = self.current_leases().await?;
        let mut names = BTreeSet::new();
        let mut doomed = Vec::new();
        for lease in current.into_iter().chain(stale) {
            if lease.bundle != bundle || lease.version != version {
                continue;
            }
            names.extend(holds::names(&self.read_record(&lease).await?));
            doomed.push(lease.id);
        }
        if doomed.is_empty() {
            return Ok(());
        }
        let last = doomed.len() - 1;
        for (i, id) in doomed.iter().enumerate() {
            // The last deletion runs containerd's garbage collection before it answers.
            self.delete_lease(id, i == last).await?;
        }
        self.label_images(bundle, &names).await
    }

    /// Sets, on every image in `names`, the label of `bundle` to the versions held records of
    /// it (under the same label) list for that name, removing it where none does.
    async fn label_images(&self, bundle: &str, names: &BTreeSet<String>) -> Result<(), Error> {
        let key = image_label(bundle);
        let held = self.held_versions().await?;
        let mut images = ImagesClient::new(self.channel.clone());
        for name in names {
            let mut versions: Vec<&str> = held
                .iter()
                .filter(|h| image_label(&h.bundle) == key)
                .filter(|h| h.images.iter().any(|i| i.names.contains(name)))
                .map(|h| h.version.as_str())
                .collect();
            versions.sort();
            versions.dedup();
            // containerd 1.7 and later read the target of every update, whatever the mask
            // says: the record's own goes along.
            let Some(target) = self.image_target(name).await? else {
                continue;
            };
            // An empty value removes the label.
            let value = versions.join(",");
            let updated = images
                .update(self.req(
                    UpdateImageRequest {
                        image: Some(Image {
                            name: name.clone(),
                            labels: HashMap::from([(key.clone(), value)]),
                            target: Some(CtrDescriptor {
                                media_type: target.media_type,
                                digest: target.digest,
                                size: target.size as i64,
                                annotations: HashMap::new(),
                            }),
                            ..Default::default()
                        }),
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec![format!("labels.{key}")],
                        }),
                        ..Default::default()
                    },
                    None,
                ))
                .await;
            match updated {
                Ok(_) => {}
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => return Err(Error::runtime(RUNTIME, format!("Images.Update {name}"))(s)),
            }
        }
        Ok(())
    }

    pub(super) async fn blobs_present(&self, blobs: &[Descriptor]) -> Result<Vec<bool>, Error> {
        let mut out = Vec::with_capacity(blobs.len());
        for batch in blobs.chunks(16) {
            let found =
                futures::future::try_join_all(batch.iter().map(|b| self.content_info(&b.digest)))
                    .await?;
            out.extend(found.into_iter().map(|i| i.is_some()));
        }
        Ok(out)
    }

    /// Image name -> target digest, for every image record in the namespace, and every
    /// target digest -> itself (a container may name its image by digest).
    async fn targets(&self) -> Result<HashMap<String, String>, Error> {
        let mut targets = HashMap::new();
        for image in self.list_images().await? {
            if let Some(target) = image.target {
                targets.insert(target.digest.clone(), target.digest.clone());
                targets.insert(image.name, target.digest);
            }
        }
        Ok(targets)
    }

    /// The containers using this store's images as (image, name to show) pairs: the
    /// namespace's, or for dockerd's store dockerd's (by image name and by image ID, which
    /// is the target digest there).
    async fn containers(&self) -> Result<Vec<(String, String)>, Error> {
        if let ImageStore::Docker { socket, .. } = &self.cfg.store {
            let docker = crate::runtime::docker::holds::connect(socket).await?;
            return crate::runtime::docker::holds::docker_containers(&docker)
                .await
                .map_err(|e| Error::Docker {
                    node: self.cfg.node_name.clone(),
                    op: "list containers".into(),
                    source: Box::new(e),
                });
        }
        let containers = ContainersClient::new(self.channel.clone())
            .list(self.req(ListContainersRequest { filters: vec![] }, None))
            .await
            .map_err(Error::runtime(RUNTIME, "Containers.List"))?
            .into_inner()
            .containers;
        Ok(containers
            .into_iter()
            .map(|c| (c.image, container_name(&c.id, &c.labels)))
            .collect())
    }

    pub(super) async fn users(
        &self,
        names: &[String],
    ) -> Result<HashMap<String, Vec<String>>, Error> {
        let targets = self.targets().await?;
        let containers = self.containers().await?;
        Ok(users_of(names, &targets, &containers))
    }

    /// Deletes the image records `names`, then CRI's image ID records (`sha256:<config>`)
    /// of the targets they pointed at that no other name points at any more, as `crictl
    /// rmi` would: CRI makes one for every image it sees, and it alone would keep the
    /// content from garbage collection.
    pub(super) async fn delete_names(&self, names: &[String]) -> Result<(), Error> {
        let before = self.list_images().await?;
        let targets: BTreeSet<String> = before
            .iter()
            .filter(|i| names.contains(&i.name))
            .filter_map(|i| Some(i.target.as_ref()?.digest.clone()))
            .collect();
        self.delete_records(names).await?;
        let mut by_target: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for image in self.list_images().await? {
            if let Some(target) = image.target.filter(|t| targets.contains(&t.digest)) {
                by_target.entry(target.digest).or_default().push(image.name);
            }
        }
        let orphans: Vec<String> = by_target
            .into_values()
            .filter(|left| left.iter().all(|n| is_image_id(n)))
            .flatten()
            .collect();
        self.delete_records(&orphans).await
    }

    async fn delete_records(&self, names: &[String]) -> Result<(), Error> {
        let mut images = ImagesClient::new(self.channel.clone());
        for name in names {
            let deleted = images
                .delete(self.req(
                    DeleteImageRequest {
                        name: name.clone(),
                        sync: false,
                        target: None,
                    },
                    None,
                ))
                .await;
            match deleted {
                Ok(_) => {}
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => return Err(Error::runtime(RUNTIME, format!("Images.Delete {name}"))(s)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_ids_are_containerd_identifiers_whatever_the_names() {
        let record = format!("sha256:{}", "ab".repeat(32));
        for (bundle, version) in [("mod", "1.2.3"), ("a/b c", "v1+build!"), ("é", "x")] {
            let id = lease_id(bundle, version, &record);
            assert!(id.len() <= 76, "{id}");
            let parts_ok = id
                .split(['.', '_', '-'])
                .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric()));
            assert!(parts_ok, "{id}");
        }
        assert_ne!(lease_id("a", "1", &record), lease_id("a", "2", &record));
        assert_ne!(
            lease_id("a", "1", &record),
            lease_id("a", "1", &format!("sha256:{}", "cd".repeat(32)))
        );
    }

    #[test]
    fn image_labels_keep_a_safe_key() {
        assert_eq!(image_label("mod-1.x_y"), "lade.io/bundle.mod-1.x_y");
        assert_eq!(image_label("a/b=c"), "lade.io/bundle.a_b_c");
    }

    #[test]
    fn a_container_uses_a_name_or_any_other_name_of_its_target() {
        let targets = HashMap::from([
            ("r/a:1".to_string(), "sha256:a".to_string()),
            ("r/a@sha256:a".to_string(), "sha256:a".to_string()),
            ("r/b:1".to_string(), "sha256:b".to_string()),
        ]);
        let containers = vec![
            ("r/a@sha256:a".to_string(), "pod/web".to_string()),
            ("r/gone:1".to_string(), "c1".to_string()),
        ];
        let names = [
            "r/a:1".to_string(),
            "r/b:1".to_string(),
            "r/gone:1".to_string(),
        ];
        let used = users_of(&names, &targets, &containers);
        assert_eq!(used["r/a:1"], vec!["pod/web".to_string()]);
        assert_eq!(used["r/gone:1"], vec!["c1".to_string()]);
        assert!(!used.contains_key("r/b:1"));
        let cri = HashMap::from([
            (LABEL_POD.to_string(), "web-0".to_string()),
            (LABEL_CONTAINER.to_string(), "app".to_string()),
        ]);
        assert_eq!(container_name("id", &cri), "web-0/app");
        assert_eq!(container_name("id", &HashMap::new()), "id");
    }
}
