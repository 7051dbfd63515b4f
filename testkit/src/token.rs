//! A token server for a test registry's bearer authentication, the scheme Harbor and most
//! hosted registries use: the registry answers `401` with `WWW-Authenticate: Bearer
//! realm=…,service=…`, the client asks the realm for a token with its login (HTTP basic) and
//! the scopes it needs, and presents the token to the registry.
//!
//! [`TokenServer::start`] makes a P-256 signing key (ring) and a certificate for it (openssl),
//! which distribution's `auth.token.rootcertbundle` trusts, and serves `GET /token` on a
//! 127.0.0.1 port from a thread: a right login gets an ES256 JWT granting every scope asked
//! for, a wrong or missing one `401`. Distribution finds the signing key by the token's
//! `kid`, the libtrust key ID of the certificate's public key.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, ensure, Context, Result};
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::require::require_binary;

/// The `service` (JWT audience) the registry is configured with.
pub const SERVICE: &str = "lade-test-registry";
/// The token issuer the registry is configured with.
pub const ISSUER: &str = "lade-test-token-server";

/// A running token server; stopped on drop.
pub struct TokenServer {
    port: u16,
    certificate: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TokenServer {
    /// Makes the key and certificate in `dir` and serves tokens to `user` with `password`.
    pub fn start(dir: &Path, user: &str, password: &str) -> Result<TokenServer> {
        require_binary("openssl")?;
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| anyhow!("generating the token signing key"))?;
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|e| anyhow!("reading the token signing key: {e}"))?;
        let key_path = dir.join("token.key");
        std::fs::write(&key_path, pem("PRIVATE KEY", pkcs8.as_ref()))?;
        let certificate = dir.join("token.crt");
        let out = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-days",
                "2",
                "-subj",
                "/CN=lade-test-token",
                "-key",
            ])
            .arg(&key_path)
            .arg("-out")
            .arg(&certificate)
            .output()
            .context("running openssl")?;
        ensure!(
            out.status.success(),
            "openssl req: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let spki = Command::new("openssl")
            .args(["pkey", "-pubout", "-outform", "DER", "-in"])
            .arg(&key_path)
            .output()
            .context("running openssl")?;
        ensure!(spki.status.success(), "openssl pkey failed");
        let signer = Signer {
            key,
            rng,
            kid: libtrust_key_id(&spki.stdout),
            login: format!("{user}:{password}"),
            user: user.to_string(),
        };

        let listener = TcpListener::bind(("127.0.0.1", 0)).context("binding the token server")?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(stream) = stream {
                    // A broken request only fails that request.
                    let _ = signer.answer(stream);
                }
            }
        });
        Ok(TokenServer {
            port,
            certificate,
            stop,
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:<port>/token`, the realm the registry sends clients to.
    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    /// The certificate of the signing key, for `rootcertbundle`.
    pub fn certificate(&self) -> &Path {
        &self.certificate
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Signer {
    key: EcdsaKeyPair,
    rng: SystemRandom,
    kid: String,
    login: String,
    user: String,
}

impl Signer {
    fn answer(&self, stream: TcpStream) -> Result<()> {
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut request = String::new();
        reader.read_line(&mut request)?;
        let mut authorization = None;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("authorization") {
                    authorization = Some(value.trim().to_string());
                }
            }
        }
        let target = request.split_whitespace().nth(1).unwrap_or_default();
        let query = target.split_once('?').map(|(_, q)| q).unwrap_or_default();
        let scopes: Vec<String> = query
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .filter(|(key, _)| *key == "scope")
            .map(|(_, value)| percent_decode(value))
            .collect();
        let given = authorization
            .as_deref()
            .and_then(|a| a.strip_prefix("Basic "))
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok());
        let mut stream = stream;
        if given.as_deref() != Some(self.login.as_bytes()) {
            let body = r#"{"details":"incorrect username or password"}"#;
            write!(
                stream,
                "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )?;
            return Ok(());
        }
        let body = json!({ "token": self.token(&scopes)? }).to_string();
        write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        Ok(())
    }

    /// An ES256 JWT granting every scope asked for (`repository:NAME:ACTIONS`).
    fn token(&self, scopes: &[String]) -> Result<String> {
        let access: Vec<_> = scopes
            .iter()
            .filter_map(|scope| {
                let (kind, rest) = scope.split_once(':')?;
                let (name, actions) = rest.rsplit_once(':')?;
                Some(json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
            })
            .collect();
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let header = json!({"typ": "JWT", "alg": "ES256", "kid": self.kid});
        let claims = json!({
            "iss": ISSUER,
            "sub": self.user,
            "aud": SERVICE,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": format!("{now}-{}", scopes.len()),
            "access": access,
        });
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let signed = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let signature = self
            .key
            .sign(&self.rng, signed.as_bytes())
            .map_err(|_| anyhow!("signing a token"))?;
        Ok(format!("{signed}.{}", b64(signature.as_ref())))
    }
}

/// libtrust's key ID: the first 240 bits of the SHA-256 of the DER public key, base32, in
/// groups of four joined by `:`.
fn libtrust_key_id(spki_der: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let hash = Sha256::digest(spki_der);
    let mut bits = 0u64;
    let mut held = 0;
    let mut encoded = String::new();
    for byte in &hash[..30] {
        bits = (bits << 8) | u64::from(*byte);
        held += 8;
        while held >= 5 {
            held -= 5;
            encoded.push(ALPHABET[((bits >> held) & 31) as usize] as char);
        }
    }
    let groups: Vec<&str> = (0..encoded.len())
        .step_by(4)
        .map(|i| &encoded[i..i + 4])
        .collect();
    groups.join(":")
}

fn pem(label: &str, der: &[u8]) -> String {
    let text = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = (0..text.len())
        .step_by(64)
        .map(|i| &text[i..(i + 64).min(text.len())])
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// `%XX` escapes and `+` of a query value decoded.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => match text.get(i + 1..i + 3).map(|h| u8::from_str_radix(h, 16)) {
                Some(Ok(b)) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_are_grouped_base32() {
        let id = libtrust_key_id(b"any key");
        assert_eq!(id.len(), 12 * 4 + 11, "{id}");
        assert!(id.split(':').all(|g| g.len() == 4), "{id}");
    }

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            percent_decode("repository%3Aoffline%2Fdemo%2Fapp%3Apull%2Cpush"),
            "repository:offline/demo/app:pull,push"
        );
        assert_eq!(percent_decode("a%2"), "a%2");
    }
}
