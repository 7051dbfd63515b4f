//! The bundle's `original-chart/` as a helm OCI artifact, the form `helm push` gives a chart
//! and `helm pull oci://…` / `helm upgrade … oci://…` read.
//!
//! The artifact is an OCI manifest whose config (`application/vnd.cncf.helm.config.v1+json`)
//! holds `Chart.yaml`'s fields as JSON and whose one layer
//! (`application/vnd.cncf.helm.chart.content.v1.tar+gzip`) is the chart directory, tarred
//! under a top folder named after the chart and gzipped; its tag is the chart version (`+`
//! written `_`, as helm does, since tags cannot hold `+`).
//!
//! The archive is made byte-for-byte reproducible (sorted members, zero times and owners,
//! no gzip name or time), so pushing the same bundle twice yields the same digest and the
//! second push finds the tag unchanged instead of refusing to move it.

use std::io::Write;
use std::path::Path;

use flate2::write::GzEncoder;
use serde_json::json;

use lade_oci::{sha256_digest, MEDIA_TYPE_OCI_MANIFEST};

use crate::bundle::{Bundle, BundleError};

pub const MEDIA_TYPE_HELM_CONFIG: &str = "application/vnd.cncf.helm.config.v1+json";
pub const MEDIA_TYPE_HELM_CONTENT: &str = "application/vnd.cncf.helm.chart.content.v1.tar+gzip";

/// Why the chart cannot be packaged.
#[derive(Debug, thiserror::Error)]
pub enum ChartError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error("{}: {what}: {source}", path.display())]
    Io {
        path: std::path::PathBuf,
        what: String,
        source: std::io::Error,
    },
    #[error("the bundle's original-chart/Chart.yaml {problem}")]
    ChartYaml { problem: String },
}

/// A chart ready to push: three blobs, the last the manifest.
#[derive(Clone, Debug)]
pub struct ChartArtifact {
    pub name: String,
    pub version: String,
    pub config: Vec<u8>,
    pub content: Vec<u8>,
    pub manifest: Vec<u8>,
}

impl ChartArtifact {
    /// The tag helm gives version `version`.
    pub fn tag(&self) -> String {
        self.version.replace('+', "_")
    }

    /// Digest of the manifest, which the tag points at.
    pub fn digest(&self) -> String {
        sha256_digest(&self.manifest)
    }
}

/// Packages the bundle's `original-chart/` (copied out of the bundle to a temporary
/// directory first: a chart is a few small files).
pub fn package(bundle: &Bundle) -> Result<ChartArtifact, ChartError> {
    let dir = tempfile::Builder::new()
        .prefix("lade-chart-")
        .tempdir()
        .map_err(|source| ChartError::Io {
            path: std::env::temp_dir(),
            what: "creating a temporary directory for the chart".into(),
            source,
        })?;
    bundle.extract_chart(dir.path())?;
    package_dir(dir.path())
}

/// Packages the chart directory `dir`.
fn package_dir(dir: &Path) -> Result<ChartArtifact, ChartError> {
    let chart_yaml = dir.join("Chart.yaml");
    let text = std::fs::read_to_string(&chart_yaml).map_err(|source| ChartError::Io {
        path: chart_yaml.clone(),
        what: "reading Chart.yaml".into(),
        source,
    })?;
    let metadata: serde_yaml::Value =
        serde_yaml::from_str(&text).map_err(|e| ChartError::ChartYaml {
            problem: format!("is not YAML: {e}"),
        })?;
    let field = |key: &str| match metadata.get(key) {
        Some(serde_yaml::Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        _ => Err(ChartError::ChartYaml {
            problem: format!("has no {key}"),
        }),
    };
    let (name, version) = (field("name")?, field("version")?);
    let config = serde_json::to_vec(&metadata).map_err(|e| ChartError::ChartYaml {
        problem: format!("cannot be written as JSON: {e}"),
    })?;
    let content = tar_gz(dir, &name).map_err(|source| ChartError::Io {
        path: dir.to_path_buf(),
        what: "packaging the chart".into(),
        source,
    })?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_OCI_MANIFEST,
        "config": {
            "mediaType": MEDIA_TYPE_HELM_CONFIG,
            "digest": sha256_digest(&config),
            "size": config.len(),
        },
        "layers": [{
            "mediaType": MEDIA_TYPE_HELM_CONTENT,
            "digest": sha256_digest(&content),
            "size": content.len(),
        }],
        "annotations": {
            "org.opencontainers.image.title": name,
            "org.opencontainers.image.version": version,
        },
    }))
    .expect("serialising a JSON value cannot fail");
    Ok(ChartArtifact {
        name,
        version,
        config,
        content,
        manifest,
    })
}

/// `dir`'s files under top folder `top`, tarred in path order and gzipped, reproducibly.
fn tar_gz(dir: &Path, top: &str) -> std::io::Result<Vec<u8>> {
    let mut files = Vec::new();
    collect_files(dir, Path::new(""), &mut files)?;
    files.sort();
    let gz = GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    for relative in files {
        let data = std::fs::read(dir.join(&relative))?;
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        tar.append_data(&mut header, Path::new(top).join(&relative), &data[..])?;
    }
    let mut gz = tar.into_inner()?;
    gz.flush()?;
    gz.finish()
}

fn collect_files(
    root: &Path,
    relative: &Path,
    out: &mut Vec<std::path::PathBuf>,
) -> std::io::Result<()> {
    for entry in std::fs::read_dir(root.join(relative))? {
        let entry = entry?;
        let path = relative.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            collect_files(root, &path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn chart_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, content) in files {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, content).unwrap();
        }
        dir
    }

    #[test]
    fn a_chart_becomes_helms_oci_artifact_reproducibly() {
        let dir = chart_dir(&[
            (
                "Chart.yaml",
                "apiVersion: v2\nname: demo\nversion: 0.1.0+build.1\nappVersion: v1\n",
            ),
            ("values.yaml", "replicas: 1\n"),
            ("templates/deploy.yaml", "kind: Deployment\n"),
            (
                "charts/sub/Chart.yaml",
                "apiVersion: v2\nname: sub\nversion: 1.0.0\n",
            ),
        ]);
        let artifact = package_dir(dir.path()).unwrap();
        assert_eq!(
            (artifact.name.as_str(), artifact.tag()),
            ("demo", "0.1.0_build.1".into())
        );

        let config: serde_json::Value = serde_json::from_slice(&artifact.config).unwrap();
        assert_eq!(
            config,
            json!({"apiVersion": "v2", "name": "demo", "version": "0.1.0+build.1", "appVersion": "v1"})
        );
        let manifest: serde_json::Value = serde_json::from_slice(&artifact.manifest).unwrap();
        assert_eq!(manifest["config"]["mediaType"], MEDIA_TYPE_HELM_CONFIG);
        assert_eq!(
            manifest["config"]["digest"],
            sha256_digest(&artifact.config)
        );
        assert_eq!(manifest["layers"][0]["mediaType"], MEDIA_TYPE_HELM_CONTENT);
        assert_eq!(manifest["layers"][0]["size"], artifact.content.len());

        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(&artifact.content[..])
            .read_to_end(&mut tar)
            .unwrap();
        let mut archive = tar::Archive::new(&tar[..]);
        let names: Vec<String> = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "demo/Chart.yaml",
                "demo/charts/sub/Chart.yaml",
                "demo/templates/deploy.yaml",
                "demo/values.yaml"
            ]
        );
        assert_eq!(
            package_dir(dir.path()).unwrap().digest(),
            artifact.digest(),
            "the same chart must give the same digest"
        );
    }

    #[test]
    fn a_chart_without_a_version_is_refused() {
        let dir = chart_dir(&[("Chart.yaml", "apiVersion: v2\nname: demo\n")]);
        let err = package_dir(dir.path()).unwrap_err();
        assert!(err.to_string().contains("has no version"), "{err}");
    }
}
