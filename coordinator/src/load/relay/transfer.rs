//! One transfer into one node: the coordinator's own send of a blob, or a peer fetch the
//! node runs; and the probe that tells a lost node from a live one.

use std::sync::Arc;
use std::time::Duration;

use lade_proto::{
    put_blob_request::Msg, BlobHeader, FetchRequest, HaveRequest, InfoRequest, PutBlobRequest,
    UnpackHint,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::super::check::LayerChecks;
use super::super::conn::{bundle_fault, stream_chunks, AgentConn};
use super::super::error::LoadError;
use super::super::plan::descriptor;
use super::swarm::Ended;

/// The coordinator's own send of one blob to one node.
pub(super) struct Send {
    pub(super) bundle: Arc<crate::bundle::Bundle>,
    pub(super) session: String,
    pub(super) digest: String,
    pub(super) offset: u64,
    pub(super) hint: Option<UnpackHint>,
    pub(super) checks: Option<Arc<LayerChecks>>,
    pub(super) agent: String,
    /// A retry: ask the node first how much of the blob it holds.
    pub(super) refresh: bool,
}

impl Send {
    /// Streams the blob from the node's offset, calling `moved` with the bytes the node
    /// holds as chunks go out. The node commits it only if its digest matches (a refusal is
    /// traced back to the bundle's member); a layer that fails its check withholds the last
    /// chunk.
    pub(super) async fn run(mut self, mut client: AgentConn, moved: impl Fn(u64)) -> Ended {
        let blob = &self.bundle.blobs[&self.digest];
        if self.refresh {
            let asked = client
                .have(HaveRequest {
                    session: self.session.clone(),
                    blobs: vec![descriptor(blob)],
                })
                .await;
            match asked.map(|r| r.into_inner().blobs.into_iter().next()) {
                Ok(Some(state)) if state.present => {
                    return Ended::Stored {
                        received: 0,
                        already: false,
                    }
                }
                Ok(Some(state)) => self.offset = state.offset.min(blob.size),
                Ok(None) => {}
                Err(status) => return classify(&self.agent, "Have", status),
            }
        }
        let (tx, rx) = mpsc::channel::<PutBlobRequest>(4);
        let header = PutBlobRequest {
            msg: Some(Msg::Header(BlobHeader {
                session: self.session.clone(),
                blob: Some(descriptor(blob)),
                offset: self.offset,
                unpack: self.hint.clone(),
                ..Default::default()
            })),
        };
        tx.send(header)
            .await
            .expect("receiver is alive until the call starts");
        let (count_tx, mut count_rx) = mpsc::unbounded_channel::<u64>();
        let reader = stream_chunks(
            &self.bundle,
            &self.digest,
            self.offset,
            self.checks.as_ref(),
            tx,
            Some(count_tx),
        );
        let call = client.put_blob(ReceiverStream::new(rx));
        tokio::pin!(call);
        let mut held = self.offset;
        let response = loop {
            tokio::select! {
                res = &mut call => break res,
                Some(n) = count_rx.recv() => {
                    held += n;
                    moved(held);
                }
            }
        };
        // The bundle's own error explains a refused upload better than the agent's view.
        match reader.await.expect("blob reader task panicked") {
            Err(e) if e.is_bad_content() => return Ended::Bad(e.to_string()),
            Err(e) => return Ended::Bundle(e.kind(), e.to_string()),
            Ok(_) => {}
        }
        match response {
            Ok(r) => {
                let r = r.into_inner();
                if !r.local_error.is_empty() {
                    return Ended::Refused(r.local_error);
                }
                Ended::Stored {
                    received: r.received,
                    already: r.already_present,
                }
            }
            Err(status) => match bundle_fault(&self.bundle, &self.digest, &status).await {
                Some(e) if e.is_bad_content() => Ended::Bad(e.to_string()),
                Some(e) => Ended::Bundle(e.kind(), e.to_string()),
                None => classify(&self.agent, "PutBlob", status),
            },
        }
    }
}

/// A failed call to the receiving node: lost when the call itself broke (the node may be
/// gone), refused when the node answered with an error.
pub(super) fn classify(agent: &str, call: &'static str, status: tonic::Status) -> Ended {
    use tonic::Code;
    let lost = matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    ) || status.code() == Code::ResourceExhausted;
    let e = LoadError::agent_call(agent, call)(status);
    if lost {
        Ended::Lost(e.to_string())
    } else {
        Ended::Refused(e.to_string())
    }
}

/// Has the node fetch one blob from a peer, calling `moved` with what it holds as it goes.
pub(super) async fn fetch(
    mut client: AgentConn,
    agent: &str,
    req: FetchRequest,
    moved: impl Fn(u64),
) -> Ended {
    let mut stream = match client.fetch(req).await {
        Ok(r) => r.into_inner(),
        Err(status) => return classify(agent, "Fetch", status),
    };
    loop {
        match stream.message().await {
            Ok(Some(p)) if p.done => {
                return Ended::Stored {
                    received: p.received,
                    already: p.already_present,
                }
            }
            Ok(Some(p)) if !p.source_error.is_empty() => {
                return Ended::SourceFailed(p.source_error)
            }
            Ok(Some(p)) => moved(p.held),
            Ok(None) => return Ended::Lost(format!("agent {agent}: Fetch ended without a result")),
            Err(status) => return classify(agent, "Fetch", status),
        }
    }
}

/// Whether the coordinator itself still reaches the node.
pub(super) async fn probe(client: &mut AgentConn) -> Result<(), String> {
    match tokio::time::timeout(Duration::from_secs(5), client.info(InfoRequest {})).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => Err(format!("Info: {}", status.message())),
        Err(_) => Err("Info: no answer within 5s".into()),
    }
}
