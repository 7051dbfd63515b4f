//! What [`Runtime::changes`](crate::runtime::Runtime::changes) signals on containerd: its
//! Events service. A Subscribe stream breaks when containerd goes away; once containerd
//! answers again it is back ([`Change::Restarted`]) and is subscribed to anew. Image and content deletions in the
//! agent's namespace come as [`Change::ImageRemoved`] and [`Change::ContentRemoved`].

use std::time::Duration;

use containerd_client::services::v1::{
    events_client::EventsClient, version_client::VersionClient, ImageDelete, SubscribeRequest,
};
use containerd_client::types::Envelope;
use futures::stream::{BoxStream, StreamExt};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tracing::debug;

use crate::runtime::Change;

/// How long to wait before asking again whether containerd is back.
const RESUBSCRIBE: Duration = Duration::from_secs(1);

/// The changes `channel`'s containerd reports for `namespace`, for as long as the stream is
/// read.
pub(super) fn watch(channel: Channel, namespace: String) -> BoxStream<'static, Change> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        // containerd answers Subscribe only with its first event, so whether it is up is
        // asked of its Version service. The first time it answers is no restart; any time
        // after it went away (or the subscription ended) is.
        let mut lost = false;
        loop {
            let up = VersionClient::new(channel.clone()).version(()).await;
            if let Err(status) = up {
                debug!(error = ?status, "containerd does not answer; watching for its return");
                lost = true;
                tokio::select! {
                    () = tx.closed() => return,
                    () = tokio::time::sleep(RESUBSCRIBE) => {}
                }
                continue;
            }
            if lost && tx.send(Change::Restarted).await.is_err() {
                return;
            }
            let filters = ["/images/delete", "/content/delete"]
                .iter()
                .map(|topic| format!(r#"namespace=="{namespace}",topic=="{topic}""#))
                .collect();
            let mut events = EventsClient::new(channel.clone());
            let subscribed = tokio::select! {
                () = tx.closed() => return,
                s = events.subscribe(SubscribeRequest { filters }) => s,
            };
            let mut stream = match subscribed {
                Ok(stream) => stream.into_inner(),
                Err(status) => {
                    debug!(error = ?status, "containerd's event subscription failed");
                    lost = true;
                    continue;
                }
            };
            loop {
                let envelope = tokio::select! {
                    () = tx.closed() => return,
                    message = stream.message() => message,
                };
                match envelope {
                    Ok(Some(envelope)) => {
                        if let Some(change) = change_of(&envelope) {
                            if tx.send(change).await.is_err() {
                                return;
                            }
                        }
                    }
                    end => {
                        debug!(?end, "containerd's event stream ended");
                        lost = true;
                        break;
                    }
                }
            }
        }
    });
    ReceiverStream::new(rx).boxed()
}

/// The change an event is.
fn change_of(envelope: &Envelope) -> Option<Change> {
    match envelope.topic.as_str() {
        "/images/delete" => {
            let event = envelope.event.as_ref()?;
            let deleted = ImageDelete::decode(event.value.as_slice()).ok()?;
            Some(Change::ImageRemoved(deleted.name))
        }
        "/content/delete" => Some(Change::ContentRemoved),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_deletions_name_the_image() {
        let envelope = Envelope {
            topic: "/images/delete".into(),
            event: Some(prost_types::Any {
                type_url: "containerd.events.ImageDelete".into(),
                value: ImageDelete {
                    name: "docker.io/library/busybox:latest".into(),
                }
                .encode_to_vec(),
            }),
            ..Default::default()
        };
        assert_eq!(
            change_of(&envelope),
            Some(Change::ImageRemoved(
                "docker.io/library/busybox:latest".into()
            ))
        );
        let other = Envelope {
            topic: "/images/create".into(),
            ..Default::default()
        };
        assert_eq!(change_of(&other), None);
    }
}
