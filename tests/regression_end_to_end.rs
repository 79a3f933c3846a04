//! Regression models end to end through the real binary: `mltap serve` in front of a
//! TF Serving stand-in on loopback that answers a regression model `eta` over gRPC
//! `Predict` (a `[n,1]` float output, as TF Serving encodes it) and REST `:predict`,
//! the recorded `price` fixtures over gRPC `Regress` and REST `:regress`, and a binary
//! classifier `churn`. Numeric labels posted afterwards must give exactly the
//! hand-computed mae, rmse, error_mean and r2 in the predictions' bucket, REST calls
//! without a version must land in the stream of the version TF Serving serves, and a
//! classifier is never scored as a regression nor the reverse.
//!
//! The gRPC `Predict` payloads are built with the project's TensorProto messages, the
//! way TF Serving writes them (`float_val` and a `[n,1]` shape in the response,
//! `tensor_content` in the request as `tf.make_tensor_proto` writes it).

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mltap::tfserving::proto::serving::model_spec::VersionChoice;
use mltap::tfserving::proto::serving::{ModelSpec, PredictRequest, PredictResponse};
use mltap::tfserving::proto::tensorflow::tensor_shape_proto::Dim;
use mltap::tfserving::proto::{DataType, TensorProto, TensorShapeProto};
use prost::Message;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;

mod support;

type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// The version the stand-in serves (gRPC responses say it; REST status reports it).
const SERVED_VERSION: i64 = 7;
/// Bucket width of the run, seconds.
const BUCKET: u64 = 4;

/// The bearer token protecting the label endpoint of the run.
const LABELS_TOKEN: &str = "regression-test-token";

/// The `mltap serve` child, stopped when dropped.
struct KillOnDrop(std::process::Child);

impl KillOnDrop {
    fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `eta` model: prediction = 2·x + 1.
fn eta(x: f32) -> f32 {
    2.0 * x + 1.0
}

fn full(status: u16, body: impl Into<Bytes>) -> Response<BoxBody> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(body.into()).boxed_unsync())
        .unwrap()
}

fn fixture(path: &str) -> Bytes {
    std::fs::read(support::fixtures_dir().join(path)).unwrap().into()
}

async fn rest(request: Request<Incoming>) -> Result<Response<BoxBody>, Infallible> {
    let path = request.uri().path().to_string();
    let get = request.method() == http::Method::GET;
    let body = request.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    Ok(match path.as_str() {
        "/v1/models/eta:predict" => {
            let rows = json["instances"].as_array().cloned().unwrap_or_default();
            let predictions: Vec<Vec<f32>> = rows.iter().map(|r| vec![eta(r[0].as_f64().unwrap() as f32)]).collect();
            full(200, serde_json::json!({ "predictions": predictions }).to_string())
        }
        "/v1/models/churn:predict" => {
            let rows = json["instances"].as_array().map_or(0, |r| r.len());
            full(200, serde_json::json!({ "predictions": vec![[0.25, 0.75]; rows] }).to_string())
        }
        "/v1/models/price:regress" => full(200, fixture("rest/regress.response.json")),
        _ if get && path.starts_with("/v1/models/") && !path.contains(':') && !path.ends_with("/metadata") => {
            let status = serde_json::json!({ "model_version_status": [
                { "version": (SERVED_VERSION - 1).to_string(), "state": "END", "status": { "error_code": "OK" } },
                { "version": SERVED_VERSION.to_string(), "state": "AVAILABLE", "status": { "error_code": "OK" } },
            ]});
            full(200, status.to_string())
        }
        _ => full(404, r#"{"error": "not found"}"#),
    })
}

fn shape(dims: &[i64]) -> Option<TensorShapeProto> {
    Some(TensorShapeProto {
        dim: dims.iter().map(|d| Dim { size: *d, name: String::new() }).collect(),
        unknown_rank: false,
    })
}

fn spec(name: &str, version: Option<i64>) -> Option<ModelSpec> {
    Some(ModelSpec {
        name: name.into(),
        signature_name: "serving_default".into(),
        version_choice: version.map(VersionChoice::Version),
    })
}

/// A `PredictRequest` of `eta` with one float input `x` of shape `[n,1]`.
fn eta_request(xs: &[f32]) -> PredictRequest {
    let x = TensorProto {
        dtype: DataType::DtFloat as i32,
        tensor_shape: shape(&[xs.len() as i64, 1]),
        tensor_content: xs.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..TensorProto::default()
    };
    PredictRequest { model_spec: spec("eta", None), inputs: HashMap::from([("x".into(), x)]), output_filter: vec![] }
}

fn framed(message: &[u8]) -> Bytes {
    let mut out = vec![0u8];
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    Bytes::from(out)
}

/// gRPC: `Predict` of `eta` computed from the request, `Regress` of `price` from the
/// recorded fixture; anything else UNIMPLEMENTED.
async fn grpc(request: Request<Incoming>) -> Result<Response<BoxBody>, Infallible> {
    let path = request.uri().path().to_string();
    let body = request.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    let mut trailers = http::HeaderMap::new();
    let mut frames: Vec<Result<Frame<Bytes>, Infallible>> = Vec::new();
    let answer = match path.as_str() {
        "/tensorflow.serving.PredictionService/Predict" => {
            let request = PredictRequest::decode(body.get(5..).unwrap_or_default()).unwrap();
            let x = &request.inputs["x"];
            let xs: Vec<f32> =
                x.tensor_content.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            let predictions = TensorProto {
                dtype: DataType::DtFloat as i32,
                tensor_shape: shape(&[xs.len() as i64, 1]),
                float_val: xs.iter().map(|x| eta(*x)).collect(),
                ..TensorProto::default()
            };
            let response = PredictResponse {
                model_spec: spec("eta", Some(SERVED_VERSION)),
                outputs: HashMap::from([("predictions".into(), predictions)]),
            };
            Some(response.encode_to_vec())
        }
        "/tensorflow.serving.PredictionService/Regress" => Some(fixture("grpc/regress.response.pb").to_vec()),
        _ => None,
    };
    match answer {
        Some(message) => {
            frames.push(Ok(Frame::data(framed(&message))));
            trailers.insert("grpc-status", "0".parse().unwrap());
        }
        None => {
            trailers.insert("grpc-status", "12".parse().unwrap());
        }
    }
    frames.push(Ok(Frame::trailers(trailers)));
    let body = StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync();
    Ok(Response::builder().status(200).header("content-type", "application/grpc").body(body).unwrap())
}

async fn serve_fake() -> (SocketAddr, SocketAddr) {
    let rest_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addrs = (rest_listener.local_addr().unwrap(), grpc_listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = rest_listener.accept().await else { continue };
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), hyper::service::service_fn(rest)),
            );
        }
    });
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = grpc_listener.accept().await else { continue };
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), hyper::service::service_fn(grpc)),
            );
        }
    });
    addrs
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn wait_port(port: u16) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("port {port} did not open");
}

/// The points of a model's file for the bucket starting at `start`, if written.
fn bucket_points(out: &Path, model: &str, start: i64) -> Vec<serde_json::Value> {
    let name = humantime_file_name(start);
    match std::fs::read(out.join("anodot").join(model).join(name)) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap(),
        Err(_) => Vec::new(),
    }
}

/// `YYYYMMDDTHHMMSSZ.json` of a bucket start.
fn humantime_file_name(start: i64) -> String {
    let text = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(start as u64)).to_string();
    format!("{}.json", text.replace(['-', ':'], ""))
}

fn value(points: &[serde_json::Value], what: &str, dims: &[(&str, &str)]) -> Option<f64> {
    points
        .iter()
        .find(|p| p["properties"]["what"] == what && dims.iter().all(|(k, v)| p["properties"][*k] == *v))
        .and_then(|p| p["value"].as_f64())
}

/// A gRPC unary call with an `x-request-id`, raw bytes in and out.
async fn grpc_call(
    client: &hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    base: &str,
    method: &str,
    message: Vec<u8>,
    request_id: &str,
) {
    let request = Request::post(format!("{base}/tensorflow.serving.PredictionService/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-request-id", request_id)
        .body(Full::new(framed(&message)))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let collected = response.into_body().collect().await.unwrap();
    let status = collected.trailers().and_then(|t| t.get("grpc-status")).map(|s| s.to_str().unwrap().to_string());
    assert_eq!(status.as_deref(), Some("0"), "{method} failed through the proxy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_streams_get_prediction_and_exact_label_metrics_in_their_bucket() {
    let (rest_upstream, grpc_upstream) = serve_fake().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let config = dir.path().join("mltap.toml");
    std::fs::write(
        &config,
        "[monitor]\ngrace_seconds = 1\n[labels]\ntoken_env = \"MLTAP_TEST_LABELS_TOKEN\"\n\
         [models.eta]\ntask = \"regression\"\n[models.price]\ntask = \"regression\"\n\
         [models.churn]\ntask = \"classification\"\n",
    )
    .unwrap();
    let (grpc_port, rest_port, admin_port) = (free_port(), free_port(), free_port());
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_mltap"))
        .env("MLTAP_TEST_LABELS_TOKEN", LABELS_TOKEN)
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--grpc-listen", &format!("127.0.0.1:{grpc_port}")])
        .args(["--rest-listen", &format!("127.0.0.1:{rest_port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
        .args(["--grpc-upstream", &format!("http://{grpc_upstream}")])
        .args(["--rest-upstream", &format!("http://{rest_upstream}")])
        .args(["--bucket", &format!("{BUCKET}s"), "--label-horizon", "3s", "--output-dir"])
        .arg(&out)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Killed however the test ends, so that a failed assertion leaves no server behind.
    let mut child = KillOnDrop(child);
    for port in [grpc_port, rest_port, admin_port] {
        wait_port(port).await;
    }

    // Start right after a bucket boundary so that every call lands in one bucket.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let into_bucket = now.as_millis() as u64 % (BUCKET * 1000);
    tokio::time::sleep(Duration::from_millis(BUCKET * 1000 - into_bucket + 100)).await;
    let start = (SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() / BUCKET * BUCKET) as i64;

    let rest_client = reqwest::Client::new();
    let grpc_client =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).http2_only(true).build_http::<Full<Bytes>>();
    let grpc_base = format!("http://127.0.0.1:{grpc_port}");
    let rest_base = format!("http://127.0.0.1:{rest_port}");

    // eta over gRPC Predict (x = 1, 2 → 3, 5) and REST :predict without a version (x = 3, 4 → 7, 9).
    grpc_call(&grpc_client, &grpc_base, "Predict", eta_request(&[1.0, 2.0]).encode_to_vec(), "g-eta").await;
    let answer = rest_client
        .post(format!("{rest_base}/v1/models/eta:predict"))
        .header("x-request-id", "r-eta")
        .body(r#"{"instances": [[3.0], [4.0]]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.json::<serde_json::Value>().await.unwrap()["predictions"], serde_json::json!([[7.0], [9.0]]));
    // price over gRPC Regress and REST :regress (the recorded fixtures: 101.5, 180.25).
    grpc_call(&grpc_client, &grpc_base, "Regress", fixture("grpc/regress.request.pb").to_vec(), "g-price").await;
    let answer = rest_client
        .post(format!("{rest_base}/v1/models/price:regress"))
        .header("x-request-id", "r-price")
        .body(fixture("rest/regress.request.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    // A classifier next to them.
    let answer = rest_client
        .post(format!("{rest_base}/v1/models/churn:predict"))
        .header("x-request-id", "r-churn")
        .body(r#"{"instances": [[1.0]]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);

    // Labels, later: errors +1, −2, +3, −4 for eta; a zero label for price (left out of
    // mape); and one label of the wrong type each way, rejected with its index.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let labels = serde_json::json!([
        { "id": "g-eta:0", "label": 2 },
        { "id": "g-eta:1", "label": 7.0 },
        { "id": "r-eta:0", "label": 4 },
        { "id": "r-eta:1", "label": 13 },
        { "id": "r-price:0", "label": 100.0 },
        { "id": "r-price:1", "label": 0 },
        { "id": "g-price:0", "label": "expensive" },
        { "id": "r-churn", "label": 0.5 },
    ]);
    let answer: serde_json::Value = rest_client
        .post(format!("http://127.0.0.1:{admin_port}/v1/labels"))
        .bearer_auth(LABELS_TOKEN)
        .json(&labels)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["accepted"], 6, "{answer}");
    let rejected = answer["rejected"].as_array().unwrap();
    let indexes: Vec<u64> = rejected.iter().map(|r| r["index"].as_u64().unwrap()).collect();
    assert_eq!(indexes, [6, 7], "{answer}");
    assert!(rejected[0]["error"].as_str().unwrap().contains("must be a number"), "{answer}");
    assert!(rejected[1]["error"].as_str().unwrap().contains("classifier"), "{answer}");
    // A rejected label leaves its prediction for a correct one.
    let answer: serde_json::Value = rest_client
        .post(format!("http://127.0.0.1:{admin_port}/v1/labels"))
        .bearer_auth(LABELS_TOKEN)
        .header("content-type", "application/json")
        .body(r#"{"id": "r-churn", "label": 1}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["accepted"], 1, "{answer}");

    // The label metrics are appended to the predictions' bucket once its horizon passed.
    let version = SERVED_VERSION.to_string();
    let eta_stream = [("version", version.as_str()), ("signature", "serving_default")];
    let rest_price = [("version", version.as_str())];
    let mut points = Vec::new();
    // Each model's label points are appended on their own: wait for all three.
    for _ in 0..300 {
        points = bucket_points(&out, "eta", start);
        if value(&points, "mae", &eta_stream).is_some()
            && value(&bucket_points(&out, "price", start), "mae", &rest_price).is_some()
            && value(&bucket_points(&out, "churn", start), "accuracy", &[]).is_some()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    child.stop();

    // Traffic: one stream of the served version, REST calls without one included.
    assert!(!points.is_empty(), "no file for eta's bucket {start}");
    // Stream points (those with a signature; exchange counts are per model) carry it.
    for p in points.iter().filter(|p| p["properties"].get("signature").is_some()) {
        assert_eq!(p["properties"]["version"], version.as_str(), "a point of eta without its served version: {p}");
    }
    assert_eq!(value(&points, "buffer_count", &eta_stream), Some(4.0));
    assert_eq!(value(&points, "prediction_value", &[("stat", "mean")]), Some(6.0));
    assert_eq!(value(&points, "prediction_value", &[("stat", "min")]), Some(3.0));
    assert_eq!(value(&points, "prediction_value", &[("stat", "max")]), Some(9.0));
    assert_eq!(value(&points, "prediction_missing_count", &[]), Some(0.0));
    assert_eq!(value(&points, "prediction_count", &[]), None, "a regression scored as a classifier");
    assert_eq!(value(&points, "max_prediction_proba", &[]), None, "a regression scored as a classifier");
    // Labels 2, 7, 4, 13 against predictions 3, 5, 7, 9, computed by hand.
    assert_eq!(value(&points, "mae", &eta_stream), Some(2.5));
    assert_eq!(value(&points, "rmse", &eta_stream), Some(7.5f64.sqrt()));
    assert_eq!(value(&points, "error_mean", &eta_stream), Some(-0.5));
    // SST = Σy² − (Σy)²/n = 238 − 169 = 69; SSE = 1 + 4 + 9 + 16 = 30.
    assert_eq!(value(&points, "r2", &eta_stream), Some(1.0 - 30.0 / 69.0));
    let mape = (0.5 + 2.0 / 7.0 + 0.75 + 4.0 / 13.0) / 4.0;
    assert!((value(&points, "mape", &eta_stream).unwrap() - mape).abs() < 1e-12);
    assert_eq!(value(&points, "mape_excluded_count", &eta_stream), Some(0.0));
    assert_eq!(value(&points, "labeled_fraction", &eta_stream), Some(1.0));
    assert_eq!(value(&points, "label_value", &[("stat", "mean")]), Some(6.5));
    assert_eq!(value(&points, "error_value", &[("stat", "mean")]), Some(2.5));
    assert_eq!(value(&points, "accuracy", &[]), None, "a regression scored as a classifier");

    // price: REST :regress attributed to the served version; gRPC Regress's recorded
    // response names its own version, if any. Labels 100 and 0 against 101.5, 180.25.
    let price = bucket_points(&out, "price", start);
    assert_eq!(value(&price, "prediction_value", &[("version", version.as_str()), ("stat", "max")]), Some(180.25));
    assert_eq!(value(&price, "mae", &rest_price), Some((1.5 + 180.25) / 2.0));
    assert_eq!(value(&price, "mape", &rest_price), Some(0.015));
    assert_eq!(value(&price, "mape_excluded_count", &rest_price), Some(1.0));
    assert_eq!(value(&price, "r2", &rest_price), Some(1.0 - (1.5f64.powi(2) + 180.25f64.powi(2)) / 5000.0));

    // churn: a classifier keeps its class metrics and gets no regression ones.
    let churn = bucket_points(&out, "churn", start);
    assert_eq!(value(&churn, "prediction_count", &[("class_name", "class_1")]), Some(1.0));
    assert_eq!(value(&churn, "accuracy", &[]), Some(1.0));
    for what in ["prediction_value", "mae", "rmse", "r2", "label_value"] {
        assert_eq!(value(&churn, what, &[]), None, "a classifier scored as a regression: {what}");
    }
    assert!(churn
        .iter()
        .filter(|p| p["properties"].get("signature").is_some())
        .all(|p| p["properties"]["version"] == version.as_str()));
}
