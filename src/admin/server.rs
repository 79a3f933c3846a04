//! The admin HTTP/1.1 server: `/healthz` (the process answers), `/readyz` (both TF
//! Serving ports accept TCP connections; monitoring's state on a line of its own that
//! never fails readiness), `/metrics` (Prometheus/OpenMetrics text), then the
//! registered `AdminRoute`s in order, else 404. With `[admin] token_env` set, every
//! path but `/healthz`, `/readyz`, `/metrics` and `/v1/labels` (which has its own
//! token) needs the token, as a bearer token or as the password of HTTP basic
//! authentication (so a browser can open the dashboard). It runs on its own listener
//! and never shares a connection or a lock with the proxy's path.

use super::{AdminBody, AdminRoute};
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::debug;

/// Admin connections open at once; more are closed on accept. Probes, a scraper, a
/// label poster and a few dashboards need far fewer.
const MAX_ADMIN_CONNECTIONS: usize = 256;
/// An admin connection older than this is closed once its request in flight (if any)
/// is answered, so that idle keep-alive connections do not pile up.
const ADMIN_CONNECTION_LIFETIME: Duration = Duration::from_secs(120);

/// How long `/readyz` waits for each upstream's TCP handshake.
const READY_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// An upstream that must accept connections for `/readyz` to answer 200.
#[derive(Debug, Clone)]
pub struct ReadinessTarget {
    /// How the upstream is named in the answer (its URL).
    pub name: String,
    /// `host:port` to connect to.
    pub address: String,
}

/// A monitoring component's state for `/readyz`: None when it works, else what is
/// wrong (loading, degraded, recovering).
pub type MonitoringCheck = Box<dyn Fn() -> Option<String> + Send + Sync>;

/// Monitoring's health as `/readyz` reports it, apart from serving: a label store that
/// fails or state still loading degrades monitoring, never readiness, because the
/// proxy serves without them (it fails open).
#[derive(Default)]
pub struct MonitoringHealth {
    /// Checks by component name, asked at every `/readyz`.
    checks: std::sync::RwLock<Vec<(&'static str, MonitoringCheck)>>,
}

impl MonitoringHealth {
    /// Adds a component's check.
    pub fn add(&self, component: &'static str, check: MonitoringCheck) {
        self.checks.write().unwrap_or_else(|e| e.into_inner()).push((component, check));
    }

    /// What is wrong with monitoring, one entry per component; empty when all is well.
    pub fn problems(&self) -> Vec<String> {
        let checks = self.checks.read().unwrap_or_else(|e| e.into_inner());
        checks.iter().filter_map(|(name, check)| check().map(|problem| format!("{name}: {problem}"))).collect()
    }
}

/// The admin server's state.
pub struct AdminServer {
    /// Everything `/metrics` exposes, frozen once the components are composed.
    registry: Arc<Registry>,
    /// Upstreams `/readyz` checks.
    readiness: Vec<ReadinessTarget>,
    /// Endpoints of other components, asked in order after the built-in ones.
    routes: Vec<Arc<dyn AdminRoute>>,
    /// Monitoring's state, reported by `/readyz` without failing it.
    monitoring: Arc<MonitoringHealth>,
    /// The token the dashboard and its API need (`[admin] token_env`), if any.
    token: Option<Vec<u8>>,
}

impl AdminServer {
    pub fn new(registry: Registry, readiness: Vec<ReadinessTarget>, routes: Vec<Arc<dyn AdminRoute>>) -> Self {
        AdminServer { registry: Arc::new(registry), readiness, routes, monitoring: Arc::default(), token: None }
    }

    /// Reports monitoring's state on `/readyz` from these checks.
    pub fn with_monitoring(mut self, monitoring: Arc<MonitoringHealth>) -> Self {
        self.monitoring = monitoring;
        self
    }

    /// Requires `token` for the dashboard and its API (see the module's doc).
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token.map(String::into_bytes);
        self
    }

    /// Whether a request may see a protected path: the token as `Bearer` or as the
    /// password of `Basic` authentication.
    fn authorized(&self, headers: &http::HeaderMap) -> bool {
        let Some(expected) = &self.token else { return true };
        let Some(value) = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes()) else { return false };
        let Some(split) = value.iter().position(|b| *b == b' ') else { return false };
        let (scheme, rest) = value.split_at(split);
        let given = if scheme.eq_ignore_ascii_case(b"bearer") {
            rest.trim_ascii().to_vec()
        } else if scheme.eq_ignore_ascii_case(b"basic") {
            use base64::Engine;
            let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(rest.trim_ascii()) else { return false };
            match decoded.iter().position(|b| *b == b':') {
                Some(colon) => decoded[colon + 1..].to_vec(),
                None => return false,
            }
        } else {
            return false;
        };
        given.len() == expected.len() && given.iter().zip(expected).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }

    /// Serves until `stop` turns true, then closes idle connections, lets answers in
    /// progress finish and returns.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(TokioTimer::new());
        let mut connections = tokio::task::JoinSet::new();
        let connection_stop = stop.clone();
        loop {
            let accepted = tokio::select! {
                _ = stop.wait_for(|stopped| *stopped) => break,
                accepted = listener.accept() => accepted,
            };
            let Ok((stream, _)) = accepted else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            // Reap finished connections so the set does not grow, then refuse past the
            // bound: a flood on the admin port must not take its descriptors.
            while connections.try_join_next().is_some() {}
            if connections.len() >= MAX_ADMIN_CONNECTIONS {
                debug!(message = "Admin connection refused: too many open.");
                drop(stream);
                continue;
            }
            let server = self.clone();
            let builder = builder.clone();
            let mut stop = connection_stop.clone();
            connections.spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let server = server.clone();
                    async move { Ok::<_, Infallible>(server.answer(request).await) }
                });
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                let mut connection = std::pin::pin!(connection);
                tokio::select! {
                    result = connection.as_mut() => {
                        if let Err(error) = result { debug!(message = "Admin connection error.", %error); }
                        return;
                    }
                    _ = stop.wait_for(|stopped| *stopped) => connection.as_mut().graceful_shutdown(),
                    _ = tokio::time::sleep(ADMIN_CONNECTION_LIFETIME) => connection.as_mut().graceful_shutdown(),
                }
                let _ = connection.await;
            });
        }
        drop(listener);
        while connections.join_next().await.is_some() {}
    }

    async fn answer(&self, request: Request<Incoming>) -> Response<AdminBody> {
        let path = request.uri().path().to_string();
        let method = request.method().clone();
        let builtin = method == Method::GET || method == Method::HEAD;
        match path.as_str() {
            "/healthz" if builtin => text(StatusCode::OK, "text/plain; charset=utf-8", "ok\n".into()),
            "/readyz" if builtin => self.readiness().await,
            "/metrics" if builtin => {
                let accept = request.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok());
                self.metrics(super::exposition::wants_openmetrics(accept))
            }
            "/v1/labels" => self.route(request, &method, &path).await,
            _ if !self.authorized(request.headers()) => {
                let mut response = text(
                    StatusCode::UNAUTHORIZED,
                    "application/json",
                    "{\"error\": \"this admin path needs the admin token\"}\n".into(),
                );
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Basic realm=\"mltap\""));
                response
            }
            _ => self.route(request, &method, &path).await,
        }
    }

    /// Hands the request to the first registered route that serves it, else 404.
    async fn route(&self, request: Request<Incoming>, method: &Method, path: &str) -> Response<AdminBody> {
        for route in &self.routes {
            if route.matches(method, path) {
                let (parts, body) = request.into_parts();
                return route.call(Request::from_parts(parts, body.boxed_unsync())).await;
            }
        }
        text(StatusCode::NOT_FOUND, "application/json", format!("{{\"error\": \"no admin endpoint {path}\"}}\n"))
    }

    async fn readiness(&self) -> Response<AdminBody> {
        let checks = self.readiness.iter().map(|target| async move {
            let connect = tokio::net::TcpStream::connect(&target.address);
            match tokio::time::timeout(READY_CONNECT_TIMEOUT, connect).await {
                Ok(Ok(_)) => None,
                Ok(Err(error)) => Some(format!("{} unreachable: {error}", target.name)),
                Err(_) => Some(format!("{} did not accept a connection within {READY_CONNECT_TIMEOUT:?}", target.name)),
            }
        });
        let problems: Vec<String> = futures_util::future::join_all(checks).await.into_iter().flatten().collect();
        let monitoring = self.monitoring.problems();
        let monitoring_line = if monitoring.is_empty() {
            "monitoring: ok\n".to_string()
        } else {
            format!("monitoring: degraded: {}\n", monitoring.join("; "))
        };
        let mut response = if problems.is_empty() {
            text(StatusCode::OK, "text/plain; charset=utf-8", format!("ready\n{monitoring_line}"))
        } else {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain; charset=utf-8",
                problems.join("\n") + "\n" + &monitoring_line,
            )
        };
        let state = if monitoring.is_empty() { "ok" } else { "degraded" };
        response.headers_mut().insert("x-mltap-monitoring", http::HeaderValue::from_static(state));
        response
    }

    /// OpenMetrics when the scraper asks for it, else the classic text format.
    fn metrics(&self, openmetrics: bool) -> Response<AdminBody> {
        use super::exposition::{to_prometheus_text, OPENMETRICS, PROMETHEUS_TEXT};
        let mut out = String::new();
        match prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            Ok(()) if openmetrics => text(StatusCode::OK, OPENMETRICS, out),
            Ok(()) => text(StatusCode::OK, PROMETHEUS_TEXT, to_prometheus_text(&out)),
            Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "text/plain; charset=utf-8", "encoding failed\n".into()),
        }
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<AdminBody> {
    let mut response = Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
    response
}
