//! `POST /v1/labels` on the admin port: a JSON array or NDJSON of `{"id", "label"}`.
//!
//! Valid entries are joined even when others are not; the answer counts `accepted`,
//! `unmatched` and `late` and lists `rejected` entries with their index and reason. A
//! body that is not JSON gets 400 saying where it broke (entry, line, column); a body
//! over `max_body_bytes` gets 413.
//!
//! Labels feed accuracy metrics, so the route is closed unless configured otherwise
//! (docs/security.md): a request needs `Authorization: Bearer <token>` (scheme in any
//! case) when `labels.token_env` names the token, and every request is refused (401)
//! when neither a token nor `labels.allow_unauthenticated = true` is configured. A
//! browser cannot forge a post from another site: the body must be declared JSON
//! (`application/json` or an NDJSON type, which a cross-site form cannot send without
//! a CORS preflight that mltap never grants), and a request whose `Origin` or
//! `Sec-Fetch-Site` shows another site gets 403. The token and the labels are never
//! logged.

use super::service::{LabelEntry, LabelService, RawLabel, Rejected, MAX_ID_BYTES};
use super::LabelError;
use crate::admin::{AdminBody, AdminFuture, AdminRequest, AdminResponse, AdminRoute};
use bytes::Bytes;
use http::{header, Method, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use serde::de::{SeqAccess, Visitor};
use serde::Deserializer;
use serde_json::Value;
use std::cell::Cell;
use std::sync::Arc;
use std::time::SystemTime;

/// The path the route serves.
pub const LABELS_PATH: &str = "/v1/labels";

/// A body that could not be read as labels at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyError(pub String);

/// Parses a label body: entries that have the right shape, and those that do not.
/// The format is a JSON array when the first non-blank byte is `[`, else NDJSON.
pub fn parse_body(body: &[u8]) -> Result<(Vec<LabelEntry>, Vec<Rejected>), BodyError> {
    let start = body.iter().position(|b| !b.is_ascii_whitespace());
    let values = match start.map(|i| body[i]) {
        None => return Err(BodyError("body is empty: expected a JSON array or NDJSON of {\"id\", \"label\"}".into())),
        Some(b'[') => parse_array(body)?,
        Some(_) => parse_ndjson(body)?,
    };
    let mut entries = Vec::with_capacity(values.len());
    let mut rejected = Vec::new();
    for (index, value) in values.into_iter().enumerate() {
        match entry(index, value) {
            Ok(e) => entries.push(e),
            Err(error) => rejected.push(Rejected { index, error }),
        }
    }
    Ok((entries, rejected))
}

/// Parses an array element by element, so a syntax error names the entry it is in.
fn parse_array(body: &[u8]) -> Result<Vec<Value>, BodyError> {
    struct Entries<'a>(&'a Cell<usize>);
    impl<'de> Visitor<'de> for Entries<'_> {
        type Value = Vec<Value>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON array of label entries")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<Value>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
            loop {
                self.0.set(out.len());
                match seq.next_element::<Value>()? {
                    Some(v) => out.push(v),
                    None => return Ok(out),
                }
            }
        }
    }
    let at = Cell::new(0);
    let mut de = serde_json::Deserializer::from_slice(body);
    let values = de
        .deserialize_seq(Entries(&at))
        .and_then(|v| de.end().map(|_| v))
        .map_err(|e| BodyError(format!("body is not JSON: {e}, in entry {}", at.get())))?;
    Ok(values)
}

fn parse_ndjson(body: &[u8]) -> Result<Vec<Value>, BodyError> {
    let mut out = Vec::new();
    for (line_no, line) in body.split(|b| *b == b'\n').enumerate() {
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let value = serde_json::from_slice::<Value>(line)
            .map_err(|e| BodyError(format!("body is not JSON: line {} (entry {}): {e}", line_no + 1, out.len())))?;
        out.push(value);
    }
    Ok(out)
}

fn entry(index: usize, value: Value) -> Result<LabelEntry, String> {
    let Value::Object(mut object) = value else {
        return Err("entry must be an object {\"id\", \"label\"}".into());
    };
    let id = match object.remove("id") {
        Some(Value::String(s)) if !s.is_empty() => s,
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
        None => return Err("missing \"id\"".into()),
        Some(_) => return Err("\"id\" must be a non-empty string (or an integer)".into()),
    };
    if id.len() > MAX_ID_BYTES {
        return Err(format!("\"id\" is longer than {MAX_ID_BYTES} bytes"));
    }
    let label = match object.remove("label") {
        // Whether a number is a class index or a regression value is known once the
        // label is joined to its prediction.
        Some(Value::Number(n)) => match (n.as_u64(), n.as_f64()) {
            (Some(i), _) => RawLabel::Index(i),
            (None, Some(x)) => RawLabel::Number(x),
            (None, None) => return Err(format!("\"label\" {n} is not a number mltap can read")),
        },
        Some(Value::String(s)) if !s.is_empty() => RawLabel::Name(s),
        Some(Value::Bool(b)) => RawLabel::Bool(b),
        None => return Err("missing \"label\"".into()),
        Some(_) => {
            return Err(
                "\"label\" must be a class index, a class name or a boolean (a number for a regression model)".into()
            )
        }
    };
    let model = match object.remove("model") {
        Some(Value::String(s)) => Some(s),
        _ => None,
    };
    Ok(LabelEntry { index, id, label, model })
}

/// Who may post labels.
#[derive(Clone, PartialEq, Eq)]
enum Access {
    /// Requests carrying this bearer token.
    Token(Vec<u8>),
    /// Anyone who reaches the port (`labels.allow_unauthenticated = true`).
    Open,
    /// Nobody: no token configured and unauthenticated posts not allowed.
    Closed,
}

/// The `/v1/labels` route, registered with the admin server.
pub struct LabelsRoute {
    /// Joins the labels.
    service: Arc<LabelService>,
    /// Who may post.
    access: Access,
    /// `labels.max_body_bytes`.
    max_body_bytes: usize,
}

impl std::fmt::Debug for LabelsRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LabelsRoute")
            .field(
                "access",
                &match self.access {
                    Access::Token(_) => "token <redacted>",
                    Access::Open => "unauthenticated",
                    Access::Closed => "closed",
                },
            )
            .field("max_body_bytes", &self.max_body_bytes)
            .finish()
    }
}

impl LabelsRoute {
    /// The route over a service, reading the token from the environment variable the
    /// config names (an error when it is named but unset: start-up must fail, not
    /// serve labels unprotected).
    pub fn new(service: Arc<LabelService>) -> Result<LabelsRoute, LabelError> {
        let labels = &service.settings().labels;
        let access = match &labels.token_env {
            None if labels.allow_unauthenticated => Access::Open,
            None => {
                tracing::warn!(
                    message = "Label posts are refused: configure labels.token_env (or labels.allow_unauthenticated = true on a private admin port)."
                );
                Access::Closed
            }
            Some(name) => match std::env::var(name) {
                Ok(token) if !token.trim().is_empty() => Access::Token(token.trim().as_bytes().to_vec()),
                _ => return Err(LabelError::MissingToken(name.clone())),
            },
        };
        let max_body_bytes = labels.max_body_bytes;
        Ok(LabelsRoute { service, access, max_body_bytes })
    }

    /// Whether the request may post, else the 401 answer's message.
    fn authorize(&self, request: &AdminRequest) -> Result<(), &'static str> {
        match &self.access {
            Access::Open => Ok(()),
            Access::Closed => Err("label posts are disabled: configure labels.token_env (a bearer token) or labels.allow_unauthenticated = true"),
            Access::Token(expected) => match bearer_token(request.headers()) {
                Some(given) if constant_time_eq(given, expected) => Ok(()),
                _ => Err("missing or wrong bearer token"),
            },
        }
    }

    async fn handle(service: Arc<LabelService>, request: AdminRequest, max_body_bytes: usize) -> AdminResponse {
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max_body_bytes as u64) {
            return too_large(max_body_bytes);
        }
        let body = match Limited::new(request.into_body(), max_body_bytes).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => return too_large(max_body_bytes),
            Err(e) => return error(StatusCode::BAD_REQUEST, &format!("could not read the body: {e}")),
        };
        let (entries, mut rejected) = match parse_body(&body) {
            Ok(parsed) => parsed,
            Err(BodyError(message)) => return error(StatusCode::BAD_REQUEST, &message),
        };
        service.count_rejected(rejected.len() as u64);
        match service.ingest(entries, SystemTime::now()).await {
            Ok(mut outcome) => {
                rejected.append(&mut outcome.rejected);
                rejected.sort_by_key(|r| r.index);
                outcome.rejected = rejected;
                json(StatusCode::OK, serde_json::to_vec(&outcome).unwrap_or_default())
            }
            Err(e) => {
                tracing::warn!(message = "Label store failed; labels not joined.", error = %e);
                error(StatusCode::SERVICE_UNAVAILABLE, &format!("label store unavailable: {e}"))
            }
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header; the scheme is
/// case-insensitive (RFC 9110 section 11.1).
pub fn bearer_token(headers: &http::HeaderMap) -> Option<&[u8]> {
    let value = headers.get(header::AUTHORIZATION)?.as_bytes();
    let split = value.iter().position(|b| *b == b' ')?;
    let (scheme, rest) = value.split_at(split);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    Some(rest.trim_ascii())
}

/// Media types of a label body: JSON, or NDJSON under its common names. A browser
/// sends none of them cross-site without a CORS preflight, which mltap never grants.
const LABEL_MEDIA_TYPES: [&str; 5] =
    ["application/json", "application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines"];

/// Whether the request declares a label body type (parameters such as `charset` aside).
pub fn declares_json(headers: &http::HeaderMap) -> bool {
    let Some(value) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else { return false };
    let media = value.split(';').next().unwrap_or("").trim();
    LABEL_MEDIA_TYPES.iter().any(|t| media.eq_ignore_ascii_case(t))
}

/// Whether a browser says the request comes from another site: `Sec-Fetch-Site` other
/// than `same-origin`/`none`, or an `Origin` whose host is not the request's `Host`.
/// Clients that are not browsers send neither header.
pub fn cross_site(headers: &http::HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.as_bytes();
        if !(site.eq_ignore_ascii_case(b"same-origin") || site.eq_ignore_ascii_case(b"none")) {
            return true;
        }
    }
    let Some(origin) = headers.get(header::ORIGIN) else { return false };
    let origin_host = origin.to_str().ok().and_then(|o| o.split_once("://")).map(|(_, host)| host);
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    match (origin_host, host) {
        (Some(origin_host), Some(host)) => !origin_host.eq_ignore_ascii_case(host),
        // `Origin: null` (sandboxed pages, file://) or no Host to compare with.
        _ => true,
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn json(status: StatusCode, body: Vec<u8>) -> AdminResponse {
    let mut response = http::Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    response
}

fn full(body: Vec<u8>) -> AdminBody {
    Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed_unsync()
}

fn error(status: StatusCode, message: &str) -> AdminResponse {
    json(status, serde_json::to_vec(&serde_json::json!({ "error": message })).unwrap_or_default())
}

fn too_large(limit: usize) -> AdminResponse {
    error(StatusCode::PAYLOAD_TOO_LARGE, &format!("body is larger than labels.max_body_bytes ({limit} bytes)"))
}

/// `/v1/labels` while the label store may not be open yet: 503 until the route is
/// set once the store opened (`mltap serve` retries opening it in the background).
#[derive(Clone, Default)]
pub struct PendingLabelsRoute {
    route: Arc<std::sync::OnceLock<LabelsRoute>>,
}

impl PendingLabelsRoute {
    /// Serves label posts from now on.
    pub fn open(&self, route: LabelsRoute) {
        let _ = self.route.set(route);
    }
}

impl AdminRoute for PendingLabelsRoute {
    fn matches(&self, _method: &Method, path: &str) -> bool {
        path == LABELS_PATH
    }

    fn call(&self, request: AdminRequest) -> AdminFuture {
        match self.route.get() {
            Some(route) => route.call(request),
            None => {
                let response = error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the label store is not open yet; mltap retries opening it (see /readyz)",
                );
                Box::pin(async move { response })
            }
        }
    }
}

impl AdminRoute for LabelsRoute {
    fn matches(&self, _method: &Method, path: &str) -> bool {
        path == LABELS_PATH
    }

    fn call(&self, request: AdminRequest) -> AdminFuture {
        if request.method() != Method::POST {
            let mut response = error(StatusCode::METHOD_NOT_ALLOWED, "use POST");
            response.headers_mut().insert(header::ALLOW, http::HeaderValue::from_static("POST"));
            return Box::pin(async move { response });
        }
        if cross_site(request.headers()) {
            let response = error(StatusCode::FORBIDDEN, "cross-site label posts are refused");
            return Box::pin(async move { response });
        }
        if let Err(message) = self.authorize(&request) {
            let mut response = error(StatusCode::UNAUTHORIZED, message);
            response.headers_mut().insert(header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
            return Box::pin(async move { response });
        }
        if !declares_json(request.headers()) {
            let response = error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "label bodies must be sent as Content-Type: application/json (or application/x-ndjson)",
            );
            return Box::pin(async move { response });
        }
        Box::pin(Self::handle(self.service.clone(), request, self.max_body_bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        pairs.iter().map(|(k, v)| (http::HeaderName::from_static(k), http::HeaderValue::from_str(v).unwrap())).collect()
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for scheme in ["Bearer", "bearer", "BEARER"] {
            let h = headers(&[("authorization", &format!("{scheme} t0k"))]);
            assert_eq!(bearer_token(&h), Some(&b"t0k"[..]));
        }
        assert_eq!(bearer_token(&headers(&[("authorization", "Basic t0k")])), None);
        assert_eq!(bearer_token(&headers(&[("authorization", "Bearert0k")])), None);
    }

    #[test]
    fn only_json_and_ndjson_bodies_are_declared_labels() {
        assert!(declares_json(&headers(&[("content-type", "application/json; charset=utf-8")])));
        assert!(declares_json(&headers(&[("content-type", "Application/X-NDJSON")])));
        assert!(!declares_json(&headers(&[("content-type", "text/plain")])));
        assert!(!declares_json(&headers(&[("content-type", "application/x-www-form-urlencoded")])));
        assert!(!declares_json(&headers(&[])));
    }

    #[test]
    fn browsers_posting_from_another_site_are_recognised() {
        assert!(!cross_site(&headers(&[])));
        assert!(!cross_site(&headers(&[("origin", "http://mltap:9090"), ("host", "mltap:9090")])));
        assert!(cross_site(&headers(&[("origin", "https://evil.example"), ("host", "mltap:9090")])));
        assert!(cross_site(&headers(&[("origin", "null"), ("host", "mltap:9090")])));
        assert!(cross_site(&headers(&[("sec-fetch-site", "cross-site")])));
        assert!(!cross_site(&headers(&[("sec-fetch-site", "same-origin")])));
    }

    #[test]
    fn array_syntax_errors_name_the_entry_line_and_column() {
        let e = parse_body(b"[{\"id\":\"a\",\"label\":1},\n {\"id\":\"b\",\"label\":}]").unwrap_err();
        assert!(e.0.contains("entry 1"), "{}", e.0);
        assert!(e.0.contains("line 2"), "{}", e.0);
    }

    #[test]
    fn ndjson_errors_name_the_line_and_entry() {
        let e = parse_body(b"{\"id\":\"a\",\"label\":1}\n\n{\"id\":\"b\"\n").unwrap_err();
        assert!(e.0.contains("line 3 (entry 1)"), "{}", e.0);
    }

    #[test]
    fn entries_of_the_wrong_shape_are_rejected_with_their_index() {
        let (ok, rejected) =
            parse_body(br#"[{"id":"a","label":1},{"id":"b"},{"id":7,"label":"x"},{"id":"c","label":null},3]"#).unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok[1].id, "7");
        let indexes: Vec<usize> = rejected.iter().map(|r| r.index).collect();
        assert_eq!(indexes, vec![1, 3, 4]);
    }

    #[test]
    fn numbers_that_are_no_class_index_are_kept_for_regression_predictions() {
        let (ok, rejected) =
            parse_body(br#"[{"id":"a","label":-1},{"id":"b","label":2.5},{"id":"c","label":3}]"#).unwrap();
        assert!(rejected.is_empty());
        let labels: Vec<&RawLabel> = ok.iter().map(|e| &e.label).collect();
        assert_eq!(labels, [&RawLabel::Number(-1.0), &RawLabel::Number(2.5), &RawLabel::Index(3)]);
    }
}
