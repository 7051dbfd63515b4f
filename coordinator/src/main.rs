//! `lade` command line: parses arguments and wires the library's parts.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use lade::bundle::Bundle;
use lade::load::{load, plan_names, LoadOptions};
use lade::progress::{summary_table, Bars, Lines, Progress};
use lade::reference::{check_rules, RetagRule};

/// Load an offline bundle's images onto every node of a cluster.
#[derive(Debug, Parser)]
#[command(name = "lade", version)]
struct Cli {
    /// Log format for diagnostics on stderr (level from RUST_LOG, default warn).
    #[arg(
        long,
        global = true,
        env = "LADE_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ProgressMode {
    /// Bars on a terminal, plain lines otherwise.
    Auto,
    Bars,
    Lines,
    None,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load every image of BUNDLE onto every agent's node, sending only what each lacks.
    Load(LoadArgs),
    /// Show what BUNDLE holds: images, sizes, shared layers, hints.
    Inspect {
        /// Bundle tar or bare images archive.
        bundle: PathBuf,
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
}

#[derive(Debug, Args)]
struct LoadArgs {
    /// Bundle tar (hints.yaml, original-chart/, images.tar) or a bare images archive.
    bundle: PathBuf,
    /// Agent address host:port; repeat for every node.
    #[arg(
        long = "agent",
        env = "LADE_AGENTS",
        value_delimiter = ',',
        required = true
    )]
    agents: Vec<String>,
    /// Rename rule FROM=TO over repository prefixes, e.g.
    /// release.daocloud.io/mspider=10.16.10.111/mspider; repeatable, longest FROM wins.
    #[arg(long = "retag", env = "LADE_RETAG", value_delimiter = ',')]
    retag: Vec<RetagRule>,
    /// Do not also keep the names the bundle gives (retagged names only).
    #[arg(long)]
    no_keep_original: bool,
    /// Nodes loaded at the same time.
    #[arg(long, env = "LADE_PARALLEL", default_value_t = 8)]
    parallel: usize,
    /// Give up connecting to an agent after this long.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// Summary format on stdout.
    #[arg(short, long, value_enum, default_value = "text")]
    output: Output,
    /// Live progress on stderr.
    #[arg(long, value_enum, default_value = "auto")]
    progress: ProgressMode,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Inspect { bundle, output } => {
            let bundle = Bundle::open(&bundle)?;
            let report = lade::inspect::inspect(&bundle);
            match output {
                Output::Text => print!("{}", report.to_text()),
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Load(args) => {
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(run_load(args))
        }
    }
}

async fn run_load(args: LoadArgs) -> anyhow::Result<ExitCode> {
    check_rules(&args.retag)?;
    let path = args.bundle.clone();
    let bundle = tokio::task::spawn_blocking(move || Bundle::open(&path)).await??;
    let plan = plan_names(&bundle, &args.retag, !args.no_keep_original)?;
    let progress: Arc<dyn Progress> = match args.progress {
        ProgressMode::Auto if std::io::stderr().is_terminal() => Arc::new(Bars::new()),
        ProgressMode::Bars => Arc::new(Bars::new()),
        ProgressMode::Auto | ProgressMode::Lines => Arc::new(Lines::default()),
        ProgressMode::None => Arc::new(Silent),
    };
    let opts = LoadOptions {
        agents: args.agents,
        rules: args.retag,
        keep_original: !args.no_keep_original,
        parallel: args.parallel,
        connect_timeout: args.connect_timeout,
    };
    let reports = load(Arc::new(bundle), Arc::new(plan), &opts, progress).await;
    match args.output {
        Output::Text => print!("{}", summary_table(&reports)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&reports)?),
    }
    Ok(if reports.iter().all(|r| r.ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

struct Silent;

impl Progress for Silent {
    fn node_started(&self, _: &str) {}
    fn node_identified(&self, _: &str, _: &str) {}
    fn sending(&self, _: &str, _: u64, _: u64) {}
    fn sent(&self, _: &str, _: u64) {}
    fn phase(&self, _: &str, _: &str) {}
    fn node_finished(&self, _: &lade::load::NodeReport) {}
}
