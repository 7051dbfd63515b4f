//! The flags the commands that talk to agents share: which agents (`--agent`, or found
//! through the Kubernetes API with `--discover`), how to reach them and prove who is calling,
//! and which cluster; [`AskArgs`] bundles them for the commands that only ask nodes
//! (`status`, `prune`, `unload`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use lade::discover::{discover, DiscoverOptions, Discovery, DEFAULT_NAMESPACE, DEFAULT_SELECTOR};
use lade::load::{Credentials, Dial};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// `--agent`: the agents, by address; every command that talks to agents takes it.
#[derive(Debug, Args)]
pub(crate) struct AgentArgs {
    /// Agent address host:port of a node; repeat for every node (or find them with
    /// --discover).
    #[arg(long = "agent", env = "LADE_AGENTS", value_delimiter = ',')]
    pub(super) agents: Vec<String>,
}

impl AgentArgs {
    /// The agents: those discovered, else those given.
    pub(super) fn addresses(&self, discovery: Option<&Discovery>) -> Vec<String> {
        match discovery {
            Some(d) => d.addresses(),
            None => self.agents.clone(),
        }
    }
}

/// Which nodes to ask and how: shared by `status`, `prune` and `unload`.
#[derive(Debug, Args)]
pub(crate) struct AskArgs {
    #[command(flatten)]
    agents: AgentArgs,
    /// Agents asked at the same time.
    #[arg(long, env = "LADE_PARALLEL", default_value_t = 8)]
    pub(super) parallel: usize,
    #[command(flatten)]
    connect: ConnectArgs,
    #[command(flatten)]
    discover: DiscoverArgs,
    #[command(flatten)]
    kube: KubeArgs,
}

/// The nodes [`AskArgs`] name, found.
pub(crate) struct Asking {
    pub(super) agents: Vec<String>,
    pub(super) dial: Dial,
    /// The agents were found with --discover.
    pub(super) discovered: bool,
}

impl AskArgs {
    /// The agents to ask (discovered with --discover, saying so on stderr) and how to dial
    /// them; fails when there is none.
    pub(super) async fn resolve(&self) -> anyhow::Result<Asking> {
        let dial = self.connect.dial()?;
        let discovery = self.discover.run(&self.kube).await?;
        let agents = self.agents.addresses(discovery.as_ref());
        anyhow::ensure!(
            !agents.is_empty(),
            "no agent to ask: pass --agent or --discover"
        );
        Ok(Asking {
            agents,
            dial,
            discovered: discovery.is_some(),
        })
    }
}

/// `--discover`: the agents are the lade chart's pods, found through the Kubernetes API;
/// shared by `load` and `upgrade`. Every flag of it conflicts with --agent itself: a conflict
/// waives clap's `requires` of the conflicting arg. No environment variables here, as for
/// [`UpgradeFlags`]: one set would make every `--agent` run ask for --discover.
#[derive(Debug, Args)]
pub(crate) struct DiscoverArgs {
    /// Find the agents through the Kubernetes API: the lade chart's pods, one per node,
    /// reached at their pod IPs. A node whose agent pod is not ready counts as failed.
    #[arg(long, conflicts_with = "agents")]
    discover: bool,
    /// Namespace of the agent pods (with --discover).
    #[arg(long, default_value = DEFAULT_NAMESPACE, requires = "discover", conflicts_with = "agents")]
    pub(super) discover_namespace: String,
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
    pub(super) async fn run(&self, kube: &KubeArgs) -> anyhow::Result<Option<Discovery>> {
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
pub(crate) struct KubeArgs {
    /// Kubeconfig helm and --discover use (default: $KUBECONFIG or ~/.kube/config; without
    /// one, --discover inside a pod uses the pod's service account).
    #[arg(long)]
    pub(super) kubeconfig: Option<PathBuf>,
    /// Kubeconfig context helm and --discover use.
    #[arg(long)]
    pub(super) kube_context: Option<String>,
}

/// How to reach agents and prove to them who is calling; shared by `load` and `upgrade`.
#[derive(Debug, Args)]
pub(crate) struct ConnectArgs {
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
    pub(super) fn dial(&self) -> anyhow::Result<Dial> {
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
