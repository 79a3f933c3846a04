//! The gRPC path: one HTTP/2 stream forwarded to TF Serving's gRPC port over a pooled
//! HTTP/2 connection. Headers, metadata, messages and trailers pass unchanged;
//! trailers-only answers stay trailers-only. A reset from TF Serving resets the
//! client's stream with the same reason, and a client's reset or cancel drops the
//! upstream stream, which resets it. When TF Serving cannot be reached, mltap answers
//! trailers-only `UNAVAILABLE` (or `DEADLINE_EXCEEDED` past the deadline) naming it.

use super::headers::strip_hop_by_hop_h2;
use super::rest::header_text;
use super::tee::{ExchangeRecord, Side, Tap, TeeBody};
use super::{error_chain, grpc_status_of, ProxyShared, ResponseBody, RouteKind};
use crate::capture::ErrorOrigin;
use http::{Request, Response};
use hyper::body::Incoming;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tracing::warn;

/// gRPC status codes mltap answers with itself.
const DEADLINE_EXCEEDED: i32 = 4;
const UNAVAILABLE: i32 = 14;

/// An error that makes hyper reset the client's stream with the upstream's reason.
pub(super) type ResetStream = Box<dyn std::error::Error + Send + Sync>;

pub(super) async fn handle(
    shared: Arc<ProxyShared>,
    peer: std::net::SocketAddr,
    request: Request<Incoming>,
    _busy: super::BusyOwned,
) -> Result<Response<ResponseBody>, ResetStream> {
    let started_at = SystemTime::now();
    if request.method() == http::Method::CONNECT {
        // A reverse proxy for TF Serving, never a tunnel.
        let mut refused = Response::new(ResponseBody::local(bytes::Bytes::new()));
        *refused.status_mut() = http::StatusCode::METHOD_NOT_ALLOWED;
        shared.metrics.client_fault();
        return Ok(refused);
    }
    let (mut parts, body) = request.into_parts();
    let route = RouteKind::grpc(parts.uri.path());
    let (record, returned_id) =
        shared.open_record(peer, started_at, route, &mut parts, strip_hop_by_hop_h2, "grpc-encoding");
    let deadline = parts
        .headers
        .get("grpc-timeout")
        .and_then(|v| parse_grpc_timeout(v.as_bytes()))
        .unwrap_or(shared.upstream_timeout);
    parts.uri = shared.grpc_upstream.uri_for(&parts.uri);
    parts.version = http::Version::HTTP_2;
    let tap = record.captures().then(|| Tap::new(record.clone(), Side::Request));
    let upstream_request = Request::from_parts(parts, TeeBody::new(body, tap));

    let (client, lane) = shared.grpc_lanes.pick();
    let answer = tokio::time::timeout(deadline, client.request(upstream_request)).await;
    let mut response = match answer {
        Ok(Ok(response)) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop_h2(&mut parts.headers);
            record.response_head(
                parts.status.as_u16(),
                grpc_status_of(&parts.headers),
                header_text(&parts.headers, "grpc-encoding"),
            );
            let tap = Tap::new(record.clone(), Side::Response);
            Response::from_parts(
                parts,
                ResponseBody::Upstream { body: TeeBody::new(body, Some(tap)), lane: Some(lane) },
            )
        }
        Ok(Err(error)) if is_stream_reset(&error) => {
            warn!(message = "Upstream reset the stream; the client's stream is reset the same way.", upstream = %shared.grpc_upstream.shown, error = %error_chain(&error));
            record.upstream_finished();
            record.failed(ErrorOrigin::Upstream);
            return Err(Box::new(error));
        }
        Ok(Err(error)) => {
            warn!(message = "gRPC upstream failed.", upstream = %shared.grpc_upstream.shown, error = %error_chain(&error));
            let message = format!(
                "upstream {} (TF Serving gRPC) unavailable: {}",
                shared.grpc_upstream.shown,
                error_chain(&error)
            );
            trailers_only(&record, UNAVAILABLE, &message)
        }
        Err(_) => {
            warn!(message = "gRPC upstream timed out.", upstream = %shared.grpc_upstream.shown);
            let message =
                format!("upstream {} (TF Serving gRPC) did not answer within {deadline:?}", shared.grpc_upstream.shown);
            trailers_only(&record, DEADLINE_EXCEEDED, &message)
        }
    };
    shared.return_id(response.headers_mut(), returned_id);
    Ok(response)
}

/// Whether the upstream reset this one stream (as opposed to failing the connection).
fn is_stream_reset(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(cause) = source {
        if let Some(h2) = cause.downcast_ref::<h2::Error>() {
            return h2.is_reset() && h2.is_remote();
        }
        source = cause.source();
    }
    false
}

/// A gRPC error answered by mltap: status and message in the response head.
fn trailers_only(record: &ExchangeRecord, code: i32, message: &str) -> Response<ResponseBody> {
    record.upstream_finished();
    record.failed(ErrorOrigin::Mltap);
    record.response_head(200, Some(code), None);
    let mut response = Response::new(ResponseBody::local(bytes::Bytes::new()));
    let headers = response.headers_mut();
    headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    headers.insert("grpc-status", http::HeaderValue::from(code));
    if let Ok(value) = http::HeaderValue::from_str(&percent_encode(message)) {
        headers.insert("grpc-message", value);
    }
    response
}

/// grpc-message encoding: bytes outside printable ASCII, and `%`, as `%XX`.
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `grpc-timeout`: up to 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        assert_eq!(parse_grpc_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout(b"150m"), Some(Duration::from_millis(150)));
        assert_eq!(parse_grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout(b"123456789S"), None);
        assert_eq!(parse_grpc_timeout(b"S"), None);
        assert_eq!(parse_grpc_timeout(b"5x"), None);
    }

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(percent_encode("50% down: é"), "50%25 down: %C3%A9");
    }
}
