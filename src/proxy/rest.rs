//! The REST path: one HTTP/1.1 request forwarded to TF Serving's REST port, its
//! response streamed back with only the hop-by-hop fields removed. When TF Serving
//! cannot be reached mltap answers for it, in its error shape `{"error": "..."}`:
//! 502 when the connection fails, 504 when the response head does not come in time.

use super::headers::strip_hop_by_hop;
use super::tee::{ExchangeRecord, RecordStart, Side, Tap, TeeBody};
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
) -> Result<Response<ResponseBody>, Infallible> {
    let started_at = SystemTime::now();
    let (mut parts, body) = request.into_parts();
    let route = RouteKind::rest(&parts.method, parts.uri.path());
    let capture = route.captured();
    let logs_all = shared.logs.access_on();
    let (request_id, generated) = shared.request_id(&parts.headers, capture);
    strip_hop_by_hop(&mut parts.headers);
    let record = ExchangeRecord::new(
        shared.clone(),
        RecordStart {
            route,
            capture,
            path: if capture || logs_all { parts.uri.path().to_string() } else { String::new() },
            request_id: if capture || logs_all { request_id.clone() } else { String::new() },
            request_id_generated: generated,
            request_encoding: header_text(&parts.headers, header::CONTENT_ENCODING),
            started_at,
            client: Some(peer),
        },
    );
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
            Response::from_parts(parts, ResponseBody::Upstream { body: TeeBody::new(body, Some(tap)) })
        }
        Ok(Err(error)) => {
            let message =
                format!("upstream {} (TF Serving REST) failed: {}", shared.rest_upstream.shown, error_chain(&error));
            warn!(message = "REST upstream failed.", upstream = %shared.rest_upstream.shown, error = %error_chain(&error));
            local_error(&record, StatusCode::BAD_GATEWAY, &message)
        }
        Err(_) => {
            let message = format!(
                "upstream {} (TF Serving REST) did not answer within {:?}",
                shared.rest_upstream.shown, shared.upstream_timeout
            );
            warn!(message = "REST upstream timed out.", upstream = %shared.rest_upstream.shown);
            local_error(&record, StatusCode::GATEWAY_TIMEOUT, &message)
        }
    };
    shared.return_generated_id(response.headers_mut(), &request_id, generated);
    Ok(response)
}

/// A TF-Serving-shaped error answered by mltap itself.
fn local_error(record: &ExchangeRecord, status: StatusCode, message: &str) -> Response<ResponseBody> {
    record.upstream_finished();
    record.failed(ErrorOrigin::Mltap);
    record.response_head(status.as_u16(), None, None);
    let body = serde_json::json!({ "error": message }).to_string();
    let mut response = Response::new(ResponseBody::local(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    response
}

pub(super) fn header_text(headers: &http::HeaderMap, name: impl http::header::AsHeaderName) -> Option<String> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}
