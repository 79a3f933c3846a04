//! A fake TensorFlow Serving on loopback for the proxy tests. It speaks the real
//! protocols: gRPC through tonic's server machinery (length-prefixed messages,
//! trailers, trailers-only errors) on HTTP/2 prior knowledge, and REST over HTTP/1.1
//! with TF Serving's JSON shapes and `{"error": ...}` bodies. It answers the recorded
//! fixtures verbatim, and misbehaves on demand when a request carries `x-fake-*`
//! headers (which mltap forwards like any other):
//!
//! gRPC: `x-fake-grpc-error: CODE` (+ `x-fake-grpc-message`) trailers-only error;
//! `x-fake-grpc-error-after-data: CODE` data then an error in the trailers;
//! `x-fake-reset: before-headers|after-data` RST_STREAM(ENHANCE_YOUR_CALM);
//! `x-fake-hang` never answers and counts the cancel when the stream is dropped;
//! `x-fake-barrier` waits until the configured number of calls is in flight;
//! `x-fake-echo` answers the request message; `x-fake-delay-ms: N` answers late.
//!
//! REST: `x-fake-status: N` error body; `x-fake-empty` 200 with Content-Length 0;
//! `x-fake-chunked` streams the answer without Content-Length; `x-fake-hop-by-hop`
//! adds connection-specific response headers; `x-fake-delay-ms: N` answers late.

use super::raw_codec::RawCodec;
use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mltap::tfserving::proto::serving;
use prost::Message;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Barrier, Notify};
use tokio::task::JoinHandle;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type FakeBody = UnsyncBoxBody<Bytes, BoxError>;

/// One recorded gRPC case.
#[derive(Debug, Clone)]
pub struct GrpcFixture {
    pub name: String,
    /// Full method path, e.g. `/tensorflow.serving.PredictionService/Predict`.
    pub path: String,
    /// Bare request message (no 5-byte prefix).
    pub request: Bytes,
    /// Bare response message.
    pub response: Bytes,
}

/// One recorded REST case.
#[derive(Debug, Clone)]
pub struct RestFixture {
    pub name: String,
    pub path: String,
    pub status: u16,
    pub request: Bytes,
    pub response: Bytes,
}

fn case_names(dir: &std::path::Path, suffix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("fixtures directory")
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_suffix(suffix).map(str::to_string))
        .collect();
    names.sort();
    names
}

pub fn grpc_fixtures() -> Vec<GrpcFixture> {
    let dir = super::fixtures_dir().join("grpc");
    case_names(&dir, ".request.pb")
        .into_iter()
        .map(|name| {
            let method = match name.as_str() {
                "classify" => "Classify",
                "regress" => "Regress",
                _ => "Predict",
            };
            GrpcFixture {
                path: format!("/tensorflow.serving.PredictionService/{method}"),
                request: std::fs::read(dir.join(format!("{name}.request.pb"))).expect("request").into(),
                response: std::fs::read(dir.join(format!("{name}.response.pb"))).expect("response").into(),
                name,
            }
        })
        .collect()
}

pub fn rest_fixtures() -> Vec<RestFixture> {
    let dir = super::fixtures_dir().join("rest");
    case_names(&dir, ".request.json")
        .into_iter()
        .map(|name| {
            let expected: serde_json::Value =
                serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.expected.json"))).expect("expected"))
                    .expect("expected json");
            RestFixture {
                path: expected["path"].as_str().expect("path").to_string(),
                status: expected["status"].as_u64().unwrap_or(200) as u16,
                request: std::fs::read(dir.join(format!("{name}.request.json"))).expect("request").into(),
                response: std::fs::read(dir.join(format!("{name}.response.json"))).expect("response").into(),
                name,
            }
        })
        .collect()
}

/// What the fake saw and how it is told to behave across calls.
#[derive(Default)]
pub struct FakeState {
    grpc: HashMap<(String, Bytes), Bytes>,
    rest: HashMap<(String, Bytes), (u16, Bytes)>,
    /// gRPC calls whose stream was dropped before an answer (client cancel).
    pub cancelled: AtomicUsize,
    pub cancel_seen: Notify,
    /// Requests received, gRPC and REST.
    pub received: AtomicUsize,
    pub received_seen: Notify,
    /// Used by `x-fake-barrier`.
    pub barrier: Mutex<Option<Arc<Barrier>>>,
    /// Headers and body of the last request, for checks of what arrived.
    pub last_headers: Mutex<Option<HeaderMap>>,
    pub last_body: Mutex<Option<Bytes>>,
}

impl FakeState {
    pub fn last_headers(&self) -> HeaderMap {
        self.last_headers.lock().unwrap().clone().expect("a request arrived")
    }

    pub fn last_body(&self) -> Bytes {
        self.last_body.lock().unwrap().clone().expect("a request arrived")
    }

    /// Makes `x-fake-barrier` calls wait until `n` of them are in flight.
    pub fn set_barrier(&self, n: usize) {
        *self.barrier.lock().unwrap() = Some(Arc::new(Barrier::new(n)));
    }

    /// Waits until at least `n` client cancels were seen (bounded, then panics).
    pub async fn wait_cancelled(&self, n: usize) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while self.cancelled.load(Ordering::SeqCst) < n {
                let notified = self.cancel_seen.notified();
                if self.cancelled.load(Ordering::SeqCst) >= n {
                    break;
                }
                notified.await;
            }
        })
        .await
        .expect("the cancel reached TF Serving");
    }

    /// Waits until at least `n` requests arrived (bounded, then panics).
    pub async fn wait_received(&self, n: usize) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while self.received.load(Ordering::SeqCst) < n {
                let notified = self.received_seen.notified();
                if self.received.load(Ordering::SeqCst) >= n {
                    break;
                }
                notified.await;
            }
        })
        .await
        .expect("the request reached TF Serving");
    }

    fn record(&self, headers: &HeaderMap, body: Option<Bytes>) {
        *self.last_headers.lock().unwrap() = Some(headers.clone());
        if let Some(body) = body {
            *self.last_body.lock().unwrap() = Some(body);
        }
        self.received.fetch_add(1, Ordering::SeqCst);
        self.received_seen.notify_waiters();
    }
}

/// The running fake; its servers stop when it is dropped.
pub struct FakeTfServing {
    pub grpc: SocketAddr,
    pub rest: SocketAddr,
    pub state: Arc<FakeState>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for FakeTfServing {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl FakeTfServing {
    pub async fn start() -> FakeTfServing {
        Self::start_with_max_streams(2000).await
    }

    /// A fake whose gRPC port allows `max_streams` concurrent streams per connection,
    /// as TF Serving's gRPC server bounds them.
    pub async fn start_with_max_streams(max_streams: u32) -> FakeTfServing {
        let mut state = FakeState::default();
        for f in grpc_fixtures() {
            state.grpc.insert((f.path.clone(), f.request.clone()), f.response.clone());
        }
        for f in rest_fixtures() {
            state.rest.insert((f.path.clone(), f.request.clone()), (f.status, f.response.clone()));
        }
        let state = Arc::new(state);
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let rest = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (grpc_addr, rest_addr) = (grpc.local_addr().unwrap(), rest.local_addr().unwrap());
        let tasks = vec![
            tokio::spawn(serve(grpc, state.clone(), Some(max_streams))),
            tokio::spawn(serve(rest, state.clone(), None)),
        ];
        FakeTfServing { grpc: grpc_addr, rest: rest_addr, state, tasks }
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub fn rest_url(&self) -> String {
        format!("http://{}", self.rest)
    }
}

async fn serve(listener: TcpListener, state: Arc<FakeState>, h2_max_streams: Option<u32>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        stream.set_nodelay(true).ok();
        let state = state.clone();
        tokio::spawn(async move {
            let io = TokioIo::new(stream);
            if let Some(max_streams) = h2_max_streams {
                let service = hyper::service::service_fn(move |r| grpc(r, state.clone()));
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .max_concurrent_streams(max_streams)
                    .auto_date_header(false)
                    .serve_connection(io, service)
                    .await;
            } else {
                let service = hyper::service::service_fn(move |r| rest(r, state.clone()));
                let _ = hyper::server::conn::http1::Builder::new()
                    .auto_date_header(false)
                    .serve_connection(io, service)
                    .await;
            }
        });
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn delay(headers: &HeaderMap) -> Option<Duration> {
    header(headers, "x-fake-delay-ms").and_then(|v| v.parse().ok()).map(Duration::from_millis)
}

/// Counts a cancel when a call that never answers is dropped by the server.
struct CancelGuard(Arc<FakeState>);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.0.cancelled.fetch_add(1, Ordering::SeqCst);
        self.0.cancel_seen.notify_waiters();
    }
}

fn grpc_frame(message: &[u8]) -> Bytes {
    let mut framed = Vec::with_capacity(message.len() + 5);
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    framed.into()
}

fn grpc_response(frames: Vec<Result<Frame<Bytes>, BoxError>>) -> Response<FakeBody> {
    Response::builder()
        .header("content-type", "application/grpc")
        .body(StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync())
        .unwrap()
}

async fn grpc(request: Request<Incoming>, state: Arc<FakeState>) -> Result<Response<FakeBody>, BoxError> {
    let headers = request.headers().clone();
    let path = request.uri().path().to_string();
    state.record(&headers, None);
    if let Some(d) = delay(&headers) {
        tokio::time::sleep(d).await;
    }
    if header(&headers, "x-fake-hang").is_some() {
        let _guard = CancelGuard(state.clone());
        std::future::pending::<()>().await;
    }
    match header(&headers, "x-fake-reset") {
        Some("before-headers") => {
            return Err(Box::new(h2::Error::from(h2::Reason::ENHANCE_YOUR_CALM)));
        }
        Some(_) => {
            let frames = vec![
                Ok(Frame::data(grpc_frame(b"partial"))),
                Err(Box::new(h2::Error::from(h2::Reason::ENHANCE_YOUR_CALM)) as BoxError),
            ];
            return Ok(grpc_response(frames));
        }
        None => {}
    }
    if let Some(code) = header(&headers, "x-fake-grpc-error-after-data") {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", code.parse().unwrap());
        trailers.insert("grpc-message", "failed%20after%20data".parse().unwrap());
        return Ok(grpc_response(vec![Ok(Frame::data(grpc_frame(b"first message"))), Ok(Frame::trailers(trailers))]));
    }
    let barrier = header(&headers, "x-fake-barrier").and_then(|_| state.barrier.lock().unwrap().clone());
    if let Some(barrier) = barrier {
        barrier.wait().await;
    }
    let error = header(&headers, "x-fake-grpc-error").map(|code| {
        let code = tonic::Code::from_i32(code.parse().unwrap_or(2));
        tonic::Status::new(code, header(&headers, "x-fake-grpc-message").unwrap_or("fake failure").to_string())
    });
    let answer = Answer { state: state.clone(), path, error, echo: header(&headers, "x-fake-echo").is_some() };
    let mut server =
        tonic::server::Grpc::new(RawCodec).max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX);
    let response = server.unary(answer, request).await;
    Ok(response.map(|body| body.map_err(|status| Box::new(status) as BoxError).boxed_unsync()))
}

/// The unary handler run inside tonic's server codec.
struct Answer {
    state: Arc<FakeState>,
    path: String,
    error: Option<tonic::Status>,
    echo: bool,
}

impl tonic::server::UnaryService<Bytes> for Answer {
    type Response = Bytes;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<tonic::Response<Bytes>, tonic::Status>> + Send>>;

    fn call(&mut self, call: tonic::Request<Bytes>) -> Self::Future {
        let (state, path, error, echo) = (self.state.clone(), self.path.clone(), self.error.clone(), self.echo);
        Box::pin(async move {
            let message = call.into_inner();
            *state.last_body.lock().unwrap() = Some(message.clone());
            if let Some(status) = error {
                return Err(status);
            }
            if echo {
                return Ok(tonic::Response::new(message));
            }
            answer_grpc(&state, &path, message).map(tonic::Response::new)
        })
    }
}

fn answer_grpc(state: &FakeState, path: &str, message: Bytes) -> Result<Bytes, tonic::Status> {
    if let Some(response) = state.grpc.get(&(path.to_string(), message.clone())) {
        return Ok(response.clone());
    }
    let spec = || serving::ModelSpec { name: "bench".into(), ..Default::default() };
    match path {
        "/tensorflow.serving.PredictionService/GetModelMetadata" => {
            let request = serving::GetModelMetadataRequest::decode(message)
                .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
            let mut spec = request.model_spec.unwrap_or_else(spec);
            spec.version_choice = Some(serving::model_spec::VersionChoice::Version(1));
            Ok(serving::GetModelMetadataResponse { model_spec: Some(spec), metadata: HashMap::new() }
                .encode_to_vec()
                .into())
        }
        "/tensorflow.serving.ModelService/GetModelStatus" => Ok(serving::GetModelStatusResponse {
            model_version_status: vec![serving::ModelVersionStatus {
                version: 1,
                state: serving::model_version_status::State::Available as i32,
                status: None,
            }],
        }
        .encode_to_vec()
        .into()),
        p if p.starts_with("/tensorflow.serving.") => {
            Err(tonic::Status::not_found("Servable not found for request: Specific(bench, 1)"))
        }
        _ => Err(tonic::Status::unimplemented(format!("unknown method {path}"))),
    }
}

fn json(status: u16, body: impl Into<Bytes>) -> Response<FakeBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(body.into()).map_err(|never| match never {}).boxed_unsync())
        .unwrap()
}

async fn rest(request: Request<Incoming>, state: Arc<FakeState>) -> Result<Response<FakeBody>, BoxError> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await?.to_bytes();
    state.record(&parts.headers, Some(body.clone()));
    let headers = &parts.headers;
    if let Some(d) = delay(headers) {
        tokio::time::sleep(d).await;
    }
    let path = parts.uri.path().to_string();
    let mut response = if let Some(status) = header(headers, "x-fake-status").and_then(|s| s.parse::<u16>().ok()) {
        json(status, r#"{ "error": "fake failure on demand" }"#)
    } else if header(headers, "x-fake-empty").is_some() {
        let mut r = json(200, Bytes::new());
        r.headers_mut().insert("content-length", "0".parse().unwrap());
        r
    } else if parts.method == http::Method::POST {
        match state.rest.get(&(path.clone(), body.clone())) {
            Some((status, answer)) => json(*status, answer.clone()),
            None => json(400, r#"{ "error": "no fixture matches this request" }"#),
        }
    } else if parts.method == http::Method::GET && path == "/monitoring/prometheus/metrics" {
        let mut r = json(200, "# TYPE :tensorflow:serving:request_count counter\n");
        r.headers_mut().insert("content-type", "text/plain".parse().unwrap());
        r
    } else if parts.method == http::Method::GET && path.starts_with("/v1/models/") && path.ends_with("/metadata") {
        let model = path.trim_start_matches("/v1/models/").split('/').next().unwrap_or_default();
        json(
            200,
            format!(
                r#"{{"model_spec": {{"name": "{model}", "signature_name": "", "version": "1"}}, "metadata": {{"signature_def": {{"signature_def": {{}}}}}}}}"#
            ),
        )
    } else if parts.method == http::Method::GET && path.starts_with("/v1/models/") {
        json(
            200,
            r#"{"model_version_status": [{"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}"#,
        )
    } else {
        json(404, format!(r#"{{ "error": "Malformed request: {} {}" }}"#, parts.method, path))
    };
    if header(headers, "x-fake-chunked").is_some() {
        let (parts, body) = response.into_parts();
        let whole = body.collect().await?.to_bytes();
        let half = whole.len() / 2;
        let chunks = vec![Ok(Frame::data(whole.slice(..half))), Ok(Frame::data(whole.slice(half..)))];
        response = Response::from_parts(parts, StreamBody::new(futures_util::stream::iter(chunks)).boxed_unsync());
        response.headers_mut().remove("content-length");
    }
    if header(headers, "x-fake-hop-by-hop").is_some() {
        let h = response.headers_mut();
        h.insert("connection", "x-hop".parse().unwrap());
        h.insert("x-hop", "secret".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("proxy-connection", "keep-alive".parse().unwrap());
        h.insert("x-end-to-end", "kept".parse().unwrap());
    }
    Ok(response)
}
