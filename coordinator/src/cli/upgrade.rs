//! `lade upgrade`: its arguments, the upgrade flags `load --then-upgrade` shares, and an
//! upgrade run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use lade::bundle::Bundle;
use lade::discover::{pod_network_hint, Discovery};
use lade::load::Dial;
use lade::push::registry::Access;
use lade::reference::{check_rules, RetagRule};
use lade::upgrade::helm::Helm;
use lade::upgrade::values::SetValue;
use lade::upgrade::{upgrade, ChartSource, UpgradeError, UpgradeOptions};

use super::connect::{AgentArgs, ConnectArgs, DiscoverArgs, KubeArgs};
use super::push::registry_access;

const REGISTRY_HEADING: &str =
    "Registry of --image-registry, checked by the preflight when no --agent is given";

#[derive(Debug, Args)]
pub(crate) struct UpgradeArgs {
    /// Bundle tar whose original-chart/ and hints.yaml are used.
    bundle: PathBuf,
    /// Helm release to upgrade, or to install if it does not exist.
    #[arg(long)]
    release: String,
    /// Namespace of the release (created if missing).
    #[arg(short, long)]
    namespace: String,
    // Every node the chart's pods may run on: the preflight asks each agent whether it holds
    // every image.
    #[command(flatten)]
    agents: AgentArgs,
    /// The --retag rules the images were loaded with; when they all rename to one registry
    /// host, that host is the default --image-registry.
    #[arg(long = "retag", env = "LADE_RETAG", value_delimiter = ',')]
    retag: Vec<RetagRule>,
    /// Agents asked at the same time.
    #[arg(long, env = "LADE_PARALLEL", default_value_t = 8)]
    parallel: usize,
    #[command(flatten)]
    connect: ConnectArgs,
    #[command(flatten)]
    discover: DiscoverArgs,
    #[command(flatten)]
    upgrade: UpgradeFlags,
    #[command(flatten)]
    kube: KubeArgs,
    #[command(flatten, next_help_heading = REGISTRY_HEADING)]
    registry: UpgradeRegistryArgs,
}

/// The same as [`PushAccessArgs`], named for `lade upgrade`, where --ca-file and --insecure
/// alone would be read as the agents'.
#[derive(Debug, Args)]
pub(crate) struct UpgradeRegistryArgs {
    /// User to log in to the registry as; the password is read from stdin. Default: the
    /// docker config's login for the registry host.
    #[arg(long, requires_all = ["registry_password_stdin", "image_registry"])]
    registry_username: Option<String>,
    /// Read the password of --registry-username from stdin.
    #[arg(long, requires = "registry_username")]
    registry_password_stdin: bool,
    /// The registry has no certificate lade can verify: unverified HTTPS, or plain HTTP.
    #[arg(long, conflicts_with = "registry_ca_file", requires = "image_registry")]
    registry_insecure: bool,
    /// CA certificate (PEM) of the registry's certificate.
    #[arg(long, requires = "image_registry")]
    registry_ca_file: Option<PathBuf>,
}

/// How the release is upgraded; shared by `upgrade` and `load --then-upgrade`. No environment
/// variables here: one set would make every plain `lade load` ask for --then-upgrade.
#[derive(Debug, Args)]
pub(crate) struct UpgradeFlags {
    /// Value of global.imageRegistry, the registry the images were tagged for. Default: the
    /// one registry host the --retag rules rename to; required when there is none and the
    /// chart's values have global.imageRegistry.
    #[arg(long)]
    image_registry: Option<String>,
    /// Chart to install: "bundle" (the bundle's original-chart/, offline) or REPO/CHART from a
    /// helm repository.
    #[arg(long, default_value = "bundle")]
    chart: ChartSource,
    /// URL for `helm repo add REPO URL`, run only when helm does not know REPO.
    #[arg(long)]
    repo_url: Option<String>,
    /// Chart version (REPO/CHART: default the newest release; bundle: must match the chart).
    #[arg(long)]
    version: Option<String>,
    /// Values file merged over the release's current values; repeatable, later wins.
    #[arg(short = 'f', long = "values")]
    values: Vec<PathBuf>,
    /// Value KEY.PATH=VALUE set after the --values files; repeatable (no list syntax).
    #[arg(long = "set")]
    set: Vec<SetValue>,
    /// Upgrade without proving that every node holds every image the chart will pull.
    #[arg(long)]
    skip_preflight: bool,
    /// Print the helm upgrade command, the backup path and the preflight table instead of
    /// upgrading; only helm's read-only steps run.
    #[arg(long)]
    dry_run: bool,
    /// helm binary.
    #[arg(long, default_value = "helm")]
    helm: PathBuf,
}

/// The agents an upgrade's preflight asks, and how.
pub(super) struct Asked {
    pub(super) agents: Vec<String>,
    pub(super) parallel: usize,
    pub(super) dial: Dial,
    /// Set when the agents were discovered: what to do when their pod IPs are out of reach.
    pub(super) unreachable_hint: Option<String>,
    /// The agents were found with `--discover`.
    pub(super) discovered: bool,
}

impl UpgradeFlags {
    /// The options of an upgrade of `release` in `namespace`, with helm on `kube`'s cluster.
    pub(super) fn options(
        self,
        release: String,
        namespace: String,
        rules: Vec<RetagRule>,
        asked: Asked,
        kube: KubeArgs,
        registry: Access,
    ) -> UpgradeOptions {
        UpgradeOptions {
            release,
            namespace,
            chart: self.chart,
            repo_url: self.repo_url,
            version: self.version,
            values_files: self.values,
            set: self.set,
            image_registry: self.image_registry,
            rules,
            agents: asked.agents,
            discovered: asked.discovered,
            dial: asked.dial,
            parallel: asked.parallel,
            unreachable_hint: asked.unreachable_hint,
            registry,
            skip_preflight: self.skip_preflight,
            dry_run: self.dry_run,
            helm: Helm {
                program: self.helm,
                kubeconfig: kube.kubeconfig,
                kube_context: kube.kube_context,
            },
        }
    }
}

/// Finds the agents to ask (or the registry), then upgrades; an upgrade error is printed here.
pub(super) fn run(args: UpgradeArgs) -> anyhow::Result<ExitCode> {
    check_rules(&args.retag)?;
    let bundle = Bundle::open(&args.bundle)?;
    let dial = args.connect.dial()?;
    let runtime = super::runtime()?;
    // A skipped preflight asks no agent: there is nothing to discover.
    let discovery = match args.upgrade.skip_preflight {
        true => None,
        false => runtime.block_on(args.discover.run(&args.kube))?,
    };
    let discovered = discovery.is_some();
    let (agents, unreachable_hint) = match discovery {
        None => (args.agents.agents, None),
        Some(discovery) => {
            if let Some(reason) = unready_nodes(&discovery) {
                let e = UpgradeError::PreflightCannotCheck { reason };
                eprintln!("error: {e}");
                return Ok(ExitCode::from(e.exit_code()));
            }
            let hint = pod_network_hint(&args.discover.discover_namespace);
            (discovery.addresses(), Some(hint))
        }
    };
    let asked = Asked {
        agents,
        parallel: args.parallel,
        dial,
        unreachable_hint,
        discovered,
    };
    // Without agents, the preflight checks the registry of --image-registry: only
    // then is its login looked up (a docker config it needs no entry of cannot fail
    // an upgrade checked on the nodes).
    let access = match &args.upgrade.image_registry {
        Some(image_registry) if asked.agents.is_empty() && !args.upgrade.skip_preflight => {
            let host = image_registry.split('/').next().unwrap_or(image_registry);
            let registry = &args.registry;
            registry_access(
                host,
                registry.registry_username.as_deref(),
                registry.registry_insecure,
                registry.registry_ca_file.as_ref(),
            )?
        }
        _ => Access::default(),
    };
    let opts = args.upgrade.options(
        args.release,
        args.namespace,
        args.retag,
        asked,
        args.kube,
        access,
    );
    Ok(runtime.block_on(run_upgrade(&bundle, &opts, &mut std::io::stdout())))
}

/// Why the preflight cannot check every discovered node, if some agent pod is not ready.
fn unready_nodes(discovery: &Discovery) -> Option<String> {
    if discovery.unready.is_empty() {
        return None;
    }
    let nodes: Vec<String> = discovery
        .unready
        .iter()
        .map(|u| format!("node {}: agent pod {} is {}", u.node, u.pod, u.reason))
        .collect();
    Some(nodes.join("; "))
}

/// Runs an upgrade; its error, if any, is printed here, since it picks the exit code.
pub(super) async fn run_upgrade(
    bundle: &Bundle,
    opts: &UpgradeOptions,
    out: &mut (dyn std::io::Write + Send),
) -> ExitCode {
    match upgrade(bundle, opts, out).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
