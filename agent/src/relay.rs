//! Relay: an agent that receives a blob passes it on to other agents while it arrives.
//!
//! A PutBlob whose header carries a `forward` tree (or `pass_through`) is handled here
//! instead of going straight to the runtime. Each chunk read from the caller is handed, in
//! turn, to this node's own runtime (unless it already holds the blob) and to one PutBlob
//! stream per direct child, each cut to the bytes that child's subtree still needs. The
//! channels to the sinks hold a few chunks, so the slowest sink sets the pace (back-pressure)
//! instead of the blob piling up in memory. Every hop stores through the runtime's own
//! `put_blob`, which hashes and commits only on a digest match, so each node verifies the
//! blob itself.
//!
//! A child that cannot be reached or breaks off is reported in the answer (`relayed`) and
//! the others go on; the nodes below it get no result, which tells the coordinator to send
//! them the blob another way. If the caller's own stream breaks, every child call is
//! dropped, so no node below commits a partial blob.
//!
//! Agents call each other with the credentials they accept: the bearer token of
//! `--auth-token-file`, and with TLS, their own certificate as client certificate and
//! `--peer-tls-ca` (default: `--tls-client-ca`) to check the peer's server certificate.
//!
//! A forward tree names its targets, so whoever may call this agent could point it at any
//! address. An agent therefore dials only peers it can tell are agents of its deployment:
//! over TLS, servers whose certificate the peer CA signed (checked before any header is
//! sent); without TLS, IP addresses in `--peer-cidr` (none by default). Any other target is
//! refused before a connection is opened, so the token never leaves for it. The tree's
//! breadth is bounded too ([`MAX_CHILDREN`], [`MAX_HOPS`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use ipnet::IpNet;
use lade_proto::{
    put_blob_request::Msg, AgentConn, BearerAuth, BlobHeader, ClientConfig, DialError, KeepAlive,
    PutBlobRequest, PutBlobResponse, RelayHop, RelayResult,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, ClientTlsConfig};
use tracing::{debug, info, warn};

use crate::error::Error;
use crate::metrics::Metrics;
use crate::runtime::Runtime;

/// Chunks queued per sink: a slow sink stalls the stream after this many.
const SINK_DEPTH: usize = 4;

/// Direct children one hop of a forward tree may have: each is a stream this agent feeds.
pub const MAX_CHILDREN: usize = 64;

/// Hops a whole forward tree may hold (a cluster's worth of nodes).
pub const MAX_HOPS: usize = 10_000;

/// How this agent reaches and authenticates to the agents it forwards to.
pub struct Peers {
    /// Token, TLS and connection settings of every dial.
    config: ClientConfig,
    /// Why relaying cannot work with this configuration (TLS without a CA to check peers).
    unusable: Option<String>,
    /// Networks whose addresses may be dialed without TLS (`--peer-cidr`).
    plaintext_peers: Vec<IpNet>,
    channels: Mutex<HashMap<String, Channel>>,
}

impl Default for Peers {
    /// No credentials: for agents run with `--insecure-no-auth` and no TLS.
    fn default() -> Self {
        // A peer that vanishes without a reset is noticed within a minute.
        let keep_alive = KeepAlive {
            interval: Duration::from_secs(15),
            timeout: Some(Duration::from_secs(20)),
            while_idle: true,
        };
        Peers {
            // Peers share a LAN: 1 MiB in flight per call covers its bandwidth-delay product
            // (1 GB/s at a millisecond), and bounds what the calls of one agent buffer while
            // its runtime writes slower than the peer sends (2 fetches of its own, and the
            // forwarding of older coordinators' trees).
            config: ClientConfig::new(Duration::from_secs(10), keep_alive)
                .with_windows(1 << 20, 2 << 20),
            unusable: None,
            plaintext_peers: Vec::new(),
            channels: Mutex::new(HashMap::new()),
        }
    }
}

impl Peers {
    /// Presents `token` (the agent's own) as bearer token to its peers.
    pub fn with_token(mut self, token: &str) -> Result<Peers, Error> {
        let auth = BearerAuth::token(token).map_err(|e| Error::InvalidRequest(e.to_string()))?;
        self.config = self.config.with_auth(auth);
        Ok(self)
    }

    /// Dials peers with TLS as `tls` says.
    pub fn with_tls(mut self, tls: ClientTlsConfig) -> Peers {
        self.config = self.config.with_tls(Some(tls));
        self
    }

    /// Relaying is refused with `reason` (asked for, it fails with this message).
    pub fn unusable(mut self, reason: String) -> Peers {
        self.unusable = Some(reason);
        self
    }

    /// Without TLS, dials peers at IP addresses in `nets`.
    pub fn with_plaintext_peers(mut self, nets: Vec<IpNet>) -> Peers {
        self.plaintext_peers = nets;
        self
    }

    /// Whether `address` may be dialed: over TLS any (the peer CA vouches for the server
    /// before the token is sent); without TLS, only an `ip:port` in `--peer-cidr`.
    pub fn admit(&self, address: &str) -> Result<(), Error> {
        if self.config.uses_tls() {
            return Ok(());
        }
        let refuse = |why: &str| {
            Err(Error::RelayTargetRefused {
                address: address.to_string(),
                reason: why.to_string(),
            })
        };
        let Ok(addr) = address.parse::<SocketAddr>() else {
            return refuse("without TLS a relay target must be an ip:port address in --peer-cidr");
        };
        let ip = addr.ip().to_canonical();
        if self.plaintext_peers.iter().any(|net| net.contains(&ip)) {
            return Ok(());
        }
        refuse(
            "without TLS this agent relays only to addresses in --peer-cidr \
             (set it to the cluster's pod network, or serve TLS)",
        )
    }

    pub(crate) async fn client(&self, address: &str) -> Result<AgentConn, String> {
        if let Some(reason) = &self.unusable {
            return Err(reason.clone());
        }
        self.admit(address).map_err(|e| e.to_string())?;
        let cached = self
            .channels
            .lock()
            .expect("peer channels lock")
            .get(address)
            .cloned();
        let channel = match cached {
            Some(c) => c,
            None => {
                let channel = self.config.channel(address).await.map_err(|e| match &e {
                    DialError::Address(_) => format!("{address} is {e}"),
                    DialError::Tls(tls) => format!("TLS to {address}: {tls}"),
                    DialError::Connect(_) => format!("cannot reach agent {address}: {e}"),
                })?;
                self.channels
                    .lock()
                    .expect("peer channels lock")
                    .insert(address.to_string(), channel.clone());
                channel
            }
        };
        Ok(self.config.client(channel))
    }

    /// Forgets the connection to `address` when `status` says the connection itself failed.
    pub(crate) fn forget_after(&self, address: &str, status: &tonic::Status) {
        if matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        ) {
            self.forget(address);
        }
    }

    /// Forgets the connection to `address` (after it failed), so the next blob dials anew.
    pub(crate) fn forget(&self, address: &str) {
        self.channels
            .lock()
            .expect("peer channels lock")
            .remove(address);
    }
}

/// One place the incoming stream goes: this node's runtime or a child agent.
struct Sink {
    /// Blob offset of the first byte this sink takes.
    start: u64,
    tx: Option<mpsc::Sender<Bytes>>,
}

impl Sink {
    /// Hands the part of `chunk` (at blob offset `pos`) this sink needs on; false once the
    /// sink is gone.
    async fn feed(&mut self, pos: u64, chunk: &Bytes) -> bool {
        let Some(tx) = &self.tx else {
            return false;
        };
        let end = pos + chunk.len() as u64;
        if end <= self.start {
            return true;
        }
        let skip = self.start.saturating_sub(pos) as usize;
        if tx.send(chunk.slice(skip..)).await.is_err() {
            self.tx = None;
            return false;
        }
        true
    }
}

/// A call to a child agent: its answer, or why it failed.
type ChildCall = JoinHandle<Result<PutBlobResponse, String>>;

/// Checks that the forward tree asks for nothing the stream cannot give, is not deeper than
/// 64, wider than [`MAX_CHILDREN`] at any hop or larger than [`MAX_HOPS`] in all. `hops`
/// counts the hops seen so far. (Each target is admitted or refused when it is dialed, so a
/// refused one is reported as lost and the coordinator sends to its subtree directly.)
fn check_tree(
    hop: &RelayHop,
    stream_start: u64,
    size: u64,
    depth: usize,
    hops: &mut usize,
) -> Result<(), Error> {
    if depth > 64 {
        return Err(Error::InvalidRequest(
            "relay tree deeper than 64 hops".into(),
        ));
    }
    *hops += 1;
    if *hops > MAX_HOPS {
        return Err(Error::RelayTreeTooLarge {
            what: "hops in all",
            limit: MAX_HOPS,
        });
    }
    if hop.forward.len() > MAX_CHILDREN {
        return Err(Error::RelayTreeTooLarge {
            what: "direct children of one hop",
            limit: MAX_CHILDREN,
        });
    }
    if hop.address.is_empty() {
        return Err(Error::InvalidRequest("relay hop without an address".into()));
    }
    if hop.store && (hop.offset < stream_start || hop.offset > size) {
        return Err(Error::InvalidRequest(format!(
            "relay hop {}: resume offset {} outside the stream [{stream_start}, {size}]",
            hop.address, hop.offset
        )));
    }
    for child in &hop.forward {
        check_tree(child, stream_start, size, depth + 1, hops)?;
    }
    Ok(())
}

/// Handles a PutBlob that asks this agent to pass the blob on: stores it here (unless
/// `pass_through`) and streams it to `header.forward` at the same time.
pub async fn put_blob<R: Runtime>(
    runtime: Arc<R>,
    peers: Arc<Peers>,
    metrics: Metrics,
    header: BlobHeader,
    mut upstream: BoxStream<'static, Result<Bytes, Error>>,
) -> Result<PutBlobResponse, Error> {
    let blob = header
        .blob
        .clone()
        .ok_or_else(|| Error::InvalidRequest("PutBlob header has no descriptor".into()))?;
    let digest = blob.digest.clone();
    let stream_start = header.offset;
    if stream_start > blob.size {
        return Err(Error::InvalidRequest(format!(
            "blob {digest}: offset {stream_start} beyond its size {}",
            blob.size
        )));
    }
    if !header.pass_through && header.store_offset < stream_start {
        return Err(Error::InvalidRequest(format!(
            "blob {digest}: store offset {} before the stream's start {stream_start}",
            header.store_offset
        )));
    }
    if header.forward.len() > MAX_CHILDREN {
        return Err(Error::RelayTreeTooLarge {
            what: "direct children of one hop",
            limit: MAX_CHILDREN,
        });
    }
    let mut hops = 0;
    for hop in &header.forward {
        check_tree(hop, stream_start, blob.size, 1, &mut hops)?;
    }

    // This node's own copy, through the runtime's verified write.
    let mut local_sink = None;
    let local = if header.pass_through {
        None
    } else {
        let (tx, rx) = mpsc::channel::<Bytes>(SINK_DEPTH);
        let (err_tx, err_rx) = mpsc::channel::<Error>(1);
        local_sink = Some((
            Sink {
                start: header.store_offset,
                tx: Some(tx),
            },
            err_tx,
        ));
        // Data, then (only if the caller broke off) the error that stops the write.
        let chunks = ReceiverStream::new(rx)
            .map(Ok)
            .chain(ReceiverStream::new(err_rx).map(Err))
            .boxed();
        let local_header = BlobHeader {
            session: header.session.clone(),
            blob: Some(blob.clone()),
            offset: header.store_offset,
            ..Default::default()
        };
        let runtime = runtime.clone();
        Some(tokio::spawn(async move {
            runtime.put_blob(local_header, chunks).await
        }))
    };

    // One PutBlob stream per direct child that has anyone below needing the blob.
    let mut children: Vec<(RelayHop, Sink, ChildCall)> = Vec::new();
    for hop in &header.forward {
        let Some(start) = hop.stream_start() else {
            continue;
        };
        let (tx, rx) = mpsc::channel::<Bytes>(SINK_DEPTH);
        let child_header = PutBlobRequest {
            msg: Some(Msg::Header(BlobHeader {
                session: header.session.clone(),
                blob: Some(blob.clone()),
                offset: start,
                forward: hop.forward.clone(),
                pass_through: !hop.store,
                store_offset: if hop.store { hop.offset } else { start },
                // Each node below unpacks the layer as soon as it has stored it, too.
                unpack: header.unpack.clone(),
            })),
        };
        let relayed = metrics.relay_bytes.clone();
        let requests = futures::stream::once(async move { child_header }).chain(
            ReceiverStream::new(rx).map(move |c| {
                relayed.inc_by(c.len() as u64);
                PutBlobRequest {
                    msg: Some(Msg::Chunk(c)),
                }
            }),
        );
        let (peers, address) = (peers.clone(), hop.address.clone());
        let task = tokio::spawn(async move {
            let mut client = peers.client(&address).await?;
            match client.put_blob(requests).await {
                Ok(r) => Ok(r.into_inner()),
                Err(status) => {
                    peers.forget_after(&address, &status);
                    Err(format!(
                        "agent {address}: PutBlob failed: {} ({:?})",
                        status.message(),
                        status.code()
                    ))
                }
            }
        });
        children.push((
            hop.clone(),
            Sink {
                start,
                tx: Some(tx),
            },
            task,
        ));
    }
    debug!(%digest, children = children.len(), pass_through = header.pass_through, "relaying blob");

    // The pump: each chunk to every sink still there; the slowest sets the pace.
    let mut pos = stream_start;
    let mut broken = None;
    while let Some(item) = upstream.next().await {
        let chunk = match item {
            Ok(c) => c,
            Err(e) => {
                broken = Some(e);
                break;
            }
        };
        let mut feeds = Vec::with_capacity(children.len() + 1);
        if let Some((sink, _)) = local_sink.as_mut() {
            feeds.push(futures::FutureExt::boxed(sink.feed(pos, &chunk)));
        }
        for (_, sink, _) in children.iter_mut() {
            feeds.push(futures::FutureExt::boxed(sink.feed(pos, &chunk)));
        }
        futures::future::join_all(feeds).await;
        pos += chunk.len() as u64;
    }

    if let Some(e) = broken {
        // The caller is gone: stop everything below without letting anything commit.
        warn!(%digest, error = %e, "relayed upload broken off by the sender");
        for (_, _, task) in &children {
            task.abort();
        }
        if let Some((sink, err_tx)) = local_sink.take() {
            drop(sink);
            let _ = err_tx.try_send(Error::Cancelled {
                digest: digest.clone(),
            });
        }
        if let Some(local) = local {
            let _ = local.await;
        }
        return Err(e);
    }
    // End of stream for every sink.
    drop(local_sink);
    for (_, sink, _) in children.iter_mut() {
        sink.tx = None;
    }

    let mut relayed = Vec::new();
    for (hop, _, task) in children {
        let outcome = match task.await {
            Ok(r) => r,
            Err(e) => Err(format!("agent {}: relay task ended: {e}", hop.address)),
        };
        match outcome {
            Ok(resp) => {
                relayed.push(RelayResult {
                    address: hop.address.clone(),
                    ok: resp.local_error.is_empty(),
                    received: resp.received,
                    already_present: resp.already_present,
                    error: resp.local_error,
                    pass_through: !hop.store,
                    lost: false,
                });
                relayed.extend(resp.relayed);
            }
            Err(error) => {
                info!(%digest, child = %hop.address, %error, "relay to a child failed");
                metrics.failures.with_label_values(&["relay"]).inc();
                relayed.push(RelayResult {
                    address: hop.address.clone(),
                    ok: false,
                    error,
                    pass_through: !hop.store,
                    lost: true,
                    ..Default::default()
                });
            }
        }
    }

    let mut response = PutBlobResponse {
        digest: digest.clone(),
        relayed,
        ..Default::default()
    };
    match local {
        None => response.already_present = true,
        Some(task) => match task.await {
            Ok(Ok(own)) => {
                response.received = own.received;
                response.already_present = own.already_present;
                if own.already_present {
                    metrics.blobs_present.inc();
                } else {
                    metrics.blobs_committed.inc();
                }
            }
            Ok(Err(e)) => {
                response.local_error = e.to_string();
                metrics.failed(&tonic::Status::from(e));
            }
            Err(e) => response.local_error = format!("storing blob {digest}: {e}"),
        },
    }
    Ok(response)
}
