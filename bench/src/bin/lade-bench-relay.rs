//! `lade-bench-relay`: relay fan-out on a simulated cluster whose coordinator link is the
//! bottleneck. Run it through `scripts/bench-relay` (root: it makes network namespaces).
//!
//! Every node is a network namespace holding a `lade-agent` (its private containerd runs
//! outside, reached by its socket), all joined by a bridge; the coordinator runs `lade load`
//! in a namespace of its own whose link is rate-limited with tbf (no netem needed). The
//! nodes talk to each other at memory speed. For N nodes and each relay mode it measures
//! wall time, CPU of every process involved (they share this machine's cores), the bytes
//! the coordinator counted as sent, and the bytes its interface really transmitted
//! (`/sys/class/net/<if>/statistics/tx_bytes`, so protocol overhead included).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use lade_bench::{cpu_seconds, load_flags, parse_flags, time_report};
use lade_testkit::fixtures::{
    random_layer, sample_chart, sample_hints, write_bundle, ArchiveFormat, Compression,
    ImageFixture,
};
use lade_testkit::harness::{ChildGuard, Containerd};
use lade_testkit::nodes::{workspace_bin, TEST_TOKEN};
use serde::Serialize;

struct Args {
    size_mib: usize,
    rate_mbit: u64,
    nodes: Vec<usize>,
    modes: Vec<String>,
    rounds: usize,
    out: PathBuf,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        size_mib: 256,
        rate_mbit: 200,
        nodes: vec![1, 2, 4, 8],
        modes: vec!["auto".into(), "off".into()],
        rounds: 1,
        out: PathBuf::from("bench/results"),
    };
    let usage = "usage: lade-bench-relay [--size-mib 256] [--rate-mbit 200] [--nodes 1,2,4,8] \
                 [--modes auto,off] [--rounds 1] [--out bench/results]";
    parse_flags(usage, |flag, value| {
        match flag {
            "--size-mib" => args.size_mib = value()?.parse()?,
            "--rate-mbit" => args.rate_mbit = value()?.parse()?,
            "--nodes" => {
                args.nodes = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--modes" => args.modes = value()?.split(',').map(str::to_string).collect(),
            "--rounds" => args.rounds = value()?.parse()?,
            "--out" => args.out = PathBuf::from(value()?),
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    ensure!(
        args.nodes.iter().all(|&n| (1..=50).contains(&n)),
        "--nodes: 1 to 50"
    );
    Ok(args)
}

/// Four images of two incompressible layers each, stored uncompressed: the bytes on the
/// wire are the bundle's bytes, and unpacking costs little next to the transfer.
/// Returns the bundle and the bytes of its layers and configs (the blobs but the manifests,
/// which lade makes for docker-archives).
fn bundle(args: &Args) -> Result<(PathBuf, u64)> {
    let dir = PathBuf::from("target/bench-cache").join(format!("relay-s{}", args.size_mib));
    let path = dir.join("relay.bundle.tar");
    let sizes = dir.join("blob-bytes");
    if path.is_file() && sizes.is_file() {
        return Ok((path, std::fs::read_to_string(&sizes)?.trim().parse()?));
    }
    std::fs::create_dir_all(&dir)?;
    eprintln!("generating a {} MiB bundle...", args.size_mib);
    let layer = (args.size_mib << 20) / 8;
    let images: Vec<ImageFixture> = (0..4)
        .map(|i| {
            ImageFixture::new(
                &format!("release.daocloud.io/bench/relay-{i}:v1"),
                vec![
                    random_layer(5000 + 2 * i as u64, layer, 0.0),
                    random_layer(5001 + 2 * i as u64, layer, 0.0),
                ],
                &["/bin/sh"],
            )
        })
        .collect();
    let images_tar = dir.join("images.tar");
    let mut out = BufWriter::new(File::create(&images_tar)?);
    let written = ArchiveFormat::Gcr.write(&images, Compression::None, &mut out)?;
    out.into_inner()?.sync_all()?;
    let blob_bytes: u64 = written.unique_layers().iter().map(|d| d.size).sum::<u64>()
        + images.iter().map(|i| i.config.len() as u64).sum::<u64>();
    std::fs::write(&sizes, blob_bytes.to_string())?;
    let partial = dir.join("bundle.partial");
    let mut out = BufWriter::new(File::create(&partial)?);
    write_bundle(&images_tar, &sample_hints(), &sample_chart(), &mut out)?;
    out.into_inner()?.sync_all()?;
    std::fs::remove_file(&images_tar)?;
    std::fs::rename(partial, &path)?;
    Ok((path, blob_bytes))
}

fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args.join(" ")))?;
    ensure!(
        out.status.success(),
        "{}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

const BRIDGE: &str = "lrb-br";
const COORD_NS: &str = "lrb-coord";
const COORD_IF: &str = "lrb-c";

fn node_ns(i: usize) -> String {
    format!("lrb-n{i}")
}

fn node_ip(i: usize) -> String {
    format!("10.77.0.{}", 10 + i)
}

/// The simulated network; removed on drop.
struct Net {
    nodes: usize,
}

impl Net {
    fn remove_leftovers() {
        for ns in std::iter::once(COORD_NS.to_string()).chain((0..50).map(node_ns)) {
            if Path::new("/run/netns").join(&ns).exists() {
                let _ = sh(&["ip", "netns", "del", &ns]);
            }
        }
        if Path::new("/sys/class/net").join(BRIDGE).exists() {
            let _ = sh(&["ip", "link", "del", BRIDGE]);
        }
    }

    fn create(nodes: usize, rate_mbit: u64) -> Result<Net> {
        Net::remove_leftovers();
        let net = Net { nodes };
        sh(&["ip", "link", "add", BRIDGE, "type", "bridge"])?;
        sh(&["ip", "addr", "add", "10.77.0.254/24", "dev", BRIDGE])?;
        sh(&["ip", "link", "set", BRIDGE, "up"])?;
        let join = |ns: &str, inner: &str, ip: &str| -> Result<()> {
            let outer = format!("{inner}p");
            sh(&["ip", "netns", "add", ns])?;
            sh(&[
                "ip", "link", "add", inner, "type", "veth", "peer", "name", &outer,
            ])?;
            sh(&["ip", "link", "set", inner, "netns", ns])?;
            sh(&["ip", "link", "set", &outer, "master", BRIDGE])?;
            sh(&["ip", "link", "set", &outer, "up"])?;
            sh(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                inner,
            ])?;
            sh(&["ip", "-n", ns, "link", "set", inner, "up"])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            Ok(())
        };
        join(COORD_NS, COORD_IF, "10.77.0.1")?;
        // The admin's link: only what leaves the coordinator is limited.
        sh(&[
            "tc",
            "-n",
            COORD_NS,
            "qdisc",
            "add",
            "dev",
            COORD_IF,
            "root",
            "tbf",
            "rate",
            &format!("{rate_mbit}mbit"),
            "burst",
            "256kb",
            "latency",
            "100ms",
        ])?;
        for i in 0..nodes {
            join(&node_ns(i), &format!("lrb-n{i}"), &node_ip(i))?;
        }
        Ok(net)
    }

    /// Bytes the coordinator's interface has transmitted.
    fn coordinator_tx_bytes(&self) -> Result<u64> {
        let out = Command::new("ip")
            .args(["netns", "exec", COORD_NS, "cat"])
            .arg(format!("/sys/class/net/{COORD_IF}/statistics/tx_bytes"))
            .output()?;
        ensure!(out.status.success(), "reading tx_bytes");
        Ok(String::from_utf8(out.stdout)?.trim().parse()?)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", COORD_NS]);
        for i in 0..self.nodes {
            let _ = sh(&["ip", "netns", "del", &node_ns(i)]);
        }
        let _ = sh(&["ip", "link", "del", BRIDGE]);
    }
}

/// One simulated node: containerd (outside the namespace, by socket) and its agent inside.
struct SimNode {
    agent: ChildGuard,
    containerd: Containerd,
}

async fn start_node(i: usize) -> Result<SimNode> {
    let name = format!("relay-bench-{i}");
    let mut containerd = Containerd::start(&name).await?;
    containerd.pid().context("containerd did not start")?;
    let token = containerd.dir().join("agent.token");
    std::fs::write(&token, TEST_TOKEN)?;
    let addr = format!("{}:7700", node_ip(i));
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &node_ns(i)])
        .arg(workspace_bin("lade-agent")?)
        .args(["--listen", &addr])
        .args(["--metrics-listen", &format!("{}:7701", node_ip(i))])
        .arg("--auth-token-file")
        .arg(&token)
        .args(["--peer-cidr", "10.77.0.0/24"])
        .arg("--containerd-socket")
        .arg(containerd.socket())
        .args(["--node-name", &name])
        .env("RUST_LOG", "warn");
    let mut agent = ChildGuard::spawn(cmd, &containerd.dir().join("agent.log"))?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while tokio::net::TcpStream::connect(&addr).await.is_err() {
        if !agent.is_running() || Instant::now() > deadline {
            bail!("agent of node {i} did not come up");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(SimNode { agent, containerd })
}

#[derive(Clone, Debug, Serialize)]
struct Sample {
    nodes: usize,
    relay: String,
    round: usize,
    wall_s: f64,
    /// Coordinator + every agent + every containerd.
    cpu_s: f64,
    coordinator_cpu_s: f64,
    /// Bytes of the bundle's blobs (what a fresh node lacks).
    unique_bytes: u64,
    /// What the coordinator reports having sent (sum of bytes_from_coordinator).
    coordinator_counted_bytes: u64,
    /// What its interface transmitted in the meantime.
    coordinator_tx_bytes: u64,
    /// Blob bytes all nodes stored (N x unique on fresh nodes).
    stored_bytes: u64,
}

async fn run_one(
    args: &Args,
    bundle: &Path,
    unique: u64,
    n: usize,
    mode: &str,
    round: usize,
) -> Result<Sample> {
    let net = Net::create(n, args.rate_mbit)?;
    let mut nodes = Vec::new();
    for i in 0..n {
        nodes.push(start_node(i).await?);
    }
    let pids: Vec<u32> = nodes
        .iter_mut()
        .flat_map(|s| [Some(s.agent.pid()), s.containerd.pid()])
        .flatten()
        .collect();
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    let cpu_before: f64 = pids.iter().map(|&p| cpu_seconds(p, false)).sum();
    let tx_before = net.coordinator_tx_bytes()?;
    let report = tempfile::NamedTempFile::new()?;
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        COORD_NS,
        "/usr/bin/time",
        "-f",
        "%e %U %S",
        "-o",
    ])
    .arg(report.path())
    .arg(workspace_bin("lade")?)
    .arg("load")
    .arg(bundle)
    .args(["--relay", mode, "--progress", "none", "-o", "json"])
    // The simulated nodes' bridge is this machine's own network.
    .arg("--insecure-plaintext")
    .env("LADE_AUTH_TOKEN", TEST_TOKEN)
    .env("RUST_LOG", "warn");
    for i in 0..n {
        cmd.args(["--agent", &format!("{}:7700", node_ip(i))]);
    }
    let started = Instant::now();
    let out = cmd
        .output()
        .context("running lade load (apt-get install time)")?;
    let wall = started.elapsed().as_secs_f64();
    let tx = net.coordinator_tx_bytes()? - tx_before;
    let cpu_nodes: f64 = pids.iter().map(|&p| cpu_seconds(p, false)).sum::<f64>() - cpu_before;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let reports: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("lade printed no report: {stderr}"))?;
    ensure!(
        out.status.success(),
        "lade load failed: {reports:#}\n{stderr}"
    );
    let reports = reports.as_array().context("a report per node")?;
    let sum = |key: &str| -> u64 { reports.iter().filter_map(|r| r[key].as_u64()).sum() };
    for r in reports {
        ensure!(
            r["ok"] == true && r["images_loaded"] == 4,
            "node failed: {r}"
        );
    }
    let nums = time_report(report.path(), 3)?;
    let coordinator_cpu = nums[1] + nums[2];
    drop(nodes);
    drop(net);
    Ok(Sample {
        nodes: n,
        relay: mode.to_string(),
        round,
        wall_s: wall,
        cpu_s: cpu_nodes + coordinator_cpu,
        coordinator_cpu_s: coordinator_cpu,
        unique_bytes: unique,
        coordinator_counted_bytes: sum("bytes_from_coordinator"),
        coordinator_tx_bytes: tx,
        stored_bytes: sum("bytes_sent"),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn markdown(samples: &[Sample], args: &Args, unique: u64) -> String {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let mut s = format!(
        "Bundle: {:.0} MiB of blobs (4 images, 8 incompressible layers, uncompressed). Coordinator \
         link: tbf {} Mbit/s; node-to-node: veth + bridge, unlimited. Every node: its own network \
         namespace, lade-agent and containerd, all on this machine's {} cores. {} round(s), median \
         shown. Relay `auto` = tree:2 from 2 nodes on.\n\n",
        mib(unique),
        args.rate_mbit,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        args.rounds
    );
    s.push_str("| nodes | relay | wall s | vs 1 node | CPU s (all processes) | coordinator counted MiB | counted / unique | interface tx MiB | tx / unique | stored MiB (all nodes) |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    let base: Vec<f64> = samples
        .iter()
        .filter(|x| x.nodes == 1)
        .map(|x| x.wall_s)
        .collect();
    let base = (!base.is_empty()).then(|| median(base));
    for mode in &args.modes {
        for &n in &args.nodes {
            let rows: Vec<&Sample> = samples
                .iter()
                .filter(|x| x.nodes == n && &x.relay == mode)
                .collect();
            if rows.is_empty() {
                continue;
            }
            let wall = median(rows.iter().map(|x| x.wall_s).collect());
            let cpu = median(rows.iter().map(|x| x.cpu_s).collect());
            let counted = rows
                .iter()
                .map(|x| x.coordinator_counted_bytes)
                .max()
                .unwrap_or(0);
            let tx = rows
                .iter()
                .map(|x| x.coordinator_tx_bytes)
                .max()
                .unwrap_or(0);
            let stored = rows.iter().map(|x| x.stored_bytes).max().unwrap_or(0);
            let vs = base
                .map(|b| format!("{:.2}x", wall / b))
                .unwrap_or_else(|| "-".into());
            s.push_str(&format!(
                "| {n} | {mode} | {wall:.2} | {vs} | {cpu:.1} | {:.1} | {:.3} | {:.1} | **{:.3}** | {:.0} |\n",
                mib(counted),
                counted as f64 / unique as f64,
                mib(tx),
                tx as f64 / unique as f64,
                mib(stored)
            ));
        }
    }
    // The relay targets, for the relay modes measured.
    let wall_of = |mode: &str, n: usize| {
        let v: Vec<f64> = samples
            .iter()
            .filter(|x| x.nodes == n && (x.relay == mode || n == 1))
            .map(|x| x.wall_s)
            .collect();
        (!v.is_empty()).then(|| median(v))
    };
    s.push('\n');
    for mode in args.modes.iter().filter(|m| *m != "off") {
        let worst = samples
            .iter()
            .filter(|x| &x.relay == mode || x.nodes == 1)
            .map(|x| {
                (x.coordinator_tx_bytes.max(x.coordinator_counted_bytes)) as f64
                    / x.unique_bytes as f64
            })
            .fold(0.0, f64::max);
        s.push_str(&format!(
            "- relay {mode}: coordinator egress at most {worst:.3}x the unique blob bytes (target 1.05x: {})",
            if worst <= 1.05 { "met" } else { "NOT met" }
        ));
        if let (Some(one), Some(four)) = (wall_of(mode, 1), wall_of(mode, 4)) {
            let r = four / one;
            s.push_str(&format!(
                "; time(N=4) / time(N=1) = {r:.2} (target 1.3: {})",
                if r <= 1.3 { "met" } else { "NOT met" }
            ));
        }
        s.push('\n');
    }
    s
}

/// Bytes the coordinator sends a fresh node: one plain load on a node outside the
/// simulated network.
async fn fresh_node_bytes(bundle: &Path) -> Result<u64> {
    let node = lade_testkit::nodes::Node::start("relay-bench-size").await?;
    let addr = node.addr();
    let mut args = vec!["load", bundle.to_str().context("utf-8 path")?];
    args.extend(load_flags(&addr));
    let out = lade_testkit::nodes::run_lade(&args)?;
    ensure!(out.status.success(), "sizing load failed");
    let reports: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    reports[0]["bytes_sent"]
        .as_u64()
        .context("bytes_sent in the report")
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "needs root: it creates network namespaces"
    );
    let (bundle_path, blob_bytes) = bundle(&args)?;
    // What a fresh node lacks, as the coordinator counts it (its own manifests included),
    // checked against the layers and configs written.
    let unique = fresh_node_bytes(&bundle_path).await?;
    ensure!(
        unique >= blob_bytes && unique < blob_bytes + (64 << 10),
        "the coordinator counts {unique} bytes in the bundle, {blob_bytes} were written"
    );
    let mut samples = Vec::new();
    for round in 0..args.rounds {
        for &n in &args.nodes {
            for mode in &args.modes {
                // With one node every mode is the same load.
                if n == 1 && mode != &args.modes[0] {
                    continue;
                }
                let sample = run_one(&args, &bundle_path, unique, n, mode, round).await?;
                eprintln!(
                    "round {round} nodes {n} relay {mode:5} {:6.2} s wall {:6.1} s cpu, coordinator tx {:.3}x unique",
                    sample.wall_s,
                    sample.cpu_s,
                    sample.coordinator_tx_bytes as f64 / unique as f64
                );
                samples.push(sample);
            }
        }
    }
    std::fs::create_dir_all(&args.out)?;
    let table = markdown(&samples, &args, unique);
    std::fs::write(
        args.out.join("relay.json"),
        serde_json::to_string_pretty(&samples)?,
    )?;
    std::fs::write(args.out.join("relay.md"), &table)?;
    writeln!(std::io::stdout(), "{table}")?;
    eprintln!("wrote {}", args.out.join("relay.{json,md}").display());
    Ok(())
}
