//! What the benchmark binaries (`lade-bench`, `lade-bench-relay`) read about the processes
//! they measure, and how they read their command line.

use std::path::Path;

use anyhow::{ensure, Context, Result};

/// CPU seconds (user + system) process `pid` has used so far; with `waited_children`, also
/// those of the children it has waited for (containerd's `unpigz`). 0 for a process gone.
pub fn cpu_seconds(pid: u32, waited_children: bool) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name: utime, stime, cutime and cstime are the
    // 12th to 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let wanted: &[usize] = if waited_children {
        &[11, 12, 13, 14]
    } else {
        &[11, 12]
    };
    let ticks: f64 = wanted
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// Peak resident set of a live process, in MiB (0 for a process gone).
pub fn peak_rss_mib(pid: u32) -> f64 {
    lade_testkit::harness::peak_rss(pid).map_or(0.0, |bytes| bytes as f64 / (1 << 20) as f64)
}

/// The `fields` numbers of the last line GNU time (`/usr/bin/time -f ... -o report`) wrote to
/// `report`.
pub fn time_report(report: &Path, fields: usize) -> Result<Vec<f64>> {
    let text = std::fs::read_to_string(report)?;
    let nums: Vec<f64> = text
        .lines()
        .last()
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    ensure!(
        nums.len() == fields,
        "unexpected /usr/bin/time output: {text}"
    );
    Ok(nums)
}

/// Reads the command line as `--flag value` pairs: `-h` / `--help` prints `usage` and exits;
/// every other flag goes to `set` with a getter of its value, and one that `set` does not know
/// (it returns `Ok(false)`) is an error.
pub fn parse_flags(
    usage: &str,
    mut set: impl FnMut(&str, &mut dyn FnMut() -> Result<String>) -> Result<bool>,
) -> Result<()> {
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{usage}");
            std::process::exit(0);
        }
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        ensure!(set(&flag, &mut value)?, "unknown argument {flag}");
    }
    Ok(())
}

/// What the measured `lade load` runs pass after the bundle: the one agent at `agent`, no
/// progress output, the JSON report on stdout.
pub fn load_flags(agent: &str) -> [&str; 6] {
    ["--agent", agent, "--progress", "none", "-o", "json"]
}
