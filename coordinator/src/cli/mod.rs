//! The command line: [`Cli`] and its [`Command`]s, each subcommand's arguments and its `run`
//! (`load.rs`, `upgrade.rs`, `push.rs`, `status.rs`, `inspect.rs`, and `release.rs` for
//! `prune` and `unload`), and the agent, connection and discovery flags they share
//! (`connect.rs`).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use lade::progress::{Bars, Lines, Progress};

mod connect;
mod inspect;
mod load;
mod push;
mod release;
mod status;
mod upgrade;

use inspect::InspectArgs;
use load::LoadArgs;
use push::PushArgs;
use release::{PruneArgs, UnloadArgs};
use status::StatusArgs;
use upgrade::UpgradeArgs;

/// Load an offline bundle's images onto every node of a cluster, then upgrade its helm release.
#[derive(Debug, Parser)]
#[command(name = "lade", version)]
pub(crate) struct Cli {
    /// Log format for diagnostics on stderr (level from RUST_LOG, default warn).
    #[arg(
        long,
        global = true,
        env = "LADE_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub(crate) log_format: LogFormat,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum LogFormat {
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
pub(crate) enum Command {
    /// Load every image of BUNDLE onto every agent's node, sending only what each lacks.
    Load(LoadArgs),
    /// Upgrade or install BUNDLE's helm release, once every node is proved to hold its images.
    Upgrade(UpgradeArgs),
    /// Push every image of BUNDLE, and its chart, into the registry the cluster pulls from.
    Push(PushArgs),
    /// Whether every image of BUNDLE is on every agent's node, whole; exit 0 only then.
    ///
    /// Without BUNDLE: every bundle version each node holds a record of, and whether it is
    /// whole there; exit 0 only when every node answered and every one is.
    Status(StatusArgs),
    /// Release all but the --keep most recently loaded versions of bundle NAME on every node.
    ///
    /// Their image names go, except names another held version has or containers use, and
    /// their content is left to garbage collection. Exit 0 when all went, 3 when only names
    /// in use were kept, 1 when a node failed or could not be asked.
    Prune(PruneArgs),
    /// Release one bundle version (a bundle file, or NAME@VERSION) on every node, as prune does.
    Unload(UnloadArgs),
    /// Show what BUNDLE holds: images, sizes, shared layers, hints.
    Inspect(InspectArgs),
}

/// Sets up diagnostics on stderr, in `format`, at the level RUST_LOG gives (default warn).
pub(crate) fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
}

/// An error and its causes on one line, leaving out a cause whose text is already said (an
/// io error a message quotes would otherwise appear twice).
pub(crate) fn explain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

/// Runs one subcommand; an error it returns is the caller's to print (exit code 2).
pub(crate) fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Inspect(args) => inspect::run(args),
        Command::Load(args) => runtime()?.block_on(load::run(args)),
        Command::Upgrade(args) => upgrade::run(args),
        Command::Push(args) => runtime()?.block_on(push::run(args)),
        Command::Status(args) => runtime()?.block_on(status::run(args)),
        Command::Prune(args) => runtime()?.block_on(release::prune(args)),
        Command::Unload(args) => runtime()?.block_on(release::unload(args)),
    }
}

/// The async runtime a subcommand that talks to agents, helm or a registry runs on.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("starting the async runtime")
}

/// Where live progress goes: bars on a terminal, lines otherwise, unless told.
fn progress(mode: ProgressMode) -> Arc<dyn Progress> {
    match mode {
        ProgressMode::Auto if std::io::stderr().is_terminal() => Arc::new(Bars::new()),
        ProgressMode::Bars => Arc::new(Bars::new()),
        ProgressMode::Auto | ProgressMode::Lines => Arc::new(Lines::default()),
        ProgressMode::None => Arc::new(Silent),
    }
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
