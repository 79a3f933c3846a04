//! The demo model server's gRPC front end: `tensorflow.serving.PredictionService`
//! (Predict, Classify, Regress, GetModelMetadata) and `tensorflow.serving.ModelService`
//! (GetModelStatus), answering in TF Serving's encodings: typed output fields
//! (`float_val`, `int64_val`), `model_spec` with version and signature name, metadata
//! as a `SignatureDefMap` packed in `google.protobuf.Any`.
//!
//! It translates messages only; what the model computes lives in `serving`.

use super::serving::{self, Registry, ServingError, VersionRequest};
use super::tensor::{column_from_tensor, float_tensor, int64_tensor};
use crate::tfserving::proto::serving::model_service_server::ModelService;
use crate::tfserving::proto::serving::model_spec::VersionChoice;
use crate::tfserving::proto::serving::model_version_status::State;
use crate::tfserving::proto::serving::prediction_service_server::PredictionService;
use crate::tfserving::proto::serving::{
    input, Class, ClassificationRequest, ClassificationResponse, ClassificationResult, Classifications,
    GetModelMetadataRequest, GetModelMetadataResponse, GetModelStatusRequest, GetModelStatusResponse, ModelSpec,
    ModelVersionStatus, MultiInferenceRequest, MultiInferenceResponse, PredictRequest, PredictResponse,
    RegressionRequest, RegressionResponse, ReloadConfigRequest, ReloadConfigResponse, SignatureDefMap, StatusProto,
};
use crate::tfserving::proto::Example;
use prost::Message;
use std::collections::HashMap;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// `type_url` of the `signature_def` metadata entry, as TF Serving writes it.
pub const SIGNATURE_DEF_MAP_TYPE_URL: &str = "type.googleapis.com/tensorflow.serving.SignatureDefMap";

/// Both gRPC services over one registry.
#[derive(Debug, Clone)]
pub struct GrpcModelServer {
    /// The served models, shared with the REST front end.
    pub registry: Arc<Registry>,
}

fn version_request(spec: &ModelSpec) -> VersionRequest {
    match &spec.version_choice {
        Some(VersionChoice::Version(v)) => VersionRequest::Specific(*v),
        Some(VersionChoice::VersionLabel(l)) => VersionRequest::Label(l.clone()),
        None => VersionRequest::Latest,
    }
}

/// The `model_spec` of a response: the resolved version and the signature used.
fn response_spec(name: &str, version: i64, signature: &str) -> ModelSpec {
    ModelSpec {
        name: name.to_string(),
        version_choice: Some(VersionChoice::Version(version)),
        signature_name: serving::signature_name(signature).to_string(),
    }
}

fn spec_of(spec: Option<ModelSpec>) -> Result<ModelSpec, Status> {
    spec.ok_or_else(|| Status::invalid_argument("Missing ModelSpec"))
}

fn examples_of(
    input: Option<crate::tfserving::proto::serving::Input>,
) -> Result<(Vec<Example>, Option<Example>), Status> {
    match input.and_then(|i| i.kind) {
        Some(input::Kind::ExampleList(list)) => Ok((list.examples, None)),
        Some(input::Kind::ExampleListWithContext(list)) => Ok((list.examples, list.context)),
        None => Err(Status::invalid_argument("Input is empty")),
    }
}

#[tonic::async_trait]
impl PredictionService for GrpcModelServer {
    async fn predict(&self, request: Request<PredictRequest>) -> Result<Response<PredictResponse>, Status> {
        let request = request.into_inner();
        let spec = spec_of(request.model_spec)?;
        let model = self.registry.resolve(&spec.name, &version_request(&spec)).map_err(|e| e.grpc_status())?;
        let mut columns = HashMap::with_capacity(request.inputs.len());
        for (name, tensor) in &request.inputs {
            let column = column_from_tensor(name, tensor).map_err(Status::invalid_argument)?;
            columns.insert(name.clone(), column);
        }
        let prediction = serving::predict(model, &spec.signature_name, &columns).map_err(|e| e.grpc_status())?;
        if model.is_regression() {
            if let Some(wanted) = request.output_filter.iter().find(|f| *f != serving::REGRESSION_OUTPUT) {
                return Err(Status::invalid_argument(format!(
                    "output tensor alias not found in signature: {wanted} Outputs expected to be in the set {{predictions}}."
                )));
            }
            let rows = prediction.probabilities.len() as i64;
            let flat = prediction.probabilities.into_iter().flatten().collect();
            let outputs = HashMap::from([(serving::REGRESSION_OUTPUT.to_string(), float_tensor(&[rows, 1], flat))]);
            return Ok(Response::new(PredictResponse {
                model_spec: Some(response_spec(model.name, model.version, &spec.signature_name)),
                outputs,
            }));
        }
        for wanted in &request.output_filter {
            if wanted != "probabilities" && wanted != "class_ids" {
                return Err(Status::invalid_argument(format!(
                    "output tensor alias not found in signature: {wanted} Outputs expected to be in the set {{class_ids,probabilities}}."
                )));
            }
        }
        let keep = |name: &str| request.output_filter.is_empty() || request.output_filter.iter().any(|f| f == name);
        let rows = prediction.class_ids.len() as i64;
        let width = model.probability_width() as i64;
        let mut outputs = HashMap::new();
        if keep("probabilities") {
            let flat = prediction.probabilities.into_iter().flatten().collect();
            outputs.insert("probabilities".to_string(), float_tensor(&[rows, width], flat));
        }
        if keep("class_ids") {
            outputs.insert("class_ids".to_string(), int64_tensor(&[rows], prediction.class_ids));
        }
        Ok(Response::new(PredictResponse {
            model_spec: Some(response_spec(model.name, model.version, &spec.signature_name)),
            outputs,
        }))
    }

    async fn classify(
        &self,
        request: Request<ClassificationRequest>,
    ) -> Result<Response<ClassificationResponse>, Status> {
        let request = request.into_inner();
        let spec = spec_of(request.model_spec)?;
        let model = self.registry.resolve(&spec.name, &version_request(&spec)).map_err(|e| e.grpc_status())?;
        serving::expect_method(&spec.signature_name, "classification", serving::CLASSIFY_METHOD)
            .map_err(|e| e.grpc_status())?;
        let (examples, context) = examples_of(request.input)?;
        let results = serving::classify(model, &examples, context.as_ref()).map_err(|e| e.grpc_status())?;
        let classifications = results
            .into_iter()
            .map(|classes| Classifications {
                classes: classes.into_iter().map(|(label, score)| Class { label, score }).collect(),
            })
            .collect();
        Ok(Response::new(ClassificationResponse {
            model_spec: Some(response_spec(model.name, model.version, &spec.signature_name)),
            result: Some(ClassificationResult { classifications }),
        }))
    }

    async fn regress(&self, request: Request<RegressionRequest>) -> Result<Response<RegressionResponse>, Status> {
        let request = request.into_inner();
        let spec = spec_of(request.model_spec)?;
        self.registry.resolve(&spec.name, &version_request(&spec)).map_err(|e| e.grpc_status())?;
        // Neither demo model has a regression head, so this always fails the way TF
        // Serving fails a Regress call on a classifier.
        let error = serving::expect_method(&spec.signature_name, "regression", serving::REGRESS_METHOD)
            .err()
            .unwrap_or_else(|| ServingError::invalid("no regression signature"));
        Err(error.grpc_status())
    }

    async fn multi_inference(
        &self,
        _request: Request<MultiInferenceRequest>,
    ) -> Result<Response<MultiInferenceResponse>, Status> {
        Err(Status::unimplemented("MultiInference is not offered by the mltap demo model server"))
    }

    async fn get_model_metadata(
        &self,
        request: Request<GetModelMetadataRequest>,
    ) -> Result<Response<GetModelMetadataResponse>, Status> {
        let request = request.into_inner();
        let spec = spec_of(request.model_spec)?;
        let model = self.registry.resolve(&spec.name, &version_request(&spec)).map_err(|e| e.grpc_status())?;
        if request.metadata_field.is_empty() {
            return Err(Status::invalid_argument("GetModelMetadataRequest must specify at least one metadata_field"));
        }
        if let Some(other) = request.metadata_field.iter().find(|f| *f != "signature_def") {
            return Err(Status::invalid_argument(format!("Metadata field {other} is not supported")));
        }
        let map = SignatureDefMap { signature_def: serving::signature_defs(model) };
        let any = prost_types::Any { type_url: SIGNATURE_DEF_MAP_TYPE_URL.to_string(), value: map.encode_to_vec() };
        Ok(Response::new(GetModelMetadataResponse {
            model_spec: Some(ModelSpec {
                name: model.name.to_string(),
                version_choice: Some(VersionChoice::Version(model.version)),
                signature_name: String::new(),
            }),
            metadata: HashMap::from([("signature_def".to_string(), any)]),
        }))
    }
}

#[tonic::async_trait]
impl ModelService for GrpcModelServer {
    async fn get_model_status(
        &self,
        request: Request<GetModelStatusRequest>,
    ) -> Result<Response<GetModelStatusResponse>, Status> {
        let spec = spec_of(request.into_inner().model_spec)?;
        let model = self.registry.resolve(&spec.name, &version_request(&spec)).map_err(|e| e.grpc_status())?;
        Ok(Response::new(GetModelStatusResponse {
            model_version_status: vec![ModelVersionStatus {
                version: model.version,
                state: State::Available as i32,
                status: Some(StatusProto { error_code: 0, error_message: String::new() }),
            }],
        }))
    }

    async fn handle_reload_config_request(
        &self,
        _request: Request<ReloadConfigRequest>,
    ) -> Result<Response<ReloadConfigResponse>, Status> {
        Err(Status::unimplemented("the mltap demo model server has a fixed model config"))
    }
}
