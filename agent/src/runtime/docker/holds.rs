//! Hold records on Docker's graph-driver store. dockerd has nowhere to keep them and no
//! content it could hold for lade, so a record is a file beside the blob cache
//! (`<cache dir>/holds/<hash of bundle and version>.pb`, the [`Held`] message prost-encoded,
//! written to a temporary file, synced and renamed into place), and the blobs a record lists
//! are kept from cache cleaning until the record is dropped. A blob is present as Have finds
//! it: in the cache, or what it would give dockerd is there. Also what uses and names images:
//! dockerd's containers (shared with the containerd image store, whose containers dockerd
//! alone knows) and untagging.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use bollard::query_parameters::{ListContainersOptionsBuilder, RemoveImageOptionsBuilder};
use lade_proto::{Descriptor, Held};
use prost::Message;
use tracing::debug;

use super::{is_not_found, Docker, RUNTIME};
use crate::error::Error;
use crate::runtime::canonical_name;
use lade_oci as oci;

/// CRI's container labels (cri-dockerd sets them too) naming the pod and container.
const LABEL_POD: &str = "io.kubernetes.pod.name";
const LABEL_CONTAINER: &str = "io.kubernetes.container.name";

/// Every container dockerd has, running or stopped, twice: as (its image name in full form,
/// name to show) and as (its image ID, name to show). The name to show is `pod/container`
/// under Kubernetes, else the container's name, else its id.
pub(crate) async fn docker_containers(
    docker: &bollard::Docker,
) -> Result<Vec<(String, String)>, bollard::errors::Error> {
    let containers = docker
        .list_containers(Some(
            ListContainersOptionsBuilder::default().all(true).build(),
        ))
        .await?;
    let mut out = Vec::with_capacity(containers.len() * 2);
    for c in containers {
        let labels = c.labels.unwrap_or_default();
        let id = c.id.unwrap_or_default();
        let who = match (labels.get(LABEL_POD), labels.get(LABEL_CONTAINER)) {
            (Some(pod), Some(container)) => format!("{pod}/{container}"),
            _ => c
                .names
                .and_then(|n| n.into_iter().next())
                .map(|n| n.trim_start_matches('/').to_string())
                .filter(|n| !n.is_empty())
                .unwrap_or(id),
        };
        if let Some(image) = c.image.filter(|i| !i.is_empty()) {
            let image = if image.starts_with("sha256:") {
                image
            } else {
                canonical_name(&image)
            };
            out.push((image, who.clone()));
        }
        if let Some(image_id) = c.image_id.filter(|i| !i.is_empty()) {
            out.push((image_id, who));
        }
    }
    Ok(out)
}

/// Connects to the dockerd at `socket` for one call.
pub(crate) async fn connect(socket: &Path) -> Result<bollard::Docker, Error> {
    let connect_err = |reason: String| Error::Connect {
        runtime: RUNTIME,
        socket: socket.display().to_string(),
        reason,
    };
    let path = socket
        .to_str()
        .ok_or_else(|| connect_err("the socket path is not UTF-8".into()))?;
    bollard::Docker::connect_with_unix(path, 120, bollard::API_DEFAULT_VERSION)
        .map_err(|e| connect_err(e.to_string()))?
        .negotiate_version()
        .await
        .map_err(|e| connect_err(e.to_string()))
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, synced, renamed over it,
/// and the directory synced. The directory is made 0700 and the file 0600.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)?;
    fs::File::open(dir)?.sync_all()
}

/// Every record file in `dir`, decoded; none when the directory does not exist.
fn read_records(dir: &Path) -> Result<Vec<Held>, Error> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::cache(dir, "list hold records")(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(Error::cache(dir, "list hold records"))?
            .path();
        if path.extension().and_then(|e| e.to_str()) != Some("pb") {
            continue;
        }
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            // Dropped since the listing.
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::cache(&path, "read hold record")(e)),
        };
        let held = Held::decode(bytes.as_slice()).map_err(|e| Error::BadHoldRecord {
            record: path.display().to_string(),
            reason: e.to_string(),
        })?;
        out.push(held);
    }
    Ok(out)
}

impl Docker {
    fn holds_dir(&self) -> PathBuf {
        self.cfg.cache_dir.join("holds")
    }

    /// The record file of `bundle` `version`: named by a hash, whatever the names are.
    fn record_path(&self, bundle: &str, version: &str) -> PathBuf {
        let digest = oci::sha256_digest(format!("{bundle}\0{version}").as_bytes());
        let hex = digest.trim_start_matches("sha256:");
        self.holds_dir().join(format!("{hex}.pb"))
    }

    pub(super) async fn hold_version(&self, held: Held) -> Result<(), Error> {
        let path = self.record_path(&held.bundle, &held.version);
        let bytes = held.encode_to_vec();
        let _records = self.records.lock().await;
        let at = path.clone();
        tokio::task::spawn_blocking(move || write_atomically(&at, &bytes))
            .await
            .map_err(|e| Error::cache(&path, "write hold record")(std::io::Error::other(e)))?
            .map_err(Error::cache(&path, "write hold record"))
    }

    pub(super) async fn held_versions(&self) -> Result<Vec<Held>, Error> {
        let dir = self.holds_dir();
        let at = dir.clone();
        tokio::task::spawn_blocking(move || read_records(&at))
            .await
            .map_err(|e| Error::cache(&dir, "list hold records")(std::io::Error::other(e)))?
    }

    /// Every blob digest a record lists: kept from cache cleaning.
    pub(super) async fn held_digests(&self) -> Result<HashSet<String>, Error> {
        Ok(self
            .held_versions()
            .await?
            .iter()
            .flat_map(crate::holds::blobs)
            .map(|b| b.digest)
            .collect())
    }

    /// Removes the record; with cache cleaning on, also the cached layer blobs it listed
    /// that no other record and no load in progress needs (dockerd holds the images).
    pub(super) async fn drop_version(&self, bundle: &str, version: &str) -> Result<(), Error> {
        let path = self.record_path(bundle, version);
        let _records = self.records.lock().await;
        let dropped = self
            .held_versions()
            .await?
            .into_iter()
            .find(|h| h.bundle == bundle && h.version == version);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::cache(&path, "remove hold record")(e)),
        }
        let (Some(dropped), true) = (dropped, self.cfg.clean_cache) else {
            return Ok(());
        };
        let mut needed = self.held_digests().await?;
        needed.extend(self.session_digests());
        let unneeded: Vec<String> = crate::holds::blobs(&dropped)
            .into_iter()
            .filter(|b| !b.diff_id.is_empty() && !needed.contains(&b.digest))
            .map(|b| b.digest)
            .collect();
        debug!(blobs = unneeded.len(), %bundle, %version, "cleaning the blob cache of a dropped hold");
        self.cache.remove(unneeded).await;
        Ok(())
    }

    /// As Have judges it, holding nothing: in the cache, or in dockerd (an image by its
    /// config, a layer by its diffID on the chains the cached configs need).
    pub(super) async fn blobs_present(&self, blobs: &[Descriptor]) -> Result<Vec<bool>, Error> {
        let mut cached = Vec::with_capacity(blobs.len());
        for b in blobs {
            cached.push(self.cache.contains(&b.digest).await?);
        }
        self.covered(blobs, &cached).await
    }

    pub(super) async fn users(
        &self,
        names: &[String],
    ) -> Result<HashMap<String, Vec<String>>, Error> {
        let docker = self.client().await?;
        // Each name's image ID, and every ID as its own target, so that a container found by
        // ID matches every name of its image.
        let mut targets = HashMap::new();
        for name in names {
            match docker.inspect_image(name).await {
                Ok(image) => {
                    if let Some(id) = image.id {
                        targets.insert(canonical_name(name), id.clone());
                        targets.insert(id.clone(), id);
                    }
                }
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(self.call_err(format!("inspect image {name}"))(e)),
            }
        }
        let containers = docker_containers(docker)
            .await
            .map_err(self.call_err("list containers"))?;
        let full: Vec<String> = names.iter().map(|n| canonical_name(n)).collect();
        let used = crate::runtime::users_of(&full, &targets, &containers);
        Ok(names
            .iter()
            .zip(&full)
            .filter_map(|(name, full)| Some((name.clone(), used.get(full)?.clone())))
            .collect())
    }

    /// Untags every name (absent ones are fine). An image whose last name goes is deleted
    /// by dockerd, unless a container uses it: then dockerd refuses, and so does this.
    pub(super) async fn untag_names(&self, names: &[String]) -> Result<(), Error> {
        let docker = self.client().await?;
        for name in names {
            let removed = docker
                .remove_image(
                    name,
                    Some(RemoveImageOptionsBuilder::default().noprune(true).build()),
                    None,
                )
                .await;
            match removed {
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(self.image_err(name, "untag")(e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_replaced_whole_and_listed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("holds/x.pb");
        let held = |v: &str| Held {
            bundle: "b".into(),
            version: v.into(),
            ..Default::default()
        };
        write_atomically(&path, &held("1").encode_to_vec()).unwrap();
        write_atomically(&path, &held("2").encode_to_vec()).unwrap();
        fs::write(dir.path().join("holds/x.pb.tmp"), b"partial").unwrap();
        let records = read_records(&dir.path().join("holds")).unwrap();
        assert_eq!(records, vec![held("2")]);
        assert!(read_records(&dir.path().join("none")).unwrap().is_empty());
        fs::write(dir.path().join("holds/y.pb"), b"\xff\xff").unwrap();
        let err = read_records(&dir.path().join("holds")).unwrap_err();
        assert!(err.to_string().contains("y.pb"), "{err}");
    }
}
