//! `lade-demo`: lade end to end on this machine, no cluster needed.
//!
//! Builds a sample DaoCloud-style bundle, starts two simulated nodes (each a private containerd
//! plus a real `lade-agent` on 127.0.0.1), loads the bundle onto both with the real `lade`
//! binary, proves the images are there and run, loads again to show nothing is re-sent, and
//! tears everything down. Run it through `scripts/demo`, which installs the prerequisites and
//! builds the workspace first (this binary finds `lade` and `lade-agent` next to itself).
//!
//! Usage: `lade-demo [--keep]`. `--keep` leaves the nodes running until Ctrl-C so they can be
//! inspected with `ctr`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use lade_testkit::fixtures::{
    sample_chart, sample_hints, sample_images, write_bundle, write_gcr_archive, Compression,
    APP_HELLO,
};
use lade_testkit::harness::require_binary;
use lade_testkit::nodes::{workspace_bin, Node, TEST_TOKEN};
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::signal::unix::{signal, SignalKind};

/// The static busybox the sample images are built around (Debian's busybox-static).
const BUSYBOX: &str = "/bin/busybox";
/// The rename rule the demo loads with, as a DaoCloud install into an offline registry would.
const RETAG: &str = "release.daocloud.io/demo=10.16.10.111/demo";
/// The app image under its retagged name; the demo runs a container from it.
const APP_RETAGGED: &str = "10.16.10.111/demo/app:v1";
/// Every name each node must end up with (originals are kept next to the retagged ones).
const EXPECTED_NAMES: [&str; 5] = [
    "release.daocloud.io/demo/app:v1",
    "release.daocloud.io/demo/sidecar:v1",
    "docker.io/library/busybox:latest",
    APP_RETAGGED,
    "10.16.10.111/demo/sidecar:v1",
];
const NODE_NAMES: [&str; 2] = ["demo-node-1", "demo-node-2"];
const STEPS: usize = 7;

const USAGE: &str = "\
usage: lade-demo [--keep]

Loads a generated sample bundle onto two simulated nodes (private containerd + lade-agent
each, on 127.0.0.1) with the real `lade` binary, checks the result, loads again to show that
nothing is re-sent, then tears everything down. Needs root, containerd, runc and
busybox-static; run it via scripts/demo, which installs those and builds the workspace.

  --keep     leave the nodes running at the end (prints sockets and agent addresses)
             and tear them down on Ctrl-C
  -h, --help this text";

/// Set in the environment of the demo proper, which [`supervise`] runs as a child.
const IN_OWN_GROUP_ENV: &str = "LADE_DEMO_IN_OWN_GROUP";

fn main() -> ExitCode {
    if std::env::var_os(IN_OWN_GROUP_ENV).is_none() {
        return supervise();
    }
    let mut keep = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--keep" => keep = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("lade-demo: unknown argument `{other}`\n\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lade-demo: FAILED: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The nodes live out here so that they are torn down in order whatever happens: the
    // steps fail, or Ctrl-C interrupts them (which drops the demo future mid-step).
    let mut nodes = Vec::new();
    let result = runtime.block_on(async {
        // Registered before anything else runs, so a Ctrl-C during a step is never lost.
        let mut sigint = signal(SignalKind::interrupt()).context("catching Ctrl-C")?;
        let session = tokio::select! {
            s = demo(&mut nodes) => s?,
            _ = sigint.recv() => bail!("interrupted"),
        };
        if keep {
            session.print_keep_info(&nodes);
            sigint.recv().await;
        }
        Ok(())
    });
    teardown(nodes);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nlade-demo: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the demo proper as a child in its own process group and forwards Ctrl-C (SIGINT,
/// SIGTERM, SIGHUP) to it alone; returns its exit code.
///
/// A Ctrl-C in a terminal signals the whole foreground process group. Were the demo in it,
/// containerd, the agents and `ctr` would all die at once, possibly mid-way through creating
/// a container, leaving behind what only a live containerd can clean up (a shim socket in the
/// host's /run/containerd/s, a busy cgroup). Out of that group, only the demo hears it and
/// stops its daemons in order.
fn supervise() -> ExitCode {
    let result = (|| -> Result<ExitCode> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let mut int = signal(SignalKind::interrupt())?;
            let mut term = signal(SignalKind::terminate())?;
            let mut hup = signal(SignalKind::hangup())?;
            let mut cmd = std::process::Command::new(std::env::current_exe()?);
            cmd.args(std::env::args_os().skip(1))
                .env(IN_OWN_GROUP_ENV, "1")
                // A background process group must not read the terminal.
                .stdin(Stdio::null())
                .process_group(0);
            let mut child = tokio::process::Command::from(cmd)
                .spawn()
                .context("starting the demo")?;
            let pid = child.id().context("demo exited at once")?;
            loop {
                tokio::select! {
                    biased;
                    status = child.wait() => {
                        let status = status?;
                        return Ok(match status.code() {
                            Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
                            None => ExitCode::FAILURE,
                        });
                    }
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                    _ = hup.recv() => {}
                }
                // SAFETY: kill(2) has no memory-safety preconditions; `pid` is our unreaped
                // child, so it cannot have been reused.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGINT);
                }
            }
        })
    })();
    result.unwrap_or_else(|e| {
        eprintln!("lade-demo: FAILED: {e:#}");
        ExitCode::FAILURE
    })
}

/// Stops every node: its agent first, then containerd (whose Drop guard deletes leftover
/// tasks, stops the daemon and removes its dir).
fn teardown(nodes: Vec<Node>) {
    if nodes.is_empty() {
        return;
    }
    println!("\ntearing down the nodes...");
    for mut node in nodes {
        node.agent.kill();
        drop(node);
    }
    println!("done: daemons stopped, temp dirs removed");
}

/// What the steps leave for `--keep`; dropping it removes the bundle.
struct Session {
    bundle: PathBuf,
    lade: PathBuf,
    _dir: TempDir,
}

impl Session {
    fn print_keep_info(&self, nodes: &[Node]) {
        println!("\n--keep: the nodes stay up until you press Ctrl-C.");
        for node in nodes {
            let socket = node.containerd.socket();
            println!("  {}", node.name);
            println!("    containerd socket  {}", socket.display());
            println!("    lade-agent         {}", node.addr());
            println!("    agent log          {}", node.agent.log().display());
            println!(
                "    try                ctr --address {} -n k8s.io images ls",
                socket.display()
            );
        }
        let agents: String = nodes
            .iter()
            .map(|n| format!(" --agent {}", n.addr()))
            .collect();
        println!(
            "  load again         LADE_AUTH_TOKEN={TEST_TOKEN} {} load {}{agents} --retag {RETAG}",
            self.lade.display(),
            self.bundle.display()
        );
        println!("Press Ctrl-C to tear everything down.");
    }
}

fn step(n: usize, what: &str) {
    println!("\n==> [{n}/{STEPS}] {what}");
}

async fn demo(nodes: &mut Vec<Node>) -> Result<Session> {
    step(1, "checking prerequisites");
    let (lade, agent) = prerequisites()?;
    println!("lade:       {}", lade.display());
    println!("lade-agent: {}", agent.display());

    step(2, "building a sample DaoCloud-style bundle");
    let dir = tempfile::Builder::new()
        .prefix("lade-demo-")
        .tempdir()
        .context("creating a temp dir for the bundle")?;
    let bundle = build_bundle(dir.path())?;
    let bundle_size = std::fs::metadata(&bundle)?.len();
    println!("bundle: {} ({})", bundle.display(), human(bundle_size));
    println!("\n$ lade inspect {}", bundle.display());
    let (status, _) = run_lade(&lade, &["inspect".into(), path_arg(&bundle)], Out::Inherit).await?;
    ensure!(status.success(), "`lade inspect` failed ({status})");

    step(
        3,
        "starting two simulated nodes (private containerd + lade-agent each)",
    );
    let started = Instant::now();
    let (a, b) = tokio::join!(Node::start(NODE_NAMES[0]), Node::start(NODE_NAMES[1]));
    for (name, node) in NODE_NAMES.iter().zip([a, b]) {
        nodes.push(node.with_context(|| format!("starting {name}"))?);
    }
    for node in nodes.iter() {
        println!(
            "{}: containerd at {}, lade-agent at {}",
            node.name,
            node.containerd.socket().display(),
            node.addr()
        );
    }
    println!("both up in {}", secs(started.elapsed()));
    let session = Session {
        bundle,
        lade,
        _dir: dir,
    };

    step(4, "loading the bundle onto both nodes");
    let args = load_args(&session.bundle, nodes, "text");
    println!("$ lade {}", args.join(" "));
    let started = Instant::now();
    let (status, table) = run_lade(&session.lade, &args, Out::Tee).await?;
    let first_wall = started.elapsed();
    if !status.success() {
        bail!("first `lade load` failed ({status}){}", agent_logs(nodes));
    }
    println!("first load took {} (wall time)", secs(first_wall));
    let first_sent = sent_column(&table);

    step(5, "checking the result on every node");
    for node in nodes.iter() {
        let names = node
            .image_names()
            .with_context(|| format!("listing images on {}", node.name))?;
        let (ids, names): (Vec<String>, Vec<String>) =
            names.into_iter().partition(|n| n.starts_with("sha256:"));
        println!(
            "{} has {} images (+{} CRI image ids):",
            node.name,
            names.len(),
            ids.len()
        );
        for name in &names {
            println!("  {name}");
        }
        let missing: Vec<&str> = EXPECTED_NAMES
            .iter()
            .copied()
            .filter(|want| !names.iter().any(|n| n == want))
            .collect();
        ensure!(missing.is_empty(), "{} lacks {missing:?}", node.name);
    }
    let node = &nodes[0];
    let cmd = ["/bin/busybox", "cat", "/app/hello.txt"];
    println!(
        "\nrunning `{}` in {APP_RETAGGED} on {}:",
        cmd.join(" "),
        node.name
    );
    let out = node
        .run_container(APP_RETAGGED, "demo", &cmd)
        .with_context(|| format!("running a container on {}", node.name))?;
    print!("  | {out}");
    if !out.ends_with('\n') {
        println!();
    }
    ensure!(
        out.as_bytes() == APP_HELLO,
        "container printed {out:?}, expected {:?}",
        String::from_utf8_lossy(APP_HELLO)
    );

    step(6, "loading the same bundle again (JSON summary this time)");
    let args = load_args(&session.bundle, nodes, "json");
    println!("$ lade {}", args.join(" "));
    let (status, json) = run_lade(&session.lade, &args, Out::Capture).await?;
    let reports: Vec<Value> = serde_json::from_str(&json).with_context(|| {
        format!("second `lade load` printed no JSON summary ({status}): {json}")
    })?;
    if !status.success() {
        bail!(
            "second `lade load` failed ({status}): {json}{}",
            agent_logs(nodes)
        );
    }
    let mut second = Vec::new();
    for report in &reports {
        let node = report["node"].as_str().unwrap_or("?").to_string();
        let sent = u64_field(report, "bytes_sent")?;
        let skipped = u64_field(report, "bytes_skipped")?;
        ensure!(
            report["ok"] == true,
            "second load failed on {node}: {report}"
        );
        second.push((node, sent, skipped));
    }
    ensure!(
        second.len() == nodes.len(),
        "expected {} node reports, got {}",
        nodes.len(),
        second.len()
    );
    let mut skipped: Vec<String> = second.iter().map(|(_, _, s)| human(*s)).collect();
    skipped.dedup();
    if second.iter().all(|(_, sent, _)| *sent == 0) {
        println!(
            "second run: 0 B sent to each node ({} already there)",
            skipped.join(" / ")
        );
    } else {
        bail!("second run re-sent data: {second:?}");
    }

    step(STEPS, "recap");
    println!("bundle          {}", human(bundle_size));
    println!(
        "first load      {} wall time, {} nodes in parallel",
        secs(first_wall),
        nodes.len()
    );
    let first: Vec<&str> = second
        .iter()
        .map(|(node, _, _)| {
            first_sent
                .iter()
                .find(|(n, _)| n == node)
                .map_or("? (see the table above)", |(_, s)| s.as_str())
        })
        .collect();
    let width = first.iter().map(|s| s.len()).max().unwrap_or(0).max(9) + 3;
    println!("{:<16}{:<width$}second run", "sent to", "first run");
    for ((node, sent, skipped), first) in second.iter().zip(first) {
        println!(
            "  {node:<14}{first:<width$}{} ({} already there)",
            human(*sent),
            human(*skipped)
        );
    }
    println!("container said  {out:?}");
    Ok(session)
}

/// Fails with an install hint unless root and every daemon/binary the demo needs is there;
/// returns the paths of `lade` and `lade-agent`.
fn prerequisites() -> Result<(PathBuf, PathBuf)> {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo starts containerd and runs containers, so it must run as root");
    }
    for bin in ["containerd", "ctr", "containerd-shim-runc-v2", "runc"] {
        // require_binary's own hint is about skipping tests, which means nothing here.
        let path = require_binary(bin).map_err(|_| {
            anyhow!(
                "`{bin}` not found on PATH: install containerd with `apt-get install -y \
                 containerd runc` (brings ctr and containerd-shim-runc-v2), or run scripts/demo, \
                 which installs everything the demo needs"
            )
        })?;
        println!("{bin:<24}{}", path.display());
    }
    let busybox = std::fs::read(BUSYBOX).with_context(|| {
        format!("{BUSYBOX} is missing: install it with `apt-get install -y busybox-static`")
    })?;
    // A dynamically linked busybox names its loader; it could not run inside the sample
    // images, which hold nothing but busybox itself.
    let dynamic = [&b"/ld-linux"[..], b"/ld-musl"]
        .iter()
        .any(|loader| busybox.windows(loader.len()).any(|w| w == *loader));
    ensure!(
        !dynamic,
        "{BUSYBOX} is dynamically linked; the sample images need a static one: \
         `apt-get install -y busybox-static`"
    );
    println!("{:<24}{BUSYBOX} (static)", "busybox");
    let lade = workspace_bin("lade").context("run `cargo build --workspace` first")?;
    let agent = workspace_bin("lade-agent").context("run `cargo build --workspace` first")?;
    Ok((lade, agent))
}

/// Writes the sample images as a gzip'd go-containerregistry archive and wraps it into a
/// bundle with the sample chart and hints; returns the bundle's path.
fn build_bundle(dir: &Path) -> Result<PathBuf> {
    let images = sample_images(Path::new(BUSYBOX))?;
    let images_tar = dir.join("images.tar");
    let mut out = BufWriter::new(File::create(&images_tar)?);
    let written = write_gcr_archive(&images, Compression::Gzip, &mut out)?;
    out.flush()?;
    drop(out);
    for image in &written.images {
        println!("  image {}", image.reference);
    }
    let bundle = dir.join("demo-bundle.tar");
    let mut out = BufWriter::new(File::create(&bundle)?);
    write_bundle(&images_tar, &sample_hints(), &sample_chart(), &mut out)
        .context("writing the bundle")?;
    out.flush()?;
    drop(out);
    std::fs::remove_file(&images_tar)?;
    Ok(bundle)
}

fn load_args(bundle: &Path, nodes: &[Node], output: &str) -> Vec<String> {
    let mut args = vec!["load".to_string(), path_arg(bundle)];
    for node in nodes {
        args.push("--agent".into());
        args.push(node.addr());
    }
    for arg in ["--retag", RETAG, "--progress", "lines", "-o", output] {
        args.push(arg.into());
    }
    args
}

/// Where `lade`'s stdout goes; its stderr (progress, diagnostics) always goes to ours.
enum Out {
    Inherit,
    /// Shown as it comes and also returned.
    Tee,
    /// Only returned.
    Capture,
}

/// Runs the real `lade` binary; returns its exit status and (unless inherited) its stdout.
async fn run_lade(
    lade: &Path,
    args: &[String],
    out: Out,
) -> Result<(std::process::ExitStatus, String)> {
    let mut cmd = tokio::process::Command::new(lade);
    cmd.args(args)
        .env("RUST_LOG", "warn")
        // The demo's agents, like a cluster's, require the token of their Secret.
        .env("LADE_AUTH_TOKEN", TEST_TOKEN)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    cmd.stdout(match out {
        Out::Inherit => Stdio::inherit(),
        Out::Tee | Out::Capture => Stdio::piped(),
    });
    let mut child = cmd
        .spawn()
        .with_context(|| format!("running {}", lade.display()))?;
    let mut text = String::new();
    if let Some(stdout) = child.stdout.take() {
        let mut lines = BufReader::new(stdout).lines();
        while let Some(line) = lines.next_line().await? {
            if matches!(out, Out::Tee) {
                println!("{line}");
            }
            text.push_str(&line);
            text.push('\n');
        }
    }
    let status = child.wait().await?;
    Ok((status, text))
}

/// (node, SENT cell) of each row of `lade load`'s text summary table, located by the header's
/// column positions (cells are left-aligned and padded to the header's columns).
fn sent_column(table: &str) -> Vec<(String, String)> {
    let mut lines = table.lines().skip_while(|l| !l.starts_with("NODE "));
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let (Some(agent), Some(sent), Some(there)) = (
        header.find("AGENT"),
        header.find("SENT"),
        header.find("ALREADY THERE"),
    ) else {
        return Vec::new();
    };
    lines
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| {
            let node = l.get(..agent)?.trim();
            let cell = l.get(sent..there)?.trim();
            Some((node.to_string(), cell.to_string()))
        })
        .collect()
}

fn u64_field(report: &Value, key: &str) -> Result<u64> {
    report[key]
        .as_u64()
        .with_context(|| format!("`{key}` missing in lade's JSON report {report}"))
}

/// The last lines of every agent's log, to explain a failed load before the dirs are removed.
fn agent_logs(nodes: &[Node]) -> String {
    let mut s = String::new();
    for node in nodes {
        let log = std::fs::read_to_string(node.agent.log()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n    ");
        s.push_str(&format!("\n  agent log of {}:\n    {tail}", node.name));
    }
    s
}

fn path_arg(path: &Path) -> String {
    path.display().to_string()
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// Bytes in binary units, exact below 1 KiB: `512 B`, `1.89 MiB`.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.2} {}", UNITS[unit])
}
