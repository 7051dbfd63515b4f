//! `lade status`: its arguments and a run, with a bundle (its images on every node) or
//! without (every bundle version every node holds).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use lade::bundle::Bundle;
use lade::load::plan_names;
use lade::reference::{check_rules, RetagRule};

use super::connect::AskArgs;
use super::Output;

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// Bundle tar whose images are looked for; without it, every bundle version the nodes
    /// hold a record of (what `lade load` recorded) is listed.
    bundle: Option<PathBuf>,
    /// The --retag rules the bundle was loaded with: the names looked for (with BUNDLE).
    #[arg(
        long = "retag",
        env = "LADE_RETAG",
        value_delimiter = ',',
        requires = "bundle"
    )]
    retag: Vec<RetagRule>,
    /// The bundle was loaded with --no-keep-original: only the retagged names are looked for
    /// (with BUNDLE).
    #[arg(long, requires = "bundle")]
    no_keep_original: bool,
    /// Table (text) or JSON on stdout.
    #[arg(short, long, value_enum, default_value = "text")]
    output: Output,
    #[command(flatten)]
    ask: AskArgs,
}

/// With a bundle: asks every node about every image of it; exit 0 only when each holds each
/// whole. Without: lists every version every node holds; exit 0 only when every node
/// answered and every version it holds is whole there.
pub(super) async fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let Some(path) = args.bundle.clone() else {
        return held(args).await;
    };
    check_rules(&args.retag)?;
    let bundle = tokio::task::spawn_blocking(move || Bundle::open(&path)).await??;
    let plan = plan_names(&bundle, &args.retag, !args.no_keep_original, false)?;
    let asking = args.ask.resolve().await?;
    let status = lade::status::status(
        &plan,
        &asking.agents,
        &asking.dial,
        args.ask.parallel,
        asking.discovered,
    )
    .await;
    match args.output {
        Output::Text => print!("{}", status.to_text()),
        Output::Json => println!("{}", status.to_json()?),
    }
    Ok(exit(status.complete()))
}

/// `lade status` without a bundle.
async fn held(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let asking = args.ask.resolve().await?;
    let nodes = lade::lifecycle::holds(&asking.agents, &asking.dial, args.ask.parallel).await;
    let holdings = lade::lifecycle::status::holdings(&nodes);
    match args.output {
        Output::Text => print!("{}", holdings.to_text()),
        Output::Json => println!("{}", holdings.to_json()?),
    }
    Ok(exit(holdings.complete))
}

fn exit(complete: bool) -> ExitCode {
    if complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
