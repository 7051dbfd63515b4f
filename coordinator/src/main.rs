//! `lade` command line: parses arguments and wires the library's parts.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use lade::bundle::{Bundle, LayerLimits};
use lade::discover::{
    discover, pod_network_hint, DiscoverOptions, Discovery, DEFAULT_NAMESPACE, DEFAULT_SELECTOR,
};
use lade::load::{
    load, plan_names, summary_json, summary_table, Credentials, Dial, LoadOptions, RelayMode,
    Retry, RetryPolicy,
};
use lade::progress::{Bars, Lines, Progress};
use lade::push::registry::{Access, Tls};
use lade::push::{push, ChartRepo, PushOptions, Target, EXIT_INCOMPLETE};
use lade::reference::{check_rules, RetagRule};
use lade::select::PlatformChoice;
use lade::upgrade::helm::Helm;
use lade::upgrade::values::SetValue;
use lade::upgrade::{upgrade, ChartSource, UpgradeError, UpgradeOptions};
use lade_oci::Platform;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// Load an offline bundle's images onto every node of a cluster, then upgrade its helm release.
#[derive(Debug, Parser)]
#[command(name = "lade", version)]
struct Cli {
    /// Log format for diagnostics on stderr (level from RUST_LOG, default warn).
    #[arg(
        long,
        global = true,
        env = "LADE_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ProgressMode {
    /// Bars on a terminal, plain lines otherwise.
    Auto,
    Bars,
    Lines,
    None,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load every image of BUNDLE onto every agent's node, sending only what each lacks.
    Load(LoadArgs),
    /// Upgrade or install BUNDLE's helm release, once every node is proved to hold its images.
    Upgrade(UpgradeArgs),
    /// Push every image of BUNDLE, and its chart, into the registry the cluster pulls from.
    Push(PushArgs),
    /// Show what BUNDLE holds: images, sizes, shared layers, hints.
    Inspect {
        /// Bundle tar or bare images archive.
        bundle: PathBuf,
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("targets").args(["agents", "discover"]).required(true)))]
// The kubeconfig serves discovery and helm: it needs one of them.
#[command(group(ArgGroup::new("kube_users").args(["discover", "then_upgrade"]).multiple(true)))]
#[command(mut_group("KubeArgs", |g| g.requires("kube_users")))]
#[command(mut_group("UpgradeFlags", |g| g.requires("then_upgrade")))]
struct LoadArgs {
    /// Bundle tar (hints.yaml, original-chart/, images.tar) or a bare images archive.
    bundle: PathBuf,
    /// Agent address host:port; repeat for every node (or find them with --discover).
    #[arg(long = "agent", env = "LADE_AGENTS", value_delimiter = ',')]
    agents: Vec<String>,
    /// Rename rule FROM=TO over repository prefixes, e.g.
    /// release.daocloud.io/mspider=10.16.10.111/mspider; repeatable, longest FROM wins.
    #[arg(long = "retag", env = "LADE_RETAG", value_delimiter = ',')]
    retag: Vec<RetagRule>,
    /// Do not also keep the names the bundle gives (retagged names only).
    #[arg(long)]
    no_keep_original: bool,
    /// Move names a node already has for other content (say its CNI or kube-proxy image) to
    /// the bundle's images; without it such an image fails on that node and names nothing.
    /// The CRI pod sandbox (pause) image is never moved.
    #[arg(long, env = "LADE_ALLOW_OVERWRITE")]
    allow_overwrite: bool,
    /// Nodes loaded at the same time.
    #[arg(long, env = "LADE_PARALLEL", default_value_t = 8)]
    parallel: usize,
    /// How blobs reach the nodes: `chain` or `tree:K` send each missing blob once, to the
    /// first node, and the agents pass it on (over the pod network, port 7700); `off` sends
    /// every node its blobs from here; `auto` is tree:2 for two nodes or more.
    #[arg(long, env = "LADE_RELAY", default_value = "auto", value_parser = parse_relay)]
    relay: RelayMode,
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
const REGISTRY_HEADING: &str =
    "Registry of --image-registry, checked by the preflight when no --agent is given";
const DISCOVER_HEADING: &str = "Find the agents through the Kubernetes API (instead of --agent)";
const KUBE_HEADING: &str = "Cluster access (with --discover or --then-upgrade)";

#[derive(Debug, Args)]
struct UpgradeArgs {
    /// Bundle tar whose original-chart/ and hints.yaml are used.
    bundle: PathBuf,
    /// Helm release to upgrade, or to install if it does not exist.
    #[arg(long)]
    release: String,
    /// Namespace of the release (created if missing).
    #[arg(short, long)]
    namespace: String,
    /// Agent address host:port of every node the chart's pods may run on; the preflight asks
    /// each whether it holds every image.
    #[arg(long = "agent", env = "LADE_AGENTS", value_delimiter = ',')]
    agents: Vec<String>,
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

#[derive(Debug, Args)]
struct PushArgs {
    /// Bundle tar (images.tar, original-chart/) or a bare images archive.
    bundle: PathBuf,
    /// Registry and project, HOST[:PORT][/PROJECT]. Each image keeps its repository path under
    /// it: release.daocloud.io/mspider/api:v1 becomes HOST/PROJECT/mspider/api:v1, which a
    /// chart finds with global.imageRegistry=HOST/PROJECT.
    #[arg(long, env = "LADE_REGISTRY")]
    registry: Target,
    /// Rename rule FROM=TO applied to the repository paths first, as `lade load --retag`;
    /// repeatable, longest FROM wins.
    #[arg(long = "retag", env = "LADE_RETAG", value_delimiter = ',')]
    retag: Vec<RetagRule>,
    /// Where the chart goes: oci://HOST[:PORT]/PATH, or none. Default: next to the images,
    /// oci://HOST/PROJECT/CHART:VERSION.
    #[arg(long)]
    chart_repo: Option<ChartRepo>,
    #[command(flatten)]
    access: PushAccessArgs,
    /// Move tags that already point at another digest (they are refused otherwise).
    #[arg(long)]
    force: bool,
    /// Log in, check every tag and blob, and report what would be pushed; write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Blobs uploaded at the same time.
    #[arg(long, env = "LADE_PARALLEL", default_value_t = 4)]
    parallel: usize,
    /// Summary format on stdout.
    #[arg(short, long, value_enum, default_value = "text")]
    output: Output,
    /// Live progress on stderr.
    #[arg(long, value_enum, default_value = "auto")]
    progress: ProgressMode,
}

/// How `lade push` reaches and logs in to the registry.
#[derive(Debug, Args)]
struct PushAccessArgs {
    /// User to log in as; the password is read from stdin (--password-stdin). Default: the
    /// docker config's login for the registry host ($DOCKER_CONFIG or ~/.docker/config.json).
    #[arg(long, env = "LADE_REGISTRY_USERNAME", requires = "password_stdin")]
    username: Option<String>,
    /// Read the password of --username from stdin.
    #[arg(long, requires = "username")]
    password_stdin: bool,
    /// The registry has no certificate lade can verify: unverified HTTPS, or plain HTTP when
    /// it does not speak TLS.
    #[arg(long, conflicts_with = "ca_file")]
    insecure: bool,
    /// CA certificate (PEM) the registry's certificate is checked against, besides the
    /// system's.
    #[arg(long, env = "LADE_REGISTRY_CA_FILE")]
    ca_file: Option<PathBuf>,
}

/// The same as [`PushAccessArgs`], named for `lade upgrade`, where --ca-file and --insecure
/// alone would be read as the agents'.
#[derive(Debug, Args)]
struct UpgradeRegistryArgs {
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

/// The login for `host` (from --username and stdin, or the docker config) and TLS settings.
fn registry_access(
    host: &str,
    username: Option<&str>,
    insecure: bool,
    ca_file: Option<&PathBuf>,
) -> anyhow::Result<Access> {
    let login = lade::push::login::resolve(host, username, std::io::stdin())?;
    let tls = match (insecure, ca_file) {
        (true, _) => Tls::Insecure,
        (false, Some(ca)) => Tls::CaFile(ca.clone()),
        (false, None) => Tls::System,
    };
    Ok(Access { login, tls })
}

/// `--discover`: the agents are the lade chart's pods, found through the Kubernetes API;
/// shared by `load` and `upgrade`. Every flag of it conflicts with --agent itself: a conflict
/// waives clap's `requires` of the conflicting arg. No environment variables here, as for
/// [`UpgradeFlags`]: one set would make every `--agent` run ask for --discover.
#[derive(Debug, Args)]
struct DiscoverArgs {
    /// Find the agents through the Kubernetes API: the lade chart's pods, one per node,
    /// reached at their pod IPs. A node whose agent pod is not ready counts as failed.
    #[arg(long, conflicts_with = "agents")]
    discover: bool,
    /// Namespace of the agent pods (with --discover).
    #[arg(long, default_value = DEFAULT_NAMESPACE, requires = "discover", conflicts_with = "agents")]
    discover_namespace: String,
    /// Label selector of the agent pods (with --discover).
    #[arg(long, default_value = DEFAULT_SELECTOR, requires = "discover", conflicts_with = "agents")]
    selector: String,
    /// Only the agent of node NAME; repeatable. Fails when NAME has no agent pod (with
    /// --discover).
    #[arg(
        long = "node",
        value_name = "NAME",
        requires = "discover",
        conflicts_with = "agents"
    )]
    nodes: Vec<String>,
}

impl DiscoverArgs {
    /// Finds the agents when --discover was given, and says what was found on stderr.
    async fn run(&self, kube: &KubeArgs) -> anyhow::Result<Option<Discovery>> {
        if !self.discover {
            return Ok(None);
        }
        let discovery = discover(&DiscoverOptions {
            namespace: self.discover_namespace.clone(),
            selector: self.selector.clone(),
            kubeconfig: kube.kubeconfig.clone(),
            context: kube.kube_context.clone(),
            nodes: self.nodes.clone(),
        })
        .await?;
        eprint!(
            "{}",
            discovery.to_text(&self.discover_namespace, &self.selector)
        );
        Ok(Some(discovery))
    }
}

/// Which cluster: the kubeconfig helm and --discover use; shared by `load` and `upgrade`.
#[derive(Debug, Args)]
struct KubeArgs {
    /// Kubeconfig helm and --discover use (default: $KUBECONFIG or ~/.kube/config; without
    /// one, --discover inside a pod uses the pod's service account).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context helm and --discover use.
    #[arg(long)]
    kube_context: Option<String>,
}

/// How to reach agents and prove to them who is calling; shared by `load` and `upgrade`.
#[derive(Debug, Args)]
struct ConnectArgs {
    /// Give up connecting to an agent after this long.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// File holding the agents' bearer token (the chart's lade-auth Secret).
    #[arg(long, env = "LADE_AUTH_TOKEN_FILE")]
    auth_token_file: Option<PathBuf>,
    /// The bearer token itself. Prefer the environment variable or --auth-token-file: a
    /// command line is visible to every user of the machine.
    #[arg(
        long,
        env = "LADE_AUTH_TOKEN",
        hide_env_values = true,
        conflicts_with = "auth_token_file"
    )]
    auth_token: Option<String>,
    /// CA certificate (PEM) of the agents' TLS certificates; connect with TLS.
    #[arg(long, env = "LADE_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for agents that require mutual TLS.
    #[arg(long, env = "LADE_CLIENT_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "LADE_CLIENT_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Name the agents' certificates are checked against (default: the --agent host).
    #[arg(long, env = "LADE_TLS_SERVER_NAME", requires = "tls_ca")]
    tls_server_name: Option<String>,
    /// Send the bearer token over plain gRPC (no --tls-ca) to non-loopback agents too. Anyone
    /// who can read the traffic then holds root on every node: only where the network to the
    /// agents is trusted.
    #[arg(long, env = "LADE_INSECURE_PLAINTEXT", conflicts_with = "tls_ca")]
    insecure_plaintext: bool,
}

impl ConnectArgs {
    fn dial(&self) -> anyhow::Result<Dial> {
        let token = match (&self.auth_token_file, &self.auth_token) {
            (Some(path), _) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading the auth token from {}", path.display()))?,
            ),
            (None, token) => token.clone(),
        };
        let mut credentials = match token {
            Some(t) => Credentials::token(&t)?,
            None => Credentials::default(),
        };
        if let Some(ca) = &self.tls_ca {
            let read =
                |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
            if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            if let Some(name) = &self.tls_server_name {
                tls = tls.domain_name(name.clone());
            }
            credentials = credentials.with_tls(tls);
        }
        if self.insecure_plaintext {
            credentials = credentials.allow_plaintext();
        }
        Ok(Dial {
            timeout: self.connect_timeout,
            credentials,
        })
    }
}

/// How the release is upgraded; shared by `upgrade` and `load --then-upgrade`. No environment
/// variables here: one set would make every plain `lade load` ask for --then-upgrade.
#[derive(Debug, Args)]
struct UpgradeFlags {
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
struct Asked {
    agents: Vec<String>,
    parallel: usize,
    dial: Dial,
    /// Set when the agents were discovered: what to do when their pod IPs are out of reach.
    unreachable_hint: Option<String>,
    /// The agents were found with `--discover`.
    discovered: bool,
}

impl UpgradeFlags {
    /// The options of an upgrade of `release` in `namespace`, with helm on `kube`'s cluster.
    fn options(
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", explain(&e));
            ExitCode::from(2)
        }
    }
}

/// An error and its causes on one line, leaving out a cause whose text is already said (an
/// io error a message quotes would otherwise appear twice).
fn explain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Inspect { bundle, output } => {
            let bundle = Bundle::open(&bundle)?;
            let report = lade::inspect::inspect(&bundle);
            match output {
                Output::Text => print!("{}", report.to_text()),
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Load(args) => {
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(run_load(args))
        }
        Command::Upgrade(args) => {
            check_rules(&args.retag)?;
            let bundle = Bundle::open(&args.bundle)?;
            let dial = args.connect.dial()?;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            // A skipped preflight asks no agent: there is nothing to discover.
            let discovery = match args.upgrade.skip_preflight {
                true => None,
                false => runtime.block_on(args.discover.run(&args.kube))?,
            };
            let discovered = discovery.is_some();
            let (agents, unreachable_hint) = match discovery {
                None => (args.agents, None),
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
        Command::Push(args) => {
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(run_push(args))
        }
    }
}

async fn run_push(args: PushArgs) -> anyhow::Result<ExitCode> {
    check_rules(&args.retag)?;
    let path = args.bundle.clone();
    let bundle = Arc::new(tokio::task::spawn_blocking(move || Bundle::open(&path)).await??);
    let access = &args.access;
    let opts = PushOptions {
        access: registry_access(
            &args.registry.host,
            access.username.as_deref(),
            access.insecure,
            access.ca_file.as_ref(),
        )?,
        target: args.registry,
        rules: args.retag,
        chart_repo: args.chart_repo.unwrap_or(ChartRepo::WithImages),
        force: args.force,
        dry_run: args.dry_run,
        parallel: args.parallel,
    };
    let report = push(bundle, &opts, progress(args.progress)).await?;
    match args.output {
        Output::Text => print!("{}", report.to_text()),
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    Ok(match report.ok {
        true => ExitCode::SUCCESS,
        false => ExitCode::from(EXIT_INCOMPLETE),
    })
}

fn parse_platform(s: &str) -> Result<Platform, String> {
    s.parse()
}

/// Where live progress goes: bars on a terminal, lines otherwise, unless told.
fn progress(mode: ProgressMode) -> Arc<dyn Progress> {
    match mode {
        ProgressMode::Auto if std::io::stderr().is_terminal() => Arc::new(Bars::new()),
        ProgressMode::Bars => Arc::new(Bars::new()),
        ProgressMode::Auto | ProgressMode::Lines => Arc::new(Lines::default()),
        ProgressMode::None => Arc::new(Silent),
    }
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
async fn run_upgrade(
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

async fn run_load(args: LoadArgs) -> anyhow::Result<ExitCode> {
    check_rules(&args.retag)?;
    let path = args.bundle.clone();
    let bundle = tokio::task::spawn_blocking(move || Bundle::open(&path)).await??;
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
        let agents = match &discovery {
            Some(discovery) => discovery.addresses(),
            None => args.agents.clone(),
        };
        print!("{}", lade::load::plan_text(&bundle, &agents, args.relay));
        return Ok(ExitCode::SUCCESS);
    }
    let opts = LoadOptions {
        agents: match &discovery {
            Some(discovery) => discovery.addresses(),
            None => args.agents,
        },
        rules: args.retag,
        keep_original: !args.no_keep_original,
        parallel: args.parallel,
        dial,
        relay: args.relay,
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
    let (Some(release), Some(namespace)) = (args.release, args.namespace) else {
        return Ok(ExitCode::SUCCESS);
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
    Ok(match args.output {
        Output::Text => {
            println!();
            run_upgrade(&bundle, &upgrade, &mut std::io::stdout()).await
        }
        Output::Json => run_upgrade(&bundle, &upgrade, &mut std::io::stderr()).await,
    })
}

fn parse_relay(s: &str) -> Result<RelayMode, String> {
    s.parse()
}

struct Silent;

impl Progress for Silent {
    fn node_started(&self, _: &str) {}
    fn node_identified(&self, _: &str, _: &str) {}
    fn sending(&self, _: &str, _: u64, _: u64) {}
    fn sent(&self, _: &str, _: u64) {}
    fn phase(&self, _: &str, _: &str) {}
    fn node_finished(&self, _: &lade::load::NodeReport) {}
}
