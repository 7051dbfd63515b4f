//! Info and storage: containerd's version and what it implies (the CRI pin label), whether it
//! serves CRI (for `--runtime auto`), and the free space under its content store and
//! snapshotter.

use std::path::PathBuf;

use containerd_client::services::v1::{
    introspection_client::IntrospectionClient, version_client::VersionClient, PluginsRequest,
};
use lade_proto::InfoResponse;
use tracing::debug;

use super::unpack::existing_or_parent;
use super::{Containerd, ImageStore, RUNTIME};
use crate::error::Error;

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
pub(super) fn major_version(version: &str) -> u64 {
    version_numbers(version).first().copied().unwrap_or(0)
}

impl Containerd {
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
    pub(super) async fn storage(&self) -> Vec<lade_proto::Storage> {
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

    /// containerd's version as its Version service reports it (e.g. `1.6.20~ds1`).
    pub(super) async fn version(&self) -> Result<String, Error> {
        Ok(VersionClient::new(self.channel.clone())
            .version(())
            .await
            .map_err(Error::runtime(RUNTIME, "Version"))?
            .into_inner()
            .version)
    }

    /// Node and runtime identity, as Info reports it.
    pub(super) async fn node_info(&self) -> Result<InfoResponse, Error> {
        let version = VersionClient::new(self.channel.clone())
            .version(())
            .await
            .map_err(Error::runtime(RUNTIME, "Version"))?
            .into_inner();
        let runtime_version = version.version;
        let (runtime, shown_version) = match &self.cfg.store {
            ImageStore::Cri => (RUNTIME, runtime_version.clone()),
            ImageStore::Docker { version, .. } => {
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
            fetches_from_peers: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
