//! Model signatures come from TF Serving once per model version (gRPC
//! `GetModelMetadata`, else REST metadata), off the decode path: a miss never waits,
//! names the tensor `input`, and later decodes use the fetched name.

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use mltap::capture::{Exchange, Protocol};
use mltap::tfserving::proto::serving::prediction_service_server::{PredictionService, PredictionServiceServer};
use mltap::tfserving::proto::serving::{
    ClassificationRequest, ClassificationResponse, GetModelMetadataRequest, GetModelMetadataResponse,
    MultiInferenceRequest, MultiInferenceResponse, PredictRequest, PredictResponse, RegressionRequest,
    RegressionResponse, SignatureDefMap,
};
use mltap::tfserving::proto::tensorflow::{tensor_info, SignatureDef, TensorInfo};
use mltap::tfserving::proto::DataType;
use mltap::tfserving::{Decoder, FeatureValues, SchemaCache, SchemaKey, SchemaSource};
use prost::Message;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tonic::{Request, Response, Status};

/// The model specs a server was asked for, as (name, version).
type Asked = Arc<Mutex<Vec<(String, Option<i64>)>>>;

/// A TF Serving stand-in that only answers `GetModelMetadata`.
#[derive(Default)]
struct Metadata {
    calls: Arc<AtomicUsize>,
    /// The model specs asked for, as (name, version).
    asked: Asked,
}

fn signature_defs() -> SignatureDefMap {
    let info = |name: &str, dtype: DataType| TensorInfo {
        dtype: dtype as i32,
        tensor_shape: None,
        encoding: Some(tensor_info::Encoding::Name(name.into())),
    };
    let def = SignatureDef {
        inputs: HashMap::from([("sepal".to_string(), info("serving_default_sepal:0", DataType::DtInt32))]),
        outputs: HashMap::from([("probabilities".to_string(), info("StatefulPartitionedCall:0", DataType::DtFloat))]),
        method_name: "tensorflow/serving/predict".into(),
    };
    SignatureDefMap { signature_def: HashMap::from([("serving_default".to_string(), def)]) }
}

#[tonic::async_trait]
impl PredictionService for Metadata {
    async fn classify(&self, _: Request<ClassificationRequest>) -> Result<Response<ClassificationResponse>, Status> {
        Err(Status::unimplemented("classify"))
    }
    async fn regress(&self, _: Request<RegressionRequest>) -> Result<Response<RegressionResponse>, Status> {
        Err(Status::unimplemented("regress"))
    }
    async fn predict(&self, _: Request<PredictRequest>) -> Result<Response<PredictResponse>, Status> {
        Err(Status::unimplemented("predict"))
    }
    async fn multi_inference(
        &self,
        _: Request<MultiInferenceRequest>,
    ) -> Result<Response<MultiInferenceResponse>, Status> {
        Err(Status::unimplemented("multi_inference"))
    }
    async fn get_model_metadata(
        &self,
        request: Request<GetModelMetadataRequest>,
    ) -> Result<Response<GetModelMetadataResponse>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let request = request.into_inner();
        assert_eq!(request.metadata_field, ["signature_def"]);
        let spec = request.model_spec.unwrap_or_default();
        let version = match spec.version_choice {
            Some(mltap::tfserving::proto::serving::model_spec::VersionChoice::Version(v)) => Some(v),
            _ => None,
        };
        self.asked.lock().unwrap().push((spec.name.clone(), version));
        if spec.name != "iris" {
            return Err(Status::not_found("Servable not found"));
        }
        let any = prost_types::Any {
            type_url: "type.googleapis.com/tensorflow.serving.SignatureDefMap".into(),
            value: signature_defs().encode_to_vec(),
        };
        Ok(Response::new(GetModelMetadataResponse {
            model_spec: Some(spec),
            metadata: HashMap::from([("signature_def".to_string(), any)]),
        }))
    }
}

async fn grpc_server(service: Metadata) -> http::Uri {
    use tonic::codegen::Service;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = PredictionServiceServer::new(service);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let server = server.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let mut server = server.clone();
                    async move { server.call(request).await }
                });
                let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    format!("http://{addr}").parse().unwrap()
}

/// A REST port answering `GET /v1/models/iris/versions/3/metadata` as TF Serving does.
async fn rest_server() -> http::Uri {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let service = service_fn(|request: http::Request<hyper::body::Incoming>| async move {
                    let body = if request.uri().path() == "/v1/models/iris/versions/3/metadata" {
                        r#"{"model_spec": {"name": "iris", "signature_name": "", "version": "3"},
                            "metadata": {"signature_def": {"signature_def": {"serving_default": {
                              "inputs": {"petal": {"dtype": "DT_FLOAT", "tensor_shape": {"dim": [{"size": "-1", "name": ""},
                                {"size": "4", "name": ""}], "unknown_rank": false}, "name": "serving_default_petal:0"}},
                              "outputs": {"output_0": {"dtype": "DT_FLOAT", "tensor_shape": {"dim": [], "unknown_rank": true},
                                "name": "StatefulPartitionedCall:0"}},
                              "method_name": "tensorflow/serving/predict"}}}}}"#
                    } else {
                        r#"{"error": "Servable not found"}"#
                    };
                    let status = if body.starts_with(r#"{"error""#) { 404 } else { 200 };
                    Ok::<_, std::convert::Infallible>(
                        http::Response::builder().status(status).body(Full::new(Bytes::from(body))).unwrap(),
                    )
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    format!("http://{addr}").parse().unwrap()
}

fn rest_exchange(path: &str) -> Exchange {
    Exchange {
        protocol: Protocol::Rest,
        path: path.to_string(),
        method: mltap::capture::RouteKind::of_request(Protocol::Rest, path).method,
        request_id: "r".into(),
        request_id_generated: false,
        request_encoding: None,
        response_encoding: None,
        bodies: mltap::capture::Bodies::Full,
        request_body: vec![Bytes::from_static(br#"{"instances": [[1, 2, 3, 4], [5, 6, 7, 8]]}"#)],
        response_body: vec![Bytes::from_static(br#"{"predictions": [[0.2, 0.8], [0.5, 0.5]]}"#)],
        status: 200,
        grpc_status: None,
        origin: None,
        started_at: SystemTime::now(),
        upstream_latency: Duration::ZERO,
        complete: true,
    }
}

fn feature_names(decoder: &Decoder, path: &str) -> Vec<String> {
    let decoded = decoder.decode(&rest_exchange(path));
    assert!(decoded.errors.is_empty(), "{:?}", decoded.errors);
    decoded.observations[0].features.iter().map(|f| f.name.clone()).collect()
}

#[tokio::test]
async fn the_signature_from_get_model_metadata_names_an_unnamed_rest_input() {
    let service = Metadata::default();
    let (calls, asked) = (service.calls.clone(), service.asked.clone());
    let upstream = grpc_server(service).await;
    let schemas = SchemaCache::spawn(SchemaSource::new(Some(upstream), None, Duration::from_secs(5)));
    let decoder = Decoder::default().with_schemas(schemas.clone());

    // The first decode does not wait for the fetch: the input is `input` meanwhile.
    assert_eq!(feature_names(&decoder, "/v1/models/iris/versions/2:predict")[0], "input_0");
    let key = SchemaKey { model: "iris".into(), version: Some(2), label: None };
    assert!(schemas.resolved(&key, Duration::from_secs(10)).await.is_some(), "the fetch completes in the background");
    for _ in 0..5 {
        assert_eq!(feature_names(&decoder, "/v1/models/iris/versions/2:predict")[0], "sepal_0");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "fetched once per model version");
    assert_eq!(asked.lock().unwrap().as_slice(), [("iris".to_string(), Some(2))]);

    let decoded = decoder.decode(&rest_exchange("/v1/models/iris/versions/2:predict"));
    let FeatureValues::Numeric { integer, .. } = decoded.observations[0].features[0].values else { panic!() };
    assert!(integer, "the signature declares DT_INT32");
}

#[tokio::test]
async fn rest_metadata_is_the_fallback_when_grpc_fails() {
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap()).parse().unwrap()
    };
    let rest = rest_server().await;
    let schemas = SchemaCache::spawn(SchemaSource::new(Some(dead), Some(rest), Duration::from_secs(2)));
    let decoder = Decoder::default().with_schemas(schemas.clone());
    assert_eq!(feature_names(&decoder, "/v1/models/iris/versions/3:predict")[0], "input_0");
    let key = SchemaKey { model: "iris".into(), version: Some(3), label: None };
    assert!(schemas.resolved(&key, Duration::from_secs(10)).await.is_some());
    assert_eq!(feature_names(&decoder, "/v1/models/iris/versions/3:predict")[0], "petal_0");
}

#[tokio::test]
async fn an_unknown_model_keeps_the_input_name_and_is_not_refetched_at_once() {
    let service = Metadata::default();
    let calls = service.calls.clone();
    let upstream = grpc_server(service).await;
    let schemas = SchemaCache::spawn(SchemaSource::new(Some(upstream), None, Duration::from_secs(5)));
    let decoder = Decoder::default().with_schemas(schemas.clone());
    assert_eq!(feature_names(&decoder, "/v1/models/other:predict")[0], "input_0");
    let key = SchemaKey { model: "other".into(), version: None, label: None };
    assert!(schemas.resolved(&key, Duration::from_secs(10)).await.is_none());
    for _ in 0..3 {
        assert_eq!(feature_names(&decoder, "/v1/models/other:predict")[0], "input_0");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "a failure is remembered until retry_after");
}
