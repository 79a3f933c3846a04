//! The body tee and the record of one exchange.
//!
//! `TeeBody` wraps a request or response body and forwards `poll_frame`,
//! `is_end_stream` and `size_hint` untouched; as data passes it keeps cheap `Bytes`
//! clones (while the exchange stays under its byte cap) and notes the trailers'
//! `grpc-status`. Each side deposits what it saw into the shared `ExchangeRecord`
//! exactly once: at its end, trailers, error or drop. When the last holder of the
//! record lets go, the record counts the request in the metrics and submits the
//! `Exchange` to the capture queue without waiting. Whether an exchange is sampled
//! for statistics (both bodies copied) or only counted (response and a request prefix)
//! is decided when its record is created. Nothing here parses a payload.

use super::{ProxyShared, RouteKind};
use crate::capture::{Bodies, ErrorOrigin, Exchange, Protocol, REQUEST_PREFIX_BYTES};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant, SystemTime};

/// Which body of the exchange a tap watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Request,
    Response,
}

/// What the sides and the handler learn as the exchange runs; written at most a few
/// times per exchange, never held across an await.
#[derive(Debug, Default)]
struct Observed {
    /// Captured request chunks, deposited when the request side ends.
    request_body: Vec<Bytes>,
    /// Captured response chunks, deposited when the response side ends.
    response_body: Vec<Bytes>,
    /// The request body reached its end (not cut short).
    request_complete: bool,
    /// The response body reached its end (not cut short).
    response_complete: bool,
    /// HTTP status of the response the client got.
    status: u16,
    /// grpc-status from the trailers or a trailers-only response.
    grpc_status: Option<i32>,
    /// `Content-Encoding` / `grpc-encoding` of the response.
    response_encoding: Option<String>,
    /// Set when the upstream's response ended (or failed).
    upstream_latency: Option<Duration>,
    /// A failure whose origin is known where it happened (mltap's own answer, an
    /// upstream reset or broken body, a client that went away).
    failure: Option<ErrorOrigin>,
    /// Body bytes that passed each way (tapped sides only), for the access log.
    request_bytes: u64,
    response_bytes: u64,
}

/// The shared record of one exchange. Its `Drop` is the end of the exchange.
#[derive(Debug)]
pub struct ExchangeRecord {
    /// Metrics, capture queue and configuration of the proxy.
    shared: Arc<ProxyShared>,
    /// Kind of call (protocol and method), for metric labels and the capture decision.
    route: RouteKind,
    /// The path (captured exchanges only; empty otherwise).
    path: String,
    /// The request id (captured exchanges only).
    request_id: String,
    /// Whether mltap generated `request_id`.
    request_id_generated: bool,
    /// `Content-Encoding` / `grpc-encoding` of the request.
    request_encoding: Option<String>,
    /// Wall-clock arrival, the exchange's event time.
    started_at: SystemTime,
    /// When the request left for the upstream; latency is measured from here.
    sent_at: Instant,
    /// Whether bodies are copied for the worker at all.
    capture: bool,
    /// Whether the whole request is copied too (statistics); else only its prefix.
    sampled: bool,
    /// Body bytes copied so far by both sides, against the per-exchange cap.
    captured_bytes: AtomicUsize,
    /// Set when the request passed the cap: it is cut to its prefix (counted only).
    request_cut: AtomicBool,
    /// Set when the response passed the cap: nothing but the request is counted.
    response_cut: AtomicBool,
    /// Whether the request log sampled this exchange: both bodies are copied whole,
    /// whatever the monitoring's own sampling decided.
    logged: bool,
    /// The client's address, for the access log.
    client: Option<std::net::SocketAddr>,
    observed: Mutex<Observed>,
}

/// What the handler knows about a request when it creates its record.
pub struct RecordStart {
    pub route: RouteKind,
    pub capture: bool,
    pub path: String,
    pub request_id: String,
    pub request_id_generated: bool,
    pub request_encoding: Option<String>,
    pub started_at: SystemTime,
    pub client: Option<std::net::SocketAddr>,
}

impl ExchangeRecord {
    pub fn new(shared: Arc<ProxyShared>, start: RecordStart) -> Arc<Self> {
        let sampled = start.capture && shared.capture.sample();
        let logged = start.capture && shared.logs.sample();
        Arc::new(ExchangeRecord {
            shared,
            route: start.route,
            path: start.path,
            request_id: start.request_id,
            request_id_generated: start.request_id_generated,
            request_encoding: start.request_encoding,
            started_at: start.started_at,
            sent_at: Instant::now(),
            capture: start.capture,
            sampled,
            captured_bytes: AtomicUsize::new(0),
            request_cut: AtomicBool::new(false),
            response_cut: AtomicBool::new(false),
            logged,
            client: start.client,
            observed: Mutex::new(Observed::default()),
        })
    }

    /// Notes the response head as it goes to the client.
    pub fn response_head(&self, status: u16, grpc_status: Option<i32>, encoding: Option<String>) {
        let mut observed = self.lock();
        observed.status = status;
        if grpc_status.is_some() {
            observed.grpc_status = grpc_status;
        }
        observed.response_encoding = encoding;
    }

    /// Notes that the upstream failed or answered without a body; latency ends now.
    pub fn upstream_finished(&self) {
        let elapsed = self.sent_at.elapsed();
        self.lock().upstream_latency.get_or_insert(elapsed);
    }

    /// Notes a failure whose origin is known where it is met; the first one wins.
    pub fn failed(&self, origin: ErrorOrigin) {
        self.lock().failure.get_or_insert(origin);
    }

    /// Whether the request body should be tapped: it is copied for the worker or
    /// the request log, or counted for the access log.
    pub fn captures(&self) -> bool {
        self.capture || self.shared.logs.access_on()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Observed> {
        // A panic elsewhere while holding this lock leaves plain data behind; keep going.
        self.observed.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reserves `len` bytes of the per-exchange cap; false when they do not fit.
    fn reserve(&self, len: usize) -> bool {
        let before = self.captured_bytes.fetch_add(len, Ordering::Relaxed);
        if before + len > self.shared.capture.max_exchange_bytes() {
            self.captured_bytes.fetch_sub(len, Ordering::Relaxed);
            return false;
        }
        true
    }

    fn status_label(&self, observed: &Observed) -> std::borrow::Cow<'static, str> {
        match self.route.protocol {
            Protocol::Rest => super::metrics::status_text(i64::from(observed.status)),
            Protocol::Grpc => match observed.grpc_status {
                Some(code) => super::metrics::status_text(i64::from(code)),
                None => std::borrow::Cow::Borrowed("none"),
            },
        }
    }

    /// Whose fault the exchange was, if it failed: a failure noted where it happened,
    /// else a client that did not see it through, else TF Serving's error status.
    fn origin(&self, observed: &Observed, complete: bool) -> Option<ErrorOrigin> {
        if let Some(origin) = observed.failure {
            return Some(origin);
        }
        if !complete {
            return Some(ErrorOrigin::Client);
        }
        let ok = match self.route.protocol {
            Protocol::Rest => (200..300).contains(&observed.status),
            Protocol::Grpc => observed.grpc_status == Some(0),
        };
        (!ok).then_some(ErrorOrigin::Upstream)
    }

    /// The access log's line for this exchange.
    fn access_record(&self, observed: &Observed, latency: Duration) -> crate::request_log::AccessRecord {
        let complete = observed.request_complete && observed.response_complete;
        let request_prefix = match self.route.protocol {
            Protocol::Grpc if self.capture => crate::capture::prefix(&observed.request_body, REQUEST_PREFIX_BYTES),
            _ => Vec::new(),
        };
        crate::request_log::AccessRecord {
            time: self.started_at,
            protocol: self.route.protocol,
            method: self.route.method,
            method_label: self.route.label(),
            path: self.path.clone(),
            status: observed.status,
            grpc_status: observed.grpc_status,
            upstream_latency: latency,
            request_bytes: observed.request_bytes,
            response_bytes: observed.response_bytes,
            request_id: self.request_id.clone(),
            client: self.client,
            origin: self.origin(observed, complete),
            request_prefix,
            request_encoding: self.request_encoding.clone(),
        }
    }
}

impl Drop for ExchangeRecord {
    fn drop(&mut self) {
        let observed = std::mem::take(self.observed.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner()));
        let protocol = self.route.protocol.as_str();
        let latency = observed.upstream_latency.unwrap_or_else(|| self.sent_at.elapsed());
        let metrics = &self.shared.metrics;
        metrics
            .requests
            .get_or_create(&super::metrics::RequestLabels {
                protocol,
                method: self.route.label(),
                status: self.status_label(&observed),
            })
            .inc();
        metrics
            .upstream_latency
            .get_or_create(&super::metrics::ProtocolLabels { protocol })
            .observe(latency.as_secs_f64());
        if self.shared.logs.access_on() {
            self.shared.logs.access(self.access_record(&observed, latency));
        }
        if !self.capture {
            return;
        }
        let (request_cut, response_cut) =
            (self.request_cut.load(Ordering::Relaxed), self.response_cut.load(Ordering::Relaxed));
        if !self.sampled {
            self.shared.capture.shed();
        }
        if request_cut || response_cut {
            self.shared.capture.skip_oversize();
        }
        let bodies = if response_cut {
            Bodies::Neither
        } else if request_cut || !self.sampled {
            Bodies::ResponseOnly
        } else {
            Bodies::Full
        };
        let complete = observed.request_complete && observed.response_complete;
        let origin = self.origin(&observed, complete);
        let (mut request_body, response_body) = match bodies {
            Bodies::Neither if !self.logged => (Vec::new(), Vec::new()),
            _ => (observed.request_body, observed.response_body),
        };
        // The exchange as both the request log and the worker see it, but for its bodies.
        let exchange = Exchange {
            protocol: self.route.protocol,
            method: self.route.method,
            path: std::mem::take(&mut self.path),
            request_id: std::mem::take(&mut self.request_id),
            request_id_generated: self.request_id_generated,
            request_encoding: self.request_encoding.take(),
            response_encoding: observed.response_encoding,
            bodies: Bodies::Full,
            request_body: Vec::new(),
            response_body: Vec::new(),
            status: observed.status,
            grpc_status: observed.grpc_status,
            origin,
            started_at: self.started_at,
            upstream_latency: latency,
            complete,
        };
        if self.logged {
            self.shared.logs.log_request(
                Exchange {
                    request_body: request_body.clone(),
                    response_body: response_body.clone(),
                    ..exchange.clone()
                },
                request_cut || response_cut,
            );
        }
        let (request_body, response_body) = match bodies {
            Bodies::Neither => (Vec::new(), Vec::new()),
            // Copied whole for the request log only: the worker gets a count record.
            Bodies::ResponseOnly if self.logged && !request_cut => {
                (crate::capture::prefix(&std::mem::take(&mut request_body), REQUEST_PREFIX_BYTES), response_body)
            }
            _ => (request_body, response_body),
        };
        self.shared.capture.submit(Exchange { bodies, request_body, response_body, ..exchange });
    }
}

/// One side's view of the exchange, owned by its body.
#[derive(Debug)]
pub struct Tap {
    record: Arc<ExchangeRecord>,
    side: Side,
    /// Chunks copied by this side, handed over at its end.
    chunks: Vec<Bytes>,
    /// Bytes in `chunks`.
    bytes: usize,
    /// Set once this side stopped copying (cap reached, or the prefix is complete).
    stopped: bool,
    /// Set once this side deposited; later events are ignored.
    done: bool,
    /// Body bytes that passed this side, copied or not.
    seen: u64,
}

impl Tap {
    pub fn new(record: Arc<ExchangeRecord>, side: Side) -> Self {
        Tap { record, side, chunks: Vec::new(), bytes: 0, stopped: false, done: false, seen: 0 }
    }

    fn data(&mut self, data: &Bytes) {
        self.take(data, || keep(data));
    }

    /// Copies a chunk that passes through a buffer the caller reuses (the REST relay),
    /// by the same rules as `data`.
    pub(super) fn copy(&mut self, data: &[u8]) {
        self.take(data, || Bytes::copy_from_slice(data));
    }

    /// Counts a chunk and keeps what the exchange needs of it: a prefix for a count
    /// record, the whole chunk (`owned`) for a sampled or logged one, within the cap.
    fn take(&mut self, data: &[u8], owned: impl FnOnce() -> Bytes) {
        self.seen += data.len() as u64;
        if !self.record.capture || data.is_empty() || self.stopped {
            return;
        }
        if self.side == Side::Request && !self.record.sampled && !self.record.logged {
            // A count record keeps the request's first bytes only: the model spec or
            // the REST `signature_name` are there.
            let take = data.len().min(REQUEST_PREFIX_BYTES - self.bytes);
            self.chunks.push(Bytes::copy_from_slice(&data[..take]));
            self.bytes += take;
            self.stopped = self.bytes >= REQUEST_PREFIX_BYTES;
            return;
        }
        if self.record.reserve(data.len()) {
            self.chunks.push(owned());
            self.bytes += data.len();
            return;
        }
        self.stopped = true;
        match self.side {
            Side::Request => {
                // Too large for statistics: keep what a count record needs and give the
                // rest of the budget back to the response.
                let prefix = crate::capture::prefix(&self.chunks, REQUEST_PREFIX_BYTES);
                let kept: usize = prefix.iter().map(Bytes::len).sum();
                self.record.captured_bytes.fetch_sub(self.bytes - kept, Ordering::Relaxed);
                self.chunks = prefix;
                self.bytes = kept;
                self.record.request_cut.store(true, Ordering::Relaxed);
            }
            Side::Response => {
                self.chunks = Vec::new();
                self.bytes = 0;
                self.record.response_cut.store(true, Ordering::Relaxed);
            }
        }
    }

    fn trailers(&mut self, trailers: &http::HeaderMap) {
        if self.side == Side::Response {
            if let Some(code) = super::grpc_status_of(trailers) {
                self.record.lock().grpc_status = Some(code);
            }
        }
    }

    /// Hands this side's copy to the record, once.
    pub(super) fn deposit(&mut self, complete: bool) {
        if self.done {
            return;
        }
        self.done = true;
        let chunks = std::mem::take(&mut self.chunks);
        let elapsed = self.record.sent_at.elapsed();
        let mut observed = self.record.lock();
        match self.side {
            Side::Request => {
                observed.request_body = chunks;
                observed.request_complete = complete;
                observed.request_bytes = self.seen;
            }
            Side::Response => {
                observed.response_body = chunks;
                observed.response_complete = complete;
                observed.response_bytes = self.seen;
                observed.upstream_latency = Some(elapsed);
            }
        }
    }
}

/// Chunks up to this size are copied rather than shared.
const COPY_BELOW: usize = 64 << 10;

/// The copy of a chunk kept for the worker. A small chunk is a slice of hyper's
/// connection read buffer: sharing it would pin that whole buffer until the worker
/// is done, so hyper would allocate a fresh buffer for the next read on every request
/// (and free the old one on the worker's thread). Copying a few kilobytes is cheaper
/// than that churn; large chunks are shared as they are.
fn keep(data: &Bytes) -> Bytes {
    if data.len() < COPY_BELOW {
        Bytes::copy_from_slice(data)
    } else {
        data.clone()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if !self.done && self.side == Side::Response {
            // The response was dropped before its end: the client stopped reading.
            self.record.failed(ErrorOrigin::Client);
        }
        self.deposit(false);
    }
}

pin_project! {
    /// A body forwarded unchanged while a `Tap` watches it. Without a tap it is a
    /// plain pass-through.
    #[derive(Debug)]
    pub struct TeeBody<B> {
        #[pin]
        inner: B,
        tap: Option<Tap>,
    }
}

impl<B: Body> TeeBody<B> {
    pub fn new(inner: B, mut tap: Option<Tap>) -> Self {
        // An empty body (trailers-only gRPC answer, Content-Length: 0) is complete
        // already; servers and clients never poll it, they only drop it.
        if inner.is_end_stream() {
            if let Some(tap) = tap.as_mut() {
                tap.deposit(true);
            }
        }
        TeeBody { inner, tap }
    }
}

impl<B> Body for TeeBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        let result = ready!(this.inner.as_mut().poll_frame(cx));
        if let Some(tap) = this.tap.as_mut() {
            match &result {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        tap.data(data);
                        // Servers stop polling once the body says it is done.
                        if this.inner.is_end_stream() {
                            tap.deposit(true);
                        }
                    } else if let Some(trailers) = frame.trailers_ref() {
                        tap.trailers(trailers);
                        tap.deposit(true);
                    }
                }
                Some(Err(_)) => {
                    // A request body fails when the client resets or breaks it, a
                    // response body when TF Serving does: that one is TF Serving's
                    // fault and worth a log line.
                    tap.record.failed(match tap.side {
                        Side::Request => ErrorOrigin::Client,
                        Side::Response => {
                            tracing::warn!(
                                message =
                                    "Upstream reset or broke its response mid-body; the client's stream is reset."
                            );
                            ErrorOrigin::Upstream
                        }
                    });
                    tap.deposit(false);
                }
                None => tap.deposit(true),
            }
        }
        Poll::Ready(result)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::CaptureConfig;
    use http_body_util::{BodyExt, Full, StreamBody};

    fn shared(config: CaptureConfig) -> (Arc<ProxyShared>, crate::capture::CaptureReceiver) {
        let (tx, rx) = crate::capture::queue(&config);
        let mut registry = prometheus_client::registry::Registry::default();
        (ProxyShared::for_tests(tx, &mut registry), rx)
    }

    fn start(capture: bool) -> RecordStart {
        RecordStart {
            route: RouteKind::rest(&http::Method::POST, "/v1/models/m:predict"),
            capture,
            path: "/v1/models/m:predict".into(),
            request_id: "id".into(),
            request_id_generated: false,
            request_encoding: None,
            started_at: SystemTime::now(),
            client: None,
        }
    }

    #[tokio::test]
    async fn the_tee_forwards_size_hint_and_bytes_and_captures_once() {
        let (shared, mut rx) = shared(CaptureConfig::default());
        let record = ExchangeRecord::new(shared, start(true));
        let body = TeeBody::new(Full::new(Bytes::from_static(b"hello")), Some(Tap::new(record.clone(), Side::Request)));
        assert_eq!(body.size_hint().exact(), Some(5));
        let response =
            TeeBody::new(Full::new(Bytes::from_static(b"world")), Some(Tap::new(record.clone(), Side::Response)));
        drop(record);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
        assert!(rx.try_recv().is_none(), "the exchange ends only when both sides have");
        assert_eq!(response.collect().await.unwrap().to_bytes(), "world");
        let exchange = rx.try_recv().expect("one exchange");
        assert_eq!(exchange.request_bytes(), "hello");
        assert_eq!(exchange.response_bytes(), "world");
        assert!(exchange.complete);
        assert!(rx.try_recv().is_none());
    }

    #[tokio::test]
    async fn an_exchange_over_the_cap_is_skipped_and_counted() {
        let (shared, mut rx) =
            shared(CaptureConfig { max_exchange_bytes: 8, queue_bytes: 8, ..CaptureConfig::default() });
        let record = ExchangeRecord::new(shared.clone(), start(true));
        let chunks = (0..3).map(|_| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(b"12345"))));
        let body =
            TeeBody::new(StreamBody::new(futures_util::stream::iter(chunks)), Some(Tap::new(record, Side::Request)));
        assert_eq!(body.collect().await.unwrap().to_bytes().len(), 15);
        assert!(rx.try_recv().is_none());
        assert_eq!(shared.capture.stats().skipped_oversize.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn an_empty_body_is_complete_without_being_polled() {
        let (shared, mut rx) = shared(CaptureConfig::default());
        let record = ExchangeRecord::new(shared, start(true));
        let request = TeeBody::new(Full::new(Bytes::new()), Some(Tap::new(record.clone(), Side::Request)));
        let response = TeeBody::new(http_body_util::Empty::<Bytes>::new(), Some(Tap::new(record, Side::Response)));
        drop((request, response));
        assert!(rx.try_recv().expect("one exchange").complete);
    }

    #[tokio::test]
    async fn a_dropped_body_ends_the_exchange_as_incomplete() {
        let (shared, mut rx) = shared(CaptureConfig::default());
        let record = ExchangeRecord::new(shared, start(true));
        let body = TeeBody::new(Full::new(Bytes::from_static(b"x")), Some(Tap::new(record, Side::Response)));
        drop(body);
        let exchange = rx.try_recv().expect("one exchange");
        assert!(!exchange.complete);
    }
}
