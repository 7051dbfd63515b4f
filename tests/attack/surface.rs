//! Attacks on the agent's ports and relay: callers without the token on every RPC, relay
//! trees that point the agent at an address of the attacker's choosing or fan out without
//! bound, slow clients on the unauthenticated side port. Needs containerd (see tests/load.rs).

use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lade::load::{connect, Credentials, Dial};
use lade_proto::{put_blob_request::Msg, BlobHeader, Descriptor, PutBlobRequest, RelayHop};
use lade_testkit::fixtures::blob_digest;
use lade_testkit::harness::daemon_tests_enabled;
use lade_testkit::nodes::{Node, TEST_TOKEN};
use prost::Message;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::Code;

/// Connections accepted, and bytes read from them, by a listener that never answers.
#[derive(Default)]
struct Recorded {
    connections: AtomicUsize,
    bytes: AtomicUsize,
}

impl Recorded {
    /// Waits a moment for a connection attempt, had there been one, then asserts there was
    /// none.
    async fn assert_untouched(&self) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(self.connections.load(Ordering::SeqCst), 0);
        assert_eq!(self.bytes.load(Ordering::SeqCst), 0);
    }
}

/// Listens on `ip` (any free port) and records whatever arrives; returns its address.
async fn recorder(ip: &str) -> Result<(String, Arc<Recorded>)> {
    let listener = tokio::net::TcpListener::bind((ip, 0))
        .await
        .with_context(|| format!("binding a recorder on {ip}"))?;
    let addr = listener.local_addr()?.to_string();
    let seen = Arc::new(Recorded::default());
    let counts = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counts.connections.fetch_add(1, Ordering::SeqCst);
            let counts = counts.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    counts.bytes.fetch_add(n, Ordering::SeqCst);
                }
            });
        }
    });
    Ok((addr, seen))
}

/// Whether the agent at `client` holds `desc` (for session `attack`).
async fn holds(client: &mut lade::load::AgentConn, desc: &Descriptor) -> Result<bool> {
    let have = client
        .have(lade_proto::HaveRequest {
            session: "attack".into(),
            blobs: vec![desc.clone()],
        })
        .await?
        .into_inner();
    Ok(have.blobs[0].present)
}

/// A small blob and the PutBlob messages that store it and forward it to `forward`.
fn relay_request(forward: Vec<RelayHop>) -> (Descriptor, Vec<PutBlobRequest>) {
    let blob = b"a blob the attacker asks to be relayed".to_vec();
    let desc = Descriptor {
        digest: blob_digest(&blob),
        size: blob.len() as u64,
        ..Default::default()
    };
    let messages = vec![
        PutBlobRequest {
            msg: Some(Msg::Header(BlobHeader {
                session: "attack".into(),
                blob: Some(desc.clone()),
                forward,
                ..Default::default()
            })),
        },
        PutBlobRequest {
            msg: Some(Msg::Chunk(blob.into())),
        },
    ];
    (desc, messages)
}

fn hop(address: &str) -> RelayHop {
    RelayHop {
        address: address.into(),
        store: true,
        offset: 0,
        forward: vec![],
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_never_presents_the_token_to_an_address_outside_peer_cidr() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    // The harness's agents accept 127.0.0.1/32 as peers; 127.0.0.2 is also this machine's
    // loopback, but not in the list.
    let node = Node::start("relay-target").await?;
    let (outside, seen) = recorder("127.0.0.2").await?;
    let (desc, messages) = relay_request(vec![hop(&outside), hop("attacker.example:7700")]);
    let mut client = connect(&node.addr(), &lade_tests::dial()).await?;
    let resp = client
        .put_blob(tokio_stream::iter(messages))
        .await?
        .into_inner();

    // The node stores its own copy; both targets are refused before any connection.
    assert!(resp.local_error.is_empty(), "{resp:?}");
    assert_eq!(resp.relayed.len(), 2, "{resp:?}");
    for result in &resp.relayed {
        assert!(!result.ok && result.lost, "{result:?}");
        assert!(
            result
                .error
                .contains(&format!("relay target {} refused", result.address))
                && result.error.contains("--peer-cidr"),
            "{result:?}"
        );
    }
    seen.assert_untouched().await;
    assert!(holds(&mut client, &desc).await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relay_tree_wider_than_the_cap_is_refused_and_writes_nothing() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let node = Node::start("relay-wide").await?;
    let (outside, seen) = recorder("127.0.0.1").await?;
    let children = (0..=lade_agent::relay::MAX_CHILDREN)
        .map(|_| hop(&outside))
        .collect();
    let (desc, messages) = relay_request(children);
    let mut client = connect(&node.addr(), &lade_tests::dial()).await?;
    let err = client
        .put_blob(tokio_stream::iter(messages))
        .await
        .expect_err("a relay wider than the cap must be refused");
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(
        err.message().contains(&format!(
            "more than {} direct children",
            lade_agent::relay::MAX_CHILDREN
        )),
        "{err}"
    );
    seen.assert_untouched().await;
    assert!(!holds(&mut client, &desc).await?);
    Ok(())
}

/// Every method of every service in the agent's descriptor, as gRPC paths.
fn every_rpc() -> Result<Vec<String>> {
    let set = prost_types::FileDescriptorSet::decode(lade_proto::FILE_DESCRIPTOR_SET)?;
    let mut paths = Vec::new();
    for file in &set.file {
        for service in &file.service {
            for method in &service.method {
                paths.push(format!(
                    "/{}.{}/{}",
                    file.package(),
                    service.name(),
                    method.name()
                ));
            }
        }
    }
    Ok(paths)
}

/// Calls `path` with one empty message, presenting `token` if given; returns the status.
async fn call_raw(addr: &str, path: &str, token: Option<&str>) -> Result<Code> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await?;
    let mut req = tonic::Request::new(());
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse()?);
    }
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let path = PathAndQuery::try_from(path)?;
    Ok(match grpc.unary(req, path, codec).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn every_rpc_refuses_a_caller_without_the_token_and_the_token_leaks_nowhere() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let node = Node::start("every-rpc").await?;
    let content_before = node
        .containerd
        .ctr_ok(&["-n", "k8s.io", "content", "ls", "-q"])?;
    let rpcs = every_rpc()?;
    assert!(
        rpcs.contains(&"/lade.agent.v1.Agent/PutBlob".to_string()),
        "{rpcs:?}"
    );
    for path in &rpcs {
        for token in [None, Some("not-the-token")] {
            let code = call_raw(&node.addr(), path, token).await?;
            assert_eq!(code, Code::Unauthenticated, "{path} with {token:?}");
        }
        // The same call with the token reaches the method (whatever it makes of it).
        let code = call_raw(&node.addr(), path, Some(TEST_TOKEN)).await?;
        assert_ne!(code, Code::Unauthenticated, "{path} with the token");
    }
    let content_after = node
        .containerd
        .ctr_ok(&["-n", "k8s.io", "content", "ls", "-q"])?;
    assert_eq!(content_before, content_after);
    assert!(node.all_image_names()?.is_empty());

    // The token is in no answer, metric or log line, even after failed calls.
    let info = connect(&node.addr(), &lade_tests::dial())
        .await?
        .info(lade_proto::InfoRequest {})
        .await?
        .into_inner();
    assert!(!format!("{info:?}").contains(TEST_TOKEN), "{info:?}");
    for path in ["/metrics", "/healthz", "/readyz"] {
        let (_, body) = lade_tests::http_get(node.agent.metrics_port(), path)?;
        assert!(!body.contains(TEST_TOKEN), "{path}: {body}");
    }
    let wrong = Dial {
        timeout: Duration::from_secs(5),
        credentials: Credentials::token(&format!("{TEST_TOKEN}-guess"))?,
    };
    let err = connect(&node.addr(), &wrong)
        .await?
        .info(lade_proto::InfoRequest {})
        .await
        .unwrap_err();
    assert!(!err.to_string().contains(TEST_TOKEN), "{err}");
    let log = std::fs::read_to_string(node.agent.log())?;
    assert!(!log.contains(TEST_TOKEN), "the agent log holds the token");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_client_on_the_side_port_is_cut_off() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let node = Node::start("slowloris").await?;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", node.agent.metrics_port()))?;
    // Half a request head, then nothing: the agent must close the connection.
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\n")?;
    let limit = lade_agent::http::HEADER_READ_TIMEOUT + Duration::from_secs(10);
    stream.set_read_timeout(Some(limit))?;
    let started = Instant::now();
    let mut rest = Vec::new();
    let closed = stream.read_to_end(&mut rest);
    assert!(
        closed.is_ok(),
        "the side port kept a half-sent request open for {:?}: {closed:?}",
        started.elapsed()
    );
    assert!(!String::from_utf8_lossy(&rest).contains("lade_agent_"));
    Ok(())
}

/// A registry speaking plain HTTP/1.1 on 127.0.0.1 that answers `/v2/` with `challenge`
/// (200 once the request carries credentials) and every other path with a redirect to
/// `redirect`; anything that is not an HTTP request (a TLS hello) is hung up on. It answers
/// one request per connection and says so (`connection: close`), or a client reusing the
/// connection would now and then find it reset.
async fn hostile_registry(challenge: String, redirect: String) -> Result<String> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let host = listener.local_addr()?.to_string();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut stream, _)) = listener.accept().await {
            let (challenge, redirect) = (challenge.clone(), redirect.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 << 10];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(n) if n > 0 && buf[..n].is_ascii() => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                let head = String::from_utf8_lossy(&head).to_lowercase();
                let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                let answer = if path == "/v2/" && head.contains("\r\nauthorization:") {
                    "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n".to_string()
                } else if path == "/v2/" {
                    format!(
                        "HTTP/1.1 401 Unauthorized\r\nwww-authenticate: {challenge}\r\n\
                         connection: close\r\ncontent-length: 0\r\n\r\n"
                    )
                } else {
                    format!(
                        "HTTP/1.1 307 Temporary Redirect\r\nlocation: {redirect}\r\n\
                         connection: close\r\ncontent-length: 0\r\n\r\n"
                    )
                };
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    Ok(host)
}

fn insecure_login() -> lade::push::registry::Access {
    lade::push::registry::Access {
        login: Some(lade::push::registry::Login {
            username: "alice".into(),
            password: "s3cret".into(),
        }),
        tls: lade::push::registry::Tls::Insecure,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn push_follows_no_redirect_to_another_origin() -> Result<()> {
    // Another port of the same host is another origin, as is another host.
    for ip in ["127.0.0.1", "127.0.0.2"] {
        let (elsewhere, seen) = recorder(ip).await?;
        let host = hostile_registry(
            r#"Basic realm="hostile""#.into(),
            format!("http://{elsewhere}/v2/stolen"),
        )
        .await?;
        let registry = lade::push::registry::Registry::connect(&host, &insecure_login()).await?;
        let err = registry
            .has_blob("demo/app", &blob_digest(b"x"))
            .await
            .expect_err("a redirect to another origin must fail");
        assert!(err.to_string().contains("refusing the redirect"), "{err:?}");
        seen.assert_untouched().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn push_sends_its_login_to_no_plain_http_realm_on_another_host() -> Result<()> {
    let (elsewhere, seen) = recorder("127.0.0.2").await?;
    let host = hostile_registry(
        format!(r#"Bearer realm="http://{elsewhere}/token",service="hostile""#),
        String::new(),
    )
    .await?;
    let err = lade::push::registry::Registry::connect(&host, &insecure_login())
        .await
        .err()
        .expect("the login must not go to another host's realm");
    let text = err.to_string();
    assert!(
        text.contains("refusing to send the login to token realm") && !text.contains("s3cret"),
        "{text}"
    );
    seen.assert_untouched().await;
    Ok(())
}

/// PutBlob messages for a blob of `size` bytes (blob number `n`: each its own digest) that
/// send the header and `sent`, then nothing more while the stream stays open.
fn stalled_upload(
    n: usize,
    sent: &'static [u8],
    size: u64,
) -> impl tokio_stream::Stream<Item = PutBlobRequest> + Send + 'static {
    use tokio_stream::StreamExt;
    let desc = Descriptor {
        digest: blob_digest(format!("never completes {n}").as_bytes()),
        size,
        ..Default::default()
    };
    let mut messages = vec![PutBlobRequest {
        msg: Some(Msg::Header(BlobHeader {
            session: "attack".into(),
            blob: Some(desc),
            ..Default::default()
        })),
    }];
    if !sent.is_empty() {
        messages.push(PutBlobRequest {
            msg: Some(Msg::Chunk(sent.into())),
        });
    }
    tokio_stream::iter(messages).chain(tokio_stream::pending())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_upload_is_dropped_and_uploads_per_agent_are_capped() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let node = Node::start_with("stalled", &["--upload-stall-timeout", "2s"]).await?;
    // An upload that stops sending is dropped (not held until the caller goes away).
    let mut client = connect(&node.addr(), &lade_tests::dial()).await?;
    let err = tokio::time::timeout(
        Duration::from_secs(60),
        client.put_blob(stalled_upload(0, b"first bytes", 1 << 20)),
    )
    .await
    .context("a stalled upload was held open")?
    .expect_err("a stalled upload must fail");
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    assert!(err.message().contains("sent nothing for 2s"), "{err}");

    // More uploads than the cap, held open over two connections (each takes at most 64
    // streams): the ones beyond the cap are refused at once.
    let limit = lade_agent::service::MAX_UPLOADS;
    let mut calls = tokio::task::JoinSet::new();
    for c in 0..2 {
        let client = connect(&node.addr(), &lade_tests::dial()).await?;
        for i in 0..(limit / 2 + 1) {
            let mut client = client.clone();
            let n = 1 + c * limit + i;
            calls.spawn(async move { client.put_blob(stalled_upload(n, b"", 1 << 20)).await });
        }
    }
    let mut refused = 0;
    while let Some(call) = calls.join_next().await {
        let err = call?.expect_err("a held upload cannot succeed");
        match err.code() {
            Code::ResourceExhausted => {
                assert!(
                    err.message()
                        .contains(&format!("already takes {limit} uploads")),
                    "{err}"
                );
                refused += 1;
            }
            Code::DeadlineExceeded => {}
            other => panic!("{other:?}: {err}"),
        }
    }
    assert!(refused >= 1, "{} uploads at once were all taken", limit + 2);
    Ok(())
}
