//! A recording stand-in for the `helm` CLI, for tests of `lade upgrade` where no helm binary
//! or API server exists.
//!
//! [`FakeHelm::new`] writes a POSIX `sh` script named `helm` into a temp dir. Each time it
//! runs, it records its argv, a copy of every `-f`/`--values` file and a listing of every
//! argument that is a directory (a chart), then answers with the [`Reply`] the test set for
//! its subcommand (`repo list`, `get values`, `upgrade`, …; the first two words for `repo`,
//! `get`, `search` and `show`, the first word otherwise). A reply can be set for the n-th call
//! of a subcommand only, and can carry a file tree that is copied under `--untardir`, as
//! `helm pull --untar` would unpack a chart. Without a reply, a call succeeds silently.
//!
//! The script stores raw bytes (argv NUL-separated, files copied) rather than JSON, which
//! `sh` cannot escape reliably; [`FakeHelm::calls`] parses them back.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tempfile::TempDir;

/// What the stand-in prints and how it exits.
#[derive(Clone, Debug, Default)]
pub struct Reply {
    pub stdout: String,
    pub stderr: String,
    pub code: i32,
    /// Files (path relative to `--untardir`, content) written there before answering.
    pub tree: Vec<(String, Vec<u8>)>,
}

impl Reply {
    /// Success, printing `stdout`.
    pub fn ok(stdout: &str) -> Reply {
        Reply {
            stdout: stdout.into(),
            ..Default::default()
        }
    }

    /// Failure with exit code `code`, printing `stderr`.
    pub fn fail(code: i32, stderr: &str) -> Reply {
        Reply {
            stderr: stderr.into(),
            code,
            ..Default::default()
        }
    }

    /// Success, unpacking `tree` under `--untardir`.
    pub fn unpack(tree: Vec<(String, Vec<u8>)>) -> Reply {
        Reply {
            tree,
            ..Default::default()
        }
    }
}

/// One recorded call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelmCall {
    /// Arguments after the program name.
    pub argv: Vec<String>,
    /// Content of each `-f`/`--values` file, in argv order, when the call was made (`None`:
    /// the file did not exist).
    pub values: Vec<Option<String>>,
    /// For each argument that was a directory: the argument and the files under it
    /// (`./Chart.yaml`, …), sorted.
    pub dirs: Vec<(String, Vec<String>)>,
}

impl HelmCall {
    /// The subcommand as replies are keyed: `get values`, `upgrade`.
    pub fn subcommand(&self) -> String {
        let words = match self.argv.first().map(String::as_str) {
            Some("repo" | "get" | "search" | "show") => 2,
            _ => 1,
        };
        self.argv
            .iter()
            .take(words)
            .cloned()
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The stand-in, in its own temp dir (removed on drop).
pub struct FakeHelm {
    dir: TempDir,
}

const SCRIPT: &str = r#"#!/bin/sh
# Stand-in for helm written by lade-testkit (testkit/src/helm.rs): records the call, then
# answers what the test set for its subcommand.
set -u
root=@ROOT@
n=0
while ! mkdir "$root/calls/$n" 2>/dev/null; do n=$((n + 1)); done
call="$root/calls/$n"
printf '%s\0' "$@" > "$call/argv"
i=0
prev=
untardir=
for arg in "$@"; do
  case "$prev" in
    -f|--values) if [ -f "$arg" ]; then cp "$arg" "$call/values-$i"; fi ;;
    --untardir) untardir=$arg ;;
  esac
  if [ -d "$arg" ]; then (cd "$arg" && find . -type f | LC_ALL=C sort) > "$call/dir-$i"; fi
  prev=$arg
  i=$((i + 1))
done
case "${1:-}" in
  repo|get|search|show) key="$1-${2:-}" ;;
  *) key="${1:-none}" ;;
esac
m=0
while ! mkdir "$root/seen/$key.$m" 2>/dev/null; do m=$((m + 1)); done
reply="$root/replies/$key.$m"
[ -d "$reply" ] || reply="$root/replies/$key"
if [ -n "$untardir" ] && [ -d "$reply/tree" ]; then
  mkdir -p "$untardir" && cp -R "$reply/tree/." "$untardir/"
fi
if [ -f "$reply/stdout" ]; then cat "$reply/stdout"; fi
if [ -f "$reply/stderr" ]; then cat "$reply/stderr" >&2; fi
code=0
if [ -f "$reply/code" ]; then code=$(cat "$reply/code"); fi
exit "$code"
"#;

impl FakeHelm {
    /// Writes the script; no replies are set yet.
    pub fn new() -> Result<FakeHelm> {
        let dir = tempfile::Builder::new()
            .prefix("lade-fake-helm-")
            .tempdir()?;
        for sub in ["bin", "calls", "seen", "replies"] {
            std::fs::create_dir(dir.path().join(sub))?;
        }
        let root = dir.path().display().to_string();
        let quoted = format!("'{}'", root.replace('\'', r"'\''"));
        let script = dir.path().join("bin/helm");
        std::fs::write(&script, SCRIPT.replace("@ROOT@", &quoted))?;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
        Ok(FakeHelm { dir })
    }

    /// Path of the stand-in, for `--helm`.
    pub fn program(&self) -> PathBuf {
        self.dir.path().join("bin/helm")
    }

    /// `PATH` with the stand-in's directory first, so a plain `helm` finds it.
    pub fn path_env(&self) -> Result<OsString> {
        let mut dirs = vec![self.dir.path().join("bin")];
        dirs.extend(std::env::split_paths(
            &std::env::var_os("PATH").unwrap_or_default(),
        ));
        Ok(std::env::join_paths(dirs)?)
    }

    /// Answers every call of `subcommand` (`get values`, `upgrade`) with `reply`.
    pub fn reply(&self, subcommand: &str, reply: Reply) -> Result<()> {
        self.write_reply(&key(subcommand), &reply)
    }

    /// Answers the `n`-th call (from 0) of `subcommand` with `reply`, before any [`reply`](Self::reply).
    pub fn reply_nth(&self, subcommand: &str, n: usize, reply: Reply) -> Result<()> {
        self.write_reply(&format!("{}.{n}", key(subcommand)), &reply)
    }

    fn write_reply(&self, name: &str, reply: &Reply) -> Result<()> {
        let dir = self.dir.path().join("replies").join(name);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("stdout"), &reply.stdout)?;
        std::fs::write(dir.join("stderr"), &reply.stderr)?;
        std::fs::write(dir.join("code"), reply.code.to_string())?;
        for (path, content) in &reply.tree {
            let target = dir.join("tree").join(path);
            std::fs::create_dir_all(target.parent().expect("a file has a parent"))?;
            std::fs::write(target, content)?;
        }
        Ok(())
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Result<Vec<HelmCall>> {
        let mut calls = Vec::new();
        for n in 0.. {
            let dir = self.dir.path().join("calls").join(n.to_string());
            if !dir.is_dir() {
                break;
            }
            calls.push(read_call(&dir)?);
        }
        Ok(calls)
    }
}

fn key(subcommand: &str) -> String {
    subcommand.split_whitespace().collect::<Vec<_>>().join("-")
}

fn read_call(dir: &Path) -> Result<HelmCall> {
    let raw = std::fs::read(dir.join("argv")).with_context(|| format!("{}", dir.display()))?;
    let argv: Vec<String> = raw
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    // printf ends every argument with a NUL, so the split leaves one empty piece at the end.
    let argv = argv[..argv.len().saturating_sub(1)].to_vec();
    let mut values = Vec::new();
    let mut dirs = Vec::new();
    for (i, arg) in argv.iter().enumerate() {
        if i > 0 && matches!(argv[i - 1].as_str(), "-f" | "--values") {
            values.push(std::fs::read_to_string(dir.join(format!("values-{i}"))).ok());
        }
        if let Ok(listing) = std::fs::read_to_string(dir.join(format!("dir-{i}"))) {
            dirs.push((arg.clone(), listing.lines().map(str::to_string).collect()));
        }
    }
    Ok(HelmCall { argv, values, dirs })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn run(helm: &FakeHelm, args: &[&str]) -> std::process::Output {
        Command::new("helm")
            .args(args)
            .env("PATH", helm.path_env().unwrap())
            .output()
            .unwrap()
    }

    #[test]
    fn records_calls_and_answers_per_subcommand() {
        let helm = FakeHelm::new().unwrap();
        helm.reply("get values", Reply::ok("a: 1\n")).unwrap();
        helm.reply_nth("search repo", 0, Reply::ok("[]")).unwrap();
        helm.reply("search repo", Reply::ok("[{}]")).unwrap();
        helm.reply("upgrade", Reply::fail(1, "Error: UPGRADE FAILED\n"))
            .unwrap();
        let work = tempfile::tempdir().unwrap();
        let values = work.path().join("it's values.yaml");
        std::fs::write(&values, "b: 2\n").unwrap();
        std::fs::create_dir(work.path().join("chart")).unwrap();
        std::fs::write(work.path().join("chart/Chart.yaml"), "name: x\n").unwrap();

        let out = run(&helm, &["get", "values", "demo", "-o", "yaml"]);
        assert!(out.status.success());
        assert_eq!(out.stdout, b"a: 1\n");
        assert_eq!(run(&helm, &["search", "repo", "x"]).stdout, b"[]");
        assert_eq!(run(&helm, &["search", "repo", "x"]).stdout, b"[{}]");
        let chart = work.path().join("chart").display().to_string();
        let values_arg = values.display().to_string();
        let out = run(
            &helm,
            &["upgrade", "demo", &chart, "-f", &values_arg, "-f", "/nope"],
        );
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(out.stderr, b"Error: UPGRADE FAILED\n");
        assert!(run(&helm, &["repo", "update", "a b"]).status.success());

        let calls = helm.calls().unwrap();
        assert_eq!(calls.len(), 5);
        assert_eq!(calls[0].subcommand(), "get values");
        assert_eq!(calls[0].argv, ["get", "values", "demo", "-o", "yaml"]);
        assert_eq!(
            calls[3].values,
            [Some("b: 2\n".to_string()), None],
            "the second -f file does not exist"
        );
        assert_eq!(calls[3].dirs, [(chart, vec!["./Chart.yaml".to_string()])]);
        assert_eq!(calls[4].argv, ["repo", "update", "a b"]);
    }

    #[test]
    fn pull_unpacks_the_reply_tree() {
        let helm = FakeHelm::new().unwrap();
        helm.reply(
            "pull",
            Reply::unpack(vec![("demo/Chart.yaml".into(), b"name: demo\n".to_vec())]),
        )
        .unwrap();
        let work = tempfile::tempdir().unwrap();
        let dest = work.path().join("d").display().to_string();
        let out = run(&helm, &["pull", "r/demo", "--untar", "--untardir", &dest]);
        assert!(out.status.success());
        assert_eq!(
            std::fs::read_to_string(work.path().join("d/demo/Chart.yaml")).unwrap(),
            "name: demo\n"
        );
    }
}
