//! Image references: parsing and normalising image names the way containerd's CRI plugin and
//! docker do, and renaming them with `FROM=TO` retag rules.
//!
//! This module owns the name grammar (registry host, repository path, tag, digest), the
//! normalisation to the canonical form containerd stores in namespace `k8s.io`
//! (`busybox` -> `docker.io/library/busybox:latest`), and what a retag rule means.
//! It does not own where names come from (the bundle's index, `hints.yaml`), how a name is
//! written into containerd (the agent), or any registry access: lade works offline and never
//! resolves a name against a registry.
//!
//! # Normalisation
//!
//! [`Reference::parse`] follows distribution/reference's `ParseNormalizedNamed` followed by
//! `TagNameOnly`, which is what the CRI plugin applies to a pod's `image:` field, so a name
//! loaded under [`Reference`]'s `Display` form is the name the kubelet will ask for:
//!
//! * The first `/`-separated component is the registry host if it contains `.` or `:`, is
//!   exactly `localhost`, or contains an uppercase letter (repository paths must be
//!   lowercase, so current distribution/reference takes such a component to be a host;
//!   `UPPER/case` is therefore `UPPER/case:latest`; containerd releases that predate this rule
//!   reject that name instead). A name without `/` never has a host: `localhost:5000` is the
//!   image `docker.io/library/localhost` with tag `5000`.
//! * Otherwise the host is `docker.io`; `index.docker.io` is rewritten to `docker.io`, and a
//!   one-component path on `docker.io` gets the `library/` prefix.
//! * A name with neither tag nor digest gets tag `latest`; `name:tag@digest` keeps both.
//! * The host keeps its case (as in distribution/reference); the path must be lowercase.
//!
//! Two deliberate departures, both of which only reject names: a host that fails the host
//! grammar is an error (distribution's regexp would silently reread such a name as a host-less
//! path), and the only digest algorithm accepted is `sha256`, the one lade's blob handling uses.
//!
//! What a retag rule means and how it renames an image ([`RetagRule`], [`check_rules`],
//! [`target_names`]) is in `retag.rs`, re-exported here.

use std::fmt;
use std::str::FromStr;

mod retag;

pub use retag::{check_rules, target_names, RetagRule};

/// Registry host of Docker Hub, used for names without a host.
const DEFAULT_DOMAIN: &str = "docker.io";
/// Docker Hub's legacy host name, normalised to [`DEFAULT_DOMAIN`].
const LEGACY_DEFAULT_DOMAIN: &str = "index.docker.io";
/// Namespace of Docker Hub's official images.
const OFFICIAL_REPO_PREFIX: &str = "library/";
/// Tag given to names that have neither tag nor digest.
const DEFAULT_TAG: &str = "latest";
/// Host plus `/` plus path may be at most this long (distribution's `NameTotalLengthMax`).
const NAME_TOTAL_LENGTH_MAX: usize = 255;
/// A tag is at most this long.
const TAG_LENGTH_MAX: usize = 128;
/// The only digest algorithm lade accepts in names.
const DIGEST_ALGORITHM: &str = "sha256";

/// Why an image reference is invalid; its `Display` completes the sentence
/// "invalid image reference "…": ".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidReason {
    #[error("it is empty")]
    Empty,
    #[error("a 64-character hexadecimal string is an image ID, not an image name")]
    ImageId,
    #[error("there is no repository name before the tag or digest")]
    MissingName,
    #[error("the repository path {path:?} must be lowercase")]
    Uppercase { path: String },
    #[error(
        "the repository path {path:?} has an empty component (a leading, trailing or doubled '/')"
    )]
    EmptyComponent { path: String },
    #[error(
        "the path component {component:?} is not allowed: use lowercase letters and digits, \
         separated by '.', '_', '__' or dashes, starting and ending with a letter or digit"
    )]
    BadComponent { component: String },
    #[error(
        "the registry host {domain:?} is not valid: expected a host name, an IPv4 address or a \
         bracketed IPv6 address, optionally followed by ':' and a port number"
    )]
    BadDomain { domain: String },
    #[error(
        "the tag {tag:?} is not valid: a tag has 1 to 128 letters, digits, '_', '.' or '-' and \
         does not start with '.' or '-'"
    )]
    BadTag { tag: String },
    #[error("the digest {digest:?} is not valid: expected \"sha256:\" followed by 64 lowercase hexadecimal digits")]
    BadDigest { digest: String },
    #[error("the digest algorithm {algorithm:?} is not supported; only sha256 digests are")]
    UnsupportedDigest { algorithm: String },
    #[error("the name is {length} characters long (registry host, '/' and path); at most 255 are allowed")]
    TooLong { length: usize },
}

/// Errors about image references and retag rules, each naming the offending input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// An image name does not follow the reference grammar.
    #[error("invalid image reference {input:?}: {reason}")]
    Invalid {
        input: String,
        reason: InvalidReason,
    },
    /// A `FROM=TO` retag rule cannot be parsed.
    #[error("invalid retag rule {input:?}: {problem}")]
    InvalidRule { input: String, problem: String },
    /// A retag rule matched an image but the renamed image would not be a valid name.
    #[error("retag rule {rule:?} cannot rename {image}: the new name {result:?} is not valid: {problem}")]
    Retag {
        rule: String,
        image: String,
        result: String,
        problem: String,
    },
    /// Two retag rules have the same `FROM` but different `TO`, so neither can win.
    #[error(
        "retag rules {first:?} and {second:?} both rename {from} but to different names; keep only one of them"
    )]
    ConflictingRules {
        first: String,
        second: String,
        from: String,
    },
}

/// A normalised image reference: registry host, repository path and tag and/or digest.
///
/// Always valid and canonical: it can only be made by [`Reference::parse`] (or
/// [`target_names`]), and at least one of tag and digest is set. `Display` gives the full form
/// containerd stores, e.g. `docker.io/library/busybox:latest`,
/// `10.16.10.111/mspider/x:v1`, `host:5000/a/b@sha256:…`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    domain: String,
    path: String,
    tag: Option<String>,
    digest: Option<String>,
}

impl Reference {
    /// Parses and normalises an image name as containerd's CRI plugin and docker do (see the
    /// module documentation), adding tag `latest` when there is neither tag nor digest.
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        parse_normalized(s).map_err(|reason| ReferenceError::Invalid {
            input: s.to_owned(),
            reason,
        })
    }

    /// The registry host, with its port if any: `docker.io`, `localhost:5000`.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The repository path below the host: `library/busybox`, `mspider/api`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The tag, if any (`latest` when the input had neither tag nor digest).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The digest, `sha256:` and 64 lowercase hex digits, if any.
    pub fn digest(&self) -> Option<&str> {
        self.digest.as_deref()
    }

    /// Host and path without tag or digest: `docker.io/library/busybox`.
    pub fn repository(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }

    /// The name containerd's CRI plugin looks this reference up by: with a digest the tag is
    /// dropped, since the digest alone names the content (`repo:tag@sha256:…` is found as
    /// `repo@sha256:…`).
    pub fn cri_name(&self) -> String {
        match &self.digest {
            Some(digest) => format!("{}@{digest}", self.repository()),
            None => self.to_string(),
        }
    }

    /// Docker's short form, as `docker images` shows it: `docker.io/` and an official image's
    /// `library/` are dropped, so `docker.io/library/busybox:latest` is `busybox:latest` and
    /// `docker.io/bitnami/redis:7` is `bitnami/redis:7`; other hosts are kept.
    ///
    /// Unlike docker, `docker.io/` stays when the path's first component looks like a host
    /// (`docker.io/ghcr.io/x`): dropped, the short form would name an image on that host.
    /// The short form always parses back to this reference.
    pub fn familiar(&self) -> String {
        let first = self.path.split('/').next().unwrap_or_default();
        let name = if self.domain == DEFAULT_DOMAIN && !looks_like_domain(first) {
            // Only `library/x` is shortened, never `library/x/y`, as docker does.
            match self.path.strip_prefix(OFFICIAL_REPO_PREFIX) {
                Some(rest) if !rest.contains('/') => rest.to_owned(),
                _ => self.path.clone(),
            }
        } else {
            self.repository()
        };
        let mut out = name;
        self.push_tag_and_digest(&mut out);
        out
    }

    fn push_tag_and_digest(&self, out: &mut String) {
        if let Some(tag) = &self.tag {
            out.push(':');
            out.push_str(tag);
        }
        if let Some(digest) = &self.digest {
            out.push('@');
            out.push_str(digest);
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = self.repository();
        self.push_tag_and_digest(&mut out);
        f.write_str(&out)
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

fn parse_normalized(s: &str) -> Result<Reference, InvalidReason> {
    if s.is_empty() {
        return Err(InvalidReason::Empty);
    }
    // Docker refuses a bare image ID as a name, so that `docker run <id>` cannot be confused
    // with a repository whose name happens to be 64 hex digits.
    if lade_oci::is_hex64(s) {
        return Err(InvalidReason::ImageId);
    }

    // None of host, path or tag may contain '@', so the first '@' starts the digest.
    let (name_and_tag, digest) = match s.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (s, None),
    };
    // A ':' before the last '/' belongs to the host (a port or IPv6 address); the first ':'
    // after it starts the tag.
    let last_component = name_and_tag.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name_and_tag[last_component..].find(':') {
        Some(i) => {
            let colon = last_component + i;
            (&name_and_tag[..colon], Some(&name_and_tag[colon + 1..]))
        }
        None => (name_and_tag, None),
    };
    if name.is_empty() {
        return Err(InvalidReason::MissingName);
    }

    let (domain, path) = split_domain(name);
    if path.to_lowercase() != path {
        return Err(InvalidReason::Uppercase { path });
    }
    if !is_valid_domain(domain) {
        return Err(InvalidReason::BadDomain {
            domain: domain.to_owned(),
        });
    }
    validate_path(&path)?;
    let length = domain.len() + 1 + path.len();
    if length > NAME_TOTAL_LENGTH_MAX {
        return Err(InvalidReason::TooLong { length });
    }
    if let Some(tag) = tag {
        validate_tag(tag)?;
    }
    if let Some(digest) = digest {
        validate_digest(digest)?;
    }

    let tag = match (tag, digest) {
        (None, None) => Some(DEFAULT_TAG.to_owned()),
        (tag, _) => tag.map(str::to_owned),
    };
    Ok(Reference {
        domain: domain.to_owned(),
        path,
        tag,
        digest: digest.map(str::to_owned),
    })
}

/// Whether the first component of a multi-component name is a registry host rather than
/// the first path component (distribution's `splitDockerDomain`).
fn looks_like_domain(first: &str) -> bool {
    first == "localhost" || first.contains(['.', ':']) || first.to_lowercase() != first
}

/// Splits a name (without tag or digest) into host and path, applying Docker Hub's defaults.
fn split_domain(name: &str) -> (&str, String) {
    let (domain, path) = match name.split_once('/') {
        // A name without '/' is always on Docker Hub, even `localhost` or `example.com`: this
        // keeps `name:tag` from being read as `host:port`.
        None => (DEFAULT_DOMAIN, name),
        Some((LEGACY_DEFAULT_DOMAIN, rest)) => (DEFAULT_DOMAIN, rest),
        Some((first, rest)) if looks_like_domain(first) => (first, rest),
        Some(_) => (DEFAULT_DOMAIN, name),
    };
    let path = if domain == DEFAULT_DOMAIN && !path.contains('/') {
        format!("{OFFICIAL_REPO_PREFIX}{path}")
    } else {
        path.to_owned()
    };
    (domain, path)
}

fn validate_path(path: &str) -> Result<(), InvalidReason> {
    for component in path.split('/') {
        if component.is_empty() {
            return Err(InvalidReason::EmptyComponent {
                path: path.to_owned(),
            });
        }
        if !is_valid_component(component) {
            return Err(InvalidReason::BadComponent {
                component: component.to_owned(),
            });
        }
    }
    Ok(())
}

/// One path component: `[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*`.
fn is_valid_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    match (bytes.first(), bytes.last()) {
        (Some(&first), Some(&last)) if alnum(first) && alnum(last) => {}
        _ => return false,
    }
    // Between runs of letters and digits, each run of other characters must be one separator.
    component
        .split(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        .filter(|separator| !separator.is_empty())
        .all(|separator| {
            matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-')
        })
}

/// A registry host: a DNS name or IPv4 address, or a bracketed IPv6 address, then an optional
/// `:port`. Case is allowed, as in distribution's grammar.
fn is_valid_domain(domain: &str) -> bool {
    let (host_ok, port) = if let Some(inner) = domain.strip_prefix('[') {
        let Some((address, rest)) = inner.split_once(']') else {
            return false;
        };
        let address_ok =
            !address.is_empty() && address.bytes().all(|b| b.is_ascii_hexdigit() || b == b':');
        let port = match rest {
            "" => None,
            rest => match rest.strip_prefix(':') {
                Some(port) => Some(port),
                None => return false,
            },
        };
        (address_ok, port)
    } else {
        let (host, port) = match domain.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (domain, None),
        };
        (host.split('.').all(is_valid_label), port)
    };
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    host_ok && port_ok
}

/// One DNS label: letters, digits and inner dashes.
fn is_valid_label(label: &str) -> bool {
    let bytes = label.as_bytes();
    match (bytes.first(), bytes.last()) {
        (Some(first), Some(last))
            if first.is_ascii_alphanumeric() && last.is_ascii_alphanumeric() =>
        {
            bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        }
        _ => false,
    }
}

/// A tag: `[\w][\w.-]{0,127}`.
fn validate_tag(tag: &str) -> Result<(), InvalidReason> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let bytes = tag.as_bytes();
    let ok = bytes.len() <= TAG_LENGTH_MAX
        && bytes.first().is_some_and(|&b| word(b))
        && bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(InvalidReason::BadTag {
            tag: tag.to_owned(),
        })
    }
}

fn validate_digest(digest: &str) -> Result<(), InvalidReason> {
    let bad = || InvalidReason::BadDigest {
        digest: digest.to_owned(),
    };
    let (algorithm, encoded) = digest.split_once(':').ok_or_else(bad)?;
    if algorithm == DIGEST_ALGORITHM {
        if lade_oci::is_hex64(encoded) {
            return Ok(());
        }
        return Err(bad());
    }
    // Something shaped like an algorithm (`sha512`, `blake3`) gets a clearer message than
    // plain garbage does.
    let algorithm_like = algorithm
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic())
        && algorithm
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'+' | b'.'));
    if algorithm_like {
        Err(InvalidReason::UnsupportedDigest {
            algorithm: algorithm.to_owned(),
        })
    } else {
        Err(bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "7cc4b5aefd1d0cadf8d97d4350462ba51c694ebca145b08d7d41b41acc8db5aa";

    fn r(s: &str) -> Reference {
        Reference::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    /// (input, domain, path, tag, digest, canonical form, familiar form)
    type ValidCase<'a> = (
        String,
        &'a str,
        &'a str,
        Option<&'a str>,
        Option<&'a str>,
        String,
        String,
    );

    #[test]
    fn parses_and_normalises_valid_names() {
        let digest = format!("sha256:{HEX}");
        let cases: Vec<ValidCase> = vec![
            (
                "busybox".into(),
                "docker.io",
                "library/busybox",
                Some("latest"),
                None,
                "docker.io/library/busybox:latest".into(),
                "busybox:latest".into(),
            ),
            (
                "busybox:1.36".into(),
                "docker.io",
                "library/busybox",
                Some("1.36"),
                None,
                "docker.io/library/busybox:1.36".into(),
                "busybox:1.36".into(),
            ),
            (
                "library/busybox".into(),
                "docker.io",
                "library/busybox",
                Some("latest"),
                None,
                "docker.io/library/busybox:latest".into(),
                "busybox:latest".into(),
            ),
            (
                "docker.io/busybox".into(),
                "docker.io",
                "library/busybox",
                Some("latest"),
                None,
                "docker.io/library/busybox:latest".into(),
                "busybox:latest".into(),
            ),
            (
                "docker.io/library/busybox".into(),
                "docker.io",
                "library/busybox",
                Some("latest"),
                None,
                "docker.io/library/busybox:latest".into(),
                "busybox:latest".into(),
            ),
            (
                "index.docker.io/library/busybox:1".into(),
                "docker.io",
                "library/busybox",
                Some("1"),
                None,
                "docker.io/library/busybox:1".into(),
                "busybox:1".into(),
            ),
            (
                "index.docker.io/busybox".into(),
                "docker.io",
                "library/busybox",
                Some("latest"),
                None,
                "docker.io/library/busybox:latest".into(),
                "busybox:latest".into(),
            ),
            (
                "bitnami/redis:7.2".into(),
                "docker.io",
                "bitnami/redis",
                Some("7.2"),
                None,
                "docker.io/bitnami/redis:7.2".into(),
                "bitnami/redis:7.2".into(),
            ),
            (
                "docker.io/library/a/b".into(),
                "docker.io",
                "library/a/b",
                Some("latest"),
                None,
                "docker.io/library/a/b:latest".into(),
                "library/a/b:latest".into(),
            ),
            (
                "localhost/foo".into(),
                "localhost",
                "foo",
                Some("latest"),
                None,
                "localhost/foo:latest".into(),
                "localhost/foo:latest".into(),
            ),
            // Without '/', `localhost` is an image name and `:5000` its tag.
            (
                "localhost".into(),
                "docker.io",
                "library/localhost",
                Some("latest"),
                None,
                "docker.io/library/localhost:latest".into(),
                "localhost:latest".into(),
            ),
            (
                "localhost:5000".into(),
                "docker.io",
                "library/localhost",
                Some("5000"),
                None,
                "docker.io/library/localhost:5000".into(),
                "localhost:5000".into(),
            ),
            (
                "localhost:5000/foo:1".into(),
                "localhost:5000",
                "foo",
                Some("1"),
                None,
                "localhost:5000/foo:1".into(),
                "localhost:5000/foo:1".into(),
            ),
            (
                "10.16.10.111/mspider/api:v0.20.1".into(),
                "10.16.10.111",
                "mspider/api",
                Some("v0.20.1"),
                None,
                "10.16.10.111/mspider/api:v0.20.1".into(),
                "10.16.10.111/mspider/api:v0.20.1".into(),
            ),
            (
                "release.daocloud.io/mspider/a/b/c:v1".into(),
                "release.daocloud.io",
                "mspider/a/b/c",
                Some("v1"),
                None,
                "release.daocloud.io/mspider/a/b/c:v1".into(),
                "release.daocloud.io/mspider/a/b/c:v1".into(),
            ),
            (
                format!("ghcr.io/a/b@{digest}"),
                "ghcr.io",
                "a/b",
                None,
                Some(digest.as_str()),
                format!("ghcr.io/a/b@{digest}"),
                format!("ghcr.io/a/b@{digest}"),
            ),
            (
                format!("a/b:tag@{digest}"),
                "docker.io",
                "a/b",
                Some("tag"),
                Some(digest.as_str()),
                format!("docker.io/a/b:tag@{digest}"),
                format!("a/b:tag@{digest}"),
            ),
            (
                format!("busybox@{digest}"),
                "docker.io",
                "library/busybox",
                None,
                Some(digest.as_str()),
                format!("docker.io/library/busybox@{digest}"),
                format!("busybox@{digest}"),
            ),
            (
                format!("host:5000/a/b@{digest}"),
                "host:5000",
                "a/b",
                None,
                Some(digest.as_str()),
                format!("host:5000/a/b@{digest}"),
                format!("host:5000/a/b@{digest}"),
            ),
            // An uppercase first component is a host (distribution/reference); its case is kept.
            (
                "UPPER/case".into(),
                "UPPER",
                "case",
                Some("latest"),
                None,
                "UPPER/case:latest".into(),
                "UPPER/case:latest".into(),
            ),
            (
                "Registry.Example.com/foo".into(),
                "Registry.Example.com",
                "foo",
                Some("latest"),
                None,
                "Registry.Example.com/foo:latest".into(),
                "Registry.Example.com/foo:latest".into(),
            ),
            (
                "[::1]:5000/foo:v".into(),
                "[::1]:5000",
                "foo",
                Some("v"),
                None,
                "[::1]:5000/foo:v".into(),
                "[::1]:5000/foo:v".into(),
            ),
            (
                "[fe80::1]/foo".into(),
                "[fe80::1]",
                "foo",
                Some("latest"),
                None,
                "[fe80::1]/foo:latest".into(),
                "[fe80::1]/foo:latest".into(),
            ),
            (
                "my-registry:443/a__b/c-d--e/f.g_h:T_1.x-Y".into(),
                "my-registry:443",
                "a__b/c-d--e/f.g_h",
                Some("T_1.x-Y"),
                None,
                "my-registry:443/a__b/c-d--e/f.g_h:T_1.x-Y".into(),
                "my-registry:443/a__b/c-d--e/f.g_h:T_1.x-Y".into(),
            ),
            (
                "a/b:_".into(),
                "docker.io",
                "a/b",
                Some("_"),
                None,
                "docker.io/a/b:_".into(),
                "a/b:_".into(),
            ),
            // Found by fuzzing: a Docker Hub path whose first component looks like a host
            // keeps `docker.io/`, or its short form would name an image on that host.
            (
                "index.docker.io/ghcr.io/a/b:1.36".into(),
                "docker.io",
                "ghcr.io/a/b",
                Some("1.36"),
                None,
                "docker.io/ghcr.io/a/b:1.36".into(),
                "docker.io/ghcr.io/a/b:1.36".into(),
            ),
        ];
        for (input, domain, path, tag, dg, canonical, familiar) in &cases {
            let parsed = r(input);
            assert_eq!(parsed.domain(), *domain, "domain of {input}");
            assert_eq!(parsed.path(), *path, "path of {input}");
            assert_eq!(parsed.tag(), *tag, "tag of {input}");
            assert_eq!(parsed.digest(), *dg, "digest of {input}");
            assert_eq!(parsed.to_string(), *canonical, "canonical form of {input}");
            assert_eq!(parsed.familiar(), *familiar, "familiar form of {input}");
            assert_eq!(parsed.repository(), format!("{domain}/{path}"));
            // The canonical and the short form both parse back to the same reference.
            assert_eq!(r(canonical), parsed, "re-parsing {canonical}");
            assert_eq!(r(familiar), parsed, "re-parsing {familiar}");
        }
    }

    #[test]
    fn length_limits() {
        let tag = "t".repeat(128);
        assert_eq!(r(&format!("a/b:{tag}")).tag(), Some(tag.as_str()));
        // "docker.io/" is 10 characters, so a 245-character path is the longest allowed.
        let path = format!("a/{}", "b".repeat(243));
        assert_eq!(r(&path).path(), path);
        let too_long = format!("a/{}", "b".repeat(244));
        let err = Reference::parse(&too_long).unwrap_err();
        assert!(err.to_string().contains("256 characters long"), "{err}");
    }

    #[test]
    fn rejects_invalid_names_naming_input_and_problem() {
        let long_tag = format!("a/b:{}", "t".repeat(129));
        let cases: Vec<(String, &str)> = vec![
            ("".into(), "it is empty"),
            ("library/BusyBox".into(), "must be lowercase"),
            ("Busybox".into(), "must be lowercase"),
            (
                "release.daocloud.io/Mspider/api".into(),
                "must be lowercase",
            ),
            ("a//b".into(), "empty component"),
            ("/foo".into(), "empty component"),
            ("foo/".into(), "empty component"),
            (":tag".into(), "no repository name"),
            ("@sha256:abc".into(), "no repository name"),
            ("a:b:c".into(), "the tag \"b:c\" is not valid"),
            ("foo/bar:".into(), "the tag \"\" is not valid"),
            ("foo:.bar".into(), "the tag \".bar\" is not valid"),
            ("foo:-bar".into(), "the tag \"-bar\" is not valid"),
            (long_tag, "is not valid: a tag has 1 to 128"),
            (
                "busybox@sha256:abc".into(),
                "the digest \"sha256:abc\" is not valid",
            ),
            (
                format!("busybox@sha256:{}", HEX.to_uppercase()),
                "is not valid: expected \"sha256:\"",
            ),
            ("busybox@".into(), "the digest \"\" is not valid"),
            (
                format!("busybox@{HEX}"),
                "is not valid: expected \"sha256:\"",
            ),
            (format!("a@b@sha256:{HEX}"), "the digest"),
            (
                format!("busybox@sha512:{HEX}{HEX}"),
                "algorithm \"sha512\" is not supported",
            ),
            ("foo/-bar".into(), "path component \"-bar\""),
            ("foo/bar_".into(), "path component \"bar_\""),
            ("foo/a___b".into(), "path component \"a___b\""),
            ("foo/a._b".into(), "path component \"a._b\""),
            ("foo bar".into(), "path component \"foo bar\""),
            ("foo:bar/baz".into(), "registry host \"foo:bar\""),
            ("-bad.com/x".into(), "registry host \"-bad.com\""),
            ("bad_host.com/x".into(), "registry host \"bad_host.com\""),
            ("host.:5000/x".into(), "registry host \"host.:5000\""),
            ("host:/x".into(), "registry host \"host:\""),
            ("[::1/x".into(), "registry host \"[::1\""),
            ("[::1]x/y".into(), "registry host \"[::1]x\""),
            (HEX.into(), "image ID"),
        ];
        for (input, expected) in &cases {
            let err = Reference::parse(input).expect_err(input);
            let text = err.to_string();
            assert!(
                text.contains(&format!("{input:?}")),
                "{text:?} should name {input:?}"
            );
            assert!(text.contains(expected), "{text:?} should say {expected:?}");
            assert!(
                matches!(&err, ReferenceError::Invalid { input: i, .. } if i == input),
                "{err:?}"
            );
        }
    }

    #[test]
    fn error_reads_as_a_sentence() {
        let err = Reference::parse("library/BusyBox:1").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid image reference \"library/BusyBox:1\": the repository path \"library/BusyBox\" must be lowercase"
        );
    }
}
