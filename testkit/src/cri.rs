//! What kubelet would see: a minimal client for the Kubernetes CRI `runtime.v1.ImageService`,
//! used to check images through containerd's CRI plugin rather than through containerd's own
//! API. An image lade imported is only useful to Kubernetes if CRI reports it (right namespace,
//! tags, digests), so tests assert on this view. No crictl needed.
//!
//! The schema is the subset of the upstream CRI api.proto that lade uses (`lade_proto::cri`,
//! the same the agent asks CRI with).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use lade_proto::cri as pb;

use pb::image_service_client::ImageServiceClient;

/// An image as CRI reports it to kubelet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriImage {
    /// Image id (for containerd: `sha256:<config digest>`).
    pub id: String,
    /// Tags the image is known by, e.g. `docker.io/library/busybox:1.36`.
    pub repo_tags: Vec<String>,
    /// Digest references, e.g. `docker.io/library/busybox@sha256:…`.
    pub repo_digests: Vec<String>,
    /// Size in bytes as computed by the runtime.
    pub size: u64,
    /// Whether kubelet's image garbage collection must keep it (containerd reports the
    /// `io.cri-containerd.pinned` label here from 1.7.3 on).
    pub pinned: bool,
}

impl From<pb::Image> for CriImage {
    fn from(i: pb::Image) -> Self {
        CriImage {
            id: i.id,
            repo_tags: i.repo_tags,
            repo_digests: i.repo_digests,
            size: i.size,
            pinned: i.pinned,
        }
    }
}

/// Asks the CRI ImageService behind `socket` for `image` (a tag, digest reference or id).
///
/// Returns `Ok(None)` when CRI answers that it does not have the image (response `image`
/// unset), `Err` when CRI could not be asked or answered with an error (e.g. not initialized
/// yet, or an unparsable reference).
pub async fn image_status(socket: &Path, image: &str) -> Result<Option<CriImage>> {
    let mut client = connect(socket).await?;
    let response = client
        .image_status(pb::ImageStatusRequest {
            image: Some(pb::ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
            verbose: false,
        })
        .await
        .with_context(|| format!("CRI ImageStatus({image}) on {}", socket.display()))?;
    Ok(response.into_inner().image.map(CriImage::from))
}

/// Lists every image the CRI ImageService behind `socket` reports (the `k8s.io` namespace for
/// containerd).
pub async fn list_images(socket: &Path) -> Result<Vec<CriImage>> {
    let mut client = connect(socket).await?;
    let response = client
        .list_images(pb::ListImagesRequest { filter: None })
        .await
        .with_context(|| format!("CRI ListImages on {}", socket.display()))?;
    Ok(response
        .into_inner()
        .images
        .into_iter()
        .map(CriImage::from)
        .collect())
}

/// The mount points of the filesystems the CRI ImageService behind `socket` keeps images on.
/// For containerd this is `<root>/io.containerd.snapshotter.v1.<snapshotter>`: which
/// snapshotter CRI's configuration really selected.
pub async fn image_filesystems(socket: &Path) -> Result<Vec<PathBuf>> {
    let mut client = connect(socket).await?;
    let response = client
        .image_fs_info(pb::ImageFsInfoRequest {})
        .await
        .with_context(|| format!("CRI ImageFsInfo on {}", socket.display()))?;
    Ok(response
        .into_inner()
        .image_filesystems
        .into_iter()
        .filter_map(|fs| fs.fs_id.map(|id| PathBuf::from(id.mountpoint)))
        .collect())
}

/// One connection per call: these are test assertions, not a hot path, and a fresh
/// connection never carries state across a daemon restart.
async fn connect(socket: &Path) -> Result<ImageServiceClient<Channel>> {
    let path: PathBuf = socket.to_path_buf();
    // The URI is required by the API but ignored: the connector below always dials the socket.
    let channel = Endpoint::try_from("http://[::]")?
        .connect_timeout(Duration::from_secs(5))
        // Bounded so a wedged daemon fails the test instead of hanging it.
        .timeout(Duration::from_secs(30))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .with_context(|| format!("connect to CRI at {}", socket.display()))?;
    Ok(ImageServiceClient::new(channel))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::tests::tiny_docker_archive;
    use crate::harness::{daemon_tests_enabled, Containerd};

    #[tokio::test]
    async fn connecting_to_a_missing_socket_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = image_status(&dir.path().join("nope.sock"), "busybox")
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("nope.sock"), "{err:#}");
    }

    /// An image imported into containerd's `k8s.io` namespace shows up through CRI with the
    /// fields kubelet uses, and one imported into another namespace does not. This also checks
    /// our field numbers: wrong ones would decode as empty strings / zero size.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cri_reports_images_of_the_k8s_namespace_only() {
        if !daemon_tests_enabled() {
            return;
        }
        let node = Containerd::start("cri").await.unwrap();
        let k8s_tar = node.dir().join("k8s.tar");
        let other_tar = node.dir().join("other.tar");
        std::fs::write(
            &k8s_tar,
            tiny_docker_archive(
                "lade-cri-probe:v1",
                &[("hello.txt", b"hello from lade\n", 0o644)],
            ),
        )
        .unwrap();
        std::fs::write(
            &other_tar,
            tiny_docker_archive(
                "lade-cri-other:v1",
                &[("other.txt", b"not for kubelet\n", 0o644)],
            ),
        )
        .unwrap();
        // `--digests` + `--base-name` makes ctr also create the `name@sha256:…` image record;
        // CRI builds repo_digests only from such records, a bare tag import reports none.
        node.ctr_ok(&[
            "-n",
            "k8s.io",
            "images",
            "import",
            "--digests",
            "--base-name",
            "docker.io/library/lade-cri-probe",
            k8s_tar.to_str().unwrap(),
        ])
        .unwrap();
        node.ctr_ok(&[
            "-n",
            "default",
            "images",
            "import",
            other_tar.to_str().unwrap(),
        ])
        .unwrap();

        // CRI learns about images from containerd events, asynchronously.
        let tag = "docker.io/library/lade-cri-probe:v1";
        let mut found = None;
        for _ in 0..100 {
            found = image_status(&node.socket(), tag).await.unwrap();
            if found.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let image =
            found.unwrap_or_else(|| panic!("CRI never reported {tag}; log:\n{}", node.log_tail()));

        let ctr_images = node.ctr_ok(&["-n", "k8s.io", "images", "ls"]).unwrap();
        assert!(
            image.id.starts_with("sha256:") && image.id.len() == 71,
            "{image:?}"
        );
        assert_eq!(image.repo_tags, vec![tag.to_string()]);
        assert_eq!(image.repo_digests.len(), 1, "{image:?}");
        let digest = image.repo_digests[0]
            .strip_prefix("docker.io/library/lade-cri-probe@")
            .unwrap_or_else(|| panic!("unexpected repo digest {:?}", image.repo_digests));
        assert!(
            ctr_images.contains(digest),
            "{digest} not in ctr listing:\n{ctr_images}"
        );
        assert!(image.size > 0, "{image:?}");

        // Looking the image up by its id gives the same answer.
        assert_eq!(
            image_status(&node.socket(), &image.id).await.unwrap(),
            Some(image.clone())
        );

        let listed = list_images(&node.socket()).await.unwrap();
        assert!(listed.contains(&image), "{listed:?}");
        assert!(
            !listed
                .iter()
                .flat_map(|i| &i.repo_tags)
                .any(|t| t.contains("lade-cri-other")),
            "image of the default namespace leaked into CRI: {listed:?}"
        );
        assert_eq!(
            image_status(&node.socket(), "docker.io/library/lade-cri-other:v1")
                .await
                .unwrap(),
            None
        );
    }
}
