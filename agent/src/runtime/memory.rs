//! A runtime that keeps everything in memory, for tests: no daemon, no root, no disk.
//!
//! It keeps the contract the real runtimes keep (the conformance suite runs against it): a
//! content map of committed blobs, written only once their size and digest match; interrupted
//! uploads kept for a resume from where they stopped; blobs held per session; images named
//! only when their manifest (or their platform's manifest of an index), config and every layer
//! are present; Verify by reference with the same short-name normalisation as the others.
//! Layers are not unpacked: a layer counts as unpacked once an Import used it. Made
//! [`Memory::pinning`], Import pins the names it creates and Verify reports each name's pin,
//! as containerd's CRI store does.
//!
//! On top of that it plays [`Fault`]s on request, so that the coordinator's handling of a
//! node that refuses a blob, stalls, is lost mid-stream or fails an import can be tested with
//! agents served in-process.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Instant;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use lade_proto::{
    BlobHeader, BlobState, Descriptor, Held, ImageRecord, ImageSpec, ImportEvent, ImportPhase,
    InfoResponse, PutBlobResponse, RefStatus, CHUNK_SIZE,
};
use tokio::sync::{mpsc, watch};

use super::{
    canonical_name, finished_event, manifest_descriptor, node_platform, KeyedLocks, Named, Runtime,
};
use crate::error::Error;
use lade_oci::{self as oci, chain_ids, Manifest};

/// What Info reports as the runtime.
pub const RUNTIME: &str = "memory";

/// A failure the runtime plays when it meets what the fault names, until
/// [`Memory::clear_faults`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// A PutBlob of this digest is read whole, then refused as if its verification failed
    /// (DATA_LOSS); nothing of it is kept.
    RefuseBlob(String),
    /// A PutBlob of this digest (of any blob with `None`) takes the header and then never
    /// reads its stream again, nor answers.
    Stall(Option<String>),
    /// The node is lost once uploads have brought this many more bytes: the upload under way
    /// keeps exactly those bytes for a resume, never answers, and [`Memory::lost`] turns true
    /// (the in-process harness then cuts every connection and stops accepting).
    LoseAfter(u64),
    /// The Import of the image with this source (or one of these names) fails.
    FailImport(String),
    /// Every Hold fails; nothing is recorded.
    FailHold,
    /// The node takes and serves blob bytes at this many bytes per second (a slow link or
    /// disk): every chunk it stores or sends a peer waits its share.
    Throttle(u64),
    /// A peer reading a blob from this node gets the call answered and then not one byte (a
    /// hung disk under the serving side); the node stores blobs as usual.
    StallServe,
}

/// Everything the runtime holds.
#[derive(Default)]
struct Store {
    /// Committed blobs, by digest.
    content: HashMap<String, Bytes>,
    /// Interrupted uploads: the bytes that arrived, by digest.
    ingests: HashMap<String, Vec<u8>>,
    /// Image names (normalised) and the manifest or index they point at.
    images: BTreeMap<String, Descriptor>,
    /// Chain IDs of the layers an Import used.
    unpacked: HashSet<String>,
    /// What each open session holds.
    sessions: HashMap<String, HashSet<String>>,
    /// Hold records, by bundle and version.
    holds: BTreeMap<(String, String), Held>,
    /// Containers said to use an image name (normalised), by name.
    containers: BTreeMap<String, Vec<String>>,
    /// Names (normalised) whose record carries the pin, where the runtime pins.
    pinned: HashSet<String>,
}

impl Store {
    /// A committed blob an image needs; [`Error::MissingBlob`] if absent.
    fn blob(&self, image: &str, digest: &str) -> Result<&Bytes, Error> {
        self.content.get(digest).ok_or_else(|| Error::MissingBlob {
            image: image.to_string(),
            digest: digest.to_string(),
        })
    }

    /// The image `target` points at on a node of `platform`: its config digest and its
    /// layers' chain IDs, once the manifest (through the index), config and every layer are
    /// present.
    fn resolve(
        &self,
        image: &str,
        target: &oci::Descriptor,
        platform: &str,
    ) -> Result<Resolved, Error> {
        oci::check_metadata_size(target)?;
        let bytes = self.blob(image, &target.digest)?;
        let (mdigest, mbytes) = if oci::is_index(&target.media_type) {
            let index = oci::Index::parse(&target.digest, bytes)?;
            let node = platform.parse::<oci::Platform>().ok();
            let entry = node
                .as_ref()
                .and_then(|n| index.entry_for(n))
                .ok_or_else(|| Error::BadManifest {
                    digest: target.digest.clone(),
                    reason: format!(
                        "the index has no manifest for this node's platform {platform}"
                    ),
                })?;
            let mref = entry.descriptor();
            oci::check_metadata_size(&mref)?;
            (mref.digest.clone(), self.blob(image, &mref.digest)?)
        } else {
            (target.digest.clone(), bytes)
        };
        let manifest = Manifest::parse(&mdigest, mbytes)?;
        oci::check_metadata_size(&manifest.config)?;
        let config = self.blob(image, &manifest.config.digest)?;
        let diff_ids = manifest.layer_diff_ids(&mdigest, config)?;
        let mut layers = Vec::with_capacity(manifest.layers.len());
        for layer in &manifest.layers {
            self.blob(image, &layer.digest)?;
            layers.push(layer.digest.clone());
        }
        Ok(Resolved {
            config: manifest.config.digest.clone(),
            layers,
            chains: chain_ids(&diff_ids),
        })
    }
}

impl Store {
    /// Every committed blob `target` reaches: itself, an index's manifests, their configs
    /// and layers (what containerd's garbage collection follows from an image).
    fn reach(&self, image: &str, target: &oci::Descriptor) -> Result<Vec<String>, Error> {
        let bytes = self.blob(image, &target.digest)?;
        let mut reached = vec![target.digest.clone()];
        let manifests = if oci::is_index(&target.media_type) {
            let index = oci::Index::parse(&target.digest, bytes)?;
            index
                .manifests
                .iter()
                .map(|e| e.descriptor().digest.clone())
                .collect()
        } else {
            vec![target.digest.clone()]
        };
        for mdigest in manifests {
            let Ok(mbytes) = self.blob(image, &mdigest) else {
                continue;
            };
            reached.push(mdigest.clone());
            let manifest = Manifest::parse(&mdigest, mbytes)?;
            reached.push(manifest.config.digest.clone());
            reached.extend(manifest.layers.iter().map(|l| l.digest.clone()));
        }
        Ok(reached)
    }
}

/// A complete image, as [`Store::resolve`] finds it.
struct Resolved {
    config: String,
    layers: Vec<String>,
    chains: Vec<String>,
}

/// The in-memory runtime; see the module documentation.
pub struct Memory {
    node_name: String,
    platform: String,
    store: Mutex<Store>,
    faults: Mutex<Vec<Fault>>,
    /// One writer per digest at a time, as in the real stores.
    writers: KeyedLocks,
    lost: watch::Sender<bool>,
    /// Whether Import pins the names it creates, as containerd's CRI store does.
    pins: bool,
}

impl Memory {
    /// An empty node named `node_name`, of this machine's platform.
    pub fn new(node_name: &str) -> Self {
        Self {
            node_name: node_name.to_string(),
            platform: node_platform(),
            store: Mutex::default(),
            faults: Mutex::default(),
            writers: KeyedLocks::default(),
            lost: watch::channel(false).0,
            pins: false,
        }
    }

    /// The same node, whose Import pins the names it creates (Info says so, Verify reports
    /// each name's pin), as containerd 1.7.3+ with the CRI pin label.
    pub fn pinning(mut self) -> Self {
        self.pins = true;
        self
    }

    /// Takes the pin off image `name` (what removing the CRI pin label does).
    pub fn unpin(&self, name: &str) {
        self.store().pinned.remove(&canonical_name(name));
    }

    /// Plays `fault` from now on.
    pub fn inject(&self, fault: Fault) {
        self.faults.lock().expect("fault lock").push(fault);
    }

    /// Plays no fault any more, and the node is no longer lost.
    pub fn clear_faults(&self) {
        self.faults.lock().expect("fault lock").clear();
        self.lost.send_replace(false);
    }

    /// Whether a [`Fault::LoseAfter`] has struck; watch it to cut the node off.
    pub fn lost(&self) -> watch::Receiver<bool> {
        self.lost.subscribe()
    }

    /// Whether blob `digest` is committed.
    pub fn has_blob(&self, digest: &str) -> bool {
        self.store().content.contains_key(digest)
    }

    /// Bytes an interrupted upload of `digest` left, 0 if none.
    pub fn partial(&self, digest: &str) -> u64 {
        self.store()
            .ingests
            .get(digest)
            .map_or(0, |b| b.len() as u64)
    }

    /// Every image name, with the digest it points at.
    pub fn image_names(&self) -> BTreeMap<String, String> {
        self.store()
            .images
            .iter()
            .map(|(name, d)| (name.clone(), d.digest.clone()))
            .collect()
    }

    /// Sessions opened (by Have or PutBlob) and not ended.
    pub fn open_sessions(&self) -> Vec<String> {
        self.store().sessions.keys().cloned().collect()
    }

    /// Says that `container` uses the image `name` names (as a running pod would).
    pub fn use_image(&self, name: &str, container: &str) {
        self.store()
            .containers
            .entry(canonical_name(name))
            .or_default()
            .push(container.to_string());
    }

    /// Removes a committed blob whatever references it (what `ctr content rm` does).
    pub fn remove_blob(&self, digest: &str) {
        self.store().content.remove(digest);
    }

    /// Forgets every unpacked layer (snapshots lost, content kept).
    pub fn forget_unpacked(&self) {
        self.store().unpacked.clear();
    }

    /// Garbage collection as containerd's: removes every committed blob that no image name
    /// reaches (through its index, manifest and config), no hold record lists and no open
    /// session holds. Returns the digests removed.
    pub fn collect(&self) -> Vec<String> {
        let mut store = self.store();
        let mut keep: HashSet<String> = store.sessions.values().flatten().cloned().collect();
        for held in store.holds.values() {
            for image in &held.images {
                keep.extend(image.blobs.iter().map(|b| b.digest.clone()));
                keep.extend(image.target.iter().map(|t| t.digest.clone()));
            }
        }
        for (name, target) in &store.images {
            keep.insert(target.digest.clone());
            let target = oci::Descriptor {
                media_type: target.media_type.clone(),
                digest: target.digest.clone(),
                size: target.size,
            };
            if let Ok(reached) = store.reach(name, &target) {
                keep.extend(reached);
            }
        }
        let gone: Vec<String> = store
            .content
            .keys()
            .filter(|d| !keep.contains(*d))
            .cloned()
            .collect();
        for digest in &gone {
            store.content.remove(digest);
        }
        gone
    }

    /// A committed blob's bytes from `offset`, in chunks (what `Runtime::read_blob` serves).
    fn read_committed(
        &self,
        digest: &str,
        offset: u64,
    ) -> Result<BoxStream<'static, Result<Bytes, Error>>, Error> {
        let blob = self
            .store()
            .content
            .get(digest)
            .cloned()
            .ok_or_else(|| Error::NotHeld {
                digest: digest.to_string(),
            })?;
        if offset > blob.len() as u64 {
            return Err(Error::InvalidRequest(format!(
                "blob {digest}: offset {offset} is past its {} bytes",
                blob.len()
            )));
        }
        let tail = blob.slice(offset as usize..);
        let chunks: Vec<Result<Bytes, Error>> = (0..tail.len())
            .step_by(CHUNK_SIZE)
            .map(|at| Ok(tail.slice(at..(at + CHUNK_SIZE).min(tail.len()))))
            .collect();
        Ok(futures::stream::iter(chunks).boxed())
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().expect("store lock")
    }

    /// How long `bytes` take on this node under a [`Fault::Throttle`]; zero without one.
    fn throttled(&self, bytes: usize) -> std::time::Duration {
        let faults = self.faults.lock().expect("fault lock");
        faults
            .iter()
            .find_map(|f| match f {
                Fault::Throttle(rate) if *rate > 0 => Some(std::time::Duration::from_secs_f64(
                    bytes as f64 / *rate as f64,
                )),
                _ => None,
            })
            .unwrap_or_default()
    }

    fn has_fault(&self, wanted: impl Fn(&Fault) -> bool) -> bool {
        self.faults.lock().expect("fault lock").iter().any(wanted)
    }

    /// Counts `chunk` towards a [`Fault::LoseAfter`]: the part of it that arrives before the
    /// node is lost, and whether it is lost with it.
    fn arrive(&self, chunk: Bytes) -> (Bytes, bool) {
        let mut faults = self.faults.lock().expect("fault lock");
        let Some(at) = faults.iter().position(|f| matches!(f, Fault::LoseAfter(_))) else {
            return (chunk, false);
        };
        let Fault::LoseAfter(left) = &mut faults[at] else {
            unreachable!("found above");
        };
        if (chunk.len() as u64) < *left {
            *left -= chunk.len() as u64;
            return (chunk, false);
        }
        let kept = chunk.slice(..*left as usize);
        faults.remove(at);
        (kept, true)
    }

    fn hold(&self, session: &str, digests: impl IntoIterator<Item = String>) {
        self.store()
            .sessions
            .entry(session.to_string())
            .or_default()
            .extend(digests);
    }

    /// Writes blob `blob` from `chunks` starting at `offset`, one writer per digest.
    async fn write(
        &self,
        blob: &Descriptor,
        offset: u64,
        chunks: &mut BoxStream<'static, Result<Bytes, Error>>,
    ) -> Result<Written, Error> {
        self.writers
            .exclusive(&blob.digest, self.write_locked(blob, offset, chunks))
            .await
    }

    async fn write_locked(
        &self,
        blob: &Descriptor,
        offset: u64,
        chunks: &mut BoxStream<'static, Result<Bytes, Error>>,
    ) -> Result<Written, Error> {
        let digest = blob.digest.clone();
        if self.has_blob(&digest) {
            return Ok(Written::Present);
        }
        let held = self.partial(&digest);
        if offset != 0 && offset != held {
            return Err(Error::ResumeOffset {
                digest,
                requested: offset,
                held,
            });
        }
        let mut bytes = if offset == 0 {
            Vec::new()
        } else {
            self.store().ingests.remove(&digest).unwrap_or_default()
        };
        let keep = |bytes: Vec<u8>| {
            self.store().ingests.insert(digest.clone(), bytes);
        };
        let mut received = 0u64;
        while let Some(chunk) = chunks.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    keep(bytes);
                    return Err(e);
                }
            };
            let pause = self.throttled(chunk.len());
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            let (chunk, lost) = self.arrive(chunk);
            let end = (bytes.len() + chunk.len()) as u64;
            if end > blob.size {
                // More bytes than the descriptor says: not the blob's bytes.
                self.store().ingests.remove(&digest);
                return Err(Error::SizeMismatch {
                    digest,
                    expected: blob.size,
                    received: end,
                });
            }
            bytes.extend_from_slice(&chunk);
            received += chunk.len() as u64;
            if lost {
                keep(bytes);
                return Ok(Written::Lost);
            }
        }
        if (bytes.len() as u64) < blob.size {
            let received = bytes.len() as u64;
            keep(bytes);
            return Err(Error::SizeMismatch {
                digest,
                expected: blob.size,
                received,
            });
        }
        let actual = oci::sha256_digest(&bytes);
        if actual != digest {
            self.store().ingests.remove(&digest);
            return Err(Error::DigestMismatch {
                digest,
                detail: format!("received bytes hash to {actual}"),
            });
        }
        if self.has_fault(|f| *f == Fault::RefuseBlob(digest.clone())) {
            return Err(Error::DigestMismatch {
                digest,
                detail: "refused by an injected fault".to_string(),
            });
        }
        let mut store = self.store();
        store.ingests.remove(&digest);
        store.content.insert(digest, Bytes::from(bytes));
        Ok(Written::Committed(received))
    }

    /// Imports one image under the store's lock: names it once it is complete.
    fn import_one(&self, spec: &ImageSpec) -> Result<(Named, Vec<ImportEvent>), Error> {
        let image = spec.source.as_str();
        let target = manifest_descriptor(spec)?;
        if self.has_fault(|f| match f {
            Fault::FailImport(which) => *which == spec.source || spec.names.contains(which),
            _ => false,
        }) {
            return Err(Error::Runtime {
                runtime: RUNTIME,
                op: format!("import {image}"),
                status: tonic::Status::internal("injected fault"),
            });
        }
        let mut store = self.store();
        let resolved = store.resolve(image, &target, &self.platform)?;
        let names: Vec<String> = spec.names.iter().map(|n| canonical_name(n)).collect();
        if !spec.allow_overwrite {
            for (name, given) in names.iter().zip(&spec.names) {
                if let Some(existing) = store.images.get(name).filter(|d| d.digest != target.digest)
                {
                    return Err(Error::NameTaken {
                        image: image.to_string(),
                        name: given.clone(),
                        existing: existing.digest.clone(),
                        wanted: target.digest.clone(),
                    });
                }
            }
        }
        let events = resolved
            .layers
            .iter()
            .zip(&resolved.chains)
            .map(|(layer, chain)| {
                let phase = if store.unpacked.insert(chain.clone()) {
                    ImportPhase::LayerUnpacked
                } else {
                    ImportPhase::LayerPresent
                };
                ImportEvent {
                    image: image.to_string(),
                    phase: phase as i32,
                    layer_digest: layer.clone(),
                    ..Default::default()
                }
            })
            .collect();
        let record = Descriptor {
            media_type: target.media_type.clone(),
            digest: target.digest.clone(),
            size: target.size,
            ..Default::default()
        };
        for name in names {
            if self.pins {
                store.pinned.insert(name.clone());
            }
            store.images.insert(name, record.clone());
        }
        Ok((
            Named {
                names: spec.names.clone(),
                digest: target.digest,
            },
            events,
        ))
    }

    fn verify_one(&self, reference: &str) -> RefStatus {
        let mut status = RefStatus {
            r#ref: reference.to_string(),
            ..Default::default()
        };
        let store = self.store();
        let name = canonical_name(reference);
        let Some(target) = store.images.get(&name) else {
            status.problem = "no such image".to_string();
            return status;
        };
        status.pinned = store.pinned.contains(&name);
        status.manifest_digest = target.digest.clone();
        let target = oci::Descriptor {
            media_type: target.media_type.clone(),
            digest: target.digest.clone(),
            size: target.size,
        };
        match store.resolve(reference, &target, &self.platform) {
            Ok(resolved) => {
                status.image_id = resolved.config;
                if resolved.chains.iter().all(|c| store.unpacked.contains(c)) {
                    status.ok = true;
                } else {
                    status.problem = "not unpacked".to_string();
                }
            }
            Err(e) => status.problem = e.to_string(),
        }
        status
    }
}

/// What one write did.
enum Written {
    /// Stored and verified, with the bytes this call brought.
    Committed(u64),
    /// Already stored; nothing was read.
    Present,
    /// A [`Fault::LoseAfter`] struck during it.
    Lost,
}

impl Runtime for Memory {
    const NAME: &'static str = RUNTIME;

    async fn info(&self) -> Result<InfoResponse, Error> {
        Ok(InfoResponse {
            node_name: self.node_name.clone(),
            runtime: RUNTIME.to_string(),
            runtime_version: env!("CARGO_PKG_VERSION").to_string(),
            platform: self.platform.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            // It unpacks nothing: the coordinator checks layers before it sends them.
            checks_layers: false,
            images_pinned: self.pins,
            ..Default::default()
        })
    }

    async fn ready(&self) -> Result<(), Error> {
        Ok(())
    }

    async fn have(&self, session: &str, blobs: &[Descriptor]) -> Result<Vec<BlobState>, Error> {
        let states: Vec<BlobState> = {
            let store = self.store();
            blobs
                .iter()
                .map(|d| BlobState {
                    digest: d.digest.clone(),
                    present: store.content.contains_key(&d.digest),
                    // A committed blob has no ingest left: its offset is 0.
                    offset: store.ingests.get(&d.digest).map_or(0, |b| b.len() as u64),
                })
                .collect()
        };
        let present = states.iter().filter(|s| s.present);
        self.hold(session, present.map(|s| s.digest.clone()));
        Ok(states)
    }

    async fn put_blob(
        &self,
        header: BlobHeader,
        mut chunks: BoxStream<'static, Result<Bytes, Error>>,
    ) -> Result<PutBlobResponse, Error> {
        let blob = header.blob.unwrap_or_default();
        if self.has_fault(|f| match f {
            Fault::Stall(which) => which.as_ref().is_none_or(|d| *d == blob.digest),
            _ => false,
        }) {
            // Holds the stream open and never reads it again.
            let _open = chunks;
            return std::future::pending().await;
        }
        self.hold(&header.session, [blob.digest.clone()]);
        match self.write(&blob, header.offset, &mut chunks).await? {
            Written::Committed(received) => Ok(PutBlobResponse {
                digest: blob.digest,
                received,
                ..Default::default()
            }),
            Written::Present => Ok(PutBlobResponse {
                digest: blob.digest,
                already_present: true,
                ..Default::default()
            }),
            Written::Lost => {
                self.lost.send_replace(true);
                let _open = chunks;
                std::future::pending().await
            }
        }
    }

    async fn import(
        &self,
        session: &str,
        images: Vec<ImageSpec>,
        events: mpsc::Sender<ImportEvent>,
    ) -> Result<(), Error> {
        let _ = session;
        for spec in &images {
            let started = Instant::now();
            // The layers' events, then the image's own.
            let (outcome, mut sent) = match self.import_one(spec) {
                Ok((named, layer_events)) => (Ok(named), layer_events),
                Err(e) => (Err(e), Vec::new()),
            };
            sent.push(finished_event(spec, started, outcome));
            for event in sent {
                let _ = events.send(event).await;
            }
        }
        Ok(())
    }

    async fn end_session(&self, session: &str) -> Result<(), Error> {
        self.store().sessions.remove(session);
        Ok(())
    }

    async fn verify(&self, refs: &[String]) -> Result<Vec<RefStatus>, Error> {
        Ok(refs.iter().map(|r| self.verify_one(r)).collect())
    }

    async fn read_blob(
        &self,
        digest: &str,
        offset: u64,
    ) -> Result<BoxStream<'static, Result<Bytes, Error>>, Error> {
        let chunks = self.read_committed(digest, offset)?;
        if self.has_fault(|f| *f == Fault::StallServe) {
            return Ok(futures::stream::pending().boxed());
        }
        let pause = self.throttled(CHUNK_SIZE);
        if pause.is_zero() {
            return Ok(chunks);
        }
        Ok(chunks
            .then(move |chunk| async move {
                tokio::time::sleep(pause).await;
                chunk
            })
            .boxed())
    }

    async fn list(&self) -> Result<Vec<ImageRecord>, Error> {
        Ok(self
            .store()
            .images
            .iter()
            .map(|(name, target)| ImageRecord {
                name: name.clone(),
                target: Some(target.clone()),
            })
            .collect())
    }

    async fn hold(&self, held: Held) -> Result<(), Error> {
        if self.has_fault(|f| matches!(f, Fault::FailHold)) {
            return Err(Error::Runtime {
                runtime: RUNTIME,
                op: format!("hold {} {}", held.bundle, held.version),
                status: tonic::Status::internal("injected fault"),
            });
        }
        let key = (held.bundle.clone(), held.version.clone());
        self.store().holds.insert(key, held);
        Ok(())
    }

    async fn holds(&self) -> Result<Vec<Held>, Error> {
        Ok(self.store().holds.values().cloned().collect())
    }

    async fn drop_hold(&self, bundle: &str, version: &str) -> Result<(), Error> {
        self.store()
            .holds
            .remove(&(bundle.to_string(), version.to_string()));
        self.collect();
        Ok(())
    }

    async fn present(&self, blobs: &[Descriptor]) -> Result<Vec<bool>, Error> {
        let store = self.store();
        Ok(blobs
            .iter()
            .map(|b| store.content.contains_key(&b.digest))
            .collect())
    }

    async fn containers_using(
        &self,
        names: &[String],
    ) -> Result<HashMap<String, Vec<String>>, Error> {
        let store = self.store();
        Ok(names
            .iter()
            .filter_map(|n| {
                let used = store.containers.get(&canonical_name(n))?;
                (!used.is_empty()).then(|| (n.clone(), used.clone()))
            })
            .collect())
    }

    async fn remove_names(&self, names: &[String]) -> Result<(), Error> {
        let mut store = self.store();
        for name in names {
            let name = canonical_name(name);
            store.images.remove(&name);
            store.pinned.remove(&name);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::test_chunks as chunks;
    use std::sync::Arc;

    fn header(data: &[u8], offset: u64) -> BlobHeader {
        BlobHeader {
            session: "s".to_string(),
            blob: Some(Descriptor {
                digest: oci::sha256_digest(data),
                size: data.len() as u64,
                ..Default::default()
            }),
            offset,
            ..Default::default()
        }
    }

    async fn collect(stream: BoxStream<'static, Result<Bytes, Error>>) -> Vec<u8> {
        let parts: Vec<Bytes> = stream.map(|c| c.unwrap()).collect().await;
        parts.concat()
    }

    #[tokio::test]
    async fn a_refused_blob_is_read_whole_and_not_kept() {
        let memory = Memory::new("n");
        let data = b"refused blob";
        let digest = oci::sha256_digest(data);
        memory.inject(Fault::RefuseBlob(digest.clone()));
        let err = memory
            .put_blob(header(data, 0), chunks(&[data]))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::DigestMismatch { .. }), "{err}");
        assert!(!memory.has_blob(&digest));
        assert_eq!(memory.partial(&digest), 0);
        memory.clear_faults();
        let done = memory
            .put_blob(header(data, 0), chunks(&[data]))
            .await
            .unwrap();
        assert_eq!(done.received, data.len() as u64);
        assert!(memory.has_blob(&digest));
    }

    #[tokio::test]
    async fn a_lost_node_keeps_exactly_the_bytes_before_the_loss() {
        let memory = Arc::new(Memory::new("n"));
        let data = b"0123456789";
        memory.inject(Fault::LoseAfter(6));
        let lost = memory.lost();
        let upload = tokio::spawn({
            let memory = memory.clone();
            async move {
                memory
                    .put_blob(header(data, 0), chunks(&[b"0123", b"4567", b"89"]))
                    .await
            }
        });
        let mut watch = lost.clone();
        watch.wait_for(|l| *l).await.unwrap();
        assert!(!upload.is_finished(), "a lost node must not answer");
        upload.abort();
        assert_eq!(memory.partial(&oci::sha256_digest(data)), 6);
        memory.clear_faults();
        assert!(!*memory.lost().borrow());
        let done = memory
            .put_blob(header(data, 6), chunks(&[b"6789"]))
            .await
            .unwrap();
        assert_eq!(done.received, 4);
    }

    #[tokio::test]
    async fn read_blob_serves_a_committed_blob_from_an_offset() {
        let memory = Memory::new("n");
        let data: Vec<u8> = (0..(CHUNK_SIZE * 2 + 5)).map(|i| i as u8).collect();
        let digest = oci::sha256_digest(&data);
        assert!(memory.read_blob(&digest, 0).await.is_err());
        memory
            .put_blob(header(&data, 0), chunks(&[&data]))
            .await
            .unwrap();
        assert_eq!(
            collect(memory.read_blob(&digest, 0).await.unwrap()).await,
            data
        );
        let offset = CHUNK_SIZE as u64 + 3;
        let tail = collect(memory.read_blob(&digest, offset).await.unwrap()).await;
        assert_eq!(tail, data[offset as usize..]);
        let past = memory.read_blob(&digest, data.len() as u64 + 1).await;
        assert!(matches!(past, Err(Error::InvalidRequest(_))));
    }

    #[tokio::test]
    async fn verify_takes_short_names_as_the_other_runtimes_do() {
        let memory = Memory::new("n");
        let status = memory
            .verify(&["busybox:latest".to_string()])
            .await
            .unwrap();
        assert!(!status[0].ok && status[0].problem == "no such image");
        memory.store().images.insert(
            "docker.io/library/busybox:latest".to_string(),
            Descriptor {
                digest: oci::sha256_digest(b"manifest"),
                ..Default::default()
            },
        );
        let status = memory
            .verify(&["busybox:latest".to_string()])
            .await
            .unwrap();
        // Found by its full name; its manifest is not on the node.
        assert!(!status[0].ok, "{status:?}");
        assert!(
            status[0].problem.contains("is not on this node"),
            "{status:?}"
        );
    }
}
