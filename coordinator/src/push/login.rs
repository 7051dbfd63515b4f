//! Where a registry login comes from: `--username` with the password read from stdin, else
//! the docker CLI's config (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`): the
//! `auths` entry of the registry host, as `docker login` writes it. A password is never taken
//! from the command line, where every user of the machine can read it.
//!
//! Credential helpers (`credsStore`, `credHelpers`) are not run: a host whose login lives in
//! one is reported, with the flags to use instead.

use std::io::Read;
use std::path::{Path, PathBuf};

use base64::Engine as _;

use super::registry::Login;

/// Why no login could be read.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("{}: {problem}", path.display())]
    Config { path: PathBuf, problem: String },
    #[error(
        "the docker config {} keeps the login of {host} in the credential helper \
         docker-credential-{helper}, which lade does not run; pass --username and --password-stdin",
        path.display()
    )]
    CredentialHelper {
        path: PathBuf,
        host: String,
        helper: String,
    },
    #[error("reading the password from stdin: {0}")]
    Stdin(std::io::Error),
    #[error("the password read from stdin is empty")]
    EmptyPassword,
}

/// The login for `host`: `username` with the password from `stdin` when a user name is
/// given, else the docker config's entry for `host` (`None`: anonymous).
pub fn resolve(
    host: &str,
    username: Option<&str>,
    stdin: impl Read,
) -> Result<Option<Login>, LoginError> {
    if let Some(username) = username {
        return Ok(Some(Login {
            username: username.to_string(),
            password: read_password(stdin)?,
        }));
    }
    match docker_config_path() {
        Some(path) if path.exists() => from_docker_config(&path, host),
        _ => Ok(None),
    }
}

/// The password piped in, without the line end `echo` or a file leaves (as `docker login
/// --password-stdin` reads it).
fn read_password(mut stdin: impl Read) -> Result<String, LoginError> {
    let mut password = String::new();
    stdin
        .read_to_string(&mut password)
        .map_err(LoginError::Stdin)?;
    let password = password.trim_end_matches(['\n', '\r']).to_string();
    if password.is_empty() {
        return Err(LoginError::EmptyPassword);
    }
    Ok(password)
}

/// `$DOCKER_CONFIG/config.json`, else `$HOME/.docker/config.json`.
fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".docker/config.json"))
}

#[derive(serde::Deserialize, Default)]
struct DockerConfig {
    #[serde(default)]
    auths: std::collections::BTreeMap<String, AuthEntry>,
    #[serde(rename = "credsStore", default)]
    creds_store: Option<String>,
    #[serde(rename = "credHelpers", default)]
    cred_helpers: std::collections::BTreeMap<String, String>,
}

#[derive(serde::Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// The login the docker config at `path` holds for `host`, if any.
fn from_docker_config(path: &Path, host: &str) -> Result<Option<Login>, LoginError> {
    let bad = |problem: String| LoginError::Config {
        path: path.to_path_buf(),
        problem,
    };
    let text = std::fs::read(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    let config: DockerConfig =
        serde_json::from_slice(&text).map_err(|e| bad(format!("not a docker config: {e}")))?;
    let helper = |helper: &str| LoginError::CredentialHelper {
        path: path.to_path_buf(),
        host: host.to_string(),
        helper: helper.to_string(),
    };
    if let Some((_, helper_name)) = config
        .cred_helpers
        .iter()
        .find(|(key, _)| same_host(key, host))
    {
        return Err(helper(helper_name));
    }
    let Some((_, entry)) = config.auths.iter().find(|(key, _)| same_host(key, host)) else {
        return Ok(None);
    };
    if let Some(encoded) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or_else(|| bad(format!("the auth of {host} is not base64 of USER:PASSWORD")))?;
        let (username, password) = decoded
            .split_once(':')
            .ok_or_else(|| bad(format!("the auth of {host} is not base64 of USER:PASSWORD")))?;
        return Ok(Some(Login {
            username: username.to_string(),
            password: password.to_string(),
        }));
    }
    if let (Some(username), Some(password)) = (&entry.username, &entry.password) {
        return Ok(Some(Login {
            username: username.clone(),
            password: password.clone(),
        }));
    }
    // `docker login` with a credential store leaves an empty entry: the login is in the store.
    match &config.creds_store {
        Some(store) => Err(helper(store)),
        None => Ok(None),
    }
}

/// Whether a config key (`host`, `https://host`, `https://host/v1/`) names `host`.
fn same_host(key: &str, host: &str) -> bool {
    let key = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let key = key.split('/').next().unwrap_or(key);
    key.eq_ignore_ascii_case(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path, json: &str) -> PathBuf {
        let path = dir.join("config.json");
        std::fs::write(&path, json).unwrap();
        path
    }

    #[test]
    fn docker_login_entries_are_found_by_host() {
        let dir = tempfile::tempdir().unwrap();
        // "admin:Harbor12345" and "bob:pw:with:colons"
        let path = config(
            dir.path(),
            r#"{"auths": {
                "https://harbor.local": {"auth": "YWRtaW46SGFyYm9yMTIzNDU="},
                "10.16.10.111:5000": {"auth": "Ym9iOnB3OndpdGg6Y29sb25z"},
                "registry.example": {"username": "carol", "password": "p"}
            }}"#,
        );
        let login = |host| from_docker_config(&path, host).unwrap();
        assert_eq!(
            login("harbor.local"),
            Some(Login {
                username: "admin".into(),
                password: "Harbor12345".into()
            })
        );
        assert_eq!(
            login("10.16.10.111:5000").unwrap().password,
            "pw:with:colons"
        );
        assert_eq!(login("registry.example").unwrap().username, "carol");
        assert_eq!(login("10.16.10.111"), None, "the port is part of the host");
    }

    #[test]
    fn credential_helpers_are_named_not_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = config(
            dir.path(),
            r#"{"auths": {"harbor.local": {}}, "credsStore": "pass",
                "credHelpers": {"ecr.example": "ecr-login"}}"#,
        );
        let err = from_docker_config(&path, "harbor.local").unwrap_err();
        assert!(err.to_string().contains("docker-credential-pass"), "{err}");
        let err = from_docker_config(&path, "ecr.example").unwrap_err();
        assert!(
            err.to_string().contains("docker-credential-ecr-login"),
            "{err}"
        );
        assert_eq!(from_docker_config(&path, "other.example").unwrap(), None);
    }

    #[test]
    fn a_broken_config_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = config(dir.path(), r#"{"auths": {"h": {"auth": "%%%"}}}"#);
        let err = from_docker_config(&path, "h").unwrap_err();
        assert!(
            err.to_string().contains("config.json") && err.to_string().contains("base64"),
            "{err}"
        );
    }

    #[test]
    fn the_password_comes_from_stdin_without_its_line_end() {
        let login = resolve("h", Some("admin"), &b"s3cret\r\n"[..]).unwrap();
        assert_eq!(login.unwrap().password, "s3cret");
        assert!(matches!(
            resolve("h", Some("admin"), &b"\n"[..]),
            Err(LoginError::EmptyPassword)
        ));
    }
}
