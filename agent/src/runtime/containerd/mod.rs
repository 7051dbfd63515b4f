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
//!
//! Here: the connection, its configuration and the [`Runtime`] methods, each handing over to
//! one part: `content` (leases, Have, PutBlob's writes), `holds` (the records of held bundle
//! versions, as leases, and what uses or names their images), `unpack` (snapshots, chain locks,
//! whether this agent applies layers itself, and [`apply`], its applier), `images` (import,
//! names and their checks, labels, pins, Verify, List) and `info` (Info, version, storage).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use lade_proto::{
    BlobHeader, BlobState, Descriptor, Held, ImageRecord, ImageSpec, ImportEvent, InfoResponse,
    PutBlobResponse, RefStatus, UnpackHint,
};
use tokio::sync::{mpsc, Semaphore};
use tonic::transport::Channel;
use tonic::Request;

use self::unpack::LocalStore;
use super::{finished_event, KeyedLocks, Runtime};
use crate::error::Error;

pub mod apply;
mod content;
mod events;
mod holds;
mod images;
mod info;
mod unpack;

const RUNTIME: &str = "containerd";

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
    /// sandbox image. The node reports itself as Docker `version`. Its containers are
    /// dockerd's (a stopped one has no containerd record), asked of the dockerd at `socket`.
    Docker { version: String, socket: PathBuf },
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

/// A connection to one containerd, scoped to one namespace and snapshotter.
pub struct Containerd {
    channel: Channel,
    cfg: ContainerdConfig,
    /// One lock per chain ID being unpacked: concurrent imports that share a base layer
    /// unpack it once, the others wait and find it committed.
    chains: KeyedLocks,
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
            chains: KeyedLocks::default(),
            unpack_slots: Arc::new(Semaphore::new(cores)),
            local: tokio::sync::OnceCell::new(),
        })
    }

    /// The socket this connects to.
    pub fn socket(&self) -> &std::path::Path {
        &self.cfg.socket
    }

    /// The snapshotter layers are unpacked into (`auto` until settled by the caller).
    pub fn snapshotter(&self) -> &str {
        &self.cfg.snapshotter
    }

    /// The same connection, unpacking into `snapshotter`; only before its first use (which
    /// layers it applies itself is decided at the first layer, by snapshotter).
    pub fn with_snapshotter(mut self, snapshotter: String) -> Self {
        self.cfg.snapshotter = snapshotter;
        self
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
        self.node_info().await
    }

    async fn ready(&self) -> Result<(), Error> {
        self.version().await?;
        Ok(())
    }

    async fn have(&self, session: &str, blobs: &[Descriptor]) -> Result<Vec<BlobState>, Error> {
        self.have_blobs(session, blobs).await
    }

    async fn put_blob(
        &self,
        header: BlobHeader,
        chunks: BoxStream<'static, Result<Bytes, Error>>,
    ) -> Result<PutBlobResponse, Error> {
        self.write_blob(header, chunks).await
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
        self.end_lease(session).await
    }

    async fn verify(&self, refs: &[String]) -> Result<Vec<RefStatus>, Error> {
        let mut out = Vec::with_capacity(refs.len());
        for r in refs {
            out.push(self.verify_one(r).await?);
        }
        Ok(out)
    }

    async fn read_blob(
        &self,
        digest: &str,
        offset: u64,
    ) -> Result<BoxStream<'static, Result<Bytes, Error>>, Error> {
        if let Ok(Some(store)) = self.local_store().await {
            if let Some(chunks) = self.read_stored(&store, digest, offset).await? {
                return Ok(chunks);
            }
        }
        self.read_from(digest, offset).await
    }

    async fn unpack_ahead(
        self: Arc<Self>,
        session: String,
        layer: Descriptor,
        hint: UnpackHint,
    ) -> bool {
        self.unpack_ahead_of_import(session, layer, hint).await
    }

    async fn hold(&self, held: Held) -> Result<(), Error> {
        self.hold_version(held).await
    }

    async fn holds(&self) -> Result<Vec<Held>, Error> {
        self.held_versions().await
    }

    async fn drop_hold(&self, bundle: &str, version: &str) -> Result<(), Error> {
        self.drop_version(bundle, version).await
    }

    async fn present(&self, blobs: &[Descriptor]) -> Result<Vec<bool>, Error> {
        self.blobs_present(blobs).await
    }

    async fn containers_using(
        &self,
        names: &[String],
    ) -> Result<HashMap<String, Vec<String>>, Error> {
        self.users(names).await
    }

    async fn remove_names(&self, names: &[String]) -> Result<(), Error> {
        self.delete_names(names).await
    }

    async fn list(&self) -> Result<Vec<ImageRecord>, Error> {
        self.list_images().await
    }

    fn changes(&self) -> BoxStream<'static, super::Change> {
        events::watch(self.channel.clone(), self.cfg.namespace.clone())
    }
}
