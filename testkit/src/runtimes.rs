//! Which build of a daemon the harness runs: the machine's (found on `PATH`) or one unpacked by
//! `scripts/fetch-runtimes` under `target/runtimes/<name>/bin`, chosen per test run by an
//! environment variable such as `LADE_CONTAINERD=containerd-2.1`.
//!
//! A fetched runtime brings its own helpers (containerd's shims, ctr), so the daemon is started
//! with that `bin` dir first on its `PATH`; everything else (runc) still comes from the machine.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::require::require_binary;

/// Selects the containerd the harness starts: unset or `system` = the one on `PATH`, otherwise
/// the name of a runtime fetched by `scripts/fetch-runtimes` (e.g. `containerd-2.1`).
pub const CONTAINERD_ENV: &str = "LADE_CONTAINERD";

/// Selects the dockerd the harness starts, like [`CONTAINERD_ENV`] (e.g. `docker-28`). The
/// `docker` CLI is always the machine's: the Debian dockerd packages do not carry it.
pub const DOCKERD_ENV: &str = "LADE_DOCKERD";

/// Selects Docker's image store: `overlay2` (unset: the graph driver, as before Docker 29) or
/// `containerd` (the containerd image store, `"features": {"containerd-snapshotter": true}`,
/// images in its containerd's namespace `moby`; dockerd 24 and later).
pub const DOCKER_STORE_ENV: &str = "LADE_DOCKER_STORE";

/// Docker's image store, as [`DOCKER_STORE_ENV`] selects it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DockerStore {
    /// The overlay2 graph driver.
    Overlay2,
    /// The containerd image store on the overlayfs snapshotter.
    Containerd,
}

impl DockerStore {
    /// The store [`DOCKER_STORE_ENV`] names; fails on anything but the two known values.
    pub fn from_env() -> Result<DockerStore> {
        match std::env::var(DOCKER_STORE_ENV).as_deref() {
            Err(_) | Ok("") | Ok("overlay2") => Ok(DockerStore::Overlay2),
            Ok("containerd") => Ok(DockerStore::Containerd),
            Ok(other) => bail!("{DOCKER_STORE_ENV}={other}: expected overlay2 or containerd"),
        }
    }
}

/// `1` sets CRI's `discard_unpacked_layers` (content GC may drop a pulled image's layer blobs
/// once they are unpacked), as some clusters configure it to save disk.
pub const DISCARD_UNPACKED_LAYERS_ENV: &str = "LADE_CONTAINERD_DISCARD_UNPACKED_LAYERS";

/// Forces the config schema the harness writes for containerd: `2` makes containerd 2.x
/// migrate a 1.x-style config at startup, as on a node upgraded in place (default: 3 on 2.x,
/// 2 on 1.x).
pub const CONFIG_VERSION_ENV: &str = "LADE_CONTAINERD_CONFIG_VERSION";

/// Overrides where fetched runtimes live (default: `<workspace>/target/runtimes`).
pub const RUNTIMES_DIR_ENV: &str = "LADE_RUNTIMES_DIR";

/// The value of a selection variable that means "the machine's own binaries".
const SYSTEM: &str = "system";

/// One selected runtime build: where its executables come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runtime {
    /// `None` for the machine's own binaries.
    name: Option<String>,
    /// The fetched runtime's `bin` dir; `None` for the machine's own binaries (searched on
    /// `PATH`).
    bin_dir: Option<PathBuf>,
}

impl Runtime {
    /// The runtime selected by the environment variable `env` (e.g. [`CONTAINERD_ENV`]).
    ///
    /// Fails, naming the variable, the runtime and the dir looked in, when a named runtime has
    /// not been fetched: a test asked for a specific version must not quietly run another.
    pub fn from_env(env: &str) -> Result<Runtime> {
        match std::env::var(env) {
            Err(std::env::VarError::NotPresent) => Ok(Runtime::system()),
            Err(std::env::VarError::NotUnicode(value)) => {
                bail!("{env}={value:?} is not UTF-8")
            }
            Ok(value) if value.is_empty() || value == SYSTEM => Ok(Runtime::system()),
            Ok(value) => Runtime::fetched(env, &value, &runtimes_dir()),
        }
    }

    /// The machine's own binaries, found on `PATH`.
    pub fn system() -> Runtime {
        Runtime {
            name: None,
            bin_dir: None,
        }
    }

    fn fetched(env: &str, name: &str, root: &Path) -> Result<Runtime> {
        if name.contains('/') || name.starts_with('.') {
            bail!("{env}={name}: a runtime name is a plain name like containerd-2.1");
        }
        let bin_dir = root.join(name).join("bin");
        if !bin_dir.is_dir() {
            bail!(
                "{env}={name} but runtime `{name}` is not in {}: run `scripts/fetch-runtimes \
                 {name}` first (set {RUNTIMES_DIR_ENV} to use runtimes fetched elsewhere)",
                bin_dir.display()
            );
        }
        Ok(Runtime {
            name: Some(name.to_string()),
            bin_dir: Some(bin_dir),
        })
    }

    /// The runtime's name (`system` for the machine's own binaries), for messages.
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(SYSTEM)
    }

    /// The executable `name` of this runtime: from its `bin` dir for a fetched runtime (failing
    /// if the package did not bring it), from `PATH` for the machine's.
    pub fn binary(&self, name: &str) -> Result<PathBuf> {
        let Some(dir) = &self.bin_dir else {
            return require_binary(name);
        };
        let path = dir.join(name);
        if !path.is_file() {
            bail!(
                "runtime `{}` has no `{name}` in {}: run `scripts/fetch-runtimes {}` again",
                self.name(),
                dir.display(),
                self.name()
            );
        }
        Ok(path)
    }

    /// `PATH` for the daemon: the runtime's `bin` dir first (so it runs its own shims), then
    /// the inherited `PATH` (for runc and the rest of the machine's tools).
    pub fn daemon_path(&self) -> OsString {
        let inherited = std::env::var_os("PATH").unwrap_or_default();
        let Some(dir) = &self.bin_dir else {
            return inherited;
        };
        let dirs = std::iter::once(dir.clone()).chain(std::env::split_paths(&inherited));
        std::env::join_paths(dirs).unwrap_or(inherited)
    }

    /// Sets [`Runtime::daemon_path`] on `cmd`.
    pub fn apply_path(&self, cmd: &mut Command) {
        cmd.env("PATH", self.daemon_path());
    }
}

/// Where fetched runtimes live: `$LADE_RUNTIMES_DIR`, else `<workspace>/target/runtimes`.
pub fn runtimes_dir() -> PathBuf {
    match std::env::var_os(RUNTIMES_DIR_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("target")
            .join("runtimes"),
    }
}

/// A containerd version as `containerd --version` prints it (`1.7.24`, `2.1.9`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ContainerdVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl ContainerdVersion {
    /// Runs `<bin> --version` and parses its output.
    pub fn of(bin: &Path) -> Result<ContainerdVersion> {
        let out = Command::new(bin)
            .arg("--version")
            .output()
            .with_context(|| format!("run {} --version", bin.display()))?;
        let text = String::from_utf8_lossy(&out.stdout);
        ContainerdVersion::parse(&text)
            .with_context(|| format!("{} --version printed {:?}", bin.display(), text.trim()))
    }

    /// Parses `containerd <module path> <version> <revision>`; the version may carry a
    /// leading `v` and a Debian suffix (`1.6.20~ds1`, `2.1.9+unknown`).
    pub fn parse(text: &str) -> Result<ContainerdVersion> {
        let word = text.split_whitespace().nth(2).context("no version field")?;
        let core: String = word
            .trim_start_matches('v')
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.')
            .collect();
        let mut parts = core.split('.').map(str::parse::<u32>);
        match (parts.next(), parts.next(), parts.next()) {
            (Some(Ok(major)), Some(Ok(minor)), Some(Ok(patch))) => Ok(ContainerdVersion {
                major,
                minor,
                patch,
            }),
            _ => bail!("version `{word}` is not major.minor.patch"),
        }
    }
}

impl ContainerdVersion {
    /// Whether CRI keeps images labelled `io.cri-containerd.pinned=pinned` from kubelet's image
    /// garbage collection and reports them `pinned` (containerd 1.7.3 and later).
    pub fn honours_cri_pin_label(&self) -> bool {
        (self.major, self.minor, self.patch) >= (1, 7, 3)
    }
}

impl std::fmt::Display for ContainerdVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_version_lines_of_debian_builds() {
        let v = |s| ContainerdVersion::parse(s).unwrap().to_string();
        assert_eq!(
            v("containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3"),
            "1.6.20"
        );
        assert_eq!(
            v("containerd github.com/containerd/containerd/v2 2.1.9+unknown "),
            "2.1.9"
        );
        assert_eq!(v("containerd containerd.io v1.7.24 abcdef"), "1.7.24");
        assert!(ContainerdVersion::parse("containerd").is_err());
        assert!(ContainerdVersion::parse("containerd x 1.7").is_err());
    }

    #[test]
    fn a_named_runtime_that_was_not_fetched_is_an_error_naming_the_fix() {
        let root = tempfile::tempdir().unwrap();
        let err = Runtime::fetched(CONTAINERD_ENV, "containerd-9.9", root.path())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("scripts/fetch-runtimes containerd-9.9"),
            "{err}"
        );
        assert!(err.contains(CONTAINERD_ENV), "{err}");
    }

    #[test]
    fn a_fetched_runtime_comes_first_on_the_daemon_path() {
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("containerd-2.1/bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("containerd"), "").unwrap();
        let runtime = Runtime::fetched(CONTAINERD_ENV, "containerd-2.1", root.path()).unwrap();
        assert_eq!(
            runtime.binary("containerd").unwrap(),
            bin.join("containerd")
        );
        assert!(runtime.binary("ctr").is_err());
        let path = runtime.daemon_path();
        assert_eq!(std::env::split_paths(&path).next(), Some(bin));
        assert!(Runtime::fetched(CONTAINERD_ENV, "../x", root.path()).is_err());
    }
}
