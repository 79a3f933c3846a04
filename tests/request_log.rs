//! The request log keeps what real clients sent and received: PredictionLog TFRecords
//! read back with their CRCs checked and compared with the gRPC and REST calls made
//! through mltap to the demo's TF-Serving-compatible model server; sampling keeps a
//! binomially plausible share with exact counts; the access log has a line per call.

mod support;

use bytes::Bytes;
use mltap::demo::model::{demo_models, LinearModel, Row};
use mltap::demo::server::ModelServer;
use mltap::demo::traffic::{predict_request, rest_body};
use mltap::request_log::tfrecord;
use mltap::tfserving::proto::serving::prediction_log::LogType;
use mltap::tfserving::proto::serving::prediction_service_client::PredictionServiceClient;
use mltap::tfserving::proto::serving::{
    input, model_spec::VersionChoice, ClassificationRequest, ExampleList, Input, ModelSpec, PredictionLog,
};
use mltap::tfserving::proto::{DataType, Example, Feature, Features};
use prost::Message;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::mltap::{channel, config, Mltap};

fn rows() -> Vec<Row> {
    vec![
        Row { numeric: vec![30.0, 40.0, 2.0, 110.0, 6.0, 5.0, 4.0, 1.0], category: "br".into() },
        Row { numeric: vec![55.0, 90.0, 80.0, 50.0, 0.0, 30.0, 0.0, 4.75], category: "de".into() },
    ]
}

fn fraud_rows() -> Vec<Row> {
    vec![Row { numeric: vec![120.0, 3.0, 800.0, 12.0], category: "web".into() }]
}

async fn model_server() -> ModelServer {
    ModelServer::bind("127.0.0.1:0".parse().unwrap(), "127.0.0.1:0".parse().unwrap(), demo_models()).await.unwrap()
}

/// Every record of every file with `suffix` under `dir`, each file's CRCs checked.
fn raw_records_in(dir: &Path, suffix: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for path in files_in(dir, suffix) {
        let bytes = std::fs::read(&path).unwrap();
        let records = tfrecord::read(&bytes);
        assert_eq!(records.tail, tfrecord::Tail::Clean, "{} reads whole", path.display());
        out.extend(records.records.iter().map(|r| r.to_vec()));
    }
    out
}

fn records_in(dir: &Path, suffix: &str) -> Vec<PredictionLog> {
    raw_records_in(dir, suffix).iter().map(|r| PredictionLog::decode(&r[..]).expect("a PredictionLog")).collect()
}

fn files_in(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(models) = std::fs::read_dir(dir) else { return out };
    for model in models.flatten() {
        for entry in std::fs::read_dir(model.path()).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().ends_with(suffix) {
                out.push(entry.path());
            }
        }
    }
    out.sort();
    out
}

/// The value of `request_log_exchanges_total{outcome=...}` on /metrics.
async fn outcome(mltap: &Mltap, name: &str) -> u64 {
    let text = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{}/metrics", mltap.admin_url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let prefix = format!("mltap_request_log_exchanges_total{{outcome=\"{name}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("{prefix} missing from /metrics:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

async fn wait_for_logged(mltap: &Mltap, expected: u64) {
    for _ in 0..100 {
        if outcome(mltap, "logged").await >= expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} records logged, {expected} expected", outcome(mltap, "logged").await);
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_rest_calls_are_logged_as_they_were_exchanged_and_read_back_with_crcs() {
    let server = model_server().await;
    let mut config = config(&format!("http://{}", server.grpc_addr), &format!("http://{}", server.rest_addr));
    config.request_log.sampling_rate = 1.0;
    config.request_log.flush_interval = Duration::from_millis(200);
    let access_dir = tempfile::tempdir().unwrap();
    let access_path = access_dir.path().join("access.log");
    config.access_log.path = Some(access_path.display().to_string());
    // Outside the output dir, which the test instance removes when it stops.
    let requests_dir = tempfile::tempdir().unwrap();
    config.request_log.dir = Some(requests_dir.path().to_path_buf());
    let requests_dir = requests_dir.path();
    let mltap = Mltap::start(config).await;
    let churn = LinearModel::churn();

    // gRPC Predict, byte for byte: the raw request and the raw response are in the log.
    let sent = Bytes::from(predict_request(&churn, &rows()).encode_to_vec());
    let grpc = channel(mltap.grpc_url()).await;
    let received = support::raw_codec::call_raw(
        &grpc,
        "/tensorflow.serving.PredictionService/Predict",
        sent.clone(),
        &[("x-request-id", "grpc-1")],
    )
    .await
    .expect("Predict through mltap")
    .into_inner();

    // gRPC Classify with the typed client.
    let example = |row: &Row| {
        use mltap::tfserving::proto::tensorflow::{feature::Kind, BytesList, FloatList};
        let mut feature: std::collections::HashMap<String, Feature> = churn
            .numeric
            .iter()
            .zip(&row.numeric)
            .map(|(input, value)| {
                (
                    input.name.to_string(),
                    Feature { kind: Some(Kind::FloatList(FloatList { value: vec![*value as f32] })) },
                )
            })
            .collect();
        let country =
            Feature { kind: Some(Kind::BytesList(BytesList { value: vec![row.category.clone().into_bytes()] })) };
        feature.insert(churn.categorical.to_string(), country);
        Example { features: Some(Features { feature }) }
    };
    let classify = ClassificationRequest {
        model_spec: Some(ModelSpec {
            name: "churn".into(),
            version_choice: None,
            signature_name: "classification".into(),
        }),
        input: Some(Input {
            kind: Some(input::Kind::ExampleList(ExampleList { examples: rows().iter().map(example).collect() })),
        }),
    };
    let classified = PredictionServiceClient::new(grpc.clone()).classify(classify.clone()).await.unwrap().into_inner();

    // REST predict in the row format, and a metadata call that is not logged as a request.
    let body = rest_body(&churn, &rows());
    let answer: Value = client()
        .post(format!("{}/v1/models/churn:predict", mltap.rest_url()))
        .header("x-request-id", "rest-1")
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let metadata = client().get(format!("{}/v1/models/churn/metadata", mltap.rest_url())).send().await.unwrap();
    assert_eq!(metadata.status(), 200);

    // Readable while mltap runs: the open file holds the records once flushed.
    wait_for_logged(&mltap, 3).await;
    assert_eq!(records_in(requests_dir, ".tfrecord.open").len(), 3, "flushed within a couple of seconds");
    assert_eq!(outcome(&mltap, "not_sampled").await, 0);
    mltap.stop().await;

    assert!(files_in(requests_dir, ".tfrecord.open").is_empty(), "closed files take their final name");
    let logs = records_in(requests_dir, ".tfrecord");
    assert_eq!(logs.len(), 3);

    let (mut predict_grpc, mut predict_rest, mut classify_log) = (None, None, None);
    for log in &logs {
        let metadata = log.log_metadata.clone().unwrap();
        assert_eq!(metadata.sampling_config.unwrap().sampling_rate, 1.0);
        let spec = metadata.model_spec.unwrap();
        assert_eq!(spec.name, "churn");
        match log.log_type.clone().unwrap() {
            LogType::PredictLog(p)
                if p.request.as_ref().unwrap().model_spec.as_ref().unwrap().version_choice.is_some() =>
            {
                assert_eq!(spec.version_choice, Some(VersionChoice::Version(1)));
                predict_grpc = Some(p)
            }
            LogType::PredictLog(p) => predict_rest = Some(p),
            LogType::ClassifyLog(c) => classify_log = Some(c),
            other => panic!("unexpected log {other:?}"),
        }
    }
    // The gRPC messages are embedded unchanged: the record holds the very bytes.
    let grpc_record = raw_records_in(requests_dir, ".tfrecord")
        .into_iter()
        .find(|r| r.windows(sent.len()).any(|w| w == &sent[..]))
        .expect("the sent request's bytes are in a record");
    assert!(grpc_record.windows(received.len()).any(|w| w == &received[..]), "and the received response's");
    let predict_grpc = predict_grpc.expect("a gRPC predict log");
    assert_eq!(predict_grpc.request.unwrap().encode_to_vec().len(), sent.len());

    let classify_log = classify_log.expect("a classify log");
    assert_eq!(classify_log.request.unwrap(), classify);
    assert_eq!(classify_log.response.unwrap(), classified);

    // REST: the JSON is the equivalent PredictRequest, typed from the signature.
    let predict_rest = predict_rest.expect("a REST predict log");
    let request = predict_rest.request.unwrap();
    assert_eq!(request.model_spec.unwrap().signature_name, "serving_default");
    let age = &request.inputs["age"];
    assert_eq!(age.dtype, DataType::DtFloat as i32, "the signature's dtype, not JSON's integer");
    assert_eq!(age.float_val, vec![30.0, 55.0]);
    assert_eq!(age.tensor_shape.as_ref().unwrap().dim.iter().map(|d| d.size).collect::<Vec<_>>(), vec![2]);
    assert_eq!(request.inputs["country"].string_val, vec![b"br".to_vec(), b"de".to_vec()]);
    assert_eq!(request.inputs.len(), 9);
    let outputs = predict_rest.response.unwrap().outputs;
    let predictions = answer["predictions"].as_array().unwrap();
    let expected: Vec<f32> = predictions
        .iter()
        .flat_map(|p| p["probabilities"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32))
        .collect();
    assert_eq!(outputs["probabilities"].float_val, expected);
    assert_eq!(outputs["probabilities"].dtype, DataType::DtFloat as i32);
    let class_ids: Vec<i64> = predictions.iter().map(|p| p["class_ids"].as_i64().unwrap()).collect();
    assert_eq!(outputs["class_ids"].int64_val, class_ids);

    // The access log: one line per call, inference or not.
    let text = std::fs::read_to_string(&access_path).unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4, "{text}");
    let grpc_line = lines.iter().find(|l| l["request_id"] == "grpc-1").expect("the gRPC Predict line");
    assert_eq!(grpc_line["protocol"], "grpc");
    assert_eq!(grpc_line["method"], "Predict");
    assert_eq!(grpc_line["model"], "churn");
    assert_eq!(grpc_line["version"], "1");
    assert_eq!(grpc_line["grpc_status"], 0);
    assert_eq!(grpc_line["request_bytes"], sent.len() as u64 + 5);
    assert!(grpc_line["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    let rest_line = lines.iter().find(|l| l["request_id"] == "rest-1").expect("the REST predict line");
    assert_eq!((rest_line["status"].as_u64(), rest_line["model"].as_str()), (Some(200), Some("churn")));
    assert_eq!(rest_line["request_bytes"], serde_json::to_vec(&body).unwrap().len() as u64);
    assert!(rest_line["upstream_latency_seconds"].as_f64().unwrap() > 0.0);
    let metadata_line = lines.iter().find(|l| l["method"] == "metadata").expect("the metadata line");
    assert_eq!(metadata_line["path"], "/v1/models/churn/metadata");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_keeps_a_binomially_plausible_share_with_exact_counts_and_per_model_rates() {
    let server = model_server().await;
    let mut config = config(&format!("http://{}", server.grpc_addr), &format!("http://{}", server.rest_addr));
    config.request_log.sampling_rate = 0.1;
    config.request_log.flush_interval = Duration::from_millis(200);
    config.models.entry("fraud".into()).or_default().request_log_sampling_rate = Some(1.0);
    // Outside the output dir, which the test instance removes when it stops.
    let requests_dir = tempfile::tempdir().unwrap();
    config.request_log.dir = Some(requests_dir.path().to_path_buf());
    let requests_dir = requests_dir.path();
    let mltap = Mltap::start(config).await;
    let (churn, fraud) = (LinearModel::churn(), LinearModel::fraud());
    const CHURN_CALLS: u64 = 2000;
    const FRAUD_CALLS: u64 = 50;

    let url = format!("{}/v1/models/churn:predict", mltap.rest_url());
    let body = rest_body(&churn, &rows()[..1]);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (url, body, client) = (url.clone(), body.clone(), client());
            tokio::spawn(async move {
                for _ in 0..CHURN_CALLS / 8 {
                    let response = client.post(&url).json(&body).send().await.unwrap();
                    assert_eq!(response.status(), 200);
                    response.bytes().await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let mut grpc = PredictionServiceClient::new(channel(mltap.grpc_url()).await);
    for _ in 0..FRAUD_CALLS {
        grpc.predict(predict_request(&fraud, &fraud_rows())).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut logged = 0;
    for _ in 0..100 {
        logged = outcome(&mltap, "logged").await;
        let not_sampled = outcome(&mltap, "not_sampled").await;
        if logged + not_sampled == CHURN_CALLS + FRAUD_CALLS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let not_sampled = outcome(&mltap, "not_sampled").await;
    assert_eq!(logged + not_sampled, CHURN_CALLS + FRAUD_CALLS, "every exchange has exactly one outcome");
    mltap.stop().await;

    let logs = records_in(requests_dir, ".tfrecord");
    assert_eq!(logs.len() as u64, logged);
    let of_model = |name: &str| {
        logs.iter().filter(|l| l.log_metadata.as_ref().unwrap().model_spec.as_ref().unwrap().name == name).count()
            as u64
    };
    assert_eq!(of_model("fraud"), FRAUD_CALLS, "the model's override logs all of its calls");
    let churn_logged = of_model("churn") as f64;
    // Binomial(2000, 0.1): mean 200, standard deviation 13.4; ±5 sd fails once in 3 million runs.
    assert!((133.0..=267.0).contains(&churn_logged), "{churn_logged} of {CHURN_CALLS} at 0.1");
    for log in logs.iter().filter(|l| l.log_metadata.as_ref().unwrap().model_spec.as_ref().unwrap().name == "churn") {
        assert_eq!(log.log_metadata.as_ref().unwrap().sampling_config.unwrap().sampling_rate, 0.1);
    }
    server.shutdown().await;
}

/// The access log's lines at `path` once `count` of them are there.
async fn access_lines(path: &Path, count: usize) -> Vec<Value> {
    for _ in 0..100 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        if lines.len() >= count {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("fewer than {count} access log lines in {}", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_inference_rest_calls_through_the_relay_have_their_client_and_byte_counts_in_the_access_log() {
    let server = model_server().await;
    // An http:// REST upstream: `mltap serve` relays REST (the default path).
    let mut config = config(&format!("http://{}", server.grpc_addr), &format!("http://{}", server.rest_addr));
    let access_dir = tempfile::tempdir().unwrap();
    let access_path = access_dir.path().join("access.log");
    config.access_log.path = Some(access_path.display().to_string());
    let mltap = Mltap::start(config).await;

    let metadata = client()
        .get(format!("{}/v1/models/churn/metadata", mltap.rest_url()))
        .header("x-request-id", "metadata-1")
        .send()
        .await
        .unwrap();
    assert_eq!(metadata.status(), 200);
    let metadata_body = metadata.bytes().await.unwrap();
    // A body sent to a path that is not an inference call is counted all the same.
    let sent = br#"{"not": "an inference call"}"#;
    let other = client()
        .post(format!("{}/v1/models/churn/versions/1/labels", mltap.rest_url()))
        .header("x-request-id", "other-1")
        .body(&sent[..])
        .send()
        .await
        .unwrap();
    let other_status = other.status().as_u16();
    let other_body = other.bytes().await.unwrap();

    let lines = access_lines(&access_path, 2).await;
    let metadata_line = lines.iter().find(|l| l["request_id"] == "metadata-1").expect("the metadata line");
    assert_eq!(metadata_line["method"], "metadata");
    assert_eq!(metadata_line["path"], "/v1/models/churn/metadata");
    assert_eq!(metadata_line["status"], 200);
    assert_eq!(metadata_line["request_bytes"], 0);
    assert_eq!(metadata_line["response_bytes"], metadata_body.len() as u64);
    assert!(!metadata_body.is_empty());
    assert!(metadata_line["client"].as_str().unwrap().starts_with("127.0.0.1:"), "{metadata_line}");
    let other_line = lines.iter().find(|l| l["request_id"] == "other-1").expect("the other call's line");
    assert_eq!(other_line["path"], "/v1/models/churn/versions/1/labels");
    assert_eq!(other_line["status"], other_status);
    assert_eq!(other_line["request_bytes"], sent.len() as u64);
    assert_eq!(other_line["response_bytes"], other_body.len() as u64);
    assert!(other_line["client"].as_str().unwrap().starts_with("127.0.0.1:"), "{other_line}");
    mltap.stop().await;
    server.shutdown().await;
}
