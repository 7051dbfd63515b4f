//! The agent on a real node as an admin deploys it: every call authenticated (bearer token,
//! or mutual TLS), nothing written for a caller without the credential, metrics and probes
//! on the side port. Needs containerd (see tests/load.rs).

use std::process::Command;

use anyhow::{ensure, Result};
use lade::load::{connect, Credentials, Dial};
use lade_proto::{put_blob_request::Msg, BlobHeader, Descriptor, InfoRequest, PutBlobRequest};
use lade_testkit::certs::make_certs;
use lade_testkit::harness::{daemon_tests_enabled, free_port, Containerd};
use lade_testkit::nodes::{workspace_bin, Node, TEST_TOKEN};
use lade_tests::{dial, http_get, load_json, sample_bundle, u64_of};
use tonic::Code;

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not exported:\n{text}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn calls_without_the_token_are_refused_and_write_nothing() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let node = Node::start("guarded").await?;
    let content_before = node
        .containerd
        .ctr_ok(&["-n", "k8s.io", "content", "ls", "-q"])?;

    let blob = b"would-be layer bytes".to_vec();
    let desc = Descriptor {
        digest: lade_testkit::fixtures::blob_digest(&blob),
        size: blob.len() as u64,
        ..Default::default()
    };
    for (what, credentials) in [
        ("no token", Credentials::default()),
        ("wrong token", Credentials::token("not-the-token")?),
    ] {
        let dial = Dial {
            timeout: std::time::Duration::from_secs(5),
            credentials,
        };
        let mut client = connect(&node.addr(), &dial).await?;
        let err = client.info(InfoRequest {}).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{what}: {err}");
        let messages = vec![
            PutBlobRequest {
                msg: Some(Msg::Header(BlobHeader {
                    session: "intruder".into(),
                    blob: Some(desc.clone()),
                    offset: 0,
                    unpack: None,
                    ..Default::default()
                })),
            },
            PutBlobRequest {
                msg: Some(Msg::Chunk(blob.clone().into())),
            },
        ];
        let err = client
            .put_blob(tokio_stream::iter(messages))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{what}: {err}");
    }
    // Nothing was written: no content, no half-written ingest, no lease.
    let content_after = node
        .containerd
        .ctr_ok(&["-n", "k8s.io", "content", "ls", "-q"])?;
    assert_eq!(content_before, content_after);
    let active = node
        .containerd
        .ctr_ok(&["-n", "k8s.io", "content", "active"])?;
    assert!(!active.contains("lade-"), "{active}");
    let leases = node.containerd.ctr_ok(&["-n", "k8s.io", "leases", "ls"])?;
    assert!(!leases.contains("intruder"), "{leases}");

    // The right token opens the door.
    let mut client = connect(&node.addr(), &dial()).await?;
    assert_eq!(
        client.info(InfoRequest {}).await?.into_inner().node_name,
        "guarded"
    );

    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn lade_load_without_the_token_fails_naming_the_reason() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (bundle, _) = sample_bundle(dir.path())?;
    let node = Node::start("no-token").await?;
    let out = Command::new(workspace_bin("lade")?)
        .arg("load")
        .arg(&bundle)
        .args(["--agent", &node.addr(), "-o", "json", "--progress", "none"])
        .env_remove("LADE_AUTH_TOKEN")
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    let reports: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let error = reports[0]["error"].as_str().unwrap_or_default();
    assert!(error.contains("missing bearer token"), "{error}");
    assert_eq!(reports[0]["error_kind"], "auth", "{}", reports[0]);
    let names = node.image_names()?;
    assert!(names.is_empty(), "{names:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_refuses_to_start_without_a_credential() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let out = Command::new(workspace_bin("lade-agent")?)
        .args([
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--metrics-listen",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .env_remove("LADE_AUTH_TOKEN_FILE")
        .env_remove("LADE_INSECURE_NO_AUTH")
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--auth-token-file") && err.contains("--insecure-no-auth"),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_probes_tell_what_happened() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (bundle, _) = sample_bundle(dir.path())?;
    let mut node = Node::start("observed").await?;
    assert_eq!(http_get(node.agent.metrics_port(), "/healthz")?.0, 200);
    assert_eq!(http_get(node.agent.metrics_port(), "/readyz")?.0, 200);

    let (code, reports, stderr) = load_json(&bundle, &[node.addr()], &[])?;
    ensure!(code == 0, "{reports:#?}\n{stderr}");
    let sent = u64_of(&reports[0], "bytes_sent");
    let (status, text) = http_get(node.agent.metrics_port(), "/metrics")?;
    assert_eq!(status, 200);
    assert_eq!(
        metric(&text, "lade_agent_received_bytes_total") as u64,
        sent
    );
    assert_eq!(
        metric(&text, "lade_agent_blobs_committed_total") as u64,
        u64_of(&reports[0], "blobs_sent")
    );
    assert_eq!(
        metric(&text, "lade_agent_image_import_duration_seconds_count"),
        3.0
    );
    // Three distinct layers: the shared base, app's and sidecar's own.
    assert_eq!(
        metric(&text, "lade_agent_layer_unpack_duration_seconds_count"),
        3.0
    );
    assert_eq!(metric(&text, "lade_agent_inflight_uploads"), 0.0);
    assert!(
        text.contains("lade_agent_build_info{runtime=\"containerd\",version=\""),
        "{text}"
    );

    // Again: everything is already there, and the metrics say so.
    let (code, _, _) = load_json(&bundle, &[node.addr()], &[])?;
    assert_eq!(code, 0);
    let (_, text) = http_get(node.agent.metrics_port(), "/metrics")?;
    assert!(metric(&text, "lade_agent_blobs_already_present_total") > 0.0);
    assert_eq!(
        metric(&text, "lade_agent_received_bytes_total") as u64,
        sent
    );

    // Readiness follows the runtime: containerd gone, not ready; alive all the same.
    node.containerd.kill_9();
    let (status, body) = http_get(node.agent.metrics_port(), "/readyz")?;
    assert_eq!(status, 503, "{body}");
    assert_eq!(http_get(node.agent.metrics_port(), "/healthz")?.0, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_admits_only_clients_with_a_certificate() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let containerd = Containerd::start("mtls").await?;
    let certs = containerd.dir().join("certs");
    std::fs::create_dir_all(&certs)?;
    make_certs(
        &certs,
        &[
            (
                "server",
                "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth",
            ),
            ("client", "extendedKeyUsage=clientAuth"),
        ],
    )?;
    let ca = certs.join("ca.crt");
    let (_agent, addr) = lade_tests::spawn_tls_agent(
        "mtls",
        &containerd,
        &certs.join("server.crt"),
        &certs.join("server.key"),
        &ca,
    )
    .await?;
    let ca_pem = std::fs::read(&ca)?;
    let tls = || {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&ca_pem))
    };

    // With the client certificate (and the token): admitted.
    let identity = tonic::transport::Identity::from_pem(
        std::fs::read(certs.join("client.crt"))?,
        std::fs::read(certs.join("client.key"))?,
    );
    let good = Dial {
        timeout: std::time::Duration::from_secs(5),
        credentials: Credentials::token(TEST_TOKEN)?.with_tls(tls().identity(identity)),
    };
    let mut client = connect(&addr, &good).await?;
    assert_eq!(
        client.info(InfoRequest {}).await?.into_inner().node_name,
        "mtls"
    );

    // The token alone is not enough: the TLS handshake refuses a client without a certificate.
    let no_cert = Dial {
        timeout: std::time::Duration::from_secs(5),
        credentials: Credentials::token(TEST_TOKEN)?.with_tls(tls()),
    };
    let refused = match connect(&addr, &no_cert).await {
        Err(_) => true,
        Ok(mut c) => c.info(InfoRequest {}).await.is_err(),
    };
    assert!(refused, "a client without a certificate was admitted");
    // Plain text is refused too.
    let plain = match connect(&addr, &dial()).await {
        Err(_) => true,
        Ok(mut c) => c.info(InfoRequest {}).await.is_err(),
    };
    assert!(plain, "a plain-text client was admitted");
    Ok(())
}
