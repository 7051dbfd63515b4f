//! `lade upgrade` against a recording stand-in `helm` (lade-testkit's `FakeHelm`) and
//! in-process fake agents that answer `Info` and `Verify` from a fixed set of image names.
//! No daemon, helm binary or API server needed. Every test asserts the exact helm command
//! lines and the content of the one `-f` file helm was given.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Output;
use std::sync::{Arc, Mutex};

use futures::Stream;
use lade_proto::{
    Agent, AgentServer, EndSessionRequest, EndSessionResponse, FetchProgress, FetchRequest,
    HaveRequest, HaveResponse, HoldRequest, HoldResponse, HoldsRequest, HoldsResponse, ImportEvent,
    ImportRequest, InfoRequest, InfoResponse, KeepRequest, KeepResponse, ListRequest, ListResponse,
    PutBlobRequest, PutBlobResponse, ReadBlobChunk, ReadBlobRequest, RefStatus, ReleaseRequest,
    ReleaseResponse, VerifyRequest, VerifyResponse,
};
use lade_testkit::fixtures::{
    sample_chart, sample_images_from_bytes, write_bundle, ArchiveFormat, Compression,
};
use lade_testkit::helm::{FakeHelm, HelmCall, Reply};
use serde_yaml::Value;
use tonic::{Request, Response, Status, Streaming};

const APP: &str = "10.16.10.111/demo/app:v1";
const SIDECAR: &str = "10.16.10.111/demo/sidecar:v1";
/// Images named through global.imageRegistry, one through a dashed (subchart-style) key.
const HINTS: &str = "\
- \"{{ .global.imageRegistry }}/demo/app:{{ .app.image.tag }}\"
- \"{{.global.imageRegistry}}/demo/sidecar:{{ .sidecar-agent.image.tag }}\"
";
const CURRENT_VALUES: &str = "replicas: 3\nglobal:\n  imageRegistry: release.daocloud.io\n";
const STATUS: &str =
    r#"{"name":"demo","namespace":"demo-system","version":3,"info":{"status":"deployed"}}"#;
const NOT_FOUND: &str = "Error: release: not found\n";

// ---------------------------------------------------------------------------------------------
// A fake agent: knows a fixed set of image names, records what it was asked.

#[derive(Clone)]
struct FakeAgent {
    node: String,
    images: Arc<HashSet<String>>,
    asked: Arc<Mutex<Vec<String>>>,
}

type Events = Pin<Box<dyn Stream<Item = Result<ImportEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for FakeAgent {
    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(InfoResponse {
            node_name: self.node.clone(),
            runtime: "fake".into(),
            ..Default::default()
        }))
    }
    async fn have(&self, _: Request<HaveRequest>) -> Result<Response<HaveResponse>, Status> {
        Err(Status::unimplemented("fake agent"))
    }
    async fn put_blob(
        &self,
        _: Request<Streaming<PutBlobRequest>>,
    ) -> Result<Response<PutBlobResponse>, Status> {
        Err(Status::unimplemented("fake agent"))
    }
    type ImportStream = Events;
    async fn import(&self, _: Request<ImportRequest>) -> Result<Response<Events>, Status> {
        Err(Status::unimplemented("fake agent"))
    }
    async fn end_session(
        &self,
        _: Request<EndSessionRequest>,
    ) -> Result<Response<EndSessionResponse>, Status> {
        Err(Status::unimplemented("fake agent"))
    }
    async fn verify(
        &self,
        req: Request<VerifyRequest>,
    ) -> Result<Response<VerifyResponse>, Status> {
        let refs = req.into_inner().refs;
        self.asked.lock().unwrap().extend(refs.iter().cloned());
        Ok(Response::new(VerifyResponse {
            refs: refs
                .into_iter()
                .map(|r| {
                    let ok = self.images.contains(&r);
                    RefStatus {
                        problem: if ok { "" } else { "no such image" }.into(),
                        r#ref: r,
                        ok,
                        ..Default::default()
                    }
                })
                .collect(),
        }))
    }
    async fn list(&self, _: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        Err(Status::unimplemented("fake agent"))
    }
    type FetchStream = Pin<Box<dyn Stream<Item = Result<FetchProgress, Status>> + Send>>;
    async fn fetch(&self, _: Request<FetchRequest>) -> Result<Response<Self::FetchStream>, Status> {
        Err(Status::unimplemented("fake agent"))
    }
    type ReadBlobStream = Pin<Box<dyn Stream<Item = Result<ReadBlobChunk, Status>> + Send>>;
    async fn read_blob(
        &self,
        _: Request<ReadBlobRequest>,
    ) -> Result<Response<Self::ReadBlobStream>, Status> {
        Err(Status::unimplemented("fake agent"))
    }

    async fn hold(&self, _: Request<HoldRequest>) -> Result<Response<HoldResponse>, Status> {
        Err(Status::unimplemented("fake agent"))
    }

    async fn holds(&self, _: Request<HoldsRequest>) -> Result<Response<HoldsResponse>, Status> {
        Err(Status::unimplemented("fake agent"))
    }

    async fn release(
        &self,
        _: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        Err(Status::unimplemented("fake agent"))
    }

    async fn keep(&self, _: Request<KeepRequest>) -> Result<Response<KeepResponse>, Status> {
        Err(Status::unimplemented("fake agent"))
    }
}

/// Serves a fake agent for `node` holding `images`; returns its address and what it is asked.
async fn agent(node: &str, images: &[&str]) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let fake = FakeAgent {
        node: node.into(),
        images: Arc::new(images.iter().map(|s| s.to_string()).collect()),
        asked: Arc::default(),
    };
    let asked = fake.asked.clone();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentServer::new(fake))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (addr, asked)
}

// ---------------------------------------------------------------------------------------------
// Bundles, runs and assertions.

struct Case {
    dir: tempfile::TempDir,
    bundle: PathBuf,
    helm: FakeHelm,
}

fn case_with(hints: &str, chart: &[(String, Vec<u8>)]) -> Case {
    let dir = tempfile::tempdir().unwrap();
    let images = sample_images_from_bytes(b"not busybox".repeat(20));
    let images_tar = dir.path().join("images.tar");
    let mut out = BufWriter::new(File::create(&images_tar).unwrap());
    ArchiveFormat::Gcr
        .write(&images, Compression::Gzip, &mut out)
        .unwrap();
    out.flush().unwrap();
    drop(out);
    let bundle = dir.path().join("demo.bundle.tar");
    let mut out = BufWriter::new(File::create(&bundle).unwrap());
    write_bundle(&images_tar, hints, chart, &mut out).unwrap();
    out.flush().unwrap();
    std::fs::remove_file(images_tar).unwrap();
    Case {
        dir,
        bundle,
        helm: FakeHelm::new().unwrap(),
    }
}

fn case() -> Case {
    case_with(HINTS, &sample_chart())
}

impl Case {
    /// `lade upgrade BUNDLE --release demo -n demo-system` + `args`, with the stand-in on PATH.
    async fn upgrade(&self, args: &[&str]) -> (i32, String, String) {
        let mut all = vec![
            "upgrade",
            self.bundle.to_str().unwrap(),
            "--release",
            "demo",
            "-n",
            "demo-system",
        ];
        all.extend_from_slice(args);
        self.lade(&all).await
    }

    async fn lade(&self, args: &[&str]) -> (i32, String, String) {
        let out: Output = tokio::process::Command::new(env!("CARGO_BIN_EXE_lade"))
            .args(args)
            .env("PATH", self.helm.path_env().unwrap())
            .env_remove("LADE_AGENTS")
            .env_remove("LADE_RETAG")
            .output()
            .await
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn calls(&self) -> Vec<HelmCall> {
        self.helm.calls().unwrap()
    }

    /// Files lade wrote next to the bundle whose names contain `what`, sorted.
    fn written(&self, what: &str) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_str().unwrap().contains(what))
            .collect();
        found.sort();
        found
    }
}

fn subcommands(calls: &[HelmCall]) -> Vec<String> {
    calls.iter().map(HelmCall::subcommand).collect()
}

fn yaml(text: &str) -> Value {
    serde_yaml::from_str(text).unwrap()
}

fn argv(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Checks the upgrade call against the manual command, with the chart at `chart` (or any
/// extracted `original-chart` when `None`) and `before` and `after` the `-f` file; returns
/// the values file's path and content.
fn check_upgrade_call(
    call: &HelmCall,
    chart: Option<&str>,
    before: &[&str],
    after: &[&str],
) -> (String, String) {
    let a = &call.argv;
    assert_eq!(a[..3], argv(&["upgrade", "--install", "demo"]), "{a:?}");
    match chart {
        Some(chart) => assert_eq!(a[3], chart),
        None => {
            assert!(a[3].ends_with("/original-chart"), "{a:?}");
            // The chart was on disk, whole, when helm ran.
            assert_eq!(
                call.dirs,
                [(a[3].clone(), argv(&["./Chart.yaml", "./values.yaml"]))]
            );
            assert!(!Path::new(&a[3]).exists(), "the temporary chart is removed");
        }
    }
    assert_eq!(
        a[4..8],
        argv(&[
            "-n",
            "demo-system",
            "--create-namespace",
            "--cleanup-on-fail"
        ])
    );
    let f = a.iter().position(|x| x == "-f").expect("a -f file");
    assert_eq!(a[8..f], argv(before), "{a:?}");
    assert_eq!(a[f + 2..], argv(after), "{a:?}");
    assert_eq!(call.values.len(), 1, "exactly one -f file");
    (
        a[f + 1].clone(),
        call.values[0].clone().expect("the -f file existed"),
    )
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_backs_up_the_values_sets_the_registry_and_runs_the_manual_command() {
    let case = case();
    case.helm
        .reply("get values", Reply::ok(CURRENT_VALUES))
        .unwrap();
    case.helm.reply("status", Reply::ok(STATUS)).unwrap();
    case.helm
        .reply(
            "upgrade",
            Reply::ok("Release \"demo\" has been upgraded. Happy Helming!\n"),
        )
        .unwrap();
    let (a, asked_a) = agent("node-a", &[APP, SIDECAR]).await;
    let (b, asked_b) = agent("node-b", &[APP, SIDECAR]).await;

    let (code, stdout, stderr) = case
        .upgrade(&[
            "--agent",
            &a,
            "--agent",
            &b,
            "--image-registry",
            "10.16.10.111",
        ])
        .await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");

    let calls = case.calls();
    assert_eq!(subcommands(&calls), ["get values", "status", "upgrade"]);
    assert_eq!(
        calls[0].argv,
        argv(&["get", "values", "demo", "-n", "demo-system", "-o", "yaml"])
    );
    assert_eq!(
        calls[1].argv,
        argv(&["status", "demo", "-n", "demo-system", "-o", "json"])
    );
    let (values_path, values) = check_upgrade_call(&calls[2], None, &[], &[]);
    // The release's values, with only the registry changed; no chart default is pinned.
    assert_eq!(
        values,
        "replicas: 3\nglobal:\n  imageRegistry: 10.16.10.111\n"
    );
    assert_eq!(
        case.written("values-upgrade"),
        [PathBuf::from(&values_path)]
    );

    let backups = case.written("values-backup");
    assert_eq!(backups.len(), 1);
    assert_eq!(
        std::fs::read_to_string(&backups[0]).unwrap(),
        CURRENT_VALUES
    );
    let name = backups[0].file_name().unwrap().to_str().unwrap();
    assert!(
        name.starts_with("demo.demo-system.values-backup.2"),
        "{name}"
    );

    for asked in [asked_a, asked_b] {
        assert_eq!(*asked.lock().unwrap(), [APP, SIDECAR]);
    }
    assert!(stdout.contains("preflight passed"), "{stdout}");
    assert!(
        stdout.contains(&format!("values backup: {}", backups[0].display())),
        "{stdout}"
    );
    assert!(
        stdout.contains("has been upgraded. Happy Helming!"),
        "{stdout}"
    );
    assert!(
        stdout.contains("to return to revision 3: helm rollback demo 3 -n demo-system"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fresh_install_is_said_so_backs_nothing_up_and_passes_the_helm_flags() {
    let case = case();
    case.helm
        .reply("get values", Reply::fail(1, NOT_FOUND))
        .unwrap();
    let (a, _) = agent("node-a", &[APP, SIDECAR]).await;
    let kube = [
        "--kubeconfig",
        "/etc/lade/kube config",
        "--kube-context",
        "prod",
    ];
    let program = case.helm.program().display().to_string();
    let mut args = vec!["--agent", a.as_str(), "--image-registry", "10.16.10.111"];
    args.extend(["--helm", program.as_str()]);
    args.extend(kube);
    let (code, stdout, stderr) = case.upgrade(&args).await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("$ {program} get values demo")),
        "{stdout}"
    );

    let calls = case.calls();
    assert_eq!(subcommands(&calls), ["get values", "upgrade"]);
    let mut get = argv(&["get", "values", "demo", "-n", "demo-system", "-o", "yaml"]);
    get.extend(argv(&kube));
    assert_eq!(calls[0].argv, get);
    let (_, values) = check_upgrade_call(&calls[1], None, &[], &kube);
    assert_eq!(values, "global:\n  imageRegistry: 10.16.10.111\n");
    assert!(case.written("values-backup").is_empty());
    assert!(
        stdout.contains("release demo not found in namespace demo-system: this is a fresh install"),
        "{stdout}"
    );
    assert!(
        stdout.ends_with("release demo in namespace demo-system installed\n"),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_is_never_overwritten() {
    let case = case();
    case.helm
        .reply_nth("get values", 0, Reply::ok("first: 1\n"))
        .unwrap();
    case.helm
        .reply("get values", Reply::ok("second: 2\n"))
        .unwrap();
    case.helm.reply("status", Reply::ok(STATUS)).unwrap();
    let (a, _) = agent("node-a", &[APP, SIDECAR]).await;
    for _ in 0..2 {
        let (code, stdout, stderr) = case
            .upgrade(&["--agent", &a, "--image-registry", "10.16.10.111"])
            .await;
        assert_eq!(code, 0, "{stdout}\n{stderr}");
    }
    let mut contents: Vec<String> = case
        .written("values-backup")
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    contents.sort();
    assert_eq!(contents, ["first: 1\n", "second: 2\n"]);
    assert_eq!(case.written("values-upgrade").len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn values_files_and_set_merge_in_order_and_the_registry_wins() {
    let case = case();
    case.helm
        .reply(
            "get values",
            Reply::ok("a: {x: 1, y: 1}\nglobal: {imageRegistry: old.io, other: kept}\n"),
        )
        .unwrap();
    case.helm.reply("status", Reply::ok(STATUS)).unwrap();
    let first = case.dir.path().join("first.yaml");
    std::fs::write(&first, "a: {y: 2, z: 2}\nlist: [1, 2]\n").unwrap();
    let second = case.dir.path().join("second.yaml");
    std::fs::write(&second, "a: {z: 3}\nlist: [3]\n").unwrap();
    let (a, _) = agent("node-a", &[APP, SIDECAR]).await;
    let (code, stdout, stderr) = case
        .upgrade(&[
            "--agent",
            &a,
            "-f",
            first.to_str().unwrap(),
            "--values",
            second.to_str().unwrap(),
            "--set",
            "a.w=true,b=010",
            "--set",
            "global.imageRegistry=ignored.io",
            "--image-registry",
            "10.16.10.111",
        ])
        .await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let calls = case.calls();
    let (_, values) = check_upgrade_call(&calls[2], None, &[], &[]);
    assert_eq!(
        yaml(&values),
        yaml(
            "a: {x: 1, y: 2, z: 3, w: true}\nglobal: {imageRegistry: 10.16.10.111, other: kept}\n\
             list: [3]\nb: '010'\n"
        )
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_registry_comes_from_one_retag_host_or_must_be_given() {
    let case = case();
    case.helm
        .reply("get values", Reply::fail(1, NOT_FOUND))
        .unwrap();
    let (a, _) = agent("node-a", &[APP, SIDECAR]).await;
    let (code, stdout, stderr) = case
        .upgrade(&[
            "--agent",
            &a,
            "--retag",
            "release.daocloud.io/demo=10.16.10.111/demo",
            "--retag",
            "docker.io/library=10.16.10.111/library",
        ])
        .await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        stdout.contains(
            "global.imageRegistry: 10.16.10.111 (the one registry host the --retag rules rename to)"
        ),
        "{stdout}"
    );
    let (_, values) = check_upgrade_call(&case.calls()[1], None, &[], &[]);
    assert_eq!(values, "global:\n  imageRegistry: 10.16.10.111\n");

    // Two hosts, and the chart's values have global.imageRegistry: the admin must choose.
    let case = self::case();
    case.helm
        .reply("get values", Reply::fail(1, NOT_FOUND))
        .unwrap();
    let (code, stdout, stderr) = case
        .upgrade(&[
            "--agent",
            &a,
            "--retag",
            "release.daocloud.io/demo=10.16.10.111/demo",
            "--retag",
            "docker.io/library=10.16.10.112/library",
        ])
        .await;
    assert_eq!(code, 2, "{stdout}\n{stderr}");
    assert!(
        stderr.contains("rename to 10.16.10.111, 10.16.10.112); pass --image-registry"),
        "{stderr}"
    );
    assert_eq!(subcommands(&case.calls()), ["get values"]);

    // Setting it with --set is saying it.
    let (code, stdout, stderr) = case
        .upgrade(&[
            "--agent",
            &a,
            "--retag",
            "release.daocloud.io/demo=10.16.10.111/demo",
            "--retag",
            "docker.io/library=10.16.10.112/library",
            "--set",
            "global.imageRegistry=10.16.10.111",
        ])
        .await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("global.imageRegistry: 10.16.10.111 (from --set or --values)"),
        "{stdout}"
    );
    let (_, values) = check_upgrade_call(&case.calls()[2], None, &[], &[]);
    assert_eq!(values, "global:\n  imageRegistry: 10.16.10.111\n");
}

fn pulled_chart() -> Reply {
    Reply::unpack(
        sample_chart()
            .into_iter()
            .map(|(path, content)| (format!("demo/{path}"), content))
            .collect(),
    )
}

const REPOS: &str = r#"[{"name":"daocloud","url":"https://release.daocloud.io/chartrepo/demo"}]"#;

fn versions(list: &[&str]) -> Reply {
    let mut entries: Vec<String> = list
        .iter()
        .map(|v| {
            format!(
                r#"{{"name":"daocloud/demo","version":"{v}","app_version":"v1","description":""}}"#
            )
        })
        .collect();
    // `search repo` matches by substring: another chart must not be taken for this one.
    entries.push(r#"{"name":"daocloud/demo-extra","version":"9.9.9"}"#.into());
    Reply::ok(&format!("[{}]", entries.join(",")))
}

/// Runs a repository-chart upgrade (fresh install) with `args`; returns the exit code,
/// the helm calls and stderr.
async fn repo_upgrade(setup: impl Fn(&FakeHelm), args: &[&str]) -> (i32, Vec<HelmCall>, String) {
    let case = case();
    setup(&case.helm);
    case.helm.reply("pull", pulled_chart()).unwrap();
    case.helm
        .reply("get values", Reply::fail(1, NOT_FOUND))
        .unwrap();
    let (a, _) = agent("node-a", &[APP, SIDECAR]).await;
    let mut all = vec![
        "--agent",
        a.as_str(),
        "--image-registry",
        "10.16.10.111",
        "--chart",
        "daocloud/demo",
    ];
    all.extend_from_slice(args);
    let (code, stdout, stderr) = case.upgrade(&all).await;
    (code, case.calls(), format!("{stdout}\n{stderr}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn repository_steps_run_only_when_needed() {
    // Known repository, version in its index: no add, no update.
    let (code, calls, out) = repo_upgrade(
        |helm| {
            helm.reply("repo list", Reply::ok(REPOS)).unwrap();
            helm.reply("search repo", versions(&["0.2.0", "0.1.0"]))
                .unwrap();
        },
        &["--version", "0.1.0"],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        subcommands(&calls),
        ["repo list", "search repo", "pull", "get values", "upgrade"]
    );
    assert_eq!(calls[0].argv, argv(&["repo", "list", "-o", "json"]));
    assert_eq!(
        calls[1].argv,
        argv(&[
            "search",
            "repo",
            "daocloud/demo",
            "--versions",
            "--devel",
            "-o",
            "json"
        ])
    );
    let pull = &calls[2].argv;
    assert_eq!(
        pull[..6],
        argv(&[
            "pull",
            "daocloud/demo",
            "--version",
            "0.1.0",
            "--untar",
            "--untardir"
        ])
    );
    check_upgrade_call(
        &calls[4],
        Some("daocloud/demo"),
        &["--version", "0.1.0"],
        &[],
    );

    // Unknown repository: added from --repo-url; its index is fresh, so no update.
    let (code, calls, out) = repo_upgrade(
        |helm| {
            helm.reply(
                "repo list",
                Reply::fail(1, "Error: no repositories to show\n"),
            )
            .unwrap();
            helm.reply("search repo", versions(&["0.1.0"])).unwrap();
        },
        &[
            "--version",
            "0.1.0",
            "--repo-url",
            "https://charts.example/demo",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        subcommands(&calls),
        [
            "repo list",
            "repo add",
            "search repo",
            "pull",
            "get values",
            "upgrade"
        ]
    );
    assert_eq!(
        calls[1].argv,
        argv(&["repo", "add", "daocloud", "https://charts.example/demo"])
    );

    // Unknown repository and no URL: nothing else runs.
    let (code, calls, out) = repo_upgrade(
        |helm| {
            helm.reply("repo list", Reply::ok("[]")).unwrap();
        },
        &[],
    )
    .await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("pass --repo-url URL"), "{out}");
    assert_eq!(subcommands(&calls), ["repo list"]);

    // The version is not in the local index yet: update, then search again.
    let (code, calls, out) = repo_upgrade(
        |helm| {
            helm.reply("repo list", Reply::ok(REPOS)).unwrap();
            helm.reply_nth("search repo", 0, versions(&["0.1.0"]))
                .unwrap();
            helm.reply("search repo", versions(&["0.2.0", "0.1.0"]))
                .unwrap();
        },
        &["--version", "0.2.0"],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        subcommands(&calls),
        [
            "repo list",
            "search repo",
            "repo update",
            "search repo",
            "pull",
            "get values",
            "upgrade"
        ]
    );
    assert_eq!(calls[2].argv, argv(&["repo", "update", "daocloud"]));
    check_upgrade_call(
        &calls[6],
        Some("daocloud/demo"),
        &["--version", "0.2.0"],
        &[],
    );

    // No version asked for: the index is updated to learn the newest release.
    let (code, calls, out) = repo_upgrade(
        |helm| {
            helm.reply("repo list", Reply::ok(REPOS)).unwrap();
            helm.reply("search repo", versions(&["0.3.0-rc.1", "0.2.0", "0.1.0"]))
                .unwrap();
        },
        &[],
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        subcommands(&calls),
        [
            "repo list",
            "repo update",
            "search repo",
            "pull",
            "get values",
            "upgrade"
        ]
    );
    check_upgrade_call(
        &calls[5],
        Some("daocloud/demo"),
        &["--version", "0.2.0"],
        &[],
    );

    // A version the repository does not have, even after an update.
    let (code, calls, out) = repo_upgrade(
        |helm| {
            helm.reply("repo list", Reply::ok(REPOS)).unwrap();
            helm.reply("search repo", versions(&["0.1.0"])).unwrap();
        },
        &["--version", "0.9.0"],
    )
    .await;
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains(
            "helm repository daocloud has no chart daocloud/demo version 0.9.0 (it lists: 0.1.0)"
        ),
        "{out}"
    );
    assert_eq!(
        subcommands(&calls),
        ["repo list", "search repo", "repo update", "search repo"]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_preflight_stops_the_upgrade_when_one_node_lacks_one_image() {
    let case = case();
    case.helm
        .reply("get values", Reply::ok(CURRENT_VALUES))
        .unwrap();
    case.helm.reply("status", Reply::ok(STATUS)).unwrap();
    let (a, _) = agent("node-a", &[APP, SIDECAR]).await;
    let (b, _) = agent("node-b", &[APP]).await;
    let (code, stdout, stderr) = case
        .upgrade(&[
            "--agent",
            &a,
            "--agent",
            &b,
            "--image-registry",
            "10.16.10.111",
        ])
        .await;
    assert_eq!(code, 3, "{stdout}\n{stderr}");
    let table: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("IMAGE"))
        .take(3)
        .collect();
    assert_eq!(
        table,
        [
            "IMAGE (from hints.yaml)       node-a  node-b",
            "10.16.10.111/demo/app:v1      ok      ok",
            "10.16.10.111/demo/sidecar:v1  ok      MISSING",
        ]
    );
    assert!(
        stdout.contains(&format!(
            "node-b ({b}): 10.16.10.111/demo/sidecar:v1: no such image"
        )),
        "{stdout}"
    );
    assert!(
        stderr.contains(&format!(
            "preflight failed: 1 of 2 images not on 1 of 2 nodes; load the bundle onto them (lade load BUNDLE --agent {b})"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("the upgrade was not started"), "{stderr}");
    // helm never ran the upgrade, and no values file was left for it; the backup stays.
    assert_eq!(subcommands(&case.calls()), ["get values", "status"]);
    assert!(case.written("values-upgrade").is_empty());
    assert_eq!(case.written("values-backup").len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn hints_read_subchart_defaults_and_dashed_keys_with_the_values_helm_will_use() {
    // The sidecar's image is set only in a subchart's values.yaml, under a dashed name.
    let mut chart = sample_chart();
    chart[1].1 =
        b"global:\n  imageRegistry: release.daocloud.io\napp:\n  image:\n    tag: v1\n".to_vec();
    chart.push((
        "charts/sidecar-agent/Chart.yaml".into(),
        b"apiVersion: v2\nname: sidecar-agent\nversion: 0.1.0\n".to_vec(),
    ));
    chart.push((
        "charts/sidecar-agent/values.yaml".into(),
        b"image:\n  registry: release.daocloud.io\n  repository: demo/sidecar\n  tag: v2\n"
            .to_vec(),
    ));
    let hints = "\
- \"{{ .global.imageRegistry }}/demo/app:{{ .app.image.tag }}\"
- \"{{ .sidecar-agent.image.registry }}/{{ .sidecar-agent.image.repository }}:{{ .sidecar-agent.image.tag }}\"
";
    let sidecar_v2 = "release.daocloud.io/demo/sidecar:v2";
    let (a, asked) = agent("node-a", &[APP, sidecar_v2]).await;

    let case = case_with(hints, &chart);
    case.helm
        .reply("get values", Reply::fail(1, NOT_FOUND))
        .unwrap();
    let (code, stdout, stderr) = case
        .upgrade(&["--agent", &a, "--image-registry", "10.16.10.111"])
        .await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(*asked.lock().unwrap(), [APP, sidecar_v2]);
    asked.lock().unwrap().clear();

    // A --set changes what the chart pulls, and the preflight follows it.
    let case = case_with(hints, &chart);
    case.helm
        .reply("get values", Reply::fail(1, NOT_FOUND))
        .unwrap();
    let (code, stdout, stderr) = case
        .upgrade(&[
            "--agent",
            &a,
            "--image-registry",
            "10.16.10.111",
            "--set",
            "sidecar-agent.image.tag=v3",
        ])
        .await;
    assert_eq!(code, 3, "{stdout}\n{stderr}");
    assert_eq!(
        *asked.lock().unwrap(),
        [APP, "release.daocloud.io/demo/sidecar:v3"]
    );
    assert!(
        stdout.contains("release.daocloud.io/demo/sidecar:v3  MISSING"),
        "{stdout}"
    );

    // A value the hints need that nobody sets is a preflight failure naming the path.
    let case = case_with(hints, &chart);
    case.helm
        .reply("get values", Reply::fail(1, NOT_FOUND))
        .unwrap();
    let (code, stdout, stderr) = case
        .upgrade(&[
            "--agent",
            &a,
            "--image-registry",
            "10.16.10.111",
            "--set",
            "sidecar-agent.image.tag=null",
        ])
        .await;
    assert_eq!(code, 3, "{stdout}\n{stderr}");
    assert!(
        stderr.contains("hints.yaml entry 2")
            && stderr.contains(".sidecar-agent.image.tag is not set"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_helm_upgrade_shows_its_stderr_the_backup_and_the_way_back() {
    let case = case();
    case.helm
        .reply("get values", Reply::ok(CURRENT_VALUES))
        .unwrap();
    case.helm.reply("status", Reply::ok(STATUS)).unwrap();
    let helm_error =
        "Error: UPGRADE FAILED: cannot patch \"demo\" with kind Deployment: field is immutable\n";
    case.helm
        .reply("upgrade", Reply::fail(1, helm_error))
        .unwrap();
    let (a, _) = agent("node-a", &[APP, SIDECAR]).await;
    let (code, stdout, stderr) = case
        .upgrade(&["--agent", &a, "--image-registry", "10.16.10.111"])
        .await;
    assert_eq!(code, 4, "{stdout}\n{stderr}");
    let backup = &case.written("values-backup")[0];
    assert!(
        stderr.contains(&format!(
            "error: helm upgrade failed (exit code 1):\n{helm_error}values before the upgrade: {}\n\
             to return to revision 3: helm rollback demo 3 -n demo-system",
            backup.display()
        )),
        "{stderr}"
    );

    // A failed first install has nothing to roll back to.
    let case = self::case();
    case.helm
        .reply("get values", Reply::fail(1, NOT_FOUND))
        .unwrap();
    case.helm
        .reply("upgrade", Reply::fail(1, helm_error))
        .unwrap();
    let (code, _, stderr) = case
        .upgrade(&["--agent", &a, "--image-registry", "10.16.10.111"])
        .await;
    assert_eq!(code, 4, "{stderr}");
    assert!(
        stderr.contains(
            "the release did not exist before (fresh install); nothing was backed up\n\
             to remove what the failed install left: helm uninstall demo -n demo-system"
        ),
        "{stderr}"
    );

    // helm failing before the upgrade (cannot reach the cluster) is a helm failure too.
    let case = self::case();
    case.helm
        .reply(
            "get values",
            Reply::fail(1, "Error: Kubernetes cluster unreachable\n"),
        )
        .unwrap();
    let (code, _, stderr) = case
        .upgrade(&["--agent", &a, "--image-registry", "10.16.10.111"])
        .await;
    assert_eq!(code, 4, "{stderr}");
    assert!(
        stderr.contains("`helm get values demo -n demo-system -o yaml` failed (exit code 1):\nError: Kubernetes cluster unreachable"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_prints_the_commands_the_backup_path_and_the_table_and_changes_nothing() {
    let case = case();
    case.helm
        .reply("get values", Reply::ok(CURRENT_VALUES))
        .unwrap();
    case.helm.reply("status", Reply::ok(STATUS)).unwrap();
    let (a, _) = agent("node-a", &[APP, SIDECAR]).await;
    let (code, stdout, stderr) = case
        .upgrade(&[
            "--agent",
            &a,
            "--image-registry",
            "10.16.10.111",
            "--dry-run",
        ])
        .await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(subcommands(&case.calls()), ["get values", "status"]);
    assert!(
        case.written("values-").is_empty(),
        "a dry run writes nothing"
    );
    assert!(
        stdout.contains("$ helm get values demo -n demo-system -o yaml\n$ helm status demo -n demo-system -o json\n"),
        "{stdout}"
    );
    let dir = case.dir.path().display();
    assert!(
        stdout.contains(&format!(
            "values backup: {dir}/demo.demo-system.values-backup."
        )),
        "{stdout}"
    );
    assert!(stdout.contains("(not written: dry run)"), "{stdout}");
    assert!(
        stdout.contains("preflight: 2 images the chart will pull, on 1 node\n")
            && stdout.contains("10.16.10.111/demo/sidecar:v1  ok\n"),
        "{stdout}"
    );
    let would = stdout
        .lines()
        .find(|l| l.starts_with("would run: "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        would.starts_with("would run: helm upgrade --install demo /")
            && would.contains(
                "/original-chart -n demo-system --create-namespace --cleanup-on-fail -f "
            )
            && would.contains(&format!("{dir}/demo.demo-system.values-upgrade.")),
        "{would}"
    );

    // A dry run whose preflight fails exits as the real run would.
    let (b, _) = agent("node-b", &[APP]).await;
    let (code, stdout, _) = case
        .upgrade(&[
            "--agent",
            &b,
            "--image-registry",
            "10.16.10.111",
            "--dry-run",
        ])
        .await;
    assert_eq!(code, 3, "{stdout}");
    assert!(stdout.contains("would run: helm upgrade"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn without_agents_the_preflight_cannot_check_and_skipping_it_is_loud() {
    let case = case();
    case.helm
        .reply("get values", Reply::fail(1, NOT_FOUND))
        .unwrap();
    let (code, _, stderr) = case.upgrade(&[]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(
            "the preflight cannot check the nodes: no --agent was given, nor an --image-registry"
        ) && stderr.contains("pass --skip-preflight"),
        "{stderr}"
    );
    // Without agents the registry of --image-registry is checked, if it can be reached
    // (nothing listens on port 9 here).
    let (code, _, stderr) = case
        .upgrade(&["--image-registry", "127.0.0.1:9/offline"])
        .await;
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(
            "no --agent was given, and the registry of --image-registry 127.0.0.1:9/offline cannot be checked: cannot reach registry 127.0.0.1:9"
        ) && stderr.contains("pass --skip-preflight"),
        "{stderr}"
    );
    assert!(case.calls().is_empty(), "nothing runs before the check");

    let (code, stdout, stderr) = case
        .upgrade(&["--image-registry", "10.16.10.111", "--skip-preflight"])
        .await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        stderr.contains("!!! preflight SKIPPED (--skip-preflight)"),
        "{stderr}"
    );
    assert!(stdout.contains("!!! preflight SKIPPED"), "{stdout}");
    assert_eq!(subcommands(&case.calls()), ["get values", "upgrade"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_exits_2_before_the_release_is_touched() {
    let case = case();
    let (a, _) = agent("node-a", &[APP, SIDECAR]).await;
    let missing = case.dir.path().join("missing.yaml");
    for (args, expected) in [
        (
            vec!["--version", "9.9.9"],
            "--version 9.9.9 was asked for, but the bundle's chart demo is version 0.1.0"
                .to_string(),
        ),
        (
            vec!["-f", missing.to_str().unwrap()],
            format!("{}: reading the --values file", missing.display()),
        ),
        (
            vec!["--set", "a[0]=x"],
            "list indexes (a[0]=x) are not supported".to_string(),
        ),
        (
            vec!["--chart", "mspider"],
            "expected \"bundle\" or REPO/CHART".to_string(),
        ),
        (
            vec!["--helm", "/nonexistent/helm"],
            "cannot run /nonexistent/helm: it was not found".to_string(),
        ),
    ] {
        let mut all = vec!["--agent", a.as_str(), "--image-registry", "10.16.10.111"];
        all.extend(args);
        let (code, stdout, stderr) = case.upgrade(&all).await;
        assert_eq!(code, 2, "{all:?}: {stdout}\n{stderr}");
        assert!(stderr.contains(&expected), "{all:?}: {stderr}");
        assert!(
            !case.calls().iter().any(|c| c.argv[0] == "upgrade"),
            "{all:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn load_then_upgrade_does_not_upgrade_when_a_node_failed() {
    let case = case();
    let (code, stdout, stderr) = case
        .lade(&[
            "load",
            case.bundle.to_str().unwrap(),
            "--agent",
            "127.0.0.1:1",
            "--connect-timeout",
            "2s",
            "--progress",
            "none",
            "--then-upgrade",
            "--release",
            "demo",
            "-n",
            "demo-system",
        ])
        .await;
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(
        stderr.contains("upgrade not started: not every node holds every image"),
        "{stderr}"
    );
    assert!(case.calls().is_empty());

    // Upgrade flags without --then-upgrade are refused, not ignored.
    let (code, _, stderr) = case
        .lade(&[
            "load",
            case.bundle.to_str().unwrap(),
            "--agent",
            "127.0.0.1:1",
            "--dry-run",
        ])
        .await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--then-upgrade"), "{stderr}");
}
