//! `lade upgrade`: the helm upgrade an admin runs after loading a bundle, done safely with
//! the real `helm` CLI.
//!
//! This module owns the procedure and its outcome: get the chart on disk ([`chart`]), back up
//! the release's values, build the values of the upgrade ([`values`]), prove that every image
//! the chart will pull is on every node ([`preflight`]), run `helm upgrade --install`
//! ([`helm`]), and on failure say how to go back. It also owns the one error type of all
//! that, and what each error means as an exit code.
//!
//! The procedure, step by step (every helm command is printed before it runs):
//!
//! 1. Inputs are checked before helm is called: `--values` files, `hints.yaml`, and that the
//!    preflight can run (agents given; or `--image-registry`, whose registry answers and
//!    takes the login; or `--skip-preflight`).
//! 2. The chart: the bundle's `original-chart/`, copied to a temporary directory (helm reads
//!    charts only from disk), or `REPO/CHART` from a helm repository, pulled into one.
//! 3. `helm get values RELEASE -n NS -o yaml`: written as it is to a new file next to the
//!    bundle (the backup), or "release: not found", which makes this a fresh install.
//!    For an existing release, `helm status` gives the revision to roll back to.
//! 4. The values of the upgrade: the backup, then `--values`, `--set` and
//!    `global.imageRegistry` merged over it ([`values`] says how, and why chart defaults are
//!    not among them).
//! 5. The preflight renders `hints.yaml` against the chart's defaults coalesced with those
//!    values (what helm computes) and asks every agent to `Verify` each reference (without
//!    agents: the registry, a manifest `HEAD` per reference, as after `lade push`); a
//!    missing image stops the upgrade here.
//! 6. The values are written to a new file next to the backup, the only `-f` helm gets, and
//!    `helm upgrade --install RELEASE CHART -n NS --create-namespace --cleanup-on-fail
//!    [--version V] -f VALUES` runs.
//!
//! A dry run does steps 1 to 5 without writing the backup, and prints the values file's path
//! and the command of step 6 instead of writing and running them. It does run helm's local
//! and read-only steps (repository list/add/update, search, pull into a temporary directory,
//! get values, status): they change nothing in the cluster, and the values cannot be known
//! without them. It exits as the real run would: non-zero when the preflight fails.

pub mod chart;
pub mod helm;
pub mod preflight;
pub mod values;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::SystemTime;

use serde_yaml::Value;

use crate::bundle::{Bundle, BundleError};
use crate::hints::{Hints, HintsError};
use crate::load::Dial;
use crate::push::registry::Access;
use crate::reference::RetagRule;

use chart::Chart;
use helm::Helm;
use values::SetValue;

/// Exit code when the arguments, the bundle or the local files are wrong; nothing changed.
pub const EXIT_BAD_INPUT: u8 = 2;
/// Exit code when the preflight found images missing on nodes (or could not derive them);
/// helm did not run the upgrade.
pub const EXIT_PREFLIGHT: u8 = 3;
/// Exit code when a helm command failed; for the upgrade itself the backup and the way back
/// are printed.
pub const EXIT_HELM: u8 = 4;

/// Everything that can stop an upgrade, naming the file, value, node or command it is about.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Hints(#[from] HintsError),
    #[error("{}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: String,
        source: std::io::Error,
    },
    /// A values document (a `--values` file, or what helm printed) is not a YAML mapping.
    #[error("{origin}: {problem}")]
    Values { origin: String, problem: String },
    #[error("invalid --set {input:?}: {problem}")]
    BadSet { input: String, problem: String },
    #[error(
        "invalid --chart {input:?}: expected \"bundle\" or REPO/CHART (a chart of a helm repository, e.g. daocloud/mspider)"
    )]
    BadChart { input: String },
    #[error("chart {location}: {problem}")]
    Chart { location: String, problem: String },
    #[error(
        "--version {requested} was asked for, but the bundle's chart {chart} is version {found}; \
         drop --version, or use --chart REPO/CHART for another version"
    )]
    VersionMismatch {
        requested: String,
        chart: String,
        found: String,
    },
    #[error("helm repository {repo} has no chart {chart} {wanted} (it lists: {available})")]
    VersionNotFound {
        repo: String,
        chart: String,
        wanted: String,
        available: String,
    },
    #[error(
        "helm has no repository named {repo}; pass --repo-url URL so lade can run `helm repo add {repo} URL`"
    )]
    RepoUrlRequired { repo: String },
    #[error(
        "the chart's values have global.imageRegistry, and lade cannot tell which registry the images were loaded for \
         ({why}); pass --image-registry REGISTRY"
    )]
    ImageRegistryRequired { why: String },
    #[error(
        "the preflight cannot check the nodes: {reason}; to upgrade without knowing that every node holds \
         every image the chart will pull, pass --skip-preflight"
    )]
    PreflightCannotCheck { reason: String },
    #[error("cannot run {program}: it was not found; install helm 3 or pass --helm PATH")]
    HelmNotFound { program: String },
    #[error("preflight failed: the images the chart will pull cannot be derived from hints.yaml:\n{}", .problems.join("\n"))]
    PreflightHints { problems: Vec<String> },
    #[error("preflight failed: {summary}; the upgrade was not started")]
    PreflightFailed { summary: String },
    #[error("`{command}` failed ({status}){}", stderr_block(.stderr))]
    Helm {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("`{command}` printed something lade cannot read: {problem}")]
    HelmOutput { command: String, problem: String },
    /// `helm upgrade` itself failed: the cluster may be half-changed.
    #[error(
        "helm upgrade failed ({status}){}\n{}\n{recovery}",
        stderr_block(.stderr),
        backup_line(.backup)
    )]
    UpgradeFailed {
        status: String,
        stderr: String,
        backup: Option<PathBuf>,
        /// The command that returns the release to where it was.
        recovery: String,
    },
}

fn stderr_block(stderr: &str) -> String {
    let stderr = stderr.trim_end();
    if stderr.is_empty() {
        String::new()
    } else {
        format!(":\n{stderr}")
    }
}

fn backup_line(backup: &Option<PathBuf>) -> String {
    match backup {
        Some(path) => format!("values before the upgrade: {}", path.display()),
        None => "the release did not exist before (fresh install); nothing was backed up".into(),
    }
}

impl UpgradeError {
    /// The process exit code this error stands for ([`EXIT_BAD_INPUT`], [`EXIT_PREFLIGHT`],
    /// [`EXIT_HELM`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            UpgradeError::PreflightHints { .. } | UpgradeError::PreflightFailed { .. } => {
                EXIT_PREFLIGHT
            }
            UpgradeError::Helm { .. }
            | UpgradeError::HelmOutput { .. }
            | UpgradeError::UpgradeFailed { .. } => EXIT_HELM,
            _ => EXIT_BAD_INPUT,
        }
    }

    pub(crate) fn io(path: &Path, what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let (path, what) = (path.to_path_buf(), what.into());
        move |source| UpgradeError::Io { path, what, source }
    }
}

/// Where the chart comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChartSource {
    /// The bundle's `original-chart/`: works offline, no repository needed.
    Bundle,
    /// A chart of a helm repository, `REPO/CHART`.
    Repo { repo: String, chart: String },
}

impl FromStr for ChartSource {
    type Err = UpgradeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "bundle" {
            return Ok(ChartSource::Bundle);
        }
        match s.split_once('/') {
            Some((repo, chart))
                if !repo.is_empty() && !chart.is_empty() && !chart.contains('/') =>
            {
                Ok(ChartSource::Repo {
                    repo: repo.to_string(),
                    chart: chart.to_string(),
                })
            }
            _ => Err(UpgradeError::BadChart {
                input: s.to_string(),
            }),
        }
    }
}

/// How an upgrade runs.
#[derive(Clone, Debug)]
pub struct UpgradeOptions {
    pub release: String,
    pub namespace: String,
    pub chart: ChartSource,
    /// URL for `helm repo add`, used only when the repository of `chart` is not configured.
    pub repo_url: Option<String>,
    /// Chart version; the newest the repository lists when not given.
    pub version: Option<String>,
    /// `--values` files, merged in order over the release's current values.
    pub values_files: Vec<PathBuf>,
    /// `--set` assignments, applied in order after the files.
    pub set: Vec<SetValue>,
    /// `global.imageRegistry`; derived from `rules` when they rename to one registry host.
    pub image_registry: Option<String>,
    /// The retag rules the images were loaded with.
    pub rules: Vec<RetagRule>,
    /// Agents the preflight asks; without any, the preflight cannot run.
    pub agents: Vec<String>,
    /// The agents were found with `--discover` (a failed preflight's advice says so).
    pub discovered: bool,
    /// How to reach and authenticate to the agents.
    pub dial: Dial,
    /// Agents asked at the same time.
    pub parallel: usize,
    /// Said after the preflight's table when an agent could not be reached at all (set for
    /// discovered agents: their pod IPs may not be routable from here).
    pub unreachable_hint: Option<String>,
    /// How to reach the registry of `image_registry`, which the preflight checks instead of
    /// nodes when no agent is given.
    pub registry: Access,
    pub skip_preflight: bool,
    pub dry_run: bool,
    pub helm: Helm,
}

/// Runs the upgrade of `opts` with the chart and hints of `bundle`, reporting each step on
/// `out` (a loud warning about a skipped preflight also goes to stderr).
pub async fn upgrade(
    bundle: &Bundle,
    opts: &UpgradeOptions,
    out: &mut (dyn Write + Send),
) -> Result<(), UpgradeError> {
    let say = |out: &mut (dyn Write + Send), text: String| {
        // The report is best effort: a closed stdout must not stop an upgrade half-way.
        let _ = writeln!(out, "{}", text.trim_end_matches('\n'));
    };

    // 1. Everything that can be checked without helm.
    let hints = preflight_hints(bundle, opts)?;
    let checked_registry = match (&hints, opts.agents.is_empty(), &opts.image_registry) {
        (Some(_), true, Some(image_registry)) => {
            Some(preflight::connect_registry(image_registry, &opts.registry).await?)
        }
        _ => None,
    };
    let mut user = Value::Mapping(Default::default());
    let mut extra = Vec::new();
    for path in &opts.values_files {
        let text = std::fs::read_to_string(path)
            .map_err(UpgradeError::io(path, "reading the --values file"))?;
        extra.push(values::parse_document(
            &text,
            &format!("--values {}", path.display()),
        )?);
    }
    if opts.dry_run {
        say(
            out,
            "dry run: helm's read-only steps run; no file is written and the release is not changed"
                .into(),
        );
    }

    // 2. The chart, on disk for as long as helm needs it.
    let workdir = tempfile::Builder::new()
        .prefix("lade-chart-")
        .tempdir()
        .map_err(UpgradeError::io(
            &std::env::temp_dir(),
            "creating a temporary directory for the chart",
        ))?;
    let chart = chart::fetch(bundle, opts, workdir.path(), out).await?;
    let origin = match &opts.chart {
        ChartSource::Bundle => format!(
            "the bundle's original-chart/, copied for helm to {} (removed when lade exits)",
            chart.helm_chart
        ),
        ChartSource::Repo { .. } => format!("{}, version {}", chart.helm_chart, chart.version),
    };
    say(
        out,
        format!("chart: {} {} from {origin}", chart.name, chart.version),
    );

    // 3. The release's values, backed up as helm printed them.
    let now = SystemTime::now();
    let dir = bundle_dir(&bundle.path);
    let stem = |what: &str| values::file_stem(&opts.release, &opts.namespace, what, now);
    let current = opts
        .helm
        .current_values(&opts.release, &opts.namespace, out)
        .await?;
    let (backup, revision) = match &current {
        None => {
            say(
                out,
                format!(
                    "release {} not found in namespace {}: this is a fresh install, there are no values to back up",
                    opts.release, opts.namespace
                ),
            );
            (None, None)
        }
        Some(current) => {
            let revision = opts
                .helm
                .revision(&opts.release, &opts.namespace, out)
                .await?;
            let path = keep(
                opts,
                &dir,
                &stem("values-backup"),
                current.text.as_bytes(),
                "values backup",
                out,
            )?;
            (Some(path), Some(revision))
        }
    };

    // 4. The values of the upgrade.
    let mut explicit = Value::Mapping(Default::default());
    for document in &extra {
        values::merge(&mut explicit, document.clone());
    }
    if let Some(current) = current {
        values::merge(&mut user, current.values);
    }
    for document in extra {
        values::merge(&mut user, document);
    }
    for set in &opts.set {
        set.apply(&mut explicit);
        set.apply(&mut user);
    }
    let (registry, line) = image_registry(opts, &chart, &user, &explicit)?;
    if let Some(registry) = registry {
        values::set_path(
            &mut user,
            &["global", "imageRegistry"],
            Value::String(registry),
        );
    }
    say(out, line);

    // 5. The preflight, against the tree helm will compute.
    let verdict = match hints {
        Some(hints) => {
            let tree = values::coalesce(&chart.defaults, &user);
            let images = preflight::derive_images(&hints, &tree)?;
            let report = match &checked_registry {
                Some(registry) => preflight::check_registry(&images, registry).await,
                None => {
                    preflight::check(
                        &images,
                        &opts.agents,
                        &opts.dial,
                        opts.parallel,
                        opts.discovered,
                    )
                    .await
                }
            };
            say(out, report.to_text());
            if let (Some(hint), true) = (&opts.unreachable_hint, report.unreachable()) {
                say(out, hint.clone());
            }
            report.failure()
        }
        None => {
            let banner = "!!! preflight SKIPPED (--skip-preflight): nobody checked that the nodes hold the images the chart will pull !!!";
            let _ = writeln!(std::io::stderr(), "{banner}");
            say(out, banner.into());
            None
        }
    };
    if let (Some(summary), false) = (&verdict, opts.dry_run) {
        return Err(UpgradeError::PreflightFailed {
            summary: summary.clone(),
        });
    }

    // 6. The values file, then the upgrade.
    let document = values::to_yaml(&user, "the values of the upgrade")?;
    let values_path = keep(
        opts,
        &dir,
        &stem("values-upgrade"),
        document.as_bytes(),
        "values for helm",
        out,
    )?;
    let args = opts.helm.upgrade_args(
        &opts.release,
        &opts.namespace,
        &chart.helm_chart,
        chart.pinned_version.as_deref(),
        &values_path,
    );
    let recovery = match revision {
        Some(revision) => format!(
            "to return to revision {revision}: {}",
            opts.helm
                .rollback_line(&opts.release, &opts.namespace, revision)
        ),
        None => format!(
            "to remove what the failed install left: {}",
            opts.helm.uninstall_line(&opts.release, &opts.namespace)
        ),
    };
    if opts.dry_run {
        say(out, format!("would run: {}", opts.helm.line(&args)));
        return match verdict {
            Some(summary) => Err(UpgradeError::PreflightFailed { summary }),
            None => Ok(()),
        };
    }
    let ran = opts.helm.run(&args, out).await?;
    let _ = out.write_all(ran.stdout.as_bytes());
    if !ran.status.success() {
        return Err(UpgradeError::UpgradeFailed {
            status: helm::describe(&ran.status),
            stderr: ran.stderr,
            backup,
            recovery,
        });
    }
    let done = match backup {
        Some(_) => format!("upgraded\n{}\n{recovery}", backup_line(&backup)),
        None => "installed".to_string(),
    };
    say(
        out,
        format!(
            "release {} in namespace {} {done}",
            opts.release, opts.namespace
        ),
    );
    Ok(())
}

/// Writes `content` to a new file in `dir` named after `stem` and says where, as `label`; a
/// dry run only says where it would be. Returns the path either way.
fn keep(
    opts: &UpgradeOptions,
    dir: &Path,
    stem: &str,
    content: &[u8],
    label: &str,
    out: &mut (dyn Write + Send),
) -> Result<PathBuf, UpgradeError> {
    let (path, note) = if opts.dry_run {
        (values::next_free(dir, stem), " (not written: dry run)")
    } else {
        (values::create_new(dir, stem, content)?, "")
    };
    let _ = writeln!(out, "{label}: {}{note}", path.display());
    Ok(path)
}

/// The parsed `hints.yaml` when the preflight will run; `None` when it is skipped. Fails when
/// it cannot run, so that happens before anything else.
fn preflight_hints(bundle: &Bundle, opts: &UpgradeOptions) -> Result<Option<Hints>, UpgradeError> {
    if opts.skip_preflight {
        return Ok(None);
    }
    if opts.agents.is_empty() && opts.image_registry.is_none() {
        return Err(UpgradeError::PreflightCannotCheck {
            reason: "no --agent was given, nor an --image-registry whose registry it could check instead"
                .into(),
        });
    }
    let Some(text) = &bundle.hints else {
        return Err(UpgradeError::PreflightCannotCheck {
            reason: format!(
                "{} has no hints.yaml, so which images the chart pulls is unknown",
                bundle.path.display()
            ),
        });
    };
    let hints = Hints::parse(text)?;
    if hints.templates.is_empty() {
        return Err(UpgradeError::PreflightCannotCheck {
            reason: "hints.yaml lists no image templates".into(),
        });
    }
    Ok(Some(hints))
}

/// `global.imageRegistry` for the upgrade: the value lade sets, if it sets one, and a line
/// saying where it comes from. In order: `--image-registry`; a `--set` or `--values` that
/// sets it (`explicit` holds those alone); the one registry host the retag rules rename to.
/// Without any of them it is left alone, unless the values helm will use have it: then which
/// registry to set must be said.
fn image_registry(
    opts: &UpgradeOptions,
    chart: &Chart,
    user: &Value,
    explicit: &Value,
) -> Result<(Option<String>, String), UpgradeError> {
    const PATH: [&str; 2] = ["global", "imageRegistry"];
    let line = |value: &str, why: &str| format!("global.imageRegistry: {value} ({why})");
    if let Some(registry) = &opts.image_registry {
        let line = line(registry, "from --image-registry");
        return Ok((Some(registry.clone()), line));
    }
    if let Some(value) = values::get_path(explicit, &PATH) {
        let text = match value {
            Value::String(text) => text.clone(),
            other => values::to_yaml(other, "global.imageRegistry")?
                .trim_end()
                .to_string(),
        };
        return Ok((None, line(&text, "from --set or --values")));
    }
    let mut hosts: Vec<String> = opts
        .rules
        .iter()
        .map(|rule| {
            let to = rule.to();
            to.split('/').next().unwrap_or(&to).to_string()
        })
        .collect();
    hosts.sort();
    hosts.dedup();
    if let [host] = hosts.as_slice() {
        let line = line(host, "the one registry host the --retag rules rename to");
        return Ok((Some(host.clone()), line));
    }
    let tree = values::coalesce(&chart.defaults, user);
    if values::get_path(&tree, &PATH).is_none() {
        return Ok((
            None,
            "global.imageRegistry: not set (the chart's values do not have it and no registry was given)"
                .into(),
        ));
    }
    let why = if hosts.is_empty() {
        "no --retag rule was given".to_string()
    } else {
        format!("the --retag rules rename to {}", hosts.join(", "))
    };
    Err(UpgradeError::ImageRegistryRequired { why })
}

/// The directory the backup and values files go to: the bundle's, made absolute so the paths
/// printed for later (restoring a backup) do not depend on where lade ran.
fn bundle_dir(bundle: &Path) -> PathBuf {
    let dir = match bundle.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_source_parses_bundle_and_repo_charts() {
        assert_eq!(
            "bundle".parse::<ChartSource>().unwrap(),
            ChartSource::Bundle
        );
        assert_eq!(
            "daocloud/mspider".parse::<ChartSource>().unwrap(),
            ChartSource::Repo {
                repo: "daocloud".into(),
                chart: "mspider".into()
            }
        );
        for bad in ["mspider", "/mspider", "daocloud/", "a/b/c", ""] {
            let err = bad.parse::<ChartSource>().unwrap_err();
            assert!(err.to_string().contains("REPO/CHART"), "{bad}: {err}");
        }
    }

    #[test]
    fn exit_codes_group_errors_by_what_changed() {
        let bad = UpgradeError::BadChart { input: "x".into() };
        assert_eq!(bad.exit_code(), EXIT_BAD_INPUT);
        let preflight = UpgradeError::PreflightFailed {
            summary: "x".into(),
        };
        assert_eq!(preflight.exit_code(), EXIT_PREFLIGHT);
        let failed = UpgradeError::UpgradeFailed {
            status: "exit code 1".into(),
            stderr: "Error: UPGRADE FAILED: boom\n".into(),
            backup: Some("/b/demo.ns.values-backup.x.yaml".into()),
            recovery: "to return to revision 3: helm rollback demo 3 -n ns".into(),
        };
        assert_eq!(failed.exit_code(), EXIT_HELM);
        assert_eq!(
            failed.to_string(),
            "helm upgrade failed (exit code 1):\nError: UPGRADE FAILED: boom\n\
             values before the upgrade: /b/demo.ns.values-backup.x.yaml\n\
             to return to revision 3: helm rollback demo 3 -n ns"
        );
    }

    #[test]
    fn bundle_dir_is_absolute() {
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(bundle_dir(Path::new("b.tar")), cwd);
        assert_eq!(bundle_dir(Path::new("d/b.tar")), cwd.join("d"));
        assert_eq!(bundle_dir(Path::new("/x/b.tar")), PathBuf::from("/x"));
    }
}
