//! How the coordinator reaches an agent (dialing, credentials, the client type), and the
//! calls both deliveries make alike: Info, a blob's chunk stream, Import, Verify and
//! EndSession.

use std::sync::Arc;
use std::time::Duration;

use lade_proto::{
    put_blob_request::Msg, BearerAuth, ClientConfig, EndSessionRequest, Held, ImageSpec,
    ImportEvent, ImportRequest, InfoRequest, InfoResponse, KeepAlive, PutBlobRequest,
    VerifyRequest, CHUNK_SIZE,
};
use tokio::sync::mpsc;
use tonic::transport::ClientTlsConfig;

use crate::bundle::Bundle;
use crate::progress::Progress;
use crate::select::Chosen;

use super::check::LayerChecks;
use super::error::LoadError;
use super::plan::{node_names, PlannedImage};
use super::report::{FailedImage, NodeReport};

/// A connected agent client that authenticates every call.
pub use lade_proto::AgentConn;

/// How the coordinator reaches agents: how long it waits, and how it proves who it is.
#[derive(Clone, Debug)]
pub struct Dial {
    pub timeout: Duration,
    pub credentials: Credentials,
}

impl Dial {
    /// The client settings for every agent: these credentials, a keep-alive ping every 30 s.
    fn config(&self) -> ClientConfig {
        let keep_alive = KeepAlive {
            interval: Duration::from_secs(30),
            timeout: None,
            while_idle: false,
        };
        ClientConfig::new(self.timeout, keep_alive)
            .with_tls(self.credentials.tls.clone())
            .with_auth(self.credentials.bearer.clone())
    }
}

/// What the coordinator presents to agents: the bearer token of the cluster's Secret and/or
/// TLS (with a client certificate when agents require mutual TLS). Its `Debug` shows neither
/// the token nor the client key.
#[derive(Clone, Default)]
pub struct Credentials {
    bearer: BearerAuth,
    tls: Option<ClientTlsConfig>,
    /// The token may cross the network without TLS (`--insecure-plaintext`).
    plaintext: bool,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("bearer", &self.bearer)
            .field("tls", &self.tls.is_some())
            .field("plaintext", &self.plaintext)
            .finish()
    }
}

impl Credentials {
    /// Presents `token` as `authorization: Bearer <token>` on every call.
    pub fn token(token: &str) -> Result<Credentials, LoadError> {
        let bearer =
            BearerAuth::token(token.trim()).map_err(|e| LoadError::Credentials(e.to_string()))?;
        Ok(Credentials {
            bearer,
            tls: None,
            plaintext: false,
        })
    }

    /// Sends the token over plain gRPC to any address, not only to loopback ones.
    pub fn allow_plaintext(mut self) -> Credentials {
        self.plaintext = true;
        self
    }

    /// Whether these credentials may be sent to `agent`: a token without TLS goes only to a
    /// loopback address (a port-forward, a test) unless plain text was allowed.
    fn check_destination(&self, agent: &str) -> Result<(), LoadError> {
        if !self.bearer.is_set() || self.tls.is_some() || self.plaintext {
            return Ok(());
        }
        let host = agent
            .rsplit_once(':')
            .map_or(agent, |(host, _)| host)
            .trim_start_matches('[')
            .trim_end_matches(']');
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.to_canonical().is_loopback());
        if loopback {
            return Ok(());
        }
        Err(LoadError::Credentials(format!(
            "agent {agent}: refusing to send the bearer token over plain gRPC to a non-loopback \
             address: connect with TLS (--tls-ca), or pass --insecure-plaintext where the \
             network to the agents is trusted"
        )))
    }

    /// Connects with TLS as `tls` says.
    pub fn with_tls(mut self, tls: ClientTlsConfig) -> Credentials {
        self.tls = Some(tls);
        self
    }
}

/// Connects to an agent with the credentials of `dial`.
pub async fn connect(agent: &str, dial: &Dial) -> Result<AgentConn, LoadError> {
    dial.credentials.check_destination(agent)?;
    dial.config()
        .connect(agent)
        .await
        .map_err(|e| LoadError::Connect {
            agent: agent.to_string(),
            reason: e.to_string(),
        })
}

pub(crate) use lade_proto::error_chain;

/// Connects to `agent` and asks what its node is, filling `report`'s node, runtime, platform
/// and pinning from the answer.
pub(crate) async fn identify(
    agent: &str,
    dial: &Dial,
    progress: &dyn Progress,
    report: &mut NodeReport,
) -> Result<(AgentConn, InfoResponse), LoadError> {
    let mut client = connect(agent, dial).await?;
    let info = client
        .info(InfoRequest {})
        .await
        .map_err(LoadError::agent_call(agent, "Info"))?
        .into_inner();
    report.node = info.node_name.clone();
    report.runtime = format!("{} {}", info.runtime, info.runtime_version);
    report.images_pinned = info.images_pinned;
    report.platform = info.platform.clone();
    progress.node_identified(agent, &info.node_name);
    Ok((client, info))
}

/// Verifies every planned name on the node, adding a failure for each name that is not
/// whole (once per image: an image that already failed import keeps the import's reason),
/// and releases the node's hold on its uploads if nothing failed; after a failure they stay
/// for the retry until the hold expires. Once the session ended, the node gets `record`, the
/// load's record (see [`super::record`]), if the bundle has a name and version.
pub(crate) async fn verify_and_end(
    client: &mut AgentConn,
    plan: &[PlannedImage],
    chosen: &[Result<Chosen, String>],
    session: &str,
    agent: &str,
    record: Option<Held>,
    report: &mut NodeReport,
) -> Result<(), LoadError> {
    let call_err = |call| LoadError::agent_call(agent, call);
    // The names as this node was asked to create them.
    let names: Vec<(&str, Vec<String>)> = plan
        .iter()
        .zip(chosen)
        .map(|(p, c)| match c {
            Ok(c) => (p.source.as_str(), node_names(&p.names, &c.target)),
            Err(_) => (p.source.as_str(), p.names.clone()),
        })
        .collect();
    let refs = names.iter().flat_map(|(_, n)| n.iter().cloned()).collect();
    let verified = client
        .verify(VerifyRequest { refs })
        .await
        .map_err(call_err("Verify"))?
        .into_inner();
    for r in verified.refs.into_iter().filter(|r| !r.ok) {
        if !report.failed_images.iter().any(|f| {
            names
                .iter()
                .any(|(source, n)| *source == f.image && n.contains(&r.r#ref))
        }) {
            report.failed_images.push(FailedImage {
                image: r.r#ref,
                reason: format!("verification: {}", r.problem),
            });
        }
    }
    if report.failed_images.is_empty() {
        client
            .end_session(EndSessionRequest {
                session: session.to_string(),
            })
            .await
            .map_err(call_err("EndSession"))?;
        if let Some(held) = record {
            super::record::hold(client, held, agent, report).await;
        }
    }
    Ok(())
}

/// Imports one image; returns its events.
pub(crate) async fn import(
    mut client: AgentConn,
    session: String,
    spec: ImageSpec,
) -> Result<Vec<ImportEvent>, tonic::Status> {
    let mut stream = client
        .import(ImportRequest {
            session,
            images: vec![spec],
        })
        .await?
        .into_inner();
    let mut events = Vec::new();
    while let Some(event) = stream.message().await? {
        events.push(event);
    }
    Ok(events)
}

/// Streams blob `digest` from `offset` into `tx` as chunk messages, on a blocking thread
/// (reading is blocking file work), counting each chunk on `count`; returns the bytes sent.
/// The digest is not hashed here: the node checks it before it commits the blob, and a
/// refusal is traced back to the bundle by [`bundle_fault`]. The last chunk is withheld when
/// the layer check fails (the check starts here, if it has not yet), so no node commits it.
pub(crate) fn stream_chunks(
    bundle: &Arc<Bundle>,
    digest: &str,
    offset: u64,
    checks: Option<&Arc<LayerChecks>>,
    tx: mpsc::Sender<PutBlobRequest>,
    count: Option<mpsc::UnboundedSender<u64>>,
) -> tokio::task::JoinHandle<Result<u64, LoadError>> {
    if let Some(checks) = checks {
        checks.start(digest);
    }
    let (bundle, digest, checks) = (bundle.clone(), digest.to_string(), checks.cloned());
    tokio::task::spawn_blocking(move || -> Result<u64, LoadError> {
        let mut reader = bundle.send_blob(&digest, offset)?;
        if let (0, Some(checks)) = (reader.remaining(), &checks) {
            // The node holds every byte already; it commits when this call ends.
            checks.wait(&digest).map_err(LoadError::Layer)?;
        }
        let mut sent = 0u64;
        while let Some(chunk) = reader.next_chunk(CHUNK_SIZE)? {
            if let (0, Some(checks)) = (reader.remaining(), &checks) {
                checks.wait(&digest).map_err(LoadError::Layer)?;
            }
            let n = chunk.len() as u64;
            let msg = PutBlobRequest {
                msg: Some(Msg::Chunk(chunk.into())),
            };
            if tx.blocking_send(msg).is_err() {
                break; // The call ended; its status says why.
            }
            sent += n;
            if let Some(count) = &count {
                let _ = count.send(n);
            }
        }
        Ok(sent)
    })
}

/// After a node refused blob `digest` as not matching its digest or size (`DataLoss`): the
/// bundle's own error naming the member and images when the bundle's bytes are at fault (the
/// images using the blob then fail, the rest load), else `None` and the node's refusal stands.
pub(crate) async fn bundle_fault(
    bundle: &Arc<Bundle>,
    digest: &str,
    status: &tonic::Status,
) -> Option<LoadError> {
    if status.code() != tonic::Code::DataLoss {
        return None;
    }
    let (bundle, digest) = (bundle.clone(), digest.to_string());
    match tokio::task::spawn_blocking(move || bundle.check_blob(&digest)).await {
        Ok(Err(e)) => Some(LoadError::Bundle(e)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for E {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn error_chain_drops_repeated_sources() {
        let e = E(
            "transport error",
            Some(Box::new(E(
                "tcp connect error",
                Some(Box::new(E(
                    "tcp connect error",
                    Some(Box::new(E("Connection refused", None))),
                ))),
            ))),
        );
        assert_eq!(
            error_chain(&e),
            "transport error: tcp connect error: Connection refused"
        );
    }
}
