//! The OCI distribution API, as much of it as `lade push` and the upgrade preflight need:
//! version check and login, blob `HEAD`, uploads (with cross-repository mount), manifest
//! `HEAD` and `PUT`.
//!
//! This module owns the HTTP protocol: the scheme (HTTPS, verified against the system roots
//! and `--ca-file`; with `--insecure` unverified HTTPS, else plain HTTP, as Docker treats an
//! insecure registry), authentication (HTTP basic, or bearer tokens from the realm a
//! `WWW-Authenticate` challenge names, one per scope, fetched with the login when there is
//! one) and the registry's error bodies. Credentials go only where the registry is: a
//! redirect or an upload `Location` on another origin (scheme, host, port) is refused, and a
//! token realm gets the login only over verified HTTPS, or on the registry's own host when
//! the registry is `--insecure` (see [`Registry::check_realm`]). It does not own what is pushed, in which order, or
//! where bytes come from: an upload's body is handed in ready to stream.
//!
//! Blobs are uploaded monolithically: `POST` opens the upload, one streamed `PUT ?digest=`
//! closes it, and the registry verifies the digest. An upload cut off (a registry restart,
//! a network drop) is not resumed: the blob is uploaded again by the next run, which skips
//! every blob that arrived whole.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use reqwest::header::{HeaderMap, ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use reqwest::{RequestBuilder, Response, StatusCode};
use tokio::sync::Mutex;

use lade_oci::{
    MEDIA_TYPE_DOCKER_LIST, MEDIA_TYPE_DOCKER_MANIFEST, MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_OCI_MANIFEST,
};

/// Give up connecting to the registry after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Give up on a registry that sends nothing for this long (a whole upload may take hours;
/// a silent minute means the registry is gone).
const READ_TIMEOUT: Duration = Duration::from_secs(120);

/// Every manifest type lade pushes or checks. Registries answer a manifest request in a type
/// the client accepts, so all of them are always listed (distribution would otherwise
/// convert a Docker schema 2 manifest to schema 1, with another digest).
const MANIFEST_ACCEPT: [&str; 4] = [
    MEDIA_TYPE_OCI_MANIFEST,
    MEDIA_TYPE_OCI_INDEX,
    MEDIA_TYPE_DOCKER_MANIFEST,
    MEDIA_TYPE_DOCKER_LIST,
];

/// What can go wrong talking to a registry, naming the registry and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot reach registry {registry}: {reason}")]
    Unreachable { registry: String, reason: String },
    #[error("registry {registry} refused the login of {user:?}: wrong username or password")]
    BadLogin { registry: String, user: String },
    #[error(
        "registry {registry} requires a login: pass --username and --password-stdin, or run \
         `docker login {registry}` (lade reads the docker config's credentials)"
    )]
    LoginRequired { registry: String },
    #[error("registry {registry}: {what}: HTTP {status}{detail}")]
    Status {
        registry: String,
        what: String,
        status: u16,
        /// The registry's own error codes and messages, if it sent any.
        detail: String,
    },
    #[error("registry {registry}: {what}: {reason}")]
    Transport {
        registry: String,
        what: String,
        reason: String,
    },
    #[error("registry {registry}: {what}: {problem}")]
    Protocol {
        registry: String,
        what: String,
        problem: String,
    },
    #[error("registry {registry}: refusing to send the login to token realm {realm}: {reason}")]
    UnsafeRealm {
        registry: String,
        realm: String,
        reason: String,
    },
    #[error("{}: {what}: {source}", path.display())]
    File {
        path: PathBuf,
        what: String,
        source: std::io::Error,
    },
}

/// A registry login: a user name and its password (or token).
#[derive(Clone, PartialEq, Eq)]
pub struct Login {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Login {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Login")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// How the registry's identity is checked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Tls {
    /// HTTPS, verified against the system's roots and, if given, a CA file (PEM).
    #[default]
    System,
    CaFile(PathBuf),
    /// HTTPS without verifying the certificate, or plain HTTP when the registry does not
    /// speak TLS (Docker's "insecure registry").
    Insecure,
}

/// How to reach a registry and prove who is asking.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// Without one, requests are anonymous.
    pub login: Option<Login>,
    pub tls: Tls,
}

/// How the registry wants to be authenticated, from its `/v2/` challenge.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Challenge {
    None,
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

/// A connection to one registry, authenticated as [`Access`] says. Cheap to share: every
/// method takes `&self`.
pub struct Registry {
    http: reqwest::Client,
    host: String,
    /// `https://HOST` or, for an insecure registry without TLS, `http://HOST`.
    base: String,
    login: Option<Login>,
    /// Whether the registry's certificate is verified (not `--insecure`).
    verified: bool,
    challenge: Challenge,
    /// Bearer tokens by scope list.
    tokens: Mutex<HashMap<String, String>>,
}

/// What starting an upload did.
#[derive(Debug, PartialEq, Eq)]
pub enum Upload {
    /// The registry linked the blob from the other repository: nothing to send.
    Mounted,
    /// An upload session, at this URL.
    Session(String),
}

impl Registry {
    /// Connects to `host` (`HOST[:PORT]`): checks that it speaks the distribution API and
    /// that the login, if any, is accepted. Nothing is written.
    pub async fn connect(host: &str, access: &Access) -> Result<Registry, RegistryError> {
        let http = client(host, &access.tls)?;
        let mut registry = Registry {
            http,
            host: host.to_string(),
            base: format!("https://{host}"),
            login: access.login.clone(),
            verified: access.tls != Tls::Insecure,
            challenge: Challenge::None,
            tokens: Mutex::new(HashMap::new()),
        };
        let answer = match registry.ping().await {
            Ok(answer) => answer,
            // Docker's rule for an insecure registry: HTTPS if it answers, else plain HTTP.
            Err(https) if access.tls == Tls::Insecure => {
                registry.base = format!("http://{host}");
                registry.ping().await.map_err(|http| {
                    unreachable(host, format!("over HTTPS: {https}; over HTTP: {http}"))
                })?
            }
            Err(e) => return Err(unreachable(host, e)),
        };
        registry.challenge = match answer.status() {
            StatusCode::UNAUTHORIZED => parse_challenge(answer.headers()).ok_or_else(|| {
                registry.protocol(
                    "/v2/",
                    "answered 401 without a usable WWW-Authenticate challenge",
                )
            })?,
            status if status.is_success() => Challenge::None,
            status => {
                return Err(registry
                    .status_error("/v2/ (API version check)", status, answer)
                    .await)
            }
        };
        registry.check_login().await?;
        Ok(registry)
    }

    /// `HOST[:PORT]`, as image names spell it.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Whether `repository` holds blob `digest`.
    pub async fn has_blob(&self, repository: &str, digest: &str) -> Result<bool, RegistryError> {
        let what = format!("checking blob {digest} in {repository}");
        let url = format!("{}/v2/{repository}/blobs/{digest}", self.base);
        let scopes = [pull(repository)];
        let answer = self.send(&what, &scopes, || self.http.head(&url)).await?;
        match answer.status() {
            status if status.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            status => Err(self.status_error(&what, status, answer).await),
        }
    }

    /// Opens an upload of `digest` into `repository`; with `mount_from`, asks the registry to
    /// link the blob from that repository instead (it falls back to an upload session when
    /// it cannot).
    pub async fn start_upload(
        &self,
        repository: &str,
        digest: &str,
        mount_from: Option<&str>,
    ) -> Result<Upload, RegistryError> {
        let what = match mount_from {
            Some(from) => format!("mounting blob {digest} from {from} into {repository}"),
            None => format!("starting the upload of blob {digest} to {repository}"),
        };
        let mut url = format!("{}/v2/{repository}/blobs/uploads/", self.base);
        let mut scopes = vec![push(repository)];
        if let Some(from) = mount_from {
            url.push_str(&format!("?mount={digest}&from={from}"));
            scopes.push(pull(from));
        }
        let answer = self
            .send(&what, &scopes, || {
                self.http.post(&url).header(CONTENT_LENGTH, 0)
            })
            .await?;
        match answer.status() {
            StatusCode::CREATED if mount_from.is_some() => Ok(Upload::Mounted),
            StatusCode::ACCEPTED => Ok(Upload::Session(self.location(&what, &answer)?)),
            status => Err(self.status_error(&what, status, answer).await),
        }
    }

    /// Closes upload `session` with the whole blob: `size` bytes streamed from `body`. The
    /// registry checks them against `digest` before the blob exists.
    pub async fn finish_upload(
        &self,
        repository: &str,
        session: &str,
        digest: &str,
        size: u64,
        body: reqwest::Body,
    ) -> Result<(), RegistryError> {
        let what = format!("uploading blob {digest} to {repository}");
        let separator = if session.contains('?') { '&' } else { '?' };
        let url = format!("{session}{separator}digest={digest}");
        // The body streams once: it cannot be sent again after an authentication retry, so
        // the token is the one `start_upload` just used.
        let request = self
            .authorize(&[push(repository)], false)
            .await?
            .apply(self.http.put(&url))
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(CONTENT_LENGTH, size)
            .body(body);
        let answer = request
            .send()
            .await
            .map_err(|e| self.transport(&what, &e))?;
        match answer.status() {
            StatusCode::CREATED => Ok(()),
            status => Err(self.status_error(&what, status, answer).await),
        }
    }

    /// The digest `repository:reference` (a tag or a digest) points at, or `None` when there
    /// is no such manifest.
    pub async fn manifest_digest(
        &self,
        repository: &str,
        reference: &str,
    ) -> Result<Option<String>, RegistryError> {
        let what = format!("checking manifest {repository}:{reference}");
        let url = format!("{}/v2/{repository}/manifests/{reference}", self.base);
        let scopes = [pull(repository)];
        let answer = self
            .send(&what, &scopes, || {
                self.http
                    .head(&url)
                    .header(ACCEPT, MANIFEST_ACCEPT.join(", "))
            })
            .await?;
        match answer.status() {
            StatusCode::NOT_FOUND => return Ok(None),
            status if status.is_success() => {}
            status => return Err(self.status_error(&what, status, answer).await),
        }
        if let Some(digest) = header(&answer, "docker-content-digest") {
            return Ok(Some(digest));
        }
        // The header is optional in the specification: hash the manifest itself.
        let answer = self
            .send(&what, &scopes, || {
                self.http
                    .get(&url)
                    .header(ACCEPT, MANIFEST_ACCEPT.join(", "))
            })
            .await?;
        let bytes = answer
            .bytes()
            .await
            .map_err(|e| self.transport(&what, &e))?;
        Ok(Some(lade_oci::sha256_digest(&bytes)))
    }

    /// Stores manifest `bytes` of `media_type` as `repository:reference` (a tag, or the
    /// manifest's digest). Every blob and child manifest it names must be in `repository`.
    pub async fn put_manifest(
        &self,
        repository: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<(), RegistryError> {
        let what = format!("storing manifest {repository}:{reference}");
        let url = format!("{}/v2/{repository}/manifests/{reference}", self.base);
        let scopes = [push(repository)];
        let answer = self
            .send(&what, &scopes, || {
                self.http
                    .put(&url)
                    .header(CONTENT_TYPE, media_type)
                    .body(bytes.to_vec())
            })
            .await?;
        let expected = lade_oci::sha256_digest(bytes);
        match answer.status() {
            StatusCode::CREATED => match header(&answer, "docker-content-digest") {
                Some(stored) if stored != expected => Err(self.protocol(
                    &what,
                    format!(
                        "the registry stored digest {stored}, but the manifest's is {expected}"
                    ),
                )),
                _ => Ok(()),
            },
            status => Err(self.status_error(&what, status, answer).await),
        }
    }

    /// `GET /v2/`: the version check, which also says how to authenticate.
    async fn ping(&self) -> Result<Response, String> {
        self.http
            .get(format!("{}/v2/", self.base))
            .send()
            .await
            .map_err(|e| error_chain(&e))
    }

    /// Proves the login before anything else runs, so a wrong password stops the push
    /// before a byte is sent.
    async fn check_login(&self) -> Result<(), RegistryError> {
        let Some(login) = &self.login else {
            return match self.challenge {
                Challenge::Basic => Err(RegistryError::LoginRequired {
                    registry: self.host.clone(),
                }),
                // Bearer registries hand out anonymous tokens for public repositories.
                _ => Ok(()),
            };
        };
        let what = "logging in";
        let answer = match &self.challenge {
            Challenge::None => return Ok(()),
            Challenge::Basic => self
                .http
                .get(format!("{}/v2/", self.base))
                .basic_auth(&login.username, Some(&login.password))
                .send()
                .await
                .map_err(|e| self.transport(what, &e))?,
            // A token without scope is what `docker login` asks for.
            Challenge::Bearer { .. } => self
                .token_request(&[])?
                .send()
                .await
                .map_err(|e| self.transport(what, &e))?,
        };
        match answer.status() {
            status if status.is_success() => Ok(()),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(RegistryError::BadLogin {
                registry: self.host.clone(),
                user: login.username.clone(),
            }),
            status => Err(self.status_error(what, status, answer).await),
        }
    }

    /// Sends the request `build` makes, authenticated for `scopes`; when a cached token was
    /// refused (it expired), fetches a new one and sends the request once more.
    async fn send(
        &self,
        what: &str,
        scopes: &[String],
        build: impl Fn() -> RequestBuilder,
    ) -> Result<Response, RegistryError> {
        for renew in [false, true] {
            let auth = self.authorize(scopes, renew).await?;
            let answer = auth
                .apply(build())
                .send()
                .await
                .map_err(|e| self.transport(what, &e))?;
            if answer.status() != StatusCode::UNAUTHORIZED || renew || !auth.is_token() {
                return match answer.status() {
                    StatusCode::UNAUTHORIZED => Err(self.refused(what, answer).await),
                    _ => Ok(answer),
                };
            }
        }
        unreachable!("the second attempt always returns")
    }

    /// The credentials a request for `scopes` carries; `renew` fetches a fresh token.
    async fn authorize(&self, scopes: &[String], renew: bool) -> Result<Auth, RegistryError> {
        match &self.challenge {
            Challenge::None => Ok(Auth::None),
            Challenge::Basic => Ok(match &self.login {
                Some(login) => Auth::Basic(login.clone()),
                None => Auth::None,
            }),
            Challenge::Bearer { .. } => {
                let key = scopes.join(" ");
                let mut tokens = self.tokens.lock().await;
                if !renew {
                    if let Some(token) = tokens.get(&key) {
                        return Ok(Auth::Bearer(token.clone()));
                    }
                }
                let token = self.fetch_token(scopes).await?;
                tokens.insert(key, token.clone());
                Ok(Auth::Bearer(token))
            }
        }
    }

    fn token_request(&self, scopes: &[String]) -> Result<RequestBuilder, RegistryError> {
        let Challenge::Bearer { realm, service } = &self.challenge else {
            unreachable!("tokens are asked for only after a bearer challenge")
        };
        let mut query: Vec<(&str, &str)> = scopes.iter().map(|s| ("scope", s.as_str())).collect();
        if let Some(service) = service {
            query.push(("service", service));
        }
        let mut request = self.http.get(realm).query(&query);
        if let Some(login) = &self.login {
            self.check_realm(realm)?;
            request = request.basic_auth(&login.username, Some(&login.password));
        }
        Ok(request)
    }

    /// Whether the login may go to token `realm`: over HTTPS when the registry's own
    /// certificate is verified (its challenge, which names the realm, then cannot have been
    /// forged); otherwise only to the registry's own host, which `--insecure` named.
    fn check_realm(&self, realm: &str) -> Result<(), RegistryError> {
        let refuse = |why: &str| {
            Err(RegistryError::UnsafeRealm {
                registry: self.host.clone(),
                realm: realm.to_string(),
                reason: why.to_string(),
            })
        };
        let Ok(url) = reqwest::Url::parse(realm) else {
            return refuse("it is not a URL");
        };
        let own_host = reqwest::Url::parse(&self.base)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string));
        let same_host = url.host_str().is_some() && url.host_str() == own_host.as_deref();
        match url.scheme() {
            "https" if self.verified || same_host => Ok(()),
            "http" if !self.verified && same_host => Ok(()),
            "https" => refuse(
                "the registry is --insecure, so its challenge may be forged: the login goes \
                 only to a realm on the registry's own host",
            ),
            "http" => refuse(
                "it is plain HTTP: the login goes over HTTP only to an --insecure registry's \
                 own host",
            ),
            _ => refuse("it is neither HTTPS nor HTTP"),
        }
    }

    async fn fetch_token(&self, scopes: &[String]) -> Result<String, RegistryError> {
        #[derive(serde::Deserialize)]
        struct TokenAnswer {
            token: Option<String>,
            access_token: Option<String>,
        }
        let what = format!("getting a token for {}", scopes.join(", "));
        let answer = self
            .token_request(scopes)?
            .send()
            .await
            .map_err(|e| self.transport(&what, &e))?;
        match answer.status() {
            status if status.is_success() => {}
            StatusCode::UNAUTHORIZED => return Err(self.refused(&what, answer).await),
            status => return Err(self.status_error(&what, status, answer).await),
        }
        let bytes = answer
            .bytes()
            .await
            .map_err(|e| self.transport(&what, &e))?;
        let body: TokenAnswer = serde_json::from_slice(&bytes)
            .map_err(|e| self.protocol(&what, format!("the token answer is not JSON: {e}")))?;
        body.token
            .or(body.access_token)
            .ok_or_else(|| self.protocol(&what, "the token answer holds no token"))
    }

    /// The error for a 401: without a login, the registry wants one; with one, it is wrong
    /// (or lacks the right; the registry's message says which).
    async fn refused(&self, what: &str, answer: Response) -> RegistryError {
        match &self.login {
            None => RegistryError::LoginRequired {
                registry: self.host.clone(),
            },
            Some(_) => {
                self.status_error(what, StatusCode::UNAUTHORIZED, answer)
                    .await
            }
        }
    }

    /// The upload URL an answer points at, made absolute.
    fn location(&self, what: &str, answer: &Response) -> Result<String, RegistryError> {
        let location = header(answer, LOCATION.as_str())
            .ok_or_else(|| self.protocol(what, "the answer has no Location"))?;
        if location.starts_with("http://") || location.starts_with("https://") {
            let base = reqwest::Url::parse(&self.base).ok();
            let url = reqwest::Url::parse(&location).ok();
            match (base, url) {
                (Some(base), Some(url)) if same_origin(&base, &url) => Ok(location),
                _ => Err(self.protocol(
                    what,
                    format!(
                        "the upload Location {location} is not on {}: lade sends the \
                         registry's credentials nowhere else",
                        self.base
                    ),
                )),
            }
        } else {
            Ok(format!(
                "{}/{}",
                self.base,
                location.trim_start_matches('/')
            ))
        }
    }

    async fn status_error(
        &self,
        what: &str,
        status: StatusCode,
        answer: Response,
    ) -> RegistryError {
        let body = answer.bytes().await.unwrap_or_default();
        RegistryError::Status {
            registry: self.host.clone(),
            what: what.to_string(),
            status: status.as_u16(),
            detail: error_detail(&body),
        }
    }

    fn transport(&self, what: &str, e: &reqwest::Error) -> RegistryError {
        RegistryError::Transport {
            registry: self.host.clone(),
            what: what.to_string(),
            reason: error_chain(e),
        }
    }

    fn protocol(&self, what: &str, problem: impl Into<String>) -> RegistryError {
        RegistryError::Protocol {
            registry: self.host.clone(),
            what: what.to_string(),
            problem: problem.into(),
        }
    }
}

/// Credentials attached to one request.
enum Auth {
    None,
    Basic(Login),
    Bearer(String),
}

impl Auth {
    fn apply(&self, request: RequestBuilder) -> RequestBuilder {
        match self {
            Auth::None => request,
            Auth::Basic(login) => request.basic_auth(&login.username, Some(&login.password)),
            Auth::Bearer(token) => request.bearer_auth(token),
        }
    }

    fn is_token(&self) -> bool {
        matches!(self, Auth::Bearer(_))
    }
}

fn pull(repository: &str) -> String {
    format!("repository:{repository}:pull")
}

fn push(repository: &str) -> String {
    format!("repository:{repository}:pull,push")
}

/// Same scheme, host and port: where a request's credentials may follow.
fn same_origin(a: &reqwest::Url, b: &reqwest::Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// Redirects are followed only on the same origin, so a request's `Authorization` never
/// reaches another host or goes from HTTPS to HTTP; any other redirect fails the request.
fn redirect_policy() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let previous = attempt.previous().last().cloned();
        match previous {
            _ if attempt.previous().len() > 10 => attempt.error("more than 10 redirects"),
            Some(previous) if !same_origin(&previous, attempt.url()) => {
                let error = format!(
                    "refusing the redirect from {previous} to {}: another scheme, host or port",
                    attempt.url()
                );
                attempt.error(error)
            }
            _ => attempt.follow(),
        }
    })
}

fn client(host: &str, tls: &Tls) -> Result<reqwest::Client, RegistryError> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .redirect(redirect_policy())
        .user_agent(concat!("lade/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(READ_TIMEOUT);
    match tls {
        Tls::System => {}
        Tls::Insecure => builder = builder.danger_accept_invalid_certs(true),
        Tls::CaFile(path) => {
            let pem = std::fs::read(path).map_err(|source| RegistryError::File {
                path: path.clone(),
                what: "reading the registry's CA certificate".into(),
                source,
            })?;
            let certificates =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| RegistryError::File {
                    path: path.clone(),
                    what: "reading the registry's CA certificate".into(),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                })?;
            if certificates.is_empty() {
                return Err(RegistryError::File {
                    path: path.clone(),
                    what: "reading the registry's CA certificate".into(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "no PEM certificate in the file",
                    ),
                });
            }
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
    }
    builder
        .build()
        .map_err(|e| unreachable(host, error_chain(&e)))
}

fn unreachable(host: &str, reason: impl fmt::Display) -> RegistryError {
    RegistryError::Unreachable {
        registry: host.to_string(),
        reason: reason.to_string(),
    }
}

fn header(answer: &Response, name: &str) -> Option<String> {
    answer
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// An error with its causes: reqwest's own message ("error sending request") hides the
/// useful part (connection refused, certificate unknown) in the source chain.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The challenge of a `WWW-Authenticate` header: `Basic realm="x"` or
/// `Bearer realm="https://auth/token",service="registry"`.
fn parse_challenge(headers: &HeaderMap) -> Option<Challenge> {
    let value = headers
        .get(reqwest::header::WWW_AUTHENTICATE)?
        .to_str()
        .ok()?;
    let (scheme, params) = value.trim().split_once(' ').unwrap_or((value.trim(), ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let params = challenge_params(params);
    Some(Challenge::Bearer {
        realm: params.get("realm")?.clone(),
        service: params.get("service").cloned(),
    })
}

/// `key="value",key2=value2` parameters of a challenge (quoted values may hold commas).
fn challenge_params(text: &str) -> HashMap<String, String> {
    let mut params = HashMap::new();
    let mut rest = text.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let (value, next) = match after.strip_prefix('"') {
            Some(quoted) => {
                let end = quoted.find('"').unwrap_or(quoted.len());
                (&quoted[..end], quoted.get(end + 1..).unwrap_or(""))
            }
            None => {
                let end = after.find(',').unwrap_or(after.len());
                (&after[..end], &after[end..])
            }
        };
        params.insert(key, value.to_string());
        rest = next.trim_start_matches(',').trim();
    }
    params
}

/// `: CODE: message; CODE2: message2` from a distribution error body, or nothing.
fn error_detail(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorEntry>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorEntry {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    match serde_json::from_slice::<Errors>(body) {
        Ok(errors) if !errors.errors.is_empty() => {
            let entries: Vec<String> = errors
                .errors
                .iter()
                .map(|e| format!("{}: {}", e.code, e.message))
                .collect();
            format!(": {}", entries.join("; "))
        }
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn challenge(value: &str) -> Option<Challenge> {
        let mut headers = HeaderMap::new();
        headers.insert(
            reqwest::header::WWW_AUTHENTICATE,
            value.parse().expect("header value"),
        );
        parse_challenge(&headers)
    }

    #[test]
    fn challenges_of_distribution_and_harbor() {
        assert_eq!(
            challenge(r#"Basic realm="lade-test""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            challenge(
                r#"Bearer realm="https://harbor.local/service/token",service="harbor-registry""#
            ),
            Some(Challenge::Bearer {
                realm: "https://harbor.local/service/token".into(),
                service: Some("harbor-registry".into()),
            })
        );
        assert_eq!(
            challenge(r#"Bearer realm="https://a/t,x", scope="repository:a/b:pull""#),
            Some(Challenge::Bearer {
                realm: "https://a/t,x".into(),
                service: None,
            })
        );
        assert_eq!(
            challenge(r#"Bearer service="x""#),
            None,
            "a bearer challenge needs a realm"
        );
        assert_eq!(challenge("Negotiate abc"), None);
    }

    #[test]
    fn error_bodies_name_the_registry_codes() {
        let body = br#"{"errors":[{"code":"DENIED","message":"requested access to the resource is denied","detail":null}]}"#;
        assert_eq!(
            error_detail(body),
            ": DENIED: requested access to the resource is denied"
        );
        assert_eq!(error_detail(b"<html>bad gateway</html>"), "");
    }

    #[test]
    fn a_login_never_prints_its_password() {
        let login = Login {
            username: "admin".into(),
            password: "Harbor12345".into(),
        };
        let shown = format!("{login:?}");
        assert!(
            shown.contains("admin") && !shown.contains("Harbor12345"),
            "{shown}"
        );
    }
}
