//! The embedded TF-Serving-compatible model server: the gRPC services (tonic, h2c) and
//! the REST API (hyper, HTTP/1.1) on two listeners, over the demo's models, with a
//! shutdown that stops both. It stands in for `tensorflow_model_server` so that the
//! demo needs nothing installed.

use super::grpc::GrpcModelServer;
use super::model::LinearModel;
use super::rest::RestModelServer;
use super::serving::Registry;
use crate::tfserving::proto::serving::model_service_server::ModelServiceServer;
use crate::tfserving::proto::serving::prediction_service_server::PredictionServiceServer;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

/// A running model server.
#[derive(Debug)]
pub struct ModelServer {
    /// Where the gRPC API listens (TF Serving's `--port`).
    pub grpc_addr: SocketAddr,
    /// Where the REST API listens (TF Serving's `--rest_api_port`).
    pub rest_addr: SocketAddr,
    /// Stops both front ends.
    shutdown: CancellationToken,
    /// The two accept loops, awaited on shutdown.
    tasks: Vec<JoinHandle<()>>,
}

impl ModelServer {
    /// Serves `models` on two already bound listeners.
    pub fn start(grpc: TcpListener, rest: TcpListener, models: Vec<LinearModel>) -> std::io::Result<ModelServer> {
        let grpc_addr = grpc.local_addr()?;
        let rest_addr = rest.local_addr()?;
        let registry = Arc::new(Registry::new(models));
        let shutdown = CancellationToken::new();

        let grpc_service = GrpcModelServer { registry: registry.clone() };
        let grpc_stop = shutdown.clone();
        let grpc_task = tokio::spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true));
            let routes = GrpcRoutes {
                prediction: PredictionServiceServer::new(grpc_service.clone()),
                model: ModelServiceServer::new(grpc_service),
            };
            let served = tonic::transport::Server::builder()
                .serve_with_incoming_shutdown(routes, incoming, grpc_stop.cancelled_owned())
                .await;
            if let Err(error) = served {
                tracing::warn!(message = "Demo model server: gRPC server stopped.", %error);
            }
        });

        let rest_service = RestModelServer { registry };
        let rest_stop = shutdown.clone();
        let rest_task = tokio::spawn(serve_rest(rest, rest_service, rest_stop));

        Ok(ModelServer { grpc_addr, rest_addr, shutdown, tasks: vec![grpc_task, rest_task] })
    }

    /// Binds both listeners (port 0 picks a free port) and serves the demo models.
    pub async fn bind(grpc: SocketAddr, rest: SocketAddr, models: Vec<LinearModel>) -> std::io::Result<ModelServer> {
        let grpc = TcpListener::bind(grpc).await?;
        let rest = TcpListener::bind(rest).await?;
        ModelServer::start(grpc, rest, models)
    }

    /// Stops accepting, closes open connections and waits for both servers.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// Routes gRPC calls to the two services by path (what tonic's router would do; the
/// crate is built without it to keep dependencies few).
#[derive(Clone)]
struct GrpcRoutes {
    /// `/tensorflow.serving.PredictionService/*`, and the Unimplemented answer for
    /// unknown paths.
    prediction: PredictionServiceServer<GrpcModelServer>,
    /// `/tensorflow.serving.ModelService/*`.
    model: ModelServiceServer<GrpcModelServer>,
}

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for GrpcRoutes {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if request.uri().path().starts_with("/tensorflow.serving.ModelService/") {
            self.model.call(request)
        } else {
            self.prediction.call(request)
        }
    }
}

async fn serve_rest(listener: TcpListener, service: RestModelServer, stop: CancellationToken) {
    // Dropping the set on shutdown aborts keep-alive connections that would otherwise
    // hold the server open.
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let (stream, _) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                tracing::warn!(message = "Demo model server: REST accept failed.", %error);
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        connections.spawn(async move {
            let handler = service_fn(move |request| {
                let service = service.clone();
                async move { Ok::<_, Infallible>(service.handle(request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), handler).await;
        });
    }
}
