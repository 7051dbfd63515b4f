//! `lade prune` and `lade unload`: their arguments and a run; both release bundle versions
//! (see [`lade::lifecycle::release`]) and report alike.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use lade::bundle::identity::valid_id;
use lade::bundle::Bundle;
use lade::lifecycle::release::{release, Choice, Verdict};

use super::connect::AskArgs;
use super::Output;

// No doc comments on these structs: the `Prune`/`Unload` variants' are the subcommands' help.
#[derive(Debug, Args)]
pub(crate) struct PruneArgs {
    /// Bundle name whose old versions go (as `lade status` lists it).
    name: String,
    /// How many of its most recently loaded versions stay.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    keep: u32,
    #[command(flatten)]
    common: ReleaseArgs,
}

#[derive(Debug, Args)]
pub(crate) struct UnloadArgs {
    /// The version to release: a bundle file (its name and version, as `lade inspect` shows
    /// them), or NAME@VERSION.
    target: String,
    #[command(flatten)]
    common: ReleaseArgs,
}

/// What `prune` and `unload` share.
#[derive(Debug, Args)]
pub(crate) struct ReleaseArgs {
    /// Only say what would be removed and freed; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Table (text) or JSON on stdout.
    #[arg(short, long, value_enum, default_value = "text")]
    output: Output,
    #[command(flatten)]
    ask: AskArgs,
}

pub(super) async fn prune(args: PruneArgs) -> anyhow::Result<ExitCode> {
    let choice = Choice::Prune {
        bundle: args.name,
        keep: args.keep as usize,
    };
    run(choice, args.common).await
}

pub(super) async fn unload(args: UnloadArgs) -> anyhow::Result<ExitCode> {
    let choice = unload_choice(&args.target).await?;
    run(choice, args.common).await
}

/// NAME@VERSION, or the identity of the bundle file `target`.
async fn unload_choice(target: &str) -> anyhow::Result<Choice> {
    let path = Path::new(target);
    if !path.exists() {
        if let Some((name, version)) = target.split_once('@') {
            anyhow::ensure!(
                valid_id(name) && valid_id(version),
                "{target}: expected NAME@VERSION (printable characters, no spaces) or a bundle file"
            );
            return Ok(Choice::Unload {
                bundle: name.to_string(),
                version: version.to_string(),
            });
        }
    }
    let owned = path.to_path_buf();
    let bundle = tokio::task::spawn_blocking(move || Bundle::open(&owned))
        .await?
        .with_context(|| format!("{target}: neither NAME@VERSION nor a readable bundle"))?;
    let id = bundle.identity.with_context(|| {
        format!(
            "{target}: the bundle has no name and version (no original-chart/Chart.yaml, and \
             its file is not named NAME_VERSION.tar); name the version as NAME@VERSION"
        )
    })?;
    Ok(Choice::Unload {
        bundle: id.name,
        version: id.version,
    })
}

/// Releases what `choice` picks and reports: exit 0 when every version went everywhere,
/// 3 when only names containers use were kept, 1 when a node failed or could not be asked
/// (or the version is held nowhere).
async fn run(choice: Choice, args: ReleaseArgs) -> anyhow::Result<ExitCode> {
    let asking = args.ask.resolve().await?;
    let released = release(
        &choice,
        &asking.agents,
        &asking.dial,
        args.ask.parallel,
        args.dry_run,
    )
    .await;
    match args.output {
        Output::Text => print!("{}", released.to_text()),
        Output::Json => println!("{}", released.to_json()?),
    }
    Ok(match released.verdict() {
        Verdict::Done => ExitCode::SUCCESS,
        Verdict::Failed => ExitCode::from(1),
        Verdict::InUse => ExitCode::from(3),
    })
}
