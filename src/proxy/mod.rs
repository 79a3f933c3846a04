//! Listeners, upstream clients, the body tee and hop-by-hop header rules.
//!
//! The REST listener (HTTP/1.1) and the gRPC listener (HTTP/2, cleartext or TLS) forward
//! every request to TF Serving over pooled connections and stream both bodies as they
//! come. Inference calls get a tee that hands cheap copies to the capture queue.
//! The proxy never parses a payload, never holds a lock across an await and never
//! waits on the worker: a monitoring fault cannot change what a client receives.

mod grpc;
pub mod headers;
pub mod limits;
pub mod listen;
pub mod metrics;
mod relay;
pub mod request_id;
mod rest;
pub mod tee;
pub mod tls;

use crate::capture::CaptureSender;
pub use crate::capture::RouteKind;
use crate::units::ConfigError;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use pin_project_lite::pin_project;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tee::TeeBody;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_util::either::Either;
use tracing::{debug, warn};

pub use metrics::ProxyMetrics;

/// HTTP/2 flow-control windows and frame size, on both sides of the gRPC path: large
/// enough that a 64×16 float batch or a multi-megabyte tensor does not stall on
/// WINDOW_UPDATE round trips.
const H2_STREAM_WINDOW: u32 = 4 << 20;
const H2_CONNECTION_WINDOW: u32 = 16 << 20;
const H2_MAX_FRAME: u32 = 1 << 20;
const H2_MAX_SEND_BUF: usize = 1 << 20;
/// Streams mltap puts on one upstream HTTP/2 connection before it opens another
/// (`limits.upstream_grpc_connections` bounds how many): gRPC servers commonly allow
/// 100 concurrent streams per connection and queue the rest, so one client holding
/// many unfinished streams would otherwise make every other client wait behind it.
const UPSTREAM_STREAMS_PER_CONNECTION: usize = 100;
/// Idle pooled upstream connections are closed after this long.
const POOL_IDLE: Duration = Duration::from_secs(90);

/// The client that carries requests to TF Serving, with the tee in the request body.
type UpstreamClient = Client<HttpsConnector<HttpConnector>, TeeBody<Incoming>>;

/// A client connection: cleartext, or TLS when the listeners have a certificate.
type ClientStream = Either<TcpStream, tokio_rustls::server::TlsStream<TcpStream>>;

/// How long a client may take to finish its TLS handshake before it is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The grpc-status in a header or trailer map.
pub(crate) fn grpc_status_of(headers: &http::HeaderMap) -> Option<i32> {
    headers.get("grpc-status")?.to_str().ok()?.trim().parse().ok()
}

/// Where one listener forwards to.
#[derive(Debug, Clone)]
struct Upstream {
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    /// The URL as configured, for error messages that name the upstream.
    shown: String,
}

impl Upstream {
    fn new(key: &str, uri: &http::Uri) -> Result<Upstream, ConfigError> {
        let scheme = match uri.scheme_str() {
            Some("http") => http::uri::Scheme::HTTP,
            Some("https") => http::uri::Scheme::HTTPS,
            _ => return Err(ConfigError::new(key, "", format!("`{uri}` must be an http:// or https:// URL"))),
        };
        let authority =
            uri.authority().cloned().ok_or_else(|| ConfigError::new(key, "", format!("`{uri}` has no host")))?;
        let shown = format!("{scheme}://{authority}");
        Ok(Upstream { scheme, authority, shown })
    }

    /// The port to probe for readiness, with the scheme's default.
    fn port(&self) -> u16 {
        let default = if self.scheme == http::uri::Scheme::HTTPS { 443 } else { 80 };
        self.authority.port_u16().unwrap_or(default)
    }

    /// The request's path and query on this upstream.
    fn uri_for(&self, uri: &http::Uri) -> http::Uri {
        let path = uri.path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path);
        // Scheme, authority and an origin path always make a valid URI.
        http::Uri::from_parts(parts).unwrap_or_default()
    }
}

/// What the proxy takes from the configuration.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// TF Serving's gRPC port (`http://` or `https://`).
    pub grpc_upstream: http::Uri,
    /// TF Serving's REST port (`http://` or `https://`).
    pub rest_upstream: http::Uri,
    /// Deadline for the upstream's response head when the client sets none.
    pub upstream_timeout: Duration,
    /// Header (gRPC metadata key) carrying the request id.
    pub request_id_header: http::HeaderName,
    /// Return a generated request id to the client (`capture.return_request_id`).
    pub return_request_id: bool,
    /// TLS towards `https://` upstreams and on the listeners (`[tls]`).
    pub tls: tls::TlsConfig,
    /// Connection governance (`[limits]`).
    pub limits: limits::LimitsConfig,
    /// Open client connections over every listener and serving thread, against
    /// `limits.max_connections`; shared by every `Proxy` built from these settings.
    pub connections: limits::ConnectionBudget,
}

/// The upstream gRPC connections of one serving thread: each lane is a client of its
/// own, so each holds its own HTTP/2 connection, opened on first use. A request takes
/// the first lane with fewer than `UPSTREAM_STREAMS_PER_CONNECTION` streams in
/// flight, else the least busy one: one connection serves while traffic is light,
/// and a client holding many streams cannot queue the others behind it.
#[derive(Debug)]
struct GrpcLanes {
    lanes: Vec<GrpcLane>,
}

#[derive(Debug)]
struct GrpcLane {
    client: UpstreamClient,
    /// Streams in flight on this lane, held by `LaneStream` guards.
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
}

/// A stream counted on its lane until the exchange's upstream response ends (or the
/// exchange is dropped).
#[derive(Debug)]
pub(crate) struct LaneStream {
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for LaneStream {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl GrpcLanes {
    /// The lane to send a stream on, with its count taken.
    fn pick(&self) -> (&UpstreamClient, LaneStream) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut chosen = &self.lanes[0];
        let mut least = usize::MAX;
        for lane in &self.lanes {
            let busy = lane.in_flight.load(Relaxed);
            if busy < UPSTREAM_STREAMS_PER_CONNECTION {
                chosen = lane;
                break;
            }
            if busy < least {
                least = busy;
                chosen = lane;
            }
        }
        chosen.in_flight.fetch_add(1, Relaxed);
        (&chosen.client, LaneStream { in_flight: chosen.in_flight.clone() })
    }
}

/// State shared by every connection of both listeners.
#[derive(Debug)]
pub struct ProxyShared {
    /// Where copies of inference exchanges go; `offer` never waits.
    pub(crate) capture: CaptureSender,
    pub(crate) metrics: ProxyMetrics,
    /// The request log's sampling and hand-over, and the access log's.
    pub(crate) logs: crate::request_log::ExchangeLogs,
    /// Generates ids for requests that carry none.
    request_ids: request_id::RequestIds,
    /// Header (gRPC metadata key) carrying the request id.
    request_id_header: http::HeaderName,
    /// Return a generated request id to the client.
    return_request_id: bool,
    /// Deadline for the upstream's response head when the client sets none.
    upstream_timeout: Duration,
    rest_upstream: Upstream,
    grpc_upstream: Upstream,
    /// Pooled HTTP/1.1 connections to TF Serving's REST port.
    rest_client: UpstreamClient,
    /// HTTP/2 (prior knowledge) connections to TF Serving's gRPC port.
    grpc_lanes: GrpcLanes,
    /// Connection governance of the listeners.
    limits: limits::LimitsConfig,
    /// Open client connections, against `limits.max_connections`.
    connections: limits::ConnectionBudget,
}

impl ProxyShared {
    /// The client's request id, or a generated one when the exchange needs an id
    /// (captured, or ids are returned). Returns the id and whether it was generated.
    /// A client's id is only copied when the exchange is captured or the access log
    /// is on (`logged`): it is never returned, so an exchange that is neither
    /// allocates nothing for it.
    fn request_id(&self, headers: &http::HeaderMap, needed: bool, logged: bool) -> (String, bool) {
        match headers.get(&self.request_id_header).and_then(|v| v.to_str().ok()) {
            Some(id) if needed || logged => (id.to_string(), false),
            Some(_) => (String::new(), false),
            None if needed || self.return_request_id => (self.request_ids.generate(), true),
            None => (String::new(), false),
        }
    }

    /// The header value that returns a generated request id to the client, when the
    /// configuration asks for it; taken before the id moves into the exchange record.
    fn id_to_return(&self, id: &str, generated: bool) -> Option<http::HeaderValue> {
        (generated && self.return_request_id).then(|| http::HeaderValue::from_str(id).ok()).flatten()
    }

    /// Adds the generated request id (`id_to_return`) to a response.
    fn return_id(&self, headers: &mut http::HeaderMap, value: Option<http::HeaderValue>) {
        if let Some(value) = value {
            headers.insert(self.request_id_header.clone(), value);
        }
    }

    /// Opens the record of a request that came through hyper: whether its route is
    /// captured, its request id (and the value that returns it, `id_to_return`), its
    /// path when it is captured or access-logged. `strip` removes the hop-by-hop fields
    /// before the request's encoding is read from its `encoding` field.
    fn open_record(
        self: &Arc<Self>,
        peer: std::net::SocketAddr,
        started_at: std::time::SystemTime,
        route: RouteKind,
        parts: &mut http::request::Parts,
        strip: fn(&mut http::HeaderMap),
        encoding: impl http::header::AsHeaderName,
    ) -> (Arc<tee::ExchangeRecord>, Option<http::HeaderValue>) {
        let capture = route.captured();
        let logs_all = self.logs.access_on();
        let (request_id, generated) = self.request_id(&parts.headers, capture, logs_all);
        let returned_id = self.id_to_return(&request_id, generated);
        strip(&mut parts.headers);
        let record = tee::ExchangeRecord::new(
            self.clone(),
            tee::RecordStart {
                route,
                capture,
                path: if capture || logs_all { parts.uri.path().to_string() } else { String::new() },
                request_id,
                request_id_generated: generated,
                request_encoding: rest::header_text(&parts.headers, encoding),
                started_at,
                client: Some(peer),
            },
        );
        (record, returned_id)
    }

    #[cfg(test)]
    pub(crate) fn for_tests(
        capture: CaptureSender,
        registry: &mut prometheus_client::registry::Registry,
    ) -> Arc<ProxyShared> {
        let settings = ProxySettings {
            grpc_upstream: http::Uri::from_static("http://127.0.0.1:9500"),
            rest_upstream: http::Uri::from_static("http://127.0.0.1:9501"),
            upstream_timeout: Duration::from_secs(60),
            request_id_header: http::HeaderName::from_static("x-request-id"),
            return_request_id: false,
            tls: tls::TlsConfig::default(),
            limits: limits::LimitsConfig::default(),
            connections: limits::ConnectionBudget::new(10_000),
        };
        Proxy::new(&settings, capture, ProxyMetrics::register(registry)).expect("default proxy").shared
    }
}

/// A connector for `http://` and `https://` upstreams; TLS offers only `alpn`, so
/// that an HTTPS upstream settles on the protocol its listener is meant to speak.
fn connector(config: &ProxySettings, alpn: &[u8], key: &str) -> Result<HttpsConnector<HttpConnector>, ConfigError> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(config.upstream_timeout.min(Duration::from_secs(10))));
    // The TLS layer wraps this connector and needs it to accept https:// URIs.
    http.enforce_http(false);
    let mut tls = config.tls.client_config(alpn).map_err(|(tls_key, problem)| {
        ConfigError::new(format!("tls.{tls_key}"), "", format!("{problem} (needed by {key})"))
    })?;
    // hyper-rustls sets ALPN itself from the enabled protocol and refuses a preset list.
    tls.alpn_protocols.clear();
    let builder = HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http();
    Ok(if alpn == tls::ALPN_H2 {
        builder.enable_http2().wrap_connector(http)
    } else {
        builder.enable_http1().wrap_connector(http)
    })
}

/// The TLS configuration of a listener offering `alpn`, when the listeners speak TLS.
fn acceptor(config: &ProxySettings, alpn: &[u8]) -> Result<Option<Arc<rustls::ServerConfig>>, ConfigError> {
    let server =
        config.tls.server_config(alpn).map_err(|(key, problem)| ConfigError::new(format!("tls.{key}"), "", problem))?;
    Ok(server.map(Arc::new))
}

/// The proxy: both listeners' handlers and their upstream clients.
#[derive(Debug, Clone)]
pub struct Proxy {
    shared: Arc<ProxyShared>,
    /// TLS of the REST listener (ALPN http/1.1), when configured.
    rest_tls: Option<Arc<rustls::ServerConfig>>,
    /// TLS of the gRPC listener (ALPN h2), when configured.
    grpc_tls: Option<Arc<rustls::ServerConfig>>,
    /// The REST relay and its upstream pool; `None` for an `https://` REST upstream,
    /// which the hyper path serves.
    rest_relay: Option<relay::Relay>,
}

impl Proxy {
    /// Builds the upstream clients. Several proxies (one per serving thread) may share
    /// one capture queue and one set of metrics. Fails when an upstream URL cannot be
    /// served or a TLS file is unusable, naming its key.
    pub fn new(config: &ProxySettings, capture: CaptureSender, metrics: ProxyMetrics) -> Result<Proxy, ConfigError> {
        let rest_upstream = Upstream::new("rest_upstream", &config.rest_upstream)?;
        let grpc_upstream = Upstream::new("grpc_upstream", &config.grpc_upstream)?;
        let rest_client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE)
            .build(connector(config, tls::ALPN_HTTP1, "rest_upstream")?);
        let grpc_connector = connector(config, tls::ALPN_H2, "grpc_upstream")?;
        let lanes = (0..config.limits.upstream_grpc_connections.max(1))
            .map(|_| GrpcLane {
                client: Client::builder(TokioExecutor::new())
                    .pool_timer(TokioTimer::new())
                    .pool_idle_timeout(POOL_IDLE)
                    .http2_only(true)
                    .http2_initial_stream_window_size(H2_STREAM_WINDOW)
                    .http2_initial_connection_window_size(H2_CONNECTION_WINDOW)
                    .http2_max_frame_size(H2_MAX_FRAME)
                    .http2_max_send_buf_size(H2_MAX_SEND_BUF)
                    .timer(TokioTimer::new())
                    .build(grpc_connector.clone()),
                in_flight: Arc::default(),
            })
            .collect();
        let shared = Arc::new(ProxyShared {
            capture,
            metrics,
            logs: crate::request_log::ExchangeLogs::default(),
            request_ids: request_id::RequestIds::default(),
            request_id_header: config.request_id_header.clone(),
            return_request_id: config.return_request_id,
            upstream_timeout: config.upstream_timeout,
            rest_upstream,
            grpc_upstream,
            rest_client,
            grpc_lanes: GrpcLanes { lanes },
            limits: config.limits.clone(),
            connections: config.connections.clone(),
        });
        Ok(Proxy {
            rest_tls: acceptor(config, tls::ALPN_HTTP1)?,
            grpc_tls: acceptor(config, tls::ALPN_H2)?,
            rest_relay: relay::Relay::for_rest_upstream(shared.clone()),
            shared,
        })
    }

    /// Hands exchanges to the request and access logs too (both off by default).
    pub fn with_exchange_logs(mut self, logs: crate::request_log::ExchangeLogs) -> Proxy {
        // The relay holds the shared state too: it lets go of it, then is built
        // again around the state with the logs.
        let relayed = self.rest_relay.take().is_some();
        match Arc::get_mut(&mut self.shared) {
            Some(shared) => shared.logs = logs,
            // Only a proxy shared already could get here; it keeps its logs.
            None => warn!(message = "Exchange logs not attached: the proxy is already serving."),
        }
        if relayed {
            self.rest_relay = relay::Relay::for_rest_upstream(self.shared.clone());
        }
        self
    }

    /// Serves the REST listener until `stop` turns true, then stops accepting, lets
    /// in-flight exchanges finish and returns when every connection is closed.
    pub async fn serve_rest(&self, listener: TcpListener, stop: watch::Receiver<bool>) {
        self.serve_rest_spread(listener, stop, listen::Spread::alone()).await
    }

    /// `serve_rest` as one of several serving threads of the port (`spread`).
    pub async fn serve_rest_spread(&self, listener: TcpListener, stop: watch::Receiver<bool>, spread: listen::Spread) {
        let tls = self.rest_tls.clone().map(TlsAcceptor::from);
        let governance = Governance::of(&self.shared, Refusal::Http1);
        if let Some(relay) = &self.rest_relay {
            let relay = relay.stopping_on(stop.clone());
            accept_loop(listener, tls, stop, governance, spread, move |io, _, peer| {
                relay.clone().serve(io.into_inner(), peer)
            })
            .await;
            return;
        }
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.keep_alive(true).auto_date_header(false).timer(TokioTimer::new());
        let shared = self.shared.clone();
        let idle_timeout = shared.limits.idle_timeout;
        accept_loop(listener, tls, stop, governance, spread, move |io, stop, peer| {
            let shared = shared.clone();
            let builder = builder.clone();
            async move {
                let activity = Arc::new(Activity::default());
                let seen = activity.clone();
                let service = hyper::service::service_fn(move |request| {
                    rest::handle(shared.clone(), peer, request, seen.start())
                });
                let connection = builder.serve_connection(io, service);
                run_connection(connection, stop, &activity, idle_timeout, |c| c.graceful_shutdown()).await;
            }
        })
        .await;
    }

    /// Serves the gRPC listener (HTTP/2 prior knowledge) like `serve_rest`.
    pub async fn serve_grpc(&self, listener: TcpListener, stop: watch::Receiver<bool>) {
        self.serve_grpc_spread(listener, stop, listen::Spread::alone()).await
    }

    /// `serve_grpc` as one of several serving threads of the port (`spread`).
    pub async fn serve_grpc_spread(&self, listener: TcpListener, stop: watch::Receiver<bool>, spread: listen::Spread) {
        let limits = &self.shared.limits;
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .auto_date_header(false)
            .timer(TokioTimer::new())
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONNECTION_WINDOW)
            .max_frame_size(H2_MAX_FRAME)
            .max_send_buf_size(H2_MAX_SEND_BUF)
            .max_concurrent_streams(limits.max_streams_per_connection)
            // A peer that stops answering pings is gone: its connection is closed.
            .keep_alive_interval(Some(limits.keepalive_interval))
            .keep_alive_timeout(limits.keepalive_interval);
        let shared = self.shared.clone();
        let idle_timeout = limits.idle_timeout;
        let governance = Governance::of(&self.shared, Refusal::Http2);
        let tls = self.grpc_tls.clone().map(TlsAcceptor::from);
        accept_loop(listener, tls, stop, governance, spread, move |io, stop, peer| {
            let shared = shared.clone();
            let builder = builder.clone();
            async move {
                let activity = Arc::new(Activity::default());
                let seen = activity.clone();
                let service = hyper::service::service_fn(move |request| {
                    grpc::handle(shared.clone(), peer, request, seen.start())
                });
                let connection = builder.serve_connection(io, service);
                run_connection(connection, stop, &activity, idle_timeout, |c| c.graceful_shutdown()).await;
            }
        })
        .await;
    }

    /// Upstream addresses (`host:port`) for readiness checks: gRPC, then REST.
    pub fn upstream_addresses(&self) -> Vec<(String, String)> {
        [&self.shared.grpc_upstream, &self.shared.rest_upstream]
            .into_iter()
            .map(|u| (u.shown.clone(), format!("{}:{}", u.authority.host(), u.port())))
            .collect()
    }
}

/// How a listener refuses a connection over `limits.max_connections`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// A 503 answer, then close (cleartext HTTP/1.1).
    Http1,
    /// Close at once: a client sees `UNAVAILABLE` and retries, as for a full server.
    Http2,
}

/// What a listener's accept loop enforces: the shared connection budget and the
/// metrics that show it.
#[derive(Debug, Clone)]
struct Governance {
    connections: limits::ConnectionBudget,
    metrics: ProxyMetrics,
    refusal: Refusal,
}

impl Governance {
    fn of(shared: &ProxyShared, refusal: Refusal) -> Governance {
        Governance { connections: shared.connections.clone(), metrics: shared.metrics.clone(), refusal }
    }
}

/// The answer to a cleartext HTTP/1.1 connection over the limit.
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 72\r\n\r\n{\"error\": \"mltap: too many client connections (limits.max_connections)\"}\n";

/// Logs at most one line per `every` for a repeated event, with how many it stands for.
#[derive(Debug)]
struct RateLimitedLog {
    every: Duration,
    last: Option<tokio::time::Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    fn new(every: Duration) -> RateLimitedLog {
        RateLimitedLog { every, last: None, suppressed: 0 }
    }

    /// Whether to log now; returns the events since the last line (this one included).
    fn due(&mut self) -> Option<u64> {
        let now = tokio::time::Instant::now();
        self.suppressed += 1;
        if self.last.is_some_and(|last| now.duration_since(last) < self.every) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// An open client connection's hold on the budget, the gauge and the accept loop's
/// "all closed" channel; released when its task ends, however it ends.
struct HeldConnection {
    _admitted: limits::Admitted,
    _open: mpsc::Sender<()>,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl HeldConnection {
    fn new(
        admitted: limits::Admitted,
        open: mpsc::Sender<()>,
        gauge: prometheus_client::metrics::gauge::Gauge,
    ) -> HeldConnection {
        gauge.inc();
        HeldConnection { _admitted: admitted, _open: open, gauge }
    }
}

impl Drop for HeldConnection {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Accepts connections until `stop`, serving each on its own task (after its TLS
/// handshake when `tls` is set); returns once all of them have ended. Each task holds
/// a clone of `open`; the channel closes when the last one ends. A connection over
/// the budget is refused; accept errors (out of file descriptors and the like) back
/// off, up to a second, instead of spinning.
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    mut stop: watch::Receiver<bool>,
    governance: Governance,
    mut spread: listen::Spread,
    serve: F,
) where
    F: Fn(TokioIo<ClientStream>, watch::Receiver<bool>, std::net::SocketAddr) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (open, mut all_closed) = mpsc::channel::<()>(1);
    let connection_stop = stop.clone();
    let mut backoff = Duration::ZERO;
    let mut accept_errors = RateLimitedLog::new(Duration::from_secs(10));
    let mut refusals = RateLimitedLog::new(Duration::from_secs(10));
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => break,
            accepted = listener.accept() => accepted.map(|(stream, peer)| (stream, peer, None)),
            Some((stream, peer, hold, admitted)) = spread.handed_off() => {
                // Registered with this thread's reactor from here on (`into_std` left
                // it non-blocking).
                match tokio::net::TcpStream::from_std(stream) {
                    Ok(stream) => Ok((stream, peer, Some((hold, admitted)))),
                    Err(error) => {
                        debug!(message = "A connection passed from another serving thread could not be taken.", %peer, %error);
                        continue;
                    }
                }
            }
        };
        match accepted {
            Ok((stream, peer, handed_off)) => {
                backoff = Duration::ZERO;
                let (stream, hold, admitted) = match handed_off {
                    Some((hold, admitted)) => (stream, hold, admitted),
                    None => {
                        // Refused by the thread that accepted it, before any hand-off.
                        let Some(admitted) = governance.connections.admit() else {
                            governance.metrics.connections_refused.inc();
                            if let Some(count) = refusals.due() {
                                warn!(
                                    message = "Client connections refused: limits.max_connections are open.",
                                    max_connections = governance.connections.max(),
                                    refused = count,
                                );
                            }
                            if governance.refusal == Refusal::Http1 && tls.is_none() {
                                // Best effort and never waiting: the socket buffer takes it.
                                let _ = stream.try_write(TOO_MANY_CONNECTIONS);
                            }
                            drop(stream);
                            continue;
                        };
                        match place_accepted(&spread, stream, peer, admitted) {
                            Some(kept) => kept,
                            None => continue,
                        }
                    }
                };
                let _ = stream.set_nodelay(true);
                debug!(message = "Accepted connection.", %peer);
                let held = HeldConnection::new(admitted, open.clone(), governance.metrics.open_connections.clone());
                let (serve, stop, tls) = (serve.clone(), connection_stop.clone(), tls.clone());
                tokio::spawn(async move {
                    let stream = match tls {
                        None => Either::Left(stream),
                        Some(tls) => {
                            let mut stop = stop.clone();
                            let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(stream));
                            // A client still in its handshake has no exchange in flight:
                            // shutdown does not wait for it.
                            let handshake = tokio::select! {
                                result = handshake => result,
                                _ = stop.wait_for(|stopped| *stopped) => return,
                            };
                            match handshake {
                                Ok(Ok(stream)) => Either::Right(stream),
                                Ok(Err(error)) => {
                                    debug!(message = "TLS handshake failed.", %peer, %error);
                                    return;
                                }
                                Err(_) => {
                                    debug!(message = "TLS handshake timed out.", %peer);
                                    return;
                                }
                            }
                        }
                    };
                    serve(TokioIo::new(stream), stop, peer).await;
                    drop((held, hold));
                });
            }
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning,
                // and say so once in a while rather than for every attempt.
                backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                if let Some(count) = accept_errors.due() {
                    warn!(message = "Accept failed; backing off.", %error, failures = count, backoff = ?backoff);
                }
                tokio::time::sleep(backoff).await;
            }
        }
    }
    drop(listener);
    drop(open);
    let _ = all_closed.recv().await;
}

/// Places a connection this thread accepted on the serving thread with the fewest
/// (see `listen::Spread`): returns it, with its hold, when it is served here; None
/// once another thread has it.
fn place_accepted(
    spread: &listen::Spread,
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    admitted: limits::Admitted,
) -> Option<(tokio::net::TcpStream, listen::SpreadHold, limits::Admitted)> {
    let (target, hold) = spread.place();
    if spread.is_here(target) {
        return Some((stream, hold, admitted));
    }
    let stream = match stream.into_std() {
        Ok(stream) => stream,
        Err(error) => {
            debug!(message = "An accepted connection could not be passed to another serving thread.", %peer, %error);
            return None;
        }
    };
    match spread.hand_off(target, (stream, peer, hold, admitted)) {
        Ok(()) => None,
        // That thread has stopped: served here after all.
        Err((stream, _, hold, admitted)) => {
            drop(hold);
            let stream = tokio::net::TcpStream::from_std(stream).ok()?;
            Some((stream, spread.hold_here(), admitted))
        }
    }
}

/// Requests of one client connection: in flight, and started since the idle check
/// last looked. Touched by one task at a time (the connection's), so uncontended.
#[derive(Debug, Default)]
struct Activity {
    in_flight: std::sync::atomic::AtomicUsize,
    started: std::sync::atomic::AtomicU64,
}

impl Activity {
    fn start(self: &Arc<Self>) -> BusyOwned {
        use std::sync::atomic::Ordering::Relaxed;
        self.in_flight.fetch_add(1, Relaxed);
        self.started.fetch_add(1, Relaxed);
        BusyOwned(self.clone())
    }

    /// Whether nothing happened since the last call (no request in flight, none started).
    fn idle_since_last_look(&self, last_started: &mut u64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let started = self.started.load(Relaxed);
        let idle = started == *last_started && self.in_flight.load(Relaxed) == 0;
        *last_started = started;
        idle
    }
}

/// A request in flight on its connection, held by the handler until it answers.
pub(crate) struct BusyOwned(Arc<Activity>);

impl Drop for BusyOwned {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Drives one connection; on `stop`, or when it stays idle for `idle_timeout` (no
/// request in flight or started during a whole period), asks it to finish its
/// in-flight exchanges and close.
async fn run_connection<C, E>(
    connection: C,
    mut stop: watch::Receiver<bool>,
    activity: &Activity,
    idle_timeout: Duration,
    graceful: fn(Pin<&mut C>),
) where
    C: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut connection = std::pin::pin!(connection);
    let mut last_started = 0;
    let mut idle_check = tokio::time::interval_at(tokio::time::Instant::now() + idle_timeout, idle_timeout);
    let idle = loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    debug!(message = "Client connection ended with an error.", %error);
                }
                return;
            }
            _ = stop.wait_for(|stopped| *stopped) => break false,
            _ = idle_check.tick() => {
                if activity.idle_since_last_look(&mut last_started) {
                    debug!(message = "Closing an idle client connection.");
                    break true;
                }
            }
        }
    };
    graceful(connection.as_mut());
    // An idle connection has nothing in flight: one that does not close promptly (an
    // HTTP/2 client that never sent its preface, say) is dropped, which closes it.
    let finished =
        if idle { tokio::time::timeout(idle_timeout, connection).await.unwrap_or(Ok(())) } else { connection.await };
    if let Err(error) = finished {
        debug!(message = "Client connection ended with an error.", %error);
    }
}

pin_project! {
    /// What a listener answers: the upstream's body through the tee, or a body mltap
    /// wrote itself (errors for a dead or slow upstream).
    #[project = ResponseBodyProj]
    #[derive(Debug)]
    pub enum ResponseBody {
        Upstream { #[pin] body: TeeBody<Incoming>, lane: Option<LaneStream> },
        Local { data: Option<Bytes> },
    }
}

impl ResponseBody {
    fn local(data: Bytes) -> ResponseBody {
        ResponseBody::Local { data: (!data.is_empty()).then_some(data) }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.project() {
            ResponseBodyProj::Upstream { body, .. } => {
                let frame = ready!(body.poll_frame(cx));
                if let Some(Err(error)) = &frame {
                    // TF Serving's fault, and the client sees only a reset: say so.
                    warn!(message = "Upstream reset or broke its response mid-body; the client's stream is reset.", %error);
                }
                Poll::Ready(frame)
            }
            ResponseBodyProj::Local { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream { body, .. } => body.is_end_stream(),
            ResponseBody::Local { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream { body, .. } => body.size_hint(),
            ResponseBody::Local { data } => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}

/// An error with its causes, `outer: inner: root`, for messages naming what failed.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_inference_calls_are_captured() {
        assert!(RouteKind::grpc("/tensorflow.serving.PredictionService/Predict").captured());
        assert!(RouteKind::grpc("/tensorflow.serving.PredictionService/MultiInference").captured());
        assert!(!RouteKind::grpc("/tensorflow.serving.PredictionService/GetModelMetadata").captured());
        assert!(!RouteKind::grpc("/other.Service/Predict").captured());
        assert!(RouteKind::rest(&http::Method::POST, "/v1/models/m/versions/2:predict").captured());
        assert!(RouteKind::rest(&http::Method::POST, "/v1/models/m:regress").captured());
        assert!(!RouteKind::rest(&http::Method::GET, "/v1/models/m:predict").captured());
        let metadata = RouteKind::rest(&http::Method::GET, "/v1/models/m/metadata");
        assert_eq!(metadata.method, crate::capture::CallMethod::GetModelMetadata);
        assert_eq!(metadata.label(), "metadata");
        assert_eq!(RouteKind::grpc("/tensorflow.serving.PredictionService/Predict").label(), "Predict");
        assert_eq!(RouteKind::rest(&http::Method::POST, "/v1/models/m:predict").label(), "predict");
    }
}
