//! Runs the agent: the gRPC server (authenticated) and the plain-HTTP side port (metrics
//! and probes), both until one shutdown signal, after which in-flight calls finish.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use lade_proto::AgentServer;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::ServerTlsConfig;
use tracing::{info, warn};

use crate::auth::Auth;
use crate::keep::{self, KeepConfig};
use crate::metrics::Metrics;
use crate::relay::Peers;
use crate::runtime::Runtime;
use crate::service::AgentService;

/// Concurrent calls one connection may have open (the coordinator uses a few per node).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;

/// Bytes of headers one call may send (the bearer token and gRPC's own take well under 1 KiB).
pub const MAX_HEADER_LIST: u32 = 16 << 10;

/// Where and how the agent serves.
pub struct Serve {
    /// gRPC for the coordinator.
    pub grpc: TcpListener,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub http: TcpListener,
    pub auth: Auth,
    /// TLS, with client certificates when the config asks for them.
    pub tls: Option<ServerTlsConfig>,
    /// How to reach the agents this one relays blobs to.
    pub peers: Peers,
    /// How long an upload may go without a message before it is dropped.
    pub stall_timeout: std::time::Duration,
    /// The keep-present loop: its interval and the peers it fetches from.
    pub keep: KeepConfig,
}

/// Serves `runtime` until `shutdown` completes.
pub async fn run<R: Runtime>(
    serve: Serve,
    runtime: Arc<R>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let registry = Registry::new();
    let metrics = Metrics::new(&registry)?;
    metrics
        .build_info
        .with_label_values(&[env!("CARGO_PKG_VERSION"), R::NAME])
        .set(1);
    if matches!(serve.auth, Auth::Insecure) && serve.tls.is_none() {
        warn!("AUTHENTICATION IS OFF (--insecure-no-auth): anyone who reaches the gRPC port can write to this node's container runtime");
    }

    // One signal stops both servers.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let http = tokio::spawn(crate::http::run(
        serve.http,
        runtime.clone(),
        registry,
        stopped(stop_rx.clone()),
    ));

    info!(addr = %serve.grpc.local_addr()?, runtime = R::NAME, "lade-agent listening");
    let auth = serve.auth;
    let interval = serve.keep.interval;
    let agent = AgentService::new(runtime, metrics)
        .with_peers(serve.peers)
        .with_stall_timeout(serve.stall_timeout)
        .with_keep(serve.keep);
    let keeper = match interval {
        Some(every) => {
            info!(interval = ?every, "keep-present loop on");
            Some(tokio::spawn(keep::run_loop(
                agent.keeper(),
                every,
                stopped(stop_rx.clone()),
            )))
        }
        None => None,
    };
    let service = InterceptedService::new(
        AgentServer::new(agent)
            .max_decoding_message_size(8 << 20)
            .max_encoding_message_size(8 << 20),
        move |req| auth.check(req),
    );
    // HTTP/2's default 64 KiB windows hold an upload to one window per round trip; blobs
    // stream in 1 MiB chunks, so give a stream room for several in flight.
    // Bounds for any caller, authenticated or not: streams per connection, header size, and
    // keep-alive pings so a peer that vanishes is dropped instead of holding its streams.
    // `tcp_nodelay` and `tcp_keepalive` on the builder apply only to listeners tonic binds
    // itself; this one is bound by the caller, so its accepted connections get them below.
    let mut builder = tonic::transport::Server::builder()
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(16 << 20))
        .max_frame_size(Some(lade_proto::MAX_FRAME_SIZE))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .http2_max_header_list_size(Some(MAX_HEADER_LIST))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)));
    if let Some(tls) = serve.tls {
        builder = builder.tls_config(tls)?;
    }
    let grpc = builder
        .add_service(service)
        .serve_with_incoming_shutdown(incoming(serve.grpc), stopped(stop_rx));
    tokio::pin!(grpc);
    tokio::pin!(shutdown);
    let result = tokio::select! {
        r = &mut grpc => r,
        _ = &mut shutdown => {
            let _ = stop_tx.send(true);
            grpc.await
        }
    };
    let _ = stop_tx.send(true);
    if let Some(keeper) = keeper {
        let _ = keeper.await;
    }
    http.await??;
    result?;
    info!("lade-agent stopped");
    Ok(())
}

/// The connections `listener` accepts, each with `TCP_NODELAY` (without it, a reply written
/// just after another small write waits for the peer's delayed ACK: PutBlob answers for
/// small blobs came 40 ms late) and TCP keep-alive after 60 s idle.
fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)))
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    #[tokio::test]
    async fn accepted_connections_do_not_wait_for_delayed_acks() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = super::incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
