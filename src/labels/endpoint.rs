//! `POST /v1/labels` on the admin port: a JSON array or NDJSON of `{"id", "label"}`.
//!
//! Valid entries are joined even when others are not; the answer counts `accepted`,
//! `unmatched` and `late` and lists `rejected` entries with their index and reason. A
//! body that is not JSON gets 400 saying where it broke (entry, line, column); a body
//! over `max_body_bytes` gets 413; with a token configured, a request without it gets
//! 401. The token and the labels are never logged.

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

/// The `/v1/labels` route, registered with the admin server.
pub struct LabelsRoute {
    /// Joins the labels.
    service: Arc<LabelService>,
    /// The expected `Authorization` header value (`Bearer <token>`), if any.
    expected_authorization: Option<Vec<u8>>,
    /// `labels.max_body_bytes`.
    max_body_bytes: usize,
}

impl std::fmt::Debug for LabelsRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LabelsRoute")
            .field("token", &self.expected_authorization.as_ref().map(|_| "<redacted>"))
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
        let expected_authorization = match &labels.token_env {
            None => None,
            Some(name) => match std::env::var(name) {
                Ok(token) if !token.trim().is_empty() => Some(format!("Bearer {}", token.trim()).into_bytes()),
                _ => return Err(LabelError::MissingToken(name.clone())),
            },
        };
        let max_body_bytes = labels.max_body_bytes;
        Ok(LabelsRoute { service, expected_authorization, max_body_bytes })
    }

    fn authorized(&self, request: &AdminRequest) -> bool {
        let Some(expected) = &self.expected_authorization else { return true };
        let Some(given) = request.headers().get(header::AUTHORIZATION) else { return false };
        constant_time_eq(given.as_bytes(), expected)
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
        if !self.authorized(&request) {
            let mut response = error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
            response.headers_mut().insert(header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
            return Box::pin(async move { response });
        }
        Box::pin(Self::handle(self.service.clone(), request, self.max_body_bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
