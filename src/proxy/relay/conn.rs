//! One client connection: heads read and parsed in place, each exchange forwarded
//! over a pooled upstream connection, answers written back in order (pipelined
//! requests wait in the read buffer until the answer before them is written).

use super::buffer::{self, ReadBuffer};
use super::framing::{
    self, ChunkError, ChunkStep, ChunkedDecoder, ClientFraming, ClientSide, HeadError, RequestBody, RequestContext,
    RequestHead, ResponseBody, ResponseHead,
};
use super::pool::UpstreamConnection;
use super::Relay;
use crate::capture::ErrorOrigin;
use crate::proxy::rest::{record_local_error, upstream_failed, upstream_timed_out};
use crate::proxy::tee::{ExchangeRecord, RecordStart, Side, Tap};
use crate::proxy::RouteKind;
use http::StatusCode;
use std::io::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// A client that started a head must finish it within this (hyper's default
/// `header_read_timeout`), else it is answered 408; an idle keep-alive connection
/// waits for its next request up to the listener's idle timeout, then is closed.
const HEAD_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Answer to a head, or a body, that the client did not finish sending in time.
const REQUEST_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
/// The interim answer to `Expect: 100-continue`.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
/// Answer to a malformed chunked request body, in the shape of hyper's parse errors.
const BAD_REQUEST: &[u8] = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
/// Response bytes gathered before they are written to the client.
const WRITE_BATCH: usize = 64 << 10;

/// The client's side of the connection and the buffers it reuses for every exchange.
struct Client<S> {
    io: S,
    /// Bytes read from the client: heads are parsed here, bodies pass through.
    buffer: ReadBuffer,
    /// The answer being written to the client (head, then batched body bytes).
    out: Vec<u8>,
    /// The request being written upstream (rewritten head, then body bytes).
    upstream_out: Vec<u8>,
}

/// Serves one client connection until it closes, errs, or the relay stops between
/// exchanges.
pub(super) async fn serve<S>(relay: Relay, io: S, peer: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut client = Client {
        io,
        buffer: ReadBuffer::default(),
        out: Vec::with_capacity(4096),
        upstream_out: Vec::with_capacity(4096),
    };
    let context = RequestContext {
        upstream_authority: relay.shared.rest_upstream.authority.as_str(),
        request_id_header: relay.shared.request_id_header.as_str(),
    };
    loop {
        let head = match read_head(&mut client, &context, &relay.stop, relay.shared.limits.idle_timeout).await {
            Ok(Some(head)) => head,
            Ok(None) => break,
            Err(Refusal::Head(error)) => {
                debug!(message = "Refused a malformed request head.", ?error, %peer);
                relay.shared.metrics.client_fault();
                let _ = write_all(&mut client.io, error.response()).await;
                break;
            }
            Err(Refusal::SlowHead) => {
                debug!(message = "Client did not finish its request head in time.", %peer);
                relay.shared.metrics.client_fault();
                let _ = write_all(&mut client.io, REQUEST_TIMEOUT).await;
                break;
            }
        };
        let stopping = relay.stop.is_cancelled();
        if !exchange(&relay, &mut client, peer, head, stopping).await {
            break;
        }
    }
    let _ = client.io.shutdown().await;
}

/// Why a head was not read.
#[derive(Debug)]
enum Refusal {
    /// Malformed, too large, or a method mltap refuses.
    Head(HeadError),
    /// Started but not finished within `HEAD_READ_TIMEOUT`.
    SlowHead,
}

/// Reads until a whole head is buffered. `Ok(None)`: the connection ended (closed,
/// read error, stop or idle timeout while idle).
async fn read_head<S: AsyncRead + Unpin>(
    client: &mut Client<S>,
    context: &RequestContext<'_>,
    stop: &CancellationToken,
    idle_timeout: Duration,
) -> Result<Option<RequestHead>, Refusal> {
    let mut deadline = None;
    loop {
        if !client.buffer.is_empty() {
            let parsed = framing::parse_request(client.buffer.filled(), context, &mut client.upstream_out);
            if let Some(head) = parsed.map_err(Refusal::Head)? {
                return Ok(Some(head));
            }
        }
        let read = if client.buffer.is_empty() {
            // An idle connection holds a file descriptor: it may wait this long.
            let idle =
                tokio::time::timeout(idle_timeout, client.buffer.fill_from(&mut client.io, framing::MAX_HEAD_BYTES));
            tokio::select! {
                read = idle => match read {
                    Ok(read) => read,
                    Err(_) => return Ok(None),
                },
                _ = stop.cancelled() => return Ok(None),
            }
        } else {
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + HEAD_READ_TIMEOUT);
            let fill = client.buffer.fill_from(&mut client.io, framing::MAX_HEAD_BYTES);
            match tokio::time::timeout_at(deadline, fill).await {
                Ok(read) => read,
                Err(_) => return Err(Refusal::SlowHead),
            }
        };
        match read {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::OutOfMemory => {
                return Err(Refusal::Head(HeadError::TooLarge))
            }
            Err(_) => return Ok(None),
        }
    }
}

/// Where the forwarding of a request body stands.
#[derive(Debug)]
enum BodyState {
    Done,
    Length(u64),
    Chunked(ChunkedDecoder),
}

impl BodyState {
    fn is_done(&self) -> bool {
        matches!(self, BodyState::Done)
    }
}

/// Why forwarding the rest of a request body stopped.
#[derive(Debug)]
enum BodyError {
    /// The client closed or failed mid-body.
    Client,
    /// The client's chunked framing is invalid.
    Malformed(ChunkError),
    /// Writing to the upstream failed; its answer may still come.
    Upstream,
}

/// Why an exchange got no upstream answer.
#[derive(Debug)]
enum Failure {
    /// Answered 502 with this cause.
    Upstream(String),
    /// The client went away: nothing to answer.
    ClientGone,
    /// Answered 400: the client's chunked body is malformed.
    BadChunk(ChunkError),
}

/// Forwards one exchange; returns whether the client connection stays open.
async fn exchange<S>(relay: &Relay, client: &mut Client<S>, peer: SocketAddr, head: RequestHead, stopping: bool) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let shared = &relay.shared;
    let started_at = SystemTime::now();
    client.buffer.consume(head.len);
    let route = RouteKind::rest(&head.method, head.target.path());
    let capture = route.captured();
    let logs_all = shared.logs.access_on();
    let (request_id, generated) = match head.request_id {
        Some(id) => (id, false),
        None if capture || shared.return_request_id => (shared.request_ids.generate(), true),
        None => (String::new(), false),
    };
    let record = ExchangeRecord::new(
        shared.clone(),
        RecordStart {
            route,
            capture,
            path: if capture || logs_all { head.target.path().to_string() } else { String::new() },
            request_id: if capture || logs_all { request_id.clone() } else { String::new() },
            request_id_generated: generated,
            request_encoding: head.content_encoding,
            started_at,
            client: Some(peer),
        },
    );
    let mut request_tap = record.captures().then(|| Tap::new(record.clone(), Side::Request));
    let mut response_tap = Tap::new(record.clone(), Side::Response);
    let mut body = match head.body {
        RequestBody::Empty => BodyState::Done,
        RequestBody::Length(len) => BodyState::Length(len),
        RequestBody::Chunked => BodyState::Chunked(ChunkedDecoder::default()),
    };
    if body.is_done() {
        if let Some(tap) = request_tap.as_mut() {
            tap.deposit(true);
        }
    }
    // The part of the body that came with the head leaves with it, in one write.
    if let Err(error) = absorb_body(&mut client.buffer, &mut body, &mut client.upstream_out, &mut request_tap) {
        return refuse_body(client, &record, error).await;
    }
    let returned_id = (generated && shared.return_request_id).then_some(request_id.as_str());
    let client_side = ClientSide {
        http10: head.http10,
        head_request: head.method == http::Method::HEAD,
        keep_alive: head.keep_alive && !stopping,
        extra_field: returned_id.map(|id| (shared.request_id_header.as_str(), id)),
    };
    let expect_continue = head.expect_continue && !head.http10 && head.body != RequestBody::Empty;

    let deadline = Instant::now() + shared.upstream_timeout;
    let forwarded = tokio::time::timeout_at(
        deadline,
        forward_request(relay, client, &mut body, &mut request_tap, expect_continue, &client_side, capture),
    )
    .await;
    let (mut connection, response, framing) = match forwarded {
        Ok(Ok(answer)) => answer,
        Ok(Err(Failure::ClientGone)) => return false,
        Ok(Err(Failure::BadChunk(error))) => return refuse_body(client, &record, error).await,
        Ok(Err(Failure::Upstream(cause))) => {
            let message = upstream_failed(shared, &cause);
            return local_error(client, &record, StatusCode::BAD_GATEWAY, &message, &client_side, body.is_done()).await;
        }
        Err(_) if !body.is_done() => {
            // The client's body was still coming: the client's fault, not TF Serving's.
            debug!(message = "Client did not finish its request body in time.", %peer);
            record.failed(ErrorOrigin::Client);
            let message = format!("the request body did not arrive within {:?}", shared.upstream_timeout);
            return local_error(client, &record, StatusCode::REQUEST_TIMEOUT, &message, &client_side, false).await;
        }
        Err(_) => {
            let message = upstream_timed_out(shared);
            return local_error(client, &record, StatusCode::GATEWAY_TIMEOUT, &message, &client_side, body.is_done())
                .await;
        }
    };
    record.response_head(response.status, None, response.content_encoding.clone());

    let relayed = relay_response(&mut connection, client, &response, framing, &mut response_tap).await;
    let request_sent = body.is_done();
    if relayed.upstream_clean && request_sent && response.upstream_keep_alive {
        relay.pool.put(connection);
    }
    relayed.client_open && request_sent && !framing.close
}

/// Connects (or takes a pooled connection), sends the request and reads the answer's
/// head, forwarding the rest of the request body meanwhile. Bounded by the caller's
/// upstream timeout.
async fn forward_request<S>(
    relay: &Relay,
    client: &mut Client<S>,
    body: &mut BodyState,
    request_tap: &mut Option<Tap>,
    expect_continue: bool,
    client_side: &ClientSide<'_>,
    capture: bool,
) -> Result<(UpstreamConnection, ResponseHead, ClientFraming), Failure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut connection = relay.pool.get().await.map_err(|error| Failure::Upstream(format!("connect: {error}")))?;
    if expect_continue && write_all(&mut client.io, CONTINUE).await.is_err() {
        return Err(Failure::ClientGone);
    }
    let Client { io: client_io, buffer: client_buffer, out: client_out, upstream_out } = client;
    let UpstreamConnection { stream, buffer: upstream_buffer, .. } = &mut connection;
    let (mut upstream_read, mut upstream_write) = stream.split();
    if let Err(error) = upstream_write.write_all(upstream_out).await {
        return Err(Failure::Upstream(format!("sending the request: {error}")));
    }
    let receive = read_response_head(&mut upstream_read, upstream_buffer, client_side, capture, client_out);
    let response = if body.is_done() {
        receive.await?
    } else {
        // TF Serving may answer before the body is in (an error, say): read its head
        // while the body still flows, and finish the body before answering.
        let send = forward_body(client_io, client_buffer, &mut upstream_write, body, request_tap, upstream_out);
        tokio::pin!(send, receive);
        let (mut sent, mut received) = (false, None);
        loop {
            tokio::select! {
                result = &mut send, if !sent => {
                    sent = true;
                    match result {
                        Ok(()) | Err(BodyError::Upstream) => {}
                        Err(BodyError::Client) => return Err(Failure::ClientGone),
                        Err(BodyError::Malformed(error)) => return Err(Failure::BadChunk(error)),
                    }
                }
                result = &mut receive, if received.is_none() => received = Some(result?),
            }
            if sent {
                if let Some(response) = received.take() {
                    break response;
                }
            }
        }
    };
    Ok((connection, response.0, response.1))
}

/// Moves the body bytes already buffered from the client into `out`, re-chunked when
/// the body is chunked, copying them for the capture.
fn absorb_body(
    buffer: &mut ReadBuffer,
    body: &mut BodyState,
    out: &mut Vec<u8>,
    tap: &mut Option<Tap>,
) -> Result<(), ChunkError> {
    match body {
        BodyState::Done => {}
        BodyState::Length(remaining) => {
            let n = usize::try_from(*remaining).unwrap_or(usize::MAX).min(buffer.filled().len());
            let data = &buffer.filled()[..n];
            if let Some(tap) = tap.as_mut() {
                tap.copy(data);
            }
            out.extend_from_slice(data);
            buffer.consume(n);
            *remaining -= n as u64;
            if *remaining == 0 {
                *body = BodyState::Done;
                if let Some(tap) = tap.as_mut() {
                    tap.deposit(true);
                }
            }
        }
        BodyState::Chunked(decoder) => loop {
            match decoder.step(buffer.filled())? {
                ChunkStep::Framing(n) => buffer.consume(n),
                ChunkStep::Data(n) => {
                    let data = &buffer.filled()[..n];
                    if let Some(tap) = tap.as_mut() {
                        tap.copy(data);
                    }
                    framing::push_chunk(out, data);
                    buffer.consume(n);
                }
                ChunkStep::Done(n) => {
                    buffer.consume(n);
                    out.extend_from_slice(framing::LAST_CHUNK);
                    *body = BodyState::Done;
                    if let Some(tap) = tap.as_mut() {
                        tap.deposit(true);
                    }
                    break;
                }
                ChunkStep::NeedMore => break,
            }
        },
    }
    Ok(())
}

/// Forwards the rest of a request body as the client sends it.
async fn forward_body<R, W>(
    client: &mut R,
    buffer: &mut ReadBuffer,
    upstream: &mut W,
    body: &mut BodyState,
    tap: &mut Option<Tap>,
    out: &mut Vec<u8>,
) -> Result<(), BodyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        out.clear();
        absorb_body(buffer, body, out, tap).map_err(BodyError::Malformed)?;
        if !out.is_empty() {
            upstream.write_all(out).await.map_err(|_| BodyError::Upstream)?;
        }
        if body.is_done() {
            return Ok(());
        }
        match buffer.fill_from(client, framing::MAX_HEAD_BYTES.max(buffer::INITIAL)).await {
            Ok(0) | Err(_) => return Err(BodyError::Client),
            Ok(_) => {}
        }
    }
}

/// Reads the upstream's response head, skipping interim (1xx) answers; the head for
/// the client is left in `client_out`.
async fn read_response_head<R: AsyncRead + Unpin>(
    upstream: &mut R,
    buffer: &mut ReadBuffer,
    client_side: &ClientSide<'_>,
    capture: bool,
    client_out: &mut Vec<u8>,
) -> Result<(ResponseHead, ClientFraming), Failure> {
    loop {
        if !buffer.is_empty() {
            match framing::parse_response(buffer.filled(), client_side, capture, client_out) {
                Ok(Some((head, _))) if head.interim => {
                    buffer.consume(head.len);
                    continue;
                }
                Ok(Some((head, framing))) => {
                    buffer.consume(head.len);
                    return Ok((head, framing));
                }
                Ok(None) => {}
                Err(error) => return Err(Failure::Upstream(error.0.to_string())),
            }
        }
        match buffer.fill_from(upstream, framing::MAX_HEAD_BYTES).await {
            Ok(0) => return Err(Failure::Upstream("connection closed before message completed".into())),
            Ok(_) => {}
            Err(error) => return Err(Failure::Upstream(format!("reading the response: {error}"))),
        }
    }
}

/// How relaying a response body ended.
struct Relayed {
    /// The client got the whole answer and can be written to again.
    client_open: bool,
    /// The upstream's body was read to its end and nothing more: reusable.
    upstream_clean: bool,
}

/// Where reading an upstream response body stands.
enum ResponseState {
    Done,
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
}

/// Streams the response body to the client (its head is already in `client.out`),
/// batching small responses into a single write.
async fn relay_response<S>(
    connection: &mut UpstreamConnection,
    client: &mut Client<S>,
    response: &ResponseHead,
    framing: ClientFraming,
    tap: &mut Tap,
) -> Relayed
where
    S: AsyncWrite + Unpin,
{
    let mut state = match response.body {
        ResponseBody::Empty | ResponseBody::Length(0) => ResponseState::Done,
        ResponseBody::Length(len) => ResponseState::Length(len),
        ResponseBody::Chunked => ResponseState::Chunked(ChunkedDecoder::default()),
        ResponseBody::UntilClose => ResponseState::UntilClose,
    };
    let out = &mut client.out;
    loop {
        if let Err(error) = absorb_response(&mut connection.buffer, &mut state, out, tap, framing.chunked) {
            warn!(message = "REST upstream sent a malformed chunked body; closing the client connection.", %error);
            let _ = write_all(&mut client.io, out).await;
            return Relayed { client_open: false, upstream_clean: false };
        }
        if matches!(state, ResponseState::Done) {
            tap.deposit(true);
            let written = write_all(&mut client.io, out).await.is_ok();
            return Relayed { client_open: written, upstream_clean: connection.buffer.is_empty() };
        }
        if out.len() >= WRITE_BATCH || connection.buffer.is_empty() {
            if write_all(&mut client.io, out).await.is_err() {
                return Relayed { client_open: false, upstream_clean: false };
            }
            out.clear();
        }
        match connection.buffer.fill_from(&mut connection.stream, framing::MAX_HEAD_BYTES).await {
            Ok(0) if matches!(state, ResponseState::UntilClose) => {
                if framing.chunked {
                    out.extend_from_slice(framing::LAST_CHUNK);
                }
                tap.deposit(true);
                let written = write_all(&mut client.io, out).await.is_ok();
                return Relayed { client_open: written, upstream_clean: false };
            }
            Ok(0) | Err(_) => {
                warn!(
                    message =
                        "REST upstream closed or reset its connection mid-response; closing the client connection.",
                    status = response.status,
                );
                let _ = write_all(&mut client.io, out).await;
                return Relayed { client_open: false, upstream_clean: false };
            }
            Ok(_) => {}
        }
    }
}

/// Moves the response body bytes buffered from the upstream into `out`, framed for
/// the client (re-chunked when `rechunk`), copying them for the capture.
fn absorb_response(
    buffer: &mut ReadBuffer,
    state: &mut ResponseState,
    out: &mut Vec<u8>,
    tap: &mut Tap,
    rechunk: bool,
) -> Result<(), ChunkError> {
    let mut pass = |out: &mut Vec<u8>, data: &[u8]| {
        tap.copy(data);
        if rechunk {
            framing::push_chunk(out, data);
        } else {
            out.extend_from_slice(data);
        }
    };
    match state {
        ResponseState::Done => {}
        ResponseState::Length(remaining) => {
            let n = usize::try_from(*remaining).unwrap_or(usize::MAX).min(buffer.filled().len());
            pass(out, &buffer.filled()[..n]);
            buffer.consume(n);
            *remaining -= n as u64;
            if *remaining == 0 {
                *state = ResponseState::Done;
            }
        }
        ResponseState::UntilClose => {
            let n = buffer.filled().len();
            pass(out, buffer.filled());
            buffer.consume(n);
        }
        ResponseState::Chunked(decoder) => loop {
            match decoder.step(buffer.filled())? {
                ChunkStep::Framing(n) => buffer.consume(n),
                ChunkStep::Data(n) => {
                    pass(out, &buffer.filled()[..n]);
                    buffer.consume(n);
                }
                ChunkStep::Done(n) => {
                    buffer.consume(n);
                    if rechunk {
                        out.extend_from_slice(framing::LAST_CHUNK);
                    }
                    *state = ResponseState::Done;
                    break;
                }
                ChunkStep::NeedMore => break,
            }
        },
    }
    Ok(())
}

/// Answers 400 for a malformed chunked request body and closes: where the next
/// request would start is unknown.
async fn refuse_body<S: AsyncWrite + Unpin>(
    client: &mut Client<S>,
    record: &ExchangeRecord,
    error: ChunkError,
) -> bool {
    debug!(message = "Refused a malformed chunked request body.", %error);
    record.upstream_finished();
    record.failed(ErrorOrigin::Client);
    record.response_head(StatusCode::BAD_REQUEST.as_u16(), None, None);
    let _ = write_all(&mut client.io, BAD_REQUEST).await;
    false
}

/// Answers for TF Serving (502, 504) in its error shape; the connection stays open
/// only when the request body was read whole.
async fn local_error<S: AsyncWrite + Unpin>(
    client: &mut Client<S>,
    record: &ExchangeRecord,
    status: StatusCode,
    message: &str,
    client_side: &ClientSide<'_>,
    body_read: bool,
) -> bool {
    let body = record_local_error(record, status, message);
    let close = !client_side.keep_alive || !body_read;
    let out = &mut client.out;
    out.clear();
    let version = if client_side.http10 { "HTTP/1.0" } else { "HTTP/1.1" };
    let reason = status.canonical_reason().unwrap_or("<none>");
    let _ = write!(out, "{version} {} {reason}\r\ncontent-type: application/json\r\n", status.as_str());
    let _ = write!(out, "content-length: {}\r\n", body.len());
    if let Some((name, value)) = client_side.extra_field {
        let _ = write!(out, "{name}: {value}\r\n");
    }
    match (close, client_side.http10) {
        (true, false) => out.extend_from_slice(b"connection: close\r\n"),
        (false, true) => out.extend_from_slice(b"connection: keep-alive\r\n"),
        _ => {}
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
    write_all(&mut client.io, out).await.is_ok() && !close
}

/// Writes and flushes (a TLS stream holds written bytes until flushed).
async fn write_all<W: AsyncWrite + Unpin>(io: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    io.write_all(bytes).await?;
    io.flush().await
}
