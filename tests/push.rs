//! `lade push` end to end: the real `lade` binary against a real registry (Debian's
//! `docker-registry`, distribution 2.8, started privately per test), checked with real
//! clients: `skopeo` pulls every pushed image back and compares digests, containerd's `ctr`
//! pulls one and runs it. Then `lade upgrade` whose preflight checks that registry instead of
//! nodes. Needs docker-registry, skopeo, apache2-utils (htpasswd), openssl, containerd and
//! busybox-static (`scripts/test` installs them); LADE_SKIP_DAEMON_TESTS=1 skips explicitly.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{ensure, Context, Result};
use lade::bundle::Bundle;
use lade_testkit::fixtures::{
    random_layer, sample_chart, write_bundle, write_oci_multiplatform, ArchiveFormat, Compression,
    ImageFixture, APP_HELLO,
};
use lade_testkit::harness::{daemon_tests_enabled, require_binary};
use lade_testkit::helm::{FakeHelm, Reply};
use lade_testkit::nodes::{workspace_bin, Node};
use lade_testkit::registry::{Registry, RegistryOptions};
use lade_tests::{images, images_and_big, write_images_tar};
use serde_json::Value;

/// The sample chart's images, named through global.imageRegistry as the chart pulls them.
const HINTS: &str = "\
- \"{{ .global.imageRegistry }}/demo/app:{{ .app.image.tag }}\"
- \"{{ .global.imageRegistry }}/demo/sidecar:{{ .sidecar-agent.image.tag }}\"
- \"{{ .global.imageRegistry }}/library/busybox:latest\"
";
/// Where each sample image lands under `--registry HOST/offline`.
const PUSHED: [&str; 3] = [
    "offline/demo/app:v1",
    "offline/demo/sidecar:v1",
    "offline/library/busybox:latest",
];
const USER: &str = "alice";
const PASSWORD: &str = "s3cret";

/// A bundle of `images` (go-containerregistry layout, layers compressed with `compression`),
/// with [`HINTS`] and the sample chart, at `dir/<name>`.
fn bundle_of(
    dir: &Path,
    name: &str,
    images: &[ImageFixture],
    compression: Compression,
) -> Result<PathBuf> {
    let parts = dir.join(format!("{name}.parts"));
    std::fs::create_dir_all(&parts)?;
    let (images_tar, _) = write_images_tar(&parts, images, ArchiveFormat::Gcr, compression)?;
    let path = dir.join(name);
    let mut out = BufWriter::new(File::create(&path)?);
    write_bundle(&images_tar, HINTS, &sample_chart(), &mut out)?;
    out.into_inner()?.sync_all()?;
    std::fs::remove_dir_all(parts)?;
    Ok(path)
}

/// The three sample images as a bundle (go-containerregistry layout, gzip) at
/// `dir/demo.bundle.tar`.
fn demo_bundle(dir: &Path) -> Result<PathBuf> {
    bundle_of(dir, "demo.bundle.tar", &images()?, Compression::Gzip)
}

/// [`demo_bundle`] in `dir`, and a registry that requires the login [`USER`] / [`PASSWORD`],
/// with `options` otherwise.
async fn demo_bundle_and_login_registry(
    dir: &Path,
    options: RegistryOptions,
) -> Result<(PathBuf, Registry)> {
    let bundle = demo_bundle(dir)?;
    let registry = Registry::start(RegistryOptions {
        login: Some((USER.into(), PASSWORD.into())),
        ..options
    })
    .await?;
    Ok((bundle, registry))
}

/// What a `lade` run left.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "no JSON report ({e}); stdout: {}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }
}

/// Runs the real `lade` with `args`, `stdin` piped in and `envs` set; the docker config is an
/// empty dir unless `envs` names one, so the host's logins never leak in.
fn lade(args: &[&str], stdin: &str, envs: &[(&str, &Path)]) -> Result<Run> {
    let empty = tempfile::tempdir()?;
    let mut command = Command::new(workspace_bin("lade")?);
    command
        .args(args)
        .env("DOCKER_CONFIG", empty.path())
        .env("RUST_LOG", "warn")
        .env_remove("LADE_REGISTRY_USERNAME")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (key, value) in envs {
        command.env(key, value);
    }
    let mut child = command.spawn().context("running lade")?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    Ok(Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// `lade push BUNDLE --registry HOST/offline -o json --progress lines` + `extra`.
fn push(bundle: &Path, registry: &Registry, extra: &[&str]) -> Result<Run> {
    let target = format!("{}/offline", registry.host());
    let mut args = vec![
        "push",
        bundle.to_str().expect("UTF-8 path"),
        "--registry",
        &target,
        "-o",
        "json",
        "--progress",
        "lines",
    ];
    args.extend_from_slice(extra);
    lade(&args, "", &[])
}

fn skopeo(args: &[&str]) -> Result<Output> {
    let out = Command::new(require_binary("skopeo")?)
        .args(args)
        .output()
        .context("running skopeo")?;
    ensure!(
        out.status.success(),
        "skopeo {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

/// The digest of the manifest `name` resolves to, as skopeo reads it from the registry.
fn remote_digest(name: &str, tls: &[&str]) -> Result<String> {
    let mut args = vec!["inspect", "--raw"];
    args.extend_from_slice(tls);
    let docker = format!("docker://{name}");
    args.push(&docker);
    Ok(lade_testkit::fixtures::blob_digest(&skopeo(&args)?.stdout))
}

/// Every outcome of the tags of the report's images, in order.
fn outcomes(report: &Value) -> Vec<String> {
    report["images"]
        .as_array()
        .expect("images")
        .iter()
        .flat_map(|i| i["tags"].as_array().expect("tags").iter())
        .map(|t| t["outcome"].as_str().expect("outcome").to_string())
        .collect()
}

fn u64_of(report: &Value, key: &str) -> u64 {
    report[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {report}"))
}

/// Bytes of the bundle's configs and layers: what a first push uploads (manifests are not
/// blobs).
fn blob_bytes(bundle: &Path) -> Result<u64> {
    let bundle = Bundle::open(bundle)?;
    let mut digests: Vec<&String> = bundle
        .images
        .iter()
        .flat_map(|i| std::iter::once(&i.config).chain(&i.layers))
        .collect();
    digests.sort();
    digests.dedup();
    Ok(digests.iter().map(|d| bundle.blobs[*d].size).sum())
}

#[tokio::test(flavor = "multi_thread")]
async fn pushed_images_pull_back_run_and_a_second_push_sends_nothing() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let bundle = demo_bundle(dir.path())?;
    let expected = Bundle::open(&bundle)?;
    let registry = Registry::start(RegistryOptions::default()).await?;
    let host = registry.host();
    let plain = ["--tls-verify=false"];

    // A dry run checks and tells, and writes nothing.
    let run = push(&bundle, &registry, &["--insecure", "--dry-run"])?;
    ensure!(run.code == 0, "{}\n{}", run.stdout, run.stderr);
    let report = run.json();
    assert_eq!(outcomes(&report), ["created"; 3]);
    assert!(
        u64_of(&report, "bytes_pushed") > blob_bytes(&bundle)?,
        "{report}"
    );
    assert!(
        !registry
            .storage()
            .join("docker/registry/v2/repositories")
            .exists(),
        "a dry run wrote into the registry"
    );

    let run = push(&bundle, &registry, &["--insecure"])?;
    ensure!(run.code == 0, "{}\n{}", run.stdout, run.stderr);
    let first = run.json();
    assert_eq!(outcomes(&first), ["created"; 3]);
    assert_eq!(first["chart"]["tag"]["outcome"], "created", "{first}");
    assert_eq!(
        first["chart"]["tag"]["name"],
        format!("oci://{host}/offline/demo:0.1.0")
    );
    // Each blob is uploaded once; the base layer the three images share is mounted into the
    // two other repositories.
    let base = &expected.images[0].layers[0];
    let chart_bytes = u64_of(&first, "bytes_pushed") - blob_bytes(&bundle)?;
    assert!(chart_bytes > 0 && chart_bytes < 4096, "{first}");
    assert_eq!(u64_of(&first, "blobs_mounted"), 2, "{first}");
    assert_eq!(
        u64_of(&first, "bytes_mounted"),
        2 * expected.blobs[base].size
    );
    assert!(run.stderr.contains("sending"), "{}", run.stderr);

    // A real client finds every image under its name, with the bundle's digests.
    for (image, name) in expected.images.iter().zip(PUSHED) {
        let name = format!("{host}/{name}");
        assert_eq!(remote_digest(&name, &plain)?, image.manifest, "{name}");
        let copy = dir.path().join(name.replace(['/', ':'], "_"));
        skopeo(&[
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{name}"),
            &format!("dir:{}", copy.display()),
        ])?;
        let manifest = std::fs::read(copy.join("manifest.json"))?;
        assert_eq!(
            lade_testkit::fixtures::blob_digest(&manifest),
            image.manifest
        );
        for layer in &image.layers {
            let hex = layer.trim_start_matches("sha256:");
            let bytes = std::fs::read(copy.join(hex))?;
            assert_eq!(&lade_testkit::fixtures::blob_digest(&bytes), layer);
        }
    }

    // The chart is a helm OCI artifact.
    let chart = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{host}/offline/demo:0.1.0"),
    ])?;
    let manifest: Value = serde_json::from_slice(&chart.stdout)?;
    assert_eq!(
        manifest["config"]["mediaType"],
        "application/vnd.cncf.helm.config.v1+json"
    );
    assert_eq!(
        manifest["layers"][0]["mediaType"],
        "application/vnd.cncf.helm.chart.content.v1.tar+gzip"
    );

    // containerd pulls one and runs it.
    let node = Node::start("pull").await?;
    let app = format!("{host}/{}", PUSHED[0]);
    node.containerd
        .ctr_ok(&["-n", "k8s.io", "images", "pull", "--plain-http", &app])?;
    let listing = node.containerd.ctr_ok(&["-n", "k8s.io", "images", "ls"])?;
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with(&app) && l.contains(&expected.images[0].manifest)),
        "{listing}"
    );
    let out = node.run_container(&app, "pulled", &["/bin/busybox", "cat", "/app/hello.txt"])?;
    assert_eq!(out.as_bytes(), APP_HELLO);

    // `lade load` of the same docker-archive names each image on a node at the very digest
    // the registry holds: lade synthesises the same manifest for both.
    let loaded = Node::start("loaded").await?;
    let (code, reports, stderr) = lade_tests::load_json(
        &bundle,
        &[loaded.addr()],
        &[
            "--retag",
            &format!("release.daocloud.io={host}/offline"),
            "--retag",
            &format!("docker.io={host}/offline"),
        ],
    )?;
    ensure!(code == 0, "{reports:#?}\n{stderr}");
    let names = loaded.all_image_names()?;
    for name in PUSHED {
        let name = format!("{host}/{name}");
        let repo = &name[..name.rfind(':').expect("a tag")];
        let pinned = format!("{repo}@{}", remote_digest(&name, &plain)?);
        assert!(names.contains(&pinned), "{pinned} not in {names:?}");
    }

    // The same bundle again: every tag is where it was, and no blob is sent.
    let run = push(&bundle, &registry, &["--insecure"])?;
    ensure!(run.code == 0, "{}\n{}", run.stdout, run.stderr);
    let second = run.json();
    assert_eq!(outcomes(&second), ["unchanged"; 3]);
    assert_eq!(second["chart"]["tag"]["outcome"], "unchanged");
    assert_eq!(u64_of(&second, "blobs_pushed"), 0, "{second}");
    assert_eq!(u64_of(&second, "bytes_pushed"), 0, "{second}");
    assert_eq!(u64_of(&second, "bytes_present"), blob_bytes(&bundle)?);

    // `lade upgrade` without agents: the preflight checks the registry.
    let helm = FakeHelm::new()?;
    helm.reply("get values", Reply::fail(1, "Error: release: not found\n"))?;
    let upgrade = |image_registry: String| -> Result<Run> {
        let path = helm.path_env()?;
        let args = [
            "upgrade",
            bundle.to_str().expect("UTF-8"),
            "--release",
            "demo",
            "-n",
            "demo-system",
            "--image-registry",
            &image_registry,
            "--registry-insecure",
        ];
        lade(&args, "", &[("PATH", Path::new(&path))])
    };
    let run = upgrade(format!("{host}/offline"))?;
    ensure!(run.code == 0, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains(&format!(
            "preflight: 3 images the chart will pull, in registry {host} (no --agent was given)"
        )) && run
            .stdout
            .contains("preflight passed: the registry holds every image the chart will pull"),
        "{}",
        run.stdout
    );
    assert_eq!(
        helm.calls()?.last().expect("a call").subcommand(),
        "upgrade"
    );
    // A project the images were not pushed to: nothing is upgraded.
    let run = upgrade(format!("{host}/elsewhere"))?;
    assert_eq!(run.code, 3, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout
            .contains(&format!("{host}/elsewhere/demo/app:v1"))
            && run.stdout.contains("MISSING")
            && run.stdout.contains("no such manifest in the registry"),
        "{}",
        run.stdout
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tag_is_not_moved_to_another_image_without_force() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let mut imgs = images()?;
    let old = bundle_of(dir.path(), "old.tar", &imgs, Compression::Gzip)?;
    // The same name, other content: a rebuilt app:v1.
    let base = imgs[0].layers[0].clone();
    imgs[0] = ImageFixture::new(
        &imgs[0].name,
        vec![base, random_layer(3, 4096, 1.0)],
        &["/bin/sh"],
    );
    let new = bundle_of(dir.path(), "new.tar", &imgs, Compression::Gzip)?;
    let (old_app, new_app) = (
        Bundle::open(&old)?.images[0].manifest.clone(),
        Bundle::open(&new)?.images[0].manifest.clone(),
    );
    let registry = Registry::start(RegistryOptions::default()).await?;
    let app = format!("{}/{}", registry.host(), PUSHED[0]);
    let plain = ["--tls-verify=false"];

    let run = push(&old, &registry, &["--insecure"])?;
    ensure!(run.code == 0, "{}\n{}", run.stdout, run.stderr);
    let run = push(&new, &registry, &["--insecure"])?;
    assert_eq!(run.code, 1, "{}\n{}", run.stdout, run.stderr);
    let report = run.json();
    assert_eq!(outcomes(&report), ["refused", "unchanged", "unchanged"]);
    assert_eq!(report["images"][0]["tags"][0]["previous"], old_app.as_str());
    assert_eq!(
        u64_of(&report, "blobs_pushed"),
        0,
        "nothing of a refused image is sent"
    );
    assert_eq!(remote_digest(&app, &plain)?, old_app);

    // The text summary says which tag, where it points, and how to move it.
    let target = format!("{}/offline", registry.host());
    let args = ["push", new.to_str().expect("UTF-8"), "--registry", &target];
    let run = lade(
        &[&args[..], &["--insecure", "--progress", "none"]].concat(),
        "",
        &[],
    )?;
    assert_eq!(run.code, 1);
    assert!(
        run.stdout.contains(&format!(
            "{app}: already points at {old_app}, not at {new_app}"
        )) && run.stdout.contains("re-run with --force"),
        "{}",
        run.stdout
    );

    let run = push(&new, &registry, &["--insecure", "--force"])?;
    ensure!(run.code == 0, "{}\n{}", run.stdout, run.stderr);
    assert_eq!(outcomes(&run.json()), ["moved", "unchanged", "unchanged"]);
    assert_eq!(remote_digest(&app, &plain)?, new_app);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_with_login_and_tls_admits_only_the_right_login() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (bundle, registry) = demo_bundle_and_login_registry(
        dir.path(),
        RegistryOptions {
            tls: true,
            ..Default::default()
        },
    )
    .await?;
    let ca = registry.ca_file().expect("a TLS registry has a CA");
    let ca = ca.to_str().expect("UTF-8");
    let repositories = registry.storage().join("docker/registry/v2/repositories");

    let target = format!("{}/offline", registry.host());
    let login = [
        "push",
        bundle.to_str().expect("UTF-8"),
        "--registry",
        &target,
        "--username",
        USER,
        "--password-stdin",
    ];
    // The certificate is not trusted without the CA.
    let run = lade(&login, "s3cret\n", &[])?;
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr
            .contains(&format!("cannot reach registry {}", registry.host()))
            && run.stderr.contains("UnknownIssuer"),
        "{}",
        run.stderr
    );
    // A wrong password: refused before anything is written.
    let args = [&login[..], &["--ca-file", ca]].concat();
    let run = lade(&args, "wrong\n", &[])?;
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains(&format!(
            "registry {} refused the login of \"alice\": wrong username or password",
            registry.host()
        )),
        "{}",
        run.stderr
    );
    assert!(
        !repositories.exists(),
        "a refused login wrote into the registry"
    );
    // No login at all.
    let run = push(&bundle, &registry, &["--ca-file", ca])?;
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.stderr.contains("requires a login"), "{}", run.stderr);
    assert!(!repositories.exists());

    // The password on stdin.
    let run = lade(
        &[&args[..], &["-o", "json", "--progress", "none"]].concat(),
        "s3cret\n",
        &[],
    )?;
    ensure!(run.code == 0, "{}\n{}", run.stdout, run.stderr);
    assert_eq!(outcomes(&run.json()), ["created"; 3]);
    // The login `docker login` left in the docker config.
    let docker = tempfile::tempdir()?;
    std::fs::write(
        docker.path().join("config.json"),
        format!(
            r#"{{"auths": {{"https://{}": {{"auth": "YWxpY2U6czNjcmV0"}}}}}}"#,
            registry.host()
        ),
    )?;
    let args = [
        "push",
        bundle.to_str().expect("UTF-8"),
        "--registry",
        &target,
        "--ca-file",
        ca,
        "-o",
        "json",
        "--progress",
        "none",
    ];
    let run = lade(&args, "", &[("DOCKER_CONFIG", docker.path())])?;
    ensure!(run.code == 0, "{}\n{}", run.stdout, run.stderr);
    assert_eq!(outcomes(&run.json()), ["unchanged"; 3]);
    // --insecure: HTTPS without checking the certificate.
    let insecure = [
        &login[..],
        &["--insecure", "-o", "json", "--progress", "none"],
    ]
    .concat();
    let run = lade(&insecure, "s3cret\n", &[])?;
    ensure!(run.code == 0, "{}\n{}", run.stdout, run.stderr);
    assert_eq!(outcomes(&run.json()), ["unchanged"; 3]);

    let expected = Bundle::open(&bundle)?;
    // skopeo takes a directory of CA files (and would read ca.key as half a client pair).
    let certs = tempfile::tempdir()?;
    std::fs::copy(ca, certs.path().join("ca.crt"))?;
    let cert_dir = format!("--cert-dir={}", certs.path().display());
    let creds = format!("--creds={USER}:{PASSWORD}");
    let name = format!("{}/{}", registry.host(), PUSHED[2]);
    assert_eq!(
        remote_digest(&name, &[&cert_dir, &creds])?,
        expected.images[2].manifest
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_behind_a_token_server_is_pushed_to_with_bearer_tokens() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let (bundle, registry) = demo_bundle_and_login_registry(
        dir.path(),
        RegistryOptions {
            token_server: true,
            ..Default::default()
        },
    )
    .await?;
    let target = format!("{}/offline", registry.host());
    let args = [
        "push",
        bundle.to_str().expect("UTF-8"),
        "--registry",
        &target,
        "--insecure",
        "--username",
        USER,
        "--password-stdin",
        "-o",
        "json",
        "--progress",
        "none",
    ];
    // The token server refuses the login: nothing is written.
    let run = lade(&args, "wrong\n", &[])?;
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("refused the login of \"alice\""),
        "{}",
        run.stderr
    );
    assert!(!registry
        .storage()
        .join("docker/registry/v2/repositories")
        .exists());

    let run = lade(&args, "s3cret\n", &[])?;
    ensure!(run.code == 0, "{}\n{}", run.stdout, run.stderr);
    let report = run.json();
    assert_eq!(outcomes(&report), ["created"; 3]);
    assert_eq!(report["chart"]["tag"]["outcome"], "created");
    // Mounting across repositories needs a token for both; the registry granted it.
    assert_eq!(u64_of(&report, "blobs_mounted"), 2, "{report}");
    let run = lade(&args, "s3cret\n", &[])?;
    ensure!(run.code == 0, "{}\n{}", run.stdout, run.stderr);
    assert_eq!(outcomes(&run.json()), ["unchanged"; 3]);

    let expected = Bundle::open(&bundle)?;
    let creds = format!("--creds={USER}:{PASSWORD}");
    let name = format!("{}/{}", registry.host(), PUSHED[1]);
    assert_eq!(
        remote_digest(&name, &["--tls-verify=false", &creds])?,
        expected.images[1].manifest
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_push_cut_off_by_a_registry_crash_completes_when_run_again() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    // Big enough that the upload is still running when the registry is killed.
    let imgs = images_and_big(11, &[96 << 20])?;
    let bundle = bundle_of(dir.path(), "big.tar", &imgs, Compression::None)?;
    let expected = Bundle::open(&bundle)?;
    let mut registry = Registry::start(RegistryOptions::default()).await?;
    let target = format!("{}/offline", registry.host());
    let big = format!("{}/offline/demo/big:v1", registry.host());

    let mut child = Command::new(workspace_bin("lade")?)
        .args([
            "push",
            bundle.to_str().expect("UTF-8"),
            "--registry",
            &target,
        ])
        .args([
            "--insecure",
            "-o",
            "json",
            "--progress",
            "lines",
            "--chart-repo",
            "none",
        ])
        .env("DOCKER_CONFIG", dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line?;
        seen.push(line.clone());
        // The first quarter of the bytes is out: kill the registry under the upload.
        if line.contains("] sent ") {
            registry.kill_9();
            break;
        }
    }
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let out = child.wait_with_output()?;
    assert_eq!(out.status.code(), Some(1), "{seen:?} {rest:?}");
    let report: Value = serde_json::from_slice(&out.stdout)?;
    let failed = &report["images"][3];
    assert_eq!(failed["tags"][0]["outcome"], "failed", "{report}");
    let error = failed["error"].as_str().expect("an error");
    assert!(
        error.contains(&format!("registry {}", registry.host())),
        "{error}"
    );

    registry.restart().await?;
    let run = push(&bundle, &registry, &["--insecure", "--chart-repo", "none"])?;
    ensure!(run.code == 0, "{}\n{}", run.stdout, run.stderr);
    let report = run.json();
    assert_eq!(
        report["images"][3]["tags"][0]["outcome"], "created",
        "{report}"
    );
    assert_eq!(
        remote_digest(&big, &["--tls-verify=false"])?,
        expected.images[3].manifest
    );
    // Whatever arrived whole before the crash is not sent again.
    assert!(
        u64_of(&report, "bytes_pushed") < blob_bytes(&bundle)?,
        "{report}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn oci_archives_keep_their_manifests_and_every_platform_of_an_index() -> Result<()> {
    if !daemon_tests_enabled() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let imgs = images()?;
    let registry = Registry::start(RegistryOptions::default()).await?;
    let host = registry.host();
    let plain = ["--tls-verify=false"];
    for (format, compression) in [
        (ArchiveFormat::Oci, Compression::Zstd),
        (ArchiveFormat::Docker25, Compression::Gzip),
        (ArchiveFormat::DockerSave, Compression::None),
    ] {
        let sub = dir.path().join(format!("{format:?}"));
        std::fs::create_dir(&sub)?;
        let (archive, _) = write_images_tar(&sub, &imgs, format, compression)?;
        let project = format!("{host}/{format:?}").to_lowercase();
        let args = [
            "push",
            archive.to_str().expect("UTF-8"),
            "--registry",
            &project,
        ];
        let run = lade(
            &[
                &args[..],
                &["--insecure", "-o", "json", "--progress", "none"],
            ]
            .concat(),
            "",
            &[],
        )?;
        ensure!(run.code == 0, "{format:?}: {}\n{}", run.stdout, run.stderr);
        assert!(run.json()["chart"].is_null(), "a bare archive has no chart");
        let expected = Bundle::open(&archive)?;
        for (image, name) in expected.images.iter().zip(PUSHED) {
            let name = format!("{project}/{}", name.trim_start_matches("offline/"));
            assert_eq!(
                remote_digest(&name, &plain)?,
                image.manifest,
                "{format:?} {name}"
            );
        }
    }

    // One image for two platforms: the index and both manifests are pushed.
    let arm = ImageFixture::new(
        "release.daocloud.io/demo/multi:v1",
        vec![imgs[0].layers[0].clone(), random_layer(5, 2048, 1.0)],
        &["/bin/sh"],
    );
    let mut out = BufWriter::new(File::create(dir.path().join("multi.tar"))?);
    let written = write_oci_multiplatform(
        "release.daocloud.io/demo/multi:v1",
        &[("amd64", imgs[0].clone()), ("arm64", arm)],
        Compression::Gzip,
        &mut out,
    )?;
    out.into_inner()?.sync_all()?;
    let archive = dir.path().join("multi.tar");
    let run = push(&archive, &registry, &["--insecure"])?;
    ensure!(run.code == 0, "{}\n{}", run.stdout, run.stderr);
    assert_eq!(
        run.json()["images"][0]["digest"],
        written.index_digest.as_str()
    );
    let name = format!("{host}/offline/demo/multi:v1");
    assert_eq!(remote_digest(&name, &plain)?, written.index_digest);
    for (architecture, manifest) in &written.manifests {
        let by_digest = format!("{host}/offline/demo/multi@{manifest}");
        assert_eq!(
            &remote_digest(&by_digest, &plain)?,
            manifest,
            "{architecture}"
        );
    }
    let node = Node::start("multi").await?;
    node.containerd
        .ctr_ok(&["-n", "k8s.io", "images", "pull", "--plain-http", &name])?;
    let out = node.run_container(&name, "multi", &["/bin/busybox", "cat", "/app/hello.txt"])?;
    assert_eq!(out.as_bytes(), APP_HELLO);
    Ok(())
}
