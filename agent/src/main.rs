//! `lade-agent` binary: parses configuration, builds the runtime, serves until SIGTERM.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgAction, Parser, ValueEnum};
use lade_agent::auth::Auth;
use lade_agent::keep::KeepConfig;
use lade_agent::relay::Peers;
use lade_agent::runtime::containerd::{Containerd, ContainerdConfig, ImageStore, UnpackMode};
use lade_agent::runtime::docker::{Docker, DockerConfig};
use lade_agent::runtime::{node_platform, Runtime};
use lade_agent::server::Serve;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::choose::{cri_runtime, detect, docker_runtime, Chosen, RuntimeKind};

mod choose;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum RuntimeChoice {
    Containerd,
    Docker,
    /// containerd if it answers with its CRI plugin enabled, else Docker if it answers.
    Auto,
}

/// Per-node agent of lade: writes verified image blobs into the node's container runtime.
#[derive(Debug, Parser)]
#[command(name = "lade-agent", version)]
struct Config {
    /// Address to serve gRPC on.
    #[arg(long, env = "LADE_LISTEN", default_value = "0.0.0.0:7700")]
    listen: SocketAddr,
    /// Address of the plain-HTTP side port: /metrics, /healthz, /readyz.
    #[arg(long, env = "LADE_METRICS_LISTEN", default_value = "0.0.0.0:7701")]
    metrics_listen: SocketAddr,
    /// File holding the bearer token every call must present (the chart mounts it from a
    /// Secret). Required unless --insecure-no-auth or client certificates (--tls-client-ca).
    #[arg(long, env = "LADE_AUTH_TOKEN_FILE")]
    auth_token_file: Option<PathBuf>,
    /// Accept calls without any credential. Anyone who reaches the port can then write to
    /// this node's container runtime: for disposable labs only.
    #[arg(long, env = "LADE_INSECURE_NO_AUTH")]
    insecure_no_auth: bool,
    /// Serve TLS with this certificate (PEM); needs --tls-key.
    #[arg(long, env = "LADE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, env = "LADE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS. Needs --tls-cert.
    #[arg(long, env = "LADE_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// CA (PEM) that signed the other agents' server certificates, checked when this agent
    /// relays blobs to them over TLS. Default: --tls-client-ca (one CA for the cluster's
    /// agents). The agent presents --tls-cert as its client certificate to them.
    #[arg(long, env = "LADE_PEER_TLS_CA", requires = "tls_cert")]
    peer_tls_ca: Option<PathBuf>,
    /// Name the other agents' certificates are checked against when relaying (default: the
    /// host of the address the coordinator gives, usually a pod IP).
    #[arg(long, env = "LADE_PEER_TLS_SERVER_NAME", requires = "tls_cert")]
    peer_tls_server_name: Option<String>,
    /// Networks (CIDR, comma-separated or repeated) of the other agents, usually the cluster's
    /// pod network: without TLS this agent relays blobs (and presents its token) only to IP
    /// addresses in them (none by default); other relay targets are refused and the
    /// coordinator sends to them directly. With TLS the peer CA vouches for every target.
    #[arg(long, env = "LADE_PEER_CIDR", value_delimiter = ',')]
    peer_cidr: Vec<ipnet::IpNet>,
    /// Container runtime to load into.
    #[arg(long, env = "LADE_RUNTIME", value_enum, default_value = "containerd")]
    runtime: RuntimeChoice,
    /// containerd's gRPC socket.
    #[arg(
        long,
        env = "LADE_CONTAINERD_SOCKET",
        default_value = "/run/containerd/containerd.sock"
    )]
    containerd_socket: PathBuf,
    /// containerd namespace to load into; kubelet's CRI uses k8s.io.
    #[arg(long, env = "LADE_NAMESPACE", default_value = "k8s.io")]
    namespace: String,
    /// Snapshotter to unpack into; must be the one the CRI plugin keeps images in. `auto`:
    /// ask CRI (its image filesystem), overlayfs if it does not say. Docker's containerd
    /// store uses dockerd's, whatever this says.
    #[arg(long, env = "LADE_SNAPSHOTTER", default_value = "auto")]
    snapshotter: String,
    /// Do not put the CRI pin label on loaded images (containerd 1.7.3+): kubelet's image
    /// garbage collection may then delete them under disk pressure.
    #[arg(long, env = "LADE_NO_PIN_IMAGES")]
    no_pin_images: bool,
    /// Who writes layers into containerd's snapshots. `agent`: this agent, in one pass
    /// (decompress, hash, write the files), as containerd's own applier would; it needs root
    /// and containerd's root directory mounted read-write at the same path. `containerd`:
    /// containerd's Diff service (slower). `auto`: the agent where it can, else containerd.
    #[arg(long, env = "LADE_UNPACK", value_enum, default_value = "auto")]
    unpack: UnpackMode,
    /// A layer that unpacks to more than this many times its stored size (and more than
    /// 256 MiB) is refused as a decompression bomb when the agent unpacks it.
    #[arg(long, env = "LADE_MAX_LAYER_RATIO", default_value_t = 100)]
    max_layer_ratio: u64,
    /// The CRI pod sandbox (pause) image, whose name lade never moves to other content, not
    /// even with `lade load --allow-overwrite`. Default: the `sandbox_image` containerd 1.x's
    /// CRI status reports; containerd 2.x does not report its `pinned_images.sandbox`, so its
    /// built-in default registry.k8s.io/pause:3.10 is assumed: set this where it differs.
    #[arg(long, env = "LADE_SANDBOX_IMAGE")]
    sandbox_image: Option<String>,
    /// dockerd's API socket.
    #[arg(
        long,
        env = "LADE_DOCKER_SOCKET",
        default_value = "/var/run/docker.sock"
    )]
    docker_socket: PathBuf,
    /// Directory where blobs wait for Docker to load them (keep it across agent restarts).
    #[arg(
        long,
        env = "LADE_DOCKER_CACHE_DIR",
        default_value = "/var/lib/lade/docker-cache"
    )]
    docker_cache_dir: PathBuf,
    /// Delete cached layer blobs once Docker holds them (`false` keeps them).
    #[arg(long, env = "LADE_DOCKER_CLEAN_CACHE", default_value_t = true, action = ArgAction::Set)]
    docker_clean_cache: bool,
    /// Node name reported to the coordinator (the DaemonSet sets it from spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Platform reported to the coordinator, which picks each multi-platform image's manifest
    /// by it (os/arch[/variant]). Default: the platform the agent runs on. Set it only where
    /// the runtime runs another platform's images (an emulating node) or to simulate one.
    #[arg(long, env = "LADE_PLATFORM", value_parser = parse_platform)]
    platform: Option<String>,
    /// How long an unfinished load's uploads are kept (containerd's lease; Docker's cache).
    #[arg(long, env = "LADE_LEASE_TTL", default_value = "6h", value_parser = humantime::parse_duration)]
    lease_ttl: Duration,
    /// Drop an upload that sends nothing for this long (a stalled or hostile caller), so it
    /// holds no upload slot or memory.
    #[arg(long, env = "LADE_UPLOAD_STALL_TIMEOUT", default_value = "2m", value_parser = humantime::parse_duration)]
    upload_stall_timeout: Duration,
    /// How often the agent checks that every bundle version it holds is still present
    /// (names, pins, snapshots, content) and puts back what is missing, fetching content
    /// from peer agents. `0` turns the loop off (a Keep call still runs a pass). The agent
    /// also checks at once when the runtime restarts or a held image is removed.
    #[arg(long, env = "LADE_KEEP_INTERVAL", default_value = "5m", value_parser = humantime::parse_duration)]
    keep_interval: Duration,
    /// Other agents (`host:port`, comma-separated or repeated) the keep-present loop fetches
    /// missing content from, besides the agents each held version's load names.
    #[arg(long, env = "LADE_PEERS", value_delimiter = ',')]
    peers: Vec<String>,
    /// `name:port` whose DNS A/AAAA records are the other agents (the chart's headless
    /// Service), resolved each time the keep-present loop needs a peer. Without TLS their
    /// addresses must be in --peer-cidr.
    #[arg(long, env = "LADE_PEERS_DNS")]
    peers_dns: Option<String>,
    /// Log format.
    #[arg(long, env = "LADE_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

fn parse_platform(s: &str) -> Result<String, String> {
    // os/arch[/variant]: unlike the coordinator's --platform, a bare arch is not taken. The
    // platform is reported as written; the index entry for it is found normalised.
    match s.parse::<lade_oci::Platform>() {
        Ok(_) if s.contains('/') => Ok(s.to_string()),
        _ => Err(format!(
            "{s:?} is not a platform (os/arch[/variant], e.g. linux/arm64)"
        )),
    }
}

/// glibc's malloc gives threads arenas of their own (up to 8 per core) and keeps what is
/// freed in each: bytes that pass through several threads (a peer's chunks, file reads on
/// blocking threads) leave memory behind in every arena they touched. Two arenas kept the
/// peak RSS of an agent that serves peers at that of one that serves nobody (23 vs 22 MiB
/// on `scripts/bench-relay --nodes 1,8`; 28 MiB with glibc's default), at no cost in CPU.
/// Must run before the runtime starts its threads.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn main() -> anyhow::Result<()> {
    limit_malloc_arenas();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(agent_main())
}

async fn agent_main() -> anyhow::Result<()> {
    let cfg = Config::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt().with_env_filter(filter);
    match cfg.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }

    let node_name = match cfg.node_name {
        Some(n) => n,
        None => hostname()?,
    };
    let platform = cfg.platform.unwrap_or_else(node_platform);
    let containerd = ContainerdConfig {
        socket: cfg.containerd_socket,
        namespace: cfg.namespace,
        snapshotter: cfg.snapshotter,
        lease_ttl: cfg.lease_ttl,
        node_name: node_name.clone(),
        pin_images: !cfg.no_pin_images,
        platform: platform.clone(),
        unpack: cfg.unpack,
        max_layer_ratio: cfg.max_layer_ratio,
        sandbox_image: cfg.sandbox_image,
        store: ImageStore::Cri,
    };
    let docker = DockerConfig {
        socket: cfg.docker_socket,
        cache_dir: cfg.docker_cache_dir,
        clean_cache: cfg.docker_clean_cache,
        lease_ttl: cfg.lease_ttl,
        node_name,
        platform,
    };
    let auth = auth(
        cfg.auth_token_file.as_deref(),
        cfg.insecure_no_auth,
        cfg.tls_client_ca.is_some(),
    )?;
    let peers = peers(
        &auth,
        cfg.tls_cert.as_deref(),
        cfg.tls_key.as_deref(),
        cfg.peer_tls_ca.as_deref().or(cfg.tls_client_ca.as_deref()),
        cfg.peer_tls_server_name,
    )?
    .with_plaintext_peers(cfg.peer_cidr);
    // The runtime is settled before the ports open, so an agent that cannot serve it exits
    // (saying why) without ever accepting a call.
    let runtime = match cfg.runtime {
        RuntimeChoice::Containerd => {
            Chosen::Containerd(cri_runtime(Containerd::new(containerd)?).await)
        }
        RuntimeChoice::Docker => docker_runtime(Docker::new(docker), containerd).await?,
        RuntimeChoice::Auto => {
            let (cri, docker) = (Containerd::new(containerd.clone())?, Docker::new(docker));
            match detect(&cri, &docker).await? {
                RuntimeKind::Containerd => Chosen::Containerd(cri_runtime(cri).await),
                RuntimeKind::Docker => docker_runtime(docker, containerd).await?,
            }
        }
    };
    let serve = Serve {
        grpc: bind(cfg.listen).await?,
        http: bind(cfg.metrics_listen).await?,
        auth,
        tls: tls(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)?,
        peers,
        stall_timeout: cfg.upload_stall_timeout,
        keep: KeepConfig {
            interval: (!cfg.keep_interval.is_zero()).then_some(cfg.keep_interval),
            peers: cfg.peers,
            peers_dns: cfg.peers_dns,
        },
    };
    match runtime {
        Chosen::Containerd(runtime) => run(serve, runtime).await,
        Chosen::Docker(runtime) => run(serve, runtime).await,
    }
}

async fn run(serve: Serve, runtime: impl Runtime) -> anyhow::Result<()> {
    lade_agent::server::run(serve, Arc::new(runtime), shutdown_signal()).await
}

async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))
}

/// The agent refuses to start without a credential unless told, loudly, to run open.
fn auth(token_file: Option<&Path>, insecure: bool, client_certs: bool) -> anyhow::Result<Auth> {
    match (token_file, insecure, client_certs) {
        (Some(path), _, _) => Auth::from_token_file(path)
            .with_context(|| format!("reading the auth token from {}", path.display())),
        // Client certificates are the credential; the token check is off.
        (None, _, true) | (None, true, false) => Ok(Auth::Insecure),
        (None, false, false) => anyhow::bail!(
            "no credential configured: pass --auth-token-file (or --tls-client-ca for mutual TLS); \
             --insecure-no-auth runs without any, for labs only"
        ),
    }
}

/// Agents relay to each other with the credentials they accept themselves: the shared bearer
/// token, and with TLS their own certificate as client certificate, checking the peer's
/// server certificate against `ca`.
fn peers(
    auth: &Auth,
    cert: Option<&Path>,
    key: Option<&Path>,
    ca: Option<&Path>,
    server_name: Option<String>,
) -> anyhow::Result<Peers> {
    let mut peers = Peers::default();
    if let Auth::Token(token) = auth {
        peers = peers.with_token(token)?;
    }
    let (Some(cert), Some(key)) = (cert, key) else {
        return Ok(peers);
    };
    let Some(ca) = ca else {
        return Ok(peers.unusable(
            "this agent serves TLS but has no CA to check other agents' certificates: \
             relaying needs --peer-tls-ca or --tls-client-ca"
                .into(),
        ));
    };
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(ca)?))
        .identity(Identity::from_pem(read(cert)?, read(key)?));
    if let Some(name) = server_name {
        tls = tls.domain_name(name);
    }
    Ok(peers.with_tls(tls))
}

fn tls(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
) -> anyhow::Result<Option<ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (cert, key) else {
        return Ok(None);
    };
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let mut config = ServerTlsConfig::new().identity(Identity::from_pem(read(&cert)?, read(&key)?));
    if let Some(ca) = client_ca {
        config = config.client_ca_root(Certificate::from_pem(read(&ca)?));
    }
    Ok(Some(config))
}

fn hostname() -> anyhow::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading the hostname; pass --node-name")?;
    Ok(name.trim().to_string())
}

/// Completes on SIGTERM (what Kubernetes sends a pod) or Ctrl-C.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutdown signal received");
}
