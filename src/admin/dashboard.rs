//! The live dashboard on the admin port: the page and its assets (built from
//! `dashboard/` into `assets/dashboard/` and embedded here, so the binary needs no
//! network and no CDN), the JSON API behind it (`/api/models`,
//! `/api/models/{model}/series`), and the Server-Sent Events stream (`/api/events`)
//! that pushes one event per closed bucket.
//!
//! It only reads the `History`: it never computes metrics and never touches files.
//! Bad requests get a 4xx with a JSON message, never a panic.

use super::history::{BucketUpdate, History, SeriesAnswer, SeriesQuery};
use super::{AdminBody, AdminFuture, AdminRequest, AdminResponse, AdminRoute};
use bytes::Bytes;
use http::{header, Method, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;

const INDEX_HTML: &str = include_str!("../../assets/dashboard/index.html");
const APP_JS: &str = include_str!("../../assets/dashboard/app.js");
const APP_CSS: &str = include_str!("../../assets/dashboard/app.css");

/// How often an idle event stream sends a comment, so that proxies and browsers do
/// not close it for inactivity.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// Significant digits of values in API answers: charts need no more, and it roughly
/// halves the JSON of a day of history.
const SIGNIFICANT_DIGITS: i32 = 6;

/// The dashboard's routes, to register on the admin server: the page and its assets,
/// the JSON API and the event stream, all reading `history`.
pub fn routes(history: Arc<History>) -> Vec<Arc<dyn AdminRoute>> {
    vec![Arc::new(PageRoute), Arc::new(ApiRoute { history: history.clone() }), Arc::new(EventsRoute { history })]
}

/// `GET /` and the embedded assets.
pub struct PageRoute;

struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const ASSETS: [Asset; 4] = [
    Asset { path: "/", content_type: "text/html; charset=utf-8", body: INDEX_HTML },
    Asset { path: "/index.html", content_type: "text/html; charset=utf-8", body: INDEX_HTML },
    Asset { path: "/assets/dashboard/app.js", content_type: "text/javascript; charset=utf-8", body: APP_JS },
    Asset { path: "/assets/dashboard/app.css", content_type: "text/css; charset=utf-8", body: APP_CSS },
];

fn asset(path: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.path == path)
}

/// A validator that changes whenever the embedded asset changes, so browsers
/// revalidate cheaply after an upgrade instead of running a stale page.
fn etag(body: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    body.hash(&mut hasher);
    format!("\"{:016x}\"", hasher.finish())
}

impl AdminRoute for PageRoute {
    fn matches(&self, method: &Method, path: &str) -> bool {
        (method == Method::GET || method == Method::HEAD) && asset(path).is_some()
    }

    fn call(&self, request: AdminRequest) -> AdminFuture {
        let response = match asset(request.uri().path()) {
            None => error(StatusCode::NOT_FOUND, "no such asset"),
            Some(asset) => {
                let tag = etag(asset.body);
                let fresh =
                    request.headers().get(header::IF_NONE_MATCH).is_some_and(|v| v.as_bytes() == tag.as_bytes());
                let builder = http::Response::builder()
                    .header(header::CONTENT_TYPE, asset.content_type)
                    .header(header::CACHE_CONTROL, "no-cache")
                    .header(header::ETAG, tag);
                let (status, body) = if fresh {
                    (StatusCode::NOT_MODIFIED, Bytes::new())
                } else if request.method() == Method::HEAD {
                    (StatusCode::OK, Bytes::new())
                } else {
                    (StatusCode::OK, Bytes::from_static(asset.body.as_bytes()))
                };
                respond(builder.status(status), body)
            }
        };
        Box::pin(std::future::ready(response))
    }
}

/// `GET /api/models` and `GET /api/models/{model}/series`.
pub struct ApiRoute {
    /// The history the answers are read from.
    history: Arc<History>,
}

impl AdminRoute for ApiRoute {
    fn matches(&self, method: &Method, path: &str) -> bool {
        method == Method::GET && (path == "/api/models" || series_model(path).is_some())
    }

    fn call(&self, request: AdminRequest) -> AdminFuture {
        let path = request.uri().path();
        let response = if path == "/api/models" {
            json(StatusCode::OK, &serde_json::json!({ "models": self.history.models() }))
        } else {
            match series_model(path) {
                None => error(StatusCode::NOT_FOUND, "no such endpoint"),
                Some(Err(())) => {
                    error(StatusCode::BAD_REQUEST, "the model name in the path is not valid percent-encoded UTF-8")
                }
                Some(Ok(model)) => match parse_series_query(request.uri().query().unwrap_or_default()) {
                    Err(message) => error(StatusCode::BAD_REQUEST, &message),
                    Ok(query) => match self.history.series(&model, &query) {
                        None => error(StatusCode::NOT_FOUND, &format!("no history for model {model:?}")),
                        Some(mut answer) => {
                            round_values(&mut answer);
                            json(StatusCode::OK, &answer)
                        }
                    },
                },
            }
        };
        Box::pin(std::future::ready(response))
    }
}

/// The model of `/api/models/{model}/series`, percent-decoded.
fn series_model(path: &str) -> Option<Result<String, ()>> {
    let model = path.strip_prefix("/api/models/")?.strip_suffix("/series")?;
    if model.is_empty() || model.contains('/') {
        return None;
    }
    Some(percent_decode(model, false).ok_or(()))
}

/// Parses `what=a,b&since=T&until=T&last=S&LABEL=v1,v2...`; every other key filters
/// on a label. Repeated keys add values.
pub fn parse_series_query(query: &str) -> Result<SeriesQuery, String> {
    let mut q = SeriesQuery::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(raw_key, true).ok_or_else(|| format!("query key {raw_key:?} is not valid"))?;
        let value = percent_decode(raw_value, true).ok_or_else(|| format!("value of {key:?} is not valid"))?;
        let seconds = |v: &str| v.parse::<i64>().map_err(|_| format!("{key} must be whole seconds, got {v:?}"));
        let list = || value.split(',').filter(|s| !s.is_empty()).map(str::to_string);
        match key.as_str() {
            "what" => q.what.extend(list()),
            "since" => q.since = Some(seconds(&value)?),
            "until" => q.until = Some(seconds(&value)?),
            "last" => q.last = Some(seconds(&value)?),
            "" => return Err("empty query key".to_string()),
            _ => match q.filters.iter_mut().find(|(k, _)| *k == key) {
                Some((_, values)) => values.extend(list()),
                None => q.filters.push((key.clone(), list().collect())),
            },
        }
    }
    Ok(q)
}

fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn round_values(answer: &mut SeriesAnswer) {
    for series in &mut answer.series {
        for v in series.values.iter_mut().flatten() {
            *v = round_significant(*v);
        }
    }
}

fn round_significant(v: f64) -> f64 {
    if v == 0.0 || !v.is_finite() || v.fract() == 0.0 {
        return v;
    }
    let magnitude = v.abs().log10().floor() as i32;
    let decimals = SIGNIFICANT_DIGITS - 1 - magnitude;
    if !(-300..=300).contains(&decimals) {
        return v;
    }
    let scale = 10f64.powi(decimals);
    let rounded = (v * scale).round() / scale;
    if rounded.is_finite() {
        rounded
    } else {
        v
    }
}

/// `GET /api/events[?model=M]`: one `bucket` event per update of the history.
pub struct EventsRoute {
    /// The history whose updates are streamed.
    history: Arc<History>,
}

impl AdminRoute for EventsRoute {
    fn matches(&self, method: &Method, path: &str) -> bool {
        method == Method::GET && path == "/api/events"
    }

    fn call(&self, request: AdminRequest) -> AdminFuture {
        let only_model = request
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("model=")).and_then(|m| percent_decode(m, true)));
        let updates = self.history.subscribe();
        let closed = self.history.closed();
        let stream = event_stream(updates, closed, only_model);
        let body: AdminBody = StreamBody::new(stream).boxed_unsync();
        let response = http::Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            // Tells buffering reverse proxies (nginx) to pass events through at once.
            .header("x-accel-buffering", "no")
            .body(body)
            .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "response"));
        Box::pin(std::future::ready(response))
    }
}

struct StreamState {
    updates: tokio::sync::broadcast::Receiver<Arc<BucketUpdate>>,
    closed: tokio::sync::watch::Receiver<bool>,
    only_model: Option<String>,
    keepalive: tokio::time::Interval,
    /// The stream opens with a comment so that the browser's `onopen` fires at once.
    greeted: bool,
}

fn event_stream(
    updates: tokio::sync::broadcast::Receiver<Arc<BucketUpdate>>,
    closed: tokio::sync::watch::Receiver<bool>,
    only_model: Option<String>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + 'static {
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = StreamState { updates, closed, only_model, keepalive, greeted: false };
    futures_util::stream::unfold(state, |mut s| async move {
        if !s.greeted {
            s.greeted = true;
            s.keepalive.reset();
            return Some((Ok(Frame::data(Bytes::from_static(b"retry: 2000\n: connected\n\n"))), s));
        }
        loop {
            if *s.closed.borrow() {
                return None;
            }
            let text = tokio::select! {
                update = s.updates.recv() => match update {
                    Ok(update) => {
                        if s.only_model.as_ref().is_some_and(|m| *m != update.model) {
                            continue;
                        }
                        let data = serde_json::to_string(&*update).unwrap_or_default();
                        format!("event: bucket\ndata: {data}\n\n")
                    }
                    Err(RecvError::Lagged(missed)) => format!("event: lagged\ndata: {{\"missed\":{missed}}}\n\n"),
                    Err(RecvError::Closed) => return None,
                },
                changed = s.closed.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                    continue;
                }
                _ = s.keepalive.tick() => ": keepalive\n\n".to_string(),
            };
            return Some((Ok(Frame::data(Bytes::from(text))), s));
        }
    })
}

fn respond(builder: http::response::Builder, body: Bytes) -> AdminResponse {
    builder.body(Full::new(body).boxed_unsync()).unwrap_or_else(|_| {
        let mut r = http::Response::new(Full::new(Bytes::new()).boxed_unsync());
        *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        r
    })
}

fn json<T: serde::Serialize>(status: StatusCode, value: &T) -> AdminResponse {
    match serde_json::to_vec(value) {
        Ok(body) => respond(
            http::Response::builder()
                .status(status)
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::CACHE_CONTROL, "no-store"),
            Bytes::from(body),
        ),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "could not serialize the answer"),
    }
}

fn error(status: StatusCode, message: &str) -> AdminResponse {
    let body = serde_json::to_vec(&serde_json::json!({ "error": message })).unwrap_or_default();
    respond(
        http::Response::builder().status(status).header(header::CONTENT_TYPE, "application/json"),
        Bytes::from(body),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_queries_parse_lists_ranges_and_label_filters() {
        let q = parse_series_query("what=feature_value,feature_drift&last=3600&feat_name=a%20b&stat=mean&stat=q25")
            .unwrap();
        assert_eq!(q.what, ["feature_value", "feature_drift"]);
        assert_eq!(q.last, Some(3600));
        assert_eq!(
            q.filters,
            vec![
                ("feat_name".to_string(), vec!["a b".to_string()]),
                ("stat".into(), vec!["mean".into(), "q25".into()])
            ]
        );
        assert!(parse_series_query("since=yesterday").unwrap_err().contains("since"));
        assert!(parse_series_query("what=%zz").is_err());
    }

    #[test]
    fn values_keep_six_significant_digits() {
        assert_eq!(round_significant(0.123456789), 0.123457);
        assert_eq!(round_significant(1234567.89), 1234570.0);
        assert_eq!(round_significant(-0.000123456789), -0.000123457);
        assert_eq!(round_significant(42.0), 42.0);
    }
}
