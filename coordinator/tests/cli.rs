//! The `lade` binary's command line: `inspect` output, exit codes on bad input, `--discover`
//! against a stand-in API server, and `--help` snapshots (set LADE_UPDATE_SNAPSHOTS=1 to
//! rewrite them after an intended change).

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use lade_testkit::fixtures::{
    sample_chart, sample_hints, sample_images_from_bytes, write_bundle, ArchiveFormat, Compression,
};

fn lade(args: &[&str]) -> Output {
    lade_with_env(args, &[])
}

/// Runs lade with `env` set, and outside any cluster: no in-cluster API to fall back to.
fn lade_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lade"))
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBECONFIG")
        .env_remove("LADE_AGENTS")
        .envs(env.iter().copied())
        .output()
        .expect("running lade")
}

fn sample_bundle(dir: &Path) -> std::path::PathBuf {
    let images = sample_images_from_bytes(b"not busybox".repeat(50));
    let images_tar = dir.join("images.tar");
    let mut out = BufWriter::new(File::create(&images_tar).unwrap());
    ArchiveFormat::Gcr
        .write(&images, Compression::Gzip, &mut out)
        .unwrap();
    out.flush().unwrap();
    let path = dir.join("demo.bundle.tar");
    let mut out = BufWriter::new(File::create(&path).unwrap());
    write_bundle(&images_tar, &sample_hints(), &sample_chart(), &mut out).unwrap();
    out.flush().unwrap();
    path
}

#[test]
fn inspect_lists_images_shared_layers_and_hints() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = sample_bundle(dir.path());
    let out = lade(&["inspect", bundle.to_str().unwrap(), "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["kind"], "bundle");
    assert_eq!(doc["format"], "docker-archive");
    assert_eq!(doc["images"].as_array().unwrap().len(), 3);
    let shared = doc["shared_layers"].as_array().unwrap();
    assert_eq!(shared.len(), 1, "{shared:?}");
    assert_eq!(shared[0]["images"].as_array().unwrap().len(), 3);
    let hints = &doc["hints"];
    assert_eq!(hints["templates"].as_array().unwrap().len(), 2);
    let paths: Vec<&str> = hints["value_paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(paths.contains(&".app.image.tag"), "{paths:?}");
    assert!(
        paths.contains(&".sidecar-agent.image.repository"),
        "{paths:?}"
    );
    assert_eq!(doc["chart_files"], 2);
    // Name and version from the chart (its Chart.yaml), not from the file name.
    assert_eq!(doc["identity"]["name"], "demo");
    assert_eq!(doc["identity"]["version"], "0.1.0");
    assert_eq!(doc["identity"]["from"], "chart");

    let text = lade(&["inspect", bundle.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("release.daocloud.io/demo/app:v1"), "{text}");
    assert!(text.contains("shared layers:"), "{text}");
    assert!(
        text.contains("bundle demo version 0.1.0 (from original-chart/Chart.yaml)"),
        "{text}"
    );
    assert!(
        text.contains(
            "used by release.daocloud.io/demo/app:v1, release.daocloud.io/demo/sidecar:v1, busybox"
        ),
        "{text}"
    );
}

#[test]
fn bad_input_exits_2_and_names_the_culprit() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.tar");
    let out = lade(&["inspect", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope.tar"), "{err}");

    let bundle = sample_bundle(dir.path());
    let out = lade(&[
        "load",
        bundle.to_str().unwrap(),
        "--agent",
        "127.0.0.1:1",
        "--retag",
        "release.daocloud.io/demo=10.0.0.1/Demo",
    ]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a bad rule stops before any node is contacted"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("10.0.0.1/Demo"), "{err}");
}

fn check_snapshot(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(name);
    if std::env::var_os("LADE_UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "no snapshot {}; run with LADE_UPDATE_SNAPSHOTS=1",
            path.display()
        )
    });
    assert_eq!(
        actual, expected,
        "help changed; if intended, rerun with LADE_UPDATE_SNAPSHOTS=1"
    );
}

#[test]
fn help_matches_snapshots() {
    for (args, name) in [
        (&["--help"][..], "help.txt"),
        (&["load", "--help"][..], "load-help.txt"),
        (&["upgrade", "--help"][..], "upgrade-help.txt"),
        (&["inspect", "--help"][..], "inspect-help.txt"),
        (&["push", "--help"][..], "push-help.txt"),
        (&["status", "--help"][..], "status-help.txt"),
        (&["prune", "--help"][..], "prune-help.txt"),
        (&["unload", "--help"][..], "unload-help.txt"),
    ] {
        let out = lade(args);
        assert!(out.status.success());
        check_snapshot(name, &String::from_utf8_lossy(&out.stdout));
    }
}

#[test]
fn retag_rules_that_merge_two_images_under_one_name_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = sample_bundle(dir.path());
    // Two repositories mapped onto one: app:v1 and sidecar:v1 would both be one/…:v1.
    let out = lade(&[
        "load",
        bundle.to_str().unwrap(),
        "--agent",
        "127.0.0.1:1",
        "--retag",
        "release.daocloud.io/demo/app=10.0.0.1/demo/one",
        "--retag",
        "release.daocloud.io/demo/sidecar=10.0.0.1/demo/one",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("10.0.0.1/demo/one:v1") && err.contains("two different images"),
        "{err}"
    );
}

#[test]
fn discover_and_agent_are_one_or_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = sample_bundle(dir.path());
    let bundle = bundle.to_str().unwrap();
    let out = lade(&["load", bundle, "--agent", "127.0.0.1:1", "--discover"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot be used with"), "{err}");

    let out = lade(&["load", bundle]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("<--agent <AGENTS>|--discover>"), "{err}");

    // Discovery's own flags are refused with --agent, and without --discover.
    let out = lade(&["load", bundle, "--agent", "127.0.0.1:1", "--node", "node-1"]);
    assert_eq!(out.status.code(), Some(2));
    let out = lade(&[
        "upgrade",
        bundle,
        "--release",
        "r",
        "-n",
        "ns",
        "--selector",
        "a=b",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--discover"), "{err}");

    // The kubeconfig is for discovery or helm: a plain --agent load has no use for it.
    let out = lade(&[
        "load",
        bundle,
        "--agent",
        "127.0.0.1:1",
        "--kubeconfig",
        "/k",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("<--discover|--then-upgrade>"), "{err}");
}

#[test]
fn discover_without_a_kubeconfig_says_so_and_touches_no_node() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = sample_bundle(dir.path());
    let bundle = bundle.to_str().unwrap();
    let out = lade_with_env(
        &["load", bundle, "--discover"],
        &[("KUBECONFIG", "/nonexistent")],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--discover needs the Kubernetes API")
            && err.contains("kubeconfig $KUBECONFIG (/nonexistent)")
            && err.contains("No such file")
            && err.contains("not running in a pod")
            && err.contains("--kubeconfig FILE")
            && err.contains("--agent HOST:PORT"),
        "{err}"
    );

    let out = lade(&[
        "load",
        bundle,
        "--discover",
        "--kubeconfig",
        "/nonexistent/config",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--discover: kubeconfig --kubeconfig /nonexistent/config:"),
        "{err}"
    );
}

/// The chart's DaemonSet as the API lists it: the controller of every fixture pod.
const DAEMONSETS: &str = r#"{"apiVersion":"apps/v1","kind":"DaemonSetList","metadata":{},"items":[{"metadata":{"name":"lade","namespace":"lade-system","uid":"0b7f3c52-8d1e-4a53-9f0e-2c4b6f1d9a10"}}]}"#;

/// A stand-in for the Kubernetes API server: answers a DaemonSet list with [`DAEMONSETS`] and
/// every other request with `body` (JSON), and keeps the request lines. Its thread ends with the test process.
struct StubApi {
    url: String,
    requests: Arc<Mutex<Vec<String>>>,
}

fn stub_api(body: String) -> StubApi {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            seen.lock().unwrap().push(line.trim_end().to_string());
            let body = if line.contains("/daemonsets") {
                DAEMONSETS
            } else {
                body.as_str()
            };
            // The rest of the request: headers up to the blank line (a GET has no body).
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                    break;
                }
            }
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    StubApi { url, requests }
}

/// A kubeconfig whose current context points at nothing (port 1) and whose context `stub`
/// points at `server`: discovery must follow --kube-context.
fn kubeconfig(dir: &Path, server: &str) -> PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: nowhere
  cluster: {{server: 'https://127.0.0.1:1'}}
- name: stub
  cluster: {{server: '{server}'}}
users:
- name: admin
  user: {{token: not-a-real-token}}
contexts:
- name: nowhere
  context: {{cluster: nowhere, user: admin}}
- name: stub
  context: {{cluster: stub, user: admin}}
current-context: nowhere
"
        ),
    )
    .unwrap();
    path
}

/// The recorded pods of `fixture`, moved to loopback addresses where nothing listens (the
/// pod network of the fixture is not reachable here either, but may time out instead).
fn pods_on_loopback(fixture: &str) -> String {
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(fixture);
    let mut list: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for (i, pod) in list["items"].as_array_mut().unwrap().iter_mut().enumerate() {
        pod["status"]["podIP"] = format!("127.0.0.{}", i + 2).into();
        pod["spec"]["containers"][0]["ports"][0]["containerPort"] = closed.into();
    }
    list.to_string()
}

#[test]
fn discovered_agents_are_loaded_by_node_and_unreachable_ones_get_the_options() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = sample_bundle(dir.path());
    let api = stub_api(pods_on_loopback("pods-crashloop.json"));
    let config = kubeconfig(dir.path(), &api.url);
    let out = lade(&[
        "load",
        bundle.to_str().unwrap(),
        "--discover",
        "--kubeconfig",
        config.to_str().unwrap(),
        "--kube-context",
        "stub",
        "--connect-timeout",
        "2s",
        "--progress",
        "none",
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    // Two list calls, for the chart's pods and the DaemonSet that must control them, in the
    // chart's namespace, through context `stub`.
    let requests = api.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert!(
        requests[0].starts_with("GET /api/v1/namespaces/lade-system/pods?")
            && requests[0].contains("labelSelector=app.kubernetes.io%2Fname%3Dlade"),
        "{requests:?}"
    );
    assert!(
        requests[1].starts_with("GET /apis/apps/v1/namespaces/lade-system/daemonsets?")
            && requests[1].contains("labelSelector=app.kubernetes.io%2Fname%3Dlade"),
        "{requests:?}"
    );
    // What was found, before anything is sent.
    assert!(
        stderr.contains(
            "discovered 3 nodes with an agent pod in namespace lade-system (app.kubernetes.io/name=lade):\n"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("  node-1  127.0.0.2:"), "{stderr}");
    let node_3 = stderr.lines().find(|l| l.starts_with("  node-3")).unwrap();
    assert!(
        node_3.contains("NOT READY") && node_3.ends_with("pod lade-hw8rc: not ready: container agent is waiting (CrashLoopBackOff), restarted 7 times"),
        "{stderr}"
    );
    // Every node in the summary, named even when its agent could not be reached.
    let rows: Vec<&str> = stdout.lines().skip(1).take(3).collect();
    assert!(rows[0].starts_with("node-1  127.0.0.2:"), "{stdout}");
    assert!(rows[1].starts_with("node-2  127.0.0.3:"), "{stdout}");
    assert!(
        rows[2].starts_with("node-3  pod/lade-hw8rc") && rows[2].ends_with("FAILED"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "node-3 (pod/lade-hw8rc): agent pod lade-hw8rc is not ready: container agent is waiting \
             (CrashLoopBackOff), restarted 7 times; nothing was loaded on this node"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "(the IP of pod lade-b9q4m: this machine may not reach the pod network; see below)"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("3 of 3 nodes failed; re-run with only those to retry (what they already hold is not sent again): --discover --node node-1 --node node-2 --node node-3"),
        "{stdout}"
    );
    // The ways out, once.
    assert_eq!(
        stderr.matches("note: --discover connects").count(),
        1,
        "{stderr}"
    );
    assert!(
        stderr.contains("--set hostNetwork=true")
            && stderr.contains("kubectl -n lade-system port-forward pod/POD PORT:grpc"),
        "{stderr}"
    );
}

#[test]
fn upgrade_discover_refuses_when_a_node_cannot_be_checked() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = sample_bundle(dir.path());
    let api = stub_api(pods_on_loopback("pods-crashloop.json"));
    let config = kubeconfig(dir.path(), &api.url);
    let out = lade(&[
        "upgrade",
        bundle.to_str().unwrap(),
        "--release",
        "demo",
        "-n",
        "demo",
        "--discover",
        "--kubeconfig",
        config.to_str().unwrap(),
        "--kube-context",
        "stub",
        "--helm",
        "/nonexistent/helm",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "error: the preflight cannot check the nodes: node node-3: agent pod lade-hw8rc is not ready:"
        ) && err.contains("pass --skip-preflight"),
        "{err}"
    );
}

#[test]
fn a_missing_bundle_is_named_once_with_its_cause() {
    let out = lade(&["inspect", "/nonexistent/x.bundle.tar"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/x.bundle.tar: opening the bundle: No such file"),
        "{err}"
    );
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
}

#[test]
fn the_token_goes_over_plain_grpc_only_to_loopback_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = sample_bundle(dir.path());
    let run = |agent: &str, extra: &[&str]| {
        let args = [
            &[
                "load",
                bundle.to_str().unwrap(),
                "--agent",
                agent,
                "--connect-timeout",
                "1s",
                "--progress",
                "none",
            ][..],
            extra,
        ]
        .concat();
        let out = lade_with_env(&args, &[("LADE_AUTH_TOKEN", "t0ken")]);
        assert_ne!(out.status.code(), Some(0));
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    // TEST-NET-1: nothing answers there, but lade must not even try.
    let text = run("192.0.2.1:7700", &[]);
    assert!(
        text.contains("agent 192.0.2.1:7700: refusing to send the bearer token over plain gRPC")
            && text.contains("--insecure-plaintext"),
        "{text}"
    );
    // Allowed: it tries (and cannot connect).
    let text = run("192.0.2.1:7700", &["--insecure-plaintext"]);
    assert!(
        !text.contains("refusing to send the bearer token"),
        "{text}"
    );
    // Loopback (a port-forward) needs no opt-in.
    for agent in ["127.0.0.1:9", "localhost:9", "[::1]:9"] {
        let text = run(agent, &[]);
        assert!(
            !text.contains("refusing to send the bearer token"),
            "{agent}: {text}"
        );
    }
}
