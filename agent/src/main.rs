//! `lade-agent` binary: parses configuration, builds the runtime, serves until SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgAction, Parser, ValueEnum};
use lade_agent::runtime::containerd::{Containerd, ContainerdConfig};
use lade_agent::runtime::docker::{Docker, DockerConfig};
use lade_agent::runtime::{detect, Runtime, RuntimeKind};

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
    /// Snapshotter to unpack into; must be the one the CRI plugin uses.
    #[arg(long, env = "LADE_SNAPSHOTTER", default_value = "overlayfs")]
    snapshotter: String,
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
    /// How long an unfinished load's uploads are kept (containerd's lease; Docker's cache).
    #[arg(long, env = "LADE_LEASE_TTL", default_value = "6h", value_parser = humantime::parse_duration)]
    lease_ttl: Duration,
    /// Log format.
    #[arg(long, env = "LADE_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
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
    let containerd = ContainerdConfig {
        socket: cfg.containerd_socket,
        namespace: cfg.namespace,
        snapshotter: cfg.snapshotter,
        lease_ttl: cfg.lease_ttl,
        node_name: node_name.clone(),
    };
    let docker = DockerConfig {
        socket: cfg.docker_socket,
        cache_dir: cfg.docker_cache_dir,
        clean_cache: cfg.docker_clean_cache,
        lease_ttl: cfg.lease_ttl,
        node_name,
    };
    match cfg.runtime {
        RuntimeChoice::Containerd => serve(cfg.listen, Containerd::new(containerd)?).await,
        RuntimeChoice::Docker => serve(cfg.listen, Docker::new(docker)).await,
        RuntimeChoice::Auto => {
            let (containerd, docker) = (Containerd::new(containerd)?, Docker::new(docker));
            match detect(&containerd, &docker).await? {
                RuntimeKind::Containerd => serve(cfg.listen, containerd).await,
                RuntimeKind::Docker => serve(cfg.listen, docker).await,
            }
        }
    }
}

async fn serve(listen: SocketAddr, runtime: impl Runtime) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    lade_agent::server::run(listener, Arc::new(runtime), shutdown_signal()).await
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
