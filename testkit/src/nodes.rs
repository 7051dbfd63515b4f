//! Simulated cluster nodes: a private containerd ([`Node`]) or a private dockerd on its own
//! containerd ([`DockerNode`]), plus a real `lade-agent` process on a 127.0.0.1 port, and
//! helpers to run the real `lade` binary against them.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::fixtures::normalize_ref;
use crate::harness::{free_port, ChildGuard, Containerd, Dockerd};

/// The bearer token every simulated agent requires (a cluster's agents share one Secret).
pub const TEST_TOKEN: &str = "lade-test-token-0123456789";

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
    pub agent: AgentProcess,
    pub containerd: Containerd,
}

impl Node {
    /// Starts containerd and an agent for it; returns once the agent accepts connections.
    pub async fn start(name: &str) -> Result<Node> {
        Node::start_with(name, &[]).await
    }

    /// As [`Node::start`], with extra agent flags (e.g. `--platform linux/arm64`).
    pub async fn start_with(name: &str, agent_args: &[&str]) -> Result<Node> {
        let containerd = Containerd::start(name).await?;
        Node::start_on(name, containerd, agent_args).await
    }

    /// An agent with `agent_args` for `containerd`, started by the caller (e.g. with CRI on
    /// another snapshotter).
    pub async fn start_on(name: &str, containerd: Containerd, agent_args: &[&str]) -> Result<Node> {
        let mut args = vec![
            OsString::from("--containerd-socket"),
            containerd.socket().into_os_string(),
        ];
        args.extend(agent_args.iter().map(OsString::from));
        let agent = AgentProcess::start(name, containerd.dir().join("agent.log"), args).await?;
        Ok(Node {
            name: name.to_string(),
            agent,
            containerd,
        })
    }

    /// `127.0.0.1:<port>` of the agent.
    pub fn addr(&self) -> String {
        self.agent.addr()
    }

    /// Image names in namespace `k8s.io` but digest references (tags and CRI's config-digest
    /// records), sorted.
    pub fn image_names(&self) -> Result<Vec<String>> {
        Ok(self
            .all_image_names()?
            .into_iter()
            .filter(|n| !n.contains('@'))
            .collect())
    }

    /// Every image record in `k8s.io`, sorted: [`Node::image_names`] plus the digest
    /// references (`repo@sha256:…`) lade creates beside each tag.
    pub fn all_image_names(&self) -> Result<Vec<String>> {
        let out = self
            .containerd
            .ctr_ok(&["-n", "k8s.io", "images", "ls", "-q"])?;
        let mut names: Vec<String> = out.lines().map(str::to_string).collect();
        names.sort();
        Ok(names)
    }

    /// Runs `cmd` in a container of `image` with `ctr run --rm`, returning its stdout.
    ///
    /// ctr copies the container's output through FIFOs and, on a loaded machine, now and then
    /// exits having copied none of it; an empty output is therefore run once more (as
    /// `<id>-again`) before it is returned.
    pub fn run_container(&self, image: &str, id: &str, cmd: &[&str]) -> Result<String> {
        self.run_container_retrying(&[], image, id, cmd)
    }

    /// Like [`Node::run_container`], on containerd's `snapshotter` instead of its default:
    /// `ctr run` unpacks the image there first when it is not unpacked there yet, with
    /// containerd's own unpacker, as CRI does for a runtime handler with a snapshotter of its
    /// own.
    pub fn run_container_on(
        &self,
        snapshotter: &str,
        image: &str,
        id: &str,
        cmd: &[&str],
    ) -> Result<String> {
        let flag = format!("--snapshotter={snapshotter}");
        self.run_container_retrying(&[&flag], image, id, cmd)
    }

    /// `ctr run` with `flags`, once more (as `<id>-again`) when it printed nothing.
    fn run_container_retrying(
        &self,
        flags: &[&str],
        image: &str,
        id: &str,
        cmd: &[&str],
    ) -> Result<String> {
        let out = self.run_container_with(flags, image, id, cmd)?;
        if !out.is_empty() {
            return Ok(out);
        }
        self.run_container_with(flags, image, &format!("{id}-again"), cmd)
    }

    fn run_container_with(
        &self,
        flags: &[&str],
        image: &str,
        id: &str,
        cmd: &[&str],
    ) -> Result<String> {
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
        ];
        args.extend_from_slice(flags);
        args.extend_from_slice(&[image, id]);
        args.extend_from_slice(cmd);
        self.containerd.ctr_ok(&args)
    }
}

/// One simulated Docker node: a dockerd (on its own containerd) and a `lade-agent` serving it
/// with `--runtime docker`, its blob cache in the dockerd's dir.
pub struct DockerNode {
    pub name: String,
    // Dropped before `dockerd`, like `Node::agent`.
    pub agent: AgentProcess,
    pub dockerd: Dockerd,
}

impl DockerNode {
    /// Starts dockerd and an agent for it; returns once the agent accepts connections.
    pub async fn start(name: &str) -> Result<DockerNode> {
        DockerNode::start_with(name, &[]).await
    }

    /// As [`DockerNode::start`], with extra agent flags (e.g. `--keep-interval 1h`).
    pub async fn start_with(name: &str, agent_args: &[&str]) -> Result<DockerNode> {
        let dockerd = Dockerd::start(name).await?;
        let cache = dockerd.dir().join("lade-cache");
        // `--containerd-socket` is used only when dockerd keeps images in containerd (the
        // containerd image store): dockerd 26 does not report its containerd's address.
        let mut args = vec![
            OsString::from("--runtime"),
            OsString::from("docker"),
            OsString::from("--docker-socket"),
            dockerd.socket().into_os_string(),
            OsString::from("--docker-cache-dir"),
            cache.into_os_string(),
            OsString::from("--containerd-socket"),
            dockerd.containerd().socket().into_os_string(),
        ];
        args.extend(agent_args.iter().map(OsString::from));
        let agent = AgentProcess::start(name, dockerd.dir().join("agent.log"), args).await?;
        Ok(DockerNode {
            name: name.to_string(),
            agent,
            dockerd,
        })
    }

    /// `127.0.0.1:<port>` of the agent.
    pub fn addr(&self) -> String {
        self.agent.addr()
    }

    /// The agent's blob cache (`--docker-cache-dir`).
    pub fn cache_dir(&self) -> PathBuf {
        self.dockerd.dir().join("lade-cache")
    }

    /// Every tagged name `docker images` shows, in full form
    /// (`busybox:latest` -> `docker.io/library/busybox:latest`), sorted.
    pub fn docker_image_names(&self) -> Result<Vec<String>> {
        let out = self
            .dockerd
            .docker_ok(&["images", "--format", "{{.Repository}}:{{.Tag}}"])?;
        let mut names: Vec<String> = out
            .lines()
            .filter(|l| !l.contains("<none>"))
            .map(normalize_ref)
            .collect();
        names.sort();
        Ok(names)
    }

    /// Runs `cmd` in a new container of `image` with `docker run --rm --network none`,
    /// returning its stdout.
    pub fn docker_run(&self, image: &str, cmd: &[&str]) -> Result<String> {
        let mut args = vec!["run", "--rm", "--network", "none", image];
        args.extend_from_slice(cmd);
        self.dockerd.docker_ok(&args)
    }
}

/// The `lade-agent` half of a simulated node ([`Node`], [`DockerNode`]): its ports, its
/// runtime flags (kept for restarts), its log and, while it runs, its process.
pub struct AgentProcess {
    name: String,
    port: u16,
    metrics_port: u16,
    args: Vec<OsString>,
    log: PathBuf,
    child: Option<ChildGuard>,
}

impl AgentProcess {
    /// Starts an agent for node `name` with the runtime flags `args` on two free ports, logging
    /// to `log`; returns once it accepts connections.
    pub async fn start(name: &str, log: PathBuf, args: Vec<OsString>) -> Result<AgentProcess> {
        let mut agent = AgentProcess {
            name: name.to_string(),
            port: free_port(),
            metrics_port: free_port(),
            args,
            log,
            child: None,
        };
        agent.restart().await?;
        Ok(agent)
    }

    /// (Re)starts the agent process on the same ports and flags.
    pub async fn restart(&mut self) -> Result<()> {
        let args: Vec<&OsStr> = self.args.iter().map(OsString::as_os_str).collect();
        let child = spawn_agent(&self.name, self.port, self.metrics_port, &args, &self.log).await?;
        self.child = Some(child);
        Ok(())
    }

    /// Kills the agent process (SIGKILL), leaving its runtime running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill_9();
        }
    }

    /// `127.0.0.1:<port>` of the agent.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Port of the agent's gRPC service.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Port of the agent's /metrics, /healthz, /readyz.
    pub fn metrics_port(&self) -> u16 {
        self.metrics_port
    }

    /// The agent's log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Process id of the running agent.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(ChildGuard::pid)
    }
}

/// Starts `lade-agent` for node `name` on 127.0.0.1:`port` (metrics on `metrics_port`) with
/// the runtime flags `args`, requiring [`TEST_TOKEN`], logging to `log`; returns once it
/// accepts connections.
pub async fn spawn_agent(
    name: &str,
    port: u16,
    metrics_port: u16,
    args: &[&OsStr],
    log: &Path,
) -> Result<ChildGuard> {
    let addr = format!("127.0.0.1:{port}");
    let token = log.with_file_name(format!("agent-{port}.token"));
    std::fs::write(&token, TEST_TOKEN).context("writing the agent's token file")?;
    let mut cmd = Command::new(workspace_bin("lade-agent")?);
    cmd.arg("--listen")
        .arg(&addr)
        .arg("--metrics-listen")
        .arg(format!("127.0.0.1:{metrics_port}"))
        .arg("--auth-token-file")
        .arg(&token)
        // The simulated nodes relay to each other on 127.0.0.1 only.
        .args(["--peer-cidr", "127.0.0.1/32"])
        .args(args)
        .arg("--node-name")
        .arg(name)
        .env("RUST_LOG", "info,lade_agent=debug")
        // No keep-present loop unless a test asks for one (`--keep-interval`, which wins over
        // the environment): it would put back what tests remove to see it reported.
        .env("LADE_KEEP_INTERVAL", "0");
    let mut child = ChildGuard::spawn(cmd, log)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if tokio::net::TcpStream::connect(&addr).await.is_ok() {
            return Ok(child);
        }
        if !child.is_running() || Instant::now() > deadline {
            bail!(
                "lade-agent for {name} did not come up; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the real `lade` binary with `args`; returns its output (never fails on exit code).
pub fn run_lade(args: &[&str]) -> Result<Output> {
    let out = Command::new(workspace_bin("lade")?)
        .args(args)
        // LADE_TEST_LOG sets lade's RUST_LOG for a failing test's diagnosis.
        .env(
            "RUST_LOG",
            std::env::var("LADE_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .env("LADE_AUTH_TOKEN", TEST_TOKEN)
        .output()
        .context("running lade")?;
    Ok(out)
}
