//! End to end through the real binary: `mltap serve` with a 1 s bucket in front of a
//! small TF Serving stand-in on loopback, fed with the recorded fixtures (the 64×16
//! gRPC batch, the REST row-format iris request), then its Anodot files are checked:
//! valid Anodot 2.0, counts per class, feature means and medians, estimated accuracy,
//! drift 0 for unchanged traffic and large for shifted traffic.

use bytes::{Buf, Bytes};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::net::TcpListener;

mod support;

type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// The iris stand-in: softmax regression over 4 inputs, 3 classes.
const W: [[f64; 4]; 3] = [[1.0, -0.5, 0.2, 0.1], [-0.3, 0.8, -0.1, 0.4], [0.2, 0.1, 0.9, -0.6]];

fn softmax_row(x: &[f64]) -> Vec<f64> {
    let logits: Vec<f64> = W.iter().map(|w| w.iter().zip(x).map(|(a, b)| a * b).sum()).collect();
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exp: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.iter().map(|e| e / sum).collect()
}

fn full(status: u16, content_type: &str, body: impl Into<Bytes>) -> Response<BoxBody> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()).boxed_unsync())
        .unwrap()
}

/// REST: answers `:predict` of the iris model in TF Serving's row format, computing
/// the answer, so that shifted inputs get real predictions; other paths 404.
async fn rest(request: Request<Incoming>) -> Result<Response<BoxBody>, Infallible> {
    let path = request.uri().path().to_string();
    let body = request.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    if path != "/v1/models/iris:predict" {
        return Ok(full(404, "application/json", r#"{"error": "not found"}"#));
    }
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return Ok(full(400, "application/json", r#"{"error": "bad json"}"#));
    };
    let predictions: Vec<Vec<f64>> = json["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| softmax_row(&row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect::<Vec<_>>()))
        .collect();
    Ok(full(200, "application/json", serde_json::json!({ "predictions": predictions }).to_string()))
}

/// gRPC: answers Predict with the recorded 64×16 batch response; anything else is
/// UNIMPLEMENTED (trailers-only), as a server without that service would answer.
async fn grpc(request: Request<Incoming>, predict: Bytes) -> Result<Response<BoxBody>, Infallible> {
    let path = request.uri().path().to_string();
    let _ = request.into_body().collect().await;
    let mut trailers = http::HeaderMap::new();
    let mut frames: Vec<Result<Frame<Bytes>, Infallible>> = Vec::new();
    if path == "/tensorflow.serving.PredictionService/Predict" {
        let mut framed = vec![0u8];
        framed.extend_from_slice(&(predict.len() as u32).to_be_bytes());
        framed.extend_from_slice(&predict);
        frames.push(Ok(Frame::data(Bytes::from(framed))));
        trailers.insert("grpc-status", "0".parse().unwrap());
    } else {
        trailers.insert("grpc-status", "12".parse().unwrap());
    }
    frames.push(Ok(Frame::trailers(trailers)));
    let body = StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync();
    Ok(Response::builder().status(200).header("content-type", "application/grpc").body(body).unwrap())
}

async fn serve_fake() -> (SocketAddr, SocketAddr) {
    let predict: Bytes = std::fs::read(support::fixtures_dir().join("grpc/batch64x16.response.pb")).unwrap().into();
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
            let predict = predict.clone();
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(
                    TokioIo::new(stream),
                    hyper::service::service_fn(move |r| grpc(r, predict.clone())),
                ),
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

fn files(out: &Path) -> BTreeMap<String, Vec<(i64, Vec<serde_json::Value>)>> {
    let mut by_model = BTreeMap::new();
    for model in std::fs::read_dir(out.join("anodot")).unwrap() {
        let model = model.unwrap();
        let mut buckets = Vec::new();
        for file in std::fs::read_dir(model.path()).unwrap() {
            let path = file.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let points: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
            let ts = points[0]["timestamp"].as_i64().unwrap();
            for p in &points {
                let props = p["properties"].as_object().unwrap();
                assert!(props.len() <= 20 && matches!(props["target_type"].as_str(), Some("gauge" | "counter")));
                assert!(props.values().all(|v| !v.as_str().unwrap().contains(['.', '=', ' '])));
                assert_eq!(p["timestamp"].as_i64(), Some(ts));
                assert!(p["value"].as_f64().unwrap().is_finite());
            }
            buckets.push((ts, points));
        }
        buckets.sort_by_key(|(ts, _)| *ts);
        by_model.insert(model.file_name().into_string().unwrap(), buckets);
    }
    by_model
}

fn get(points: &[serde_json::Value], what: &str, dims: &[(&str, &str)]) -> Option<f64> {
    points
        .iter()
        .find(|p| p["properties"]["what"] == what && dims.iter().all(|(k, v)| p["properties"][*k] == *v))
        .and_then(|p| p["value"].as_f64())
}

fn total(buckets: &[(i64, Vec<serde_json::Value>)], what: &str, dims: &[(&str, &str)]) -> f64 {
    buckets
        .iter()
        .flat_map(|(_, points)| points)
        .filter(|p| p["properties"]["what"] == what && dims.iter().all(|(k, v)| p["properties"][*k] == *v))
        .map(|p| p["value"].as_f64().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixtures_through_the_proxy_become_the_documented_metrics() {
    let (rest_upstream, grpc_upstream) = serve_fake().await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let config = dir.path().join("mltap.toml");
    std::fs::write(&config, "[monitor]\ngrace_seconds = 1\nreference_buckets = 2\n").unwrap();
    let (grpc_port, rest_port, admin_port) = (free_port(), free_port(), free_port());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mltap"))
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--grpc-listen", &format!("127.0.0.1:{grpc_port}")])
        .args(["--rest-listen", &format!("127.0.0.1:{rest_port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
        .args(["--grpc-upstream", &format!("http://{grpc_upstream}")])
        .args(["--rest-upstream", &format!("http://{rest_upstream}")])
        .args(["--bucket", "1s", "--output-dir"])
        .arg(&out)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    for port in [grpc_port, rest_port, admin_port] {
        wait_port(port).await;
    }

    let rest_client = reqwest::Client::new();
    let grpc_client =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).http2_only(true).build_http::<Full<Bytes>>();
    let iris_request: serde_json::Value = serde_json::from_slice(
        &std::fs::read(support::fixtures_dir().join("rest/row_single_input.request.json")).unwrap(),
    )
    .unwrap();
    let shifted = {
        let mut r = iris_request.clone();
        for row in r["instances"].as_array_mut().unwrap() {
            for v in row.as_array_mut().unwrap() {
                *v = serde_json::json!(v.as_f64().unwrap() + 5.0);
            }
        }
        r
    };
    let batch = std::fs::read(support::fixtures_dir().join("grpc/batch64x16.request.pb")).unwrap();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(batch.len() as u32).to_be_bytes());
    framed.extend_from_slice(&batch);
    let framed = Bytes::from(framed);

    let rest_url = format!("http://127.0.0.1:{rest_port}/v1/models/iris:predict");
    let send_iris = |body: serde_json::Value| {
        let (client, url) = (rest_client.clone(), rest_url.clone());
        async move {
            let r = client.post(url).body(body.to_string()).send().await.unwrap();
            assert_eq!(r.status(), 200);
        }
    };
    let mut grpc_calls = 0;
    // Unchanged traffic long enough for the reference window (2 buckets after the
    // incomplete first one) and several buckets after it, then a quiet bucket, then
    // shifted traffic.
    for i in 0..120 {
        send_iris(iris_request.clone()).await;
        if i % 6 == 0 {
            let request =
                Request::post(format!("http://127.0.0.1:{grpc_port}/tensorflow.serving.PredictionService/Predict"))
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(Full::new(framed.clone()))
                    .unwrap();
            let response = grpc_client.request(request).await.unwrap();
            let mut body = response.into_body().collect().await.unwrap().to_bytes();
            assert!(body.remaining() > 5);
            body.advance(5);
            grpc_calls += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(2200)).await;
    for _ in 0..50 {
        send_iris(shifted.clone()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // SIGTERM: the worker drains the queue and flushes the open buckets.
    let status = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let mut exited = false;
    for _ in 0..300 {
        if child.try_wait().unwrap().is_some() {
            exited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !exited {
        let _ = child.kill();
        panic!("mltap did not exit after SIGTERM");
    }

    let models = files(&out);
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(support::fixtures_dir().join("grpc/batch64x16.expected.json")).unwrap())
            .unwrap();

    // The 64×16 batch: counts per class, feature means and medians, estimated accuracy.
    let bench = &models["bench"];
    let probs: Vec<f64> = expected["outputs"]["probabilities"]["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let rows: Vec<&[f64]> = probs.chunks(5).collect();
    let argmax = |r: &[f64]| (0..5).fold(0, |b, i| if r[i] > r[b] { i } else { b });
    assert_eq!(total(bench, "buffer_count", &[]), 64.0 * grpc_calls as f64);
    for class in 0..5 {
        let per_batch = rows.iter().filter(|r| argmax(r) == class).count() as f64;
        let name = format!("class_{class}");
        assert_eq!(total(bench, "prediction_count", &[("class_name", &name)]), per_batch * grpc_calls as f64, "{name}");
    }
    let x: Vec<f64> =
        expected["inputs"]["x"]["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    let mut x0: Vec<f64> = x.chunks(16).map(|r| r[0]).collect();
    let mean0 = x0.iter().sum::<f64>() / 64.0;
    x0.sort_by(f64::total_cmp);
    let median0 = x0[31];
    let accuracy = rows.iter().map(|r| r[argmax(r)]).sum::<f64>() / 64.0;
    let with_data: Vec<&Vec<serde_json::Value>> =
        bench.iter().map(|(_, p)| p).filter(|p| get(p, "buffer_count", &[]).unwrap_or(0.0) > 0.0).collect();
    assert!(!with_data.is_empty());
    for points in with_data {
        let mean = get(points, "feature_value", &[("feat_name", "x_0"), ("stat", "mean")]).unwrap();
        assert!((mean - mean0).abs() < 1e-9, "mean {mean} vs {mean0}");
        let median = get(points, "feature_value", &[("feat_name", "x_0"), ("stat", "median")]).unwrap();
        assert!((median - median0).abs() <= 0.01 * median0.abs() + 1e-9, "median {median} vs {median0}");
        let estimated = get(points, "estimated_accuracy", &[]).unwrap();
        assert!((estimated - accuracy).abs() < 1e-9, "estimated accuracy {estimated} vs {accuracy}");
    }

    // Iris over REST: drift 0 for unchanged buckets, large for shifted ones.
    let iris = &models["iris"];
    let instances = iris_request["instances"].as_array().unwrap();
    let unchanged_mean = instances.iter().map(|r| r[0].as_f64().unwrap()).sum::<f64>() / instances.len() as f64;
    let (mut unchanged, mut drifted) = (0, 0);
    for (_, points) in iris {
        let Some(psi) = get(points, "feature_drift", &[("feat_name", "input_0"), ("method", "psi")]) else {
            continue;
        };
        let mean = get(points, "feature_value", &[("feat_name", "input_0"), ("stat", "mean")]).unwrap();
        if (mean - unchanged_mean).abs() < 1e-4 {
            unchanged += 1;
            assert_eq!(psi, 0.0);
            assert_eq!(get(points, "feature_drift", &[("feat_name", "input_0"), ("method", "js")]), Some(0.0));
            assert_eq!(get(points, "prediction_drift", &[("method", "psi")]), Some(0.0));
        } else if (mean - unchanged_mean - 5.0).abs() < 1e-4 {
            drifted += 1;
            assert!(psi > 1.0, "psi {psi}");
            assert!(get(points, "feature_drift", &[("feat_name", "input_0"), ("method", "js")]).unwrap() > 0.5);
        }
    }
    assert!(unchanged >= 1 && drifted >= 1, "unchanged buckets {unchanged}, shifted buckets {drifted}");
    assert!(out.join("reference/iris").is_dir());
    assert!(total(&models["__mltap__"], "capture_dropped", &[]) == 0.0);
}
