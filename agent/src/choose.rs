//! Which runtime the agent serves: the one `--runtime` names, or for `auto` the one that
//! answers as kubelet's. The runtime seam (`lade_agent::runtime`) names no implementation;
//! this is where the binary picks one.

use anyhow::Context;
use lade_agent::error::Error;
use lade_agent::runtime::containerd::{Containerd, ContainerdConfig, ImageStore};
use lade_agent::runtime::docker::Docker;
use lade_agent::runtime::Runtime;
use tracing::{info, warn};

/// Which runtime the agent serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RuntimeKind {
    Containerd,
    Docker,
}

/// Picks the runtime for `--runtime auto`: containerd when it answers and serves the CRI
/// plugin (it is what kubelet uses), else Docker when it answers. A stock Docker install runs
/// a containerd too, with CRI disabled, which must not win: images loaded there would be
/// invisible to Docker and kubelet alike.
pub(crate) async fn detect(containerd: &Containerd, docker: &Docker) -> Result<RuntimeKind, Error> {
    let containerd_error = match containerd.serves_cri().await {
        Ok(true) => {
            info!(socket = %containerd.socket().display(), "auto: using containerd");
            return Ok(RuntimeKind::Containerd);
        }
        Ok(false) => "it answers, but its CRI plugin is disabled".to_string(),
        Err(e) => e.to_string(),
    };
    match docker.ready().await {
        Ok(()) => {
            info!(socket = %docker.socket().display(), %containerd_error, "auto: using docker");
            Ok(RuntimeKind::Docker)
        }
        Err(e) => Err(Error::NoRuntime {
            containerd: containerd.socket().display().to_string(),
            containerd_error,
            docker: docker.socket().display().to_string(),
            docker_error: e.to_string(),
        }),
    }
}

/// Serves CRI's images on containerd, unpacking into the snapshotter CRI keeps them in:
/// `--snapshotter auto` asks CRI (its image filesystem) and falls back to overlayfs when CRI
/// does not say; a snapshotter named that differs from CRI's is used, with a warning (kubelet
/// would find every image lade loads not unpacked where it looks, and containerd would unpack
/// it again at the first container start).
pub(crate) async fn cri_runtime(containerd: Containerd) -> Containerd {
    let asked = containerd.cri_snapshotter().await;
    match (containerd.snapshotter(), asked) {
        (AUTO, Ok(Some(cri))) => {
            info!(snapshotter = %cri, "unpacking into the snapshotter CRI keeps images in");
            containerd.with_snapshotter(cri)
        }
        (AUTO, asked) => {
            let why = match asked {
                Ok(_) => "CRI names no snapshotter directory".to_string(),
                Err(e) => e.to_string(),
            };
            warn!(%why, "--snapshotter auto: CRI did not say which snapshotter it uses; unpacking into {FALLBACK_SNAPSHOTTER}");
            containerd.with_snapshotter(FALLBACK_SNAPSHOTTER.to_string())
        }
        (named, Ok(Some(cri))) if named != cri => {
            warn!(snapshotter = %named, cri = %cri, "--snapshotter differs from the snapshotter CRI keeps images in: kubelet will not find what this agent unpacks, and containerd will unpack each image again at its first container start (use --snapshotter auto)");
            containerd
        }
        _ => containerd,
    }
}

/// `--snapshotter auto`.
pub(crate) const AUTO: &str = "auto";

/// The snapshotter of `--snapshotter auto` when CRI does not say (containerd's default).
const FALLBACK_SNAPSHOTTER: &str = "overlayfs";

/// The runtime the agent serves.
pub(crate) enum Chosen {
    /// containerd: CRI's images, or dockerd's on its containerd image store.
    Containerd(Containerd),
    /// dockerd with a graph driver.
    Docker(Docker),
}

/// Serves Docker: through `POST /images/load` on a graph driver (overlay2); on the containerd
/// image store, by writing into dockerd's containerd directly (its namespace and snapshotter,
/// at the socket dockerd reports or `--containerd-socket`), as a pull would.
pub(crate) async fn docker_runtime(
    docker: Docker,
    mut containerd: ContainerdConfig,
) -> anyhow::Result<Chosen> {
    let store = docker.containerd_store().await.with_context(|| {
        format!(
            "asking dockerd at {} which image store it uses",
            docker.socket().display()
        )
    })?;
    let Some(store) = store else {
        return Ok(Chosen::Docker(docker));
    };
    if let Some(address) = store.address {
        containerd.socket = address;
    }
    containerd.namespace = store.namespace;
    containerd.snapshotter = store.snapshotter;
    containerd.store = ImageStore::Docker {
        version: store.docker_version,
        socket: docker.socket().to_path_buf(),
    };
    info!(
        socket = %containerd.socket.display(),
        namespace = %containerd.namespace,
        snapshotter = %containerd.snapshotter,
        "dockerd uses the containerd image store: loading into its containerd"
    );
    let socket = containerd.socket.clone();
    let runtime = Containerd::new(containerd)?;
    runtime.ready().await.with_context(|| {
        format!(
            "dockerd uses the containerd image store, but its containerd does not answer at {}: \
             point --containerd-socket at dockerd's containerd (dockerd before 27 does not \
             report where it is)",
            socket.display()
        )
    })?;
    Ok(Chosen::Containerd(runtime))
}
