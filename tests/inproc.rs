//! Agents served in this test process over the in-memory runtime
//! ([`lade_agent::runtime::memory`]): the real gRPC service, token and relay, without root, a
//! daemon or a disk. Each [`MemoryNode`] listens on a 127.0.0.1 port of its own through a
//! small proxy, so a node the runtime declares lost ([`Fault::LoseAfter`]) really drops off
//! the network: every connection to it is cut and its port refuses new ones until
//! [`MemoryNode::revive`].
//!
//! The tests that use them run `lade` as a child process, which blocks; call it through
//! [`load_json_async`] so the agents keep being served meanwhile.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use lade_agent::auth::Auth;
use lade_agent::keep::KeepConfig;
use lade_agent::relay::Peers;
pub use lade_agent::runtime::memory::Fault;
use lade_agent::runtime::memory::Memory;
use lade_agent::server::{run, Serve};
use lade_agent::service::DEFAULT_STALL_TIMEOUT;
use lade_testkit::nodes::TEST_TOKEN;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// One agent over a [`Memory`] runtime, served in this process.
pub struct MemoryNode {
    pub runtime: Arc<Memory>,
    /// The address callers use: the proxy's.
    addr: SocketAddr,
    /// The agent's own listener, behind the proxy.
    backend: SocketAddr,
    /// The agent's plain-HTTP port (/metrics).
    pub metrics_port: u16,
    server: JoinHandle<()>,
    proxy: Mutex<JoinHandle<()>>,
}

impl MemoryNode {
    /// Starts an agent named `name` on an empty in-memory node.
    pub async fn start(name: &str) -> Result<MemoryNode> {
        MemoryNode::start_with(Memory::new(name), KeepConfig::default()).await
    }

    /// Starts an agent on `runtime`, its keep-present loop as `keep` says.
    pub async fn start_with(runtime: Memory, keep: KeepConfig) -> Result<MemoryNode> {
        let runtime = Arc::new(runtime);
        let grpc = TcpListener::bind("127.0.0.1:0").await?;
        let backend = grpc.local_addr()?;
        let http = TcpListener::bind("127.0.0.1:0").await?;
        let metrics_port = http.local_addr()?.port();
        let serve = Serve {
            grpc,
            http,
            auth: Auth::Token(TEST_TOKEN.to_string()),
            tls: None,
            peers: Peers::default()
                .with_token(TEST_TOKEN)?
                .with_plaintext_peers(vec!["127.0.0.1/32".parse()?]),
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            keep,
        };
        let server = tokio::spawn({
            let runtime = runtime.clone();
            async move {
                if let Err(e) = run(serve, runtime, std::future::pending()).await {
                    eprintln!("in-process agent stopped: {e:#}");
                }
            }
        });
        let front = TcpListener::bind("127.0.0.1:0").await?;
        let addr = front.local_addr()?;
        let proxy = tokio::spawn(proxy(front, backend, runtime.lost()));
        Ok(MemoryNode {
            runtime,
            addr,
            backend,
            metrics_port,
            server,
            proxy: Mutex::new(proxy),
        })
    }

    /// Starts one node per name, in order.
    pub async fn start_all(names: &[&str]) -> Result<Vec<MemoryNode>> {
        let mut nodes = Vec::new();
        for name in names {
            nodes.push(MemoryNode::start(name).await?);
        }
        Ok(nodes)
    }

    /// `host:port` of the agent.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Clears the node's faults and, if it was lost, puts it back on the network at its
    /// address, with everything it held.
    pub async fn revive(&self) -> Result<()> {
        let was_lost = *self.runtime.lost().borrow();
        self.runtime.clear_faults();
        if was_lost {
            let front = TcpListener::bind(self.addr)
                .await
                .with_context(|| format!("rebinding {}", self.addr))?;
            let proxy = tokio::spawn(proxy(front, self.backend, self.runtime.lost()));
            let old = std::mem::replace(&mut *self.proxy.lock().expect("proxy lock"), proxy);
            old.abort();
        }
        Ok(())
    }
}

impl Drop for MemoryNode {
    fn drop(&mut self) {
        self.server.abort();
        self.proxy.lock().expect("proxy lock").abort();
    }
}

/// Forwards every connection accepted on `front` to `backend` until `lost` turns true; then
/// cuts them all and closes `front`.
async fn proxy(front: TcpListener, backend: SocketAddr, mut lost: watch::Receiver<bool>) {
    // Dropped on return, which aborts every connection task and so closes its sockets.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = front.accept() => {
                let Ok((mut inbound, _)) = accepted else { continue };
                connections.spawn(async move {
                    let _ = inbound.set_nodelay(true);
                    if let Ok(mut outbound) = TcpStream::connect(backend).await {
                        let _ = outbound.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
            changed = lost.wait_for(|l| *l) => {
                let _ = changed;
                return;
            }
        }
    }
}

/// [`crate::load_json`] on a blocking thread, so that the agents in this process are served
/// while `lade` runs.
pub async fn load_json_async(
    bundle: &Path,
    nodes: &[&MemoryNode],
    extra: &[&str],
) -> Result<(i32, Vec<Value>, String)> {
    let bundle = bundle.to_path_buf();
    let agents: Vec<String> = nodes.iter().map(|n| n.addr()).collect();
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        crate::load_json(&bundle, &agents, &extra)
    })
    .await?
}
