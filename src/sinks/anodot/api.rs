//! Anodot's REST API as delivery uses it: posting metric points (protocols 2.0 and
//! 3.0), posting 3.0 watermarks, exchanging an access key for a bearer token, and
//! finding or creating stream schemas. It turns every answer into a `PostOutcome` or
//! an `ApiError` that says whether to retry, to stop, or which points Anodot refused.
//!
//! It owns the secrets (data-collection token, access key, bearer token) and must
//! never let one reach a log line, an error message or a `Debug` output: URLs are shown
//! without their query, and transport errors are stripped of their URL.

use reqwest::header::{HeaderMap, CONTENT_TYPE, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use serde_json::Value;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::retry::Failure;
use super::AnodotProtocol;

/// Anodot error codes that mean "slow down", not "bad data": API call rate exceeded
/// (1004), too many concurrent requests (2002), metrics-per-second limit reached (2003).
pub const RATE_LIMIT_CODES: [i64; 3] = [1004, 2002, 2003];
/// Anodot error code for a token that is not active.
pub const TOKEN_NOT_ACTIVE: i64 = 2001;

/// A secret string whose `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that puts it on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// One point Anodot refused for good, as its `errors` array reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// Position of the point in the request body; None when the error is about the
    /// whole request.
    pub index: Option<usize>,
    /// Anodot's error code (e.g. 2011 illegal property value), 0 when absent.
    pub code: i64,
    /// Anodot's description of the error.
    pub description: String,
}

/// What one POST of points (or of a watermark) came to.
#[derive(Debug, Clone, PartialEq)]
pub enum PostOutcome {
    /// Anodot took the request; the listed points (by index) were refused for good,
    /// and errors without an index are reported but refuse no point.
    Answered { rejected: Vec<Rejection> },
    /// Anodot refused the request as malformed (4xx). With indexed errors, the other
    /// points may be sent again without them; otherwise the whole request is refused.
    Refused { rejected: Vec<Rejection>, whole_request: bool },
    /// Anodot did not answer for the points: transient (5xx, 408, 429, a timeout, a
    /// connection failure or a rate-limit code), or needing an operator (the token is
    /// refused or the endpoint does not exist).
    Failed(Failure),
}

/// Failure of a schema or access-token call (3.0).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    #[error("Anodot API unavailable: {0}")]
    Transient(String),
    #[error("Anodot API refused the call: {0}")]
    Fatal(String),
}

/// Reads Anodot's `errors` array, where each entry has `error` (code), `description`
/// and, for per-point errors, `index` (a number or a numeric string).
pub fn parse_errors(body: &[u8]) -> Vec<Rejection> {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return Vec::new();
    };
    let Some(errors) = value.get("errors").and_then(Value::as_array) else {
        return Vec::new();
    };
    errors
        .iter()
        .map(|e| {
            let number = |v: Option<&Value>| match v {
                Some(Value::Number(n)) => n.as_i64(),
                Some(Value::String(s)) => s.trim().parse::<i64>().ok(),
                _ => None,
            };
            Rejection {
                index: number(e.get("index")).and_then(|i| usize::try_from(i).ok()),
                code: number(e.get("error")).or_else(|| number(e.get("code"))).unwrap_or(0),
                description: e
                    .get("description")
                    .or_else(|| e.get("message"))
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            }
        })
        .collect()
}

/// Classifies an answer to a POST of points or of a watermark.
pub fn classify(status: StatusCode, body: &[u8], retry_after: Option<Duration>) -> PostOutcome {
    let errors = parse_errors(body);
    let described = |errors: &[Rejection]| {
        errors.iter().map(|e| format!("{} {}", e.code, e.description)).collect::<Vec<_>>().join("; ")
    };
    if errors.iter().any(|e| RATE_LIMIT_CODES.contains(&e.code)) {
        return PostOutcome::Failed(Failure::Transient {
            reason: format!("Anodot rate limit: {}", described(&errors)),
            retry_after,
        });
    }
    if errors.iter().any(|e| e.code == TOKEN_NOT_ACTIVE) {
        return PostOutcome::Failed(Failure::Halt {
            reason: format!("Anodot token is not active: {}", described(&errors)),
        });
    }
    if status.is_success() {
        // Anodot answers JSON (or nothing). Anything else means the URL reaches some
        // other server, and counting the points as delivered would lose them.
        let blank = body.iter().all(u8::is_ascii_whitespace);
        if !blank && serde_json::from_slice::<Value>(body).is_err() {
            return PostOutcome::Failed(Failure::Halt {
                reason: format!("HTTP {status} with an answer that is not Anodot's (not JSON); check the URL"),
            });
        }
        return PostOutcome::Answered { rejected: errors };
    }
    let excerpt = || String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
    match status.as_u16() {
        408 | 429 | 500..=599 => {
            PostOutcome::Failed(Failure::Transient { reason: format!("HTTP {status}"), retry_after })
        }
        401 | 403 => PostOutcome::Failed(Failure::Halt { reason: format!("HTTP {status}: Anodot refused the token") }),
        404 | 405 => PostOutcome::Failed(Failure::Halt {
            reason: format!("HTTP {status}: no Anodot metrics endpoint at this URL"),
        }),
        _ => {
            let indexed = errors.iter().any(|e| e.index.is_some());
            let mut rejected = errors;
            if rejected.is_empty() {
                rejected.push(Rejection { index: None, code: 0, description: format!("HTTP {status}: {}", excerpt()) });
            }
            PostOutcome::Refused { rejected, whole_request: !indexed }
        }
    }
}

/// A URL as it may be shown: scheme, host, port and path, never the query.
pub fn redacted(url: &Url) -> String {
    let mut shown = url.clone();
    shown.set_query(None);
    let _ = shown.set_password(None);
    shown.to_string()
}

/// Where the calls go, derived once from `anodot_url` (and `api_url` for 3.0).
#[derive(Clone)]
pub struct Endpoints {
    /// `…/api/v1/metrics`, without token or protocol (added per request).
    pub metrics: Url,
    /// `…/api/v1/metrics/watermark` (3.0).
    pub watermark: Url,
    /// Base of the `/api/v2/...` calls (3.0).
    pub api_base: Url,
}

impl fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoints")
            .field("metrics", &redacted(&self.metrics))
            .field("api_base", &redacted(&self.api_base))
            .finish()
    }
}

impl Endpoints {
    /// A bare origin (`https://app.anodot.com`) means the standard metrics path; any
    /// other path is used as given. `token` and `protocol` query parameters in the URL
    /// are dropped: delivery adds its own.
    pub fn new(anodot_url: &str, api_url: Option<&str>) -> Result<Endpoints, String> {
        let mut metrics = Url::parse(anodot_url.trim()).map_err(|e| format!("`{anodot_url}` is not a URL ({e})"))?;
        if !matches!(metrics.scheme(), "http" | "https") || metrics.host_str().is_none() {
            return Err("must be an http:// or https:// URL with a host".to_string());
        }
        if metrics.path().is_empty() || metrics.path() == "/" {
            metrics.set_path("/api/v1/metrics");
        }
        let kept: Vec<(String, String)> = metrics
            .query_pairs()
            .filter(|(k, _)| k != "token" && k != "protocol")
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        metrics.set_query(None);
        if !kept.is_empty() {
            metrics.query_pairs_mut().extend_pairs(kept);
        }
        let mut watermark = metrics.clone();
        let path = format!("{}/watermark", metrics.path().trim_end_matches('/'));
        watermark.set_path(&path);
        let api_base = match api_url {
            Some(u) => Url::parse(u.trim()).map_err(|e| format!("api_url `{u}` is not a URL ({e})"))?,
            None => {
                let mut origin = metrics.clone();
                origin.set_path("/");
                origin.set_query(None);
                origin
            }
        };
        Ok(Endpoints { metrics, watermark, api_base })
    }

    fn api(&self, path: &str) -> Url {
        let mut url = self.api_base.clone();
        let joined = format!("{}/{}", url.path().trim_end_matches('/'), path.trim_start_matches('/'));
        url.set_path(&joined);
        url
    }
}

/// A bearer token and when to get the next one.
struct Bearer {
    token: Secret,
    /// Epoch seconds after which the token is refreshed (a margin before it expires).
    refresh_after: u64,
}

/// The HTTP side of delivery. Cheap to clone.
#[derive(Clone)]
pub struct AnodotClient {
    /// One pooled client, rustls, with the request timeout.
    http: reqwest::Client,
    /// Where the calls go.
    endpoints: Endpoints,
    /// Data-collection token, sent as `?token=` on metric and watermark posts.
    token: Secret,
    /// Access key for the bearer token of the schema API (3.0).
    access_key: Option<Secret>,
    /// The current bearer token, shared by clones so one refresh serves all.
    bearer: std::sync::Arc<tokio::sync::Mutex<Option<Bearer>>>,
}

impl fmt::Debug for AnodotClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnodotClient")
            .field("endpoints", &self.endpoints)
            .field("token", &self.token)
            .field("access_key", &self.access_key)
            .finish()
    }
}

fn now_epoch() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The `exp` claim of a JWT, read without verifying it: only to know when to refresh.
pub fn jwt_expiry(token: &str) -> Option<u64> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let value: Value = serde_json::from_slice(&bytes).ok()?;
    value.get("exp")?.as_u64()
}

impl AnodotClient {
    pub fn new(
        endpoints: Endpoints,
        token: Secret,
        access_key: Option<Secret>,
        request_timeout: Duration,
    ) -> Result<AnodotClient, String> {
        let http = reqwest::Client::builder()
            .timeout(request_timeout)
            .connect_timeout(request_timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("mltap/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {}", e.without_url()))?;
        Ok(AnodotClient {
            http,
            endpoints,
            token,
            access_key,
            bearer: std::sync::Arc::new(tokio::sync::Mutex::new(None)),
        })
    }

    /// Posts a JSON array of points.
    pub async fn post_points(&self, protocol: AnodotProtocol, body: Vec<u8>) -> PostOutcome {
        self.post(&self.endpoints.metrics, protocol, body).await
    }

    /// Posts a 3.0 watermark: no more points of this schema up to `watermark`.
    pub async fn post_watermark(&self, schema_id: &str, watermark: i64) -> PostOutcome {
        let body = serde_json::json!({ "schemaId": schema_id, "watermark": watermark });
        self.post(&self.endpoints.watermark, AnodotProtocol::V30, body.to_string().into_bytes()).await
    }

    async fn post(&self, url: &Url, protocol: AnodotProtocol, body: Vec<u8>) -> PostOutcome {
        let sent = self
            .http
            .post(url.clone())
            .query(&[("token", self.token.expose()), ("protocol", protocol.query_value())])
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            Err(e) => return PostOutcome::Failed(Failure::Transient { reason: transport_error(e), retry_after: None }),
        };
        let status = response.status();
        let retry_after = retry_after(response.headers());
        match response.bytes().await {
            Ok(body) => classify(status, &scrub(&body, self.token.expose()), retry_after),
            Err(e) => PostOutcome::Failed(Failure::Transient { reason: transport_error(e), retry_after }),
        }
    }

    /// A bearer token for the `/api/v2` calls, refreshed before it expires.
    pub async fn bearer(&self) -> Result<Secret, ApiError> {
        let mut guard = self.bearer.lock().await;
        if let Some(b) = guard.as_ref() {
            if now_epoch() < b.refresh_after {
                return Ok(b.token.clone());
            }
        }
        let key =
            self.access_key.as_ref().ok_or_else(|| ApiError::Fatal("protocol 3.0 needs an access key".to_string()))?;
        let url = self.endpoints.api("api/v2/access-token");
        let response = self
            .http
            .post(url)
            .json(&serde_json::json!({ "refreshToken": key.expose() }))
            .send()
            .await
            .map_err(|e| ApiError::Transient(transport_error(e)))?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| ApiError::Transient(transport_error(e)))?;
        if !status.is_success() {
            return Err(status_error("access token", status));
        }
        // Anodot answers with the token as a JSON string, or `{"token": ...}` when asked
        // for JSON; a bare string is accepted too.
        let token = match serde_json::from_slice::<Value>(&body) {
            Ok(Value::String(s)) => s,
            Ok(Value::Object(o)) => o.get("token").and_then(Value::as_str).unwrap_or_default().to_string(),
            _ => String::from_utf8_lossy(&body).trim().trim_matches('"').to_string(),
        };
        if token.is_empty() {
            return Err(ApiError::Fatal("the access-token answer holds no token".to_string()));
        }
        let now = now_epoch();
        let refresh_after = match jwt_expiry(&token) {
            // Refresh at 90% of the lifetime, at most 5 minutes before expiry.
            Some(exp) if exp > now => exp - ((exp - now) / 10).min(300),
            Some(_) => now,
            None => now + 3600,
        };
        let secret = Secret::new(token);
        *guard = Some(Bearer { token: secret.clone(), refresh_after });
        Ok(secret)
    }

    async fn forget_bearer(&self) {
        *self.bearer.lock().await = None;
    }

    /// Sends an `/api/v2` call with the bearer token and returns its successful answer.
    /// A refused token is forgotten, so that the next attempt fetches a new one.
    async fn send_v2(&self, call: &str, request: reqwest::RequestBuilder) -> Result<reqwest::Response, ApiError> {
        let bearer = self.bearer().await?;
        let response =
            request.bearer_auth(bearer.expose()).send().await.map_err(|e| ApiError::Transient(transport_error(e)))?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED {
            self.forget_bearer().await;
            return Err(ApiError::Transient("bearer token refused; refreshing".to_string()));
        }
        if !status.is_success() {
            return Err(status_error(call, status));
        }
        Ok(response)
    }

    /// The id of the stream schema named `name`, if it exists.
    pub async fn find_schema(&self, name: &str) -> Result<Option<String>, ApiError> {
        let mut url = self.endpoints.api("api/v2/stream-schemas/schemas");
        url.query_pairs_mut().append_pair("excludeCubes", "true");
        let response = self.send_v2("list stream schemas", self.http.get(url)).await?;
        let list: Value = response.json().await.map_err(|e| ApiError::Transient(transport_error(e)))?;
        let found = list.as_array().into_iter().flatten().find_map(|entry| {
            let schema =
                entry.get("streamSchemaWrapper").and_then(|w| w.get("schema")).or_else(|| entry.get("schema"))?;
            (schema.get("name")?.as_str()? == name).then(|| schema.get("id")?.as_str().map(str::to_string))?
        });
        Ok(found)
    }

    /// Creates a stream schema and returns its id.
    pub async fn create_schema(&self, schema: &Value) -> Result<String, ApiError> {
        let request = self.http.post(self.endpoints.api("api/v2/stream-schemas")).json(schema);
        let response = self.send_v2("create stream schema", request).await?;
        let created: Value = response.json().await.map_err(|e| ApiError::Transient(transport_error(e)))?;
        created
            .get("schema")
            .and_then(|s| s.get("id"))
            .or_else(|| created.get("id"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| ApiError::Fatal("the create-schema answer holds no schema id".to_string()))
    }
}

fn status_error(call: &str, status: StatusCode) -> ApiError {
    let message = format!("{call}: HTTP {status}");
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::REQUEST_TIMEOUT {
        ApiError::Transient(message)
    } else {
        ApiError::Fatal(message)
    }
}

/// A transport error as it may be shown: reqwest puts the URL, with its token, in
/// its message, so it is removed first.
fn transport_error(error: reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let error = error.without_url();
    let mut message = format!("{kind}: {error}");
    let mut source = std::error::Error::source(&error);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

/// An answer with every occurrence of the token replaced: parts of answers end up in
/// logs, and a server (or a proxy's error page) may echo the request URL.
fn scrub(body: &[u8], token: &str) -> Vec<u8> {
    let needle = token.as_bytes();
    if needle.is_empty() || body.len() < needle.len() {
        return body.to_vec();
    }
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        if body[i..].starts_with(needle) {
            out.extend_from_slice(b"<redacted>");
            i += needle.len();
        } else {
            out.push(body[i]);
            i += 1;
        }
    }
    out
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_with_numeric_or_string_indexes_are_read() {
        let body = br#"{"errors":[{"error":2011,"description":"bad value","index":"3"},{"error":2009,"description":"too long","index":5},{"error":1002,"description":"general"}]}"#;
        let e = parse_errors(body);
        assert_eq!(e.len(), 3);
        assert_eq!((e[0].index, e[0].code), (Some(3), 2011));
        assert_eq!((e[1].index, e[1].code), (Some(5), 2009));
        assert_eq!(e[2].index, None);
    }

    #[test]
    fn rate_limit_codes_and_server_errors_are_retried_and_bad_tokens_halt() {
        let ok = StatusCode::OK;
        for code in RATE_LIMIT_CODES {
            let body = format!(r#"{{"errors":[{{"error":{code},"description":"slow down"}}]}}"#);
            assert!(
                matches!(classify(ok, body.as_bytes(), None), PostOutcome::Failed(Failure::Transient { .. })),
                "{code}"
            );
        }
        assert!(matches!(
            classify(StatusCode::TOO_MANY_REQUESTS, b"", None),
            PostOutcome::Failed(Failure::Transient { .. })
        ));
        assert!(matches!(classify(StatusCode::BAD_GATEWAY, b"", None), PostOutcome::Failed(Failure::Transient { .. })));
        assert!(matches!(classify(StatusCode::UNAUTHORIZED, b"", None), PostOutcome::Failed(Failure::Halt { .. })));
        assert!(matches!(
            classify(ok, br#"{"errors":[{"error":2001,"description":"Token is not active"}]}"#, None),
            PostOutcome::Failed(Failure::Halt { .. })
        ));
        assert_eq!(classify(ok, br#"{"errors":[]}"#, None), PostOutcome::Answered { rejected: vec![] });
        assert_eq!(classify(ok, b"", None), PostOutcome::Answered { rejected: vec![] });
        assert!(matches!(classify(ok, b"<html>welcome</html>", None), PostOutcome::Failed(Failure::Halt { .. })));
        assert!(matches!(
            classify(StatusCode::BAD_REQUEST, b"nope", None),
            PostOutcome::Refused { whole_request: true, .. }
        ));
    }

    #[test]
    fn urls_are_normalized_and_shown_without_their_query() {
        let e = Endpoints::new("https://app.anodot.com?token=abc", None).unwrap();
        assert_eq!(e.metrics.as_str(), "https://app.anodot.com/api/v1/metrics");
        assert_eq!(e.watermark.as_str(), "https://app.anodot.com/api/v1/metrics/watermark");
        assert_eq!(e.api("api/v2/stream-schemas").as_str(), "https://app.anodot.com/api/v2/stream-schemas");
        let mut with_token = e.metrics.clone();
        with_token.query_pairs_mut().append_pair("token", "s3cret");
        assert!(!redacted(&with_token).contains("s3cret"));
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let client = AnodotClient::new(
            Endpoints::new("http://127.0.0.1:1", None).unwrap(),
            Secret::new("tok-123"),
            Some(Secret::new("key-456")),
            Duration::from_secs(1),
        )
        .unwrap();
        let shown = format!("{client:?}");
        assert!(!shown.contains("tok-123") && !shown.contains("key-456"), "{shown}");
    }

    #[test]
    fn answers_echoing_the_token_are_scrubbed_before_anything_logs_them() {
        let body = br#"Bad request: /api/v1/metrics?token=tok-9&protocol=anodot20"#;
        let outcome = classify(StatusCode::BAD_REQUEST, &scrub(body, "tok-9"), None);
        let PostOutcome::Refused { rejected, .. } = outcome else { panic!("{outcome:?}") };
        assert!(rejected[0].description.contains("token=<redacted>&"), "{}", rejected[0].description);
        assert!(!rejected[0].description.contains("tok-9"));
    }

    #[test]
    fn jwt_expiry_is_read_from_the_payload() {
        use base64::Engine;
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"exp":1700000000}"#);
        assert_eq!(jwt_expiry(&format!("h.{payload}.s")), Some(1_700_000_000));
        assert_eq!(jwt_expiry("not-a-jwt"), None);
    }
}
