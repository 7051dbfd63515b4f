//! Plain delivery: the coordinator sends every node what it lacks itself, one independent
//! procedure per node (Info, Have, PutBlob for what is missing, Import, Verify), up to
//! `parallel` nodes at once. One node's failure is recorded in its own [`NodeReport`] and
//! never stops the others.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use lade_proto::{put_blob_request::Msg, BlobHeader, HaveRequest, PutBlobRequest, UnpackHint};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, instrument};

use super::check::LayerChecks;
use super::conn::{bundle_fault, identify, import, stream_chunks, verify_and_end, AgentConn};
use super::error::LoadError;
use super::plan::{
    check_space, descriptor, foreign_platform_warnings, have_descriptors, import_spec,
    missing_blobs, node_choices, node_platform, unpack_hints, PlannedImage,
};
use super::record::held;
use super::report::{FailedImage, NodeReport};
use super::run::Run;
use crate::select::Chosen;

/// Loads every agent of the run, each on its own, up to `parallel` at a time; one report per
/// agent, in order.
pub(crate) async fn load(run: &Run<'_>) -> Vec<NodeReport> {
    let (opts, progress) = (run.opts, &run.progress);
    let mut reports: Vec<(usize, NodeReport)> =
        futures::stream::iter(opts.agents.iter().enumerate())
            .map(|(i, agent)| async move {
                let mut report = NodeReport {
                    agent: agent.clone(),
                    images: run.plan.len(),
                    ..Default::default()
                };
                let started = Instant::now();
                progress.node_started(agent);
                let node = Node { run, agent };
                let retry = &opts.retry;
                let mut attempt = 0;
                let result = loop {
                    match retry.timed(agent, node.load(&mut report)).await {
                        Err(e) if retry.again(&e, &mut attempt, agent, &**progress).await => {}
                        other => break other,
                    }
                };
                report.attempts = attempt + 1;
                report.seconds = started.elapsed().as_secs_f64();
                if let Err(e) = result {
                    // The summary reports it; a warning would tear through the bars.
                    info!(%agent, error = %e, "node failed");
                    report.fail_with(&e);
                }
                report.settle();
                report.bytes_from_coordinator = report.bytes_sent;
                if report.bytes_sent > 0 {
                    report.via = vec!["coordinator".into()];
                }
                progress.node_finished(&report);
                (i, report)
            })
            .buffer_unordered(opts.parallel.max(1))
            .collect()
            .await;
    reports.sort_by_key(|(i, _)| *i);
    reports.into_iter().map(|(_, r)| r).collect()
}

/// One node of a plain load: the load it is part of and the agent that serves it.
struct Node<'a> {
    run: &'a Run<'a>,
    agent: &'a str,
}

impl Node<'_> {
    /// One attempt at the node: Info, Have, every missing blob in the order the images need
    /// them, each image's Import as soon as its blobs are there, then Verify.
    #[instrument(skip_all, fields(agent = %self.agent))]
    async fn load(&self, report: &mut NodeReport) -> Result<(), LoadError> {
        let (run, agent) = (self.run, self.agent);
        let (bundle, plan, progress, session) =
            (&run.bundle, &run.plan, &run.progress, &run.session);
        let call_err = |call| LoadError::agent_call(agent, call);
        // A retried attempt sees the node afresh; only the bytes sent add up over attempts.
        report.images_loaded = 0;
        report.failed_images.clear();
        report.blobs_skipped = 0;
        report.bytes_skipped = 0;
        let (mut client, info) = identify(agent, &run.opts.dial, &**progress, report).await?;

        // A node that checks layers itself as it unpacks them needs no check here.
        let checks = run.checks.as_ref().filter(|_| !info.checks_layers);
        let (chosen, docker_keeps_own) = node_choices(bundle, &run.opts.platforms, &info);
        report.warnings = foreign_platform_warnings(bundle, &chosen, &info);
        if docker_keeps_own {
            progress.phase(
                agent,
                &format!(
                    "Docker keeps one platform per image: loading {}",
                    node_platform(&info)
                ),
            );
        }

        let have = client
            .have(HaveRequest {
                session: session.to_string(),
                blobs: have_descriptors(bundle, chosen.iter().flatten()),
            })
            .await
            .map_err(call_err("Have"))?
            .into_inner();

        let mut missing = missing_blobs(bundle, have.blobs, report);
        let to_send: u64 = missing
            .iter()
            .map(|(d, off)| bundle.blobs[d].size - off)
            .sum();
        check_space(bundle, agent, &info, &missing, run.sizes())?;
        progress.sending(agent, to_send, report.bytes_skipped);
        info!(
            missing = missing.len(),
            bytes = to_send,
            "sending missing blobs"
        );

        // Each layer the node unpacks, with what it needs to unpack it as soon as it is stored.
        let hints = unpack_hints(chosen.iter().flatten());
        if let Some(checks) = checks {
            let mut order: Vec<String> = Vec::new();
            for c in chosen.iter().flatten() {
                for d in c.blobs.iter().filter(|d| missing.contains_key(*d)) {
                    if !order.contains(d) {
                        order.push(d.clone());
                    }
                }
            }
            checks.prefetch(order);
        }

        // Pipelined: blobs go in the order the images need them, up to `BLOBS_IN_FLIGHT` at
        // once (the next one streams while the node commits the one before), and each image
        // is imported as soon as all of its own are on the node, while the next image's blobs
        // stream.
        let mut imports = tokio::task::JoinSet::new();
        // Blobs of the bundle found bad on the way (digest or layer check), with why: every image
        // using one fails, alone; the others load.
        let mut bad: HashMap<&str, String> = HashMap::new();
        let mut in_flight = futures::stream::FuturesOrdered::new();
        // Images whose blobs are all sent or on their way, each with the number of uploads
        // started before it was: it imports (or fails) once that many have finished.
        let mut waiting = Waiting::default();
        let (mut started, mut finished) = (0usize, 0usize);
        // Told when the latest upload has handed over its last chunk.
        let mut streaming: Option<tokio::sync::oneshot::Receiver<()>> = None;
        for (chosen, planned) in chosen.iter().zip(plan.iter()) {
            let chosen = match chosen {
                Ok(chosen) => chosen,
                Err(reason) => {
                    report.failed_images.push(FailedImage {
                        image: planned.source.clone(),
                        reason: reason.clone(),
                    });
                    continue;
                }
            };
            for digest in &chosen.blobs {
                if bad.contains_key(digest.as_str()) {
                    break; // The image fails; the rest of it need not be sent.
                }
                let Some(offset) = missing.remove(digest) else {
                    continue;
                };
                // One blob streams at a time, in order: the next starts once the one before
                // is handed over whole (its upload driven meanwhile), while the node still
                // commits it; and no more than BLOBS_IN_FLIGHT wait for their answers.
                loop {
                    if streaming.is_none() && in_flight.len() < BLOBS_IN_FLIGHT {
                        break;
                    }
                    let streamed = match &mut streaming {
                        Some(rx) => futures::future::Either::Left(rx),
                        None => futures::future::Either::Right(futures::future::pending()),
                    };
                    let handed_over = tokio::select! {
                        _ = streamed => true,
                        // Uploads finish in the order they started.
                        Some(done) = in_flight.next() => {
                            finished += 1;
                            sent_or_bad(done, report, &mut bad)?;
                            waiting.import_ready(finished, &bad, report, |chosen, planned| {
                                let spec = import_spec(bundle, chosen, planned);
                                imports.spawn(import(client.clone(), session.to_string(), spec));
                            });
                            in_flight.is_empty()
                        }
                    };
                    if handed_over {
                        streaming = None;
                    }
                }
                let (streamed, streaming_now) = tokio::sync::oneshot::channel();
                streaming = Some(streaming_now);
                let hint = hints.get(digest.as_str()).cloned();
                let client = client.clone();
                in_flight.push_back(async move {
                    let sent = self
                        .put_blob(client, digest, offset, hint, checks, streamed)
                        .await;
                    (digest.as_str(), sent)
                });
                started += 1;
            }
            waiting.images.push_back((chosen, planned, started));
            waiting.import_ready(finished, &bad, report, |chosen, planned| {
                let spec = import_spec(bundle, chosen, planned);
                imports.spawn(import(client.clone(), session.to_string(), spec));
            });
        }
        while let Some(done) = in_flight.next().await {
            finished += 1;
            sent_or_bad(done, report, &mut bad)?;
            waiting.import_ready(finished, &bad, report, |chosen, planned| {
                let spec = import_spec(bundle, chosen, planned);
                imports.spawn(import(client.clone(), session.to_string(), spec));
            });
        }
        progress.phase(agent, "importing");
        while let Some(joined) = imports.join_next().await {
            let events = joined
                .expect("import task panicked")
                .map_err(call_err("Import"))?;
            report.count_imports(events);
        }

        progress.phase(agent, "verifying");
        let record = held(bundle, plan, &chosen, agent, &run.opts.agents);
        verify_and_end(&mut client, plan, &chosen, session, agent, record, report).await
    }

    /// Streams one blob from `offset`; returns the bytes sent. The node commits it only if
    /// its digest matches (a refusal is traced back to the bundle's member); a layer that
    /// fails its check withholds the last chunk.
    #[instrument(skip_all, fields(digest = %digest, offset = offset))]
    async fn put_blob(
        &self,
        mut client: AgentConn,
        digest: &str,
        offset: u64,
        unpack: Option<UnpackHint>,
        checks: Option<&Arc<LayerChecks>>,
        streamed: tokio::sync::oneshot::Sender<()>,
    ) -> Result<u64, LoadError> {
        let (run, agent) = (self.run, self.agent);
        let (bundle, session, progress) = (&run.bundle, &run.session, &run.progress);
        let blob = &bundle.blobs[digest];
        let (tx, rx) = mpsc::channel::<PutBlobRequest>(4);
        let header = PutBlobRequest {
            msg: Some(Msg::Header(BlobHeader {
                session: session.to_string(),
                blob: Some(descriptor(blob)),
                offset,
                unpack,
                ..Default::default()
            })),
        };
        tx.send(header)
            .await
            .expect("receiver is alive until the call starts");

        let (count_tx, mut count_rx) = mpsc::unbounded_channel::<u64>();
        let reader = stream_chunks(bundle, digest, offset, checks, tx, Some(count_tx));
        // Told as soon as the last chunk is handed over, whether or not anyone polls this.
        let reader = tokio::spawn(async move {
            let read = reader.await;
            let _ = streamed.send(());
            read
        });
        let call = client.put_blob(ReceiverStream::new(rx));
        tokio::pin!(call);
        let response = loop {
            tokio::select! {
                res = &mut call => break res,
                Some(n) = count_rx.recv() => progress.sent(agent, n),
            }
        };
        while let Ok(n) = count_rx.try_recv() {
            progress.sent(agent, n);
        }
        let read = reader
            .await
            .expect("blob reader task panicked")
            .expect("blob reader task panicked");
        // The bundle's own error explains a refused upload better than the agent's view of it.
        let sent = read?;
        if let Err(status) = response {
            if let Some(e) = bundle_fault(bundle, digest, &status).await {
                return Err(e);
            }
            return Err(LoadError::agent_call(agent, "PutBlob")(status));
        }
        Ok(sent)
    }
}

/// Blob uploads to one node at once: while one is committed (containerd syncs it to disk), the
/// next one streams (only one streams at a time, so blobs still arrive in order).
const BLOBS_IN_FLIGHT: usize = 2;

/// Counts a finished upload of `digest`: sent, or found bad (recorded in `bad`, failing the
/// images that use it); any other error ends the attempt at the node.
fn sent_or_bad<'a>(
    (digest, sent): (&'a str, Result<u64, LoadError>),
    report: &mut NodeReport,
    bad: &mut HashMap<&'a str, String>,
) -> Result<(), LoadError> {
    match sent {
        Ok(sent) => {
            report.blobs_sent += 1;
            report.bytes_sent += sent;
        }
        Err(e) if e.is_bad_content() => {
            bad.insert(digest, e.to_string());
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

/// Images waiting for their uploads, in order: each with the number of uploads that must
/// have finished before it imports.
#[derive(Default)]
struct Waiting<'a> {
    images: std::collections::VecDeque<(&'a Chosen, &'a PlannedImage, usize)>,
}

impl<'a> Waiting<'a> {
    /// Every image at the front whose uploads have finished: failed if one of its blobs is
    /// bad, else handed to `import`.
    fn import_ready(
        &mut self,
        finished: usize,
        bad: &HashMap<&str, String>,
        report: &mut NodeReport,
        mut import: impl FnMut(&'a Chosen, &'a PlannedImage),
    ) {
        while let Some(&(chosen, planned, needs)) = self.images.front() {
            if needs > finished {
                break;
            }
            self.images.pop_front();
            match chosen.blobs.iter().find_map(|d| bad.get(d.as_str())) {
                Some(reason) => report.failed_images.push(FailedImage {
                    image: planned.source.clone(),
                    reason: reason.clone(),
                }),
                None => import(chosen, planned),
            }
        }
    }
}
