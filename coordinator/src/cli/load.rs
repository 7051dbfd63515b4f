//! `lade load`: its arguments, and a load (then, with --then-upgrade, an upgrade).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{ArgGroup, Args};
use lade::bundle::identity::valid_id;
use lade::bundle::{Bundle, Identity, IdentitySource, LayerLimits};
use lade::discover::pod_network_hint;
use lade::load::{
    all_recorded, load, plan_names, summary_json, summary_table, LoadOptions, RelayMode, Retry,
    RetryPolicy,
};
use lade::push::registry::Access;
use lade::reference::{check_rules, RetagRule};
use lade::select::PlatformChoice;
use lade_oci::Platform;

use super::connect::{AgentArgs, ConnectArgs, DiscoverArgs, KubeArgs};
use super::upgrade::{run_upgrade, Asked, UpgradeFlags};
use super::{progress, Output, ProgressMode};

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("targets").args(["agents", "discover"]).required(true)))]
// The kubeconfig serves discovery and helm: it needs one of them.
#[command(group(ArgGroup::new("kube_users").args(["discover", "then_upgrade"]).multiple(true)))]
#[command(mut_group("KubeArgs", |g| g.requires("kube_users")))]
#[command(mut_group("UpgradeFlags", |g| g.requires("then_upgrade")))]
pub(crate) struct LoadArgs {
    /// Bundle tar (hints.yaml, original-chart/, images.tar) or a bare images archive.
    bundle: PathBuf,
    #[command(flatten)]
    agents: AgentArgs,
    /// Rename rule FROM=TO over repository prefixes, e.g.
    /// release.daocloud.io/mspider=10.16.10.111/mspider; repeatable, longest FROM wins.
    #[arg(long = "retag", env = "LADE_RETAG", value_delimiter = ',')]
    retag: Vec<RetagRule>,
    /// Do not also keep the names the bundle gives (retagged names only).
    #[arg(long)]
    no_keep_original: bool,
    /// Bundle name the nodes record this load under, instead of its chart's (or its file
    /// name's); see `lade inspect`.
    #[arg(long)]
    bundle_name: Option<String>,
    /// Bundle version the nodes record this load under, instead of its chart's (or its file
    /// name's).
    #[arg(long)]
    bundle_version: Option<String>,
    /// Move names a node already has for other content (say its CNI or kube-proxy image) to
    /// the bundle's images; without it such an image fails on that node and names nothing.
    /// The CRI pod sandbox (pause) image is never moved.
    #[arg(long, env = "LADE_ALLOW_OVERWRITE")]
    allow_overwrite: bool,
    /// Nodes loaded at the same time.
    #[arg(long, env = "LADE_PARALLEL", default_value_t = 8)]
    parallel: usize,
    /// How blobs reach the nodes: `chain` or `tree:K` send each missing blob from here once,
    /// to one node, and the other nodes fetch it from peers that hold it, each at its own
    /// pace (over the pod network, port 7700), each node serving up to K peers at a time
    /// (chain: 1); `off` sends every node its blobs from here; `auto` is tree:2 for two nodes
    /// or more.
    #[arg(long, env = "LADE_RELAY", default_value = "auto", value_parser = parse_relay)]
    relay: RelayMode,
    /// With relay: a transfer to a node that moves no byte for this long is cut off; the
    /// node is tried again from another source, or named as failed if it no longer answers.
    #[arg(long, env = "LADE_STALL_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    stall_timeout: Duration,
    /// Print the nodes and the relay topology the load would use, then exit without
    /// contacting any agent.
    #[arg(long)]
    plan: bool,
    #[command(flatten)]
    connect: ConnectArgs,
    /// Further attempts for a node that is down or drops the connection (waiting 1 s, then
    /// doubling); a bad bundle or a refused credential is never retried.
    #[arg(long, env = "LADE_RETRIES", default_value_t = 2)]
    retries: u32,
    /// Give up on a node whose attempt takes longer than this (e.g. 30m); no limit by default.
    #[arg(long, env = "LADE_NODE_TIMEOUT", value_parser = humantime::parse_duration)]
    node_timeout: Option<Duration>,
    /// Most bytes a layer may unpack to, as a multiple of its stored size (at least 256 MiB
    /// per layer); a layer past it is refused as a decompression bomb before a node keeps it.
    #[arg(long, env = "LADE_MAX_LAYER_RATIO", default_value_t = LayerLimits::default().max_ratio)]
    max_layer_ratio: u64,
    /// Send layers without decompressing them here first. The check runs here only for
    /// nodes that do not check layers themselves (Docker nodes, agents with `--unpack
    /// containerd`); without it containerd or dockerd still checks the diffID and the node's
    /// disk bounds a bomb.
    #[arg(long)]
    no_layer_check: bool,
    /// Send even to a node whose free space (as its agent measures it) looks too small for
    /// the blobs it lacks and their unpacked layers.
    #[arg(long)]
    no_space_check: bool,
    /// Load this platform of multi-platform images on every node (os/arch[/variant], e.g.
    /// linux/arm64) instead of each node's own, as its agent reports it.
    #[arg(long, value_parser = parse_platform, conflicts_with = "all_platforms")]
    platform: Option<Platform>,
    /// Load every platform a multi-platform image's archive carries; names point at the
    /// image's index, and each node unpacks its own platform. Docker nodes keep their own.
    #[arg(long)]
    all_platforms: bool,
    /// Summary format on stdout.
    #[arg(short, long, value_enum, default_value = "text")]
    output: Output,
    /// Live progress on stderr.
    #[arg(long, value_enum, default_value = "auto")]
    progress: ProgressMode,
    /// After every node loaded every image, run `lade upgrade` on the release (needs
    /// --release and --namespace); nothing is upgraded when a node failed.
    #[arg(long, requires_all = ["release", "namespace"], help_heading = UPGRADE_HEADING)]
    then_upgrade: bool,
    /// Helm release to upgrade (with --then-upgrade).
    #[arg(long, requires = "then_upgrade", help_heading = UPGRADE_HEADING)]
    release: Option<String>,
    /// Namespace of the release (with --then-upgrade).
    #[arg(short, long, requires = "then_upgrade", help_heading = UPGRADE_HEADING)]
    namespace: Option<String>,
    #[command(flatten, next_help_heading = UPGRADE_HEADING)]
    upgrade: UpgradeFlags,
    #[command(flatten, next_help_heading = DISCOVER_HEADING)]
    discover: DiscoverArgs,
    #[command(flatten, next_help_heading = KUBE_HEADING)]
    kube: KubeArgs,
}

const UPGRADE_HEADING: &str = "Upgrade after loading (with --then-upgrade)";
const DISCOVER_HEADING: &str = "Find the agents through the Kubernetes API (instead of --agent)";
const KUBE_HEADING: &str = "Cluster access (with --discover or --then-upgrade)";

/// Loads the bundle onto every agent's node, then upgrades the release with --then-upgrade.
pub(super) async fn run(mut args: LoadArgs) -> anyhow::Result<ExitCode> {
    check_rules(&args.retag)?;
    let path = args.bundle.clone();
    let mut bundle = tokio::task::spawn_blocking(move || Bundle::open(&path)).await??;
    bundle.identity = identity(
        bundle.identity.take(),
        args.bundle_name.take(),
        args.bundle_version.take(),
    )?;
    let plan = plan_names(
        &bundle,
        &args.retag,
        !args.no_keep_original,
        args.allow_overwrite,
    )?;
    let progress = progress(args.progress);
    let dial = args.connect.dial()?;
    let images = plan.len();
    let discovery = args.discover.run(&args.kube).await?;
    if args.plan {
        let agents = args.agents.addresses(discovery.as_ref());
        print!("{}", lade::load::plan_text(&bundle, &agents, args.relay));
        return Ok(ExitCode::SUCCESS);
    }
    let opts = LoadOptions {
        agents: args.agents.addresses(discovery.as_ref()),
        rules: args.retag,
        keep_original: !args.no_keep_original,
        parallel: args.parallel,
        dial,
        relay: args.relay,
        stall_timeout: args.stall_timeout,
        retry: RetryPolicy {
            retries: args.retries,
            backoff: Duration::from_secs(1),
            node_timeout: args.node_timeout,
        },
        layer_check: (!args.no_layer_check).then_some(LayerLimits {
            max_ratio: args.max_layer_ratio,
            ..LayerLimits::default()
        }),
        space_check: !args.no_space_check,
        platforms: match (args.platform, args.all_platforms) {
            (_, true) => PlatformChoice::All,
            (Some(p), false) => PlatformChoice::Fixed(p),
            (None, false) => PlatformChoice::Node,
        },
    };
    for image in bundle
        .images
        .iter()
        .filter(|i| !i.skipped_platforms.is_empty())
    {
        eprintln!(
            "note: {}: its index lists {}, which the archive does not carry; only {} can be loaded",
            image.label(),
            image.skipped_platforms.join(", "),
            image
                .platforms
                .iter()
                .map(|v| v.platform.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if bundle.identity.is_none() {
        eprintln!(
            "note: the nodes keep no record of this load (lade status, prune and unload will \
             not see it): the bundle has no original-chart/Chart.yaml and its file is not named \
             NAME_VERSION.tar; pass --bundle-name and --bundle-version"
        );
    }
    let bundle = Arc::new(bundle);
    let mut reports = load(bundle.clone(), Arc::new(plan), &opts, progress).await;
    let (retry, unreachable) = match &discovery {
        Some(discovery) => (Retry::ByNode, discovery.complete(&mut reports, images)),
        None => (Retry::ByAgent, false),
    };
    match args.output {
        Output::Text => print!("{}", summary_table(&reports, retry)),
        Output::Json => println!("{}", summary_json(&reports)?),
    }
    let hint = discovery
        .is_some()
        .then(|| pod_network_hint(&args.discover.discover_namespace));
    if let (Some(hint), true) = (&hint, unreachable) {
        eprintln!("\n{hint}");
    }
    if !reports.iter().all(|r| r.ok) {
        if args.then_upgrade {
            eprintln!("upgrade not started: not every node holds every image");
        }
        return Ok(ExitCode::FAILURE);
    }
    // The images are there, which is what an upgrade needs; a missing record still fails the
    // run once the upgrade is done.
    let recorded = all_recorded(&reports);
    let (Some(release), Some(namespace)) = (args.release, args.namespace) else {
        return Ok(if recorded {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    };
    let asked = Asked {
        agents: opts.agents,
        parallel: opts.parallel,
        dial: opts.dial,
        unreachable_hint: hint,
        discovered: discovery.is_some(),
    };
    // The nodes were just loaded: the preflight asks their agents, never a registry.
    let upgrade = args.upgrade.options(
        release,
        namespace,
        opts.rules,
        asked,
        args.kube,
        Access::default(),
    );
    // The JSON summary owns stdout; the upgrade's report then goes to stderr.
    let upgraded = match args.output {
        Output::Text => {
            println!();
            run_upgrade(&bundle, &upgrade, &mut std::io::stdout()).await
        }
        Output::Json => run_upgrade(&bundle, &upgrade, &mut std::io::stderr()).await,
    };
    if !recorded {
        eprintln!("the load's record is missing on some nodes (see the summary)");
        return Ok(ExitCode::FAILURE);
    }
    Ok(upgraded)
}

/// The bundle's identity with the --bundle-name/--bundle-version overrides: each replaces
/// its part; a bundle without one needs both.
fn identity(
    found: Option<Identity>,
    name: Option<String>,
    version: Option<String>,
) -> anyhow::Result<Option<Identity>> {
    for value in name.iter().chain(&version) {
        anyhow::ensure!(
            valid_id(value),
            "bundle name or version {value:?}: 1-128 printable characters, no spaces or @"
        );
    }
    Ok(match (found, name, version) {
        (found, None, None) => found,
        (Some(found), name, version) => Some(Identity {
            name: name.unwrap_or(found.name),
            version: version.unwrap_or(found.version),
            from: IdentitySource::Flags,
        }),
        (None, Some(name), Some(version)) => Some(Identity {
            name,
            version,
            from: IdentitySource::Flags,
        }),
        (None, _, _) => anyhow::bail!(
            "the bundle has no name and version of its own: pass both --bundle-name and \
             --bundle-version"
        ),
    })
}

fn parse_platform(s: &str) -> Result<Platform, String> {
    s.parse()
}

fn parse_relay(s: &str) -> Result<RelayMode, String> {
    s.parse()
}
