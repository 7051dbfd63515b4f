//! `lade status`: its arguments and a run.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use lade::bundle::Bundle;
use lade::load::plan_names;
use lade::reference::{check_rules, RetagRule};

use super::connect::{ConnectArgs, DiscoverArgs, KubeArgs};
use super::Output;

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// Bundle tar whose images are looked for.
    bundle: PathBuf,
    /// Agent address host:port of every node to ask.
    #[arg(long = "agent", env = "LADE_AGENTS", value_delimiter = ',')]
    agents: Vec<String>,
    /// The --retag rules the bundle was loaded with: the names looked for.
    #[arg(long = "retag", env = "LADE_RETAG", value_delimiter = ',')]
    retag: Vec<RetagRule>,
    /// The bundle was loaded with --no-keep-original: only the retagged names are looked for.
    #[arg(long)]
    no_keep_original: bool,
    /// Agents asked at the same time.
    #[arg(long, env = "LADE_PARALLEL", default_value_t = 8)]
    parallel: usize,
    /// Table (text) or JSON on stdout.
    #[arg(short, long, value_enum, default_value = "text")]
    output: Output,
    #[command(flatten)]
    connect: ConnectArgs,
    #[command(flatten)]
    discover: DiscoverArgs,
    #[command(flatten)]
    kube: KubeArgs,
}

/// Asks every node about every image of the bundle; exit 0 only when each holds each whole.
pub(super) async fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    check_rules(&args.retag)?;
    let path = args.bundle.clone();
    let bundle = tokio::task::spawn_blocking(move || Bundle::open(&path)).await??;
    let plan = plan_names(&bundle, &args.retag, !args.no_keep_original, false)?;
    let dial = args.connect.dial()?;
    let discovery = args.discover.run(&args.kube).await?;
    let discovered = discovery.is_some();
    let agents = match discovery {
        Some(d) => d.addresses(),
        None => args.agents,
    };
    anyhow::ensure!(
        !agents.is_empty(),
        "no agent to ask: pass --agent or --discover"
    );
    let status = lade::status::status(&plan, &agents, &dial, args.parallel, discovered).await;
    match args.output {
        Output::Text => print!("{}", status.to_text()),
        Output::Json => println!("{}", status.to_json()?),
    }
    Ok(if status.complete() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
