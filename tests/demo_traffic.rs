//! The demo's traffic generator sends both protocols with request ids, drifts half-way
//! in what it sends, and its label poster posts `{"id", "label"}` arrays as documented.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use mltap::demo::grpc::GrpcModelServer;
use mltap::demo::labels::{self, LabelPolicy, LabelStats, PendingLabel};
use mltap::demo::model::demo_models;
use mltap::demo::rest::RestModelServer;
use mltap::demo::serving::Registry;
use mltap::demo::tensor::{column_from_tensor, Column};
use mltap::demo::traffic::{self, Targets, TrafficPlan, TrafficStats};
use mltap::tfserving::proto::serving::prediction_service_server::{PredictionService, PredictionServiceServer};
use mltap::tfserving::proto::serving::*;
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// One churn row as the recorder saw it arrive.
#[derive(Debug, Clone)]
struct SeenRow {
    support_calls: f64,
    monthly_charges: f64,
    country: String,
}

/// One request as the recorder saw it.
#[derive(Debug, Clone)]
struct Seen {
    grpc: bool,
    request_id: Option<String>,
    /// Rows of the request, whatever the model.
    rows: usize,
    churn_rows: Vec<SeenRow>,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// A gRPC PredictionService that records each Predict and answers with the real
/// demo model server.
struct RecordingGrpc {
    log: Log,
    inner: GrpcModelServer,
}

#[tonic::async_trait]
impl PredictionService for RecordingGrpc {
    async fn predict(&self, request: Request<PredictRequest>) -> Result<Response<PredictResponse>, Status> {
        let request_id = request.metadata().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_string);
        let body = request.get_ref();
        let mut churn_rows = Vec::new();
        if body.model_spec.as_ref().map(|s| s.name.as_str()) == Some("churn") {
            let column = |name: &str| column_from_tensor(name, &body.inputs[name]).unwrap();
            let (Column::Numeric(calls), Column::Numeric(charges), Column::Strings(countries)) =
                (column("support_calls"), column("monthly_charges"), column("country"))
            else {
                panic!("unexpected dtypes")
            };
            for ((support_calls, monthly_charges), country) in calls.into_iter().zip(charges).zip(countries) {
                churn_rows.push(SeenRow { support_calls, monthly_charges, country });
            }
        }
        let rows = body.inputs.values().next().map(|t| column_from_tensor("any", t).unwrap().len()).unwrap_or(0);
        self.log.lock().unwrap().push(Seen { grpc: true, request_id, rows, churn_rows });
        self.inner.predict(request).await
    }
    async fn classify(&self, r: Request<ClassificationRequest>) -> Result<Response<ClassificationResponse>, Status> {
        self.inner.classify(r).await
    }
    async fn regress(&self, r: Request<RegressionRequest>) -> Result<Response<RegressionResponse>, Status> {
        self.inner.regress(r).await
    }
    async fn multi_inference(
        &self,
        r: Request<MultiInferenceRequest>,
    ) -> Result<Response<MultiInferenceResponse>, Status> {
        self.inner.multi_inference(r).await
    }
    async fn get_model_metadata(
        &self,
        r: Request<GetModelMetadataRequest>,
    ) -> Result<Response<GetModelMetadataResponse>, Status> {
        self.inner.get_model_metadata(r).await
    }
}

async fn start_recorders(log: Log, stop: CancellationToken) -> Targets {
    let registry = Arc::new(Registry::new(demo_models()));
    let grpc_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rest_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let targets = Targets {
        grpc: format!("http://{}", grpc_listener.local_addr().unwrap()),
        rest: format!("http://{}", rest_listener.local_addr().unwrap()),
    };
    let recorder = RecordingGrpc { log: log.clone(), inner: GrpcModelServer { registry: registry.clone() } };
    let grpc_stop = stop.clone();
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .serve_with_incoming_shutdown(
                PredictionServiceServer::new(recorder),
                tonic::transport::server::TcpIncoming::from(grpc_listener),
                grpc_stop.cancelled_owned(),
            )
            .await
            .unwrap();
    });
    let rest = RestModelServer { registry };
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                _ = stop.cancelled() => break,
                accepted = rest_listener.accept() => accepted.unwrap(),
            };
            let (rest, log) = (rest.clone(), log.clone());
            tokio::spawn(async move {
                let handler = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let (rest, log) = (rest.clone(), log.clone());
                    async move {
                        let (parts, body) = request.into_parts();
                        let bytes = body.collect().await.unwrap().to_bytes();
                        let request_id =
                            parts.headers.get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_string);
                        let mut churn_rows = Vec::new();
                        let body: Value = serde_json::from_slice(&bytes).unwrap();
                        let rows = body["instances"].as_array().unwrap().len();
                        if parts.uri.path() == "/v1/models/churn:predict" {
                            for instance in body["instances"].as_array().unwrap() {
                                churn_rows.push(SeenRow {
                                    support_calls: instance["support_calls"].as_f64().unwrap(),
                                    monthly_charges: instance["monthly_charges"].as_f64().unwrap(),
                                    country: instance["country"].as_str().unwrap().to_string(),
                                });
                            }
                        }
                        log.lock().unwrap().push(Seen { grpc: false, request_id, rows, churn_rows });
                        let answer = rest.handle(http::Request::from_parts(parts, Full::new(bytes))).await;
                        Ok::<_, Infallible>(answer)
                    }
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), handler).await;
            });
        }
    });
    targets
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0.0), |(s, n), v| (s + v, n + 1.0));
    sum / n
}

#[tokio::test]
async fn traffic_drifts_half_way_in_the_inputs_it_sends_over_both_protocols() {
    let log: Log = Arc::default();
    let stop = CancellationToken::new();
    let targets = start_recorders(log.clone(), stop.clone()).await;
    let stats = Arc::new(TrafficStats::default());
    let (label_sender, mut label_receiver) = mpsc::unbounded_channel();
    let traffic_stop = CancellationToken::new();
    let plan = TrafficPlan { requests_per_second: 100.0, drift_at: Duration::from_millis(1500), seed: 42 };
    let run = tokio::spawn(traffic::run(targets, plan, stats.clone(), Some(label_sender), traffic_stop.clone()));
    // Stop after the drift point has been passed and enough drifted traffic was sent.
    while stats.drifted.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rows_at_drift = stats.rows.load(Ordering::Relaxed);
    while stats.rows.load(Ordering::Relaxed) < rows_at_drift * 2 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    traffic_stop.cancel();
    run.await.unwrap();
    stop.cancel();

    let seen = log.lock().unwrap().clone();
    assert_eq!(stats.requests_failed.load(Ordering::Relaxed), 0);
    assert_eq!(stats.requests_ok.load(Ordering::Relaxed) as usize, seen.len());
    assert!(seen.iter().any(|s| s.grpc) && seen.iter().any(|s| !s.grpc), "both protocols are used");
    assert!(seen.iter().all(|s| s.request_id.is_some()), "every request carries x-request-id");

    // Compare the first and the last third of the churn rows, in arrival order: the
    // drift point lies between them.
    let rows: Vec<SeenRow> = seen.iter().flat_map(|s| s.churn_rows.clone()).collect();
    assert!(rows.len() > 150, "{} churn rows", rows.len());
    let third = rows.len() / 3;
    let (before, after) = (&rows[..third], &rows[rows.len() - third..]);
    let calls = (mean(before.iter().map(|r| r.support_calls)), mean(after.iter().map(|r| r.support_calls)));
    let charges = (mean(before.iter().map(|r| r.monthly_charges)), mean(after.iter().map(|r| r.monthly_charges)));
    let emerging =
        |rows: &[SeenRow]| mean(rows.iter().map(|r| f64::from(u8::from(r.country == "br" || r.country == "in"))));
    assert!(calls.1 > calls.0 + 1.0, "support_calls mean before/after: {calls:?}");
    assert!(charges.1 > charges.0 + 12.0, "monthly_charges mean before/after: {charges:?}");
    assert!(emerging(after) > emerging(before) + 0.2, "share of br+in before/after");

    // Every label id names a request that was sent, suffixed by row for batches.
    let request_ids: BTreeSet<String> = seen.iter().filter_map(|s| s.request_id.clone()).collect();
    let mut labels = Vec::new();
    while let Ok(label) = label_receiver.try_recv() {
        labels.push(label);
    }
    assert_eq!(labels.len() as u64, stats.rows.load(Ordering::Relaxed));
    let rows_per_request: HashMap<&str, usize> =
        seen.iter().map(|s| (s.request_id.as_deref().unwrap(), s.rows)).collect();
    for label in &labels {
        let base = label.id.split(':').next().unwrap();
        assert!(request_ids.contains(base), "{} names no request", label.id);
        if rows_per_request[base] == 1 {
            assert_eq!(label.id, base, "a single-row request has no row suffix");
        }
        // A classifier's row has a class in range, a regression's (no classes) a value.
        match label.value {
            Some(value) => assert!(label.classes == 0 && value.is_finite(), "{label:?}"),
            None => assert!(label.true_class < label.classes, "{label:?}"),
        }
    }
    assert!(labels.iter().any(|l| l.value.is_some()), "the regression model's rows get numeric labels");
    assert!(labels.iter().any(|l| l.id.ends_with(":1")), "batches of several rows are suffixed per row");
}

/// A loopback `/v1/labels` that records bodies and answers like the endpoint.
async fn label_endpoint(status: u16) -> (String, Arc<Mutex<Vec<Value>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/labels", listener.local_addr().unwrap());
    let bodies: Arc<Mutex<Vec<Value>>> = Arc::default();
    let recorded = bodies.clone();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let bodies = bodies.clone();
            tokio::spawn(async move {
                let handler = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let bodies = bodies.clone();
                    async move {
                        assert_eq!((request.method().as_str(), request.uri().path()), ("POST", "/v1/labels"));
                        let bytes = request.into_body().collect().await.unwrap().to_bytes();
                        let body: Value = serde_json::from_slice(&bytes).unwrap();
                        let n = body.as_array().map(Vec::len).unwrap_or(0);
                        bodies.lock().unwrap().push(body);
                        let answer = json!({ "accepted": n - 1, "unmatched": 1, "rejected": [] }).to_string();
                        let response = http::Response::builder().status(status).body(Full::new(Bytes::from(answer)));
                        Ok::<_, Infallible>(response.unwrap())
                    }
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), handler).await;
            });
        }
    });
    (url, recorded)
}

fn quick(wrong: f64, missing: f64) -> LabelPolicy {
    LabelPolicy {
        min_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(300),
        wrong_fraction: wrong,
        missing_fraction: missing,
        seed: 5,
    }
}

async fn post_labels(url: String, policy: LabelPolicy, labels: &[PendingLabel]) -> Arc<LabelStats> {
    let stats = Arc::new(LabelStats::default());
    let (sender, receiver) = mpsc::unbounded_channel();
    for label in labels {
        sender.send(label.clone()).unwrap();
    }
    drop(sender);
    labels::run(url, policy, receiver, stats.clone(), CancellationToken::new()).await;
    stats
}

fn pending(n: usize) -> Vec<PendingLabel> {
    (0..n)
        .map(|i| PendingLabel { id: format!("req-{}:{}", i / 4, i % 4), true_class: i % 3, classes: 3, value: None })
        .collect()
}

#[tokio::test]
async fn labels_are_posted_as_a_json_array_of_id_and_label_and_the_answer_is_counted() {
    let (url, bodies) = label_endpoint(200).await;
    let sent = pending(40);
    let stats = post_labels(url, quick(0.0, 0.0), &sent).await;
    let bodies = bodies.lock().unwrap().clone();
    let mut posted = HashMap::new();
    for body in &bodies {
        for entry in body.as_array().expect("the body is a JSON array") {
            let object = entry.as_object().unwrap();
            assert_eq!(object.keys().collect::<Vec<_>>(), vec!["id", "label"], "{entry}");
            posted.insert(entry["id"].as_str().unwrap().to_string(), entry["label"].as_u64().unwrap() as usize);
        }
    }
    let expected: HashMap<String, usize> = sent.iter().map(|l| (l.id.clone(), l.true_class)).collect();
    assert_eq!(posted, expected);
    assert_eq!(stats.posted.load(Ordering::Relaxed), 40);
    let requests = bodies.len() as u64;
    assert_eq!(stats.accepted.load(Ordering::Relaxed), 40 - requests);
    assert_eq!(stats.unmatched.load(Ordering::Relaxed), requests);
}

#[tokio::test]
async fn wrong_labels_name_another_class_and_withheld_ones_are_never_posted() {
    let (url, bodies) = label_endpoint(200).await;
    let sent = pending(30);
    let stats = post_labels(url.clone(), quick(1.0, 0.0), &sent).await;
    assert_eq!(stats.wrong.load(Ordering::Relaxed), 30);
    let truth: HashMap<String, u64> = sent.iter().map(|l| (l.id.clone(), l.true_class as u64)).collect();
    for body in bodies.lock().unwrap().iter() {
        for entry in body.as_array().unwrap() {
            let label = entry["label"].as_u64().unwrap();
            assert_ne!(label, truth[entry["id"].as_str().unwrap()]);
            assert!(label < 3);
        }
    }
    bodies.lock().unwrap().clear();
    let stats = post_labels(url, quick(0.0, 1.0), &sent).await;
    assert_eq!(stats.withheld.load(Ordering::Relaxed), 30);
    assert!(bodies.lock().unwrap().is_empty());
}

#[tokio::test]
async fn an_absent_label_endpoint_is_tolerated_and_counted() {
    let (url, _) = label_endpoint(404).await;
    let stats = post_labels(url, quick(0.0, 0.0), &pending(12)).await;
    assert_eq!(stats.endpoint_missing.load(Ordering::Relaxed), 12);
    assert_eq!(stats.posted.load(Ordering::Relaxed), 0);
}

#[test]
fn the_regression_scenario_drifts_so_that_its_error_grows() {
    let mut generator = traffic::Generator::new(traffic::demo_scenarios(), 7);
    let eta = generator.scenarios.iter().position(|s| s.model.is_regression()).expect("a regression scenario");
    let mut mae = |drifted: bool| {
        let (mut sum, mut n) = (0.0, 0);
        while n < 2000 {
            let batch = generator.next_batch(drifted);
            if batch.scenario != eta {
                continue;
            }
            let model = &generator.scenarios[eta].model;
            for (row, truth) in batch.rows.iter().zip(&batch.true_values) {
                sum += (model.probabilities(row)[0] - truth).abs();
                n += 1;
            }
        }
        sum / n as f64
    };
    let (before, after) = (mae(false), mae(true));
    // Before the drift the served model is the truth up to its noise (σ = 3: MAE ≈ 2.4).
    assert!(before < 3.0, "MAE before the drift: {before}");
    assert!(after > 2.0 * before, "MAE before {before}, after {after}");
}
