//! Whether the tests that need real daemons run at all: [`require_binary`] fails loudly when a
//! daemon or tool is missing, and [`daemon_tests_enabled`] skips only when explicitly told to.
//! A leaf module: both [`crate::harness`] and [`crate::runtimes`] use it.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use anyhow::{bail, Result};

/// Environment variable that, set to `1`, makes daemon tests skip (loudly) instead of failing.
pub const SKIP_ENV: &str = "LADE_SKIP_DAEMON_TESTS";

/// Returns whether tests that need real daemons should run.
///
/// They run unless `LADE_SKIP_DAEMON_TESTS=1`; in that case a loud line naming the calling test
/// is written straight to stderr (bypassing libtest's output capture, so the skip is visible
/// without `--nocapture`) and `false` is returned. Callers do `if !daemon_tests_enabled() {
/// return; }` first. When the variable is not set, missing binaries are a *failure* (see
/// [`require_binary`]), never a silent skip.
#[track_caller]
pub fn daemon_tests_enabled() -> bool {
    if std::env::var(SKIP_ENV).as_deref() != Ok("1") {
        return true;
    }
    let caller = std::panic::Location::caller();
    let line = format!(
        "\n!!! SKIPPED real-daemon test at {}:{} because {SKIP_ENV}=1 — it did NOT run !!!\n",
        caller.file(),
        caller.line()
    );
    // Direct write instead of eprintln!: the test harness captures the macros, not the handle.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
    false
}

/// Finds `name` on `PATH` or fails with an error telling how to install it.
///
/// Only `PATH` is searched (not e.g. `/usr/sbin` behind its back): containerd and its shim look
/// binaries up on `PATH` too, so finding one elsewhere would just move the failure later.
pub fn require_binary(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if let Ok(meta) = fs::metadata(&candidate) {
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return Ok(candidate);
            }
        }
    }
    let package = match name {
        "dockerd" | "docker" => "docker.io",
        "docker-registry" => "docker-registry",
        "skopeo" => "skopeo",
        "htpasswd" => "apache2-utils",
        "openssl" => "openssl",
        "runc" => "runc",
        _ => "containerd",
    };
    bail!(
        "required binary `{name}` not found on PATH. lade's integration tests run against real \
         daemons and fail rather than silently skip: install them with \
         `apt-get install -y containerd` (brings ctr, containerd-shim-runc-v2 and runc){extra}, \
         or set {SKIP_ENV}=1 to skip these tests explicitly",
        extra = if package == "containerd" {
            String::new()
        } else {
            format!(" and `apt-get install -y {package}`")
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_error_says_how_to_install() {
        let err = require_binary("lade-no-such-binary-xyz").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("apt-get install -y containerd"), "{msg}");
        assert!(msg.contains(SKIP_ENV), "{msg}");
        assert!(require_binary("sh").is_ok());
    }
}
