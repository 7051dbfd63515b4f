//! Real daemons for integration tests, one private set per simulated node.
//!
//! This module owns process lifetime and host hygiene: [`Containerd`] starts a containerd whose
//! every path (sockets, root, state, opt, CNI dirs, runc root) lives in its own short temp dir
//! and tears all of it down again on drop (daemon, leftover shims and their containers, their
//! cgroups, mounts, the dir); [`Dockerd`] does the same for a dockerd on top of its own
//! private containerd; [`ChildGuard`] does the same for any other process a test spawns (the agent).
//! [`require_binary`] and [`daemon_tests_enabled`] (from [`crate::require`], re-exported here)
//! decide whether daemon tests run at all.
//!
//! The building blocks are free functions on purpose (short temp dir, process scans and
//! reaping, cgroup removal, unmounting, log tail) so [`Containerd`] and [`Dockerd`] share them
//! instead of growing a second copy.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tempfile::TempDir;

use crate::cri;
pub use crate::require::{daemon_tests_enabled, require_binary, SKIP_ENV};
use crate::runtimes::{
    ContainerdVersion, DockerStore, Runtime, CONFIG_VERSION_ENV, CONTAINERD_ENV,
    DISCARD_UNPACKED_LAYERS_ENV, DOCKERD_ENV,
};

/// The snapshotter [`Containerd::start`] configures for CRI: the agent's default.
pub const CRI_SNAPSHOTTER: &str = "overlayfs";

/// How long [`Containerd::start`] and [`Containerd::restart`] wait for gRPC *and* CRI to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long [`Dockerd::start`] waits for the Docker API to answer.
const DOCKERD_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a SIGTERM'd daemon gets to exit before it is SIGKILLed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Image asked for while waiting for readiness; it never exists, we only need CRI to answer.
const READINESS_PROBE_IMAGE: &str = "docker.io/library/lade-readiness-probe:none";

/// Lines of daemon log included in errors.
pub(crate) const LOG_TAIL_LINES: usize = 40;

/// Returns a TCP port on 127.0.0.1 that was free a moment ago, never the same one twice in
/// this process.
///
/// The port is released before returning, so another process could take it before the test
/// binds it. It is drawn from 20000-32767, below Linux's ephemeral range (32768-60999): the
/// outgoing connections tests make by the hundred take their local ports from that range, and
/// a port picked with `bind(:0)` (also from that range) was now and then taken by one of them
/// before the agent bound it.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let random = std::collections::hash_map::RandomState::new();
    for attempt in 0u64.. {
        let mut h = random.build_hasher();
        h.write_u64(attempt);
        h.write_u32(std::process::id());
        let port = 20000 + (h.finish() % 12768) as u16;
        let mut handed_out = HANDED_OUT.lock().expect("port list lock");
        if handed_out.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            handed_out.push(port);
            return port;
        }
        assert!(attempt < 10_000, "no free port in 20000-32767");
    }
    unreachable!("the loop returns or panics")
}

/// A spawned process that is killed and reaped when the guard is dropped (also on panic), so a
/// failing test never leaves agents or daemons behind.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    program: String,
    /// Set once the process has been reaped; after that its pid may belong to someone else and
    /// must not be signalled.
    exited: Option<ExitStatus>,
}

impl ChildGuard {
    /// Spawns `cmd` with stdin closed and stdout+stderr appended to `log` (created if needed).
    ///
    /// Appending rather than truncating keeps the history across restarts of the same daemon,
    /// which is what one wants to read when a restart test fails.
    pub fn spawn(mut cmd: Command, log: &Path) -> Result<ChildGuard> {
        let program = cmd.get_program().to_string_lossy().into_owned();
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open log file {}", log.display()))?;
        let err = out.try_clone().context("duplicate log file handle")?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn `{program}` (log: {})", log.display()))?;
        Ok(ChildGuard {
            child,
            program,
            exited: None,
        })
    }

    /// Process id (stays available after the process died).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Returns the exit status if the process has terminated (reaping it), `None` while running.
    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.try_exited().is_none()
    }

    /// Sends SIGKILL and reaps the process: a crash as far as the process is concerned.
    /// No-op if it already exited.
    pub fn kill_9(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
    }

    /// Sends SIGTERM, waits up to `grace` for a clean exit, then SIGKILLs. Always reaps.
    pub fn terminate(&mut self, grace: Duration) {
        if !self.is_running() {
            return;
        }
        signal(self.pid(), libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if !self.is_running() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "{} (pid {}) ignored SIGTERM for {grace:?}; sending SIGKILL",
            self.program,
            self.pid()
        );
        self.kill_9();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill_9();
    }
}

/// A private containerd for one simulated node, with the CRI plugin enabled.
///
/// Everything it writes lives under [`Containerd::dir`] (a short dir in `/tmp`, because unix
/// socket paths must stay under 108 bytes); the host's `/run/containerd` and
/// `/var/lib/containerd` are never used by the daemon's own config nor by the cleanup. Dropping
/// the value stops the daemon, kills shims/containers it left, unmounts what is still mounted
/// under the dir and deletes the dir.
///
/// One containerd 1.6 path cannot be moved: the runc-v2 shim's socket lives in
/// `/run/containerd/s/<hash of address+ns+id>`. The hash includes our socket path, so
/// instances never collide there, and the drop guard deletes tasks through containerd so the
/// shims exit cleanly and remove those sockets themselves.
#[derive(Debug)]
pub struct Containerd {
    name: String,
    /// Canonical path of the temp dir; every other path is derived from it.
    dir: PathBuf,
    /// `Option` so `Drop` can remove the dir itself, after unmounting, and report failures.
    tempdir: Option<TempDir>,
    /// The build selected by `LADE_CONTAINERD` (see [`crate::runtimes`]).
    runtime: Runtime,
    version: ContainerdVersion,
    /// The snapshotter CRI is configured with.
    cri_snapshotter: String,
    containerd_bin: PathBuf,
    ctr_bin: PathBuf,
    process: Option<ChildGuard>,
}

impl Containerd {
    /// Creates the private dir and config, starts containerd, and returns once both its gRPC
    /// socket accepts connections and the CRI ImageService answers (up to 20 s; on timeout the
    /// error carries the tail of the daemon log).
    ///
    /// `name` only labels the temp dir and messages (it is cut to 16 safe characters).
    ///
    /// The containerd build is the one `LADE_CONTAINERD` selects ([`crate::runtimes`]): the
    /// machine's by default, else a runtime fetched by `scripts/fetch-runtimes`, whose `bin`
    /// dir then comes first on the daemon's `PATH` so it runs that package's shims.
    pub async fn start(name: &str) -> Result<Containerd> {
        Containerd::start_with_cri_snapshotter(name, CRI_SNAPSHOTTER).await
    }

    /// Like [`Containerd::start`], with CRI configured to keep images in `snapshotter`.
    pub async fn start_with_cri_snapshotter(name: &str, snapshotter: &str) -> Result<Containerd> {
        let runtime = Runtime::from_env(CONTAINERD_ENV)?;
        let containerd_bin = runtime.binary("containerd")?;
        let ctr_bin = runtime.binary("ctr")?;
        // Not used by us directly, but without them every container operation would fail much
        // later with a far less helpful message.
        runtime.binary("containerd-shim-runc-v2")?;
        require_binary("runc")?;
        let version = ContainerdVersion::of(&containerd_bin)?;

        let (tempdir, dir) = short_tempdir(name)?;
        let mut node = Containerd {
            name: name.to_string(),
            dir,
            tempdir: Some(tempdir),
            runtime,
            version,
            cri_snapshotter: snapshotter.to_string(),
            containerd_bin,
            ctr_bin,
            process: None,
        };
        // From here on `node` owns the dir: any early return drops it and cleans up.
        if node.socket().as_os_str().len() + ".ttrpc".len() >= 108 {
            bail!(
                "socket path {} is too long for a unix socket",
                node.socket().display()
            );
        }
        for sub in [
            "root", "state", "opt", "tmp", "runc", "cni/bin", "cni/conf", "certs.d",
        ] {
            fs::create_dir_all(node.dir.join(sub))
                .with_context(|| format!("create {}", node.dir.join(sub).display()))?;
        }
        fs::write(node.config_path(), node.config_toml()?)
            .with_context(|| format!("write {}", node.config_path().display()))?;
        node.check_discard_setting()?;
        node.spawn_and_wait().await?;
        Ok(node)
    }

    /// With [`DISCARD_UNPACKED_LAYERS_ENV`] set, proves that this containerd takes the setting
    /// (its `config dump` of our file says so), so a test asked to run with it never runs
    /// without it because a key moved between versions.
    fn check_discard_setting(&self) -> Result<()> {
        if std::env::var(DISCARD_UNPACKED_LAYERS_ENV).as_deref() != Ok("1") {
            return Ok(());
        }
        let out = Command::new(&self.containerd_bin)
            .arg("--config")
            .arg(self.config_path())
            .args(["config", "dump"])
            .output()
            .context("containerd config dump")?;
        let dump = String::from_utf8_lossy(&out.stdout);
        let set = dump
            .lines()
            .any(|l| l.trim().replace(' ', "") == "discard_unpacked_layers=true");
        ensure!(
            set,
            "{DISCARD_UNPACKED_LAYERS_ENV}=1 but containerd {} does not take it from our config:\n{dump}",
            self.version
        );
        Ok(())
    }

    /// The containerd gRPC socket (CRI is served on the same socket).
    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    /// containerd's `root` (content store, snapshots, metadata db).
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// containerd's `state` dir (task bundles, CRI state).
    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// The private temp dir that holds everything of this instance.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The daemon log (stdout+stderr of every run, appended across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("containerd.log")
    }

    /// A runc state dir private to this instance. The CRI runtime is configured with it; tests
    /// that `ctr run` containers should pass `--runc-root <this>` (and `--fifo-dir` under
    /// [`Containerd::dir`]) because ctr's defaults live in the host's `/run/containerd`.
    pub fn runc_root(&self) -> PathBuf {
        self.dir.join("runc")
    }

    /// A cgroup path (`/lade-<name>-XXXXXX`) private to this instance, for `ctr run --cgroup
    /// <this>/<id>`: ctr's default cgroup is `/<namespace>/<id>`, which is host-global, so two
    /// simulated nodes running the same container id would share (and kill) one cgroup. The
    /// drop guard removes this cgroup tree in every hierarchy.
    pub fn cgroup_parent(&self) -> String {
        let base = self.dir.file_name().unwrap_or_default().to_string_lossy();
        format!("/{base}")
    }

    /// The name given to [`Containerd::start`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The containerd build this instance runs (`system` or a fetched runtime's name).
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// The version of the containerd this instance runs.
    pub fn version(&self) -> ContainerdVersion {
        self.version
    }

    /// Pid of the current containerd process, `None` if it is not running (e.g. after
    /// [`Containerd::kill_9`]).
    pub fn pid(&mut self) -> Option<u32> {
        let p = self.process.as_mut()?;
        p.is_running().then(|| p.pid())
    }

    /// The last lines of the daemon log, for error messages.
    pub fn log_tail(&self) -> String {
        tail_file(&self.log_path(), LOG_TAIL_LINES)
    }

    /// Runs `ctr --address <socket> <args>` and returns its output, whatever the exit status.
    /// Pass `-n <namespace>` inside `args`.
    ///
    /// Panics only if `ctr` cannot be executed at all (it was found by `start`).
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new(&self.ctr_bin)
            .arg("--address")
            .arg(self.socket())
            .args(args)
            // An inherited namespace would silently redirect commands that omit `-n`.
            .env_remove("CONTAINERD_NAMESPACE")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.ctr_bin.display()))
    }

    /// Like [`Containerd::ctr`] but fails unless ctr exits 0; returns its stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.ctr(args);
        if !out.status.success() {
            bail!(
                "`ctr {}` on containerd `{}` failed ({}): {}",
                args.join(" "),
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// SIGKILLs containerd, like a crash: shims and their containers keep running and whatever
    /// was in flight (an import) is cut off. Use [`Containerd::restart`] to bring it back.
    pub fn kill_9(&mut self) {
        if let Some(p) = &mut self.process {
            p.kill_9();
        }
    }

    /// Stops containerd if it runs (SIGTERM, then SIGKILL after a grace period), starts it again
    /// on the same dirs and config, and waits for gRPC and CRI as [`Containerd::start`] does.
    pub async fn restart(&mut self) -> Result<()> {
        if let Some(mut p) = self.process.take() {
            p.terminate(STOP_GRACE);
        }
        self.spawn_and_wait().await
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("config.toml")
    }

    /// The CRI pod sandbox image this instance is configured with, as `containerd config
    /// dump` shows the effective configuration: `sandbox_image` on 1.x,
    /// `pinned_images.sandbox` on 2.x.
    pub fn sandbox_image(&self) -> Result<String> {
        let out = Command::new(&self.containerd_bin)
            .arg("--config")
            .arg(self.config_path())
            .args(["config", "dump"])
            .output()
            .with_context(|| format!("run {} config dump", self.containerd_bin.display()))?;
        let dump = String::from_utf8_lossy(&out.stdout);
        let mut in_pins = false;
        for line in dump.lines().map(str::trim) {
            if line.starts_with('[') {
                in_pins = line.ends_with(".pinned_images]");
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let key = key.trim();
            if key == "sandbox_image" || (in_pins && key == "sandbox") {
                return Ok(value.trim().trim_matches(['"', '\'']).to_string());
            }
        }
        bail!(
            "{}: containerd config dump names no sandbox image: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// The config schema this instance is started with: `version = 3` on containerd 2.x (what
    /// it writes itself), `version = 2` on 1.x, or the one [`CONFIG_VERSION_ENV`] forces (2 on
    /// containerd 2.x: a node upgraded in place keeps its 1.x config, which 2.x migrates).
    pub fn config_version(&self) -> Result<u32> {
        let native = if self.version.major >= 2 { 3 } else { 2 };
        match std::env::var(CONFIG_VERSION_ENV).as_deref() {
            Err(_) | Ok("") => Ok(native),
            Ok("2") => Ok(2),
            Ok("3") if self.version.major >= 2 => Ok(3),
            Ok(other) => bail!(
                "{CONFIG_VERSION_ENV}={other}: containerd {} takes config version 2{}",
                self.version,
                if self.version.major >= 2 { " or 3" } else { "" }
            ),
        }
    }

    /// The config; keys were taken from `containerd config default` of each version. Anything
    /// left unset falls back to containerd's defaults, so every default that points at a host
    /// path is overridden here.
    fn config_toml(&self) -> Result<String> {
        let d = self.dir.display();
        let version = self.config_version()?;
        let snapshotter = &self.cri_snapshotter;
        let discard = std::env::var(DISCARD_UNPACKED_LAYERS_ENV).as_deref() == Ok("1");
        let common = format!(
            r#"version = {version}
root = "{d}/root"
state = "{d}/state"
# Temp files (e.g. during import) stay in our dir instead of the host's TMPDIR.
temp = "{d}/tmp"
# Snapshotters this host cannot use anyway; skipping them keeps the log readable.
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

# Empty addresses disable the debug and metrics listeners, which would otherwise clash
# between instances.
[debug]
  address = ""

[metrics]
  address = ""

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{d}/opt"

  # NRI (on by default in containerd 2.x, off in 1.7) listens on /var/run/nri/nri.sock,
  # one socket for the whole host: a second instance started meanwhile exits with "address
  # already in use". Each instance gets its own socket and plugin dirs, NRI stays as shipped.
  [plugins."io.containerd.nri.v1.nri"]
    socket_path = "{d}/nri.sock"
    plugin_path = "{d}/nri/plugins"
    plugin_config_path = "{d}/nri/conf.d"

  # containerd 2.x splits CRI into this gRPC server, an image service and a runtime service;
  # 1.x keeps all of it in this table.
  [plugins."io.containerd.grpc.v1.cri"]
    disable_tcp_service = true
    # Port 0: several instances run at once and must not fight over the default port.
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
"#
        );
        // `runtimes.runc` must be repeated in full: the table replaces the default map entry
        // rather than merging. Root: the default is /run/containerd/runc, shared by all
        // instances on the host.
        let runc = |runtimes: &str| {
            format!(
                r#"
      [{runtimes}.runc]
        runtime_type = "io.containerd.runc.v2"

        [{runtimes}.runc.options]
          Root = "{d}/runc"
"#
            )
        };
        let cri = if version == 2 {
            let cri = r#"plugins."io.containerd.grpc.v1.cri""#;
            format!(
                r#"    # Default is /var/run/netns on the host.
    netns_mounts_under_state_dir = true

    [{cri}.cni]
      bin_dir = "{d}/cni/bin"
      conf_dir = "{d}/cni/conf"

    [{cri}.containerd]
      snapshotter = "{snapshotter}"
      default_runtime_name = "runc"
      discard_unpacked_layers = {discard}
{runc}
    [{cri}.registry]
      # Never read the host's /etc/containerd/certs.d.
      config_path = "{d}/certs.d"
"#,
                runc = runc(&format!("{cri}.containerd.runtimes"))
            )
        } else {
            let (images, runtime) = (
                r#"plugins."io.containerd.cri.v1.images""#,
                r#"plugins."io.containerd.cri.v1.runtime""#,
            );
            format!(
                r#"
  [{images}]
    snapshotter = "{snapshotter}"
    discard_unpacked_layers = {discard}

    [{images}.registry]
      # Never read the host's /etc/containerd/certs.d.
      config_path = "{d}/certs.d"

  [{runtime}]
    # Default is /var/run/netns on the host.
    netns_mounts_under_state_dir = true

    [{runtime}.cni]
      bin_dirs = ["{d}/cni/bin"]
      conf_dir = "{d}/cni/conf"

    [{runtime}.containerd]
      default_runtime_name = "runc"
{runc}"#,
                runc = runc(&format!("{runtime}.containerd.runtimes"))
            )
        };
        Ok(common + &cri)
    }

    /// `containerd --config <ours>`, with the selected runtime's shims first on `PATH`.
    fn daemon_command(&self) -> Command {
        let mut cmd = Command::new(&self.containerd_bin);
        cmd.arg("--config").arg(self.config_path());
        self.runtime.apply_path(&mut cmd);
        cmd
    }

    async fn spawn_and_wait(&mut self) -> Result<()> {
        let cmd = self.daemon_command();
        self.process = Some(ChildGuard::spawn(cmd, &self.log_path())?);
        self.wait_ready().await
    }

    /// Waits until the socket accepts connections and CRI's ImageService answers.
    ///
    /// Socket alone is not enough: containerd 1.6 serves the socket before the CRI plugin has
    /// finished initializing, and CRI calls fail with "server is not initialized yet" until
    /// then.
    async fn wait_ready(&mut self) -> Result<()> {
        let socket = self.socket();
        let started = Instant::now();
        loop {
            if let Some(p) = &mut self.process {
                if let Some(status) = p.try_exited() {
                    bail!(
                        "containerd `{}` exited during startup ({status}); log tail:\n{}",
                        self.name,
                        self.log_tail()
                    );
                }
            }
            let last_error = match tokio::net::UnixStream::connect(&socket).await {
                Err(e) => format!("connect {}: {e}", socket.display()),
                Ok(_) => match cri::image_status(&socket, READINESS_PROBE_IMAGE).await {
                    Ok(_) => return Ok(()),
                    Err(e) => format!("CRI ImageStatus: {e:#}"),
                },
            };
            if started.elapsed() > READY_TIMEOUT {
                bail!(
                    "containerd `{}` not ready after {READY_TIMEOUT:?} (last error: {last_error}); \
                     log tail:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts containerd again without the async CRI wait (we are in `Drop`); returns whether
    /// it answers `ctr version` within 10 s.
    fn revive_for_cleanup(&mut self) -> bool {
        let cmd = self.daemon_command();
        let Ok(process) = ChildGuard::spawn(cmd, &self.log_path()) else {
            return false;
        };
        self.process = Some(process);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if std::os::unix::net::UnixStream::connect(self.socket()).is_ok()
                && self.ctr(&["--timeout", "2s", "version"]).status.success()
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Best effort, while containerd still runs: force-delete every task so each shim exits
    /// the normal way (removing its socket under `/run/containerd/s` and its rootfs mount)
    /// instead of being killed and leaving those behind.
    fn delete_tasks(&self) {
        let run = |args: &[&str]| -> Option<String> {
            let mut full = vec!["--timeout", "5s"];
            full.extend_from_slice(args);
            let out = self.ctr(&full);
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let Some(namespaces) = run(&["namespaces", "ls", "-q"]) else {
            return;
        };
        for ns in namespaces.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let Some(tasks) = run(&["-n", ns, "tasks", "ls", "-q"]) else {
                continue;
            };
            for id in tasks.lines().map(str::trim).filter(|l| !l.is_empty()) {
                run(&["-n", ns, "tasks", "delete", "--force", id]);
            }
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let mut running = self.process.as_mut().is_some_and(|p| p.is_running());
        if !running && !processes_referencing(&self.socket()).is_empty() {
            // containerd was killed but its shims live on. Reviving it (it reconnects to them)
            // is the only way to make them exit cleanly; killing them outright would leave
            // their sockets in the host's /run/containerd/s, which we must not touch.
            running = self.revive_for_cleanup();
        }
        if running {
            self.delete_tasks();
        }
        if let Some(mut p) = self.process.take() {
            p.terminate(STOP_GRACE);
        }
        // Whatever survived (containerd was SIGKILLed, a task delete failed): shims keep
        // running without containerd, and their containers keep the rootfs mounts busy.
        kill_processes_with_arg(&self.socket());
        remove_cgroups(&self.cgroup_parent());
        unmount_all_under(&self.dir);
        if let Some(tempdir) = self.tempdir.take() {
            if let Err(e) = tempdir.close() {
                eprintln!(
                    "warning: could not remove containerd dir {}: {e}",
                    self.dir.display()
                );
            }
        }
    }
}

/// A private dockerd for one simulated Docker node, on top of its own private [`Containerd`].
///
/// Every path dockerd would take from the host lives under [`Dockerd::dir`] (a short dir in
/// `/tmp`): data root, exec root (container state, network namespaces), pidfile, API socket,
/// config file and the trust key it would otherwise write to `/etc/docker`. Its containers get
/// the cgroup parent [`Dockerd::cgroup_parent`]; it touches no iptables, bridge or sysctl. The
/// `docker` CLI is run with `-H` this socket and a private `DOCKER_CONFIG`.
///
/// dockerd 20.10 always creates the (empty) legacy plugin dir `/run/docker/plugins`, which no
/// flag moves; it is shared and left alone.
///
/// Dropping it stops dockerd (which stops its containers), then its containerd (whose guard
/// deletes any container left, in Docker's namespace `moby` too), removes the cgroups,
/// unmounts what is still mounted under the dir and deletes the dir.
#[derive(Debug)]
pub struct Dockerd {
    name: String,
    dir: PathBuf,
    tempdir: Option<TempDir>,
    dockerd_bin: PathBuf,
    docker_bin: PathBuf,
    /// The dockerd build ([`DOCKERD_ENV`]).
    runtime: Runtime,
    /// Its image store ([`DOCKER_STORE_ENV`]).
    store: DockerStore,
    process: Option<ChildGuard>,
    /// `Option` so `Drop` can stop it after dockerd and before removing cgroups and mounts.
    containerd: Option<Containerd>,
}

impl Dockerd {
    /// Starts a private containerd, then dockerd on it; returns once the Docker API answers
    /// (up to 30 s; on timeout the error carries the tail of the daemon log).
    ///
    /// `name` labels the temp dirs and messages (cut to 16 safe characters).
    pub async fn start(name: &str) -> Result<Dockerd> {
        let runtime = Runtime::from_env(DOCKERD_ENV)?;
        let dockerd_bin = runtime.binary("dockerd")?;
        let store = DockerStore::from_env()?;
        let docker_bin = require_binary("docker")?;
        let containerd = Containerd::start(name).await?;
        let (tempdir, dir) = short_tempdir(&format!("d-{name}"))?;
        let mut node = Dockerd {
            name: name.to_string(),
            dir,
            tempdir: Some(tempdir),
            dockerd_bin,
            docker_bin,
            runtime,
            store,
            process: None,
            containerd: Some(containerd),
        };
        // From here on `node` owns both dirs: any early return drops it and cleans up.
        for sub in ["data", "exec", "cli"] {
            fs::create_dir_all(node.dir.join(sub))
                .with_context(|| format!("create {}", node.dir.join(sub).display()))?;
        }
        // The trust key can only be moved by the config file (its flag is gone in 20.10).
        let mut config = serde_json::json!({ "deprecated-key-path": node.dir.join("key.json") });
        if node.store == DockerStore::Containerd {
            config["features"] = serde_json::json!({ "containerd-snapshotter": true });
        }
        fs::write(node.config_path(), config.to_string())
            .with_context(|| format!("write {}", node.config_path().display()))?;
        node.spawn_and_wait().await?;
        Ok(node)
    }

    /// The Docker API socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    /// `unix://<socket>`, as `docker -H` and `DOCKER_HOST` take it.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// The private temp dir that holds everything of this dockerd (its containerd has its own).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its image store.
    pub fn store(&self) -> DockerStore {
        self.store
    }

    /// The dockerd build it runs (`system` or a fetched runtime's name).
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// The containerd this dockerd runs its containers on.
    pub fn containerd(&self) -> &Containerd {
        self.containerd
            .as_ref()
            .expect("containerd lives as long as the Dockerd")
    }

    /// The daemon log (stdout+stderr).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("dockerd.log")
    }

    /// The last lines of the daemon log, for error messages.
    pub fn log_tail(&self) -> String {
        tail_file(&self.log_path(), LOG_TAIL_LINES)
    }

    /// The cgroup (`/lade-d-<name>-XXXXXX`) dockerd puts its containers under; the drop guard
    /// removes it in every hierarchy.
    pub fn cgroup_parent(&self) -> String {
        let base = self.dir.file_name().unwrap_or_default().to_string_lossy();
        format!("/{base}")
    }

    /// The name given to [`Dockerd::start`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `docker -H <socket> <args>` and returns its output, whatever the exit status.
    ///
    /// Panics only if `docker` cannot be executed at all (it was found by `start`).
    pub fn docker(&self, args: &[&str]) -> Output {
        Command::new(&self.docker_bin)
            .arg("-H")
            .arg(self.host())
            .args(args)
            // The host's ~/.docker (contexts, credentials) must not redirect or leak into tests.
            .env("DOCKER_CONFIG", self.dir.join("cli"))
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.docker_bin.display()))
    }

    /// Like [`Dockerd::docker`] but fails unless docker exits 0; returns its stdout.
    pub fn docker_ok(&self, args: &[&str]) -> Result<String> {
        let out = self.docker(args);
        if !out.status.success() {
            bail!(
                "`docker {}` on dockerd `{}` failed ({}): {}",
                args.join(" "),
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("daemon.json")
    }

    async fn spawn_and_wait(&mut self) -> Result<()> {
        let d = &self.dir;
        let mut cmd = Command::new(&self.dockerd_bin);
        self.runtime.apply_path(&mut cmd);
        // The graph driver, or the snapshotter of the containerd store.
        let driver = match self.store {
            DockerStore::Overlay2 => "overlay2",
            DockerStore::Containerd => "overlayfs",
        };
        cmd.arg("--storage-driver")
            .arg(driver)
            .arg("--config-file")
            .arg(self.config_path())
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("docker.pid"))
            .arg("--host")
            .arg(self.host())
            .arg("--containerd")
            .arg(self.containerd().socket())
            .arg("--cgroup-parent")
            .arg(self.cgroup_parent())
            .args([
                "--exec-opt",
                "native.cgroupdriver=cgroupfs",
                // No host networking state: no bridge, no NAT rules, no forwarding sysctl.
                "--bridge=none",
                "--iptables=false",
                "--ip-masq=false",
                "--ip-forward=false",
                "--userland-proxy=false",
                // Containers get little time to stop: the drop guard kills what is left.
                "--shutdown-timeout=2",
            ]);
        self.process = Some(ChildGuard::spawn(cmd, &self.log_path())?);
        let started = Instant::now();
        loop {
            if let Some(p) = &mut self.process {
                if let Some(status) = p.try_exited() {
                    bail!(
                        "dockerd `{}` exited during startup ({status}); log tail:\n{}",
                        self.name,
                        self.log_tail()
                    );
                }
            }
            let last_error = match docker_ping(&self.socket()).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if started.elapsed() > DOCKERD_READY_TIMEOUT {
                bail!(
                    "dockerd `{}` not ready after {DOCKERD_READY_TIMEOUT:?} (last error: \
                     {last_error:#}); log tail:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.terminate(STOP_GRACE);
        }
        // Containers dockerd could not stop are tasks of its containerd; its guard deletes them.
        drop(self.containerd.take());
        kill_processes_with_arg(&self.dir);
        remove_cgroups(&self.cgroup_parent());
        unmount_all_under(&self.dir);
        if let Some(tempdir) = self.tempdir.take() {
            if let Err(e) = tempdir.close() {
                eprintln!(
                    "warning: could not remove dockerd dir {}: {e}",
                    self.dir.display()
                );
            }
        }
    }
}

/// `GET /_ping` on a Docker API socket: Ok once dockerd serves its API.
async fn docker_ping(socket: &Path) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("connect {}", socket.display()))?;
    stream
        .write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        .await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let answer = String::from_utf8_lossy(&answer);
    let status = answer.lines().next().unwrap_or_default();
    if status.contains(" 200 ") {
        Ok(())
    } else {
        bail!("ping answered {status:?}")
    }
}

/// Creates `/tmp/lade-<name>-XXXXXX` and returns it with its canonical path.
///
/// `/tmp` rather than `$TMPDIR`: socket paths must stay under 108 bytes and `$TMPDIR` can be
/// long. The canonical path is what containerd and `/proc/self/mountinfo` will report, so
/// cleanup compares against the same spelling.
fn short_tempdir(name: &str) -> Result<(TempDir, PathBuf)> {
    let label: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(16)
        .collect();
    let tempdir = tempfile::Builder::new()
        .prefix(&format!("lade-{label}-"))
        .tempdir_in("/tmp")
        .context("create temp dir in /tmp")?;
    let dir = tempdir
        .path()
        .canonicalize()
        .with_context(|| format!("canonicalize {}", tempdir.path().display()))?;
    Ok((tempdir, dir))
}

/// The last `lines` lines of a (possibly large) log file; reads only its end.
pub(crate) fn tail_file(path: &Path, lines: usize) -> String {
    const MAX_BYTES: u64 = 64 * 1024;
    let Ok(mut f) = File::open(path) else {
        return format!("<no log at {}>", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(MAX_BYTES)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Live processes (not zombies) as `(pid, ppid, argv)`, read from `/proc`. Processes that
/// vanish while being read are skipped.
fn processes() -> Vec<(u32, u32, Vec<String>)> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may contain spaces and parens, so split after the
        // last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("");
        let ppid = fields.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if state == "Z" || state == "X" {
            continue;
        }
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let argv = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        out.push((pid, ppid, argv));
    }
    out
}

/// Peak resident memory of live process `pid` in bytes (`VmHWM` of its /proc status).
pub fn peak_rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM")?;
    Ok(kib << 10)
}

/// Pids of live processes with an argument that is, or lies under, `path` (e.g. containerd
/// started with a config in a dir, or a shim started with `-address <socket>`). Tests use it to
/// prove nothing of an instance survived.
pub fn processes_referencing(path: &Path) -> Vec<u32> {
    let me = std::process::id();
    processes()
        .into_iter()
        .filter(|(pid, _, argv)| *pid != me && argv.iter().any(|a| Path::new(a).starts_with(path)))
        .map(|(pid, _, _)| pid)
        .collect()
}

/// SIGKILLs every live process with an argument under `path`, together with all its
/// descendants (for a shim: the containers it supervises), and waits up to 2 s for them to die.
fn kill_processes_with_arg(path: &Path) {
    let procs = processes();
    let roots = processes_referencing(path);
    if roots.is_empty() {
        return;
    }
    let mut victims = roots.clone();
    let mut i = 0;
    while i < victims.len() {
        let parent = victims[i];
        for (pid, ppid, _) in &procs {
            if *ppid == parent && !victims.contains(pid) {
                victims.push(*pid);
            }
        }
        i += 1;
    }
    for pid in &victims {
        signal(*pid, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let alive: Vec<u32> = processes().into_iter().map(|(p, _, _)| p).collect();
        if victims.iter().all(|v| !alive.contains(v)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Existing cgroup directories at or under cgroup path `rel` (e.g. `/lade-x-123`), in every
/// mounted hierarchy (cgroup v1 controllers, v1 named/unified, or a pure v2 mount), deepest
/// first.
pub fn cgroup_dirs(rel: &str) -> Vec<PathBuf> {
    let rel = rel.trim_start_matches('/');
    if rel.is_empty() || rel.contains("..") {
        // Never walk a hierarchy's root: that would be every cgroup on the host.
        return Vec::new();
    }
    let base = Path::new("/sys/fs/cgroup");
    let mut tops = vec![base.join(rel)];
    if let Ok(entries) = fs::read_dir(base) {
        tops.extend(entries.flatten().map(|e| e.path().join(rel)));
    }
    let mut found = Vec::new();
    let mut stack: Vec<PathBuf> = tops.into_iter().filter(|p| p.is_dir()).collect();
    while let Some(dir) = stack.pop() {
        if let Ok(entries) = fs::read_dir(&dir) {
            stack.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
        found.push(dir);
    }
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// Removes the (by now empty) cgroup tree `rel` in every hierarchy. cgroup dirs are removed
/// with rmdir, which the kernel refuses while processes remain, so this cannot hurt anything
/// still running.
fn remove_cgroups(rel: &str) {
    for dir in cgroup_dirs(rel) {
        if let Err(e) = fs::remove_dir(&dir) {
            eprintln!("warning: rmdir cgroup {}: {e}", dir.display());
        }
    }
}

/// Mount points at or under `dir`, from `/proc/self/mountinfo`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mountinfo(field)))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        if let (b'\\', Some(digits)) = (bytes[i], octal) {
            let value = digits
                .iter()
                .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
            if let Ok(v) = u8::try_from(value) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Lazily unmounts (MNT_DETACH) everything mounted at or under `dir`, deepest first, repeating
/// for stacked mounts. Snapshot and shim rootfs mounts can outlive a killed containerd, and
/// `remove_dir_all` would otherwise fail on them (or worse, descend into a bind mount).
fn unmount_all_under(dir: &Path) {
    // Bounded: a mount that cannot be detached must not hang the drop.
    for _ in 0..8 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            return;
        }
        for m in mounts {
            let Ok(c) = CString::new(m.as_os_str().as_bytes()) else {
                continue;
            };
            // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
            let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            if rc != 0 {
                let err = std::io::Error::last_os_error();
                // EINVAL: already gone (an ancestor's detach took it along).
                if err.raw_os_error() != Some(libc::EINVAL) {
                    eprintln!("warning: umount {}: {err}", m.display());
                }
            }
        }
    }
    let left = mounts_under(dir);
    if !left.is_empty() {
        eprintln!("warning: still mounted under {}: {left:?}", dir.display());
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A docker-archive (`docker save` layout) with one layer holding `files`, tagged `tag`.
    /// Tiny on purpose: the real fixtures live in `fixtures`; this only feeds harness tests.
    pub(crate) fn tiny_docker_archive(tag: &str, files: &[(&str, &[u8], u32)]) -> Vec<u8> {
        use sha2::{Digest, Sha256};
        let mut layer = tar::Builder::new(Vec::new());
        for (path, data, mode) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(*mode);
            h.set_mtime(0);
            h.set_cksum();
            layer.append_data(&mut h, path, *data).unwrap();
        }
        let layer = layer.into_inner().unwrap();
        let layer_hex = hex::encode(Sha256::digest(&layer));
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        };
        let config = serde_json::json!({
            "architecture": arch,
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_hex}")]},
        })
        .to_string();
        let config_hex = hex::encode(Sha256::digest(config.as_bytes()));
        let manifest = serde_json::json!([{
            "Config": format!("{config_hex}.json"),
            "RepoTags": [tag],
            "Layers": [format!("{layer_hex}/layer.tar")],
        }])
        .to_string();
        let mut archive = tar::Builder::new(Vec::new());
        for (path, data) in [
            (format!("{layer_hex}/layer.tar"), layer.as_slice()),
            (format!("{config_hex}.json"), config.as_bytes()),
            ("manifest.json".to_string(), manifest.as_bytes()),
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_cksum();
            archive.append_data(&mut h, path, data).unwrap();
        }
        archive.into_inner().unwrap()
    }

    /// Asserts nothing of an instance survived its drop: dir, mounts, processes.
    pub(crate) fn assert_gone(dir: &Path) {
        assert!(!dir.exists(), "{} still exists after drop", dir.display());
        assert!(
            mounts_under(dir).is_empty(),
            "still mounted under {}: {:?}",
            dir.display(),
            mounts_under(dir)
        );
        assert!(
            processes_referencing(dir).is_empty(),
            "processes referencing {} survived: {:?}",
            dir.display(),
            processes_referencing(dir)
        );
    }

    /// Where containerd 1.6 puts the runc-v2 shim socket of task `ns/id` (hardcoded under the
    /// host's /run/containerd; only read here, to prove the drop guard lets it be removed).
    fn shim_socket(node: &Containerd, ns: &str, id: &str) -> PathBuf {
        use sha2::{Digest, Sha256};
        let key = format!("{}/{ns}/{id}", node.socket().display());
        Path::new("/run/containerd/s").join(hex::encode(Sha256::digest(key.as_bytes())))
    }

    #[test]
    fn mountinfo_octal_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(
            unescape_mountinfo(r"/tmp/back\134slash"),
            r"/tmp/back\slash"
        );
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/trailing\04"), r"/trailing\04");
    }

    #[test]
    fn free_port_is_bindable() {
        let port = free_port();
        assert_ne!(port, 0);
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("port from free_port binds");
    }

    #[test]
    fn child_guard_kills_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("sleep.log");
        let mut cmd = Command::new("sleep");
        cmd.arg("1000");
        let mut guard = ChildGuard::spawn(cmd, &log).unwrap();
        let pid = guard.pid();
        assert!(guard.is_running());
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        drop(guard);
        // Reaped by the guard, so the pid is gone entirely (not even a zombie).
        assert!(!Path::new(&format!("/proc/{pid}")).exists());

        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo to-log; echo to-err >&2"]);
        let mut guard = ChildGuard::spawn(cmd, &log).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while guard.is_running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(guard.try_exited().expect("sh exited").success());
        let text = fs::read_to_string(&log).unwrap();
        assert!(text.contains("to-log") && text.contains("to-err"), "{text}");
    }

    #[test]
    fn kill_processes_with_arg_takes_descendants_along() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("marker");
        // The shell mentions the dir (like a shim mentions its socket); its child does not.
        let mut shell = Command::new("sh")
            .arg("-c")
            .arg("sleep 1000 & wait; : \"$0\"")
            .arg(&marker)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let child = loop {
            let found = processes()
                .into_iter()
                .find(|(_, ppid, _)| *ppid == shell.id())
                .map(|(pid, _, _)| pid);
            if let Some(pid) = found {
                break pid;
            }
            assert!(Instant::now() < deadline, "sleep child never appeared");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(processes_referencing(dir.path()), vec![shell.id()]);

        kill_processes_with_arg(dir.path());
        assert!(shell.wait().is_ok());
        assert!(processes_referencing(dir.path()).is_empty());
        assert!(
            !processes().iter().any(|(pid, _, _)| *pid == child),
            "descendant {child} survived"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_private_containerds_run_side_by_side_and_clean_up() {
        if !daemon_tests_enabled() {
            return;
        }
        let (a, b) = tokio::join!(Containerd::start("node-a"), Containerd::start("node-b"));
        let mut a = a.unwrap_or_else(|e| panic!("start node-a: {e:#}"));
        let mut b = b.unwrap_or_else(|e| panic!("start node-b: {e:#}"));

        assert_ne!(a.dir(), b.dir());
        let mut uuids = Vec::new();
        for node in [&a, &b] {
            assert!(node.socket().starts_with(node.dir()));
            assert!(node.root().starts_with(node.dir()));
            assert!(node.root().join("io.containerd.metadata.v1.bolt").is_dir());
            if node.version().major >= 2 {
                // NRI, on by default since 2.0, listens in the instance's dir, not on the
                // host-wide /var/run/nri/nri.sock two instances would fight over.
                assert!(node.dir().join("nri.sock").exists(), "{}", node.log_tail());
            }

            let version = node.ctr_ok(&["version"]).unwrap();
            let uuid = version
                .lines()
                .find_map(|l| l.trim().strip_prefix("UUID:"))
                .unwrap_or_else(|| panic!("no server UUID in `ctr version`:\n{version}"))
                .trim()
                .to_string();
            uuids.push(uuid);

            let status = cri::image_status(&node.socket(), "docker.io/library/nothing:latest")
                .await
                .unwrap_or_else(|e| panic!("CRI on {}: {e:#}", node.name()));
            assert_eq!(status, None);
        }
        // Distinct server UUIDs: each socket really reaches its own daemon.
        assert_ne!(uuids[0], uuids[1]);

        let pids = [a.pid().unwrap(), b.pid().unwrap()];
        let dirs = [a.dir().to_path_buf(), b.dir().to_path_buf()];
        drop(a);
        drop(b);
        for pid in pids {
            assert!(
                !Path::new(&format!("/proc/{pid}")).exists(),
                "containerd pid {pid} still exists after drop"
            );
        }
        for dir in &dirs {
            assert_gone(dir);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kill_9_then_restart_keeps_state() {
        if !daemon_tests_enabled() {
            return;
        }
        let mut node = Containerd::start("restart").await.unwrap();
        node.ctr_ok(&["namespaces", "create", "lade-test"]).unwrap();
        let old_pid = node.pid().unwrap();

        node.kill_9();
        assert_eq!(node.pid(), None);
        assert!(!node.ctr(&["--timeout", "2s", "version"]).status.success());

        node.restart()
            .await
            .unwrap_or_else(|e| panic!("restart: {e:#}"));
        assert_ne!(node.pid(), Some(old_pid));
        let namespaces = node.ctr_ok(&["namespaces", "ls", "-q"]).unwrap();
        assert!(namespaces.lines().any(|l| l == "lade-test"), "{namespaces}");
        assert_eq!(
            cri::image_status(&node.socket(), "docker.io/library/nothing:latest")
                .await
                .unwrap(),
            None
        );
        // The log was appended across both runs, not truncated by the restart.
        let log = fs::read_to_string(node.log_path()).unwrap();
        assert_eq!(
            log.matches("containerd successfully booted").count(),
            2,
            "{log}"
        );

        let dir = node.dir().to_path_buf();
        drop(node);
        assert_gone(&dir);
    }

    /// A dockerd runs on its own containerd, loads and runs an image, and leaves nothing behind:
    /// not its dir, not its containerd's, no cgroup, no process.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dockerd_on_a_private_containerd_runs_a_container_and_cleans_up() {
        if !daemon_tests_enabled() {
            return;
        }
        let node = Dockerd::start("docker")
            .await
            .unwrap_or_else(|e| panic!("start dockerd: {e:#}"));
        let version = node
            .docker_ok(&["version", "--format", "{{.Server.APIVersion}}"])
            .unwrap();
        assert!(version.trim().starts_with("1."), "{version}");
        assert!(node.socket().starts_with(node.dir()));

        let busybox = fs::read("/bin/busybox")
            .expect("/bin/busybox (a static busybox) is needed: apt-get install -y busybox-static");
        let archive = node.dir().join("probe.tar");
        fs::write(
            &archive,
            tiny_docker_archive("lade-harness-probe:v1", &[("bin/busybox", &busybox, 0o755)]),
        )
        .unwrap();
        node.docker_ok(&["load", "-i", archive.to_str().unwrap()])
            .unwrap();
        let out = node
            .docker_ok(&[
                "run",
                "--rm",
                "--network",
                "none",
                "lade-harness-probe:v1",
                "/bin/busybox",
                "echo",
                "ok",
            ])
            .unwrap();
        assert_eq!(out.trim(), "ok");
        // A container still running at drop time is the guard's job.
        node.docker_ok(&[
            "run",
            "-d",
            "--network",
            "none",
            "lade-harness-probe:v1",
            "/bin/busybox",
            "sleep",
            "1000",
        ])
        .unwrap();
        assert!(!cgroup_dirs(&node.cgroup_parent()).is_empty());

        let dirs = [
            node.dir().to_path_buf(),
            node.containerd().dir().to_path_buf(),
        ];
        let cgroup_parent = node.cgroup_parent();
        drop(node);
        for dir in &dirs {
            assert_gone(dir);
        }
        let cgroups = cgroup_dirs(&cgroup_parent);
        assert!(cgroups.is_empty(), "cgroups left behind: {cgroups:?}");
    }

    /// Imports a busybox image into `node` and `ctr run`s `sleep 1000` as task `lade/probe`,
    /// keeping every host-global path private: fifo dir, runc root and cgroup. Returns the pid
    /// of the sleeping container process.
    fn run_probe_container(node: &Containerd) -> u32 {
        let busybox = fs::read("/bin/busybox")
            .expect("/bin/busybox (a static busybox) is needed: apt-get install -y busybox-static");
        let archive_path = node.dir().join("probe.tar");
        fs::write(
            &archive_path,
            tiny_docker_archive("lade-harness-probe:v1", &[("bin/busybox", &busybox, 0o755)]),
        )
        .unwrap();
        let archive = archive_path.to_str().unwrap();
        node.ctr_ok(&["-n", "lade", "images", "import", archive])
            .unwrap();
        let fifo_dir = node.dir().join("fifo");
        let runc_root = node.runc_root();
        let cgroup = format!("{}/probe", node.cgroup_parent());
        node.ctr_ok(&[
            "-n",
            "lade",
            "run",
            "-d",
            "--fifo-dir",
            fifo_dir.to_str().unwrap(),
            "--runc-root",
            runc_root.to_str().unwrap(),
            "--cgroup",
            &cgroup,
            "docker.io/library/lade-harness-probe:v1",
            "probe",
            "/bin/busybox",
            "sleep",
            "1000",
        ])
        .unwrap();

        let shims = processes_referencing(&node.socket());
        assert_eq!(shims.len(), 1, "expected one shim, got {shims:?}");
        assert!(
            !mounts_under(node.dir()).is_empty(),
            "container rootfs should be mounted under {}",
            node.dir().display()
        );
        assert!(
            !cgroup_dirs(&node.cgroup_parent()).is_empty(),
            "container cgroup {cgroup} missing"
        );
        // `ctr run -d` returns once the task is started, possibly before runc's init has
        // exec'd the command line we look for.
        for _ in 0..250 {
            let sleeper = processes()
                .into_iter()
                .find(|(_, ppid, argv)| *ppid == shims[0] && argv.iter().any(|a| a == "sleep"));
            if let Some((pid, _, _)) = sleeper {
                return pid;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("container process never showed up as a child of the shim");
    }

    /// Asserts the probe container and every trace of it outside the dir are gone.
    fn assert_probe_gone(sleeper: u32, shim_socket: &Path, cgroup_parent: &str) {
        let alive = processes().iter().any(|(pid, _, _)| *pid == sleeper);
        assert!(!alive, "container process {sleeper} survived");
        assert!(
            !shim_socket.exists(),
            "{} left behind",
            shim_socket.display()
        );
        let cgroups = cgroup_dirs(cgroup_parent);
        assert!(cgroups.is_empty(), "cgroups left behind: {cgroups:?}");
    }

    /// The hard part of the drop guard: a running container (shim + process + overlay rootfs
    /// mount + cgroup) whose containerd was SIGKILLed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drop_cleans_up_running_container_after_crash() {
        if !daemon_tests_enabled() {
            return;
        }
        let mut node = Containerd::start("crash").await.unwrap();
        let sleeper = run_probe_container(&node);
        let shim_socket = shim_socket(&node, "lade", "probe");
        assert!(shim_socket.exists(), "{} missing", shim_socket.display());
        let (dir, cgroup_parent) = (node.dir().to_path_buf(), node.cgroup_parent());

        node.kill_9();
        drop(node);
        assert_gone(&dir);
        assert_probe_gone(sleeper, &shim_socket, &cgroup_parent);
    }

    /// The graceful path: containerd still runs at drop, so tasks are deleted through it and
    /// the shim exits on its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drop_deletes_running_tasks_gracefully() {
        if !daemon_tests_enabled() {
            return;
        }
        let node = Containerd::start("graceful").await.unwrap();
        let sleeper = run_probe_container(&node);
        let tasks = node.ctr_ok(&["-n", "lade", "tasks", "ls", "-q"]).unwrap();
        assert_eq!(tasks.trim(), "probe");
        let shim_socket = shim_socket(&node, "lade", "probe");
        assert!(shim_socket.exists(), "{} missing", shim_socket.display());
        let (dir, cgroup_parent) = (node.dir().to_path_buf(), node.cgroup_parent());

        drop(node);
        assert_gone(&dir);
        assert_probe_gone(sleeper, &shim_socket, &cgroup_parent);
    }
}
