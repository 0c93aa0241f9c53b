//! The names and formats of the wire contract (PROTOCOL.md), in one place for the server
//! and the `fetch` client.

use base64::Engine;

/// The header that carries `probe` on a probe and the token on pinned reads.
pub const PIN_HEADER: &str = "x-cachew-snapshot-pin";
/// The value of [`PIN_HEADER`] that asks for a new pin.
pub const PROBE: &str = "probe";
/// The header that carries the snapshot's total size on a probe.
pub const SIZE_HEADER: &str = "x-cachew-snapshot-size";
/// The commit the snapshot was taken at.
pub const COMMIT_HEADER: &str = "x-cachew-snapshot-commit";
/// Where a delta bundle from that commit to the head can be fetched.
pub const BUNDLE_URL_HEADER: &str = "x-cachew-bundle-url";
/// RFC 9530 digest of the whole snapshot.
pub const REPR_DIGEST_HEADER: &str = "repr-digest";

/// A pin token naming a revision by its S3 ETag.
pub const ETAG_PIN_PREFIX: &str = "etag:";
/// A pin token naming a revision by its VersionId.
pub const VERSION_PIN_PREFIX: &str = "version:";

/// `Repr-Digest` for a SHA-256 given in hex (S3 metadata); `None` when it is not one.
pub fn repr_digest_from_hex(sha256_hex: &str) -> Option<String> {
    let digest = hex::decode(sha256_hex.trim())
        .ok()
        .filter(|d| d.len() == 32)?;
    Some(format!(
        "sha-256=:{}:",
        base64::engine::general_purpose::STANDARD.encode(digest)
    ))
}

/// The SHA-256 of a `Repr-Digest` value, if it carries one.
pub fn parse_repr_digest(value: &str) -> Option<[u8; 32]> {
    value.split(',').find_map(|member| {
        let encoded = member.trim().strip_prefix("sha-256=:")?.strip_suffix(':')?;
        let digest = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .ok()?;
        digest.try_into().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn repr_digest_is_base64_of_the_hex_digest() {
        assert_eq!(
            repr_digest_from_hex(EMPTY_SHA256).as_deref(),
            Some("sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:")
        );
    }

    #[test]
    fn malformed_hex_digests_are_left_out() {
        assert_eq!(repr_digest_from_hex("not hex"), None);
        assert_eq!(repr_digest_from_hex("abcd"), None);
    }

    #[test]
    fn repr_digest_parses_the_sha256_member() {
        let digest = parse_repr_digest(
            "sha-512=:AAAA:, sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:",
        );
        assert_eq!(digest.map(hex::encode).as_deref(), Some(EMPTY_SHA256));
        assert_eq!(parse_repr_digest("sha-256=:short:"), None);
        assert_eq!(parse_repr_digest("md5=:AAAA:"), None);
    }

    #[test]
    fn what_the_server_formats_the_client_parses() {
        let header = repr_digest_from_hex(EMPTY_SHA256).expect("a digest");
        assert_eq!(
            parse_repr_digest(&header).map(hex::encode).as_deref(),
            Some(EMPTY_SHA256)
        );
    }
}
