//! `lade inspect`: what a bundle holds.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use lade::bundle::Bundle;

use super::Output;

// No doc comment: the `Inspect` variant's is the subcommand's help.
#[derive(Debug, Args)]
pub(crate) struct InspectArgs {
    /// Bundle tar or bare images archive.
    bundle: PathBuf,
    #[arg(short, long, value_enum, default_value = "text")]
    output: Output,
}

/// Prints what the bundle holds.
pub(super) fn run(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let InspectArgs { bundle, output } = args;
    let bundle = Bundle::open(&bundle)?;
    let report = lade::inspect::inspect(&bundle);
    match output {
        Output::Text => print!("{}", report.to_text()),
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    Ok(ExitCode::SUCCESS)
}
