//! Throwaway TLS material for tests: a CA and certificates signed by it, made with the
//! `openssl` CLI in a directory the test owns.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Result};

use crate::require::require_binary;

/// Writes `ca.crt`/`ca.key`, then for each `(name, extensions)` `<name>.crt`/`<name>.key`
/// signed by that CA (P-256 keys, valid 2 days). `extensions` is an openssl extension file's
/// body, e.g. `subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth`.
pub fn make_certs(dir: &Path, certs: &[(&str, &str)]) -> Result<()> {
    require_binary("openssl")?;
    let sh = |script: &str| -> Result<()> {
        let out = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(dir)
            .output()?;
        ensure!(
            out.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    sh(
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -subj /CN=lade-test-ca -keyout ca.key -out ca.crt",
    )?;
    for (name, ext) in certs {
        std::fs::write(dir.join(format!("{name}.ext")), ext)?;
        sh(&format!(
            "openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN={name} \
             -keyout {name}.key -out {name}.csr && \
             openssl x509 -req -in {name}.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
             -extfile {name}.ext -out {name}.crt"
        ))?;
    }
    Ok(())
}
