//! The REST path through hyper, used for `https://` upstreams (cleartext upstreams
//! go through the relay, `super::relay`): one HTTP/1.1 request forwarded to TF
//! Serving's REST port, its response streamed back with only the hop-by-hop fields
//! removed. When TF Serving cannot be reached mltap answers for it, in its error
//! shape `{"error": "..."}`: 502 when the connection fails, 504 when the response
//! head does not come in time. Both paths take those answers from here.

use super::headers::strip_hop_by_hop;
use super::tee::{ExchangeRecord, Side, Tap, TeeBody};
use super::{error_chain, ProxyShared, ResponseBody, RouteKind};
use crate::capture::ErrorOrigin;
use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use hyper::body::Incoming;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;
use tracing::warn;

pub(super) async fn handle(
    shared: Arc<ProxyShared>,
    peer: std::net::SocketAddr,
    request: Request<Incoming>,
    _busy: super::BusyOwned,
) -> Result<Response<ResponseBody>, Infallible> {
    let started_at = SystemTime::now();
    if let Some((status, message)) = refused_request(&request) {
        shared.metrics.client_fault();
        let mut response =
            Response::new(ResponseBody::local(Bytes::from(serde_json::json!({ "error": message }).to_string())));
        *response.status_mut() = status;
        response.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        response.headers_mut().insert(header::CONNECTION, http::HeaderValue::from_static("close"));
        return Ok(response);
    }
    let (mut parts, body) = request.into_parts();
    let route = RouteKind::rest(&parts.method, parts.uri.path());
    let (record, returned_id) =
        shared.open_record(peer, started_at, route, &mut parts, strip_hop_by_hop, header::CONTENT_ENCODING);
    parts.uri = shared.rest_upstream.uri_for(&parts.uri);
    parts.version = http::Version::HTTP_11;
    let tap = record.captures().then(|| Tap::new(record.clone(), Side::Request));
    let upstream_request = Request::from_parts(parts, TeeBody::new(body, tap));

    let answer = tokio::time::timeout(shared.upstream_timeout, shared.rest_client.request(upstream_request)).await;
    let mut response = match answer {
        Ok(Ok(response)) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            record.response_head(parts.status.as_u16(), None, header_text(&parts.headers, header::CONTENT_ENCODING));
            let tap = Tap::new(record.clone(), Side::Response);
            Response::from_parts(parts, ResponseBody::Upstream { body: TeeBody::new(body, Some(tap)), lane: None })
        }
        Ok(Err(error)) => {
            let message = upstream_failed(&shared, &error_chain(&error));
            local_error(&record, StatusCode::BAD_GATEWAY, &message)
        }
        Err(_) => local_error(&record, StatusCode::GATEWAY_TIMEOUT, &upstream_timed_out(&shared)),
    };
    shared.return_id(response.headers_mut(), returned_id);
    Ok(response)
}

/// A request the hyper path refuses as the relay does (`relay::framing`): CONNECT, and
/// an HTTP/1.1 request without exactly one `Host` (RFC 9112 section 3.2).
fn refused_request<B>(request: &Request<B>) -> Option<(StatusCode, &'static str)> {
    if request.method() == http::Method::CONNECT {
        return Some((
            StatusCode::METHOD_NOT_ALLOWED,
            "CONNECT is not served: mltap is a reverse proxy for TF Serving",
        ));
    }
    let hosts = request.headers().get_all(header::HOST).iter().count();
    if hosts > 1 || (hosts == 0 && request.version() == http::Version::HTTP_11) {
        return Some((StatusCode::BAD_REQUEST, "an HTTP/1.1 request needs exactly one Host field"));
    }
    None
}

/// The message of the 502 answered when TF Serving's REST port fails; logged too.
pub(super) fn upstream_failed(shared: &ProxyShared, cause: &str) -> String {
    warn!(message = "REST upstream failed.", upstream = %shared.rest_upstream.shown, error = %cause);
    format!("upstream {} (TF Serving REST) failed: {cause}", shared.rest_upstream.shown)
}

/// The message of the 504 answered when the response head does not come in time.
pub(super) fn upstream_timed_out(shared: &ProxyShared) -> String {
    warn!(message = "REST upstream timed out.", upstream = %shared.rest_upstream.shown);
    format!(
        "upstream {} (TF Serving REST) did not answer within {:?}",
        shared.rest_upstream.shown, shared.upstream_timeout
    )
}

/// Notes mltap's own answer on the record and returns its body, TF Serving's error
/// shape `{"error": "..."}` (sent as `application/json`).
pub(super) fn record_local_error(record: &ExchangeRecord, status: StatusCode, message: &str) -> String {
    record.upstream_finished();
    record.failed(ErrorOrigin::Mltap);
    record.response_head(status.as_u16(), None, None);
    serde_json::json!({ "error": message }).to_string()
}

/// A TF-Serving-shaped error answered by mltap itself.
fn local_error(record: &ExchangeRecord, status: StatusCode, message: &str) -> Response<ResponseBody> {
    let body = record_local_error(record, status, message);
    let mut response = Response::new(ResponseBody::local(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    response
}

pub(super) fn header_text(headers: &http::HeaderMap, name: impl http::header::AsHeaderName) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}
