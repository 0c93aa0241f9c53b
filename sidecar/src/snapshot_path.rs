//! Validation of snapshot request paths (PROTOCOL.md, "Where snapshots live").
//!
//! Pure: a raw, still percent-encoded request path goes in; either a path that is safe to
//! use as an S3 key and a disk-tier name comes out, or a reason fit for a `400` body.

use std::fmt;

/// Longest raw request path accepted, in bytes.
pub const MAX_PATH_LEN: usize = 1024;

/// Every snapshot path starts with this.
const GIT_PREFIX: &str = "/git/";

/// The snapshot files a repository may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotFile {
    /// `snapshot.tar.zst`: the zstd-compressed tarball.
    TarZst,
    /// `snapshot.bundle`: a git bundle.
    Bundle,
}

impl SnapshotFile {
    /// The file name as it appears at the end of the path.
    pub fn name(self) -> &'static str {
        match self {
            SnapshotFile::TarZst => "snapshot.tar.zst",
            SnapshotFile::Bundle => "snapshot.bundle",
        }
    }

    /// The file with this exact name, if it is one of ours.
    fn from_name(name: &str) -> Option<Self> {
        [SnapshotFile::TarZst, SnapshotFile::Bundle]
            .into_iter()
            .find(|file| file.name() == name)
    }
}

/// Why a request path was refused; `Display` gives the `400` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Longer than [`MAX_PATH_LEN`] bytes.
    TooLong,
    /// Does not start with `/git/`.
    NotUnderGit,
    /// Has an empty segment (`//` or a trailing `/`).
    EmptySegment,
    /// Has a `.` or `..` segment, possibly percent-encoded.
    DotSegment,
    /// Has a control character, raw or percent-encoded.
    ControlCharacter,
    /// Has a percent-encoded `/` or a backslash.
    EncodedSeparator,
    /// Has a `%` not followed by two hex digits.
    BadPercentEncoding,
    /// Is not UTF-8 once percent-decoded.
    NotUtf8,
    /// Has no host segment after `/git/`.
    MissingHost,
    /// Has a host but no repository path.
    MissingRepository,
    /// Does not end in one of the snapshot file names.
    UnknownFile,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let message = match self {
            PathError::TooLong => "path is longer than 1024 bytes",
            PathError::NotUnderGit => "path must start with /git/",
            PathError::EmptySegment => "path has an empty segment",
            PathError::DotSegment => "path has a . or .. segment",
            PathError::ControlCharacter => "path has a control character",
            PathError::EncodedSeparator => "path has an encoded / or a backslash",
            PathError::BadPercentEncoding => "path has an invalid percent-encoding",
            PathError::NotUtf8 => "path is not UTF-8 once percent-decoded",
            PathError::MissingHost => "path has no host: expected /git/{host}/{path}/{file}",
            PathError::MissingRepository => {
                "path has no repository: expected /git/{host}/{path}/{file}"
            }
            PathError::UnknownFile => "file name must be snapshot.tar.zst or snapshot.bundle",
        };
        f.write_str(message)
    }
}

impl std::error::Error for PathError {}

/// A validated, percent-decoded `/git/{host}/{path}/{file}` request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotPath {
    /// Decoded `{host}/{path}`.
    repository: String,
    /// Which snapshot file is asked for.
    file: SnapshotFile,
}

impl SnapshotPath {
    /// Validates a raw, still percent-encoded request path (without its query string).
    pub fn parse(raw_path: &str) -> Result<SnapshotPath, PathError> {
        if raw_path.len() > MAX_PATH_LEN {
            return Err(PathError::TooLong);
        }
        let rest = raw_path
            .strip_prefix(GIT_PREFIX)
            .ok_or(PathError::NotUnderGit)?;
        let mut segments = rest
            .split('/')
            .map(decode_segment)
            .collect::<Result<Vec<_>, _>>()?;
        let file = segments
            .pop()
            .and_then(|name| SnapshotFile::from_name(&name))
            .ok_or(PathError::UnknownFile)?;
        match segments.len() {
            0 => Err(PathError::MissingHost),
            1 => Err(PathError::MissingRepository),
            _ => Ok(SnapshotPath {
                repository: segments.join("/"),
                file,
            }),
        }
    }

    /// The snapshot tarball of a repository named `{host}/{path}`, e.g. `github.com/org/repo`.
    pub fn parse_repository(text: &str) -> Result<SnapshotPath, String> {
        let repository = text.trim().trim_matches('/');
        SnapshotPath::parse(&format!("/git/{repository}/snapshot.tar.zst"))
            .map_err(|err| format!("`{text}` is not a repository like github.com/org/repo: {err}"))
    }

    /// The decoded `{host}/{path}`.
    pub fn repository(&self) -> &str {
        &self.repository
    }

    /// The S3 object key: `prefix` followed by the decoded path without its leading `/`.
    pub fn object_key(&self, prefix: &str) -> String {
        format!("{prefix}git/{}/{}", self.repository, self.file.name())
    }

    /// Which snapshot file is asked for.
    pub fn file(&self) -> SnapshotFile {
        self.file
    }
}

/// Percent-decodes one raw segment and checks it is safe inside a key.
fn decode_segment(raw: &str) -> Result<String, PathError> {
    let mut bytes = Vec::with_capacity(raw.len());
    let mut rest = raw.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        rest = tail;
        if byte != b'%' {
            bytes.push(byte);
            continue;
        }
        let [high, low, tail @ ..] = rest else {
            return Err(PathError::BadPercentEncoding);
        };
        let (Some(high), Some(low)) = (hex_value(*high), hex_value(*low)) else {
            return Err(PathError::BadPercentEncoding);
        };
        bytes.push(high << 4 | low);
        rest = tail;
    }
    let segment = String::from_utf8(bytes).map_err(|_| PathError::NotUtf8)?;
    match segment.as_str() {
        "" => Err(PathError::EmptySegment),
        "." | ".." => Err(PathError::DotSegment),
        // A raw segment holds no `/`, so one here was encoded; `\` separates paths elsewhere.
        s if s.contains(['/', '\\']) => Err(PathError::EncodedSeparator),
        s if s.chars().any(char::is_control) => Err(PathError::ControlCharacter),
        _ => Ok(segment),
    }
}

/// The value of one hex digit.
fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn good_paths() {
        let cases: &[(&str, &str, SnapshotFile)] = &[
            (
                "/git/github.com/org/repo/snapshot.tar.zst",
                "github.com/org/repo",
                SnapshotFile::TarZst,
            ),
            (
                "/git/github.com/org/repo/snapshot.bundle",
                "github.com/org/repo",
                SnapshotFile::Bundle,
            ),
            (
                "/git/gitlab.example.com/group/sub/group/repo.git/snapshot.tar.zst",
                "gitlab.example.com/group/sub/group/repo.git",
                SnapshotFile::TarZst,
            ),
            ("/git/h/r/snapshot.tar.zst", "h/r", SnapshotFile::TarZst),
            (
                "/git/example.com:8443/org/my%20repo/snapshot.tar.zst",
                "example.com:8443/org/my repo",
                SnapshotFile::TarZst,
            ),
            (
                "/git/github.com/org/r%C3%A9po/snapshot%2Etar%2ezst",
                "github.com/org/répo",
                SnapshotFile::TarZst,
            ),
            (
                "/git/github.com/org/100%25/snapshot.bundle",
                "github.com/org/100%",
                SnapshotFile::Bundle,
            ),
            ("/git/h/.../snapshot.tar.zst", "h/...", SnapshotFile::TarZst),
            (
                "/git/h/.hidden/snapshot.tar.zst",
                "h/.hidden",
                SnapshotFile::TarZst,
            ),
        ];
        for &(raw, repository, file) in cases {
            let path = SnapshotPath::parse(raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
            assert_eq!(path.file(), file, "{raw}");
            assert_eq!(
                path.object_key("cache/"),
                format!("cache/git/{repository}/{}", file.name())
            );
        }
    }

    #[test]
    fn object_key_is_prefix_plus_path() {
        let path = SnapshotPath::parse("/git/github.com/org/repo/snapshot.tar.zst").unwrap();
        assert_eq!(
            path.object_key(""),
            "git/github.com/org/repo/snapshot.tar.zst"
        );
        assert_eq!(
            path.object_key("snapcache/v1/"),
            "snapcache/v1/git/github.com/org/repo/snapshot.tar.zst"
        );
    }

    #[test]
    fn bad_paths() {
        use PathError::*;
        let too_long = format!("/git/h/{}/snapshot.tar.zst", "a".repeat(1001));
        let cases: &[(&str, PathError)] = &[
            (&too_long, TooLong),
            ("", NotUnderGit),
            ("/", NotUnderGit),
            ("/git", NotUnderGit),
            ("git/h/r/snapshot.tar.zst", NotUnderGit),
            ("/GIT/h/r/snapshot.tar.zst", NotUnderGit),
            ("//git/h/r/snapshot.tar.zst", NotUnderGit),
            ("/metrics", NotUnderGit),
            ("/git/", EmptySegment),
            ("/git//r/snapshot.tar.zst", EmptySegment),
            ("/git/h//r/snapshot.tar.zst", EmptySegment),
            ("/git/h/r/snapshot.tar.zst/", EmptySegment),
            ("/git/h/./r/snapshot.tar.zst", DotSegment),
            ("/git/h/../r/snapshot.tar.zst", DotSegment),
            ("/git/../../etc/snapshot.tar.zst", DotSegment),
            ("/git/h/r/../snapshot.tar.zst", DotSegment),
            ("/git/h/%2e%2e/r/snapshot.tar.zst", DotSegment),
            ("/git/h/%2E/r/snapshot.tar.zst", DotSegment),
            ("/git/h/.%2E/r/snapshot.tar.zst", DotSegment),
            ("/git/h/r\u{0}/snapshot.tar.zst", ControlCharacter),
            ("/git/h/r\n/snapshot.tar.zst", ControlCharacter),
            ("/git/h/r%0a/snapshot.tar.zst", ControlCharacter),
            ("/git/h/r%00/snapshot.tar.zst", ControlCharacter),
            ("/git/h/r%7F/snapshot.tar.zst", ControlCharacter),
            ("/git/h/r\u{7f}/snapshot.tar.zst", ControlCharacter),
            ("/git/h/r%C2%85/snapshot.tar.zst", ControlCharacter),
            ("/git/h/a%2Fb/snapshot.tar.zst", EncodedSeparator),
            ("/git/h/a%2fb/snapshot.tar.zst", EncodedSeparator),
            ("/git/h/%2e%2e%2f%2e%2e/snapshot.tar.zst", EncodedSeparator),
            ("/git/h/a%5Cb/snapshot.tar.zst", EncodedSeparator),
            ("/git/h/a%5cb/snapshot.tar.zst", EncodedSeparator),
            ("/git/h/a\\b/snapshot.tar.zst", EncodedSeparator),
            ("/git/h/r%/snapshot.tar.zst", BadPercentEncoding),
            ("/git/h/r%2/snapshot.tar.zst", BadPercentEncoding),
            ("/git/h/r%zz/snapshot.tar.zst", BadPercentEncoding),
            ("/git/h/r%+1/snapshot.tar.zst", BadPercentEncoding),
            ("/git/h/r/snapshot.tar.zst%", BadPercentEncoding),
            ("/git/h/r%ff/snapshot.tar.zst", NotUtf8),
            ("/git/h/r%C3/snapshot.tar.zst", NotUtf8),
            ("/git/snapshot.tar.zst", MissingHost),
            ("/git/github.com/snapshot.tar.zst", MissingRepository),
            ("/git/github.com/org/repo", UnknownFile),
            ("/git/github.com/org/repo/snapshot.tar", UnknownFile),
            ("/git/github.com/org/repo/Snapshot.tar.zst", UnknownFile),
            ("/git/github.com/org/repo/snapshot.tar.zst.tmp", UnknownFile),
            ("/git/github.com/org/repo/snapshot.tar.zst?x=1", UnknownFile),
        ];
        for &(raw, expected) in cases {
            assert_eq!(SnapshotPath::parse(raw), Err(expected), "{raw:?}");
        }
    }

    #[test]
    fn longest_path_is_accepted() {
        let filler = "a".repeat(MAX_PATH_LEN - "/git/h//snapshot.tar.zst".len());
        let raw = format!("/git/h/{filler}/snapshot.tar.zst");
        assert_eq!(raw.len(), MAX_PATH_LEN);
        assert!(SnapshotPath::parse(&raw).is_ok());
        assert_eq!(
            SnapshotPath::parse(&format!("{raw}a")),
            Err(PathError::TooLong)
        );
    }

    #[test]
    fn messages_are_human() {
        assert_eq!(
            PathError::TooLong.to_string(),
            "path is longer than 1024 bytes"
        );
        assert_eq!(
            PathError::UnknownFile.to_string(),
            "file name must be snapshot.tar.zst or snapshot.bundle"
        );
    }

    /// Raw paths built from the pieces the validator cares about.
    fn tricky_path() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("/".to_owned()),
            Just("/git/".to_owned()),
            Just(".".to_owned()),
            Just("%".to_owned()),
            Just("%2e".to_owned()),
            Just("%2F".to_owned()),
            Just("%5c".to_owned()),
            Just("%00".to_owned()),
            Just("%7f".to_owned()),
            Just("%C3%A9".to_owned()),
            Just("\\".to_owned()),
            Just("snapshot.tar.zst".to_owned()),
            Just("snapshot.bundle".to_owned()),
            "[a-zA-Z0-9]{1,3}",
            "%[0-9a-fA-FgG]{0,2}",
            any::<char>().prop_map(String::from),
        ];
        proptest::collection::vec(piece, 0..16).prop_map(|pieces| pieces.concat())
    }

    /// A segment that needs no validation failure: no `.`/`..`, no separators or controls.
    fn plain_segment() -> impl Strategy<Value = String> {
        "[A-Za-z0-9._~ -]{1,12}".prop_filter("dot segment", |s| s != "." && s != "..")
    }

    fn encode_all(segment: &str) -> String {
        segment.bytes().map(|b| format!("%{b:02X}")).collect()
    }

    proptest! {
        #[test]
        fn no_input_panics_and_accepted_keys_are_clean(
            raw in prop_oneof![any::<String>(), tricky_path(), tricky_path().prop_map(|p| format!("/git/{p}"))],
        ) {
            if let Ok(path) = SnapshotPath::parse(&raw) {
                let key = path.object_key("");
                prop_assert!(key.starts_with("git/"));
                for bad in ["//", "/./", "/../", "\\"] {
                    prop_assert!(!key.contains(bad), "{key:?} has {bad:?}");
                }
                prop_assert!(!key.chars().any(char::is_control), "{key:?}");
                prop_assert!(key.split('/').all(|s| !s.is_empty() && s != "." && s != ".."));
                prop_assert!(key.ends_with("/snapshot.tar.zst") || key.ends_with("/snapshot.bundle"));
            }
        }

        #[test]
        fn plain_paths_are_accepted_and_decoded(
            host in plain_segment(),
            repo in proptest::collection::vec(plain_segment(), 1..5),
            encode in proptest::collection::vec(any::<bool>(), 5),
            bundle in any::<bool>(),
        ) {
            let file = if bundle { SnapshotFile::Bundle } else { SnapshotFile::TarZst };
            let segments: Vec<&String> = std::iter::once(&host).chain(&repo).collect();
            let raw_segments: Vec<String> = segments
                .iter()
                .zip(encode.iter().cycle())
                .map(|(s, &encode)| if encode { encode_all(s) } else { s.replace(' ', "%20") })
                .collect();
            let raw = format!("/git/{}/{}", raw_segments.join("/"), file.name());
            prop_assume!(raw.len() <= MAX_PATH_LEN);
            let path = SnapshotPath::parse(&raw);
            prop_assert!(path.is_ok(), "{raw}: {path:?}");
            let path = path.unwrap();
            let repository = segments.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("/");
            prop_assert_eq!(path.file(), file);
            prop_assert_eq!(path.object_key("p/"), format!("p/git/{repository}/{}", file.name()));
        }
    }
}
