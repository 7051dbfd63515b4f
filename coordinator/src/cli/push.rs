//! `lade push`: its arguments, the registry login both it and `upgrade` use, and a push.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use lade::bundle::Bundle;
use lade::push::registry::{Access, Tls};
use lade::push::{push, ChartRepo, PushOptions, Target, EXIT_INCOMPLETE};
use lade::reference::{check_rules, RetagRule};

use super::{progress, Output, ProgressMode};

#[derive(Debug, Args)]
pub(crate) struct PushArgs {
    /// Bundle tar (images.tar, original-chart/) or a bare images archive.
    bundle: PathBuf,
    /// Registry and project, HOST[:PORT][/PROJECT]. Each image keeps its repository path under
    /// it: release.daocloud.io/mspider/api:v1 becomes HOST/PROJECT/mspider/api:v1, which a
    /// chart finds with global.imageRegistry=HOST/PROJECT.
    #[arg(long, env = "LADE_REGISTRY")]
    registry: Target,
    /// Rename rule FROM=TO applied to the repository paths first, as `lade load --retag`;
    /// repeatable, longest FROM wins.
    #[arg(long = "retag", env = "LADE_RETAG", value_delimiter = ',')]
    retag: Vec<RetagRule>,
    /// Where the chart goes: oci://HOST[:PORT]/PATH, or none. Default: next to the images,
    /// oci://HOST/PROJECT/CHART:VERSION.
    #[arg(long)]
    chart_repo: Option<ChartRepo>,
    #[command(flatten)]
    access: PushAccessArgs,
    /// Move tags that already point at another digest (they are refused otherwise).
    #[arg(long)]
    force: bool,
    /// Log in, check every tag and blob, and report what would be pushed; write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Blobs uploaded at the same time.
    #[arg(long, env = "LADE_PARALLEL", default_value_t = 4)]
    parallel: usize,
    /// Summary format on stdout.
    #[arg(short, long, value_enum, default_value = "text")]
    output: Output,
    /// Live progress on stderr.
    #[arg(long, value_enum, default_value = "auto")]
    progress: ProgressMode,
}

/// How `lade push` reaches and logs in to the registry.
#[derive(Debug, Args)]
pub(crate) struct PushAccessArgs {
    /// User to log in as; the password is read from stdin (--password-stdin). Default: the
    /// docker config's login for the registry host ($DOCKER_CONFIG or ~/.docker/config.json).
    #[arg(long, env = "LADE_REGISTRY_USERNAME", requires = "password_stdin")]
    username: Option<String>,
    /// Read the password of --username from stdin.
    #[arg(long, requires = "username")]
    password_stdin: bool,
    /// The registry has no certificate lade can verify: unverified HTTPS, or plain HTTP when
    /// it does not speak TLS.
    #[arg(long, conflicts_with = "ca_file")]
    insecure: bool,
    /// CA certificate (PEM) the registry's certificate is checked against, besides the
    /// system's.
    #[arg(long, env = "LADE_REGISTRY_CA_FILE")]
    ca_file: Option<PathBuf>,
}

/// The login for `host` (from --username and stdin, or the docker config) and TLS settings.
pub(super) fn registry_access(
    host: &str,
    username: Option<&str>,
    insecure: bool,
    ca_file: Option<&PathBuf>,
) -> anyhow::Result<Access> {
    let login = lade::push::login::resolve(host, username, std::io::stdin())?;
    let tls = match (insecure, ca_file) {
        (true, _) => Tls::Insecure,
        (false, Some(ca)) => Tls::CaFile(ca.clone()),
        (false, None) => Tls::System,
    };
    Ok(Access { login, tls })
}

/// Pushes the bundle's images and chart, and prints the report.
pub(super) async fn run(args: PushArgs) -> anyhow::Result<ExitCode> {
    check_rules(&args.retag)?;
    let path = args.bundle.clone();
    let bundle = Arc::new(tokio::task::spawn_blocking(move || Bundle::open(&path)).await??);
    let access = &args.access;
    let opts = PushOptions {
        access: registry_access(
            &args.registry.host,
            access.username.as_deref(),
            access.insecure,
            access.ca_file.as_ref(),
        )?,
        target: args.registry,
        rules: args.retag,
        chart_repo: args.chart_repo.unwrap_or(ChartRepo::WithImages),
        force: args.force,
        dry_run: args.dry_run,
        parallel: args.parallel,
    };
    let report = push(bundle, &opts, progress(args.progress)).await?;
    match args.output {
        Output::Text => print!("{}", report.to_text()),
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    Ok(match report.ok {
        true => ExitCode::SUCCESS,
        false => ExitCode::from(EXIT_INCOMPLETE),
    })
}
