//! A private container registry for tests: Debian's `docker-registry` (distribution 2.8) on a
//! free 127.0.0.1 port, its storage, config, log and optional htpasswd file, token server
//! ([`crate::token`]) and TLS material in its own temp dir.
//!
//! [`Registry::start`] returns once the registry accepts connections; dropping the value
//! kills it and removes the dir. [`Registry::kill_9`] and [`Registry::restart`] simulate a
//! crash and a restart on the same port and storage, for interrupted-push tests.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tempfile::TempDir;

use crate::certs::make_certs;
use crate::harness::{free_port, require_binary, tail_file, ChildGuard, LOG_TAIL_LINES};
use crate::token::{TokenServer, ISSUER, SERVICE};

/// How long [`Registry::start`] waits for the port to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// What the registry requires of its clients.
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions {
    /// Only this user, with this password, may push and pull: checked by the registry
    /// itself (htpasswd, HTTP basic), or with `token_server` by a [`TokenServer`] (bearer
    /// tokens, as Harbor does).
    pub login: Option<(String, String)>,
    pub token_server: bool,
    /// HTTPS with a certificate for 127.0.0.1 signed by a CA made for this registry
    /// ([`Registry::ca_file`]).
    pub tls: bool,
}

/// A running `docker-registry`; killed and its dir removed on drop.
pub struct Registry {
    // Declared before `dir`, so it is dropped first: the process dies before its storage goes.
    process: Option<ChildGuard>,
    token: Option<TokenServer>,
    dir: TempDir,
    port: u16,
    options: RegistryOptions,
    binary: PathBuf,
}

impl Registry {
    /// Writes the config (and htpasswd file and certificates as `options` ask), starts the
    /// registry on a free port and waits until it accepts connections.
    pub async fn start(options: RegistryOptions) -> Result<Registry> {
        let binary = require_binary("docker-registry")?;
        let dir = tempfile::Builder::new()
            .prefix("lade-registry-")
            .tempdir()
            .context("creating the registry's temp dir")?;
        let mut registry = Registry {
            process: None,
            token: None,
            dir,
            port: free_port(),
            options,
            binary,
        };
        std::fs::create_dir(registry.storage())?;
        match &registry.options.login {
            Some((user, password)) if registry.options.token_server => {
                registry.token = Some(TokenServer::start(registry.dir.path(), user, password)?);
            }
            Some((user, password)) => {
                require_binary("htpasswd")?;
                // distribution reads bcrypt entries only.
                let out = Command::new("htpasswd")
                    .args(["-Bbn", user, password])
                    .output()
                    .context("running htpasswd")?;
                ensure!(
                    out.status.success(),
                    "htpasswd failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                std::fs::write(registry.dir.path().join("htpasswd"), out.stdout)?;
            }
            None => {}
        }
        if registry.options.tls {
            make_certs(
                registry.dir.path(),
                &[(
                    "server",
                    "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth",
                )],
            )?;
        }
        std::fs::write(registry.config_path(), registry.config())?;
        registry.spawn_and_wait().await?;
        Ok(registry)
    }

    /// `127.0.0.1:<port>`, the registry host clients name.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The CA certificate (PEM) of a TLS registry.
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.options.tls.then(|| self.dir.path().join("ca.crt"))
    }

    /// Where the registry keeps blobs and repositories.
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// The registry's log (appended across restarts).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    /// SIGKILLs the registry, like a crash: uploads in flight are cut off.
    pub fn kill_9(&mut self) {
        if let Some(p) = &mut self.process {
            p.kill_9();
        }
    }

    /// Starts the registry again on the same port, storage and config.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill_9();
        self.spawn_and_wait().await
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.yml")
    }

    fn config(&self) -> String {
        let d = self.dir.path().display();
        let mut config = format!(
            "version: 0.1\n\
             log:\n  level: info\n\
             storage:\n  filesystem:\n    rootdirectory: {d}/storage\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{}\n",
            self.port
        );
        if self.options.tls {
            config.push_str(&format!(
                "  tls:\n    certificate: {d}/server.crt\n    key: {d}/server.key\n"
            ));
        }
        match &self.token {
            Some(token) => config.push_str(&format!(
                "auth:\n  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
                token.realm(),
                token.certificate().display()
            )),
            None if self.options.login.is_some() => config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: lade-test\n    path: {d}/htpasswd\n"
            )),
            None => {}
        }
        config
    }

    async fn spawn_and_wait(&mut self) -> Result<()> {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("serve").arg(self.config_path());
        self.process = Some(ChildGuard::spawn(cmd, &self.log_path())?);
        let started = Instant::now();
        loop {
            if let Some(status) = self.process.as_mut().and_then(ChildGuard::try_exited) {
                bail!(
                    "docker-registry exited during startup ({status}); log:\n{}",
                    tail_file(&self.log_path(), LOG_TAIL_LINES)
                );
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!(
                    "docker-registry not listening on {} after {READY_TIMEOUT:?}; log:\n{}",
                    self.host(),
                    tail_file(&self.log_path(), LOG_TAIL_LINES)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
