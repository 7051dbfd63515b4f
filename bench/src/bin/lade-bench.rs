//! `lade-bench`: `lade load` side by side with the tool an admin uses instead
//! (`ctr -n k8s.io images import`), interleaved in one run on fresh private containerd
//! instances, reported as ratios. Run it through `scripts/bench`.
//!
//! Scenarios:
//! - `fresh`: an empty node receives the whole bundle;
//! - `upgrade`: a node holding version 1 receives version 2 (a share of layers changed);
//! - `again`: a node holding the bundle receives the same bundle again.
//!
//! For each measurement: wall time until the command returns (every image unpacked and
//! named), CPU time of the client, the node's containerd and the agent, peak RSS of the
//! client and of the agent, and for lade the bytes sent. Bundles are generated
//! deterministically from a seed and cached under `target/bench-cache`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use lade_bench::{cpu_seconds, load_flags, parse_flags, time_report};
use lade_testkit::fixtures::{
    random_layer, random_tree_layer, sample_chart, sample_hints, write_bundle, ArchiveFormat,
    Compression, ImageFixture,
};
use lade_testkit::nodes::{workspace_bin, Node, TEST_TOKEN};
use serde::Serialize;

struct Args {
    size_mib: usize,
    images: usize,
    rounds: usize,
    changed_pct: usize,
    out: PathBuf,
    scenarios: Vec<String>,
    /// Layers of many small files (`--files small`) instead of 1 MiB ones.
    small_files: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        size_mib: 512,
        images: 8,
        rounds: 3,
        changed_pct: 10,
        out: PathBuf::from("bench/results"),
        scenarios: vec!["fresh".into(), "upgrade".into(), "again".into()],
        small_files: false,
    };
    let usage = "usage: lade-bench [--size-mib 512] [--images 8] [--rounds 3] [--changed-pct 10] \
                 [--scenarios fresh,upgrade,again] [--files large|small] [--out bench/results]";
    parse_flags(usage, |flag, value| {
        match flag {
            "--size-mib" => args.size_mib = value()?.parse()?,
            "--images" => args.images = value()?.parse()?,
            "--rounds" => args.rounds = value()?.parse()?,
            "--changed-pct" => args.changed_pct = value()?.parse()?,
            "--out" => args.out = PathBuf::from(value()?),
            "--scenarios" => args.scenarios = value()?.split(',').map(str::to_string).collect(),
            "--files" => {
                args.small_files = match value()?.as_str() {
                    "large" => false,
                    "small" => true,
                    other => bail!("--files is large or small, not {other}"),
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    })?;
    ensure!(args.images >= 2, "--images must be at least 2");
    Ok(args)
}

/// Layer sizes of the generated bundle: two base layers every image shares (30% of the
/// bytes), then two layers of each image's own.
fn layer_plan(args: &Args) -> (Vec<usize>, Vec<[usize; 2]>) {
    let total = args.size_mib << 20;
    let base = vec![total / 5, total / 10];
    let own = total * 7 / 10 / args.images / 2;
    (base, vec![[own, own]; args.images])
}

/// Text/random mix that makes gzip shrink the layers about 2.2x, as real bundles do.
const COMPRESSIBLE: f64 = 0.73;

/// Images of version `version`: version 2 changes the own layers of the first images so
/// that about `changed_pct`% of all layers differ.
fn generate(args: &Args, version: u64) -> Vec<ImageFixture> {
    let (base, own) = layer_plan(args);
    let layer_count = base.len() + own.len() * 2;
    let changed = (layer_count * args.changed_pct).div_ceil(100);
    let layer = |seed, size| {
        if args.small_files {
            random_tree_layer(seed, size, COMPRESSIBLE)
        } else {
            random_layer(seed, size, COMPRESSIBLE)
        }
    };
    let base_layers: Vec<Vec<u8>> = base
        .iter()
        .enumerate()
        .map(|(i, &size)| layer(1000 + i as u64, size))
        .collect();
    let mut changed_left = if version == 1 { 0 } else { changed };
    own.iter()
        .enumerate()
        .map(|(i, sizes)| {
            let mut layers = base_layers.clone();
            for (j, &size) in sizes.iter().enumerate() {
                let mut seed = 2000 + (i * 2 + j) as u64;
                if changed_left > 0 {
                    changed_left -= 1;
                    seed += 1_000_000;
                }
                layers.push(layer(seed, size));
            }
            ImageFixture::new(
                &format!("release.daocloud.io/bench/image-{i}:v{version}"),
                layers,
                &["/bin/sh"],
            )
        })
        .collect()
}

/// Writes (once per parameter set) `images.tar` and a bundle around it for `version`.
fn bundle(args: &Args, version: u64) -> Result<(PathBuf, PathBuf)> {
    let dir = PathBuf::from("target/bench-cache").join(format!(
        "s{}-i{}-c{}{}-v{version}",
        args.size_mib,
        args.images,
        args.changed_pct,
        if args.small_files { "-small" } else { "" }
    ));
    let images_tar = dir.join("images.tar");
    let bundle = dir.join("bench.bundle.tar");
    if bundle.is_file() {
        return Ok((images_tar, bundle));
    }
    std::fs::create_dir_all(&dir)?;
    eprintln!(
        "generating version {version} ({} MiB, {} images)...",
        args.size_mib, args.images
    );
    let images = generate(args, version);
    let mut out = BufWriter::new(File::create(&images_tar)?);
    ArchiveFormat::Gcr.write(&images, Compression::Gzip, &mut out)?;
    out.into_inner()?.sync_all()?;
    drop(images);
    let partial = dir.join("bundle.partial");
    let mut out = BufWriter::new(File::create(&partial)?);
    write_bundle(&images_tar, &sample_hints(), &sample_chart(), &mut out)?;
    out.into_inner()?.sync_all()?;
    std::fs::rename(partial, &bundle)?;
    Ok((images_tar, bundle))
}

/// Peak resident set of a live process, in MiB (0 if it cannot be read).
fn peak_rss_mib(pid: u32) -> f64 {
    lade_testkit::harness::peak_rss(pid).map_or(0.0, |bytes| bytes as f64 / (1 << 20) as f64)
}

/// Runs `cmd` to completion under GNU time; returns (wall seconds, its own CPU seconds, its
/// peak RSS MiB, stdout). GNU time, not our own wait4: a child spawned straight from this
/// large process would report this process's memory high-water mark as its own.
fn measure(cmd: Command) -> Result<(f64, f64, f64, Vec<u8>)> {
    let report = tempfile::NamedTempFile::new()?;
    let out_file = tempfile::NamedTempFile::new()?;
    let mut timed = Command::new("/usr/bin/time");
    timed
        .args(["-f", "%e %U %S %M", "-o"])
        .arg(report.path())
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .envs(cmd.get_envs().filter_map(|(k, v)| Some((k, v?))))
        .stdout(out_file.reopen()?)
        .stderr(std::process::Stdio::inherit());
    let status = timed
        .status()
        .with_context(|| format!("running {cmd:?} under /usr/bin/time (apt-get install time)"))?;
    ensure!(
        status.success(),
        "{cmd:?} failed: {status}; it printed: {}",
        String::from_utf8_lossy(&std::fs::read(out_file.path())?)
    );
    let nums = time_report(report.path(), 4)?;
    Ok((
        nums[0],
        nums[1] + nums[2],
        nums[3] / 1024.0,
        std::fs::read(out_file.path())?,
    ))
}

#[derive(Clone, Debug, Serialize)]
struct Sample {
    scenario: String,
    tool: String,
    round: usize,
    wall_s: f64,
    /// Client + containerd + agent CPU seconds.
    cpu_s: f64,
    /// The same, apart: client, containerd (with its `unpigz`), agent.
    cpu_parts_s: [f64; 3],
    client_rss_mib: f64,
    agent_rss_mib: f64,
    bytes_sent: Option<u64>,
}

enum Tool {
    Ctr,
    /// `lade load`, the agent unpacking layers itself (its default where it can).
    Lade,
    /// `lade load` to an agent run with `--unpack containerd`: containerd's Diff service
    /// unpacks, and the coordinator checks each layer before sending it.
    LadeContainerdUnpacks,
}

const TOOLS: [&str; 3] = [
    "ctr images import",
    "lade load",
    "lade load, containerd unpacks",
];

impl Tool {
    fn name(&self) -> &'static str {
        match self {
            Tool::Ctr => TOOLS[0],
            Tool::Lade => TOOLS[1],
            Tool::LadeContainerdUnpacks => TOOLS[2],
        }
    }

    /// Loads `version` onto `node` with this tool, measured.
    fn load(&self, node: &mut Node, args: &Args, version: u64) -> Result<Sample> {
        let (images_tar, bundle_path) = bundle(args, version)?;
        let containerd_pid = node.containerd.pid().context("containerd is not running")?;
        let agent_pid = node.agent.pid().context("agent is not running")?;
        let before = [
            cpu_seconds(containerd_pid, true),
            cpu_seconds(agent_pid, true),
        ];
        let cmd = match self {
            Tool::Ctr => {
                let mut c = Command::new("ctr");
                c.arg("--address")
                    .arg(node.containerd.socket())
                    .args(["-n", "k8s.io", "images", "import"])
                    .arg(&images_tar);
                c
            }
            Tool::Lade | Tool::LadeContainerdUnpacks => {
                let mut c = Command::new(workspace_bin("lade")?);
                c.env("LADE_AUTH_TOKEN", TEST_TOKEN);
                c.arg("load")
                    .arg(&bundle_path)
                    .args(load_flags(&node.addr()));
                c
            }
        };
        let (wall, client_cpu, client_rss, stdout) = measure(cmd)?;
        let parts = [
            client_cpu,
            cpu_seconds(containerd_pid, true) - before[0],
            cpu_seconds(agent_pid, true) - before[1],
        ];
        let bytes_sent = match self {
            Tool::Ctr => None,
            Tool::Lade | Tool::LadeContainerdUnpacks => {
                let reports: serde_json::Value = serde_json::from_slice(&stdout)?;
                ensure!(reports[0]["ok"] == true, "lade load failed: {reports}");
                reports[0]["bytes_sent"].as_u64()
            }
        };
        Ok(Sample {
            scenario: String::new(),
            tool: self.name().to_string(),
            round: 0,
            wall_s: wall,
            cpu_s: parts.iter().sum(),
            cpu_parts_s: parts,
            client_rss_mib: client_rss,
            agent_rss_mib: match self {
                Tool::Ctr => 0.0,
                Tool::Lade | Tool::LadeContainerdUnpacks => peak_rss_mib(agent_pid),
            },
            bytes_sent,
        })
    }
}

/// One measurement of `tool` in `scenario` on a fresh node.
async fn run_one(scenario: &str, tool: &Tool, args: &Args, round: usize) -> Result<Sample> {
    let agent_args: &[&str] = match tool {
        Tool::LadeContainerdUnpacks => &["--unpack", "containerd"],
        Tool::Ctr | Tool::Lade => &[],
    };
    let mut node = Node::start_with(&format!("bench-{round}"), agent_args).await?;
    let target = match scenario {
        "fresh" => 1,
        "upgrade" => {
            tool.load(&mut node, args, 1)?;
            2
        }
        "again" => {
            tool.load(&mut node, args, 1)?;
            1
        }
        other => bail!("unknown scenario {other}"),
    };
    // Flush what the preparation wrote, so the measured run starts from the same state.
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    let mut sample = tool.load(&mut node, args, target)?;
    sample.scenario = scenario.to_string();
    sample.round = round;
    Ok(sample)
}

fn stats(values: &mut [f64]) -> (f64, f64, f64) {
    values.sort_by(|a, b| a.total_cmp(b));
    (
        values[0],
        values[values.len() / 2],
        values[values.len() - 1],
    )
}

fn markdown(samples: &[Sample], args: &Args, bundle_bytes: u64) -> String {
    let mut s = format!(
        "Bundle: {} images, {} MiB uncompressed in {}, {:.0} MiB gzip in the bundle; upgrade changes {}% of layers. \
         {} rounds, tools interleaved. Machine: {} cores, {}.\n\n",
        args.images,
        args.size_mib,
        if args.small_files {
            "files of 256 B to 256 KiB (log-uniform)"
        } else {
            "1 MiB files"
        },
        bundle_bytes as f64 / (1 << 20) as f64,
        args.changed_pct,
        args.rounds,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        containerd_version(),
    );
    s.push_str("| scenario | tool | wall s (min / median / max) | CPU s (median: client + containerd + agent) | client peak RSS MiB | agent peak RSS MiB | bytes sent | lade / ctr (median wall) |\n");
    s.push_str("|---|---|---|---|---|---|---|---|\n");
    for scenario in &args.scenarios {
        let pick = |tool: &str| -> Vec<&Sample> {
            samples
                .iter()
                .filter(|x| &x.scenario == scenario && x.tool == tool)
                .collect()
        };
        let ctr_median = stats(&mut pick(TOOLS[0]).iter().map(|x| x.wall_s).collect::<Vec<_>>()).1;
        for (i, tool) in TOOLS.iter().enumerate() {
            let rows = pick(tool);
            if rows.is_empty() {
                continue;
            }
            let (min, med, max) = stats(&mut rows.iter().map(|x| x.wall_s).collect::<Vec<_>>());
            let (_, cpu, _) = stats(&mut rows.iter().map(|x| x.cpu_s).collect::<Vec<_>>());
            let part =
                |k: usize| stats(&mut rows.iter().map(|x| x.cpu_parts_s[k]).collect::<Vec<_>>()).1;
            let (client_cpu, containerd_cpu, agent_cpu) = (part(0), part(1), part(2));
            let (_, _, crss) =
                stats(&mut rows.iter().map(|x| x.client_rss_mib).collect::<Vec<_>>());
            let (_, _, arss) = stats(&mut rows.iter().map(|x| x.agent_rss_mib).collect::<Vec<_>>());
            let sent = rows
                .iter()
                .filter_map(|x| x.bytes_sent)
                .max()
                .map(|b| format!("{:.1} MiB", b as f64 / (1 << 20) as f64))
                .unwrap_or_else(|| "-".into());
            let ratio = if i > 0 {
                format!("**{:.2}x**", med / ctr_median)
            } else {
                String::new()
            };
            s.push_str(&format!(
                "| {scenario} | {tool} | {min:.2} / {med:.2} / {max:.2} | {cpu:.2} ({client_cpu:.2} + {containerd_cpu:.2} + {agent_cpu:.2}) | {crss:.0} | {} | {sent} | {ratio} |\n",
                if i > 0 { format!("{arss:.0}") } else { "-".into() }
            ));
        }
    }
    s
}

fn containerd_version() -> String {
    Command::new("containerd")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|v| {
            v.split_whitespace()
                .nth(2)
                .map(|v| format!("containerd {v}"))
        })
        .unwrap_or_else(|| "containerd ?".into())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let (_, bundle_path) = bundle(&args, 1)?;
    if args.scenarios.iter().any(|s| s == "upgrade") {
        bundle(&args, 2)?;
    }
    let bundle_bytes = std::fs::metadata(&bundle_path)?.len();
    let mut samples = Vec::new();
    for round in 0..args.rounds {
        for scenario in &args.scenarios {
            // Rotate which tool goes first, so none always runs on a warmer machine.
            let mut order = vec![Tool::Ctr, Tool::Lade, Tool::LadeContainerdUnpacks];
            order.rotate_left(round % 3);
            for tool in &order {
                let sample = run_one(scenario, tool, &args, round).await?;
                eprintln!(
                    "round {round} {scenario:8} {:18} {:6.2} s wall {:6.2} s cpu ({:.2} client + {:.2} containerd + {:.2} agent)",
                    sample.tool, sample.wall_s, sample.cpu_s, sample.cpu_parts_s[0], sample.cpu_parts_s[1], sample.cpu_parts_s[2]
                );
                samples.push(sample);
            }
        }
    }
    std::fs::create_dir_all(&args.out)?;
    let table = markdown(&samples, &args, bundle_bytes);
    let json = serde_json::to_string_pretty(&samples)?;
    std::fs::write(args.out.join("results.json"), json)?;
    std::fs::write(args.out.join("results.md"), &table)?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{table}")?;
    eprintln!("wrote {}", args.out.join("results.{json,md}").display());
    Ok(())
}
