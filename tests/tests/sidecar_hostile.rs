//! Issue 14 §3, "Hostile input is a test suite, not a hope": malformed, oversized and odd
//! requests sent as raw bytes (no client library would send them) to a real sidecar, each
//! with its exact status, and a seeded property test of arbitrary `Range` values on the
//! disk-tier and pinned paths.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use snapcache_tests::sidecar::{Sidecar, SidecarOptions};
use snapcache_tests::{
    S3Server, TestEnv, create_bucket, eventually, put_snapshot, snapshot_bytes, unique_name,
};

const REPO: &str = "example.com/org/hostile";
const PATH: &str = "/git/example.com/org/hostile/snapshot.tar.zst";
const COMMIT: &str = "1414141414141414141414141414141414141414";
const PIN: &str = "x-cachew-snapshot-pin";
/// Size of the object the table of cases reads.
const SMALL: usize = 1000;
/// How long one answer may take before its case fails as a hang.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// One row of the table: the raw bytes sent on a new connection and the statuses of the
/// answers expected, in order: two for pipelined requests, none when the server must
/// close the connection without answering.
#[derive(Debug)]
struct Case {
    name: String,
    request: Vec<u8>,
    statuses: Vec<u16>,
}

fn case(name: &str, request: impl Into<Vec<u8>>, status: u16) -> Case {
    pipelined(name, request, &[status])
}

fn pipelined(name: &str, request: impl Into<Vec<u8>>, statuses: &[u16]) -> Case {
    Case {
        name: name.to_owned(),
        request: request.into(),
        statuses: statuses.to_vec(),
    }
}

/// `{line}` and a Host header, then `headers` (complete lines, CRLFs included), then the
/// blank line.
fn request(line: impl AsRef<[u8]>, headers: impl AsRef<[u8]>) -> Vec<u8> {
    [
        line.as_ref(),
        b"\r\nHost: localhost\r\n",
        headers.as_ref(),
        b"\r\n",
    ]
    .concat()
}

/// A GET of the snapshot with these extra header lines.
fn get(headers: impl AsRef<[u8]>) -> Vec<u8> {
    request(format!("GET {PATH} HTTP/1.1"), headers)
}

/// A GET of `target`, sent as it is.
fn get_target(target: impl AsRef<[u8]>) -> Vec<u8> {
    request([b"GET ", target.as_ref(), b" HTTP/1.1"].concat(), "")
}

/// The snapshot's path with `segment` in place of the organisation.
fn path_with(segment: &[u8]) -> Vec<u8> {
    [
        b"/git/example.com/".as_slice(),
        segment,
        b"/hostile/snapshot.tar.zst",
    ]
    .concat()
}

/// One header line.
fn header(name: &str, value: impl AsRef<[u8]>) -> Vec<u8> {
    [name.as_bytes(), b": ", value.as_ref(), b"\r\n"].concat()
}

fn with_range(value: impl AsRef<[u8]>) -> Vec<u8> {
    get(header("Range", value))
}

fn with_pin(value: impl AsRef<[u8]>) -> Vec<u8> {
    get(header(PIN, value))
}

/// The table. `etag` is the S3 ETag of the object (without quotes).
fn hostile_cases(etag: &str) -> Vec<Case> {
    let quoted = format!("\"{etag}\"");
    let method = |name: &str| request(format!("{name} {PATH} HTTP/1.1"), "");
    let long_segment = |len: usize| path_with("a".repeat(len).as_bytes());
    let many_headers: String = (0..200).map(|i| format!("X-Filler-{i}: {i}\r\n")).collect();
    let many_ranges: Vec<String> = (0..2000).map(|i| format!("{i}-{i}")).collect();
    vec![
        // Methods: only GET and HEAD; anything else that is a token gets 405.
        case("GET", get(""), 200),
        case("HEAD", method("HEAD"), 200),
        case("POST", method("POST"), 405),
        case(
            "POST with a body",
            get_body("POST", "Content-Length: 5\r\n", "hello"),
            405,
        ),
        case("PUT", method("PUT"), 405),
        case("DELETE", method("DELETE"), 405),
        case("PATCH", method("PATCH"), 405),
        case("OPTIONS", method("OPTIONS"), 405),
        case("TRACE", method("TRACE"), 405),
        case("CONNECT", method("CONNECT"), 405),
        case(
            "CONNECT authority-form",
            request("CONNECT localhost:443 HTTP/1.1", ""),
            405,
        ),
        case(
            "OPTIONS asterisk-form",
            request("OPTIONS * HTTP/1.1", ""),
            405,
        ),
        case("unknown method FOO", method("FOO"), 405),
        case("lowercase get", method("get"), 405),
        case("method of tchar punctuation", method("G!T~"), 405),
        case("10 KiB method token", method(&"A".repeat(10 << 10)), 405),
        case("method with a non-token byte", method("GE(T"), 400),
        case(
            "method with non-ASCII bytes",
            request(b"G\xc3\x89T /git HTTP/1.1", ""),
            400,
        ),
        case("no method", request(format!(" {PATH} HTTP/1.1"), ""), 400),
        // Request targets.
        case(
            "percent-encoded slash",
            get_target(path_with(b"org%2Fx")),
            400,
        ),
        case(
            "percent-encoded lowercase slash",
            get_target(path_with(b"org%2fx")),
            400,
        ),
        case("percent-encoded dot", get_target(path_with(b"%2e")), 400),
        case(
            "percent-encoded dot-dot",
            get_target(path_with(b"%2e%2e")),
            400,
        ),
        case(
            "mixed-case percent-encoded dot-dot",
            get_target(path_with(b"%2E%2e")),
            400,
        ),
        case("half-encoded dot-dot", get_target(path_with(b".%2e")), 400),
        case("percent-encoded NUL", get_target(path_with(b"org%00")), 400),
        case("percent-encoded LF", get_target(path_with(b"org%0a")), 400),
        case("percent-encoded DEL", get_target(path_with(b"org%7f")), 400),
        case(
            "percent-encoded non-UTF-8",
            get_target(path_with(b"org%ff")),
            400,
        ),
        case(
            "invalid percent escape",
            get_target(path_with(b"org%zz")),
            400,
        ),
        case(
            "truncated percent escape",
            get_target(path_with(b"org%2")),
            400,
        ),
        case("raw non-UTF-8 byte", get_target(path_with(b"org\xff")), 400),
        // The http crate takes raw UTF-8 in a target; it names the same key as %C3%A9.
        case(
            "raw UTF-8 letter is a name",
            get_target(path_with("orgé".as_bytes())),
            404,
        ),
        case(
            "raw control character",
            get_target(path_with(b"org\x01")),
            400,
        ),
        case("raw tab", get_target(path_with(b"org\tx")), 400),
        case("raw DEL", get_target(path_with(b"org\x7f")), 400),
        case("backslash", get_target(path_with(b"org\\x")), 400),
        case("empty segment", get_target(path_with(b"")), 400),
        case("dot segment", get_target(path_with(b".")), 400),
        case("dot-dot segment", get_target(path_with(b"..")), 400),
        case("trailing slash", get_target(format!("{PATH}/")), 400),
        case(
            "not under /git/",
            get_target("/elsewhere/org/hostile/snapshot.tar.zst"),
            400,
        ),
        case("no leading slash", get_target(&PATH[1..]), 400),
        case("root", get_target("/"), 400),
        case(
            "absolute-form",
            get_target(format!("http://localhost{PATH}")),
            200,
        ),
        case(
            "absolute-form, other authority",
            get_target(format!("http://example.org:1{PATH}")),
            200,
        ),
        case(
            "absolute-form with dot-dot",
            get_target("http://localhost/git/example.com/../hostile/snapshot.tar.zst"),
            400,
        ),
        case("asterisk-form GET", get_target("*"), 400),
        case("query string", get_target(format!("{PATH}?x=1&y=%00")), 200),
        case(
            "fragment is dropped",
            get_target(format!("{PATH}#top")),
            200,
        ),
        case(
            "double-encoded dot-dot reaches S3 as a name",
            get_target(path_with(b"%252e%252e")),
            404,
        ),
        case("1025-byte path", get_target(long_segment(1025)), 400),
        case("8 KiB path", get_target(long_segment(8 << 10)), 400),
        case("64 KiB path", get_target(long_segment(64 << 10)), 414),
        case("empty target", request("GET  HTTP/1.1", ""), 400),
        case(
            "two spaces before the target",
            request(format!("GET  {PATH} HTTP/1.1"), ""),
            400,
        ),
        case(
            "token after the version",
            request(format!("GET {PATH} HTTP/1.1 extra"), ""),
            400,
        ),
        // Versions and framing.
        case(
            "request line with no version",
            format!("GET {PATH}\r\n\r\n"),
            400,
        ),
        case("HTTP/1.2", request(format!("GET {PATH} HTTP/1.2"), ""), 400),
        case(
            "HTTP/2.0 request line",
            request(format!("GET {PATH} HTTP/2.0"), ""),
            400,
        ),
        case("HTTP/0.9", request(format!("GET {PATH} HTTP/0.9"), ""), 400),
        case(
            "lowercase http/1.1",
            request(format!("GET {PATH} http/1.1"), ""),
            400,
        ),
        case(
            "HTTP/1.10",
            request(format!("GET {PATH} HTTP/1.10"), ""),
            400,
        ),
        case(
            "bare LF line endings",
            format!("GET {PATH} HTTP/1.1\nHost: localhost\n\n"),
            200,
        ),
        case(
            "leading blank line",
            [b"\r\n".as_slice(), &get("")].concat(),
            200,
        ),
        // HTTP/1 only: hyper closes on the preface without an answer an h2 client could read.
        pipelined(
            "HTTP/2 prior-knowledge preface",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            &[],
        ),
        case(
            "TLS ClientHello",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n".as_slice(),
            400,
        ),
        case("SSH banner", "SSH-2.0-OpenSSH_9.6\r\n\r\n", 400),
        // Host (RFC 9112 §3.2).
        case(
            "HTTP/1.0 without Host",
            format!("GET {PATH} HTTP/1.0\r\n\r\n"),
            200,
        ),
        case(
            "HTTP/1.1 without Host",
            format!("GET {PATH} HTTP/1.1\r\n\r\n"),
            400,
        ),
        case("duplicate Host", get("Host: other\r\n"), 400),
        case(
            "empty Host",
            format!("GET {PATH} HTTP/1.1\r\nHost:\r\n\r\n"),
            200,
        ),
        // Header sections.
        case("200 headers", get(&many_headers), 431),
        case(
            "one 100 KiB header",
            get(header("X-Filler", "x".repeat(100 << 10))),
            200,
        ),
        case(
            "one 1 MiB header",
            get(header("X-Filler", "x".repeat(1 << 20))),
            431,
        ),
        case("header line without a colon", get("X-Filler\r\n"), 400),
        case("space before the colon", get("X-Filler : 1\r\n"), 400),
        case(
            "obs-fold continuation line",
            get("X-Filler: 1\r\n  more\r\n"),
            400,
        ),
        case(
            "NUL in a header value",
            get(header("X-Filler", b"a\x00b")),
            400,
        ),
        case(
            "lone CR in a header value",
            get(header("X-Filler", b"a\rb")),
            400,
        ),
        case("non-token header name", get("X(Filler): 1\r\n"), 400),
        case("empty header name", get(": 1\r\n"), 400),
        case("non-ASCII header name", get(b"X-F\xc3\xa9: 1\r\n"), 400),
        case(
            "non-ASCII header value",
            get(header("X-Filler", b"\x80\xff\xfe")),
            200,
        ),
        // Bodies.
        case(
            "GET with a Content-Length body",
            get_body("GET", "Content-Length: 5\r\n", "hello"),
            200,
        ),
        case(
            "GET with a chunked body",
            get_body(
                "GET",
                "Transfer-Encoding: chunked\r\n",
                "5\r\nhello\r\n0\r\n\r\n",
            ),
            200,
        ),
        // RFC 9112 §6.1 lets a server read such a request by Transfer-Encoding alone if it
        // closes the connection afterwards, which hyper does: no smuggled second request.
        case(
            "Content-Length and Transfer-Encoding",
            get_body(
                "GET",
                "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                "0\r\n\r\n",
            ),
            200,
        ),
        case(
            "Transfer-Encoding other than chunked",
            get_body("GET", "Transfer-Encoding: gzip\r\n", ""),
            400,
        ),
        case(
            "non-numeric Content-Length",
            get("Content-Length: abc\r\n"),
            400,
        ),
        case(
            "negative Content-Length",
            get("Content-Length: -1\r\n"),
            400,
        ),
        case(
            "overflowing Content-Length",
            get("Content-Length: 99999999999999999999999\r\n"),
            400,
        ),
        case(
            "two different Content-Lengths",
            get_body("GET", "Content-Length: 1\r\nContent-Length: 2\r\n", "ab"),
            400,
        ),
        // Pipelining: answers in order on one connection.
        pipelined(
            "two pipelined GETs",
            [get(""), get("")].concat(),
            &[200, 200],
        ),
        pipelined(
            "pipelined range then whole",
            [with_range("bytes=0-9"), get("")].concat(),
            &[206, 200],
        ),
        pipelined(
            "pipelined GET then POST",
            [get(""), method("POST")].concat(),
            &[200, 405],
        ),
        pipelined(
            "pipelined GET then garbage",
            [get(""), b"GE(T / HTTP/1.1\r\n\r\n".to_vec()].concat(),
            &[200, 400],
        ),
        // Range: one satisfiable range.
        case("range 0-99", with_range("bytes=0-99"), 206),
        case("range 0-0", with_range("bytes=0-0"), 206),
        case("range of the last byte", with_range("bytes=999-999"), 206),
        case("open range", with_range("bytes=900-"), 206),
        case("suffix range", with_range("bytes=-100"), 206),
        case(
            "suffix longer than the object",
            with_range("bytes=-5000"),
            206,
        ),
        case("last byte past the end", with_range("bytes=0-99999"), 206),
        case(
            "range with leading zeros",
            with_range("bytes=0000000000000000000000000001-0002"),
            206,
        ),
        case("uppercase unit", with_range("BYTES=0-9"), 206),
        case("trailing empty list element", with_range("bytes=0-9,"), 206),
        case("whitespace after the unit", with_range("bytes= 0-9"), 206),
        case("trailing tab", with_range("bytes=0-9\t"), 206),
        case(
            "HEAD with a range",
            request(format!("HEAD {PATH} HTTP/1.1"), "Range: bytes=0-9\r\n"),
            206,
        ),
        // Range: unsatisfiable.
        case("first byte at the end", with_range("bytes=1000-"), 416),
        case("range past the end", with_range("bytes=1000-2000"), 416),
        case("empty suffix bytes=-0", with_range("bytes=-0"), 416),
        case(
            "first byte u64::MAX",
            with_range(format!("bytes={}-", u64::MAX)),
            416,
        ),
        // Syntactically valid: 1*DIGIT has no bound (RFC 9110 §14.1.1).
        case(
            "overflowing first byte",
            with_range("bytes=99999999999999999999999-"),
            416,
        ),
        case(
            "overflowing last byte",
            with_range("bytes=0-99999999999999999999999"),
            206,
        ),
        case(
            "overflowing suffix",
            with_range("bytes=-99999999999999999999999"),
            206,
        ),
        // Range: invalid, so ignored.
        case("reversed range", with_range("bytes=9-3"), 200),
        case("negative first byte", with_range("bytes=-5-10"), 200),
        case("double minus", with_range("bytes=--5"), 200),
        case("plus sign", with_range("bytes=+5-10"), 200),
        case("hex numbers", with_range("bytes=0x0-0x9"), 200),
        case("exponent", with_range("bytes=1e2-"), 200),
        case("two ranges", with_range("bytes=0-1,5-6"), 200),
        case("overlapping ranges", with_range("bytes=0-5,3-9"), 200),
        case(
            "2000 ranges",
            with_range(format!("bytes={}", many_ranges.join(","))),
            200,
        ),
        case("only commas", with_range("bytes=,,,"), 200),
        case("empty Range value", with_range(""), 200),
        case("unit only", with_range("bytes="), 200),
        case("no equals sign", with_range("bytes 0-9"), 200),
        case("other unit", with_range("items=0-9"), 200),
        case(
            "spaces around the equals sign",
            with_range("bytes = 0-9"),
            200,
        ),
        case("spaces inside the range", with_range("bytes=0 - 9"), 200),
        case(
            "non-ASCII byte after the range",
            with_range(b"bytes=0-9\x80"),
            200,
        ),
        case("Latin-1 bytes", with_range(b"bytes=\xff\xfe-"), 200),
        case("fullwidth digits", with_range("bytes=\u{ff10}-9"), 200),
        case("very long garbage", with_range("z".repeat(50_000)), 200),
        // Range: bytes that break the header line itself.
        case("DEL in Range", with_range(b"bytes=0-9\x7f"), 400),
        case("NUL in Range", with_range(b"bytes=0\x00-9"), 400),
        case(
            "lone CR in Range",
            with_range(b"bytes=0-9\rX-Injected: 1"),
            400,
        ),
        case(
            "lone LF in Range starts a header",
            with_range(b"bytes=0-9\nX-Injected: 1"),
            206,
        ),
        // If-Range (with bytes=0-9).
        case(
            "If-Range current ETag",
            get(format!("Range: bytes=0-9\r\nIf-Range: {quoted}\r\n")),
            206,
        ),
        case(
            "If-Range weak ETag",
            get(format!("Range: bytes=0-9\r\nIf-Range: W/{quoted}\r\n")),
            200,
        ),
        case(
            "If-Range other ETag",
            get("Range: bytes=0-9\r\nIf-Range: \"other\"\r\n"),
            200,
        ),
        case(
            "If-Range unquoted ETag",
            get(format!("Range: bytes=0-9\r\nIf-Range: {etag}\r\n")),
            200,
        ),
        case(
            "If-Range garbage",
            get("Range: bytes=0-9\r\nIf-Range: ;;\r\n"),
            200,
        ),
        case(
            "If-Range empty",
            get("Range: bytes=0-9\r\nIf-Range:\r\n"),
            200,
        ),
        case(
            "If-Range old date",
            get("Range: bytes=0-9\r\nIf-Range: Sun, 06 Nov 1994 08:49:37 GMT\r\n"),
            200,
        ),
        case(
            "If-Range non-ASCII",
            get(b"Range: bytes=0-9\r\nIf-Range: \"\xff\"\r\n"),
            200,
        ),
        case(
            "If-Range DEL",
            get(b"Range: bytes=0-9\r\nIf-Range: \"\x7f\"\r\n"),
            400,
        ),
        // If-Match.
        case("If-Match star", get("If-Match: *\r\n"), 200),
        case(
            "If-Match current ETag",
            get(header("If-Match", &quoted)),
            200,
        ),
        case(
            "If-Match in a list",
            get(header("If-Match", format!("\"a\", {quoted}"))),
            200,
        ),
        case("If-Match other ETag", get("If-Match: \"other\"\r\n"), 412),
        case(
            "If-Match weak current ETag",
            get(header("If-Match", format!("W/{quoted}"))),
            412,
        ),
        case("If-Match unquoted", get(header("If-Match", etag)), 412),
        case("If-Match empty", get("If-Match:\r\n"), 412),
        case(
            "If-Match non-ASCII",
            get(b"If-Match: \"\xc3\xa9\"\r\n"),
            412,
        ),
        // If-None-Match.
        case(
            "If-None-Match current ETag",
            get(header("If-None-Match", &quoted)),
            304,
        ),
        case("If-None-Match star", get("If-None-Match: *\r\n"), 304),
        case(
            "If-None-Match weak current ETag",
            get(header("If-None-Match", format!("W/{quoted}"))),
            304,
        ),
        case(
            "If-None-Match other ETag",
            get("If-None-Match: \"other\"\r\n"),
            200,
        ),
        case("If-None-Match garbage", get("If-None-Match: ;;\r\n"), 200),
        case("If-None-Match empty", get("If-None-Match:\r\n"), 200),
        case(
            "If-None-Match DEL",
            get(b"If-None-Match: \"\x7f\"\r\n"),
            400,
        ),
        // Pins.
        case(
            "pin probe",
            request(format!("HEAD {PATH} HTTP/1.1"), header(PIN, "probe")),
            200,
        ),
        case("pin probe by GET", with_pin("probe"), 200),
        case(
            "pinned range",
            get(format!("{PIN}: etag:{etag}\r\nRange: bytes=0-9\r\n")),
            206,
        ),
        case("pinned whole object", with_pin(format!("etag:{etag}")), 200),
        case(
            "pin of another revision",
            with_pin("etag:0123456789abcdef"),
            412,
        ),
        case("unknown pin prefix", with_pin("sha256:abc"), 400),
        case("uppercase PROBE", with_pin("PROBE"), 400),
        case(
            "uppercase pin prefix",
            with_pin(format!("ETAG:{etag}")),
            400,
        ),
        case("empty pin", with_pin(""), 400),
        case("empty etag pin", with_pin("etag:"), 400),
        case("empty version pin", with_pin("version:"), 400),
        case(
            "1025-byte pin",
            with_pin(format!("etag:{}", "a".repeat(1020))),
            400,
        ),
        case(
            "2 KiB pin",
            with_pin(format!("etag:{}", "a".repeat(2 << 10))),
            400,
        ),
        case("pin with a space", with_pin("etag:a b"), 400),
        case("pin with a tab", with_pin("etag:a\tb"), 400),
        case("pin with non-ASCII bytes", with_pin(b"etag:\x80\xff"), 400),
        case("pin with DEL", with_pin(b"etag:a\x7f"), 400),
        case(
            "pin on a bad path",
            request(
                "GET /git/x/../snapshot.tar.zst HTTP/1.1",
                header(PIN, "probe"),
            ),
            400,
        ),
        case(
            "pin on POST",
            request(format!("POST {PATH} HTTP/1.1"), header(PIN, "probe")),
            405,
        ),
    ]
}

fn get_body(method: &str, headers: &str, body: &str) -> Vec<u8> {
    [
        request(format!("{method} {PATH} HTTP/1.1"), headers),
        body.into(),
    ]
    .concat()
}

/// One HTTP/1.x answer read off the wire.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// Names lowercased.
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    fn header_text(&self, name: &str) -> String {
        String::from_utf8_lossy(self.header(name).unwrap_or_default()).into_owned()
    }
}

/// Sends `request` on a new connection and reads answers until `wanted` of them arrived
/// or the server closed the connection; a hang is an `Err` after [`ANSWER_TIMEOUT`].
/// `head`: the (first) request is a HEAD, so its answer has no body.
fn exchange(
    addr: SocketAddr,
    request: &[u8],
    head: bool,
    wanted: usize,
) -> Result<Vec<Answer>, String> {
    let stream = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(|e| format!("set timeout: {e}"))?;
    std::thread::scope(|scope| {
        // The server may answer and close before it has read all of an oversized request:
        // the request is written beside the reader, and a failed write is no failure.
        scope.spawn(|| {
            let _ = (&stream).write_all(request);
        });
        let answers = read_answers(&stream, head, wanted);
        // Unblocks the writer if the server stopped reading but kept the connection.
        let _ = stream.shutdown(Shutdown::Both);
        answers
    })
}

fn read_answers(mut stream: &TcpStream, head: bool, wanted: usize) -> Result<Vec<Answer>, String> {
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    let mut buf = Vec::new();
    let mut chunk = vec![0; 64 << 10];
    let mut answers = Vec::new();
    let hang = |answers: &[Answer]| {
        let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
        format!("no complete answer within {ANSWER_TIMEOUT:?} (answered {statuses:?} before)")
    };
    loop {
        let closed = match stream.read(&mut chunk) {
            Ok(0) => true,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                false
            }
            // A rejection may end in a reset; the answer that came before it counts.
            Err(e) if e.kind() == ErrorKind::ConnectionReset => true,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(hang(&answers));
            }
            Err(e) => return Err(format!("read: {e}")),
        };
        while let Some((answer, used)) = parse_answer(&buf, head, closed)? {
            answers.push(answer);
            buf.drain(..used);
        }
        if closed && !buf.is_empty() {
            return Err(format!(
                "connection closed inside an answer: {:?}",
                String::from_utf8_lossy(&buf[..buf.len().min(200)])
            ));
        }
        if closed || (wanted > 0 && answers.len() >= wanted) {
            return Ok(answers);
        }
        if Instant::now() > deadline {
            return Err(hang(&answers));
        }
    }
}

/// The first complete answer in `buf` and the bytes it took; `None` while incomplete.
fn parse_answer(buf: &[u8], head: bool, closed: bool) -> Result<Option<(Answer, usize)>, String> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let mut lines = buf[..end]
        .split(|&b| b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line));
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix(b"HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| std::str::from_utf8(code).ok()?.parse().ok())
        .ok_or_else(|| {
            format!(
                "not an HTTP/1.x status line: {:?}",
                String::from_utf8_lossy(status_line)
            )
        })?;
    let headers = lines
        .filter_map(|line| {
            let colon = line.iter().position(|&b| b == b':')?;
            let name = String::from_utf8_lossy(&line[..colon]).to_ascii_lowercase();
            Some((name, line[colon + 1..].trim_ascii().to_vec()))
        })
        .collect();
    let mut answer = Answer {
        status,
        headers,
        body: Vec::new(),
    };
    let rest = &buf[end + 4..];
    let body_len = if head || matches!(status, 100..=199 | 204 | 304) {
        0
    } else if let Some(len) = answer.header("content-length") {
        std::str::from_utf8(len)
            .ok()
            .and_then(|len| len.parse().ok())
            .ok_or_else(|| {
                format!(
                    "bad Content-Length {:?}",
                    answer.header_text("content-length")
                )
            })?
    } else if closed {
        rest.len()
    } else {
        return Ok(None);
    };
    if rest.len() < body_len {
        return Ok(None);
    }
    answer.body = rest[..body_len].to_vec();
    Ok(Some((answer, end + 4 + body_len)))
}

/// What an answer of its status must carry whatever was asked: the whole object, the
/// slice its Content-Range names, `bytes */N`, or `Allow: GET, HEAD`.
fn check_answer(answer: &Answer, head: bool, object: &[u8]) -> Result<(), String> {
    let body_ok = |expected: &[u8]| head || answer.body == expected;
    match answer.status {
        200 if answer.header("x-cachew-snapshot-size").is_some() => answer
            .body
            .is_empty()
            .then_some(())
            .ok_or("a probe answer has a body".into()),
        200 if answer.header("content-range").is_some() => {
            Err("a 200 carries Content-Range".into())
        }
        200 => body_ok(object).then_some(()).ok_or(format!(
            "the 200 body ({} bytes) is not the object ({} bytes)",
            answer.body.len(),
            object.len()
        )),
        206 => {
            let (start, end) = content_range(answer, object.len())?;
            body_ok(&object[start..=end]).then_some(()).ok_or(format!(
                "the 206 body is not bytes {start}-{end} of the object"
            ))
        }
        416 => {
            let content_range = answer.header_text("content-range");
            (content_range == format!("bytes */{}", object.len()))
                .then_some(())
                .ok_or(format!("416 with Content-Range {content_range:?}"))
        }
        405 => {
            let allow = answer.header_text("allow");
            (allow == "GET, HEAD")
                .then_some(())
                .ok_or(format!("405 with Allow {allow:?}"))
        }
        _ => Ok(()),
    }
}

/// The inclusive byte span of a 206's `Content-Range: bytes a-b/N`, checked against `size`.
fn content_range(answer: &Answer, size: usize) -> Result<(usize, usize), String> {
    let text = answer.header_text("content-range");
    let parsed = (|| {
        let (span, total) = text.strip_prefix("bytes ")?.split_once('/')?;
        let (start, end) = span.split_once('-')?;
        let (start, end): (usize, usize) = (start.parse().ok()?, end.parse().ok()?);
        (total.parse::<usize>().ok()? == size && start <= end && end < size).then_some((start, end))
    })();
    parsed.ok_or(format!("206 with Content-Range {text:?} for {size} bytes"))
}

/// Rejections must be decided before any S3 request; 404, 412 and 416 need S3's answer.
fn is_rejection(status: u16) -> bool {
    (400..500).contains(&status) && !matches!(status, 404 | 412 | 416)
}

/// HeadObject and GetObject requests this sidecar has sent so far.
async fn s3_requests(sidecar: &Sidecar) -> (f64, f64) {
    let metrics = sidecar.metrics().await;
    let count = |operation: &str| {
        Sidecar::metric(
            &metrics,
            &format!("snapcache_s3_request_duration_seconds_count{{operation=\"{operation}\"}}"),
        )
    };
    (count("head"), count("get"))
}

/// The process has not exited and its admin port answers `/healthz`.
async fn alive(sidecar: &Sidecar) -> Result<(), String> {
    // An exited child stays a zombie until reaped, so its pid alone proves nothing.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", sidecar.pid())).unwrap_or_default();
    if stat
        .rsplit_once(") ")
        .is_none_or(|(_, fields)| fields.starts_with('Z'))
    {
        return Err("the process exited".into());
    }
    let client = reqwest::Client::builder()
        .timeout(ANSWER_TIMEOUT)
        .build()
        .map_err(|e| e.to_string())?;
    let health = client
        .get(sidecar.admin_url("/healthz"))
        .send()
        .await
        .map_err(|e| format!("/healthz: {e}"))?;
    (health.status() == reqwest::StatusCode::OK)
        .then_some(())
        .ok_or(format!("/healthz answered {}", health.status()))
}

/// A bucket holding `object` as the snapshot, and its ETag.
async fn bucket_with(server: &S3Server, object: &[u8]) -> (String, String) {
    let s3 = server.client();
    let bucket = unique_name("hostile");
    create_bucket(&s3, &bucket).await;
    let etag = put_snapshot(&s3, &bucket, REPO, object, COMMIT).await;
    (bucket, etag)
}

fn options(disk_tier: bool) -> SidecarOptions {
    SidecarOptions {
        disk_tier,
        // No revalidation HeadObject in the middle of a run.
        revalidate_after: "1h".into(),
        ..SidecarOptions::default()
    }
}

/// Reads the object once and waits for the disk tier to hold it.
async fn warm(sidecar: &Sidecar, object: &[u8]) {
    let body = reqwest::get(sidecar.url(PATH))
        .await
        .expect("warm-up GET")
        .bytes()
        .await
        .expect("warm-up body");
    assert!(body.as_ref() == object, "warm-up bytes");
    eventually("the disk tier holds the object", async || {
        let bytes = Sidecar::metric(&sidecar.metrics().await, "snapcache_disk_tier_bytes");
        (bytes == object.len() as f64).then_some(())
    })
    .await;
}

fn log_tail(sidecar: &Sidecar) -> String {
    let log = sidecar.log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Runs one case: its exact statuses, what each answer carries, and no S3 request when
/// every answer is a rejection.
async fn run_case(sidecar: &Sidecar, case: &Case, object: &[u8]) -> Result<(), String> {
    let before = s3_requests(sidecar).await;
    let head = case.request.starts_with(b"HEAD ");
    let (addr, request, wanted) = (sidecar.api, case.request.clone(), case.statuses.len());
    let answers = tokio::task::spawn_blocking(move || exchange(addr, &request, head, wanted))
        .await
        .map_err(|e| format!("exchange task: {e}"))??;
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    if statuses != case.statuses {
        return Err(format!(
            "answered {statuses:?}, expected {:?}",
            case.statuses
        ));
    }
    for answer in &answers {
        check_answer(answer, head, object)?;
    }
    if case.statuses.iter().all(|&status| is_rejection(status)) {
        let after = s3_requests(sidecar).await;
        if after != before {
            return Err(format!(
                "the rejected request reached S3: (head, get) went from {before:?} to {after:?}"
            ));
        }
    }
    Ok(())
}

#[tokio::test]
async fn hostile_requests_get_exact_statuses_and_rejections_never_reach_s3() {
    let server = TestEnv::get().s3_server("moto");
    let object = snapshot_bytes(SMALL, 14);
    let (bucket, etag) = bucket_with(&server, &object).await;
    let sidecar = Sidecar::start(&server, &bucket, &options(true));
    warm(&sidecar, &object).await;
    // The warm-up's reads are counted: a rejection's would be too, so the "never reach S3"
    // check below compares counts, not two zeros of a sample that is not exported.
    let (_, gets) = s3_requests(&sidecar).await;
    assert!(gets >= 1.0, "the warm-up's GetObject is not counted");
    let cases = hostile_cases(&etag);
    let mut failures = Vec::new();
    for case in &cases {
        if let Err(why) = run_case(&sidecar, case, &object).await {
            failures.push(format!("{}: {why}", case.name));
        }
        if let Err(why) = alive(&sidecar).await {
            failures.push(format!(
                "{}: the sidecar is down after it ({why}); the remaining cases did not run. Log:\n{}",
                case.name,
                log_tail(&sidecar)
            ));
            break;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} hostile cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// What PROTOCOL.md says a well-formed Range value selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Selects {
    Whole,
    /// Inclusive byte offsets.
    Part(u64, u64),
    Unsatisfiable,
}

/// A generated Range value and, when it is well-formed, what it must select.
#[derive(Clone)]
struct RangeValue {
    bytes: Vec<u8>,
    selects: Option<Selects>,
}

impl std::fmt::Debug for RangeValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "b\"{}\" ({:?})", self.bytes.escape_ascii(), self.selects)
    }
}

/// One range-spec and what it selects alone in an object of `size` bytes.
fn range_spec(size: u64) -> impl Strategy<Value = (String, Selects)> {
    // Offsets near both ends, anywhere, and far past the end.
    let offset = || {
        prop_oneof![
            0..16u64,
            size - 16..size + 16,
            0..2 * size,
            0..1_000_000_000_000_000_000u64
        ]
    };
    prop_oneof![
        (offset(), offset()).prop_map(move |(first, last)| {
            let selects = if first > last {
                Selects::Whole
            } else if first >= size {
                Selects::Unsatisfiable
            } else {
                Selects::Part(first, last.min(size - 1))
            };
            (format!("{first}-{last}"), selects)
        }),
        offset().prop_map(move |first| {
            let selects = if first >= size {
                Selects::Unsatisfiable
            } else {
                Selects::Part(first, size - 1)
            };
            (format!("{first}-"), selects)
        }),
        offset().prop_map(move |len| {
            let selects = if len == 0 {
                Selects::Unsatisfiable
            } else {
                Selects::Part(size - len.min(size), size - 1)
            };
            (format!("-{len}"), selects)
        }),
    ]
}

fn range_value(size: u64) -> impl Strategy<Value = RangeValue> {
    let unit = prop_oneof![4 => Just("bytes="), 1 => Just("BYTES="), 1 => Just("Bytes=")];
    let single = (unit, range_spec(size)).prop_map(|(unit, (spec, selects))| RangeValue {
        bytes: format!("{unit}{spec}").into_bytes(),
        selects: Some(selects),
    });
    let several = prop::collection::vec(range_spec(size), 2..40).prop_map(|specs| {
        let specs: Vec<String> = specs.into_iter().map(|(spec, _)| spec).collect();
        RangeValue {
            bytes: format!("bytes={}", specs.join(",")).into_bytes(),
            selects: Some(Selects::Whole),
        }
    });
    let unchecked = |bytes: Vec<u8>| RangeValue {
        bytes,
        selects: None,
    };
    let near_miss = "bytes=[0-9, \\-]{0,24}".prop_map(move |text| unchecked(text.into_bytes()));
    let printable = "[ -~]{0,48}".prop_map(move |text| unchecked(text.into_bytes()));
    // Every byte a header value may hold: HTAB, SP, visible ASCII and obs-text.
    let header_byte = prop_oneof![Just(b'\t'), 0x20u8..=0x7e, 0x80u8..=0xff];
    let header_bytes = prop::collection::vec(header_byte, 0..64).prop_map(unchecked);
    prop_oneof![
        4 => single,
        1 => several,
        1 => near_miss,
        1 => printable,
        1 => header_bytes,
    ]
}

/// One GET with `range` (and the pin token): a 200 of the whole object, a 206 of exactly
/// the bytes its Content-Range names, or a 416 with `bytes */N`; what a well-formed value
/// selects must match.
fn check_range(
    addr: SocketAddr,
    pin: Option<&str>,
    object: &[u8],
    range: &RangeValue,
) -> Result<(), String> {
    let mut headers = header("Range", &range.bytes);
    if let Some(token) = pin {
        headers.extend(header(PIN, token));
    }
    let answers = exchange(addr, &get(headers), false, 1)?;
    let answer = answers
        .first()
        .ok_or("the connection closed without an answer")?;
    check_answer(answer, false, object)?;
    let selected = match answer.status {
        200 => Selects::Whole,
        206 => {
            let (start, end) = content_range(answer, object.len())?;
            Selects::Part(start as u64, end as u64)
        }
        416 => Selects::Unsatisfiable,
        other => return Err(format!("status {other}")),
    };
    if let Some(expected) = range.selects
        && selected != expected
    {
        return Err(format!("selected {selected:?}, expected {expected:?}"));
    }
    if let Some(token) = pin
        && answer.header(PIN) != Some(token.as_bytes())
    {
        return Err(format!("pin echoed as {:?}", answer.header_text(PIN)));
    }
    Ok(())
}

/// `cases` generated Range values from a fixed seed, each checked by [`check_range`].
fn fuzz_ranges(
    addr: SocketAddr,
    pin: Option<&str>,
    object: &[u8],
    seed: u64,
    cases: u32,
) -> Result<(), String> {
    let config = Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        // Each shrink step is a request: bounded, it still finds a short failing value.
        max_shrink_iters: 200,
        ..Config::default()
    };
    TestRunner::new(config)
        .run(&range_value(object.len() as u64), |range| {
            check_range(addr, pin, object, &range).map_err(TestCaseError::fail)
        })
        .map_err(|e| e.to_string())
}

/// The token a probe of `sidecar` hands out.
async fn probe(sidecar: &Sidecar) -> String {
    let response = reqwest::Client::new()
        .head(sidecar.url(PATH))
        .header(PIN, "probe")
        .send()
        .await
        .expect("probe");
    assert_eq!(response.status(), reqwest::StatusCode::OK, "probe");
    response
        .headers()
        .get(PIN)
        .and_then(|v| v.to_str().ok())
        .expect("probe answer has a token")
        .to_owned()
}

#[tokio::test]
async fn arbitrary_range_values_get_whole_exact_or_unsatisfiable_answers() {
    let server = TestEnv::get().s3_server("moto");
    let object = Arc::new(snapshot_bytes(1 << 20, 15));
    let (bucket, _) = bucket_with(&server, &object).await;
    let disk = Sidecar::start(&server, &bucket, &options(true));
    let s3_only = Sidecar::start(&server, &bucket, &options(false));
    warm(&disk, &object).await;
    let arms = [
        ("disk tier, plain GETs", disk.api, None, 1),
        (
            "disk sidecar, pinned",
            disk.api,
            Some(probe(&disk).await),
            2,
        ),
        (
            "no disk tier, pinned",
            s3_only.api,
            Some(probe(&s3_only).await),
            3,
        ),
    ];
    let mut failures = Vec::new();
    for (label, addr, pin, seed) in arms {
        let object = object.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            fuzz_ranges(addr, pin.as_deref(), &object, seed, 300)
        })
        .await
        .expect("fuzz task");
        if let Err(why) = outcome {
            failures.push(format!("{label}: {why}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
