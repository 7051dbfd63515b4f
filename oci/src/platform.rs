//! Platforms (`os/architecture[/variant]`) of multi-platform images, and which one a node
//! runs.
//!
//! Owns parsing and normalising platform strings and the platform fields of index entries
//! and configs the way containerd does (`aarch64` is `arm64`, `arm64` means `arm64/v8`, `arm`
//! means `arm/v7`) and ranking the platforms an image carries for a node: the same one first,
//! then the older variants of the same architecture the node can also run (an `arm/v7` node
//! runs `arm/v6`). Which platform each node gets is the coordinator's decision; the agent
//! only finds, in an index, the entry of its own platform.

use std::fmt;
use std::str::FromStr;

/// An OCI platform, normalised. Read from JSON (an index entry's `platform`, an image
/// config) as its `os`, `architecture` and `variant` fields, normalised as [`Platform::new`]
/// does.
#[derive(
    Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(from = "PlatformFields")]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    /// `None` where the architecture has no variants in use (amd64's microarchitecture
    /// levels are kept when given).
    pub variant: Option<String>,
}

impl Platform {
    /// Builds a platform from the fields of an OCI descriptor or config, normalised.
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Platform {
        let os = os.to_ascii_lowercase();
        let (architecture, implied) = match architecture.to_ascii_lowercase().as_str() {
            "x86_64" | "x86-64" => ("amd64".to_string(), None),
            "aarch64" => ("arm64".to_string(), None),
            "armhf" => ("arm".to_string(), Some("v7")),
            "armel" => ("arm".to_string(), Some("v6")),
            "i386" => ("386".to_string(), None),
            other => (other.to_string(), None),
        };
        let variant = variant
            .filter(|v| !v.is_empty())
            .map(str::to_ascii_lowercase)
            .or(implied.map(str::to_string));
        let variant = match (architecture.as_str(), variant.as_deref()) {
            ("arm64", None | Some("8") | Some("v8")) => Some("v8".to_string()),
            ("arm", None | Some("7")) => Some("v7".to_string()),
            ("arm", Some(v)) if !v.starts_with('v') => Some(format!("v{v}")),
            _ => variant,
        };
        Platform {
            os,
            architecture,
            variant,
        }
    }

    /// The platform this program was built for (the agent's node, by default).
    pub fn local() -> Platform {
        Platform::new("linux", std::env::consts::ARCH, None)
    }

    /// How well an image of platform `self` suits a node of platform `node`: `Some(0)` for the
    /// same platform, higher for older variants the node also runs, `None` if it cannot run.
    pub fn rank_for(&self, node: &Platform) -> Option<u32> {
        if self.os != node.os || self.architecture != node.architecture {
            return None;
        }
        if self.variant == node.variant {
            return Some(0);
        }
        let level = |v: &Option<String>| {
            v.as_deref()
                .and_then(|v| v.strip_prefix('v'))
                .and_then(|n| n.parse::<u32>().ok())
        };
        match self.architecture.as_str() {
            // An arm/v7 node runs v6 and v5 images, an amd64/v3 node runs v2 and v1 images.
            "arm" | "amd64" => {
                let node_level = level(&node.variant).unwrap_or(if self.architecture == "amd64" {
                    1
                } else {
                    7
                });
                let image_level = level(&self.variant).unwrap_or(1);
                (image_level <= node_level).then(|| 1 + node_level - image_level)
            }
            _ => None,
        }
    }
}

/// The `os`, `architecture` and `variant` fields of an index entry's `platform` or of an
/// image config, as written.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub(crate) struct PlatformFields {
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub variant: Option<String>,
}

impl From<PlatformFields> for Platform {
    fn from(f: PlatformFields) -> Platform {
        Platform::new(&f.os, &f.architecture, f.variant.as_deref())
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl FromStr for Platform {
    type Err = String;

    /// `os/arch[/variant]`, or a bare `arch` meaning linux.
    fn from_str(s: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = s.split('/').collect();
        let bad = || format!("{s:?} is not a platform (os/arch[/variant], e.g. linux/arm64)");
        if parts.iter().any(|p| p.is_empty()) {
            return Err(bad());
        }
        match parts.as_slice() {
            [arch] => Ok(Platform::new("linux", arch, None)),
            [os, arch] => Ok(Platform::new(os, arch, None)),
            [os, arch, variant] => Ok(Platform::new(os, arch, Some(variant))),
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Platform {
        s.parse().unwrap()
    }

    #[test]
    fn platforms_are_normalised_as_containerd_does() {
        assert_eq!(p("linux/aarch64").to_string(), "linux/arm64/v8");
        assert_eq!(p("linux/arm64").to_string(), "linux/arm64/v8");
        assert_eq!(p("linux/arm").to_string(), "linux/arm/v7");
        assert_eq!(p("linux/arm/6").to_string(), "linux/arm/v6");
        assert_eq!(p("linux/x86_64").to_string(), "linux/amd64");
        assert_eq!(p("amd64").to_string(), "linux/amd64");
        assert_eq!(p("Linux/AMD64").to_string(), "linux/amd64");
        for bad in ["", "linux/", "/amd64", "linux/arm/v7/x"] {
            assert!(bad.parse::<Platform>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_node_runs_its_own_platform_first_then_older_variants() {
        assert_eq!(p("linux/amd64").rank_for(&p("linux/amd64")), Some(0));
        assert_eq!(p("linux/arm64").rank_for(&p("linux/arm64/v8")), Some(0));
        assert_eq!(p("linux/arm64").rank_for(&p("linux/amd64")), None);
        assert_eq!(p("windows/amd64").rank_for(&p("linux/amd64")), None);
        let v7 = p("linux/arm/v7");
        assert_eq!(p("linux/arm/v7").rank_for(&v7), Some(0));
        assert!(p("linux/arm/v6").rank_for(&v7) > Some(0));
        assert!(p("linux/arm/v5").rank_for(&v7) > p("linux/arm/v6").rank_for(&v7));
        assert_eq!(p("linux/arm/v7").rank_for(&p("linux/arm/v6")), None);
        // amd64 microarchitecture levels: a plain node runs only v1 images.
        assert_eq!(p("linux/amd64/v3").rank_for(&p("linux/amd64")), None);
        assert!(p("linux/amd64").rank_for(&p("linux/amd64/v3")).is_some());
    }

    #[test]
    fn platform_fields_are_read_normalised() {
        let read = |json: &str| serde_json::from_str::<Platform>(json).unwrap().to_string();
        assert_eq!(
            read(r#"{"os":"linux","architecture":"arm64"}"#),
            "linux/arm64/v8"
        );
        assert_eq!(
            read(r#"{"os":"linux","architecture":"amd64","variant":""}"#),
            "linux/amd64"
        );
        assert_eq!(
            read(r#"{"os":"linux","architecture":"arm","variant":"6"}"#),
            "linux/arm/v6"
        );
    }
}
