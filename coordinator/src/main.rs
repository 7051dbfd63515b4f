//! `lade`: parses the command line and dispatches it to [`cli`], which wires the library's
//! parts.

use std::process::ExitCode;

use clap::Parser;

mod cli;

use cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::init_logs(cli.log_format);
    match cli::run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", cli::explain(&e));
            ExitCode::from(2)
        }
    }
}
