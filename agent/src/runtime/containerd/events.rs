//! What [`Runtime::changes`](crate::runtime::Runtime::changes) signals on containerd: its
//! Events service. A Subscribe stream breaks when containerd goes away; once a new one is
//! taken, containerd is back ([`Change::Restarted`]). Image and content deletions in the
//! agent's namespace come as [`Change::ImageRemoved`] and [`Change::ContentRemoved`].

use std::time::Duration;

use containerd_client::services::v1::{events_client::EventsClient, ImageDelete, SubscribeRequest};
use containerd_client::types::Envelope;
use futures::stream::{BoxStream, StreamExt};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tracing::debug;

use crate::runtime::Change;

/// How long to wait before subscribing again after containerd went away.
const RESUBSCRIBE: Duration = Duration::from_secs(1);

/// The changes `channel`'s containerd reports for `namespace`, for as long as the stream is
/// read.
pub(super) fn watch(channel: Channel, namespace: String) -> BoxStream<'static, Change> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        // The first subscription finds containerd up, which is no restart; one after a
        // failure or a broken stream is.
        let mut lost = false;
        loop {
            let filters = ["/images/delete", "/content/delete"]
                .iter()
                .map(|topic| format!(r#"namespace=="{namespace}",topic=="{topic}""#))
                .collect();
            let subscribed = EventsClient::new(channel.clone())
                .subscribe(SubscribeRequest { filters })
                .await;
            match subscribed {
                Ok(stream) => {
                    if lost && tx.send(Change::Restarted).await.is_err() {
                        return;
                    }
                    let mut stream = stream.into_inner();
                    loop {
                        let envelope = tokio::select! {
                            () = tx.closed() => return,
                            message = stream.message() => message,
                        };
                        let Ok(Some(envelope)) = envelope else {
                            debug!("containerd's event stream ended; resubscribing");
                            break;
                        };
                        if let Some(change) = change_of(&envelope) {
                            if tx.send(change).await.is_err() {
                                return;
                            }
                        }
                    }
                    lost = true;
                }
                Err(status) => {
                    debug!(error = %status.message(), "cannot subscribe to containerd's events");
                    lost = true;
                }
            }
            tokio::select! {
                () = tx.closed() => return,
                () = tokio::time::sleep(RESUBSCRIBE) => {}
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
