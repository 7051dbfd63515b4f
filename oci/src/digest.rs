//! Digests: the one form lade accepts, sha256 digests of bytes, and chain IDs.

use sha2::{Digest as _, Sha256};

/// Whether `s` is 64 lowercase hex digits.
pub fn is_hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Checks that `digest` is `sha256:` followed by 64 lowercase hex digits, the only form lade
/// accepts (it is also what every runtime it talks to accepts).
pub fn validate_digest(digest: &str) -> Result<(), &'static str> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or("digest does not start with sha256:")?;
    if is_hex64(hex) {
        Ok(())
    } else {
        Err("digest is not 64 lowercase hex digits after sha256:")
    }
}

/// The digest of `bytes`: `sha256:<hex>`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The chain ID of layer `diff_id` laid on the stack whose chain ID is `parent`:
/// `sha256(parent + " " + diff_id)`.
pub fn chain_id(parent: &str, diff_id: &str) -> String {
    sha256_digest(format!("{parent} {diff_id}").as_bytes())
}

/// Chain IDs of a layer stack, as the OCI image spec defines them: the first is the first
/// diffID, each next one is [`chain_id`] of the previous and its diffID. Snapshots are named
/// by them.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff_id in diff_ids {
        let next = match out.last() {
            None => diff_id.clone(),
            Some(parent) => chain_id(parent, diff_id),
        };
        out.push(next);
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Two valid digests, for tests here and in [`crate::manifest`].
    pub(crate) const A: &str =
        "sha256:a3ed95caeb02ffe68cdd9fd84406680ae93d633cb16422d00e8a7c22955b46d4";
    pub(crate) const B: &str =
        "sha256:8f1b1ad7d0e5a7d5f3e7c8b5a53b1e58b1c6a7f4a4b2e3f0c9d8e7f6a5b4c3d2";

    #[test]
    fn chain_id_of_one_layer_is_its_diff_id() {
        assert_eq!(chain_ids(&[A.to_string()]), vec![A.to_string()]);
    }

    #[test]
    fn chain_id_hashes_parent_space_diff_id() {
        let ids = chain_ids(&[A.to_string(), B.to_string()]);
        let expect = format!(
            "sha256:{}",
            hex::encode(Sha256::digest(format!("{A} {B}").as_bytes()))
        );
        assert_eq!(ids[1], expect);
        assert_eq!(ids.len(), 2);
        assert_eq!(chain_id(A, B), expect);
    }

    #[test]
    fn digest_validation() {
        assert!(validate_digest(A).is_ok());
        assert!(validate_digest("sha512:00").is_err());
        assert!(validate_digest(&A.to_uppercase()).is_err());
        assert!(validate_digest(&A[..70]).is_err());
        assert!(is_hex64(&A[7..]) && !is_hex64(&A[8..]));
    }

    #[test]
    fn sha256_digest_of_nothing() {
        assert_eq!(
            sha256_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
