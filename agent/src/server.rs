//! Runs the agent's gRPC server on a listener until a shutdown signal.

use std::future::Future;
use std::sync::Arc;

use lade_proto::AgentServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::info;

use crate::runtime::Runtime;
use crate::service::AgentService;

/// Serves `runtime` on `listener` until `shutdown` completes, then lets in-flight calls finish.
pub async fn run<R: Runtime>(
    listener: TcpListener,
    runtime: Arc<R>,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    info!(%addr, "lade-agent listening");
    let service = AgentServer::new(AgentService::new(runtime))
        .max_decoding_message_size(8 << 20)
        .max_encoding_message_size(8 << 20);
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?;
    info!("lade-agent stopped");
    Ok(())
}
