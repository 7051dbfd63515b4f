//! Who may call the agent. An agent can write to the node's container runtime, which makes
//! it root on the node, so every RPC must carry the bearer token from the cluster Secret.
//! Calls without it, or with another, are refused with UNAUTHENTICATED before any handler
//! runs, so they write nothing.

use subtle::ConstantTimeEq;
use tonic::{Request, Status};

/// How calls are authenticated.
#[derive(Clone)]
pub enum Auth {
    /// `authorization: Bearer <token>` must match.
    Token(String),
    /// Anything goes (`--insecure-no-auth`, for labs).
    Insecure,
}

impl Auth {
    /// Reads the token from `path` (trailing whitespace ignored); an empty file is an error,
    /// since it would make every caller's empty token valid.
    pub fn from_token_file(path: &std::path::Path) -> std::io::Result<Auth> {
        let token = std::fs::read_to_string(path)?.trim_end().to_string();
        if token.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is empty", path.display()),
            ));
        }
        Ok(Auth::Token(token))
    }

    /// The tonic interceptor: passes authenticated requests on unchanged.
    #[allow(clippy::result_large_err)] // tonic's interceptor signature
    pub fn check(&self, req: Request<()>) -> Result<Request<()>, Status> {
        let Auth::Token(expected) = self else {
            return Ok(req);
        };
        let presented = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("missing bearer token"))?;
        // Constant time, so the comparison does not leak how much of a guess was right.
        if bool::from(presented.as_bytes().ct_eq(expected.as_bytes())) {
            Ok(req)
        } else {
            Err(Status::unauthenticated("wrong bearer token"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(header: Option<&str>) -> Request<()> {
        let mut req = Request::new(());
        if let Some(h) = header {
            req.metadata_mut()
                .insert("authorization", h.parse().unwrap());
        }
        req
    }

    #[test]
    fn token_must_match_exactly() {
        let auth = Auth::Token("s3cret".into());
        assert!(auth.check(with(Some("Bearer s3cret"))).is_ok());
        for bad in [
            None,
            Some("Bearer s3cre"),
            Some("Bearer s3cret2"),
            Some("s3cret"),
            Some("Basic s3cret"),
        ] {
            let err = auth.check(with(bad)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
    }

    #[test]
    fn insecure_lets_everything_through() {
        assert!(Auth::Insecure.check(with(None)).is_ok());
    }

    #[test]
    fn empty_token_file_is_refused() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), "\n").unwrap();
        assert!(Auth::from_token_file(f.path()).is_err());
        std::fs::write(f.path(), "tok\n").unwrap();
        assert!(matches!(Auth::from_token_file(f.path()).unwrap(), Auth::Token(t) if t == "tok"));
    }
}
