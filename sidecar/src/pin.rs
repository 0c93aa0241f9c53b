//! Pin tokens (PROTOCOL.md, "Pin probe and pinned ranges"): the opaque value a probe
//! hands out and pinned reads carry back, naming one immutable S3 revision.

use std::fmt;

use crate::protocol::{ETAG_PIN_PREFIX, PROBE, VERSION_PIN_PREFIX};

/// Longest token accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 1024;

/// One S3 revision, by ETag (fails once replaced) or by VersionId (survives it).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PinToken {
    /// `etag:<etag>`: the S3 ETag without quotes.
    ETag(String),
    /// `version:<version-id>`: a VersionId of a versioned bucket.
    Version(String),
}

/// What the pin header of a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinRequest {
    Probe,
    Pinned(PinToken),
}

/// Why a pin header was refused; `Display` gives the `400` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    #[error("pin token is longer than 1024 bytes")]
    TooLong,
    #[error("pin token has bytes outside visible ASCII")]
    NotVisibleAscii,
    #[error("pin token must start with `etag:` or `version:`")]
    UnknownPrefix,
    #[error("pin token has an empty value")]
    EmptyValue,
}

impl PinRequest {
    /// Reads the raw pin header value.
    pub fn parse(raw: &[u8]) -> Result<PinRequest, PinError> {
        if raw == PROBE.as_bytes() {
            return Ok(PinRequest::Probe);
        }
        PinToken::parse(raw).map(PinRequest::Pinned)
    }
}

impl PinToken {
    /// Parses `etag:<value>` or `version:<value>`; everything else is refused.
    pub fn parse(raw: &[u8]) -> Result<PinToken, PinError> {
        if raw.len() > MAX_TOKEN_LEN {
            return Err(PinError::TooLong);
        }
        if !raw.iter().all(|b| b.is_ascii_graphic()) {
            return Err(PinError::NotVisibleAscii);
        }
        // Visible ASCII is valid UTF-8, so this conversion cannot fail.
        let text = std::str::from_utf8(raw).map_err(|_| PinError::NotVisibleAscii)?;
        let (build, value): (fn(String) -> PinToken, &str) =
            if let Some(value) = text.strip_prefix(ETAG_PIN_PREFIX) {
                (PinToken::ETag, value)
            } else if let Some(value) = text.strip_prefix(VERSION_PIN_PREFIX) {
                (PinToken::Version, value)
            } else {
                return Err(PinError::UnknownPrefix);
            };
        if value.is_empty() {
            return Err(PinError::EmptyValue);
        }
        Ok(build(value.to_owned()))
    }
}

impl fmt::Display for PinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PinToken::ETag(etag) => write!(f, "{ETAG_PIN_PREFIX}{etag}"),
            PinToken::Version(version) => write!(f, "{VERSION_PIN_PREFIX}{version}"),
        }
    }
}

/// Which token kind a probe hands out (`--pin-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PinMode {
    /// A version token when S3 reports a VersionId, else an etag token.
    Auto,
    /// Always an etag token: a regeneration fails downloads in flight with 412.
    Etag,
    /// Always a version token; a probe of an unversioned bucket fails with 502.
    Version,
}

impl PinMode {
    /// The token for a revision with `etag` and, in a versioned bucket, `version_id`.
    pub fn token(self, etag: &str, version_id: Option<&str>) -> Option<PinToken> {
        // S3 reports the literal "null" for objects written before versioning was enabled.
        let version = version_id.filter(|v| !v.is_empty() && *v != "null");
        match (self, version) {
            (PinMode::Auto | PinMode::Version, Some(version)) => {
                Some(PinToken::Version(version.to_owned()))
            }
            (PinMode::Version, None) => None,
            (PinMode::Auto | PinMode::Etag, _) => Some(PinToken::ETag(etag.to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn probe_is_recognised_exactly() {
        assert_eq!(PinRequest::parse(b"probe"), Ok(PinRequest::Probe));
        assert_eq!(PinRequest::parse(b"Probe"), Err(PinError::UnknownPrefix));
        assert_eq!(PinRequest::parse(b"probe "), Err(PinError::NotVisibleAscii));
    }

    #[test]
    fn both_token_forms_round_trip() {
        for token in [
            PinToken::ETag("d41d8cd98f00b204e9800998ecf8427e".into()),
            PinToken::ETag("abc-12".into()),
            PinToken::Version("3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY".into()),
            PinToken::Version("null:x".into()),
        ] {
            let text = token.to_string();
            assert_eq!(PinToken::parse(text.as_bytes()), Ok(token));
        }
    }

    #[test]
    fn malformed_tokens_are_refused_with_a_reason() {
        let too_long = format!("etag:{}", "a".repeat(MAX_TOKEN_LEN));
        let cases: Vec<(&[u8], PinError)> = vec![
            (b"", PinError::UnknownPrefix),
            (b"etag", PinError::UnknownPrefix),
            (b"etag:", PinError::EmptyValue),
            (b"version:", PinError::EmptyValue),
            (b"sha:abc", PinError::UnknownPrefix),
            (b"ETAG:abc", PinError::UnknownPrefix),
            (b":abc", PinError::UnknownPrefix),
            (b"etag:a b", PinError::NotVisibleAscii),
            (b"etag:a\tb", PinError::NotVisibleAscii),
            (b"etag:\x7f", PinError::NotVisibleAscii),
            (b"etag:\xc3\xa9", PinError::NotVisibleAscii),
            (b"version:\0", PinError::NotVisibleAscii),
            (too_long.as_bytes(), PinError::TooLong),
        ];
        for (raw, expected) in cases {
            assert_eq!(
                PinToken::parse(raw),
                Err(expected),
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn the_longest_token_is_accepted() {
        let longest = format!("etag:{}", "a".repeat(MAX_TOKEN_LEN - 5));
        assert!(PinToken::parse(longest.as_bytes()).is_ok());
    }

    #[test]
    fn pin_modes_choose_the_token_kind() {
        let etag = PinToken::ETag("e".into());
        let version = PinToken::Version("v1".into());
        assert_eq!(PinMode::Auto.token("e", Some("v1")), Some(version.clone()));
        assert_eq!(PinMode::Auto.token("e", None), Some(etag.clone()));
        assert_eq!(PinMode::Auto.token("e", Some("null")), Some(etag.clone()));
        assert_eq!(PinMode::Etag.token("e", Some("v1")), Some(etag));
        assert_eq!(PinMode::Version.token("e", Some("v1")), Some(version));
        assert_eq!(PinMode::Version.token("e", None), None);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..1100)) {
            if let Ok(token) = PinToken::parse(&raw) {
                let text = token.to_string();
                prop_assert_eq!(text.as_bytes(), &raw[..]);
            }
        }

        #[test]
        fn visible_values_round_trip(value in "[!-~]{1,200}", versioned in any::<bool>()) {
            let token = if versioned { PinToken::Version(value) } else { PinToken::ETag(value) };
            prop_assert_eq!(PinToken::parse(token.to_string().as_bytes()), Ok(token));
        }
    }
}
