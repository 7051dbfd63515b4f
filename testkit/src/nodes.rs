//! Simulated cluster nodes: a private containerd plus a real `lade-agent` process on a
//! 127.0.0.1 port, and helpers to run the real `lade` binary against them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::harness::{free_port, ChildGuard, Containerd};

/// Path of a binary of this workspace, built by `cargo test --workspace` / `cargo build`
/// next to the test executable (`target/<profile>/`).
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    let mut dir = exe.parent().map(Path::to_path_buf);
    while let Some(d) = dir {
        let candidate = d.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        dir = d.parent().map(Path::to_path_buf);
        if dir.as_ref().is_some_and(|p| p.ends_with("target")) {
            break;
        }
    }
    bail!(
        "binary {name} not found next to {}; run `cargo build --workspace` first",
        exe.display()
    )
}

/// One simulated node: its own containerd and a `lade-agent` serving it.
pub struct Node {
    pub name: String,
    // Declared before `containerd` so it is dropped first: a live agent names the socket on
    // its command line and would look like a leftover shim to containerd's cleanup.
    agent: Option<ChildGuard>,
    pub containerd: Containerd,
    pub port: u16,
}

impl Node {
    /// Starts containerd and an agent for it; returns once the agent accepts connections.
    pub async fn start(name: &str) -> Result<Node> {
        let containerd = Containerd::start(name).await?;
        let mut node = Node {
            name: name.to_string(),
            containerd,
            agent: None,
            port: free_port(),
        };
        node.start_agent().await?;
        Ok(node)
    }

    /// `127.0.0.1:<port>` of the agent.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn agent_log(&self) -> PathBuf {
        self.containerd.dir().join("agent.log")
    }

    /// (Re)starts the agent process on the same port.
    pub async fn start_agent(&mut self) -> Result<()> {
        let mut cmd = Command::new(workspace_bin("lade-agent")?);
        cmd.arg("--listen")
            .arg(self.addr())
            .arg("--containerd-socket")
            .arg(self.containerd.socket())
            .arg("--node-name")
            .arg(&self.name)
            .env("RUST_LOG", "info,lade_agent=debug");
        let mut child = ChildGuard::spawn(cmd, &self.agent_log())?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if tokio::net::TcpStream::connect(self.addr()).await.is_ok() {
                break;
            }
            if !child.is_running() || Instant::now() > deadline {
                bail!(
                    "lade-agent for {} did not come up; log:\n{}",
                    self.name,
                    std::fs::read_to_string(self.agent_log()).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.agent = Some(child);
        Ok(())
    }

    /// Process id of the running agent.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(ChildGuard::pid)
    }

    /// Kills the agent process (SIGKILL), leaving containerd running.
    pub fn kill_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.kill_9();
        }
    }

    /// Image names in namespace `k8s.io`, sorted.
    pub fn image_names(&self) -> Result<Vec<String>> {
        let out = self
            .containerd
            .ctr_ok(&["-n", "k8s.io", "images", "ls", "-q"])?;
        let mut names: Vec<String> = out.lines().map(str::to_string).collect();
        names.sort();
        Ok(names)
    }

    /// Runs `cmd` in a container of `image` with `ctr run --rm`, returning its stdout.
    pub fn run_container(&self, image: &str, id: &str, cmd: &[&str]) -> Result<String> {
        let runc_root = self.containerd.runc_root();
        let fifo = self.containerd.dir().join("fifo");
        let cgroup = format!("{}/{id}", self.containerd.cgroup_parent());
        let mut args = vec![
            "-n",
            "k8s.io",
            "run",
            "--rm",
            "--net-host",
            "--runc-root",
            runc_root.to_str().expect("utf-8 path"),
            "--fifo-dir",
            fifo.to_str().expect("utf-8 path"),
            "--cgroup",
            &cgroup,
            image,
            id,
        ];
        args.extend_from_slice(cmd);
        self.containerd.ctr_ok(&args)
    }
}

/// Runs the real `lade` binary with `args`; returns its output (never fails on exit code).
pub fn run_lade(args: &[&str]) -> Result<Output> {
    let out = Command::new(workspace_bin("lade")?)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .context("running lade")?;
    Ok(out)
}
