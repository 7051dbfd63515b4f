//! A bundle's name and version: what `lade load` records on the nodes, and what `lade status`,
//! `prune` and `unload` speak of. Taken from the chart in `original-chart/` (its
//! `Chart.yaml` name and version) when the bundle has one, else from the file name
//! (`mspider_v0.20.1.bundle.tar`: `mspider`, `v0.20.1`).

use serde::Serialize;

/// Longest name or version the agents take in a record.
pub const MAX_ID: usize = 128;

/// Where a bundle's identity was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdentitySource {
    /// `original-chart/Chart.yaml`.
    Chart,
    /// The bundle file's name, `NAME_VERSION.bundle.tar`.
    FileName,
    /// `--bundle-name` / `--bundle-version`.
    Flags,
}

/// A bundle's name and version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Identity {
    pub name: String,
    pub version: String,
    pub from: IdentitySource,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

/// Whether `value` can be a bundle name or version in a record: 1 to [`MAX_ID`] printable
/// ASCII characters without spaces (and without `@`, which separates them on the command
/// line).
pub fn valid_id(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_ID
        && value.chars().all(|c| c.is_ascii_graphic() && c != '@')
}

/// The name and version `Chart.yaml` (its text) gives, if it gives both, valid.
pub fn from_chart_yaml(text: &str) -> Option<(String, String)> {
    let chart: serde_yaml::Value = serde_yaml::from_str(text).ok()?;
    let field = |key: &str| match chart.get(key) {
        Some(serde_yaml::Value::String(s)) if valid_id(s) => Some(s.clone()),
        _ => None,
    };
    Some((field("name")?, field("version")?))
}

/// The name and version a bundle file name gives: `NAME_VERSION` (or `NAME-VERSION`, the
/// version starting with `v` and a digit, or a digit), before `.bundle.tar` or `.tar`.
pub fn from_file_name(file_name: &str) -> Option<(String, String)> {
    let mut stem = file_name;
    for suffix in [".tar", ".bundle"] {
        stem = stem.strip_suffix(suffix).unwrap_or(stem);
    }
    let versioned = |v: &str| {
        let digits = v.strip_prefix('v').unwrap_or(v);
        digits.starts_with(|c: char| c.is_ascii_digit())
    };
    let split = stem
        .rsplit_once('_')
        .filter(|(n, v)| !n.is_empty() && !v.is_empty())
        .or_else(|| {
            // NAME-VERSION: the first dash the version starts after.
            stem.match_indices('-')
                .map(|(i, _)| (&stem[..i], &stem[i + 1..]))
                .find(|(n, v)| !n.is_empty() && versioned(v))
        })?;
    let (name, version) = split;
    (valid_id(name) && valid_id(version)).then(|| (name.to_string(), version.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_give_name_and_version() {
        let got = |f: &str| from_file_name(f);
        let pair = |n: &str, v: &str| Some((n.to_string(), v.to_string()));
        assert_eq!(
            got("mspider_v0.20.1.bundle.tar"),
            pair("mspider", "v0.20.1")
        );
        assert_eq!(got("kpanda_0.3.tar"), pair("kpanda", "0.3"));
        assert_eq!(
            got("ghippo-ui_v1.2.0-rc1.bundle.tar"),
            pair("ghippo-ui", "v1.2.0-rc1")
        );
        assert_eq!(got("my-app-v2.1.tar"), pair("my-app", "v2.1"));
        assert_eq!(got("images.tar"), None);
        assert_eq!(got("demo.bundle.tar"), None);
        assert_eq!(got("a_b c.tar"), None);
    }

    #[test]
    fn a_chart_gives_both_or_nothing() {
        assert_eq!(
            from_chart_yaml("apiVersion: v2\nname: demo\nversion: 0.1.0\n"),
            Some(("demo".into(), "0.1.0".into()))
        );
        assert_eq!(from_chart_yaml("name: demo\n"), None);
        assert_eq!(from_chart_yaml("name: demo\nversion: 1.0\n"), None);
        assert_eq!(from_chart_yaml("{{ not yaml"), None);
    }
}
