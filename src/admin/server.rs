//! The admin HTTP/1.1 server: `/healthz` (the process answers), `/readyz` (both TF
//! Serving ports accept TCP connections), `/metrics` (Prometheus/OpenMetrics text),
//! then the registered `AdminRoute`s in order, else 404. It runs on its own
//! listener and never shares a connection or a lock with the proxy's path.

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

/// The admin server's state.
pub struct AdminServer {
    /// Everything `/metrics` exposes, frozen once the components are composed.
    registry: Arc<Registry>,
    /// Upstreams `/readyz` checks.
    readiness: Vec<ReadinessTarget>,
    /// Endpoints of other components, asked in order after the built-in ones.
    routes: Vec<Arc<dyn AdminRoute>>,
}

impl AdminServer {
    pub fn new(registry: Registry, readiness: Vec<ReadinessTarget>, routes: Vec<Arc<dyn AdminRoute>>) -> Self {
        AdminServer { registry: Arc::new(registry), readiness, routes }
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
                }
                let _ = connection.await;
            });
            // Reap finished connections so the set does not grow.
            while connections.try_join_next().is_some() {}
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
            _ => {
                for route in &self.routes {
                    if route.matches(&method, &path) {
                        let (parts, body) = request.into_parts();
                        return route.call(Request::from_parts(parts, body.boxed_unsync())).await;
                    }
                }
                text(
                    StatusCode::NOT_FOUND,
                    "application/json",
                    format!("{{\"error\": \"no admin endpoint {path}\"}}\n"),
                )
            }
        }
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
        if problems.is_empty() {
            text(StatusCode::OK, "text/plain; charset=utf-8", "ready\n".into())
        } else {
            text(StatusCode::SERVICE_UNAVAILABLE, "text/plain; charset=utf-8", problems.join("\n") + "\n")
        }
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
