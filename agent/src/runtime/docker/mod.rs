//! [`Runtime`] on Docker, through dockerd's HTTP API on its unix socket (`bollard`).
//!
//! Owns the Docker call sequence. dockerd cannot receive single blobs, so uploads land in a
//! local digest-verified [`cache`]; an import streams a docker-archive synthesised from it
//! ([`archive`]) to the image load endpoint, loads it by ID only, checks the loaded image ID
//! is the config digest, and only then tags the target names, so a failed load leaves no new
//! name. The API version is negotiated on first use, so Docker 20.10 (API 1.41) and newer
//! all work.
//!
//! What dockerd holds counts as present: an image ID is its config digest, and a layer is
//! known by its diffID (the coordinator sends it with every layer descriptor). dockerd stores
//! layers per chain ID, so the same layer on a different base is another layer to it; where
//! the request's configs are at hand (cached from an earlier load) the layer's chain IDs
//! decide, otherwise its diffID does.
//!
//! Sessions stand in for containerd's leases: blobs a load was told about or sent are not
//! cleaned from the cache by another load's import until the session imported them or
//! outlived the lease TTL.

mod archive;
mod cache;
mod events;
pub(crate) mod holds;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bollard::errors::Error as DockerError;
use bollard::query_parameters::{
    ImportImageOptionsBuilder, ListImagesOptionsBuilder, RemoveImageOptionsBuilder,
    TagImageOptionsBuilder,
};
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use lade_proto::{
    BlobHeader, BlobState, Descriptor, Held, ImageRecord, ImageSpec, ImportEvent, ImportPhase,
    InfoResponse, PutBlobResponse, RefStatus,
};
use tokio::sync::{mpsc, OnceCell};
use tracing::{debug, info, instrument, warn};

use self::archive::{Archive, Layer};
use self::cache::BlobCache;
use super::{canonical_name, finished_event, manifest_descriptor, Named, Runtime};
use crate::error::Error;
use lade_oci::{self as oci, chain_ids, ImageConfig, Manifest, MAX_METADATA_BYTES};

const RUNTIME: &str = "docker";
/// Timeout of ordinary dockerd calls (bollard's default).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// dockerd answers a load only after it has read and unpacked the whole archive, which for a
/// big image on a slow disk takes a while.
const LOAD_TIMEOUT: Duration = Duration::from_secs(3600);
/// Concurrent image inspections while taking stock of what dockerd holds.
const INSPECT_CONCURRENCY: usize = 8;

/// How to reach and use the node's dockerd.
#[derive(Clone, Debug)]
pub struct DockerConfig {
    pub socket: PathBuf,
    /// Directory of the blob cache (a hostPath in the chart, so uploads survive restarts).
    pub cache_dir: PathBuf,
    /// Delete cached layer blobs once an import has put them into dockerd.
    pub clean_cache: bool,
    /// How long a load session's blobs are kept from cleaning, and an interrupted upload kept.
    pub lease_ttl: Duration,
    pub node_name: String,
    /// This node's platform (`os/arch[/variant]`), as Info reports it.
    pub platform: String,
}

/// A dockerd, its blob cache and the load sessions in flight.
pub struct Docker {
    cfg: DockerConfig,
    /// Made on first use: the agent starts (and reports not-ready) while dockerd is down.
    client: OnceCell<bollard::Docker>,
    cache: BlobCache,
    sessions: Mutex<HashMap<String, Session>>,
    /// Held while a hold record is written or dropped, or the cache cleaned: cleaning reads
    /// the records, so a blob being held is never cleaned meanwhile.
    records: tokio::sync::Mutex<()>,
}

/// Cached blobs a load session was told about or sent, and the layer blobs of the images it
/// imported (cleaned from the cache when the session ends).
struct Session {
    started: Instant,
    digests: HashSet<String>,
    imported_layers: Vec<String>,
}

/// What dockerd holds: image IDs (config digests), and the diffIDs and chain IDs of their
/// layers.
#[derive(Default)]
struct Holdings {
    images: HashSet<String>,
    diff_ids: HashSet<String>,
    chains: HashSet<String>,
}

impl Holdings {
    fn add(&mut self, image_id: String, diff_ids: Vec<String>) {
        self.chains.extend(chain_ids(&diff_ids));
        self.diff_ids.extend(diff_ids);
        self.images.insert(image_id);
    }

    /// Whether dockerd already has what blob `d` would give it. `needed` maps a diffID to the
    /// chain IDs the request's known configs use it under.
    fn covers(&self, d: &Descriptor, needed: &HashMap<String, Vec<String>>) -> bool {
        self.images.contains(&d.digest)
            || (!d.diff_id.is_empty()
                && self.diff_ids.contains(&d.diff_id)
                && needed
                    .get(&d.diff_id)
                    .is_none_or(|chains| chains.iter().all(|c| self.chains.contains(c))))
    }
}

/// A target name as Docker's tag endpoint takes it.
struct Tag {
    name: String,
    repo: String,
    tag: String,
}

impl Tag {
    /// Splits a normalised reference into repository and tag. Docker records digests only for
    /// images it pulled, so a name with a digest cannot be created.
    fn parse(image: &str, name: &str) -> Result<Tag, Error> {
        if name.contains('@') {
            return Err(Error::InvalidRequest(format!(
                "image {image}: Docker cannot create the name {name}: it has a digest, and \
                 Docker records digests only for images it pulled"
            )));
        }
        let path_start = name.rfind('/').map_or(0, |i| i + 1);
        let (repo, tag) = match name[path_start..].rfind(':') {
            Some(i) => (&name[..path_start + i], &name[path_start + i + 1..]),
            None => (name, "latest"),
        };
        Ok(Tag {
            name: name.to_string(),
            repo: repo.to_string(),
            tag: tag.to_string(),
        })
    }
}

/// dockerd's containerd image store, as `docker info` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerdStore {
    /// dockerd's version, reported as the node's runtime version.
    pub docker_version: String,
    /// The snapshotter images are unpacked into (`docker info`'s driver, e.g. `overlayfs`).
    pub snapshotter: String,
    /// The socket of dockerd's containerd, when dockerd reports it (API 1.46, Docker 27, and
    /// later); else the agent's `--containerd-socket`.
    pub address: Option<PathBuf>,
    /// The namespace of dockerd's images and containers (`moby`, suffixed under userns-remap).
    pub namespace: String,
}

impl Docker {
    /// Nothing is touched until first use: neither dockerd nor the cache directory.
    pub fn new(cfg: DockerConfig) -> Self {
        let cache = BlobCache::new(cfg.cache_dir.clone());
        Self {
            cfg,
            client: OnceCell::new(),
            cache,
            sessions: Mutex::new(HashMap::new()),
            records: tokio::sync::Mutex::new(()),
        }
    }

    /// Where this dockerd keeps images when it uses the containerd image store (`docker info`
    /// reports the driver type `io.containerd.snapshotter.v1`); `None` for a graph driver
    /// (overlay2), whose images only `POST /images/load` can create.
    pub async fn containerd_store(&self) -> Result<Option<ContainerdStore>, Error> {
        let docker = self.client().await?;
        let info = docker.info().await.map_err(self.call_err("info"))?;
        let snapshotter = info.driver_status.iter().flatten().any(|pair| {
            pair.first().map(String::as_str) == Some("driver-type")
                && pair.get(1).map(String::as_str) == Some("io.containerd.snapshotter.v1")
        });
        if !snapshotter {
            return Ok(None);
        }
        let version = docker.version().await.map_err(self.call_err("version"))?;
        let containerd = info.containerd.unwrap_or_default();
        Ok(Some(ContainerdStore {
            docker_version: version.version.unwrap_or_default(),
            snapshotter: info.driver.unwrap_or_else(|| "overlayfs".into()),
            address: containerd
                .address
                .filter(|a| !a.is_empty())
                .map(PathBuf::from),
            namespace: containerd
                .namespaces
                .and_then(|n| n.containers)
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "moby".into()),
        }))
    }

    /// The socket this connects to.
    pub fn socket(&self) -> &Path {
        &self.cfg.socket
    }

    /// The client, connected and version-negotiated on first use.
    async fn client(&self) -> Result<&bollard::Docker, Error> {
        let connect_err = |reason: String| Error::Connect {
            runtime: RUNTIME,
            socket: self.cfg.socket.display().to_string(),
            reason,
        };
        self.client
            .get_or_try_init(|| async {
                let socket = self
                    .cfg
                    .socket
                    .to_str()
                    .ok_or_else(|| connect_err("the socket path is not UTF-8".into()))?;
                let docker = bollard::Docker::connect_with_unix(
                    socket,
                    CALL_TIMEOUT.as_secs(),
                    bollard::API_DEFAULT_VERSION,
                )
                .map_err(|e| connect_err(e.to_string()))?
                .negotiate_version()
                .await
                .map_err(|e| connect_err(e.to_string()))?;
                info!(api = %docker.client_version(), "connected to dockerd");
                Ok(docker)
            })
            .await
    }

    fn call_err(&self, op: impl Into<String>) -> impl FnOnce(DockerError) -> Error {
        let (node, op) = (self.cfg.node_name.clone(), op.into());
        move |source| Error::Docker {
            node,
            op,
            source: Box::new(source),
        }
    }

    fn image_err(&self, image: &str, op: impl Into<String>) -> impl FnOnce(DockerError) -> Error {
        let (node, image, op) = (self.cfg.node_name.clone(), image.to_string(), op.into());
        move |source| Error::DockerImage {
            image,
            node,
            op,
            source: Box::new(source),
        }
    }

    /// Takes stock of every image dockerd holds (intermediate and untagged ones included).
    async fn holdings(&self, docker: &bollard::Docker) -> Result<Holdings, Error> {
        let images = docker
            .list_images(Some(ListImagesOptionsBuilder::default().all(true).build()))
            .await
            .map_err(self.call_err("list images"))?;
        let inspected: Vec<Option<(String, Vec<String>)>> = futures::stream::iter(images)
            .map(|summary| async move {
                match docker.inspect_image(&summary.id).await {
                    Ok(image) => Ok(Some((
                        summary.id,
                        image.root_fs.and_then(|r| r.layers).unwrap_or_default(),
                    ))),
                    // Removed since the listing: it holds nothing any more.
                    Err(e) if is_not_found(&e) => Ok(None),
                    Err(e) => Err(self.call_err(format!("inspect image {}", summary.id))(e)),
                }
            })
            .buffer_unordered(INSPECT_CONCURRENCY)
            .try_collect()
            .await?;
        let mut holdings = Holdings::default();
        for (id, diff_ids) in inspected.into_iter().flatten() {
            holdings.add(id, diff_ids);
        }
        Ok(holdings)
    }

    /// For each diffID the request's cached configs use (of images dockerd does not hold
    /// yet), the chain IDs it must be present under.
    async fn needed_chains(
        &self,
        blobs: &[Descriptor],
        cached: &[bool],
        holdings: &Holdings,
    ) -> Result<HashMap<String, Vec<String>>, Error> {
        let mut needed: HashMap<String, Vec<String>> = HashMap::new();
        for (d, _) in blobs.iter().zip(cached).filter(|(d, cached)| {
            **cached
                && d.diff_id.is_empty()
                && d.size <= MAX_METADATA_BYTES
                && !holdings.images.contains(&d.digest)
        }) {
            let desc = oci::Descriptor {
                media_type: d.media_type.clone(),
                digest: d.digest.clone(),
                size: d.size,
            };
            let bytes = self.cache.read_small(&d.digest, &desc).await?;
            // Manifests are in the request too; only configs parse as one.
            let Ok(diff_ids) = ImageConfig::diff_ids(&d.digest, &bytes) else {
                continue;
            };
            for (diff_id, chain) in diff_ids.iter().zip(chain_ids(&diff_ids)) {
                needed.entry(diff_id.clone()).or_default().push(chain);
            }
        }
        Ok(needed)
    }

    /// For each blob: in the cache (`cached` says), or what it would give dockerd is there
    /// already ([`Holdings::covers`]). dockerd is asked only about what the cache cannot
    /// answer.
    async fn covered(&self, blobs: &[Descriptor], cached: &[bool]) -> Result<Vec<bool>, Error> {
        if cached.iter().all(|c| *c) {
            return Ok(cached.to_vec());
        }
        let holdings = self.holdings(self.client().await?).await?;
        let needed = self.needed_chains(blobs, cached, &holdings).await?;
        Ok(blobs
            .iter()
            .zip(cached)
            .map(|(d, cached)| *cached || holdings.covers(d, &needed))
            .collect())
    }

    /// Every blob a load session in progress was told about or sent.
    fn session_digests(&self) -> HashSet<String> {
        let sessions = self.sessions.lock().expect("session map lock");
        sessions
            .values()
            .filter(|s| s.started.elapsed() < self.cfg.lease_ttl)
            .flat_map(|s| s.digests.iter().cloned())
            .collect()
    }

    /// Keeps `digests` from cache cleaning while `session` runs (at most the lease TTL).
    fn hold<'a>(&self, session: &str, digests: impl IntoIterator<Item = &'a str>) {
        let mut sessions = self.sessions.lock().expect("session map lock");
        let ttl = self.cfg.lease_ttl;
        sessions.retain(|_, s| s.started.elapsed() < ttl);
        sessions
            .entry(session.to_string())
            .or_insert_with(|| Session {
                started: Instant::now(),
                digests: HashSet::new(),
                imported_layers: Vec::new(),
            })
            .digests
            .extend(digests.into_iter().map(str::to_string));
    }

    /// Ends `session` after a successful load and, if configured, deletes the cached layer
    /// blobs its images used (dockerd holds them now) unless another session or a hold
    /// record still needs them, and interrupted uploads older than the lease TTL. Manifests and configs stay:
    /// they are small, and with them the next load of the same images sends nothing.
    async fn finish(&self, session: &str) {
        let (layers, others): (Vec<String>, HashSet<String>) = {
            let mut sessions = self.sessions.lock().expect("session map lock");
            let layers = sessions
                .remove(session)
                .map(|s| s.imported_layers)
                .unwrap_or_default();
            let others = sessions
                .values()
                .flat_map(|s| s.digests.iter().cloned())
                .collect();
            (layers, others)
        };
        if !self.cfg.clean_cache {
            return;
        }
        let _records = self.records.lock().await;
        let held = match self.held_digests().await {
            Ok(held) => held,
            Err(e) => {
                warn!(error = %e, "cannot read the hold records: the blob cache is not cleaned");
                return;
            }
        };
        let unneeded: Vec<String> = layers
            .into_iter()
            .filter(|d| !others.contains(d) && !held.contains(d))
            .collect();
        debug!(blobs = unneeded.len(), "cleaning the blob cache");
        self.cache.remove(unneeded).await;
        self.cache.remove_stale_ingests(self.cfg.lease_ttl).await;
    }

    /// Imports one image: load it by ID unless dockerd has it, then tag it. `used_layers`
    /// collects the layer blobs the image consists of, for cleaning afterwards.
    #[instrument(skip_all, fields(image = %spec.source))]
    async fn import_one(
        &self,
        docker: &bollard::Docker,
        holdings: &mut Holdings,
        spec: &ImageSpec,
        events: &mpsc::Sender<ImportEvent>,
        used_layers: &mut Vec<String>,
    ) -> Result<Named, Error> {
        let image = spec.source.as_str();
        let mdesc = manifest_descriptor(spec)?;
        let tags = spec
            .names
            .iter()
            .map(|n| Tag::parse(image, n))
            .collect::<Result<Vec<_>, _>>()?;
        let manifest =
            Manifest::parse(&mdesc.digest, &self.cache.read_small(image, &mdesc).await?)?;
        let config_digest = manifest.config.digest.clone();
        used_layers.extend(manifest.layers.iter().map(|l| l.digest.clone()));
        if !spec.allow_overwrite {
            self.check_tags(docker, image, &config_digest, &tags)
                .await?;
        }

        let phases = if holdings.images.contains(&config_digest) {
            vec![ImportPhase::LayerPresent; manifest.layers.len()]
        } else {
            let config = self.cache.read_small(image, &manifest.config).await?;
            let diff_ids = manifest.layer_diff_ids(&mdesc.digest, &config)?;
            let chains = chain_ids(&diff_ids);
            let mut phases = Vec::with_capacity(diff_ids.len());
            let mut layers = Vec::with_capacity(diff_ids.len());
            for ((layer, diff_id), chain) in manifest.layers.iter().zip(&diff_ids).zip(&chains) {
                let file = if holdings.chains.contains(chain) {
                    phases.push(ImportPhase::LayerPresent);
                    None
                } else if self.cache.contains(&layer.digest).await? {
                    phases.push(ImportPhase::LayerUnpacked);
                    Some(self.cache.blob_path(&layer.digest)?)
                } else if holdings.diff_ids.contains(diff_id) {
                    // Have judged by diffID before this image's config was here; with the
                    // config now cached, the next Have asks for the layer.
                    return Err(Error::LayerOnOtherBase {
                        image: image.to_string(),
                        digest: layer.digest.clone(),
                    });
                } else {
                    return Err(Error::MissingBlob {
                        image: image.to_string(),
                        digest: layer.digest.clone(),
                    });
                };
                layers.push(Layer {
                    digest: layer.digest.clone(),
                    diff_id: diff_id.clone(),
                    file,
                });
            }
            self.load(
                docker,
                Archive {
                    image: image.to_string(),
                    config_digest: config_digest.clone(),
                    config,
                    layers,
                },
            )
            .await?;
            holdings.add(config_digest.clone(), diff_ids);
            phases
        };
        for (layer, phase) in manifest.layers.iter().zip(phases) {
            let _ = events
                .send(ImportEvent {
                    image: image.to_string(),
                    phase: phase as i32,
                    layer_digest: layer.digest.clone(),
                    ..Default::default()
                })
                .await;
        }
        self.tag(docker, image, &config_digest, &tags).await?;
        Ok(Named {
            names: spec.names.clone(),
            digest: config_digest,
        })
    }

    /// Streams `archive` to dockerd's load endpoint and checks it loaded the expected image.
    async fn load(&self, docker: &bollard::Docker, archive: Archive) -> Result<(), Error> {
        let image = archive.image.clone();
        let expected = archive.config_digest.clone();
        let (body, producer) = archive.stream();
        let loader = docker.clone().with_timeout(LOAD_TIMEOUT);
        let mut responses = loader.import_image_stream(
            ImportImageOptionsBuilder::default().quiet(true).build(),
            body,
            None,
        );
        let mut loaded = None;
        let mut refused = None;
        while let Some(response) = responses.next().await {
            match response {
                Ok(info) => {
                    let line = info.stream.unwrap_or_default();
                    if let Some(id) = line.trim().strip_prefix("Loaded image ID: ") {
                        loaded = Some(id.to_string());
                    }
                }
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        drop(responses);
        // The archive's own failure explains a refused load better than dockerd's view of it.
        producer.await.map_err(|e| Error::Cache {
            path: self.cache.root().display().to_string(),
            op: "stream archive",
            source: std::io::Error::other(e),
        })??;
        if let Some(e) = refused {
            return Err(self.image_err(&image, "load")(e));
        }
        match loaded {
            Some(id) if id == expected => {
                info!(%image, %id, "image loaded");
                Ok(())
            }
            other => Err(Error::LoadedOtherImage {
                image,
                node: self.cfg.node_name.clone(),
                expected,
                actual: other.unwrap_or_else(|| "nothing".to_string()),
            }),
        }
    }

    /// Refuses the image before it is loaded when one of its tags already names another image
    /// (Docker's image ID is the config digest): moving it needs `--allow-overwrite`.
    async fn check_tags(
        &self,
        docker: &bollard::Docker,
        image: &str,
        id: &str,
        tags: &[Tag],
    ) -> Result<(), Error> {
        for tag in tags {
            match self.tagged(docker, image, tag).await? {
                Some(existing) if existing != id => {
                    return Err(Error::NameTaken {
                        image: image.to_string(),
                        name: tag.name.clone(),
                        existing,
                        wanted: id.to_string(),
                    })
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The image ID `tag` names on this node, if it names one.
    async fn tagged(
        &self,
        docker: &bollard::Docker,
        image: &str,
        tag: &Tag,
    ) -> Result<Option<String>, Error> {
        match docker.inspect_image(&tag.name).await {
            Ok(held) => Ok(held.id),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.image_err(image, format!("inspect {}", tag.name))(e)),
        }
    }

    /// Points every tag at image `id`. If one fails, the tags this call created or moved are
    /// put back as they were, so the image gains no name.
    async fn tag(
        &self,
        docker: &bollard::Docker,
        image: &str,
        id: &str,
        tags: &[Tag],
    ) -> Result<(), Error> {
        let mut done: Vec<(&Tag, Option<String>)> = Vec::new();
        for tag in tags {
            let result = async {
                let before = self.tagged(docker, image, tag).await?;
                if before.as_deref() != Some(id) {
                    docker
                        .tag_image(id, Some(tag_options(tag)))
                        .await
                        .map_err(self.image_err(image, format!("tag {}", tag.name)))?;
                }
                Ok(before)
            }
            .await;
            match result {
                Ok(before) if before.as_deref() == Some(id) => {}
                Ok(before) => done.push((tag, before)),
                Err(e) => {
                    self.untag(docker, &done).await;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Undoes [`Docker::tag`]'s work: re-points moved names, removes created ones.
    async fn untag(&self, docker: &bollard::Docker, done: &[(&Tag, Option<String>)]) {
        for (tag, before) in done.iter().rev() {
            let undone = match before {
                Some(previous) => docker.tag_image(previous, Some(tag_options(tag))).await,
                None => docker
                    .remove_image(
                        &tag.name,
                        Some(RemoveImageOptionsBuilder::default().noprune(true).build()),
                        None,
                    )
                    .await
                    .map(drop),
            };
            if let Err(e) = undone {
                warn!(name = %tag.name, error = %e, "cannot undo tag");
            }
        }
    }
}

fn tag_options(tag: &Tag) -> bollard::query_parameters::TagImageOptions {
    TagImageOptionsBuilder::default()
        .repo(&tag.repo)
        .tag(&tag.tag)
        .build()
}

fn is_not_found(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

impl Runtime for Docker {
    const NAME: &'static str = RUNTIME;

    async fn info(&self) -> Result<InfoResponse, Error> {
        let docker = self.client().await?;
        let version = docker.version().await.map_err(self.call_err("version"))?;
        let info = docker.info().await.map_err(self.call_err("info"))?;
        Ok(InfoResponse {
            node_name: self.cfg.node_name.clone(),
            runtime: RUNTIME.to_string(),
            runtime_version: version.version.unwrap_or_default(),
            namespace: String::new(),
            snapshotter: info.driver.unwrap_or_default(),
            platform: self.cfg.platform.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            // Docker has no pin label: kubelet (through cri-dockerd) may collect these images.
            images_pinned: false,
            // dockerd unpacks layers: the coordinator checks them before it sends them.
            checks_layers: false,
            fetches_from_peers: false,
            storage: crate::storage::measure(
                &[
                    ("cache", Some(self.cfg.cache_dir.as_path())),
                    (
                        "images",
                        info.docker_root_dir.as_deref().map(std::path::Path::new),
                    ),
                ]
                .into_iter()
                .filter_map(|(holds, dir)| Some((holds, dir?)))
                .collect::<Vec<_>>(),
            ),
        })
    }

    async fn ready(&self) -> Result<(), Error> {
        self.client()
            .await?
            .ping()
            .await
            .map_err(self.call_err("ping"))?;
        Ok(())
    }

    async fn have(&self, session: &str, blobs: &[Descriptor]) -> Result<Vec<BlobState>, Error> {
        let mut cached = Vec::with_capacity(blobs.len());
        for d in blobs {
            cached.push(self.cache.contains(&d.digest).await?);
        }
        self.hold(
            session,
            blobs
                .iter()
                .zip(&cached)
                .filter(|(_, c)| **c)
                .map(|(d, _)| d.digest.as_str()),
        );
        let present = self.covered(blobs, &cached).await?;
        let mut out = Vec::with_capacity(blobs.len());
        for (d, present) in blobs.iter().zip(present) {
            let offset = if present {
                0
            } else {
                self.cache.partial(&d.digest).await?
            };
            out.push(BlobState {
                digest: d.digest.clone(),
                present,
                offset,
            });
        }
        Ok(out)
    }

    #[instrument(skip_all, fields(digest = header.blob.as_ref().map(|b| b.digest.as_str()).unwrap_or("")))]
    async fn put_blob(
        &self,
        header: BlobHeader,
        chunks: BoxStream<'static, Result<Bytes, Error>>,
    ) -> Result<PutBlobResponse, Error> {
        let blob = header.blob.unwrap_or_default();
        self.hold(&header.session, [blob.digest.as_str()]);
        let written = self
            .cache
            .write(&blob.digest, blob.size, header.offset, chunks)
            .await?;
        if !written.already_present {
            info!(bytes = written.received, "blob cached");
        }
        Ok(PutBlobResponse {
            digest: blob.digest,
            received: written.received,
            already_present: written.already_present,
            ..Default::default()
        })
    }

    async fn import(
        &self,
        session: &str,
        images: Vec<ImageSpec>,
        events: mpsc::Sender<ImportEvent>,
    ) -> Result<(), Error> {
        let docker = self.client().await?;
        let mut holdings = self.holdings(docker).await?;
        let mut used_layers = Vec::new();
        for spec in &images {
            let started = std::time::Instant::now();
            let outcome = self
                .import_one(docker, &mut holdings, spec, &events, &mut used_layers)
                .await;
            let _ = events.send(finished_event(spec, started, outcome)).await;
        }
        // Cleaned when the session ends; a session that never ends (a failed load) keeps its
        // blobs for the retry, until the lease TTL.
        self.hold(session, std::iter::empty());
        if let Some(s) = self
            .sessions
            .lock()
            .expect("session map lock")
            .get_mut(session)
        {
            s.imported_layers.extend(used_layers);
        }
        Ok(())
    }

    async fn end_session(&self, session: &str) -> Result<(), Error> {
        self.finish(session).await;
        Ok(())
    }

    async fn read_blob(
        &self,
        digest: &str,
        offset: u64,
    ) -> Result<BoxStream<'static, Result<Bytes, Error>>, Error> {
        self.cache.read_from(digest, offset).await
    }

    async fn verify(&self, refs: &[String]) -> Result<Vec<RefStatus>, Error> {
        let docker = self.client().await?;
        let mut out = Vec::with_capacity(refs.len());
        for r in refs {
            let mut status = RefStatus {
                r#ref: r.clone(),
                ..Default::default()
            };
            // dockerd has an image whole or not at all: found means every layer is there.
            match docker.inspect_image(r).await {
                Ok(image) => {
                    status.ok = true;
                    status.image_id = image.id.unwrap_or_default();
                }
                Err(e) if is_not_found(&e) => status.problem = "no such image".to_string(),
                Err(e) => return Err(self.call_err(format!("inspect image {r}"))(e)),
            }
            out.push(status);
        }
        Ok(out)
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
        self.untag_names(names).await
    }

    fn changes(&self) -> BoxStream<'static, super::Change> {
        match self.cfg.socket.to_str() {
            Some(socket) => events::watch(socket.to_string()),
            // Every call says so (see `client`); there is nothing to watch.
            None => futures::stream::pending().boxed(),
        }
    }

    async fn list(&self) -> Result<Vec<ImageRecord>, Error> {
        let images = self
            .client()
            .await?
            .list_images(None::<bollard::query_parameters::ListImagesOptions>)
            .await
            .map_err(self.call_err("list images"))?;
        Ok(images
            .into_iter()
            .flat_map(|image| {
                let target = Descriptor {
                    digest: image.id.clone(),
                    size: image.size.max(0) as u64,
                    // Docker keeps no manifest of a loaded image: its config is the target.
                    media_type: oci::MEDIA_TYPE_DOCKER_CONFIG.to_string(),
                    ..Default::default()
                };
                image
                    .repo_tags
                    .into_iter()
                    .filter(|t| t != "<none>:<none>")
                    .map(move |t| ImageRecord {
                        name: canonical_name(&t),
                        target: Some(target.clone()),
                    })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_names_are_shown_in_full() {
        assert_eq!(
            canonical_name("busybox:latest"),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            canonical_name("bitnami/redis:7"),
            "docker.io/bitnami/redis:7"
        );
        assert_eq!(
            canonical_name("10.16.10.111/demo/app:v1"),
            "10.16.10.111/demo/app:v1"
        );
        assert_eq!(canonical_name("localhost/x:1"), "localhost/x:1");
    }

    #[test]
    fn tags_split_at_the_last_colon_after_the_host_and_refuse_digests() {
        let t = Tag::parse("i", "10.16.10.111:5000/demo/app:v1").unwrap();
        assert_eq!(
            (t.repo.as_str(), t.tag.as_str()),
            ("10.16.10.111:5000/demo/app", "v1")
        );
        let t = Tag::parse("i", "localhost:5000/app").unwrap();
        assert_eq!(
            (t.repo.as_str(), t.tag.as_str()),
            ("localhost:5000/app", "latest")
        );
        let err = Tag::parse("img", "docker.io/library/x@sha256:00")
            .err()
            .unwrap();
        assert!(err.to_string().contains("img"), "{err}");
    }

    fn layer(digest: &str, diff_id: &str) -> Descriptor {
        Descriptor {
            digest: digest.into(),
            diff_id: diff_id.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_layer_counts_as_held_by_diff_id_unless_a_known_config_needs_another_chain() {
        let d = |c: char| format!("sha256:{}", c.to_string().repeat(64));
        let mut holdings = Holdings::default();
        holdings.add(d('c'), vec![d('a'), d('b')]);
        let none = HashMap::new();
        // An image dockerd has: its config is present.
        assert!(holdings.covers(&layer(&d('c'), ""), &none));
        assert!(holdings.covers(&layer(&d('1'), &d('b')), &none));
        assert!(!holdings.covers(&layer(&d('2'), &d('e')), &none));
        // A cached config stacks b directly on e: that chain is not in dockerd.
        let other = chain_ids(&[d('e'), d('b')]);
        let needed = HashMap::from([(d('b'), vec![other[1].clone()])]);
        assert!(!holdings.covers(&layer(&d('1'), &d('b')), &needed));
        let same = chain_ids(&[d('a'), d('b')]);
        let needed = HashMap::from([(d('b'), vec![same[1].clone()])]);
        assert!(holdings.covers(&layer(&d('1'), &d('b')), &needed));
    }
}
