//! Retag rules: renaming image references with `FROM=TO` rules over repository prefixes.
//!
//! A [`RetagRule`] `FROM=TO` replaces a repository prefix. `FROM` and `TO` are repository
//! prefixes, written as:
//!
//! * a bare registry host (`release.daocloud.io`, `10.16.10.111:5000`, `localhost`),
//! * a host and a path prefix (`release.daocloud.io/mspider`, `docker.io/library`), or
//! * a path prefix of at least two components without a host (`library/busybox`,
//!   `bitnami/redis`), which means `docker.io/...`.
//!
//! Unlike image names, no `library/` is inserted into a prefix: `docker.io/library` and
//! `docker.io/bitnami` name namespaces, as someone writing a prefix means them. A single
//! component without a host (`busybox`) is rejected as ambiguous, since it could mean the
//! official image `docker.io/library/busybox` or the namespace `docker.io/busybox`. Trailing
//! `/` are ignored. A prefix has no tag or digest.
//!
//! A rule matches an image when its `FROM` host equals the image's host (ignoring ASCII case,
//! as host names do) and its `FROM` path components are the first path components of the
//! image: `release.daocloud.io/mspider` matches `release.daocloud.io/mspider/api` but not
//! `release.daocloud.io/mspider-x/api`. The matched prefix is replaced by `TO`; tag and
//! digest are kept; the result is re-parsed, so it is normalised like any typed name.
//! Of several matching rules the one with the longest `FROM` wins, so the order of the rules
//! on the command line never matters.

use std::fmt;
use std::str::FromStr;

use super::{
    is_valid_domain, looks_like_domain, validate_path, InvalidReason, Reference, ReferenceError,
    DEFAULT_DOMAIN, LEGACY_DEFAULT_DOMAIN,
};

/// A repository prefix of a retag rule: a host and zero or more leading path components.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RepoPrefix {
    domain: String,
    components: Vec<String>,
}

impl RepoPrefix {
    /// Parses one side of a rule (see the module documentation); the error completes
    /// "invalid retag rule "…": ".
    fn parse(side: &'static str, text: &str) -> Result<RepoPrefix, String> {
        let text = text.trim_end_matches('/');
        if text.is_empty() {
            return Err(format!("{side} is empty"));
        }
        if text.contains('@') {
            return Err(format!(
                "{side} {text:?} has a digest; it must be a repository prefix such as release.daocloud.io/mspider"
            ));
        }
        let (domain, path) = match text.split_once('/') {
            None if text == LEGACY_DEFAULT_DOMAIN => (DEFAULT_DOMAIN, ""),
            // A single component is a bare host only if it is unmistakably one.
            None if text == "localhost" || text.contains(['.', ':']) => (text, ""),
            None => {
                return Err(format!(
                    "{side} {text:?} is ambiguous: write the full repository prefix, e.g. \
                     \"docker.io/library/{text}\" for the official image or \"docker.io/{text}\" \
                     for the namespace"
                ))
            }
            Some((LEGACY_DEFAULT_DOMAIN, rest)) => (DEFAULT_DOMAIN, rest),
            Some((first, rest)) if looks_like_domain(first) => (first, rest),
            Some(_) => (DEFAULT_DOMAIN, text),
        };
        if !is_valid_domain(domain) {
            return Err(format!(
                "{side} {text:?}: {}",
                InvalidReason::BadDomain {
                    domain: domain.to_owned()
                }
            ));
        }
        if path.contains(':') {
            return Err(format!(
                "{side} {text:?} has a tag; it must be a repository prefix such as release.daocloud.io/mspider"
            ));
        }
        let components: Vec<String> = if path.is_empty() {
            Vec::new()
        } else {
            let reason = if path.to_lowercase() != path {
                Some(InvalidReason::Uppercase {
                    path: path.to_owned(),
                })
            } else {
                validate_path(path).err()
            };
            if let Some(reason) = reason {
                return Err(format!("{side} {text:?}: {reason}"));
            }
            path.split('/').map(str::to_owned).collect()
        };
        Ok(RepoPrefix {
            domain: domain.to_owned(),
            components,
        })
    }

    /// Whether this prefix covers the image's repository, at a path-component boundary.
    fn matches(&self, reference: &Reference) -> bool {
        let mut image_components = reference.path.split('/');
        self.domain.eq_ignore_ascii_case(&reference.domain)
            && self
                .components
                .iter()
                .all(|prefix| image_components.next() == Some(prefix.as_str()))
    }

    /// Whether two prefixes cover exactly the same repositories.
    fn same_as(&self, other: &RepoPrefix) -> bool {
        self.domain.eq_ignore_ascii_case(&other.domain) && self.components == other.components
    }
}

impl fmt::Display for RepoPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.domain)?;
        for component in &self.components {
            write!(f, "/{component}")?;
        }
        Ok(())
    }
}

/// A `FROM=TO` rule renaming every image whose repository starts with `FROM` (see the module
/// documentation for how prefixes are written and matched).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetagRule {
    /// The rule as the user wrote it, to name it in messages.
    text: String,
    from: RepoPrefix,
    to: RepoPrefix,
}

impl RetagRule {
    /// The normalised `FROM` prefix, e.g. `docker.io/library/busybox` for `library/busybox`.
    pub fn from(&self) -> String {
        self.from.to_string()
    }

    /// The normalised `TO` prefix.
    pub fn to(&self) -> String {
        self.to.to_string()
    }

    /// Renames `image`, which `self.from` matches.
    fn apply(&self, image: &Reference) -> Result<Reference, ReferenceError> {
        let rest = image.path.split('/').skip(self.from.components.len());
        let components: Vec<&str> = self
            .to
            .components
            .iter()
            .map(String::as_str)
            .chain(rest)
            .collect();
        let mut result = format!("{}/{}", self.to.domain, components.join("/"));
        image.push_tag_and_digest(&mut result);
        let problem = if components.is_empty() {
            // Re-parsing `host:tag` would silently yield `docker.io/library/host`.
            "TO is a bare registry host and FROM is the whole repository, so no repository path is left".to_owned()
        } else {
            // Re-parse so the result is normalised exactly like a typed name (for example
            // `docker.io/busybox` becomes `docker.io/library/busybox`).
            match Reference::parse(&result) {
                Ok(renamed) => return Ok(renamed),
                Err(ReferenceError::Invalid { reason, .. }) => reason.to_string(),
                Err(other) => other.to_string(),
            }
        };
        Err(ReferenceError::Retag {
            rule: self.text.clone(),
            image: image.to_string(),
            result,
            problem,
        })
    }
}

impl FromStr for RetagRule {
    type Err = ReferenceError;

    /// Parses `FROM=TO` as written on the command line; surrounding whitespace is ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |problem: String| ReferenceError::InvalidRule {
            input: s.to_owned(),
            problem,
        };
        let text = s.trim();
        let Some((from, to)) = text.split_once('=') else {
            return Err(invalid(
                "expected FROM=TO, e.g. release.daocloud.io/mspider=10.16.10.111/mspider"
                    .to_owned(),
            ));
        };
        if to.contains('=') {
            return Err(invalid(
                "it has more than one '='; expected FROM=TO".to_owned(),
            ));
        }
        Ok(RetagRule {
            text: text.to_owned(),
            from: RepoPrefix::parse("FROM", from.trim()).map_err(invalid)?,
            to: RepoPrefix::parse("TO", to.trim()).map_err(invalid)?,
        })
    }
}

impl fmt::Display for RetagRule {
    /// The rule as the user wrote it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Checks that no two rules have the same `FROM` with different `TO`s; call it once after
/// parsing the command line, so a conflict is reported before any image is touched.
/// ([`target_names`] reports the same conflict, but only for an image the rules match.)
pub fn check_rules(rules: &[RetagRule]) -> Result<(), ReferenceError> {
    for (i, first) in rules.iter().enumerate() {
        for second in &rules[i + 1..] {
            if first.from.same_as(&second.from) && first.to != second.to {
                return Err(conflict(first, second));
            }
        }
    }
    Ok(())
}

fn conflict(first: &RetagRule, second: &RetagRule) -> ReferenceError {
    ReferenceError::ConflictingRules {
        first: first.text.clone(),
        second: second.text.clone(),
        from: first.from.to_string(),
    }
}

/// The names `original` gets on the nodes: with `keep_original`, `original` first and then
/// its renamed form; without, only the renamed form. Duplicates are removed.
///
/// The rule with the longest matching `FROM` renames the image; two matching rules with the
/// same `FROM` and different `TO` are an error. When no rule matches, the image keeps its
/// original name even if `keep_original` is false, because an image must not end up without
/// any name (containerd would garbage-collect it and no pod could use it).
pub fn target_names(
    original: &Reference,
    rules: &[RetagRule],
    keep_original: bool,
) -> Result<Vec<Reference>, ReferenceError> {
    let matching: Vec<&RetagRule> = rules.iter().filter(|r| r.from.matches(original)).collect();
    let longest = matching.iter().map(|r| r.from.components.len()).max();
    let mut winner: Option<&RetagRule> = None;
    for rule in matching {
        if Some(rule.from.components.len()) != longest {
            continue;
        }
        match winner {
            Some(w) if w.to != rule.to => return Err(conflict(w, rule)),
            Some(_) => {}
            None => winner = Some(rule),
        }
    }

    let renamed = winner.map(|rule| rule.apply(original)).transpose()?;
    let mut names = Vec::with_capacity(2);
    if keep_original || renamed.is_none() {
        names.push(original.clone());
    }
    if let Some(renamed) = renamed {
        if !names.contains(&renamed) {
            names.push(renamed);
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "7cc4b5aefd1d0cadf8d97d4350462ba51c694ebca145b08d7d41b41acc8db5aa";

    fn r(s: &str) -> Reference {
        Reference::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn rule(s: &str) -> RetagRule {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn names(image: &str, rules: &[&str], keep: bool) -> Vec<String> {
        let rules: Vec<RetagRule> = rules.iter().map(|s| rule(s)).collect();
        target_names(&r(image), &rules, keep)
            .unwrap_or_else(|e| panic!("{image}: {e}"))
            .iter()
            .map(Reference::to_string)
            .collect()
    }

    #[test]
    fn parses_retag_rules() {
        // (input, from, to)
        let cases = [
            (
                "release.daocloud.io/mspider=10.16.10.111/mspider",
                "release.daocloud.io/mspider",
                "10.16.10.111/mspider",
            ),
            (
                "release.daocloud.io/mspider/=10.16.10.111/mspider//",
                "release.daocloud.io/mspider",
                "10.16.10.111/mspider",
            ),
            (
                " release.daocloud.io = 10.16.10.111:5000 ",
                "release.daocloud.io",
                "10.16.10.111:5000",
            ),
            (
                "library/busybox=reg.io/x",
                "docker.io/library/busybox",
                "reg.io/x",
            ),
            (
                "docker.io/library=reg.io/lib",
                "docker.io/library",
                "reg.io/lib",
            ),
            (
                "docker.io/bitnami=reg.io/bitnami",
                "docker.io/bitnami",
                "reg.io/bitnami",
            ),
            (
                "index.docker.io/library=reg.io/lib",
                "docker.io/library",
                "reg.io/lib",
            ),
            ("index.docker.io=reg.io/hub", "docker.io", "reg.io/hub"),
            ("docker.io=localhost", "docker.io", "localhost"),
            (
                "localhost:5000/a=bitnami/x",
                "localhost:5000/a",
                "docker.io/bitnami/x",
            ),
            (
                "[::1]:5000=Reg.Example.com",
                "[::1]:5000",
                "Reg.Example.com",
            ),
        ];
        for (input, from, to) in cases {
            let parsed = rule(input);
            assert_eq!(parsed.from(), from, "FROM of {input}");
            assert_eq!(parsed.to(), to, "TO of {input}");
            assert_eq!(parsed.to_string(), input.trim());
        }
    }

    #[test]
    fn rejects_bad_retag_rules() {
        let cases = [
            ("release.daocloud.io", "expected FROM=TO"),
            ("=reg.io/x", "FROM is empty"),
            ("reg.io/x=", "TO is empty"),
            ("/=reg.io", "FROM is empty"),
            ("a.io=b.io=c.io", "more than one '='"),
            ("busybox=reg.io/x", "FROM \"busybox\" is ambiguous"),
            ("reg.io/x=mybusybox", "TO \"mybusybox\" is ambiguous"),
            ("reg.io/Up=b.io", "must be lowercase"),
            ("b.io=c.io/Up", "must be lowercase"),
            ("a.io/x:v1=b.io", "has a tag"),
            ("a.io/x@sha256:abc=b.io", "has a digest"),
            ("a.io//x=b.io", "empty component"),
            ("a.io/x_=b.io", "path component \"x_\""),
            ("bad_host.io/x=b.io", "registry host \"bad_host.io\""),
        ];
        for (input, expected) in cases {
            let err = input.parse::<RetagRule>().expect_err(input);
            let text = err.to_string();
            assert!(
                text.contains(&format!("{input:?}")),
                "{text:?} should name {input:?}"
            );
            assert!(text.contains(expected), "{text:?} should say {expected:?}");
        }
    }

    #[test]
    fn retag_prefix_matches_at_component_boundaries() {
        let rules = ["release.daocloud.io/mspider=10.16.10.111/mspider"];
        let cases = [
            (
                "release.daocloud.io/mspider/api:v1",
                "10.16.10.111/mspider/api:v1",
            ),
            (
                "release.daocloud.io/mspider/a/b:v2",
                "10.16.10.111/mspider/a/b:v2",
            ),
            // The repository equal to the prefix itself is matched too.
            ("release.daocloud.io/mspider:v3", "10.16.10.111/mspider:v3"),
            // Not at a component boundary, other host, other namespace: kept as is.
            (
                "release.daocloud.io/mspider-x/a:v1",
                "release.daocloud.io/mspider-x/a:v1",
            ),
            (
                "release.daocloud.io/mspiderx:v1",
                "release.daocloud.io/mspiderx:v1",
            ),
            (
                "release.daocloud.io/other/mspider:v1",
                "release.daocloud.io/other/mspider:v1",
            ),
            ("daocloud.io/mspider/api:v1", "daocloud.io/mspider/api:v1"),
            // Host names compare without regard to case.
            (
                "Release.DaoCloud.io/mspider/api:v1",
                "10.16.10.111/mspider/api:v1",
            ),
        ];
        for (image, expected) in cases {
            assert_eq!(names(image, &rules, false), [expected], "{image}");
        }
    }

    #[test]
    fn retag_keeps_tag_and_digest_and_renormalises() {
        let digest = format!("sha256:{HEX}");
        assert_eq!(
            names(
                &format!("ghcr.io/a/b:v@{digest}"),
                &["ghcr.io/a=reg.io"],
                false
            ),
            [format!("reg.io/b:v@{digest}")]
        );
        assert_eq!(
            names(
                &format!("ghcr.io/a/b@{digest}"),
                &["ghcr.io=reg.io/mirror"],
                false
            ),
            [format!("reg.io/mirror/a/b@{digest}")]
        );
        // Bare hosts, Docker Hub's official namespace and a whole repository as FROM.
        assert_eq!(
            names(
                "release.daocloud.io/mspider/api:v1",
                &["release.daocloud.io=10.16.10.111"],
                false
            ),
            ["10.16.10.111/mspider/api:v1"]
        );
        assert_eq!(
            names("busybox", &["docker.io/library=10.0.0.1/library"], false),
            ["10.0.0.1/library/busybox:latest"]
        );
        assert_eq!(
            names("busybox:1.36", &["library/busybox=reg.io/tools/bb"], false),
            ["reg.io/tools/bb:1.36"]
        );
        assert_eq!(
            names("busybox:1.36", &["docker.io=reg.io"], false),
            ["reg.io/library/busybox:1.36"]
        );
        // Renaming onto Docker Hub normalises like a typed name.
        assert_eq!(
            names("ghcr.io/foo/busybox:1", &["ghcr.io/foo=docker.io"], false),
            ["docker.io/library/busybox:1"]
        );
    }

    #[test]
    fn longest_from_wins_whatever_the_order() {
        let short = "release.daocloud.io=short.io";
        let long = "release.daocloud.io/mspider=long.io/m";
        for rules in [[short, long], [long, short]] {
            assert_eq!(
                names("release.daocloud.io/mspider/api:v1", &rules, false),
                ["long.io/m/api:v1"]
            );
            assert_eq!(
                names("release.daocloud.io/other/api:v1", &rules, false),
                ["short.io/other/api:v1"]
            );
        }
    }

    #[test]
    fn keep_original_controls_the_original_name() {
        let rules = ["release.daocloud.io/mspider=10.16.10.111/mspider"];
        let image = "release.daocloud.io/mspider/api:v1";
        assert_eq!(
            names(image, &rules, true),
            [image, "10.16.10.111/mspider/api:v1"]
        );
        assert_eq!(names(image, &rules, false), ["10.16.10.111/mspider/api:v1"]);
        // No rule matches: the original stays, whatever keep_original says.
        assert_eq!(names("ghcr.io/a/b:1", &rules, false), ["ghcr.io/a/b:1"]);
        assert_eq!(names("ghcr.io/a/b:1", &rules, true), ["ghcr.io/a/b:1"]);
        assert_eq!(names("ghcr.io/a/b:1", &[], false), ["ghcr.io/a/b:1"]);
        // A rule that renames to the same name yields one name, not two.
        assert_eq!(
            names("ghcr.io/a/b:1", &["ghcr.io/a=ghcr.io/a"], true),
            ["ghcr.io/a/b:1"]
        );
    }

    #[test]
    fn conflicting_rules_are_reported() {
        let rules = [rule("reg.io/a=x.io"), rule("reg.io/a/=y.io")];
        let err = check_rules(&rules).unwrap_err();
        assert!(
            matches!(err, ReferenceError::ConflictingRules { .. }),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains("\"reg.io/a=x.io\"") && text.contains("\"reg.io/a/=y.io\""),
            "{text}"
        );
        let err = target_names(&r("reg.io/a/b:1"), &rules, false).unwrap_err();
        assert!(
            matches!(err, ReferenceError::ConflictingRules { .. }),
            "{err:?}"
        );
        // A longer rule settles the tie for the images it covers.
        let mut with_longer = rules.to_vec();
        with_longer.push(rule("reg.io/a/b=z.io/b"));
        assert_eq!(
            target_names(&r("reg.io/a/b:1"), &with_longer, false).unwrap(),
            [r("z.io/b:1")]
        );
        // The same rule given twice is no conflict.
        let twice = [rule("reg.io/a=x.io"), rule("reg.io/a=x.io")];
        check_rules(&twice).unwrap();
        assert_eq!(
            names("reg.io/a/b:1", &["reg.io/a=x.io", "reg.io/a=x.io"], false),
            ["x.io/b:1"]
        );
    }

    #[test]
    fn retag_result_must_be_a_valid_name() {
        let cases = [
            // Nothing would be left of the repository path.
            (
                "reg.io/app=other.io".to_owned(),
                "reg.io/app:1",
                "no repository path is left",
            ),
            // Too long once the prefix is replaced.
            (
                format!("reg.io=long.io/{}", "a".repeat(250)),
                "reg.io/x:1",
                "at most 255",
            ),
        ];
        for (rule_text, image, expected) in cases {
            let err = target_names(&r(image), &[rule(&rule_text)], true).unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, ReferenceError::Retag { .. }), "{err:?}");
            assert!(
                text.contains(&format!("{rule_text:?}")),
                "{text} should name the rule"
            );
            assert!(
                text.contains(&r(image).to_string()),
                "{text} should name the image"
            );
            assert!(text.contains(expected), "{text} should say {expected}");
        }
    }
}
