//! [`Runtime`] on containerd, through its own gRPC API (`containerd-client`), no `ctr`.
//!
//! Owns the containerd call sequence: content writes and GC labels, unpacking through the
//! Snapshots and Diff services, image records. Every call is scoped to one namespace
//! (`k8s.io` by default, what kubelet uses); work in progress is held by a lease named after
//! the load session, so containerd's garbage collector cannot take a blob between upload and
//! import, and an abandoned load disappears when the lease expires.
//!
//! containerd 1.6 has no Transfer service, so this uses the lower-level services the way
//! containerd's own unpacker does: Prepare a snapshot on the parent chain ID, Apply the layer
//! into its mounts, check the diffID, Commit it under its chain ID.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    content_client::ContentClient, diff_client::DiffClient, images_client::ImagesClient,
    introspection_client::IntrospectionClient, leases_client::LeasesClient,
    snapshots::snapshots_client::SnapshotsClient, version_client::VersionClient, AbortRequest,
    AddResourceRequest, ApplyRequest, CreateImageRequest, CreateRequest as CreateLeaseRequest,
    DeleteRequest as DeleteLeaseRequest, GetImageRequest, Image, Info as ContentInfo,
    InfoRequest as ContentInfoRequest, ListImagesRequest, PluginsRequest, ReadContentRequest,
    Resource, StatusRequest, UpdateImageRequest, UpdateRequest as ContentUpdateRequest,
    WriteAction, WriteContentRequest,
};
use containerd_client::types::Descriptor as CtrDescriptor;
use futures::stream::{BoxStream, StreamExt};
use lade_proto::{
    BlobHeader, BlobState, Descriptor, ImageRecord, ImageSpec, ImportEvent, ImportPhase,
    InfoResponse, PutBlobResponse, RefStatus, UnpackHint,
};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Request};
use tracing::{debug, info, instrument, warn};

use super::{canonical_name, finished_event, manifest_descriptor, Named, Runtime};
use crate::error::Error;
use crate::oci::{self, chain_ids, ImageConfig, Manifest, MAX_METADATA_BYTES};

pub mod apply;

#[allow(clippy::all, missing_docs)]
mod cri {
    tonic::include_proto!("runtime.v1");
}

const RUNTIME: &str = "containerd";
/// Label containerd's unpacker sets on a layer blob once its diffID was verified by applying it.
const LABEL_UNCOMPRESSED: &str = "containerd.io/uncompressed";
/// Lease label after which containerd's GC drops the lease and what only it held.
const LABEL_EXPIRE: &str = "containerd.io/gc.expire";
const LABEL_SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
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

/// Whether containerd `version` (as its Version service reports it, e.g. `1.6.20~ds1` or
/// `v1.7.13`) honours the CRI pin label, added in 1.7.3.
pub fn pins_images(version: &str) -> bool {
    match version_numbers(version).as_slice() {
        [major, minor, patch, ..] => (*major, *minor, *patch) >= (1, 7, 3),
        _ => false,
    }
}

/// The leading numbers of a containerd version (`v1.7.13`, `1.6.20~ds1`).
fn version_numbers(version: &str) -> Vec<u64> {
    version
        .trim_start_matches('v')
        .split(|c: char| !c.is_ascii_digit())
        .take(3)
        .map(|n| n.parse().unwrap_or(0))
        .collect()
}

/// The major version of a containerd version string (0 when unreadable).
fn major_version(version: &str) -> u64 {
    version_numbers(version).first().copied().unwrap_or(0)
}

/// containerd 2.x's default `pinned_images.sandbox` (2.0 and 2.1), what its CRI runs pods
/// from unless configured otherwise. Its CRI status does not report the configured one.
const CONTAINERD2_SANDBOX_IMAGE: &str = "registry.k8s.io/pause:3.10";

/// How long a PutBlob waits for containerd to release the ingest of a previous upload of the
/// same blob, polling every [`REF_LOCKED_POLL`]; a lock held longer is another writer's.
const REF_LOCKED_WAIT: Duration = Duration::from_secs(2);
const REF_LOCKED_POLL: Duration = Duration::from_millis(20);

/// Whether containerd refused a write because another stream holds the ingest ref
/// (`ref <ref> locked for <duration> (since <time>): unavailable`).
fn ref_locked(status: &tonic::Status) -> bool {
    status.code() == Code::Unavailable && status.message().contains(" locked for ")
}

/// `dir`, or its parent while `dir` does not exist but the parent does. containerd 1.7 and
/// later create the content store's directory with the first blob written, not at startup:
/// on a fresh node only containerd's root, which will hold it, can be checked and measured.
fn existing_or_parent(dir: &Path) -> &Path {
    match dir.parent() {
        Some(parent) if !dir.exists() && parent.is_dir() => parent,
        _ => dir,
    }
}

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

/// How to reach and use the node's containerd.
#[derive(Clone, Debug)]
pub struct ContainerdConfig {
    pub socket: PathBuf,
    pub namespace: String,
    pub snapshotter: String,
    /// Lifetime of a load session's lease: an abandoned load is collected after this.
    pub lease_ttl: Duration,
    pub node_name: String,
    /// Put the CRI pin label on loaded images (containerd 1.7.3 and later honour it).
    pub pin_images: bool,
    /// This node's platform (`os/arch[/variant]`): the manifest of an index it unpacks.
    pub platform: String,
    /// Who applies layers to snapshots.
    pub unpack: UnpackMode,
    /// Decompression bound of a layer the agent applies, times its stored size.
    pub max_layer_ratio: u64,
    /// The CRI pod sandbox (pause) image, never repointed; `None`: as CRI's configuration
    /// reports it.
    pub sandbox_image: Option<String>,
    /// Whose image store this is: CRI's (kubelet's) or dockerd's.
    pub store: ImageStore,
}

/// Whose images the containerd runtime writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageStore {
    /// CRI's (namespace `k8s.io`): kubelet finds images by tag and by `repo@sha256:` digest
    /// reference, pins keep them from its garbage collection, the sandbox image is protected.
    Cri,
    /// dockerd's containerd image store (namespace `moby`): Docker lists every image record
    /// as an image, so a pull's single tag is made and no digest reference; no CRI pin or
    /// sandbox image. The node reports itself as Docker `version`.
    Docker { version: String },
}

/// Who applies layers to snapshots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum UnpackMode {
    /// The agent where it can write containerd's snapshots, else containerd.
    Auto,
    /// The agent ([`apply`]); refused at the first layer if it cannot.
    Agent,
    /// containerd's Diff service.
    Containerd,
}

/// The smallest decompression bound of a layer, whatever its stored size.
const LAYER_LIMIT_FLOOR: u64 = 256 << 20;

/// What the agent needs to apply layers itself: where containerd keeps blobs.
#[derive(Clone, Debug)]
struct LocalStore {
    /// `<content root>/blobs`.
    blobs: PathBuf,
}

/// A connection to one containerd, scoped to one namespace and snapshotter.
pub struct Containerd {
    channel: Channel,
    cfg: ContainerdConfig,
    /// One lock per chain ID being unpacked: concurrent imports that share a base layer
    /// unpack it once, the others wait and find it committed.
    chains: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Layers applied at once: applying is CPU work (decompression) in containerd, so more
    /// than the cores only adds contention.
    unpack_slots: Arc<Semaphore>,
    /// Found at the first layer: `None` when containerd's Diff service applies layers.
    local: tokio::sync::OnceCell<Option<LocalStore>>,
}

impl Containerd {
    /// Connects lazily: the agent starts (and reports not-ready) even while containerd is down.
    pub fn new(cfg: ContainerdConfig) -> Result<Self, Error> {
        let socket = cfg.socket.clone();
        let channel = tonic::transport::Endpoint::try_from("http://[::]")
            .map_err(|e| Error::Connect {
                runtime: RUNTIME,
                socket: cfg.socket.display().to_string(),
                reason: e.to_string(),
            })?
            .connect_with_connector_lazy(tower_service(socket));
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Self {
            channel,
            cfg,
            chains: std::sync::Mutex::new(HashMap::new()),
            unpack_slots: Arc::new(Semaphore::new(cores)),
            local: tokio::sync::OnceCell::new(),
        })
    }

    /// The socket this connects to.
    pub fn socket(&self) -> &std::path::Path {
        &self.cfg.socket
    }

    /// Whether containerd answers and serves the CRI plugin, i.e. could be kubelet's runtime
    /// (for `--runtime auto`). A containerd that runs only under Docker has CRI disabled.
    /// The plugin asked for is CRI's gRPC server, `io.containerd.grpc.v1.cri`, which 1.x and
    /// 2.x both have (2.x moved the image and runtime services behind it into the
    /// `io.containerd.cri.v1.images` and `.runtime` plugins; the matrix runs this on 1.7 and
    /// 2.1).
    pub async fn serves_cri(&self) -> Result<bool, Error> {
        let plugins = IntrospectionClient::new(self.channel.clone())
            .plugins(self.req(
                PluginsRequest {
                    filters: vec!["type==io.containerd.grpc.v1,id==cri".to_string()],
                },
                None,
            ))
            .await
            .map_err(Error::runtime(RUNTIME, "Introspection.Plugins"))?
            .into_inner()
            .plugins;
        Ok(plugins.iter().any(|p| p.init_err.is_none()))
    }

    /// Free space under the content store and the snapshotter, whose directories containerd
    /// names in its plugin exports (`root`). Blobs land in `<content>/blobs` and unpacked
    /// layers in `<snapshotter>/snapshots` where those exist. Empty when containerd does not
    /// say or the agent cannot see them.
    async fn storage(&self) -> Vec<lade_proto::Storage> {
        let inner = |root: Option<PathBuf>, sub: &str| {
            root.map(|r| {
                if r.join(sub).is_dir() {
                    r.join(sub)
                } else {
                    existing_or_parent(&r).to_path_buf()
                }
            })
        };
        let (content, snapshots) = match self.store_roots().await {
            Ok((c, s)) => (inner(c, "blobs"), inner(s, "snapshots")),
            Err(e) => {
                debug!(error = %e, "cannot list containerd plugins for free space");
                return Vec::new();
            }
        };
        let dirs: Vec<(&str, &std::path::Path)> =
            [("content", &content), ("snapshots", &snapshots)]
                .into_iter()
                .filter_map(|(holds, dir)| Some((holds, dir.as_deref()?)))
                .collect();
        crate::storage::measure(&dirs)
    }

    /// The root directories of the content store and the snapshotter, as their plugins
    /// export them.
    async fn store_roots(&self) -> Result<(Option<PathBuf>, Option<PathBuf>), Error> {
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
    async fn local_store(&self) -> Result<Option<LocalStore>, Error> {
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
    async fn apply_here(
        &self,
        store: &LocalStore,
        image: &str,
        layer: &oci::Descriptor,
        mounts: &[containerd_client::types::Mount],
    ) -> Option<Result<String, Error>> {
        let target = apply_target(mounts)?;
        let hex = layer.digest.strip_prefix("sha256:")?;
        let blob = store.blobs.join("sha256").join(hex);
        let limit = layer
            .size
            .saturating_mul(self.cfg.max_layer_ratio)
            .max(LAYER_LIMIT_FLOOR);
        let (image, digest) = (image.to_string(), layer.digest.clone());
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
            apply::apply_layer(file, &target, limit).map_err(bad)
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

    /// A request in this runtime's namespace, optionally on behalf of a lease.
    fn req<T>(&self, msg: T, lease: Option<&str>) -> Request<T> {
        let mut req = Request::new(msg);
        let md = req.metadata_mut();
        // Both values were validated when configured / built from a checked session id.
        if let Ok(ns) = self.cfg.namespace.parse() {
            md.insert("containerd-namespace", ns);
        }
        if let Some(lease) = lease.and_then(|l| l.parse().ok()) {
            md.insert("containerd-lease", lease);
        }
        req
    }

    fn content(&self) -> ContentClient<Channel> {
        // Blobs up to the chunk size plus framing pass in one message.
        ContentClient::new(self.channel.clone()).max_decoding_message_size(16 << 20)
    }

    fn lease_id(session: &str) -> String {
        format!("lade-{session}")
    }

    /// Creates the session's lease if it does not exist yet; returns its id. The service
    /// checked `session` (it becomes part of the lease's name).
    async fn ensure_lease(&self, session: &str) -> Result<String, Error> {
        let id = Self::lease_id(session);
        let expire = humantime::format_rfc3339_seconds(SystemTime::now() + self.cfg.lease_ttl);
        let labels = HashMap::from([(LABEL_EXPIRE.to_string(), expire.to_string())]);
        let res = LeasesClient::new(self.channel.clone())
            .create(self.req(
                CreateLeaseRequest {
                    id: id.clone(),
                    labels,
                },
                None,
            ))
            .await;
        match res {
            Ok(_) => Ok(id),
            Err(s) if s.code() == Code::AlreadyExists => Ok(id),
            Err(s) => Err(Error::runtime(RUNTIME, "Leases.Create")(s)),
        }
    }

    async fn content_info(&self, digest: &str) -> Result<Option<ContentInfo>, Error> {
        match self
            .content()
            .info(self.req(
                ContentInfoRequest {
                    digest: digest.to_string(),
                },
                None,
            ))
            .await
        {
            Ok(r) => Ok(r.into_inner().info),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(Error::runtime(RUNTIME, format!("Content.Info {digest}"))(s)),
        }
    }

    /// Holds an existing blob for the session, so GC cannot take it before import.
    async fn hold(&self, lease: &str, digest: &str) -> Result<(), Error> {
        LeasesClient::new(self.channel.clone())
            .add_resource(self.req(
                AddResourceRequest {
                    id: lease.to_string(),
                    resource: Some(Resource {
                        id: digest.to_string(),
                        r#type: "content".to_string(),
                    }),
                },
                None,
            ))
            .await
            .map_err(Error::runtime(
                RUNTIME,
                format!("Leases.AddResource {digest}"),
            ))?;
        Ok(())
    }

    /// Bytes of an interrupted upload of `digest` still held in containerd's ingest area.
    async fn partial_offset(&self, digest: &str) -> Result<u64, Error> {
        match self
            .content()
            .status(self.req(
                StatusRequest {
                    r#ref: ingest_ref(digest),
                },
                None,
            ))
            .await
        {
            Ok(r) => Ok(r
                .into_inner()
                .status
                .map(|s| s.offset.max(0) as u64)
                .unwrap_or(0)),
            Err(s) if s.code() == Code::NotFound => Ok(0),
            Err(s) => Err(Error::runtime(RUNTIME, format!("Content.Status {digest}"))(
                s,
            )),
        }
    }

    /// Reads a small metadata blob (manifest or config) whole.
    async fn read_small(&self, image: &str, desc: &oci::Descriptor) -> Result<Vec<u8>, Error> {
        oci::check_metadata_size(desc)?;
        let mut stream = match self
            .content()
            .read(self.req(
                ReadContentRequest {
                    digest: desc.digest.clone(),
                    offset: 0,
                    size: 0,
                },
                None,
            ))
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::NotFound => {
                return Err(Error::MissingBlob {
                    image: image.to_string(),
                    digest: desc.digest.clone(),
                })
            }
            Err(s) => {
                return Err(Error::runtime(
                    RUNTIME,
                    format!("Content.Read {}", desc.digest),
                )(s))
            }
        };
        let mut out = Vec::with_capacity(desc.size as usize);
        while let Some(msg) = stream.message().await.map_err(Error::runtime(
            RUNTIME,
            format!("Content.Read {}", desc.digest),
        ))? {
            out.extend_from_slice(&msg.data);
            if out.len() as u64 > MAX_METADATA_BYTES {
                break;
            }
        }
        if out.len() as u64 != desc.size {
            return Err(Error::SizeMismatch {
                digest: desc.digest.clone(),
                expected: desc.size,
                received: out.len() as u64,
            });
        }
        Ok(out)
    }

    /// Sets labels on a blob, touching only the named keys.
    async fn set_labels(&self, digest: &str, labels: HashMap<String, String>) -> Result<(), Error> {
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        self.content()
            .update(self.req(
                ContentUpdateRequest {
                    info: Some(ContentInfo {
                        digest: digest.to_string(),
                        labels,
                        ..Default::default()
                    }),
                    update_mask: Some(prost_types::FieldMask { paths }),
                },
                None,
            ))
            .await
            .map_err(Error::runtime(RUNTIME, format!("Content.Update {digest}")))?;
        Ok(())
    }

    /// Deletes blob `digest` from the content store (logged, not failed, when it cannot).
    async fn discard(&self, digest: &str) {
        let deleted = self
            .content()
            .delete(self.req(
                containerd_client::services::v1::DeleteContentRequest {
                    digest: digest.to_string(),
                },
                None,
            ))
            .await;
        match deleted {
            Ok(_) => info!(%digest, "deleted a blob that cannot be unpacked"),
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => warn!(%digest, error = %s, "could not delete a blob that cannot be unpacked"),
        }
    }

    async fn snapshot_exists(&self, key: &str) -> Result<bool, Error> {
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

    /// Applies one layer on top of `parent` and commits it as `chain_id`.
    #[instrument(skip_all, fields(image = %image, layer = %layer.digest))]
    async fn unpack_layer(
        &self,
        lease: &str,
        image: &str,
        layer: &oci::Descriptor,
        diff_id: &str,
        parent: Option<&str>,
        chain_id: &str,
    ) -> Result<(), Error> {
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
    async fn diff_apply(
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

    /// Imports one image: every layer unpacked, GC labels set, then (only then) its names.
    /// The target is a manifest, or an index whose every manifest is present (the node's
    /// own platform is unpacked, the others are kept as content).
    #[instrument(skip_all, fields(image = %spec.source))]
    async fn import_one(
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
            if mdesc.media_type.is_empty() {
                manifest
                    .media_type
                    .unwrap_or_else(|| oci::MEDIA_TYPE_OCI_MANIFEST.to_string())
            } else {
                mdesc.media_type.clone()
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
    async fn import_index(
        &self,
        lease: &str,
        spec: &ImageSpec,
        idesc: &oci::Descriptor,
        events: &mpsc::Sender<ImportEvent>,
    ) -> Result<(), Error> {
        let image = spec.source.as_str();
        let index = oci::Index::parse(&idesc.digest, &self.read_small(image, idesc).await?)?;
        let own = oci::Platform::parse(&self.cfg.platform)
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
    async fn import_manifest(
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
                let chain_lock = self.chain_lock(&chains[i]);
                let held = chain_lock.lock().await;
                let phase = async {
                    if self.snapshot_exists(&chains[i]).await? {
                        return Ok(ImportPhase::LayerPresent);
                    }
                    let _slot = self
                        .unpack_slots
                        .acquire()
                        .await
                        .expect("the unpack semaphore is never closed");
                    let parent = i.checked_sub(1).map(|p| chains[p].as_str());
                    self.unpack_layer(lease, image, layer, &diff_ids[i], parent, &chains[i])
                        .await?;
                    Ok::<_, Error>(ImportPhase::LayerUnpacked)
                }
                .await;
                // Released on failure too, so the map holds only chains being unpacked.
                drop(held);
                self.release_chain_lock(&chains[i], chain_lock);
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
    async fn put_image(&self, name: &str, target: &CtrDescriptor, pin: bool) -> Result<(), Error> {
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

    async fn blob_state(&self, lease: &str, d: &Descriptor) -> Result<BlobState, Error> {
        let present = self.content_info(&d.digest).await?.is_some();
        let offset = if present {
            self.hold(lease, &d.digest).await?;
            0
        } else {
            self.partial_offset(&d.digest).await?
        };
        Ok(BlobState {
            digest: d.digest.clone(),
            present,
            offset,
        })
    }

    /// Whether loaded images get the CRI pin label: asked for, and honoured by this
    /// containerd (1.7.3 and later).
    async fn pins(&self) -> Result<bool, Error> {
        if !self.cfg.pin_images || self.cfg.store != ImageStore::Cri {
            return Ok(false);
        }
        Ok(pins_images(&self.version().await?))
    }

    fn chain_lock(&self, chain_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut chains = self.chains.lock().expect("chain lock map");
        chains.entry(chain_id.to_string()).or_default().clone()
    }

    /// Drops the map's entry once nobody else waits on it, so the map stays small.
    fn release_chain_lock(&self, chain_id: &str, lock: Arc<tokio::sync::Mutex<()>>) {
        let mut chains = self.chains.lock().expect("chain lock map");
        // Two references left: the map's and `lock`.
        if Arc::strong_count(&lock) == 2 {
            chains.remove(chain_id);
        }
    }

    /// Refuses `spec` before anything of it is written when one of its names already points
    /// at other content than `digest`: always for CRI's sandbox image (every new pod runs
    /// it), otherwise unless the caller allows overwriting. A name the node lacks, or has for
    /// this very digest (a re-run), is fine.
    ///
    /// A name whose content is this very image under other manifest bytes (the same config on
    /// this node's platform, as `docker load` or `ctr import` of a docker-archive make their
    /// own manifest) is not other content: it moves to the bundle's manifest like a re-run.
    async fn check_names(&self, spec: &ImageSpec, mdesc: &oci::Descriptor) -> Result<(), Error> {
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

    /// The CRI pod sandbox image in its full form: `--sandbox-image`; else what CRI's
    /// configuration says (RuntimeService.Status, verbose: containerd 1.x); else, on
    /// containerd 2.x, whose CRI status leaves the image configuration out, its built-in
    /// default. `None` when containerd serves no CRI.
    async fn sandbox_image(&self) -> Result<Option<String>, Error> {
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

    /// containerd's version as its Version service reports it (e.g. `1.6.20~ds1`).
    async fn version(&self) -> Result<String, Error> {
        Ok(VersionClient::new(self.channel.clone())
            .version(())
            .await
            .map_err(Error::runtime(RUNTIME, "Version"))?
            .into_inner()
            .version)
    }

    /// The digest image `name` points at, if the node has that name.
    /// The config digest of the image `desc` (a manifest, or an index whose entry for this
    /// node's platform is read) on this node; `None` when its content is not all here or
    /// does not parse.
    async fn config_on_node(&self, image: &str, desc: &oci::Descriptor) -> Option<String> {
        let mut desc = desc.clone();
        if oci::is_index(&desc.media_type) {
            let bytes = self.read_small(image, &desc).await.ok()?;
            let index = oci::Index::parse(&desc.digest, &bytes).ok()?;
            let node = oci::Platform::parse(&self.cfg.platform)?;
            desc = index.entry_for(&node)?.descriptor();
        }
        let bytes = self.read_small(image, &desc).await.ok()?;
        Some(Manifest::parse(&desc.digest, &bytes).ok()?.config.digest)
    }

    /// The target of image record `name`, if it exists.
    async fn image_target(&self, name: &str) -> Result<Option<oci::Descriptor>, Error> {
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

    async fn verify_one(&self, name: &str) -> Result<RefStatus, Error> {
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
        let Some(target) = image.and_then(|i| i.target) else {
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
                let node = oci::Platform::parse(&self.cfg.platform);
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
}

/// Ingest ref under which lade writes a blob: stable per digest, so an interrupted upload
/// can be resumed by the next attempt.
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

fn ingest_ref(digest: &str) -> String {
    format!("lade-{digest}")
}

fn tower_service(
    socket: PathBuf,
) -> impl tower::Service<
    tonic::transport::Uri,
    Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone {
    tower::service_fn(move |_| {
        let socket = socket.clone();
        async move {
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                tokio::net::UnixStream::connect(socket).await?,
            ))
        }
    })
}

impl Runtime for Containerd {
    const NAME: &'static str = RUNTIME;

    async fn info(&self) -> Result<InfoResponse, Error> {
        let version = VersionClient::new(self.channel.clone())
            .version(())
            .await
            .map_err(Error::runtime(RUNTIME, "Version"))?
            .into_inner();
        let runtime_version = version.version;
        let (runtime, shown_version) = match &self.cfg.store {
            ImageStore::Cri => (RUNTIME, runtime_version.clone()),
            ImageStore::Docker { version } => {
                ("docker", format!("{version} (containerd image store)"))
            }
        };
        Ok(InfoResponse {
            node_name: self.cfg.node_name.clone(),
            runtime: runtime.to_string(),
            runtime_version: shown_version,
            namespace: self.cfg.namespace.clone(),
            snapshotter: self.cfg.snapshotter.clone(),
            platform: self.cfg.platform.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            images_pinned: self.cfg.pin_images
                && self.cfg.store == ImageStore::Cri
                && pins_images(&runtime_version),
            storage: self.storage().await,
            checks_layers: matches!(self.local_store().await, Ok(Some(_))),
        })
    }

    async fn ready(&self) -> Result<(), Error> {
        VersionClient::new(self.channel.clone())
            .version(())
            .await
            .map_err(Error::runtime(RUNTIME, "Version"))?;
        Ok(())
    }

    async fn have(&self, session: &str, blobs: &[Descriptor]) -> Result<Vec<BlobState>, Error> {
        let lease = self.ensure_lease(session).await?;
        let mut out = Vec::with_capacity(blobs.len());
        // Small concurrent batches: each answer is a local round trip to containerd.
        for batch in blobs.chunks(16) {
            let states =
                futures::future::try_join_all(batch.iter().map(|d| self.blob_state(&lease, d)))
                    .await?;
            out.extend(states);
        }
        Ok(out)
    }

    #[instrument(skip_all, fields(digest = header.blob.as_ref().map(|b| b.digest.as_str()).unwrap_or("")))]
    async fn put_blob(
        &self,
        header: BlobHeader,
        mut chunks: BoxStream<'static, Result<Bytes, Error>>,
    ) -> Result<PutBlobResponse, Error> {
        let blob = header.blob.unwrap_or_default();
        let digest = blob.digest.clone();
        let lease = self.ensure_lease(&header.session).await?;
        let present = |received| PutBlobResponse {
            digest: digest.clone(),
            received,
            already_present: true,
            ..Default::default()
        };
        if self.content_info(&digest).await?.is_some() {
            self.hold(&lease, &digest).await?;
            return Ok(present(0));
        }

        let ref_ = ingest_ref(&digest);
        let mut waited = Duration::ZERO;
        let (tx, mut responses, held) = loop {
            let (tx, rx) = mpsc::channel::<WriteContentRequest>(4);
            // containerd answers the first message before the stream's response headers, so
            // it must be queued before the call is awaited.
            tx.send(WriteContentRequest {
                action: WriteAction::Stat as i32,
                r#ref: ref_.clone(),
                total: blob.size as i64,
                expected: digest.clone(),
                ..Default::default()
            })
            .await
            .map_err(|_| Error::InvalidRequest("write stream closed".into()))?;
            let opened = match self
                .content()
                .write(self.req(ReceiverStream::new(rx), Some(&lease)))
                .await
            {
                Ok(r) => {
                    let mut responses = r.into_inner();
                    match responses.message().await {
                        Ok(stat) => Ok((responses, stat)),
                        Err(s) => Err(s),
                    }
                }
                Err(s) => Err(s),
            };
            match opened {
                Ok((responses, stat)) => {
                    break (tx, responses, stat.map_or(0, |s| s.offset.max(0) as u64))
                }
                Err(s) if s.code() == Code::AlreadyExists => return Ok(present(0)),
                // The ingest of an upload that just ended (refused, cut off) stays locked until
                // containerd has finished with its stream, which 2.x does a few milliseconds
                // after the client has gone.
                Err(s) if ref_locked(&s) && waited < REF_LOCKED_WAIT => {
                    debug!(%digest, "ingest still locked by the previous upload; waiting");
                    tokio::time::sleep(REF_LOCKED_POLL).await;
                    waited += REF_LOCKED_POLL;
                }
                Err(s) => {
                    return Err(Error::runtime(RUNTIME, format!("Content.Write {digest}"))(
                        s,
                    ))
                }
            }
        };
        // containerd can restart an ingest from zero or continue where it stopped, nothing else.
        let mut offset = match header.offset {
            0 => 0,
            o if o == held => o,
            requested => {
                return Err(Error::ResumeOffset {
                    digest,
                    requested,
                    held,
                })
            }
        };
        debug!(held, offset, "writing blob");

        // containerd answers every message; read the answers as they come so its sends never
        // stall on flow control while we are still sending data.
        let drain = tokio::spawn(async move {
            let mut last = None;
            while let Some(msg) = responses.message().await? {
                last = Some(msg);
            }
            Ok::<_, tonic::Status>(last)
        });

        let mut received = 0u64;
        let mut failed = None;
        while let Some(chunk) = chunks.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            if offset + chunk.len() as u64 > blob.size {
                failed = Some(Error::SizeMismatch {
                    digest: digest.clone(),
                    expected: blob.size,
                    received: offset + chunk.len() as u64,
                });
                break;
            }
            let len = chunk.len() as u64;
            let sent = tx
                .send(WriteContentRequest {
                    action: WriteAction::Write as i32,
                    // containerd truncates a write at offset 0 and rejects any other offset
                    // than its own, so every message carries the running offset.
                    offset: offset as i64,
                    data: chunk.to_vec(),
                    ..Default::default()
                })
                .await;
            if sent.is_err() {
                break; // containerd ended the stream; its status comes from `drain`.
            }
            offset += len;
            received += len;
        }
        if failed.is_none() && offset == blob.size {
            let _ = tx
                .send(WriteContentRequest {
                    action: WriteAction::Commit as i32,
                    offset: offset as i64,
                    total: blob.size as i64,
                    expected: digest.clone(),
                    ..Default::default()
                })
                .await;
        }
        drop(tx);
        let outcome = drain
            .await
            .map_err(|e| Error::InvalidRequest(e.to_string()))?;
        if let Some(e) = failed {
            return Err(e);
        }
        match outcome {
            Ok(Some(last)) if last.action == WriteAction::Commit as i32 => {
                if last.digest != digest {
                    return Err(Error::DigestMismatch {
                        digest,
                        detail: format!("containerd committed {}", last.digest),
                    });
                }
                info!(bytes = received, "blob committed");
                Ok(PutBlobResponse {
                    digest,
                    received,
                    already_present: false,
                    ..Default::default()
                })
            }
            Ok(_) => Err(Error::SizeMismatch {
                digest,
                expected: blob.size,
                received: offset,
            }),
            Err(s) if s.code() == Code::AlreadyExists => Ok(present(received)),
            Err(s) if s.code() == Code::FailedPrecondition => {
                // A commit refused for size or digest: the bytes were wrong. Drop them so a
                // retry starts clean instead of resuming corrupt data.
                let _ = self
                    .content()
                    .abort(self.req(AbortRequest { r#ref: ref_ }, None))
                    .await;
                Err(Error::DigestMismatch {
                    digest,
                    detail: s.message().to_string(),
                })
            }
            Err(s) => Err(Error::runtime(RUNTIME, format!("Content.Write {digest}"))(
                s,
            )),
        }
    }

    async fn import(
        &self,
        session: &str,
        images: Vec<ImageSpec>,
        events: mpsc::Sender<ImportEvent>,
    ) -> Result<(), Error> {
        let lease = self.ensure_lease(session).await?;
        for spec in &images {
            let started = std::time::Instant::now();
            let outcome = self.import_one(&lease, spec, &events).await;
            let _ = events.send(finished_event(spec, started, outcome)).await;
        }
        Ok(())
    }

    async fn end_session(&self, session: &str) -> Result<(), Error> {
        // Everything the session loaded is referenced by image records now; the lease has
        // done its job. A session that never ends keeps its uploads until the lease expires.
        match LeasesClient::new(self.channel.clone())
            .delete(self.req(
                DeleteLeaseRequest {
                    id: Self::lease_id(session),
                    sync: false,
                },
                None,
            ))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(Error::runtime(RUNTIME, "Leases.Delete")(s)),
        }
    }

    async fn verify(&self, refs: &[String]) -> Result<Vec<RefStatus>, Error> {
        let mut out = Vec::with_capacity(refs.len());
        for r in refs {
            out.push(self.verify_one(r).await?);
        }
        Ok(out)
    }

    async fn unpack_ahead(
        self: Arc<Self>,
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
            Some(p) => oci::chain_ids(&[p.to_string(), hint.diff_id.clone()])[1].clone(),
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
                    let lock = self.chain_lock(p);
                    drop(lock.lock().await);
                    self.release_chain_lock(p, lock);
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
            let lock = self.chain_lock(&chain);
            let held = lock.lock().await;
            let result = async {
                if self.snapshot_exists(&chain).await? {
                    return Ok(false);
                }
                let _slot = self
                    .unpack_slots
                    .acquire()
                    .await
                    .expect("the unpack semaphore is never closed");
                self.unpack_layer(
                    &lease,
                    "(ahead of import)",
                    &desc,
                    &hint.diff_id,
                    parent,
                    &chain,
                )
                .await?;
                Ok::<_, Error>(true)
            }
            .await;
            drop(held);
            self.release_chain_lock(&chain, lock);
            result
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

    async fn list(&self) -> Result<Vec<ImageRecord>, Error> {
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn pin_label_needs_containerd_1_7_3() {
        for (version, pins) in [
            ("1.6.20~ds1", false),
            ("v1.7.2", false),
            ("1.7.3", true),
            ("v1.7.13", true),
            ("2.0.0-rc.1", true),
            ("", false),
            ("garbage", false),
        ] {
            assert_eq!(pins_images(version), pins, "{version}");
        }
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
