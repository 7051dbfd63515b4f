//! The `lade.agent.v1.Agent` gRPC service: decodes requests, calls the [`Runtime`], encodes
//! answers. Owns no runtime logic; errors become statuses through `From<Error> for Status`.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use lade_proto::{
    put_blob_request::Msg, HaveRequest, HaveResponse, ImportEvent, ImportRequest, InfoRequest,
    InfoResponse, ListRequest, ListResponse, PutBlobRequest, PutBlobResponse, VerifyRequest,
    VerifyResponse,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::instrument;

use crate::error::Error;
use crate::runtime::Runtime;

/// Serves one runtime over gRPC.
pub struct AgentService<R> {
    runtime: Arc<R>,
}

impl<R> AgentService<R> {
    pub fn new(runtime: Arc<R>) -> Self {
        Self { runtime }
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<ImportEvent, Status>> + Send>>;

#[tonic::async_trait]
impl<R: Runtime> lade_proto::Agent for AgentService<R> {
    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(self.runtime.info().await?))
    }

    #[instrument(skip_all, fields(session = %req.get_ref().session, blobs = req.get_ref().blobs.len()))]
    async fn have(&self, req: Request<HaveRequest>) -> Result<Response<HaveResponse>, Status> {
        let req = req.into_inner();
        let blobs = self.runtime.have(&req.session, &req.blobs).await?;
        Ok(Response::new(HaveResponse { blobs }))
    }

    async fn put_blob(
        &self,
        req: Request<Streaming<PutBlobRequest>>,
    ) -> Result<Response<PutBlobResponse>, Status> {
        let mut stream = req.into_inner();
        let header = match stream.message().await? {
            Some(PutBlobRequest {
                msg: Some(Msg::Header(h)),
            }) => h,
            _ => {
                return Err(Error::InvalidRequest("PutBlob must start with a header".into()).into())
            }
        };
        let digest = header
            .blob
            .as_ref()
            .map(|b| b.digest.clone())
            .unwrap_or_default();
        let chunks = stream
            .map(move |m| match m {
                Ok(PutBlobRequest {
                    msg: Some(Msg::Chunk(c)),
                }) => Ok(c),
                Ok(_) => Err(Error::InvalidRequest(format!(
                    "blob {digest}: only data chunks may follow the header"
                ))),
                Err(_) => Err(Error::Cancelled {
                    digest: digest.clone(),
                }),
            })
            .boxed();
        Ok(Response::new(self.runtime.put_blob(header, chunks).await?))
    }

    type ImportStream = EventStream;

    #[instrument(skip_all, fields(session = %req.get_ref().session, images = req.get_ref().images.len()))]
    async fn import(
        &self,
        req: Request<ImportRequest>,
    ) -> Result<Response<Self::ImportStream>, Status> {
        let req = req.into_inner();
        let (tx, rx) = mpsc::channel::<ImportEvent>(64);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let runtime = self.runtime.clone();
        // The import goes on even if the caller disconnects: stopping half-way would only
        // waste what was unpacked, and every step is idempotent.
        tokio::spawn(async move {
            let result = runtime.import(&req.session, req.images, tx).await;
            let _ = done_tx.send(result);
        });
        let events = ReceiverStream::new(rx).map(Ok);
        let tail = futures::stream::once(async move {
            match done_rx.await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(Err(Status::from(e))),
                Err(_) => Some(Err(Status::internal("import task ended without a result"))),
            }
        })
        .filter_map(|x| async move { x });
        Ok(Response::new(Box::pin(events.chain(tail))))
    }

    async fn verify(
        &self,
        req: Request<VerifyRequest>,
    ) -> Result<Response<VerifyResponse>, Status> {
        let refs = self.runtime.verify(&req.into_inner().refs).await?;
        Ok(Response::new(VerifyResponse { refs }))
    }

    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        Ok(Response::new(ListResponse {
            images: self.runtime.list().await?,
        }))
    }
}
