//! The real `helm` CLI: every command line lade runs or prints, running one, and reading its
//! answers (a release's values and revision, repositories, chart versions).
//!
//! This module owns helm's argv and output formats, and nothing of the upgrade's decisions.
//! Commands that talk to the cluster get `--kubeconfig` and `--kube-context` when given;
//! repository commands do not need them. Every command is printed (`$ helm …`, quoted so
//! it can be pasted into a shell) before it runs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};

use serde::Deserialize;
use serde_yaml::Value;

use super::{values, UpgradeError};

/// How to call helm.
#[derive(Clone, Debug)]
pub struct Helm {
    /// `helm`, looked up on PATH, or a path.
    pub program: PathBuf,
    pub kubeconfig: Option<PathBuf>,
    pub kube_context: Option<String>,
}

/// What a finished helm command printed.
#[derive(Debug)]
pub struct Ran {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// A release's user-supplied values, as `helm get values -o yaml` printed them and parsed.
#[derive(Debug)]
pub struct CurrentValues {
    pub text: String,
    pub values: Value,
}

/// A helm repository as `helm repo list -o json` lists it.
#[derive(Debug, Deserialize)]
struct Repository {
    name: String,
}

/// One line of `helm search repo -o json`.
#[derive(Debug, Deserialize)]
struct ChartVersion {
    name: String,
    version: String,
}

/// The part of `helm status -o json` lade reads.
#[derive(Debug, Deserialize)]
struct Status {
    version: u64,
}

/// How an exit status reads in messages: `exit code 1`, `killed by signal 9`.
pub fn describe(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => status.to_string(),
    }
}

/// `arg` as a POSIX shell reads it back: unchanged when it is plain, single-quoted otherwise.
pub fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c));
    if plain {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

fn strings<const N: usize>(args: [&str; N]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

impl Helm {
    /// The command line of `args`, as printed.
    pub fn line(&self, args: &[String]) -> String {
        std::iter::once(self.program.display().to_string())
            .chain(args.iter().cloned())
            .map(|a| shell_quote(&a))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// `args` with the cluster flags added.
    fn cluster(&self, mut args: Vec<String>) -> Vec<String> {
        if let Some(kubeconfig) = &self.kubeconfig {
            args.push("--kubeconfig".into());
            args.push(kubeconfig.display().to_string());
        }
        if let Some(context) = &self.kube_context {
            args.push("--kube-context".into());
            args.push(context.clone());
        }
        args
    }

    /// Prints and runs `helm args`, whatever its exit status. Fails only when helm cannot be
    /// started.
    pub async fn run(
        &self,
        args: &[String],
        out: &mut (dyn Write + Send),
    ) -> Result<Ran, UpgradeError> {
        let _ = writeln!(out, "$ {}", self.line(args));
        let output = tokio::process::Command::new(&self.program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => UpgradeError::HelmNotFound {
                    program: self.program.display().to_string(),
                },
                _ => UpgradeError::io(&self.program, "running helm")(e),
            })?;
        Ok(Ran {
            status: output.status,
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }

    /// Like [`Helm::run`], but a non-zero exit is an error carrying helm's stderr.
    async fn run_ok(
        &self,
        args: &[String],
        out: &mut (dyn Write + Send),
    ) -> Result<Ran, UpgradeError> {
        let ran = self.run(args, out).await?;
        if ran.status.success() {
            Ok(ran)
        } else {
            Err(self.failed(args, ran))
        }
    }

    fn failed(&self, args: &[String], ran: Ran) -> UpgradeError {
        UpgradeError::Helm {
            command: self.line(args),
            status: describe(&ran.status),
            stderr: ran.stderr,
        }
    }

    fn unreadable(&self, args: &[String], problem: impl std::fmt::Display) -> UpgradeError {
        UpgradeError::HelmOutput {
            command: self.line(args),
            problem: problem.to_string(),
        }
    }

    /// Names of the configured repositories.
    pub async fn repositories(
        &self,
        out: &mut (dyn Write + Send),
    ) -> Result<Vec<String>, UpgradeError> {
        let args = strings(["repo", "list", "-o", "json"]);
        let ran = self.run(&args, out).await?;
        // With no repository at all, helm fails instead of printing an empty list.
        if !ran.status.success() && ran.stderr.contains("no repositories to show") {
            return Ok(Vec::new());
        }
        if !ran.status.success() {
            return Err(self.failed(&args, ran));
        }
        let repos: Vec<Repository> =
            serde_json::from_str(&ran.stdout).map_err(|e| self.unreadable(&args, e))?;
        Ok(repos.into_iter().map(|r| r.name).collect())
    }

    pub async fn add_repository(
        &self,
        name: &str,
        url: &str,
        out: &mut (dyn Write + Send),
    ) -> Result<(), UpgradeError> {
        self.run_ok(&strings(["repo", "add", name, url]), out)
            .await
            .map(drop)
    }

    pub async fn update_repository(
        &self,
        name: &str,
        out: &mut (dyn Write + Send),
    ) -> Result<(), UpgradeError> {
        self.run_ok(&strings(["repo", "update", name]), out)
            .await
            .map(drop)
    }

    /// Versions of `chart` (`REPO/CHART`) in the local index of its repository, as helm lists
    /// them: newest first, pre-releases included.
    pub async fn chart_versions(
        &self,
        chart: &str,
        out: &mut (dyn Write + Send),
    ) -> Result<Vec<String>, UpgradeError> {
        let args = strings([
            "search",
            "repo",
            chart,
            "--versions",
            "--devel",
            "-o",
            "json",
        ]);
        let ran = self.run_ok(&args, out).await?;
        let found: Vec<ChartVersion> =
            serde_json::from_str(&ran.stdout).map_err(|e| self.unreadable(&args, e))?;
        // `search repo` matches names by substring: keep the chart itself only.
        Ok(found
            .into_iter()
            .filter(|c| c.name == chart)
            .map(|c| c.version)
            .collect())
    }

    /// Downloads `chart` at `version` and unpacks it under `dir`.
    pub async fn pull(
        &self,
        chart: &str,
        version: &str,
        dir: &Path,
        out: &mut (dyn Write + Send),
    ) -> Result<(), UpgradeError> {
        let dir = dir.display().to_string();
        let args = strings([
            "pull",
            chart,
            "--version",
            version,
            "--untar",
            "--untardir",
            &dir,
        ]);
        self.run_ok(&args, out).await.map(drop)
    }

    /// The release's user-supplied values, or `None` when the release does not exist.
    pub async fn current_values(
        &self,
        release: &str,
        namespace: &str,
        out: &mut (dyn Write + Send),
    ) -> Result<Option<CurrentValues>, UpgradeError> {
        let args = self.cluster(strings([
            "get", "values", release, "-n", namespace, "-o", "yaml",
        ]));
        let ran = self.run(&args, out).await?;
        if !ran.status.success() {
            if ran.stderr.contains("release: not found") {
                return Ok(None);
            }
            return Err(self.failed(&args, ran));
        }
        let origin = format!("`{}`", self.line(&args));
        let values =
            values::parse_document(&ran.stdout, &origin).map_err(|e| self.unreadable(&args, e))?;
        Ok(Some(CurrentValues {
            text: ran.stdout,
            values,
        }))
    }

    /// The release's current revision.
    pub async fn revision(
        &self,
        release: &str,
        namespace: &str,
        out: &mut (dyn Write + Send),
    ) -> Result<u64, UpgradeError> {
        let args = self.cluster(strings(["status", release, "-n", namespace, "-o", "json"]));
        let ran = self.run_ok(&args, out).await?;
        let status: Status =
            serde_json::from_str(&ran.stdout).map_err(|e| self.unreadable(&args, e))?;
        Ok(status.version)
    }

    /// `helm upgrade --install` as the manual procedure runs it, with every value in the one
    /// file `values`. `version` only for repository charts: a chart directory is one version.
    pub fn upgrade_args(
        &self,
        release: &str,
        namespace: &str,
        chart: &str,
        version: Option<&str>,
        values: &Path,
    ) -> Vec<String> {
        let mut args = strings([
            "upgrade",
            "--install",
            release,
            chart,
            "-n",
            namespace,
            "--create-namespace",
            "--cleanup-on-fail",
        ]);
        if let Some(version) = version {
            args.extend(strings(["--version", version]));
        }
        args.extend(strings(["-f", &values.display().to_string()]));
        self.cluster(args)
    }

    /// The command returning the release to `revision`.
    pub fn rollback_line(&self, release: &str, namespace: &str, revision: u64) -> String {
        let revision = revision.to_string();
        self.line(&self.cluster(strings(["rollback", release, &revision, "-n", namespace])))
    }

    /// The command removing a release whose first install failed.
    pub fn uninstall_line(&self, release: &str, namespace: &str) -> String {
        self.line(&self.cluster(strings(["uninstall", release, "-n", namespace])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn helm(kube: bool) -> Helm {
        Helm {
            program: "helm".into(),
            kubeconfig: kube.then(|| "/etc/kube config".into()),
            kube_context: kube.then(|| "prod".into()),
        }
    }

    #[test]
    fn quoting_round_trips_through_a_shell() {
        assert_eq!(shell_quote("daocloud/mspider"), "daocloud/mspider");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
    }

    #[test]
    fn upgrade_command_is_the_manual_one_with_one_values_file() {
        let args = helm(false).upgrade_args(
            "demo",
            "demo-system",
            "/tmp/c/original-chart",
            None,
            Path::new("/b/v.yaml"),
        );
        assert_eq!(
            args,
            strings([
                "upgrade",
                "--install",
                "demo",
                "/tmp/c/original-chart",
                "-n",
                "demo-system",
                "--create-namespace",
                "--cleanup-on-fail",
                "-f",
                "/b/v.yaml"
            ])
        );
        let args = helm(true).upgrade_args(
            "demo",
            "ns",
            "daocloud/demo",
            Some("0.2.0"),
            Path::new("v.yaml"),
        );
        assert_eq!(
            helm(true).line(&args),
            "helm upgrade --install demo daocloud/demo -n ns --create-namespace --cleanup-on-fail \
             --version 0.2.0 -f v.yaml --kubeconfig '/etc/kube config' --kube-context prod"
        );
    }

    #[test]
    fn recovery_commands_name_the_cluster_too() {
        assert_eq!(
            helm(true).rollback_line("demo", "ns", 3),
            "helm rollback demo 3 -n ns --kubeconfig '/etc/kube config' --kube-context prod"
        );
        assert_eq!(
            helm(false).uninstall_line("demo", "ns"),
            "helm uninstall demo -n ns"
        );
    }
}
