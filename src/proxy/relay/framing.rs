//! HTTP/1.1 message framing for the relay: request and response heads parsed with
//! `httparse` and rewritten for the next hop, and the chunked transfer coding.
//!
//! The acceptance rules are hyper's server and client rules (hyper 1.x,
//! `proto/h1/role.rs`), so that moving the REST listener off hyper changes nothing a
//! client can observe: `Transfer-Encoding` whose last coding is not `chunked` (or on
//! HTTP/1.0) is refused with 400; `Content-Length` must be plain digits, repeated
//! values must agree (400 otherwise, and only one is forwarded); `Transfer-Encoding`
//! together with `Content-Length` is read as chunked, the length is dropped and the
//! connection closes after the answer (RFC 9112 §6.3); obs-fold and invalid field
//! bytes are refused by the parser (400); more than 100 fields or a head over
//! hyper's read-buffer limit gives 431; a target over 65 534 bytes gives 414.

use crate::proxy::headers::{connection_lists, has_token, is_hop_by_hop};
use std::io::Write;

/// Header fields a head may carry (hyper's default); more is 431.
pub const MAX_HEADERS: usize = 100;
/// Largest head accepted, request or response (hyper's default read-buffer limit).
pub const MAX_HEAD_BYTES: usize = 8192 + 4096 * 100;
/// Longest request target (hyper's `MAX_URI_LEN`); longer is 414.
const MAX_TARGET_BYTES: usize = (u16::MAX - 1) as usize;
/// Longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4096;
/// Chunk-extension bytes accepted over one body (hyper's limit).
const MAX_CHUNK_EXTENSIONS: usize = 16 << 10;
/// Trailer section accepted after the last chunk.
const MAX_TRAILERS: usize = 16 << 10;

/// How a request's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestBody {
    /// No body (`Content-Length: 0` or neither field).
    Empty,
    Length(u64),
    Chunked,
}

/// How an upstream response's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseBody {
    /// No body: HEAD, 1xx, 204, 304.
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection.
    UntilClose,
}

/// Why a request head is refused; each maps to hyper's automatic answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    Malformed,
    TooLarge,
    TargetTooLong,
    /// `CONNECT`: mltap is a reverse proxy for TF Serving, never a tunnel.
    Connect,
}

impl HeadError {
    /// The answer hyper's server gives for the same input.
    pub fn response(self) -> &'static [u8] {
        match self {
            HeadError::Malformed => b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            HeadError::TooLarge => {
                b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
            }
            HeadError::TargetTooLong => b"HTTP/1.1 414 URI Too Long\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
            HeadError::Connect => {
                b"HTTP/1.1 405 Method Not Allowed\r\nallow: GET, HEAD, POST\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
            }
        }
    }
}

/// What the relay keeps of a parsed request head once its bytes are rewritten.
#[derive(Debug)]
pub struct RequestHead {
    /// Bytes of the head in the client's buffer.
    pub len: usize,
    pub method: http::Method,
    /// The target as sent upstream (origin form); its path names the route.
    pub target: http::uri::PathAndQuery,
    pub body: RequestBody,
    /// HTTP/1.0 client: answered in HTTP/1.0, never with chunked framing.
    pub http10: bool,
    /// The client allows the connection to stay open after this exchange.
    pub keep_alive: bool,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
    /// Value of the request-id field, when present and visible ASCII.
    pub request_id: Option<String>,
    /// `Content-Encoding`, when `want_details` was set.
    pub content_encoding: Option<String>,
}

/// What the rewrite of a request head needs to know.
pub struct RequestContext<'a> {
    /// Added as `Host` when the client sent none (as hyper's client does).
    pub upstream_authority: &'a str,
    /// The configured request-id field, lowercase.
    pub request_id_header: &'a str,
}

/// Parses the request head at the start of `input`. On success the head to send
/// upstream (hop-by-hop fields removed, framing normalised) is written to `out`.
/// `Ok(None)`: the head is not complete yet.
pub fn parse_request(
    input: &[u8],
    context: &RequestContext<'_>,
    out: &mut Vec<u8>,
) -> Result<Option<RequestHead>, HeadError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut fields);
    let len = match request.parse(input) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if input.len() >= MAX_HEAD_BYTES => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Malformed),
    };
    if len > MAX_HEAD_BYTES {
        return Err(HeadError::TooLarge);
    }
    let (Some(method), Some(target), Some(version)) = (request.method, request.path, request.version) else {
        return Err(HeadError::Malformed);
    };
    if target.len() > MAX_TARGET_BYTES {
        return Err(HeadError::TargetTooLong);
    }
    let method = http::Method::from_bytes(method.as_bytes()).map_err(|_| HeadError::Malformed)?;
    if method == http::Method::CONNECT {
        return Err(HeadError::Connect);
    }
    // The same URI validation hyper's server applies; absolute-form and `*` targets
    // become an origin-form path, as hyper's client sends them.
    let upstream_target = if target.starts_with('/') {
        http::uri::PathAndQuery::try_from(target).map_err(|_| HeadError::Malformed)?
    } else {
        let uri = http::Uri::try_from(target).map_err(|_| HeadError::Malformed)?;
        uri.path_and_query()
            .filter(|pq| pq.as_str().starts_with('/'))
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"))
    };
    let http10 = version == 0;
    let headers = &*request.headers;

    let mut keep_alive = !http10;
    let mut saw_close = false;
    let mut content_length: Option<u64> = None;
    let mut saw_content_length = false;
    let mut transfer_encoding = false;
    let mut chunked = false;
    let mut expect_continue = false;
    let mut has_host = false;
    let mut request_id = None;
    let mut content_encoding = None;
    for field in headers {
        let name = field.name.as_bytes();
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if http10 {
                return Err(HeadError::Malformed);
            }
            transfer_encoding = true;
            content_length = None;
            chunked = last_coding_is_chunked(field.value);
        } else if name.eq_ignore_ascii_case(b"content-length") {
            saw_content_length = true;
            if transfer_encoding {
                continue;
            }
            let len = digits(field.value).ok_or(HeadError::Malformed)?;
            if content_length.is_some_and(|previous| previous != len) {
                return Err(HeadError::Malformed);
            }
            content_length = Some(len);
        } else if name.eq_ignore_ascii_case(b"connection") {
            if saw_close || has_token(field.value, b"close") {
                saw_close = true;
                keep_alive = false;
            } else if !keep_alive {
                keep_alive = has_token(field.value, b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case(b"expect") {
            expect_continue = field.value.eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case(b"host") {
            // RFC 9112 section 3.2: a second Host field is answered 400, not forwarded.
            if has_host {
                return Err(HeadError::Malformed);
            }
            has_host = true;
        } else if name.eq_ignore_ascii_case(context.request_id_header.as_bytes()) {
            if request_id.is_none() {
                request_id = visible_text(field.value);
            }
        } else if name.eq_ignore_ascii_case(b"content-encoding") && content_encoding.is_none() {
            content_encoding = visible_text(field.value);
        }
    }
    if transfer_encoding && !chunked {
        return Err(HeadError::Malformed);
    }
    // RFC 9112 section 3.2: an HTTP/1.1 request without Host is answered 400.
    if !has_host && !http10 {
        return Err(HeadError::Malformed);
    }
    if transfer_encoding && saw_content_length {
        keep_alive = false;
    }
    let body = match (chunked, content_length) {
        (true, _) => RequestBody::Chunked,
        (false, Some(0)) | (false, None) => RequestBody::Empty,
        (false, Some(len)) => RequestBody::Length(len),
    };

    out.clear();
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(upstream_target.as_str().as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let connection_values = || headers.iter().filter(|f| f.name.eq_ignore_ascii_case("connection")).map(|f| f.value);
    let mut wrote_length = false;
    for field in headers {
        let name = field.name.as_bytes();
        if is_hop_by_hop(name) {
            continue;
        }
        let is_length = name.eq_ignore_ascii_case(b"content-length");
        if is_length {
            // Chunked framing replaces it; repeated equal values are sent once.
            if chunked || wrote_length {
                continue;
            }
            wrote_length = true;
        } else if !name.eq_ignore_ascii_case(b"host") && connection_lists(connection_values(), name) {
            continue;
        }
        push_field(out, name, field.value);
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !has_host {
        push_field(out, b"host", context.upstream_authority.as_bytes());
    }
    out.extend_from_slice(b"\r\n");

    Ok(Some(RequestHead {
        len,
        target: upstream_target,
        method,
        body,
        http10,
        keep_alive,
        expect_continue,
        request_id,
        content_encoding,
    }))
}

/// Why an upstream response head cannot be relayed (answered 502).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamHeadError(pub &'static str);

/// What the relay keeps of a parsed upstream response head.
#[derive(Debug)]
pub struct ResponseHead {
    /// Bytes of the head in the upstream buffer.
    pub len: usize,
    pub status: u16,
    /// 1xx other than 101: skipped, as hyper's client does; the real answer follows.
    pub interim: bool,
    pub body: ResponseBody,
    /// The upstream connection may serve another request afterwards.
    pub upstream_keep_alive: bool,
    pub content_encoding: Option<String>,
}

/// How the answer to the client is framed and whether its connection stays open.
pub struct ClientSide<'a> {
    pub http10: bool,
    /// The request was `HEAD`: the response has no body whatever its fields say.
    pub head_request: bool,
    /// The connection stays open after this answer, if the framing allows it.
    pub keep_alive: bool,
    /// A field to add as `(name, value)`: the generated request id, when returned.
    pub extra_field: Option<(&'a str, &'a str)>,
}

/// How the response is written to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFraming {
    /// Re-encode the body with chunked framing (length unknown, HTTP/1.1 client).
    pub chunked: bool,
    /// Close the client connection after this answer.
    pub close: bool,
}

/// Parses the upstream response head at the start of `input`; when it is a final
/// response, writes the head for the client to `out`. `Ok(None)`: not complete yet.
pub fn parse_response(
    input: &[u8],
    client: &ClientSide<'_>,
    want_encoding: bool,
    out: &mut Vec<u8>,
) -> Result<Option<(ResponseHead, ClientFraming)>, UpstreamHeadError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut fields);
    let len = match response.parse(input) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if input.len() >= MAX_HEAD_BYTES => {
            return Err(UpstreamHeadError("response head too large"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(UpstreamHeadError("invalid response head")),
    };
    let (Some(version), Some(status)) = (response.version, response.code) else {
        return Err(UpstreamHeadError("invalid response head"));
    };
    let status_code = http::StatusCode::from_u16(status).map_err(|_| UpstreamHeadError("invalid status code"))?;
    let headers = &*response.headers;
    if status_code.is_informational() && status != 101 {
        let head = ResponseHead {
            len,
            status,
            interim: true,
            body: ResponseBody::Empty,
            upstream_keep_alive: true,
            content_encoding: None,
        };
        return Ok(Some((head, ClientFraming { chunked: false, close: false })));
    }

    let mut upstream_keep_alive = version == 1;
    let mut saw_close = false;
    let mut transfer_encoding = false;
    let mut chunked = false;
    let mut content_length: Option<u64> = None;
    let mut content_encoding = None;
    for field in headers {
        let name = field.name.as_bytes();
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            if version == 0 {
                return Err(UpstreamHeadError("transfer-encoding on an HTTP/1.0 response"));
            }
            transfer_encoding = true;
            chunked = last_coding_is_chunked(field.value);
        } else if name.eq_ignore_ascii_case(b"content-length") {
            for item in field.value.split(|&b| b == b',') {
                let len = digits(item.trim_ascii()).ok_or(UpstreamHeadError("invalid content-length"))?;
                if content_length.is_some_and(|previous| previous != len) {
                    return Err(UpstreamHeadError("conflicting content-length"));
                }
                content_length = Some(len);
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            if saw_close || has_token(field.value, b"close") {
                saw_close = true;
                upstream_keep_alive = false;
            } else if version == 0 {
                upstream_keep_alive = has_token(field.value, b"keep-alive");
            }
        } else if want_encoding && name.eq_ignore_ascii_case(b"content-encoding") && content_encoding.is_none() {
            content_encoding = visible_text(field.value);
        }
    }
    let bodiless = client.head_request || matches!(status, 101 | 204 | 304);
    let body = if bodiless {
        ResponseBody::Empty
    } else if transfer_encoding {
        if chunked {
            ResponseBody::Chunked
        } else {
            ResponseBody::UntilClose
        }
    } else {
        match content_length {
            Some(len) => ResponseBody::Length(len),
            None => ResponseBody::UntilClose,
        }
    };
    if body == ResponseBody::UntilClose || status == 101 {
        upstream_keep_alive = false;
    }
    let unknown_length = matches!(body, ResponseBody::Chunked | ResponseBody::UntilClose);
    let framing = ClientFraming {
        chunked: unknown_length && !client.http10,
        close: !client.keep_alive || (unknown_length && client.http10) || status == 101,
    };

    out.clear();
    out.extend_from_slice(if client.http10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
    out.extend_from_slice(status_code.as_str().as_bytes());
    out.push(b' ');
    match response.reason {
        Some(reason) if !reason.is_empty() => out.extend_from_slice(reason.as_bytes()),
        _ => out.extend_from_slice(status_code.canonical_reason().unwrap_or("<none>").as_bytes()),
    }
    out.extend_from_slice(b"\r\n");
    let connection_values = || headers.iter().filter(|f| f.name.eq_ignore_ascii_case("connection")).map(|f| f.value);
    let mut wrote_length = false;
    for field in headers {
        let name = field.name.as_bytes();
        if is_hop_by_hop(name) || connection_lists(connection_values(), name) {
            continue;
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            // A body of known length gets one normalised field below; a bodiless
            // answer (HEAD, 204, 304) keeps the upstream's own, once.
            if body != ResponseBody::Empty || wrote_length || transfer_encoding {
                continue;
            }
            wrote_length = true;
        }
        push_field(out, name, field.value);
    }
    match body {
        ResponseBody::Length(len) => {
            let _ = write!(out, "content-length: {len}\r\n");
        }
        ResponseBody::Chunked | ResponseBody::UntilClose if framing.chunked => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        _ => {}
    }
    if let Some((name, value)) = client.extra_field {
        push_field(out, name.as_bytes(), value.as_bytes());
    }
    if framing.close && !client.http10 {
        out.extend_from_slice(b"connection: close\r\n");
    } else if !framing.close && client.http10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let head = ResponseHead { len, status, interim: false, body, upstream_keep_alive, content_encoding };
    Ok(Some((head, framing)))
}

fn push_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// hyper's `is_chunked_`: the last comma-separated coding is `chunked`.
fn last_coding_is_chunked(value: &[u8]) -> bool {
    value.rsplit(|&b| b == b',').next().is_some_and(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// A Content-Length value: ASCII digits only (no sign, no spaces, no list), no overflow.
fn digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |acc, &b| match b {
        b'0'..=b'9' => acc.checked_mul(10)?.checked_add(u64::from(b - b'0')),
        _ => None,
    })
}

/// A field value as text when it is visible ASCII (`HeaderValue::to_str`'s rule).
fn visible_text(value: &[u8]) -> Option<String> {
    value.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b)).then(|| String::from_utf8_lossy(value).into_owned())
}

/// A malformed chunked body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkError(pub &'static str);

impl std::fmt::Display for ChunkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// One step of chunked decoding over the unread bytes of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkStep {
    /// The first `n` bytes are framing: consume them.
    Framing(usize),
    /// The first `n` bytes are body data: pass them on, then consume them.
    Data(usize),
    /// More bytes are needed.
    NeedMore,
    /// The body ended after the first `n` bytes (last chunk and trailers, which are
    /// dropped as hyper drops them).
    Done(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
    Done,
}

/// Decodes the chunked transfer coding; chunk sizes are parsed with
/// `httparse::parse_chunk_size`, plus hyper's rule that a size has at least one digit.
#[derive(Debug)]
pub struct ChunkedDecoder {
    state: ChunkState,
    /// Chunk-extension bytes still accepted on this body.
    extension_budget: usize,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder { state: ChunkState::Size, extension_budget: MAX_CHUNK_EXTENSIONS }
    }
}

impl ChunkedDecoder {
    #[cfg(test)]
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    pub fn step(&mut self, input: &[u8]) -> Result<ChunkStep, ChunkError> {
        match self.state {
            ChunkState::Done => Ok(ChunkStep::Done(0)),
            ChunkState::Size => {
                let Some(&first) = input.first() else { return Ok(ChunkStep::NeedMore) };
                if !first.is_ascii_hexdigit() {
                    return Err(ChunkError("invalid chunk size line: missing size digit"));
                }
                let Some(lf) = input.iter().take(MAX_CHUNK_LINE).position(|&b| b == b'\n') else {
                    return if input.len() >= MAX_CHUNK_LINE {
                        Err(ChunkError("chunk size line too long"))
                    } else {
                        Ok(ChunkStep::NeedMore)
                    };
                };
                let line = &input[..=lf];
                let size = match httparse::parse_chunk_size(line) {
                    Ok(httparse::Status::Complete((used, size))) if used == line.len() => size,
                    _ => return Err(ChunkError("invalid chunk size line")),
                };
                let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
                let extension = line.len().saturating_sub(digits + 2);
                self.extension_budget =
                    self.extension_budget.checked_sub(extension).ok_or(ChunkError("chunk extensions too large"))?;
                self.state = if size == 0 { ChunkState::Trailers } else { ChunkState::Data(size) };
                Ok(ChunkStep::Framing(line.len()))
            }
            ChunkState::Data(remaining) => {
                if input.is_empty() {
                    return Ok(ChunkStep::NeedMore);
                }
                let n = usize::try_from(remaining).unwrap_or(usize::MAX).min(input.len());
                let left = remaining - n as u64;
                self.state = if left == 0 { ChunkState::DataEnd } else { ChunkState::Data(left) };
                Ok(ChunkStep::Data(n))
            }
            ChunkState::DataEnd => match input {
                [b'\r', b'\n', ..] => {
                    self.state = ChunkState::Size;
                    Ok(ChunkStep::Framing(2))
                }
                [] | [b'\r'] => Ok(ChunkStep::NeedMore),
                _ => Err(ChunkError("invalid chunk body CR/LF")),
            },
            ChunkState::Trailers => {
                let mut fields = [httparse::EMPTY_HEADER; 64];
                match httparse::parse_headers(input, &mut fields) {
                    Ok(httparse::Status::Complete((used, _))) => {
                        self.state = ChunkState::Done;
                        Ok(ChunkStep::Done(used))
                    }
                    Ok(httparse::Status::Partial) if input.len() < MAX_TRAILERS => Ok(ChunkStep::NeedMore),
                    Ok(httparse::Status::Partial) => Err(ChunkError("trailers too large")),
                    Err(_) => Err(ChunkError("invalid trailers")),
                }
            }
        }
    }
}

/// Appends one chunk of `data` in chunked framing.
pub fn push_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The last chunk, with no trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> RequestContext<'static> {
        RequestContext { upstream_authority: "tfs:8501", request_id_header: "x-request-id" }
    }

    /// Parses `head`, given a `Host: h` field after its request line unless it has one.
    fn request(head: &str) -> Result<(RequestHead, String), HeadError> {
        let mut out = Vec::new();
        let head = match head.to_ascii_lowercase().contains("\r\nhost:") {
            true => head.to_string(),
            false => head.replacen("\r\n", "\r\nHost: h\r\n", 1),
        };
        let parsed = parse_request(head.as_bytes(), &context(), &mut out)?.expect("complete head");
        Ok((parsed, String::from_utf8(out).unwrap()))
    }

    #[test]
    fn host_must_be_given_once_and_connect_is_refused() {
        let parse = |head: &str| parse_request(head.as_bytes(), &context(), &mut Vec::new()).map(|h| h.is_some());
        assert_eq!(parse("GET /a HTTP/1.1\r\n\r\n"), Err(HeadError::Malformed));
        assert_eq!(parse("GET /a HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n"), Err(HeadError::Malformed));
        assert_eq!(parse("CONNECT tfs:8501 HTTP/1.1\r\nHost: tfs:8501\r\n\r\n"), Err(HeadError::Connect));
        assert_eq!(parse("GET /a HTTP/1.0\r\n\r\n"), Ok(true));
        let mut out = Vec::new();
        parse_request(b"GET /a HTTP/1.0\r\n\r\n", &context(), &mut out).unwrap();
        assert!(String::from_utf8(out).unwrap().contains("host: tfs:8501\r\n"));
    }

    #[test]
    fn content_length_and_transfer_encoding_follow_hypers_rules() {
        let (head, out) =
            request("POST /a HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
        assert_eq!((head.body, head.keep_alive), (RequestBody::Chunked, false));
        assert!(!out.to_ascii_lowercase().contains("content-length"), "{out}");
        assert!(out.ends_with("Host: h\r\ntransfer-encoding: chunked\r\n\r\n"), "{out}");
        let (head, out) = request("POST /a HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n").unwrap();
        assert_eq!(head.body, RequestBody::Length(2));
        assert_eq!(out.matches("Content-Length").count(), 1, "{out}");
        for refused in [
            "POST /a HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
            "POST /a HTTP/1.1\r\nContent-Length: 2, 2\r\n\r\n",
            "POST /a HTTP/1.1\r\nContent-Length: +2\r\n\r\n",
            "POST /a HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST /a HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST /a HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /a HTTP/1.1\r\nX-A: a\r\n b\r\n\r\n",
            "GET /a HTTP/1.1\r\nBad Name: x\r\n\r\n",
            "G(T /a HTTP/1.1\r\n\r\n",
            "GET /a HTTP/2.0\r\n\r\n",
        ] {
            assert_eq!(request(refused).unwrap_err(), HeadError::Malformed, "{refused:?}");
        }
    }

    #[test]
    fn hop_by_hop_fields_are_dropped_and_the_rest_kept_in_order() {
        let (head, out) = request(
            "GET http://elsewhere/v1/models/m?x=1 HTTP/1.1\r\nHost: h\r\nConnection: X-Secret\r\nX-Secret: 1\r\nTE: gzip\r\nX-Request-Id: abc\r\nX-B: 2\r\n\r\n",
        )
        .unwrap();
        assert_eq!(out, "GET /v1/models/m?x=1 HTTP/1.1\r\nHost: h\r\nX-Request-Id: abc\r\nX-B: 2\r\n\r\n");
        assert_eq!((head.target.path(), head.request_id.as_deref()), ("/v1/models/m", Some("abc")));
        assert!(head.keep_alive);
    }

    #[test]
    fn a_head_with_too_many_fields_or_bytes_is_too_large() {
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(request(&format!("GET / HTTP/1.1\r\n{many}\r\n")).unwrap_err(), HeadError::TooLarge);
        let partial = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(MAX_HEAD_BYTES));
        assert_eq!(parse_request(partial.as_bytes(), &context(), &mut Vec::new()).unwrap_err(), HeadError::TooLarge);
        assert!(parse_request(b"GET / HTTP/1.1\r\nX: a", &context(), &mut Vec::new()).unwrap().is_none());
    }

    fn response(head: &str, client: &ClientSide<'_>) -> (ResponseHead, ClientFraming, String) {
        let mut out = Vec::new();
        let (parsed, framing) = parse_response(head.as_bytes(), client, true, &mut out).unwrap().unwrap();
        (parsed, framing, String::from_utf8(out).unwrap())
    }

    const KEEP: ClientSide<'static> =
        ClientSide { http10: false, head_request: false, keep_alive: true, extra_field: None };

    #[test]
    fn a_chunked_response_is_rechunked_without_its_hop_by_hop_fields() {
        let (head, framing, out) = response(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: x-hop\r\nx-hop: 1\r\nKeep-Alive: timeout=5\r\nContent-Type: a\r\n\r\n",
            &KEEP,
        );
        assert_eq!((head.body, head.upstream_keep_alive), (ResponseBody::Chunked, true));
        assert_eq!(framing, ClientFraming { chunked: true, close: false });
        assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Type: a\r\ntransfer-encoding: chunked\r\n\r\n");
    }

    #[test]
    fn bodiless_and_close_delimited_responses_are_framed_for_the_client() {
        let head_client = ClientSide { head_request: true, ..KEEP };
        let (head, _, out) = response("HTTP/1.1 200 OK\r\nContent-Length: 54\r\n\r\n", &head_client);
        assert_eq!(head.body, ResponseBody::Empty);
        assert_eq!(out, "HTTP/1.1 200 OK\r\nContent-Length: 54\r\n\r\n");
        let (head, _, _) = response("HTTP/1.1 204 No Content\r\n\r\n", &KEEP);
        assert_eq!(head.body, ResponseBody::Empty);
        let old = ClientSide { http10: true, ..KEEP };
        let (head, framing, out) = response("HTTP/1.1 200 OK\r\n\r\n", &old);
        assert_eq!((head.body, head.upstream_keep_alive), (ResponseBody::UntilClose, false));
        assert_eq!(framing, ClientFraming { chunked: false, close: true });
        assert_eq!(out, "HTTP/1.0 200 OK\r\n\r\n");
        let (_, framing, out) = response("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", &old);
        assert!(!framing.close);
        assert_eq!(out, "HTTP/1.0 200 OK\r\ncontent-length: 0\r\nconnection: keep-alive\r\n\r\n");
        let (head, _, _) = response("HTTP/1.1 100 Continue\r\n\r\n", &KEEP);
        assert!(head.interim);
    }

    #[test]
    fn conflicting_response_lengths_are_refused() {
        let mut out = Vec::new();
        let refused = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n", &KEEP, false, &mut out);
        assert!(refused.is_err());
    }

    fn decode(input: &[u8]) -> Result<(Vec<u8>, usize), ChunkError> {
        let mut decoder = ChunkedDecoder::default();
        let (mut data, mut at) = (Vec::new(), 0);
        loop {
            match decoder.step(&input[at..])? {
                ChunkStep::Framing(n) => at += n,
                ChunkStep::Data(n) => {
                    data.extend_from_slice(&input[at..at + n]);
                    at += n;
                }
                ChunkStep::Done(n) => return Ok((data, at + n)),
                ChunkStep::NeedMore => return Err(ChunkError("incomplete")),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_and_bad_sizes_are_refused() {
        let (data, used) = decode(b"3;ext=1\r\nabc\r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\nNEXT").unwrap();
        assert_eq!((data.as_slice(), used), (b"abc0123456789".as_slice(), 46));
        for bad in [
            b"zz\r\nab\r\n0\r\n\r\n".as_slice(),
            b"\r\nab\r\n0\r\n\r\n",
            b";x\r\nab\r\n0\r\n\r\n",
            b"2\r\nabXX0\r\n\r\n",
            b"2\nab\r\n0\r\n\r\n",
            b"2 3\r\nab\r\n0\r\n\r\n",
            b"-2\r\nab\r\n0\r\n\r\n",
            b"10000000000000000\r\n",
        ] {
            assert!(decode(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn chunked_decoding_survives_any_split_of_its_input() {
        let body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
        for split in 0..body.len() {
            let mut decoder = ChunkedDecoder::default();
            let mut buffer = Vec::new();
            let mut data = Vec::new();
            for part in [&body[..split], &body[split..]] {
                buffer.extend_from_slice(part);
                loop {
                    match decoder.step(&buffer).unwrap() {
                        ChunkStep::Framing(n) => drop(buffer.drain(..n)),
                        ChunkStep::Data(n) => data.extend(buffer.drain(..n)),
                        ChunkStep::Done(n) => {
                            buffer.drain(..n);
                            break;
                        }
                        ChunkStep::NeedMore => break,
                    }
                }
            }
            assert!(decoder.is_done(), "split at {split}");
            assert_eq!(data, b"hello world");
        }
    }
}
