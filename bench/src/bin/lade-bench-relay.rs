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
//!
//! Scenario `straggler` puts one node (`--straggler-node`, default the second: in a tree
//! the first node's child and the fourth's parent) behind a link of `--straggler-mbit`
//! (default a tenth of the coordinator's), both ways, and reports when the fast nodes and
//! when the straggler finished (each node's own `seconds`), next to the straggler's own
//! link time for what it stored. Scenarios, node counts and modes interleave in each round.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use lade_bench::{cpu_seconds, load_flags, parse_flags, peak_rss_mib, time_report};
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
    scenarios: Vec<String>,
    straggler_mbit: Option<u64>,
    straggler_node: usize,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        size_mib: 256,
        rate_mbit: 200,
        nodes: vec![1, 2, 4, 8],
        modes: vec!["auto".into(), "off".into()],
        rounds: 1,
        out: PathBuf::from("bench/results"),
        scenarios: vec!["plain".into()],
        straggler_mbit: None,
        straggler_node: 1,
    };
    let usage = "usage: lade-bench-relay [--size-mib 256] [--rate-mbit 200] [--nodes 1,2,4,8] \
                 [--modes auto,off] [--rounds 1] [--out bench/results] \
                 [--scenarios plain,straggler] [--straggler-mbit RATE/10] [--straggler-node 1]";
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
            "--scenarios" => args.scenarios = value()?.split(',').map(str::to_string).collect(),
            "--straggler-mbit" => args.straggler_mbit = Some(value()?.parse()?),
            "--straggler-node" => args.straggler_node = value()?.parse()?,
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    ensure!(
        args.nodes.iter().all(|&n| (1..=50).contains(&n)),
        "--nodes: 1 to 50"
    );
    ensure!(
        args.scenarios
            .iter()
            .all(|s| s == "plain" || s == "straggler"),
        "--scenarios: plain and/or straggler"
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

    fn create(nodes: usize, rate_mbit: u64, straggler: Option<(usize, u64)>) -> Result<Net> {
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
        if let Some((i, mbit)) = straggler.filter(|(i, _)| *i < nodes) {
            // Both ways: what the node receives leaves the bridge's end of its veth, what it
            // sends (to peers it serves) leaves its own end.
            let rate = format!("{mbit}mbit");
            let tbf = [
                "root", "tbf", "rate", &rate, "burst", "64kb", "latency", "100ms",
            ];
            let outer = format!("lrb-n{i}p");
            let mut cmd = vec!["tc", "qdisc", "add", "dev", &outer];
            cmd.extend(tbf);
            sh(&cmd)?;
            let (ns, inner) = (node_ns(i), format!("lrb-n{i}"));
            let mut cmd = vec!["tc", "-n", &ns, "qdisc", "add", "dev", &inner];
            cmd.extend(tbf);
            sh(&cmd)?;
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
    scenario: String,
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
    /// When the last node but the straggler finished (its own `seconds`).
    fast_finish_s: f64,
    /// When the straggler finished, and how long its link takes for what it stored.
    straggler_finish_s: Option<f64>,
    straggler_link_s: Option<f64>,
    /// CPU of the agents alone, summed, and the largest agent's peak RSS.
    agent_cpu_s: f64,
    agent_peak_rss_mib: f64,
    /// Each agent's peak RSS, in node order (which role holds the memory).
    agent_peak_rss_each_mib: Vec<f64>,
    /// CPU of the containerds alone, summed.
    containerd_cpu_s: f64,
}

struct Run<'a> {
    bundle: &'a Path,
    unique: u64,
    n: usize,
    mode: &'a str,
    scenario: &'a str,
    round: usize,
}

impl Args {
    fn straggler_rate(&self) -> u64 {
        self.straggler_mbit.unwrap_or((self.rate_mbit / 10).max(1))
    }
}

async fn run_one(args: &Args, run: Run<'_>) -> Result<Sample> {
    let Run {
        bundle,
        unique,
        n,
        mode,
        scenario,
        round,
    } = run;
    let straggler = (scenario == "straggler" && args.straggler_node < n)
        .then_some((args.straggler_node, args.straggler_rate()));
    let net = Net::create(n, args.rate_mbit, straggler)?;
    let mut nodes = Vec::new();
    for i in 0..n {
        nodes.push(start_node(i).await?);
    }
    let agent_pids: Vec<u32> = nodes.iter_mut().map(|s| s.agent.pid()).collect();
    let agent_cpu_before: f64 = agent_pids.iter().map(|&p| cpu_seconds(p, false)).sum();
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
    // LADE_BENCH_LOG: lade's RUST_LOG, e.g. `warn,lade::load::relay=info` to see the relay's
    // choices.
    .env(
        "RUST_LOG",
        std::env::var("LADE_BENCH_LOG").unwrap_or_else(|_| "warn".into()),
    );
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
    // What the relay decided on the way (a node taken for slow or stopped, a blob sent
    // again) is logged at warn: kept in the bench's output to explain a row.
    if !stderr.trim().is_empty() {
        eprintln!("lade's warnings ({mode}, {n} nodes):\n{}", stderr.trim());
    }
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
    let agent_cpu = agent_pids
        .iter()
        .map(|&p| cpu_seconds(p, false))
        .sum::<f64>()
        - agent_cpu_before;
    let agent_rss_each: Vec<f64> = agent_pids.iter().map(|&p| peak_rss_mib(p)).collect();
    let agent_rss = agent_rss_each.iter().copied().fold(0.0, f64::max);
    let seconds = |r: &serde_json::Value| r["seconds"].as_f64().unwrap_or(0.0);
    let slow = straggler.map(|(i, _)| i);
    let fast_finish = reports
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != slow)
        .map(|(_, r)| seconds(r))
        .fold(0.0, f64::max);
    let straggler_finish = slow.map(|i| seconds(&reports[i]));
    let straggler_link = straggler.map(|(i, mbit)| {
        let stored = reports[i]["bytes_sent"].as_u64().unwrap_or(0);
        stored as f64 * 8.0 / (mbit as f64 * 1e6)
    });
    drop(nodes);
    drop(net);
    Ok(Sample {
        scenario: scenario.to_string(),
        fast_finish_s: fast_finish,
        straggler_finish_s: straggler_finish,
        straggler_link_s: straggler_link,
        agent_cpu_s: agent_cpu,
        agent_peak_rss_mib: agent_rss,
        agent_peak_rss_each_mib: agent_rss_each,
        containerd_cpu_s: cpu_nodes - agent_cpu,
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
         link: tbf {} Mbit/s; node-to-node: veth + bridge, unlimited, except the straggler's \
         link (scenario `straggler`, node {}): tbf {} Mbit/s both ways. Every node: its own \
         network namespace, lade-agent and containerd, all on this machine's {} cores. {} \
         round(s), interleaved; median shown. Relay `auto` = tree:2 from 2 nodes on. Finish \
         times are each node's own `seconds` from the JSON summary.\n\n",
        mib(unique),
        args.rate_mbit,
        args.straggler_node,
        args.straggler_rate(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        args.rounds
    );
    s.push_str("| scenario | nodes | relay | wall s | vs 1 node | fast nodes finish s | straggler finish s | straggler link time s | coordinator tx / unique | counted / unique | CPU s (all) | agent CPU s (sum) | containerd CPU s (sum) | agent peak RSS MiB (max) |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    let rows_of = |scenario: &str, mode: &str, n: usize| -> Vec<&Sample> {
        samples
            .iter()
            .filter(|x| x.nodes == n && x.scenario == scenario && (x.relay == mode || n == 1))
            .collect()
    };
    let med =
        |rows: &[&Sample], f: &dyn Fn(&Sample) -> f64| median(rows.iter().map(|x| f(x)).collect());
    let base: Vec<&Sample> = samples.iter().filter(|x| x.nodes == 1).collect();
    let base_wall = (!base.is_empty()).then(|| med(&base, &|x| x.wall_s));
    let base_rss = (!base.is_empty()).then(|| med(&base, &|x| x.agent_peak_rss_mib));
    for scenario in &args.scenarios {
        for mode in &args.modes {
            for &n in &args.nodes {
                let rows = rows_of(scenario, mode, n);
                if rows.is_empty() || (n == 1 && mode != &args.modes[0]) {
                    continue;
                }
                let wall = med(&rows, &|x| x.wall_s);
                let opt = |v: Vec<Option<f64>>| {
                    let v: Vec<f64> = v.into_iter().flatten().collect();
                    if v.is_empty() {
                        "-".to_string()
                    } else {
                        format!("{:.2}", median(v))
                    }
                };
                let tx = rows
                    .iter()
                    .map(|x| x.coordinator_tx_bytes)
                    .max()
                    .unwrap_or(0);
                let counted = rows
                    .iter()
                    .map(|x| x.coordinator_counted_bytes)
                    .max()
                    .unwrap_or(0);
                s.push_str(&format!(
                    "| {scenario} | {n} | {} | {wall:.2} | {} | {:.2} | {} | {} | **{:.3}** | {:.3} | {:.1} | {:.1} | {:.1} | {:.0} |\n",
                    if n == 1 { "-" } else { mode.as_str() },
                    base_wall.map(|b| format!("{:.2}x", wall / b)).unwrap_or_else(|| "-".into()),
                    med(&rows, &|x| x.fast_finish_s),
                    opt(rows.iter().map(|x| x.straggler_finish_s).collect()),
                    opt(rows.iter().map(|x| x.straggler_link_s).collect()),
                    tx as f64 / unique as f64,
                    counted as f64 / unique as f64,
                    med(&rows, &|x| x.cpu_s),
                    med(&rows, &|x| x.agent_cpu_s),
                    med(&rows, &|x| x.containerd_cpu_s),
                    med(&rows, &|x| x.agent_peak_rss_mib),
                ));
            }
        }
    }
    s.push('\n');
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    for mode in args.modes.iter().filter(|m| *m != "off") {
        let worst = samples
            .iter()
            .filter(|x| &x.relay == mode && x.scenario == "plain")
            .map(|x| {
                x.coordinator_tx_bytes.max(x.coordinator_counted_bytes) as f64
                    / x.unique_bytes as f64
            })
            .fold(0.0, f64::max);
        s.push_str(&format!(
            "- relay {mode}: coordinator egress at most {worst:.3}x the unique blob bytes (target 1.02x: {})",
            verdict(worst <= 1.02)
        ));
        if let (Some(one), Some(&top)) = (base_wall, args.nodes.iter().filter(|&&n| n > 1).max()) {
            let rows = rows_of("plain", mode, top);
            if !rows.is_empty() {
                let r = med(&rows, &|x| x.wall_s) / one;
                s.push_str(&format!(
                    "; wall(N={top}) / wall(N=1) = {r:.2} (target 2: {})",
                    verdict(r <= 2.0)
                ));
                // What the runtimes alone cost, spread over every core of this machine: a
                // floor on the wall time no fan-out can go below here.
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                let runtimes = med(&rows, &|x| x.containerd_cpu_s);
                let floor = runtimes / cores as f64;
                s.push_str(&format!(
                    "; the {top} containerds alone used {runtimes:.1} CPU-s, at least {floor:.1} s on this machine's {cores} cores ({:.2}x wall(N=1))",
                    floor / one
                ));
                if let Some(rss) = base_rss {
                    let big = med(&rows, &|x| x.agent_peak_rss_mib);
                    s.push_str(&format!(
                        "; agent peak RSS {big:.0} MiB at N={top} vs {rss:.0} MiB at N=1"
                    ));
                }
            }
        }
        s.push('\n');
        for &n in args.nodes.iter().filter(|&&n| n > args.straggler_node) {
            let (plain, slow) = (rows_of("plain", mode, n), rows_of("straggler", mode, n));
            if plain.is_empty() || slow.is_empty() {
                continue;
            }
            let fast_plain = med(&plain, &|x| x.fast_finish_s);
            let fast_slow = med(&slow, &|x| x.fast_finish_s);
            let finish = med(&slow, &|x| x.straggler_finish_s.unwrap_or(0.0));
            let link = med(&slow, &|x| x.straggler_link_s.unwrap_or(0.0));
            s.push_str(&format!(
                "- relay {mode}, N={n}, one node at {} Mbit/s: the fast nodes finish in {fast_slow:.2} s vs {fast_plain:.2} s with no slow node (target 1.5x + 1 s = {:.2} s: {}); the straggler in {finish:.2} s vs its link time {link:.2} s ({:.2}x, target 1.2x: {})\n",
                args.straggler_rate(),
                1.5 * fast_plain + 1.0,
                verdict(fast_slow <= 1.5 * fast_plain + 1.0),
                finish / link.max(1e-9),
                verdict(finish <= 1.2 * link)
            ));
        }
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
                for scenario in &args.scenarios {
                    // With one node every mode is the same load, and no node is the
                    // straggler's peer.
                    if n == 1 && (mode != &args.modes[0] || scenario != "plain") {
                        continue;
                    }
                    if scenario == "straggler" && args.straggler_node >= n {
                        continue;
                    }
                    let run = Run {
                        bundle: &bundle_path,
                        unique,
                        n,
                        mode,
                        scenario,
                        round,
                    };
                    let sample = run_one(&args, run).await?;
                    eprintln!(
                        "round {round} {scenario:9} nodes {n:2} relay {mode:5} {:6.2} s wall (fast nodes {:.2} s{}) {:6.1} s cpu, coordinator tx {:.3}x unique, agent peak RSS {:.0} MiB (each: {}), containerd CPU {:.1} s",
                        sample.wall_s,
                        sample.fast_finish_s,
                        match (sample.straggler_finish_s, sample.straggler_link_s) {
                            (Some(f), Some(l)) => format!(", straggler {f:.2} s, its link {l:.2} s"),
                            _ => String::new(),
                        },
                        sample.cpu_s,
                        sample.coordinator_tx_bytes as f64 / unique as f64,
                        sample.agent_peak_rss_mib,
                        sample
                            .agent_peak_rss_each_mib
                            .iter()
                            .map(|m| format!("{m:.0}"))
                            .collect::<Vec<_>>()
                            .join(" "),
                        sample.containerd_cpu_s,
                    );
                    samples.push(sample);
                }
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
