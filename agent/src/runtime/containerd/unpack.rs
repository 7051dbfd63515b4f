//! Unpacking into snapshots: Prepare on the parent chain ID, apply the layer (this agent's
//! [`apply`](super::apply) or containerd's Diff service), check the diffID, Commit under the
//! chain ID; one unpack per chain at a time. Also where the local store is found
//! ([`Containerd::store_roots`]), which decides whether this agent may apply layers itself.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    diff_client::DiffClient, introspection_client::IntrospectionClient,
    snapshots::snapshots_client::SnapshotsClient, ApplyRequest, PluginsRequest,
};
use containerd_client::types::Descriptor as CtrDescriptor;
use lade_proto::{Descriptor, UnpackHint};
use tonic::Code;
use tracing::{debug, info, instrument, warn};

use super::{apply, Containerd, UnpackMode, RUNTIME};
use crate::error::Error;
use lade_oci as oci;

/// One layer to unpack: `layer` of `image` (named in errors), whose diffID is `diff_id`, as
/// snapshot `chain_id` on `parent`, held by `lease`.
#[derive(Clone, Copy)]
pub(super) struct LayerUnpack<'a> {
    pub lease: &'a str,
    pub image: &'a str,
    pub layer: &'a oci::Descriptor,
    pub diff_id: &'a str,
    pub parent: Option<&'a str>,
    pub chain_id: &'a str,
}

const LABEL_SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";

/// `dir`, or its parent while `dir` does not exist but the parent does. containerd 1.7 and
/// later create the content store's directory with the first blob written, not at startup:
/// on a fresh node only containerd's root, which will hold it, can be checked and measured.
pub(super) fn existing_or_parent(dir: &Path) -> &Path {
    match dir.parent() {
        Some(parent) if !dir.exists() && parent.is_dir() => parent,
        _ => dir,
    }
}

/// The smallest decompression bound of a layer, whatever its stored size.
const LAYER_LIMIT_FLOOR: u64 = 256 << 20;

/// What the agent needs to apply layers itself: where containerd keeps blobs.
#[derive(Clone, Debug)]
pub(super) struct LocalStore {
    /// `<content root>/blobs`.
    blobs: PathBuf,
}

impl LocalStore {
    /// The file of a committed `sha256:` blob; `None` for any other digest.
    pub(super) fn blob_path(&self, digest: &str) -> Option<PathBuf> {
        let hex = digest.strip_prefix("sha256:")?;
        oci::is_hex64(hex).then(|| self.blobs.join("sha256").join(hex))
    }
}

/// Where [`apply`] writes a layer prepared with `mounts`, the way containerd's own
/// applier picks it: an overlay's `upperdir` (its `lowerdir`s are the layers below, nearest
/// first) with overlay whiteouts, or the source of a read-write bind mount (a first layer, or
/// the native snapshotter) with plain whiteouts. `None` for anything else.
fn apply_target(mounts: &[containerd_client::types::Mount]) -> Option<apply::Target> {
    let [mount] = mounts else { return None };
    let option = |key: &str| {
        mount
            .options
            .iter()
            .find_map(|o| o.strip_prefix(key)?.strip_prefix('='))
    };
    match mount.r#type.as_str() {
        "overlay" => Some(apply::Target {
            root: PathBuf::from(option("upperdir")?),
            parents: option("lowerdir")?.split(':').map(PathBuf::from).collect(),
            overlay: true,
        }),
        "bind" if !mount.options.iter().any(|o| o == "ro") => Some(apply::Target {
            root: PathBuf::from(&mount.source),
            parents: Vec::new(),
            overlay: false,
        }),
        _ => None,
    }
}

/// Orphan snapshot directories removed for one Prepare before giving up.
const MAX_ORPHANS_REMOVED: usize = 3;

/// The directory a Prepare failed to create because it already exists, from the overlayfs
/// snapshotter's error (`failed to rename: rename <root>/snapshots/new-123 <root>/snapshots/7:
/// file exists`). containerd 1.6 renames a new snapshot's directory into place before it
/// records the snapshot: stopped in between, it leaves a directory under an ID it will hand
/// out again, and every later Prepare fails on it until its garbage collection cleans up.
/// The ID being handed out is, by construction, recorded for no snapshot (IDs are allocated
/// in a write transaction, one at a time), so the directory belongs to none.
fn orphan_snapshot_dir(message: &str) -> Option<PathBuf> {
    if !message.contains("file exists") {
        return None;
    }
    let rest = message.split("failed to rename: rename ").nth(1)?;
    let mut words = rest.split_whitespace();
    let (tmp, target) = (
        PathBuf::from(words.next()?),
        PathBuf::from(words.next()?.strip_suffix(':')?),
    );
    let dir = target.parent()?;
    let id = target.file_name()?.to_str()?;
    let temporary = tmp.file_name()?.to_str()?.starts_with("new-");
    (dir.file_name()? == "snapshots"
        && tmp.parent()? == dir
        && temporary
        && !id.is_empty()
        && id.bytes().all(|b| b.is_ascii_digit()))
    .then_some(target)
}

fn remove_orphan(dir: &std::path::Path) -> std::io::Result<()> {
    warn!(dir = %dir.display(), "removing a snapshot directory that belongs to no snapshot (left by a containerd crash)");
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

impl Containerd {
    /// The root directories of the content store and the snapshotter, as their plugins
    /// export them.
    pub(super) async fn store_roots(&self) -> Result<(Option<PathBuf>, Option<PathBuf>), Error> {
        let plugins = IntrospectionClient::new(self.channel.clone())
            .plugins(self.req(PluginsRequest { filters: vec![] }, None))
            .await
            .map_err(Error::runtime(RUNTIME, "Introspection.Plugins"))?
            .into_inner()
            .plugins;
        let root = |r#type: &str, id: &str| {
            let p = plugins.iter().find(|p| p.r#type == r#type && p.id == id)?;
            Some(PathBuf::from(p.exports.get("root")?))
        };
        let content = root("io.containerd.content.v1", "content");
        // Some snapshotters (native on 1.6) export no root; containerd gives every plugin the
        // directory `<root>/<type>.<id>`, beside the content store's.
        let snapshots = root("io.containerd.snapshotter.v1", &self.cfg.snapshotter).or_else(|| {
            let dir = format!("io.containerd.snapshotter.v1.{}", self.cfg.snapshotter);
            Some(content.as_ref()?.parent()?.join(dir))
        });
        Ok((content, snapshots))
    }

    /// Whether this agent applies layers itself, decided once: it must run as root and see
    /// containerd's blobs and snapshots at the paths containerd names, the snapshots
    /// writable, on a snapshotter whose mounts are plain directories (overlayfs, native).
    pub(super) async fn local_store(&self) -> Result<Option<LocalStore>, Error> {
        self.local
            .get_or_try_init(|| async {
                if self.cfg.unpack == UnpackMode::Containerd {
                    return Ok(None);
                }
                let (content, snapshots) = self.store_roots().await?;
                let usable = |dir: &Option<PathBuf>, mode| {
                    dir.as_ref().is_some_and(|d| {
                        std::ffi::CString::new(d.as_os_str().as_encoded_bytes())
                            // SAFETY: a valid NUL-terminated path.
                            .is_ok_and(|p| unsafe { libc::access(p.as_ptr(), mode) } == 0)
                    })
                };
                // SAFETY: geteuid has no preconditions.
                let root = unsafe { libc::geteuid() } == 0;
                let snapshotter_ok = matches!(self.cfg.snapshotter.as_str(), "overlayfs" | "native");
                // Judged by where the content store will be if containerd has not created it.
                let content_dir = content.as_deref().map(|c| existing_or_parent(c).to_path_buf());
                let ok = root
                    && snapshotter_ok
                    && usable(&content_dir, libc::R_OK | libc::X_OK)
                    && usable(&snapshots, libc::W_OK | libc::X_OK);
                match (ok, self.cfg.unpack) {
                    (true, _) => {
                        info!(snapshotter = %self.cfg.snapshotter, "layers are applied by this agent");
                        Ok(Some(LocalStore {
                            blobs: content.unwrap_or_default().join("blobs"),
                        }))
                    }
                    (false, UnpackMode::Agent) => Err(Error::InvalidRequest(format!(
                        "--unpack agent: this agent cannot apply layers itself (it needs root, \
                         the overlayfs or native snapshotter, and containerd's content {} and \
                         snapshotter {} directories mounted read-write at those paths)",
                        content.as_deref().unwrap_or(std::path::Path::new("?")).display(),
                        snapshots.as_deref().unwrap_or(std::path::Path::new("?")).display(),
                    ))),
                    (false, _) => {
                        info!("layers are applied by containerd's Diff service");
                        Ok(None)
                    }
                }
            })
            .await
            .cloned()
    }

    /// Applies `layer` into the directories of `mounts` in this process; `None` when the
    /// mounts are not a plain directory or an overlay upper directory (then containerd does).
    pub(super) async fn apply_here(
        &self,
        store: &LocalStore,
        image: &str,
        layer: &oci::Descriptor,
        mounts: &[containerd_client::types::Mount],
    ) -> Option<Result<String, Error>> {
        let target = apply_target(mounts)?;
        let blob = store.blob_path(&layer.digest)?;
        let limit = layer
            .size
            .saturating_mul(self.cfg.max_layer_ratio)
            .max(LAYER_LIMIT_FLOOR);
        let (image, digest) = (image.to_string(), layer.digest.clone());
        let stored = digest.clone();
        let applied = tokio::task::spawn_blocking(move || {
            let bad = |source| Error::BadLayer {
                image: image.clone(),
                layer: digest.clone(),
                source,
            };
            let file = std::fs::File::open(&blob).map_err(|e| {
                bad(apply::ApplyError::Entry {
                    entry: blob.display().to_string(),
                    source: e,
                })
            })?;
            // containerd checked the blob's digest when it was committed: an uncompressed
            // layer's diffID is that digest, not worth hashing the bytes again.
            apply::apply_stored_layer(file, &target, limit, Some(&stored)).map_err(bad)
        })
        .await;
        Some(match applied {
            Ok(Ok(a)) => Ok(a.diff_id),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(Error::InvalidRequest(format!(
                "layer applier panicked: {e}"
            ))),
        })
    }

    pub(super) async fn snapshot_exists(&self, key: &str) -> Result<bool, Error> {
        match SnapshotsClient::new(self.channel.clone())
            .stat(self.req(
                StatSnapshotRequest {
                    snapshotter: self.cfg.snapshotter.clone(),
                    key: key.to_string(),
                },
                None,
            ))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(Error::runtime(RUNTIME, format!("Snapshots.Stat {key}"))(s)),
        }
    }

    /// Applies one layer on top of its parent and commits it under its chain ID.
    #[instrument(skip_all, fields(image = %unpack.image, layer = %unpack.layer.digest))]
    async fn unpack_layer(&self, unpack: &LayerUnpack<'_>) -> Result<(), Error> {
        let LayerUnpack {
            lease,
            image,
            layer,
            diff_id,
            parent,
            chain_id,
        } = *unpack;
        // Decided before anything is prepared, so refusing leaves no active snapshot.
        let store = self.local_store().await?;
        let mut snapshots = SnapshotsClient::new(self.channel.clone());
        let key = format!("extract-{} {chain_id}", uuid::Uuid::new_v4().simple());
        let labels = HashMap::from([(LABEL_SNAPSHOT_REF.to_string(), chain_id.to_string())]);
        let mut orphans_removed = 0;
        let mounts = loop {
            let prepared = snapshots
                .prepare(self.req(
                    PrepareSnapshotRequest {
                        snapshotter: self.cfg.snapshotter.clone(),
                        key: key.clone(),
                        parent: parent.unwrap_or_default().to_string(),
                        labels: labels.clone(),
                    },
                    Some(lease),
                ))
                .await;
            match prepared {
                Ok(r) => break r.into_inner().mounts,
                Err(s) if orphans_removed < MAX_ORPHANS_REMOVED => {
                    let Some(orphan) = orphan_snapshot_dir(s.message()) else {
                        return Err(Error::runtime(
                            RUNTIME,
                            format!("Snapshots.Prepare {chain_id}"),
                        )(s));
                    };
                    remove_orphan(&orphan).map_err(|e| {
                        Error::runtime(RUNTIME, format!("Snapshots.Prepare {chain_id}"))(
                            tonic::Status::new(
                                s.code(),
                                format!(
                                    "{}; {} belongs to no snapshot (containerd was stopped \
                                     between creating it and recording it) and this agent \
                                     cannot remove it ({e}): remove it, or wait for \
                                     containerd's garbage collection",
                                    s.message(),
                                    orphan.display()
                                ),
                            ),
                        )
                    })?;
                    orphans_removed += 1;
                }
                Err(s) => {
                    return Err(Error::runtime(
                        RUNTIME,
                        format!("Snapshots.Prepare {chain_id}"),
                    )(s))
                }
            }
        };

        let here = match &store {
            Some(store) => self.apply_here(store, image, layer, &mounts).await,
            None => None,
        };
        let applied = match here {
            Some(result) => result,
            None => self.diff_apply(lease, layer, mounts).await,
        };

        let result = match applied {
            Err(e) => Err(e),
            Ok(actual) if actual != diff_id => Err(Error::DiffIdMismatch {
                image: image.to_string(),
                layer: layer.digest.clone(),
                expected: diff_id.to_string(),
                actual,
            }),
            Ok(_) => {
                match snapshots
                    .commit(self.req(
                        CommitSnapshotRequest {
                            snapshotter: self.cfg.snapshotter.clone(),
                            name: chain_id.to_string(),
                            key: key.clone(),
                            labels,
                        },
                        Some(lease),
                    ))
                    .await
                {
                    Ok(_) => return Ok(()),
                    // Another import committed the same chain meanwhile: same content.
                    Err(s) if s.code() == Code::AlreadyExists => Ok(()),
                    Err(s) => Err(Error::runtime(
                        RUNTIME,
                        format!("Snapshots.Commit {chain_id}"),
                    )(s)),
                }
            }
        };
        // The active snapshot is useless now; remove it rather than leave it to the lease.
        if let Err(s) = snapshots
            .remove(self.req(
                RemoveSnapshotRequest {
                    snapshotter: self.cfg.snapshotter.clone(),
                    key: key.clone(),
                },
                Some(lease),
            ))
            .await
        {
            warn!(%key, error = %s, "could not remove active snapshot");
        }
        result
    }

    /// containerd's Diff service applies `layer` into `mounts`; returns the diffID it saw.
    pub(super) async fn diff_apply(
        &self,
        lease: &str,
        layer: &oci::Descriptor,
        mounts: Vec<containerd_client::types::Mount>,
    ) -> Result<String, Error> {
        DiffClient::new(self.channel.clone())
            .apply(self.req(
                ApplyRequest {
                    diff: Some(CtrDescriptor {
                        media_type: layer.media_type.clone(),
                        digest: layer.digest.clone(),
                        size: layer.size as i64,
                        annotations: HashMap::new(),
                    }),
                    mounts,
                    ..Default::default()
                },
                Some(lease),
            ))
            .await
            .map(|r| r.into_inner().applied.map(|d| d.digest).unwrap_or_default())
            .map_err(Error::runtime(
                RUNTIME,
                format!("Diff.Apply {}", layer.digest),
            ))
    }

    /// Unpacks a layer as the snapshot of its chain ID unless that snapshot exists; returns
    /// whether it unpacked. One unpack of a chain at a time (the others wait, then find it
    /// committed), and no more at once than the unpack slots.
    pub(super) async fn unpack_chain(&self, unpack: &LayerUnpack<'_>) -> Result<bool, Error> {
        let chain_id = unpack.chain_id;
        let work = async {
            if self.snapshot_exists(chain_id).await? {
                return Ok(false);
            }
            let _slot = self
                .unpack_slots
                .acquire()
                .await
                .expect("the unpack semaphore is never closed");
            self.unpack_layer(unpack).await?;
            Ok(true)
        };
        self.chains.exclusive(chain_id, work).await
    }

    /// [`Runtime::unpack_ahead`]: unpacks a layer just stored when its parent chain is
    /// (or is about to be) unpacked.
    pub(super) async fn unpack_ahead_of_import(
        &self,
        session: String,
        layer: Descriptor,
        hint: UnpackHint,
    ) -> bool {
        if oci::validate_digest(&hint.diff_id).is_err()
            || !oci::is_layer_media_type(&layer.media_type)
        {
            return false;
        }
        let parent = Some(hint.parent_chain_id.as_str()).filter(|p| !p.is_empty());
        if parent.is_some_and(|p| oci::validate_digest(p).is_err()) {
            return false;
        }
        let chain = match parent {
            Some(p) => oci::chain_id(p, &hint.diff_id),
            None => hint.diff_id.clone(),
        };
        let lease = Self::lease_id(&session);
        let desc = oci::Descriptor {
            media_type: layer.media_type.clone(),
            digest: layer.digest.clone(),
            size: layer.size,
        };
        let outcome = async {
            // The parent is usually being unpacked ahead right now (its blob came first):
            // wait for it to finish. If it is not there after that, Import unpacks in order.
            if let Some(p) = parent {
                let mut tries = 0;
                loop {
                    self.chains.exclusive(p, async {}).await;
                    if self.snapshot_exists(p).await? {
                        break;
                    }
                    // Its task may not have started yet.
                    tries += 1;
                    if tries == 4 {
                        return Ok(false);
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
            self.unpack_chain(&LayerUnpack {
                lease: &lease,
                image: "(ahead of import)",
                layer: &desc,
                diff_id: &hint.diff_id,
                parent,
                chain_id: &chain,
            })
            .await
        }
        .await;
        match outcome {
            Ok(unpacked) => unpacked,
            Err(e) => {
                debug!(layer = %layer.digest, error = %e, "unpacking ahead failed; Import will retry");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_sha256_digest_of_64_lowercase_hex_digits_names_a_blob_file() {
        let store = LocalStore {
            blobs: PathBuf::from("/var/lib/containerd/io.containerd.content.v1.content/blobs"),
        };
        let hex = "ab".repeat(32);
        assert_eq!(
            store.blob_path(&format!("sha256:{hex}")),
            Some(store.blobs.join("sha256").join(&hex))
        );
        for bad in [
            format!("sha512:{hex}"),
            format!("sha256:{}", "AB".repeat(32)),
            format!("sha256:{}", &hex[..63]),
            format!("sha256:../{}", &hex[..61]),
            "sha256:".to_string(),
        ] {
            assert_eq!(store.blob_path(&bad), None, "{bad}");
        }
    }

    #[test]
    fn only_a_numbered_snapshot_directory_named_by_a_failed_rename_is_an_orphan() {
        let root = "/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots";
        let msg = |from: &str, to: &str, why: &str| {
            format!("failed to rename: rename {root}/{from} {root}/{to}: {why}")
        };
        assert_eq!(
            orphan_snapshot_dir(&msg("new-3501627526", "2", "file exists")),
            Some(PathBuf::from(format!("{root}/2")))
        );
        for bad in [
            msg("new-1", "2", "permission denied"),
            msg("new-1", "../2", "file exists"),
            msg("new-1", "metadata.db", "file exists"),
            msg("other-1", "2", "file exists"),
            "failed to stat parent: file exists".to_string(),
        ] {
            assert_eq!(orphan_snapshot_dir(&bad), None, "{bad}");
        }
        let elsewhere = "failed to rename: rename /data/new-1 /data/2: file exists";
        assert_eq!(orphan_snapshot_dir(elsewhere), None);
    }

    #[test]
    fn a_content_store_not_created_yet_is_judged_by_containerds_root() {
        let root = tempfile::tempdir().unwrap();
        let content = root.path().join("io.containerd.content.v1.content");
        assert_eq!(existing_or_parent(&content), root.path());
        std::fs::create_dir(&content).unwrap();
        assert_eq!(existing_or_parent(&content), content);
        let nowhere = root.path().join("a/b");
        assert_eq!(existing_or_parent(&nowhere), nowhere);
    }
}
