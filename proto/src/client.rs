//! Dialing an agent: the one place that turns an address into an authenticated
//! [`AgentClient`]. The coordinator (loads, preflight) and agents (relaying to their peers)
//! both dial through [`ClientConfig`]; each side passes its own timeouts and keep-alive and
//! keeps its own rules on which addresses it may send credentials to.

use std::fmt;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::{error_chain, AgentClient};

/// A connected agent client that presents its [`BearerAuth`] on every call.
pub type AgentConn = AgentClient<InterceptedService<Channel, BearerAuth>>;

/// The bearer token presented to agents, if any: the interceptor that adds
/// `authorization: Bearer <token>` to every call. Its `Debug` never shows the token.
#[derive(Clone, Default)]
pub struct BearerAuth(Option<MetadataValue<Ascii>>);

/// A token that cannot travel in an HTTP header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidToken;

impl fmt::Display for InvalidToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the auth token must be printable ASCII")
    }
}

impl std::error::Error for InvalidToken {}

impl BearerAuth {
    /// Presents `token` exactly as given (callers trim what they read from files).
    pub fn token(token: &str) -> Result<BearerAuth, InvalidToken> {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| InvalidToken)?;
        Ok(BearerAuth(Some(value)))
    }

    /// Whether a token is presented.
    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }
}

impl fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = if self.0.is_some() {
            "<redacted>"
        } else {
            "none"
        };
        f.debug_tuple("BearerAuth")
            .field(&format_args!("{shown}"))
            .finish()
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(bearer) = &self.0 {
            req.metadata_mut().insert("authorization", bearer.clone());
        }
        Ok(req)
    }
}

/// HTTP/2 keep-alive pings on a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeepAlive {
    /// How often to ping.
    pub interval: Duration,
    /// How long to wait for the answer before the connection counts as dead (`None`: the
    /// transport's default).
    pub timeout: Option<Duration>,
    /// Ping while no call is open, too.
    pub while_idle: bool,
}

/// Why an agent could not be dialed.
#[derive(Debug)]
pub enum DialError {
    /// The address is not one an endpoint can be made of.
    Address(String),
    /// The TLS settings do not fit the endpoint.
    Tls(tonic::transport::Error),
    /// No connection could be made.
    Connect(tonic::transport::Error),
}

impl fmt::Display for DialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DialError::Address(reason) => write!(f, "not a host:port address ({reason})"),
            DialError::Tls(e) | DialError::Connect(e) => f.write_str(&error_chain(e)),
        }
    }
}

impl std::error::Error for DialError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DialError::Address(_) => None,
            DialError::Tls(e) | DialError::Connect(e) => Some(e),
        }
    }
}

/// How to reach an agent: TLS, the bearer token, how long to wait for a connection, and the
/// HTTP/2 settings that let several data chunks be in flight. Its `Debug` shows neither the
/// token nor the TLS identity.
#[derive(Clone)]
pub struct ClientConfig {
    tls: Option<ClientTlsConfig>,
    auth: BearerAuth,
    connect_timeout: Duration,
    keep_alive: KeepAlive,
    stream_window: u32,
    connection_window: u32,
    max_message_size: usize,
}

impl ClientConfig {
    /// Plain gRPC, no token, connections given up after `connect_timeout`, with `keep_alive`.
    /// HTTP/2 windows leave room for several [`CHUNK_SIZE`](crate::CHUNK_SIZE) chunks in
    /// flight (the protocol's default window is 64 KiB), and messages may be up to 8 MiB.
    pub fn new(connect_timeout: Duration, keep_alive: KeepAlive) -> ClientConfig {
        ClientConfig {
            tls: None,
            auth: BearerAuth::default(),
            connect_timeout,
            keep_alive,
            stream_window: 8 << 20,
            connection_window: 16 << 20,
            max_message_size: 8 << 20,
        }
    }

    /// Connects with TLS as `tls` says (`https`), or without it (`http`) for `None`.
    pub fn with_tls(mut self, tls: Option<ClientTlsConfig>) -> ClientConfig {
        self.tls = tls;
        self
    }

    /// Presents `auth` on every call.
    pub fn with_auth(mut self, auth: BearerAuth) -> ClientConfig {
        self.auth = auth;
        self
    }

    /// HTTP/2 receive windows of `stream` bytes per call and `connection` per connection:
    /// what a slow reader may leave buffered on this side.
    pub fn with_windows(mut self, stream: u32, connection: u32) -> ClientConfig {
        self.stream_window = stream;
        self.connection_window = connection;
        self
    }

    /// Whether connections use TLS.
    pub fn uses_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The endpoint for `address` (`host:port`), not yet connected.
    pub fn endpoint(&self, address: &str) -> Result<Endpoint, DialError> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
            .map_err(|e| DialError::Address(e.to_string()))?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .initial_stream_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_frame_size(crate::MAX_FRAME_SIZE)
            .http2_keep_alive_interval(self.keep_alive.interval)
            .keep_alive_while_idle(self.keep_alive.while_idle);
        if let Some(timeout) = self.keep_alive.timeout {
            endpoint = endpoint.keep_alive_timeout(timeout);
        }
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(DialError::Tls)?;
        }
        Ok(endpoint)
    }

    /// Connects to `address`; the channel can be kept and shared by many clients.
    pub async fn channel(&self, address: &str) -> Result<Channel, DialError> {
        self.endpoint(address)?
            .connect()
            .await
            .map_err(DialError::Connect)
    }

    /// A client on `channel` that authenticates every call.
    pub fn client(&self, channel: Channel) -> AgentConn {
        AgentClient::with_interceptor(channel, self.auth.clone())
            .max_decoding_message_size(self.max_message_size)
            .max_encoding_message_size(self.max_message_size)
    }

    /// Connects to `address` and returns a client that authenticates every call.
    pub async fn connect(&self, address: &str) -> Result<AgentConn, DialError> {
        Ok(self.client(self.channel(address).await?))
    }
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("tls", &self.tls.is_some())
            .field("auth", &self.auth)
            .field("connect_timeout", &self.connect_timeout)
            .field("keep_alive", &self.keep_alive)
            .field("stream_window", &self.stream_window)
            .field("connection_window", &self.connection_window)
            .field("max_message_size", &self.max_message_size)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ClientConfig {
        ClientConfig::new(
            Duration::from_secs(1),
            KeepAlive {
                interval: Duration::from_secs(30),
                timeout: None,
                while_idle: false,
            },
        )
    }

    #[test]
    fn an_invalid_address_is_named_as_such() {
        let err = config().endpoint("not an address").unwrap_err();
        assert!(matches!(err, DialError::Address(_)), "{err:?}");
        assert!(
            err.to_string().starts_with("not a host:port address ("),
            "{err}"
        );
    }

    #[test]
    fn the_scheme_follows_tls() {
        let plain = config().endpoint("127.0.0.1:7700").unwrap();
        assert_eq!(plain.uri().to_string(), "http://127.0.0.1:7700/");
        let tls = config()
            .with_tls(Some(ClientTlsConfig::new()))
            .endpoint("agent.example:7700")
            .unwrap();
        assert_eq!(tls.uri().to_string(), "https://agent.example:7700/");
    }

    #[test]
    fn the_interceptor_adds_the_bearer_token() {
        let mut auth = BearerAuth::token("s3cret").unwrap();
        let req = auth.call(tonic::Request::new(())).unwrap();
        assert_eq!(
            req.metadata().get("authorization").unwrap(),
            "Bearer s3cret"
        );
        let req = BearerAuth::default().call(tonic::Request::new(())).unwrap();
        assert!(req.metadata().get("authorization").is_none());
    }

    #[test]
    fn a_token_that_cannot_be_a_header_is_refused() {
        assert_eq!(BearerAuth::token("line\nbreak").unwrap_err(), InvalidToken);
        assert_eq!(
            InvalidToken.to_string(),
            "the auth token must be printable ASCII"
        );
    }

    #[test]
    fn debug_hides_the_token_and_the_tls_identity() {
        let config = config()
            .with_auth(BearerAuth::token("s3cret").unwrap())
            .with_tls(Some(ClientTlsConfig::new().identity(
                tonic::transport::Identity::from_pem("CERT", "PRIVATE-KEY"),
            )));
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(!shown.contains("PRIVATE-KEY"), "{shown}");
        assert!(
            shown.contains("<redacted>") && shown.contains("tls: true"),
            "{shown}"
        );
        assert_eq!(format!("{:?}", BearerAuth::default()), "BearerAuth(none)");
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        // A loopback port that was free a moment ago: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = config()
            .connect(&format!("127.0.0.1:{port}"))
            .await
            .unwrap_err();
        assert!(matches!(err, DialError::Connect(_)), "{err:?}");
    }
}
