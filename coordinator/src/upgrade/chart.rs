//! The chart of an upgrade: getting it onto disk, where helm reads it, and reading the default
//! values helm starts from.
//!
//! From the bundle, the chart's files are copied out of `original-chart/` into a temporary
//! directory (the only thing lade ever extracts; images never are). From a repository
//! (`REPO/CHART`), the repository is added only when helm does not know it, its index is
//! updated only when the version asked for is not in it (or, with no version asked for, to
//! learn the newest), and the chart is pulled into the temporary directory.
//!
//! Defaults are the chart's `values.yaml` with the defaults of every subchart (a directory or
//! a `.tgz` under `charts/`, recursively) beneath its name, or beneath its alias from
//! `Chart.yaml`'s dependencies; the parent's values win, as in helm. Templates are never read:
//! lade does not render the chart. Not modelled: subcharts disabled by a `condition` or `tags`
//! (their defaults are still there) and helm copying the parent's `global` into each subchart.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde_yaml::{Mapping, Value};

use super::{values, ChartSource, UpgradeError, UpgradeOptions};
use crate::bundle::Bundle;

/// Largest total size of the files of an unpacked `.tgz` chart read, as helm's own limit.
const MAX_CHART_BYTES: u64 = 100 << 20;

/// The chart an upgrade installs, as far as lade reads it.
#[derive(Clone, Debug)]
pub struct Chart {
    pub name: String,
    pub version: String,
    /// Default values, subcharts' included.
    pub defaults: Value,
    /// The CHART argument helm is given: a chart directory or `.tgz`, or `REPO/CHART`.
    pub helm_chart: String,
    /// The `--version` helm is given (repository charts only).
    pub pinned_version: Option<String>,
}

/// Relative path → content of the files of a chart that matter here.
type Files = BTreeMap<String, Vec<u8>>;

/// Gets the chart `opts` asks for into `workdir` and reads it.
pub async fn fetch(
    bundle: &Bundle,
    opts: &UpgradeOptions,
    workdir: &Path,
    out: &mut (dyn Write + Send),
) -> Result<Chart, UpgradeError> {
    match &opts.chart {
        ChartSource::Bundle => {
            let dest = workdir.join("original-chart");
            std::fs::create_dir(&dest).map_err(UpgradeError::io(&dest, "creating"))?;
            bundle.extract_chart(&dest)?;
            let chart = Chart::load(&locate(&dest)?)?;
            if let Some(requested) = &opts.version {
                if *requested != chart.version {
                    return Err(UpgradeError::VersionMismatch {
                        requested: requested.clone(),
                        chart: chart.name,
                        found: chart.version,
                    });
                }
            }
            Ok(chart)
        }
        ChartSource::Repo { repo, chart } => {
            let full = format!("{repo}/{chart}");
            let version = repo_version(opts, repo, &full, out).await?;
            opts.helm.pull(&full, &version, workdir, out).await?;
            let mut loaded = Chart::load(&locate(workdir)?)?;
            loaded.helm_chart = full;
            loaded.pinned_version = Some(version);
            Ok(loaded)
        }
    }
}

/// Makes sure helm knows `repo` and finds the version to install: the one asked for, or the
/// newest that is not a pre-release.
async fn repo_version(
    opts: &UpgradeOptions,
    repo: &str,
    chart: &str,
    out: &mut (dyn Write + Send),
) -> Result<String, UpgradeError> {
    let helm = &opts.helm;
    // A repository just added has a fresh index; an older one may lack what is asked for.
    let mut fresh = false;
    if !helm.repositories(out).await?.iter().any(|r| r == repo) {
        let url = opts
            .repo_url
            .as_deref()
            .ok_or_else(|| UpgradeError::RepoUrlRequired {
                repo: repo.to_string(),
            })?;
        helm.add_repository(repo, url, out).await?;
        fresh = true;
    }
    let pick = |versions: &[String]| match &opts.version {
        Some(wanted) => versions.iter().find(|v| *v == wanted).cloned(),
        None => versions.iter().find(|v| !v.contains('-')).cloned(),
    };
    let mut versions = Vec::new();
    if fresh || opts.version.is_some() {
        versions = helm.chart_versions(chart, out).await?;
        if let Some(version) = pick(&versions) {
            return Ok(version);
        }
    }
    if !fresh {
        helm.update_repository(repo, out).await?;
        versions = helm.chart_versions(chart, out).await?;
    }
    pick(&versions).ok_or_else(|| UpgradeError::VersionNotFound {
        repo: repo.to_string(),
        chart: chart.to_string(),
        wanted: match &opts.version {
            Some(v) => format!("version {v}"),
            None => "release (only pre-releases or nothing)".into(),
        },
        available: if versions.is_empty() {
            "nothing".into()
        } else {
            versions.join(", ")
        },
    })
}

/// Where the chart is in `dir`: `dir` itself when it holds `Chart.yaml`, else its only
/// subdirectory holding one, else its only `.tgz`.
pub fn locate(dir: &Path) -> Result<PathBuf, UpgradeError> {
    if dir.join("Chart.yaml").is_file() {
        return Ok(dir.to_path_buf());
    }
    let entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(UpgradeError::io(dir, "looking for the chart"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    let charts: Vec<&PathBuf> = entries
        .iter()
        .filter(|p| p.join("Chart.yaml").is_file())
        .collect();
    let archives: Vec<&PathBuf> = entries
        .iter()
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "tgz"))
        .collect();
    match (charts.as_slice(), archives.as_slice()) {
        ([chart], _) => Ok((*chart).clone()),
        ([], [archive]) => Ok((*archive).clone()),
        _ => {
            let mut names: Vec<String> = entries
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect();
            names.sort();
            Err(UpgradeError::Chart {
                location: dir.display().to_string(),
                problem: format!(
                    "expected Chart.yaml, one chart directory or one .tgz, found: {}",
                    if names.is_empty() {
                        "nothing".into()
                    } else {
                        names.join(", ")
                    }
                ),
            })
        }
    }
}

impl Chart {
    /// Reads the chart at `path`: a chart directory or a packaged `.tgz`.
    pub fn load(path: &Path) -> Result<Chart, UpgradeError> {
        let location = path.display().to_string();
        let files = if path.is_dir() {
            let mut files = Files::new();
            read_dir(path, "", &mut files)?;
            files
        } else {
            let bytes = std::fs::read(path).map_err(UpgradeError::io(path, "reading the chart"))?;
            read_tgz(&bytes, &location)?
        };
        let (name, version, defaults) = from_files(&files, &location)?;
        Ok(Chart {
            name,
            version,
            defaults,
            helm_chart: location,
            pinned_version: None,
        })
    }
}

/// Whether a file (path relative to a chart) matters for the defaults.
fn wanted(rel: &str) -> bool {
    rel == "Chart.yaml" || rel == "values.yaml" || rel.starts_with("charts/")
}

fn read_dir(root: &Path, rel: &str, files: &mut Files) -> Result<(), UpgradeError> {
    let dir = root.join(rel);
    for entry in std::fs::read_dir(&dir).map_err(UpgradeError::io(&dir, "reading the chart"))? {
        let entry = entry.map_err(UpgradeError::io(&dir, "reading the chart"))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let child = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let path = entry.path();
        if path.is_dir() && (child == "charts" || child.starts_with("charts/")) {
            read_dir(root, &child, files)?;
        } else if path.is_file() && wanted(&child) {
            let bytes = std::fs::read(&path).map_err(UpgradeError::io(&path, "reading"))?;
            files.insert(child, bytes);
        }
    }
    Ok(())
}

/// The files of a packaged chart, without the top folder every entry sits in.
fn read_tgz(bytes: &[u8], location: &str) -> Result<Files, UpgradeError> {
    let bad = |problem: String| UpgradeError::Chart {
        location: location.to_string(),
        problem,
    };
    let gz = flate2::read::GzDecoder::new(bytes).take(MAX_CHART_BYTES);
    let mut archive = tar::Archive::new(gz);
    let mut files = Files::new();
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("not a .tgz chart: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("not a .tgz chart: {e}")))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry
            .path()
            .map_err(|e| bad(format!("unreadable member name: {e}")))?
            .to_string_lossy()
            .into_owned();
        let Some((_, rel)) = path.split_once('/') else {
            continue;
        };
        if wanted(rel) {
            let mut data = Vec::new();
            entry
                .read_to_end(&mut data)
                .map_err(|e| bad(format!("reading {path}: {e}")))?;
            files.insert(rel.to_string(), data);
        }
    }
    Ok(files)
}

fn yaml(files: &Files, name: &str, location: &str) -> Result<Option<Value>, UpgradeError> {
    let Some(bytes) = files.get(name) else {
        return Ok(None);
    };
    serde_yaml::from_slice(bytes)
        .map(Some)
        .map_err(|e| UpgradeError::Chart {
            location: location.to_string(),
            problem: format!("{name} is not valid YAML: {e}"),
        })
}

/// Name, version and defaults of the chart made of `files`.
fn from_files(files: &Files, location: &str) -> Result<(String, String, Value), UpgradeError> {
    let bad = |problem: &str| UpgradeError::Chart {
        location: location.to_string(),
        problem: problem.to_string(),
    };
    let meta = yaml(files, "Chart.yaml", location)?.ok_or_else(|| bad("no Chart.yaml"))?;
    let text = |key: &str| match meta.get(key) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let name = text("name").ok_or_else(|| bad("Chart.yaml has no name"))?;
    let version = text("version").ok_or_else(|| bad("Chart.yaml has no version"))?;
    let mut defaults = match yaml(files, "values.yaml", location)? {
        None | Some(Value::Null) => Value::Mapping(Mapping::new()),
        Some(v @ Value::Mapping(_)) => v,
        Some(_) => return Err(bad("values.yaml is not a mapping")),
    };

    // Subcharts: `charts/<dir>/…` directories and `charts/<file>.tgz` archives.
    let mut dirs: BTreeMap<&str, Files> = BTreeMap::new();
    let mut archives = Vec::new();
    for (path, bytes) in files {
        let Some(rest) = path.strip_prefix("charts/") else {
            continue;
        };
        match rest.split_once('/') {
            Some((dir, inner)) => {
                dirs.entry(dir)
                    .or_default()
                    .insert(inner.to_string(), bytes.clone());
            }
            None if rest.ends_with(".tgz") => archives.push((rest, bytes)),
            None => {}
        }
    }
    let mut subcharts = Vec::new();
    for (dir, sub) in &dirs {
        subcharts.push(from_files(sub, &format!("{location}/charts/{dir}"))?);
    }
    for (file, bytes) in archives {
        let sub_location = format!("{location}/charts/{file}");
        subcharts.push(from_files(&read_tgz(bytes, &sub_location)?, &sub_location)?);
    }
    let dependencies = meta
        .get("dependencies")
        .and_then(Value::as_sequence)
        .cloned()
        .unwrap_or_default();
    for (sub_name, _, sub_defaults) in subcharts {
        for key in value_keys(&dependencies, &sub_name) {
            let parent = values::get_path(&defaults, &[key.as_str()])
                .cloned()
                .unwrap_or_else(|| Value::Mapping(Mapping::new()));
            let merged = values::coalesce(&sub_defaults, &parent);
            values::set_path(&mut defaults, &[key], merged);
        }
    }
    Ok((name, version, defaults))
}

/// The keys a subchart's values sit under in its parent: the aliases the parent's
/// dependencies give it, plus its own name if a dependency names it without an alias or none
/// names it at all.
fn value_keys(dependencies: &[Value], name: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut plain = true;
    for dep in dependencies {
        if dep.get("name").and_then(Value::as_str) != Some(name) {
            continue;
        }
        match dep.get("alias").and_then(Value::as_str) {
            Some(alias) => {
                plain = false;
                keys.push(alias.to_string());
            }
            None => {
                keys.push(name.to_string());
            }
        }
    }
    if plain && !keys.iter().any(|k| k == name) {
        keys.push(name.to_string());
    }
    keys.dedup();
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(entries: &[(&str, &str)]) -> Files {
        entries
            .iter()
            .map(|(p, c)| (p.to_string(), c.as_bytes().to_vec()))
            .collect()
    }

    fn tgz(top: &str, entries: &[(&str, &str)]) -> Vec<u8> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut tar = tar::Builder::new(gz);
        for (path, content) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_size(content.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            tar.append_data(&mut header, format!("{top}/{path}"), content.as_bytes())
                .unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap()
    }

    fn yaml_value(text: &str) -> Value {
        serde_yaml::from_str(text).unwrap()
    }

    #[test]
    fn subchart_defaults_sit_under_their_name_and_the_parent_wins() {
        let mut chart = files(&[
            ("Chart.yaml", "name: demo\nversion: 0.1.0\n"),
            ("values.yaml", "sidecar-agent:\n  image: {tag: v9}\n"),
            (
                "charts/sidecar-agent/Chart.yaml",
                "name: sidecar-agent\nversion: 1.0.0\n",
            ),
            (
                "charts/sidecar-agent/values.yaml",
                "image: {registry: r.io, repository: demo/sidecar, tag: v1}\n",
            ),
            ("charts/sidecar-agent/templates/x.yaml", "not: read"),
        ]);
        let packed = tgz(
            "redis",
            &[
                ("Chart.yaml", "name: redis\nversion: 7.0.0\n"),
                ("values.yaml", "image: {tag: '7.2'}\n"),
            ],
        );
        chart.insert("charts/redis-7.0.0.tgz".into(), packed);
        let (name, version, defaults) = from_files(&chart, "demo").unwrap();
        assert_eq!((name.as_str(), version.as_str()), ("demo", "0.1.0"));
        assert_eq!(
            defaults,
            yaml_value(
                "sidecar-agent:\n  image: {tag: v9, registry: r.io, repository: demo/sidecar}\n\
                 redis:\n  image: {tag: '7.2'}\n"
            )
        );
    }

    #[test]
    fn aliased_subcharts_sit_under_each_alias() {
        let chart = files(&[
            (
                "Chart.yaml",
                "name: demo\nversion: 1\ndependencies:\n- {name: proxy, alias: proxy-a}\n- {name: proxy, alias: proxy-b}\n",
            ),
            ("charts/proxy/Chart.yaml", "name: proxy\nversion: 1.0.0\n"),
            ("charts/proxy/values.yaml", "tag: v1\n"),
        ]);
        let (_, version, defaults) = from_files(&chart, "demo").unwrap();
        assert_eq!(version, "1");
        assert_eq!(
            defaults,
            yaml_value("proxy-a: {tag: v1}\nproxy-b: {tag: v1}\n")
        );
        assert_eq!(value_keys(&[], "x"), ["x"]);
    }

    #[test]
    fn a_packaged_chart_loads_like_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("demo-0.1.0.tgz");
        let bytes = tgz(
            "demo",
            &[
                ("Chart.yaml", "name: demo\nversion: 0.1.0\n"),
                ("values.yaml", "a: 1\n"),
            ],
        );
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(locate(dir.path()).unwrap(), path);
        let chart = Chart::load(&path).unwrap();
        assert_eq!(chart.name, "demo");
        assert_eq!(chart.defaults, yaml_value("a: 1\n"));
    }

    #[test]
    fn locate_finds_the_chart_or_says_what_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let err = locate(dir.path()).unwrap_err().to_string();
        assert!(err.contains("found: nothing"), "{err}");
        std::fs::create_dir(dir.path().join("demo")).unwrap();
        std::fs::write(
            dir.path().join("demo/Chart.yaml"),
            "name: demo\nversion: 1\n",
        )
        .unwrap();
        assert_eq!(locate(dir.path()).unwrap(), dir.path().join("demo"));
        std::fs::write(dir.path().join("Chart.yaml"), "name: top\nversion: 1\n").unwrap();
        assert_eq!(locate(dir.path()).unwrap(), dir.path());
    }

    #[test]
    fn broken_charts_are_named() {
        for (entries, expected) in [
            (vec![("values.yaml", "a: 1\n")], "no Chart.yaml"),
            (vec![("Chart.yaml", "version: 1\n")], "has no name"),
            (
                vec![
                    ("Chart.yaml", "name: x\nversion: 1\n"),
                    ("values.yaml", "- a\n"),
                ],
                "values.yaml is not a mapping",
            ),
            (
                vec![("Chart.yaml", "name: [\n")],
                "Chart.yaml is not valid YAML",
            ),
        ] {
            let err = from_files(&files(&entries), "c").unwrap_err().to_string();
            assert!(
                err.starts_with("chart c: ") && err.contains(expected),
                "{err}"
            );
        }
    }
}
