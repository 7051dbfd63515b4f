//! What [`Runtime::changes`](crate::runtime::Runtime::changes) signals on Docker: dockerd's
//! event stream, filtered to image untag and delete events. The stream breaks when dockerd
//! goes away; once a new one is open, dockerd is back ([`Change::Restarted`]).

use std::collections::HashMap;
use std::time::Duration;

use bollard::models::EventMessage;
use bollard::query_parameters::EventsOptionsBuilder;
use futures::stream::{BoxStream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::debug;

use crate::runtime::{canonical_name, Change};

/// How long to wait before watching again after dockerd went away.
const REWATCH: Duration = Duration::from_secs(1);

/// The event stream is one long request: its client must not time it out.
const STREAM_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

/// The changes the dockerd at `socket` reports, for as long as the stream is read.
pub(super) fn watch(socket: String) -> BoxStream<'static, Change> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut lost = false;
        loop {
            match bollard::Docker::connect_with_unix(
                &socket,
                STREAM_TIMEOUT.as_secs(),
                bollard::API_DEFAULT_VERSION,
            ) {
                Ok(docker) => {
                    let filters = HashMap::from([
                        ("type", vec!["image"]),
                        ("event", vec!["untag", "delete"]),
                    ]);
                    let options = EventsOptionsBuilder::new().filters(&filters).build();
                    let mut events = docker.events(Some(options));
                    // The stream opens with the first item or error; dockerd being reachable
                    // is checked with a ping, so a quiet stream still counts as back.
                    if docker.ping().await.is_ok() {
                        if lost && tx.send(Change::Restarted).await.is_err() {
                            return;
                        }
                        loop {
                            let event = tokio::select! {
                                () = tx.closed() => return,
                                event = events.next() => event,
                            };
                            let Some(Ok(event)) = event else {
                                debug!("dockerd's event stream ended; watching again");
                                break;
                            };
                            if let Some(change) = change_of(&event) {
                                if tx.send(change).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    lost = true;
                }
                Err(e) => {
                    debug!(error = %e, "cannot watch dockerd's events");
                    lost = true;
                }
            }
            tokio::select! {
                () = tx.closed() => return,
                () = tokio::time::sleep(REWATCH) => {}
            }
        }
    });
    ReceiverStream::new(rx).boxed()
}

/// The change an image event is: an untag names the tag removed; a delete removed content.
fn change_of(event: &EventMessage) -> Option<Change> {
    match event.action.as_deref()? {
        "untag" => {
            let name = event.actor.as_ref()?.attributes.as_ref()?.get("name")?;
            Some(Change::ImageRemoved(canonical_name(name)))
        }
        "delete" => Some(Change::ContentRemoved),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::EventActor;

    #[test]
    fn an_untag_names_the_tag_in_full() {
        let event = EventMessage {
            action: Some("untag".into()),
            actor: Some(EventActor {
                id: Some("sha256:abc".into()),
                attributes: Some(HashMap::from([("name".into(), "busybox:latest".into())])),
            }),
            ..Default::default()
        };
        assert_eq!(
            change_of(&event),
            Some(Change::ImageRemoved(
                "docker.io/library/busybox:latest".into()
            ))
        );
    }
}
