//! Conditional and range request evaluation (RFC 9110 §13 and §14) for one representation.
//!
//! Pure: it reads raw header bytes and the representation's validators and says what to
//! answer; the HTTP layer turns the [`Outcome`] into a status and headers.

use std::time::{SystemTime, UNIX_EPOCH};

/// The validators and size of the representation being served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validators {
    /// Strong entity tag: the opaque value without the surrounding quotes.
    pub etag: String,
    /// Last modification time, compared at one-second precision like the header.
    pub last_modified: SystemTime,
    /// Total size of the representation in bytes.
    pub size: u64,
}

/// Raw values of the request headers that decide the answer; `None` when absent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestConditions<'a> {
    /// `Range`.
    pub range: Option<&'a [u8]>,
    /// `If-Range`.
    pub if_range: Option<&'a [u8]>,
    /// `If-Match`.
    pub if_match: Option<&'a [u8]>,
    /// `If-None-Match`.
    pub if_none_match: Option<&'a [u8]>,
}

/// What to answer to a GET or HEAD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `412`: `If-Match` is present and lists no strong match.
    PreconditionFailed,
    /// `304`: `If-None-Match` matches the current ETag.
    NotModified,
    /// `200` with the whole representation.
    Full,
    /// `206` with this one range.
    Partial(ByteRange),
    /// `416` with `Content-Range: bytes */N` (see [`unsatisfied_content_range`]).
    Unsatisfiable,
}

/// An inclusive byte range `start..=end` of a representation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ByteRange {
    /// First byte offset.
    pub start: u64,
    /// Last byte offset, inclusive.
    pub end: u64,
}

impl ByteRange {
    /// Number of bytes in the range (0 only for `start > end`, which this module never builds).
    pub fn len(&self) -> u64 {
        self.end
            .checked_sub(self.start)
            .map_or(0, |span| span.saturating_add(1))
    }

    /// True only for `start > end`, which this module never builds.
    pub fn is_empty(&self) -> bool {
        self.start > self.end
    }

    /// Every byte of a representation of `size` bytes; `None` when it has none.
    pub fn whole(size: u64) -> Option<ByteRange> {
        size.checked_sub(1).map(|end| ByteRange { start: 0, end })
    }

    /// Consecutive ranges of at most `chunk_size` bytes that cover this one exactly.
    pub fn split(self, chunk_size: u64) -> impl Iterator<Item = ByteRange> {
        let chunk_size = chunk_size.max(1);
        let mut next = Some(self.start);
        std::iter::from_fn(move || {
            let start = next?;
            let end = start.saturating_add(chunk_size - 1).min(self.end);
            next = (end < self.end).then(|| end + 1);
            Some(ByteRange { start, end })
        })
    }

    /// The `Content-Range` value of a `206`: `bytes a-b/N`.
    pub fn content_range(&self, size: u64) -> String {
        format!("bytes {}-{}/{size}", self.start, self.end)
    }
}

/// The `Content-Range` value of a `416`: `bytes */N`.
pub fn unsatisfied_content_range(size: u64) -> String {
    format!("bytes */{size}")
}

/// A `Range` header read against a representation size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeParse {
    /// Not one valid `bytes` range: the header is ignored and the whole representation sent.
    Ignored,
    /// One satisfiable range, clamped to the representation.
    Satisfiable(ByteRange),
    /// One valid range that selects no byte.
    Unsatisfiable,
}

/// Decides the answer from the request's conditional and range headers (RFC 9110 §13.2.2 order).
pub fn evaluate(conditions: &RequestConditions<'_>, validators: &Validators) -> Outcome {
    let etag = validators.etag.as_bytes();
    if let Some(value) = conditions.if_match
        && !list_matches(value, |tag| !tag.weak && tag.opaque == etag)
    {
        return Outcome::PreconditionFailed;
    }
    if conditions
        .if_none_match
        .is_some_and(|value| list_matches(value, |tag| tag.opaque == etag))
    {
        return Outcome::NotModified;
    }
    let Some(range) = conditions.range else {
        return Outcome::Full;
    };
    if conditions
        .if_range
        .is_some_and(|value| !if_range_holds(value, validators))
    {
        return Outcome::Full;
    }
    match parse_range(range, validators.size) {
        RangeParse::Ignored => Outcome::Full,
        RangeParse::Satisfiable(range) => Outcome::Partial(range),
        RangeParse::Unsatisfiable => Outcome::Unsatisfiable,
    }
}

/// Reads a `Range` header value for a representation of `size` bytes.
pub fn parse_range(header: &[u8], size: u64) -> RangeParse {
    let Some(range_set) = strip_bytes_unit(trim_ows(header)) else {
        return RangeParse::Ignored;
    };
    // RFC 9110 §5.6.1: empty list elements are tolerated, so only non-empty ones count.
    let mut specs = range_set
        .split(|&b| b == b',')
        .map(trim_ows)
        .filter(|spec| !spec.is_empty());
    let (Some(spec), None) = (specs.next(), specs.next()) else {
        return RangeParse::Ignored;
    };
    match parse_spec(spec) {
        Some(spec) => resolve(spec, size),
        None => RangeParse::Ignored,
    }
}

/// One syntactically valid range-spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spec {
    /// `a-b` (`Some(b)`) or `a-` (`None`).
    From(u64, Option<u64>),
    /// `-n`: the last `n` bytes.
    Suffix(u64),
}

/// Strips the case-insensitive `bytes=` unit prefix.
fn strip_bytes_unit(value: &[u8]) -> Option<&[u8]> {
    let (unit, rest) = value.split_at_checked(b"bytes=".len())?;
    unit.eq_ignore_ascii_case(b"bytes=").then_some(rest)
}

/// Parses `a-b`, `a-` or `-n`; `None` when malformed or `a > b`.
fn parse_spec(spec: &[u8]) -> Option<Spec> {
    let dash = spec.iter().position(|&b| b == b'-')?;
    let (first, last) = (&spec[..dash], &spec[dash + 1..]);
    if first.is_empty() {
        return parse_u64(last).map(Spec::Suffix);
    }
    let first = parse_u64(first)?;
    if last.is_empty() {
        return Some(Spec::From(first, None));
    }
    let last = parse_u64(last)?;
    (first <= last).then_some(Spec::From(first, Some(last)))
}

/// Parses `1*DIGIT` into a u64; `None` when empty or not digits. RFC 9110 sets no
/// limit on the digits: a number past u64 is past any object's end, so it saturates.
fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        let digit = d.is_ascii_digit().then(|| u64::from(d - b'0'))?;
        Some(n.saturating_mul(10).saturating_add(digit))
    })
}

/// Clamps a valid spec to `size` bytes, or finds it selects nothing.
fn resolve(spec: Spec, size: u64) -> RangeParse {
    let range = match spec {
        Spec::From(first, last) if first < size => ByteRange {
            start: first,
            end: last.map_or(size - 1, |last| last.min(size - 1)),
        },
        Spec::Suffix(len) if len > 0 && size > 0 => ByteRange {
            start: size - len.min(size),
            end: size - 1,
        },
        _ => return RangeParse::Unsatisfiable,
    };
    RangeParse::Satisfiable(range)
}

/// One entity tag as written in a header.
#[derive(Debug, Clone, Copy)]
struct EntityTag<'a> {
    /// Marked `W/`.
    weak: bool,
    /// The value between the quotes.
    opaque: &'a [u8],
}

/// Parses one entity-tag at the start of `value`, returning it and what follows.
fn parse_entity_tag(value: &[u8]) -> Option<(EntityTag<'_>, &[u8])> {
    let (weak, value) = match value.strip_prefix(b"W/") {
        Some(rest) => (true, rest),
        None => (false, value),
    };
    let value = value.strip_prefix(b"\"")?;
    let close = value.iter().position(|&b| b == b'"')?;
    let opaque = &value[..close];
    let etagc = |&b: &u8| b == 0x21 || (0x23..=0x7e).contains(&b) || b >= 0x80;
    opaque
        .iter()
        .all(etagc)
        .then_some((EntityTag { weak, opaque }, &value[close + 1..]))
}

/// Whether a `"*" / #entity-tag` value holds a tag accepted by `matches`; malformed matches nothing.
fn list_matches(value: &[u8], matches: impl Fn(EntityTag<'_>) -> bool) -> bool {
    let mut rest = trim_ows(value);
    if rest == b"*" {
        return true;
    }
    let mut found = false;
    loop {
        while let [b',' | b' ' | b'\t', tail @ ..] = rest {
            rest = tail;
        }
        if rest.is_empty() {
            return found;
        }
        let Some((tag, tail)) = parse_entity_tag(rest) else {
            return false;
        };
        found |= matches(tag);
        rest = trim_ows(tail);
        if !(rest.is_empty() || rest.starts_with(b",")) {
            return false;
        }
    }
}

/// Whether `If-Range` lets the range through: the exact strong ETag or the exact Last-Modified.
fn if_range_holds(value: &[u8], validators: &Validators) -> bool {
    let value = trim_ows(value);
    if let Some((tag, rest)) = parse_entity_tag(value) {
        return rest.is_empty() && !tag.weak && tag.opaque == validators.etag.as_bytes();
    }
    let Some(date) = std::str::from_utf8(value)
        .ok()
        .and_then(|text| httpdate::parse_http_date(text).ok())
    else {
        return false;
    };
    // Last-Modified goes out in whole seconds, so that is the precision a client can echo.
    let seconds = |time: SystemTime| time.duration_since(UNIX_EPOCH).ok().map(|d| d.as_secs());
    seconds(validators.last_modified).is_some_and(|modified| seconds(date) == Some(modified))
}

/// Strips optional whitespace (SP / HTAB) from both ends.
fn trim_ows(mut value: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = value {
        value = rest;
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(start: u64, end: u64, size: u64) -> Vec<(u64, u64)> {
        ByteRange { start, end }
            .split(size)
            .map(|c| (c.start, c.end))
            .collect()
    }

    #[test]
    fn split_covers_the_range_exactly() {
        assert_eq!(split(0, 9, 4), vec![(0, 3), (4, 7), (8, 9)]);
        assert_eq!(split(0, 7, 4), vec![(0, 3), (4, 7)]);
        assert_eq!(split(5, 5, 4), vec![(5, 5)]);
        assert_eq!(split(3, 10, 100), vec![(3, 10)]);
    }

    #[test]
    fn split_does_not_overflow_at_the_top_of_u64() {
        assert_eq!(
            split(u64::MAX - 2, u64::MAX, 2),
            vec![(u64::MAX - 2, u64::MAX - 1), (u64::MAX, u64::MAX)]
        );
    }
    use proptest::prelude::*;
    use std::time::Duration;

    const ETAG: &str = "abc123-4";

    fn validators(size: u64) -> Validators {
        Validators {
            etag: ETAG.to_owned(),
            // 2015-10-21 07:28:00 UTC plus a fraction the header cannot carry.
            last_modified: UNIX_EPOCH + Duration::from_millis(1_445_412_480_250),
            size,
        }
    }

    fn range(start: u64, end: u64) -> ByteRange {
        ByteRange { start, end }
    }

    fn with_range(header: &str) -> Outcome {
        let conditions = RequestConditions {
            range: Some(header.as_bytes()),
            ..Default::default()
        };
        evaluate(&conditions, &validators(1000))
    }

    #[test]
    fn single_ranges_of_each_form() {
        use RangeParse::*;
        let cases: &[(&str, u64, RangeParse)] = &[
            ("bytes=0-499", 1000, Satisfiable(range(0, 499))),
            ("bytes=500-", 1000, Satisfiable(range(500, 999))),
            ("bytes=-200", 1000, Satisfiable(range(800, 999))),
            ("bytes=0-0", 1000, Satisfiable(range(0, 0))),
            ("bytes=999-999", 1000, Satisfiable(range(999, 999))),
            ("bytes=900-2000", 1000, Satisfiable(range(900, 999))),
            ("bytes=0-18446744073709551615", 10, Satisfiable(range(0, 9))),
            ("bytes=-5000", 1000, Satisfiable(range(0, 999))),
            ("bytes=-1", 1, Satisfiable(range(0, 0))),
            ("bytes=007-08", 1000, Satisfiable(range(7, 8))),
            ("BYTES=1-2", 1000, Satisfiable(range(1, 2))),
            ("Bytes=1-2", 1000, Satisfiable(range(1, 2))),
            ("bytes= 1-2 ", 1000, Satisfiable(range(1, 2))),
            ("\t bytes=1-2\t", 1000, Satisfiable(range(1, 2))),
            ("bytes=1-2,", 1000, Satisfiable(range(1, 2))),
            ("bytes=, ,1-2, ", 1000, Satisfiable(range(1, 2))),
        ];
        for &(header, size, expected) in cases {
            assert_eq!(parse_range(header.as_bytes(), size), expected, "{header}");
        }
    }

    #[test]
    fn unsatisfiable_ranges() {
        let cases: &[(&str, u64)] = &[
            ("bytes=1000-", 1000),
            ("bytes=1000-1001", 1000),
            ("bytes=5000-6000", 1000),
            ("bytes=-0", 1000),
            ("bytes=-0", 0),
            ("bytes=0-", 0),
            ("bytes=0-0", 0),
            ("bytes=-1", 0),
            ("bytes=18446744073709551615-", 1000),
        ];
        for &(header, size) in cases {
            assert_eq!(
                parse_range(header.as_bytes(), size),
                RangeParse::Unsatisfiable,
                "{header} of {size}"
            );
        }
    }

    #[test]
    fn invalid_or_multiple_ranges_are_ignored() {
        let cases = [
            "",
            "bytes",
            "bytes=",
            "bytes=-",
            "bytes=,",
            "bytes=5-4",
            "bytes=1000-999",
            "bytes=0-1,2-3",
            "bytes=0-1, 0-1",
            "bytes=0-1,x",
            "bytes=0-1-2",
            "bytes=--1",
            "bytes=+1-2",
            "bytes=1-+2",
            "bytes=0x1-2",
            "bytes=1 -2",
            "bytes=1- 2",
            "bytes =1-2",
            "bytes= =1-2",
            "bytes:1-2",
            "byte=1-2",
            "items=1-2",
            "1-2",
            "bytes=99999999999999999999999-5",
            "bytes=١-٢",
        ];
        for header in cases {
            assert_eq!(
                parse_range(header.as_bytes(), 1000),
                RangeParse::Ignored,
                "{header:?}"
            );
        }
        assert_eq!(parse_range(b"bytes=\xff-1", 1000), RangeParse::Ignored);
    }

    #[test]
    fn numbers_past_u64_are_past_any_end() {
        let huge = "99999999999999999999999";
        assert_eq!(
            parse_range(format!("bytes={huge}-").as_bytes(), 1000),
            RangeParse::Unsatisfiable
        );
        assert_eq!(
            parse_range(format!("bytes=0-{huge}").as_bytes(), 1000),
            RangeParse::Satisfiable(range(0, 999))
        );
        assert_eq!(
            parse_range(format!("bytes=-{huge}").as_bytes(), 1000),
            RangeParse::Satisfiable(range(0, 999))
        );
        assert_eq!(
            parse_range(b"bytes=18446744073709551616-", u64::MAX),
            RangeParse::Unsatisfiable
        );
    }

    #[test]
    fn invalid_range_beats_unsatisfiable() {
        // a > b is invalid even when both are past the end.
        assert_eq!(parse_range(b"bytes=2000-1500", 1000), RangeParse::Ignored);
        assert_eq!(
            parse_range(b"bytes=2000-1,3000-", 1000),
            RangeParse::Ignored
        );
    }

    #[test]
    fn evaluate_maps_range_results() {
        assert_eq!(with_range("bytes=10-19"), Outcome::Partial(range(10, 19)));
        assert_eq!(with_range("bytes=1000-"), Outcome::Unsatisfiable);
        assert_eq!(with_range("bytes=0-1,4-5"), Outcome::Full);
        assert_eq!(
            evaluate(&RequestConditions::default(), &validators(1000)),
            Outcome::Full
        );
    }

    #[test]
    fn content_range_values() {
        assert_eq!(range(0, 499).content_range(1000), "bytes 0-499/1000");
        assert_eq!(range(7, 7).content_range(8), "bytes 7-7/8");
        assert_eq!(unsatisfied_content_range(1000), "bytes */1000");
        assert_eq!(unsatisfied_content_range(0), "bytes */0");
    }

    #[test]
    fn range_length() {
        assert_eq!(range(0, 499).len(), 500);
        assert_eq!(range(5, 5).len(), 1);
        assert_eq!(range(0, u64::MAX).len(), u64::MAX);
        assert!(!range(5, 5).is_empty());
        assert_eq!(range(6, 5).len(), 0);
        assert!(range(6, 5).is_empty());
    }

    fn evaluate_with(
        if_match: Option<&str>,
        if_none_match: Option<&str>,
        if_range: Option<&str>,
        range: Option<&str>,
    ) -> Outcome {
        let conditions = RequestConditions {
            range: range.map(str::as_bytes),
            if_range: if_range.map(str::as_bytes),
            if_match: if_match.map(str::as_bytes),
            if_none_match: if_none_match.map(str::as_bytes),
        };
        evaluate(&conditions, &validators(1000))
    }

    #[test]
    fn if_match_uses_strong_comparison() {
        let passes = [
            "*",
            " * ",
            "\"abc123-4\"",
            "\"x\", \"abc123-4\"",
            "\"abc123-4\",\"x\"",
            ", \"abc123-4\" ,",
            "W/\"abc123-4\", \"abc123-4\"",
        ];
        for value in passes {
            assert_eq!(
                evaluate_with(Some(value), None, None, None),
                Outcome::Full,
                "{value}"
            );
        }
        let fails = [
            "",
            "W/\"abc123-4\"",
            "w/\"abc123-4\"",
            "\"ABC123-4\"",
            "\"abc123-4 \"",
            "abc123-4",
            "\"abc123-4",
            "\"abc123-4\" \"x\"",
            "\"abc123-4\"x",
            "\"abc123-4\", *",
            "**",
            "\"x\"",
        ];
        for value in fails {
            assert_eq!(
                evaluate_with(Some(value), None, None, None),
                Outcome::PreconditionFailed,
                "{value:?}"
            );
        }
    }

    #[test]
    fn if_none_match_uses_weak_comparison() {
        let matches = [
            "*",
            "\"abc123-4\"",
            "W/\"abc123-4\"",
            "\"a\", W/\"abc123-4\"",
            "\"a\",\t\"abc123-4\" , \"b\"",
        ];
        for value in matches {
            assert_eq!(
                evaluate_with(None, Some(value), None, Some("bytes=0-1")),
                Outcome::NotModified,
                "{value}"
            );
        }
        let misses = [
            "\"a\"",
            "",
            "abc123-4",
            "\"abc123-4\" junk",
            "W/ \"abc123-4\"",
        ];
        for value in misses {
            assert_eq!(
                evaluate_with(None, Some(value), None, None),
                Outcome::Full,
                "{value:?}"
            );
        }
    }

    #[test]
    fn entity_tags_may_hold_commas() {
        let mut v = validators(10);
        v.etag = "a,b".to_owned();
        let conditions = RequestConditions {
            if_none_match: Some(b"\"x\", \"a,b\""),
            ..Default::default()
        };
        assert_eq!(evaluate(&conditions, &v), Outcome::NotModified);
    }

    #[test]
    fn if_match_is_evaluated_before_if_none_match() {
        assert_eq!(
            evaluate_with(Some("\"x\""), Some("*"), None, None),
            Outcome::PreconditionFailed
        );
        assert_eq!(
            evaluate_with(Some("*"), Some("\"abc123-4\""), None, None),
            Outcome::NotModified
        );
        assert_eq!(
            evaluate_with(Some("\"abc123-4\""), Some("\"x\""), None, Some("bytes=-1")),
            Outcome::Partial(range(999, 999))
        );
    }

    #[test]
    fn if_range_with_entity_tag() {
        let partial = Outcome::Partial(range(0, 9));
        assert_eq!(
            evaluate_with(None, None, Some("\"abc123-4\""), Some("bytes=0-9")),
            partial
        );
        assert_eq!(
            evaluate_with(None, None, Some(" \"abc123-4\" "), Some("bytes=0-9")),
            partial
        );
        for value in [
            "W/\"abc123-4\"",
            "\"other\"",
            "\"abc123-4\", \"x\"",
            "\"abc123-4\"x",
            "*",
            "abc123-4",
            "",
        ] {
            assert_eq!(
                evaluate_with(None, None, Some(value), Some("bytes=0-9")),
                Outcome::Full,
                "{value:?}"
            );
        }
    }

    #[test]
    fn if_range_with_date() {
        let partial = Outcome::Partial(range(0, 9));
        for date in [
            "Wed, 21 Oct 2015 07:28:00 GMT",
            "Wednesday, 21-Oct-15 07:28:00 GMT",
            "Wed Oct 21 07:28:00 2015",
        ] {
            assert_eq!(
                evaluate_with(None, None, Some(date), Some("bytes=0-9")),
                partial,
                "{date}"
            );
        }
        for date in [
            "Wed, 21 Oct 2015 07:28:01 GMT",
            "Wed, 21 Oct 2015 07:27:59 GMT",
            "Thu, 01 Jan 1970 00:00:00 GMT",
            "yesterday",
        ] {
            assert_eq!(
                evaluate_with(None, None, Some(date), Some("bytes=0-9")),
                Outcome::Full,
                "{date}"
            );
        }
    }

    #[test]
    fn if_range_failure_ignores_even_unsatisfiable_ranges() {
        assert_eq!(
            evaluate_with(None, None, Some("\"x\""), Some("bytes=5000-")),
            Outcome::Full
        );
        assert_eq!(
            evaluate_with(None, None, Some("\"abc123-4\""), Some("bytes=5000-")),
            Outcome::Unsatisfiable
        );
    }

    #[test]
    fn if_range_without_range_is_ignored() {
        assert_eq!(
            evaluate_with(None, None, Some("\"abc123-4\""), None),
            Outcome::Full
        );
    }

    #[test]
    fn if_range_date_before_epoch_never_matches() {
        let mut v = validators(10);
        v.last_modified = UNIX_EPOCH - Duration::from_secs(1);
        let conditions = RequestConditions {
            range: Some(b"bytes=0-1"),
            if_range: Some(b"Thu, 01 Jan 1970 00:00:00 GMT"),
            ..Default::default()
        };
        assert_eq!(evaluate(&conditions, &v), Outcome::Full);
    }

    #[test]
    fn non_utf8_headers_are_handled() {
        let conditions = RequestConditions {
            range: Some(b"bytes=0-1"),
            if_range: Some(b"\xff\xfe"),
            if_match: None,
            if_none_match: Some(b"\"\x80\xff\""),
        };
        assert_eq!(evaluate(&conditions, &validators(10)), Outcome::Full);
    }

    /// Header bytes: arbitrary, or drawn from the characters the parsers care about.
    fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..48),
            "[bBytesYTES=0-9,\\- \t\"W/*]{0,40}".prop_map(String::into_bytes),
        ]
    }

    fn size() -> impl Strategy<Value = u64> {
        prop_oneof![0..2000u64, any::<u64>(), Just(u64::MAX)]
    }

    /// A valid single range-spec, with its parts.
    #[derive(Debug, Clone)]
    enum GenSpec {
        FromTo(u64, u64),
        From(u64),
        Suffix(u64),
    }

    fn position() -> impl Strategy<Value = u64> {
        prop_oneof![0..2500u64, any::<u64>()]
    }

    fn gen_spec() -> impl Strategy<Value = GenSpec> {
        prop_oneof![
            (position(), position()).prop_map(|(a, b)| GenSpec::FromTo(a.min(b), a.max(b))),
            position().prop_map(GenSpec::From),
            position().prop_map(GenSpec::Suffix),
        ]
    }

    fn spec_text(spec: &GenSpec) -> String {
        match spec {
            GenSpec::FromTo(a, b) => format!("{a}-{b}"),
            GenSpec::From(a) => format!("{a}-"),
            GenSpec::Suffix(n) => format!("-{n}"),
        }
    }

    /// The range rules of PROTOCOL.md, written as plainly as possible.
    fn reference(spec: &GenSpec, size: u64) -> RangeParse {
        let (start, end) = match *spec {
            GenSpec::FromTo(a, b) => (a, b),
            GenSpec::From(a) => (a, u64::MAX),
            GenSpec::Suffix(0) => return RangeParse::Unsatisfiable,
            GenSpec::Suffix(n) => (size.saturating_sub(n), u64::MAX),
        };
        if start >= size {
            RangeParse::Unsatisfiable
        } else {
            RangeParse::Satisfiable(range(start, end.min(size - 1)))
        }
    }

    proptest! {
        #[test]
        fn no_header_bytes_panic(
            range in proptest::option::of(header_bytes()),
            if_range in proptest::option::of(header_bytes()),
            if_match in proptest::option::of(header_bytes()),
            if_none_match in proptest::option::of(header_bytes()),
            size in size(),
            etag in "[ -~]{0,12}",
        ) {
            let conditions = RequestConditions {
                range: range.as_deref(),
                if_range: if_range.as_deref(),
                if_match: if_match.as_deref(),
                if_none_match: if_none_match.as_deref(),
            };
            let v = Validators { etag, last_modified: UNIX_EPOCH, size };
            if let Outcome::Partial(r) = evaluate(&conditions, &v) {
                prop_assert!(r.start <= r.end && r.end < size);
                prop_assert_eq!(r.len(), r.end - r.start + 1);
            }
        }

        #[test]
        fn parsed_ranges_stay_inside(header in header_bytes(), size in size()) {
            if let RangeParse::Satisfiable(r) = parse_range(&header, size) {
                prop_assert!(r.start <= r.end && r.end < size);
            }
        }

        #[test]
        fn valid_single_ranges_match_reference(
            spec in gen_spec(),
            size in size(),
            unit in "[bB][yY][tT][eE][sS]=",
            before in "[ \t]{0,2}",
            after in "[ \t]{0,2}",
        ) {
            let header = format!("{unit}{before}{}{after}", spec_text(&spec));
            let expected = reference(&spec, size);
            prop_assert_eq!(parse_range(header.as_bytes(), size), expected);
            let conditions = RequestConditions { range: Some(header.as_bytes()), ..Default::default() };
            let outcome = evaluate(&conditions, &validators(size));
            let expected_outcome = match expected {
                RangeParse::Ignored => Outcome::Full,
                RangeParse::Satisfiable(r) => Outcome::Partial(r),
                RangeParse::Unsatisfiable => Outcome::Unsatisfiable,
            };
            prop_assert_eq!(outcome, expected_outcome);
        }

        #[test]
        fn several_ranges_are_ignored(first in gen_spec(), second in gen_spec(), size in size()) {
            let header = format!("bytes={}, {}", spec_text(&first), spec_text(&second));
            prop_assert_eq!(parse_range(header.as_bytes(), size), RangeParse::Ignored);
        }

        #[test]
        fn reversed_ranges_are_ignored(a in position(), b in position(), size in size()) {
            prop_assume!(a != b);
            let header = format!("bytes={}-{}", a.max(b), a.min(b));
            prop_assert_eq!(parse_range(header.as_bytes(), size), RangeParse::Ignored);
        }

        #[test]
        fn if_range_date_matches_only_its_second(offset in 0u64..4_000_000_000, millis in 0u64..1000, delta in -3i64..=3) {
            let v = Validators {
                etag: ETAG.to_owned(),
                last_modified: UNIX_EPOCH + Duration::from_secs(offset) + Duration::from_millis(millis),
                size: 10,
            };
            let echoed = UNIX_EPOCH + Duration::from_secs(offset.saturating_add_signed(delta));
            let date = httpdate::fmt_http_date(echoed);
            let conditions = RequestConditions {
                range: Some(b"bytes=0-0"),
                if_range: Some(date.as_bytes()),
                ..Default::default()
            };
            let honoured = offset.saturating_add_signed(delta) == offset;
            let expected = if honoured { Outcome::Partial(range(0, 0)) } else { Outcome::Full };
            prop_assert_eq!(evaluate(&conditions, &v), expected);
        }
    }
}
