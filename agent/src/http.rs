//! The agent's plain-HTTP side port: `/metrics` for Prometheus, `/healthz` (the process
//! answers) for the liveness probe and `/readyz` (the runtime answers) for readiness.
//! Kept apart from the gRPC port so probes and scrapes need no credential.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::runtime::Runtime;

/// A client gets this long to send a request's headers; then the connection is closed, so
/// slow clients cannot hold connections open on the unauthenticated port.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Most bytes a request's head may take (the probes and scrapes send a few hundred).
const MAX_HEAD: usize = 16 << 10;

async fn respond<R: Runtime>(
    path: &str,
    runtime: &R,
    registry: &Registry,
) -> Response<Full<Bytes>> {
    let (status, body) = match path {
        "/healthz" => (StatusCode::OK, "ok\n".to_string()),
        "/readyz" => match runtime.ready().await {
            Ok(()) => (StatusCode::OK, "ready\n".to_string()),
            Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
        },
        "/metrics" => {
            let mut out = Vec::new();
            match TextEncoder::new().encode(&registry.gather(), &mut out) {
                Ok(()) => (StatusCode::OK, String::from_utf8_lossy(&out).into_owned()),
                Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            }
        }
        _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}

/// Serves the side port on `listener` until `shutdown` completes.
pub async fn run<R: Runtime>(
    listener: TcpListener,
    runtime: Arc<R>,
    registry: Registry,
    shutdown: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    info!(addr = %listener.local_addr()?, "metrics and health endpoint listening");
    let registry = Arc::new(registry);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = &mut shutdown => return Ok(()),
        };
        let (runtime, registry) = (runtime.clone(), registry.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (runtime, registry) = (runtime.clone(), registry.clone());
                async move { Ok::<_, Infallible>(respond(req.uri().path(), &*runtime, &registry).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_HEAD)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, error = %e, "metrics connection ended");
            }
        });
    }
}
