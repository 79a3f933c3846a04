//! The demo's model server speaks TF Serving's protocols: a real tonic client and real
//! REST requests get answers in TF Serving's shapes and encodings.

use mltap::demo::model::{demo_models, LinearModel, Row};
use mltap::demo::server::ModelServer;
use mltap::demo::traffic::{predict_request, rest_body};
use mltap::tfserving::proto::serving::model_service_client::ModelServiceClient;
use mltap::tfserving::proto::serving::model_spec::VersionChoice;
use mltap::tfserving::proto::serving::prediction_service_client::PredictionServiceClient;
use mltap::tfserving::proto::serving::{
    input, ClassificationRequest, ExampleListWithContext, GetModelMetadataRequest, GetModelStatusRequest, Input,
    ModelSpec, RegressionRequest, SignatureDefMap,
};
use mltap::tfserving::proto::{DataType, Example};
use prost::Message;
use serde_json::{json, Value};
use std::collections::BTreeSet;

async fn start() -> ModelServer {
    ModelServer::bind("127.0.0.1:0".parse().unwrap(), "127.0.0.1:0".parse().unwrap(), demo_models()).await.unwrap()
}

fn rows() -> Vec<Row> {
    vec![
        Row { numeric: vec![30.0, 40.0, 2.0, 110.0, 6.0, 5.0, 4.0, 1.0], category: "br".into() },
        Row { numeric: vec![55.0, 90.0, 80.0, 50.0, 0.0, 30.0, 0.0, 4.75], category: "de".into() },
        Row { numeric: vec![42.0, 30.0, 30.0, 140.0, 1.0, 10.0, 1.0, 3.0], category: "xx".into() },
    ]
}

fn spec(name: &str) -> Option<ModelSpec> {
    Some(ModelSpec { name: name.into(), version_choice: None, signature_name: String::new() })
}

async fn grpc(server: &ModelServer) -> PredictionServiceClient<tonic::transport::Channel> {
    PredictionServiceClient::connect(format!("http://{}", server.grpc_addr)).await.unwrap()
}

fn rest_url(server: &ModelServer, path: &str) -> String {
    format!("http://{}{path}", server.rest_addr)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

#[tokio::test]
async fn grpc_predict_answers_typed_float_val_probabilities_with_the_served_model_spec() {
    let server = start().await;
    let model = LinearModel::churn();
    let response = grpc(&server).await.predict(predict_request(&model, &rows())).await.unwrap().into_inner();

    let spec = response.model_spec.unwrap();
    assert_eq!(spec.name, "churn");
    assert_eq!(spec.version_choice, Some(VersionChoice::Version(1)));
    assert_eq!(spec.signature_name, "serving_default");

    let probabilities = &response.outputs["probabilities"];
    assert_eq!(probabilities.dtype, DataType::DtFloat as i32);
    let dims: Vec<i64> = probabilities.tensor_shape.as_ref().unwrap().dim.iter().map(|d| d.size).collect();
    assert_eq!(dims, vec![3, 3]);
    assert!(probabilities.tensor_content.is_empty(), "TF Serving answers in the typed field");
    assert_eq!(probabilities.float_val.len(), 9);
    let class_ids = &response.outputs["class_ids"];
    assert_eq!(class_ids.dtype, DataType::DtInt64 as i32);
    for (row, p) in probabilities.float_val.chunks(3).enumerate() {
        let sum: f32 = p.iter().sum();
        assert!((sum - 1.0).abs() < 1e-5, "row {row} sums to {sum}");
        let argmax = (0..3).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap() as i64;
        assert_eq!(class_ids.int64_val[row], argmax);
    }
    assert_eq!(class_ids.int64_val[0], 2, "the unhappy customer churns");
    server.shutdown().await;
}

#[tokio::test]
async fn grpc_output_filter_keeps_only_the_named_outputs() {
    let server = start().await;
    let mut request = predict_request(&LinearModel::churn(), &rows());
    request.output_filter = vec!["class_ids".into()];
    let response = grpc(&server).await.predict(request).await.unwrap().into_inner();
    assert_eq!(response.outputs.keys().collect::<Vec<_>>(), vec!["class_ids"]);
    server.shutdown().await;
}

#[tokio::test]
async fn grpc_metadata_is_a_signature_def_map_in_any_naming_the_inputs() {
    let server = start().await;
    let request = GetModelMetadataRequest { model_spec: spec("churn"), metadata_field: vec!["signature_def".into()] };
    let response = grpc(&server).await.get_model_metadata(request).await.unwrap().into_inner();
    assert_eq!(response.model_spec.unwrap().version_choice, Some(VersionChoice::Version(1)));
    let any = &response.metadata["signature_def"];
    assert_eq!(any.type_url, "type.googleapis.com/tensorflow.serving.SignatureDefMap");
    let map = SignatureDefMap::decode(any.value.as_slice()).unwrap();
    let predict = &map.signature_def["serving_default"];
    assert_eq!(predict.method_name, "tensorflow/serving/predict");
    let inputs: BTreeSet<&str> = predict.inputs.keys().map(String::as_str).collect();
    let expected: BTreeSet<&str> = LinearModel::churn().input_names().into_iter().collect();
    assert_eq!(inputs, expected);
    assert_eq!(predict.inputs["country"].dtype, DataType::DtString as i32);
    assert_eq!(predict.inputs["age"].dtype, DataType::DtFloat as i32);
    let dims: Vec<i64> =
        predict.outputs["probabilities"].tensor_shape.as_ref().unwrap().dim.iter().map(|d| d.size).collect();
    assert_eq!(dims, vec![-1, 3]);
    assert_eq!(map.signature_def["classification"].method_name, "tensorflow/serving/classify");

    let missing_field = GetModelMetadataRequest { model_spec: spec("churn"), metadata_field: vec![] };
    let status = grpc(&server).await.get_model_metadata(missing_field).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    server.shutdown().await;
}

#[tokio::test]
async fn grpc_classify_scores_tf_examples_with_context_per_class_name() {
    let server = start().await;
    let model = LinearModel::churn();
    let example = |row: &Row| {
        let numeric: Vec<(&str, f64)> = model.numeric.iter().map(|i| i.name).zip(row.numeric.iter().copied()).collect();
        mltap::demo::tensor::example(&numeric, &[])
    };
    let examples: Vec<Example> = rows().iter().take(2).map(example).collect();
    let request = ClassificationRequest {
        model_spec: Some(ModelSpec {
            name: "churn".into(),
            version_choice: None,
            signature_name: "classification".into(),
        }),
        input: Some(Input {
            kind: Some(input::Kind::ExampleListWithContext(ExampleListWithContext {
                examples,
                context: Some(mltap::demo::tensor::example(&[], &[("country", "br")])),
            })),
        }),
    };
    let response = grpc(&server).await.classify(request).await.unwrap().into_inner();
    assert_eq!(response.model_spec.unwrap().signature_name, "classification");
    let classifications = response.result.unwrap().classifications;
    assert_eq!(classifications.len(), 2);
    for c in &classifications {
        let labels: Vec<&str> = c.classes.iter().map(|c| c.label.as_str()).collect();
        assert_eq!(labels, vec!["stay", "downgrade", "churn"]);
        let sum: f32 = c.classes.iter().map(|c| c.score).sum();
        assert!((sum - 1.0).abs() < 1e-5);
    }
    // The same row answers the same through Predict and Classify.
    let row = &rows()[0];
    let expected = model.probabilities(row);
    assert!((f64::from(classifications[0].classes[2].score) - expected[2]).abs() < 1e-6);

    // Classify without a signature name lands on the predict signature, as in TF Serving.
    let mut on_default = ClassificationRequest { model_spec: spec("churn"), input: None };
    on_default.input = Some(Input { kind: Some(input::Kind::ExampleListWithContext(Default::default())) });
    let status = grpc(&server).await.classify(on_default).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("Expected classification signature method_name"), "{}", status.message());
    server.shutdown().await;
}

#[tokio::test]
async fn grpc_errors_carry_tf_servings_codes_and_messages() {
    let server = start().await;
    let mut request = predict_request(&LinearModel::churn(), &rows());
    request.model_spec = spec("nope");
    let status = grpc(&server).await.predict(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    assert_eq!(status.message(), "Servable not found for request: Latest(nope)");

    let mut request = predict_request(&LinearModel::churn(), &rows());
    request.inputs.remove("satisfaction");
    let status = grpc(&server).await.predict(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("Missing but required: {satisfaction}"), "{}", status.message());

    let regress = RegressionRequest { model_spec: spec("churn"), input: None };
    let status = grpc(&server).await.regress(regress).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("tensorflow/serving/regress"), "{}", status.message());
    server.shutdown().await;
}

#[tokio::test]
async fn grpc_model_status_reports_the_version_available() {
    let server = start().await;
    let mut client = ModelServiceClient::connect(format!("http://{}", server.grpc_addr)).await.unwrap();
    let response = client.get_model_status(GetModelStatusRequest { model_spec: spec("fraud") }).await.unwrap();
    let status = &response.get_ref().model_version_status;
    assert_eq!(status.len(), 1);
    assert_eq!((status[0].version, status[0].state), (1, 30), "30 is AVAILABLE");
    server.shutdown().await;
}

#[tokio::test]
async fn rest_row_format_answers_predictions_per_instance() {
    let server = start().await;
    let model = LinearModel::churn();
    let response = client()
        .post(rest_url(&server, "/v1/models/churn:predict"))
        .json(&rest_body(&model, &rows()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await.unwrap();
    let predictions = body["predictions"].as_array().unwrap();
    assert_eq!(predictions.len(), 3);
    for (prediction, row) in predictions.iter().zip(rows()) {
        let p: Vec<f64> = prediction["probabilities"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-5);
        let expected = model.probabilities(&row);
        assert!((p[2] - expected[2]).abs() < 1e-6);
        assert_eq!(prediction["class_ids"].as_u64().unwrap() as usize, model.class_id(&expected));
    }
    server.shutdown().await;
}

#[tokio::test]
async fn rest_columnar_format_answers_outputs_and_binary_models_a_single_column() {
    let server = start().await;
    let body = json!({ "inputs": {
        "amount": [400.0, 12.5], "hour_of_day": [3, 14], "distance_km": [[200.0], [1.0]],
        "account_age_days": [10, 2000], "channel": ["web", "pos"]
    }});
    let response =
        client().post(rest_url(&server, "/v1/models/fraud/versions/1:predict")).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let probabilities = body["outputs"]["probabilities"].as_array().unwrap();
    assert_eq!(probabilities.len(), 2);
    assert_eq!(probabilities[0].as_array().unwrap().len(), 1, "a sigmoid head answers [n, 1]");
    assert_eq!(body["outputs"]["class_ids"], json!([1, 0]));
    server.shutdown().await;
}

#[tokio::test]
async fn rest_status_and_metadata_have_tf_servings_json_shapes() {
    let server = start().await;
    let status: Value = client().get(rest_url(&server, "/v1/models/churn")).send().await.unwrap().json().await.unwrap();
    assert_eq!(
        status,
        json!({ "model_version_status": [{
            "version": "1", "state": "AVAILABLE", "status": { "error_code": "OK", "error_message": "" }
        }]})
    );
    let metadata: Value = client()
        .get(rest_url(&server, "/v1/models/churn/versions/1/metadata"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(metadata["model_spec"], json!({ "name": "churn", "signature_name": "", "version": "1" }));
    let predict = &metadata["metadata"]["signature_def"]["signature_def"]["serving_default"];
    assert_eq!(predict["method_name"], "tensorflow/serving/predict");
    let inputs: BTreeSet<&str> = predict["inputs"].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(inputs, LinearModel::churn().input_names().into_iter().collect());
    assert_eq!(predict["inputs"]["age"]["dtype"], "DT_FLOAT");
    assert_eq!(predict["inputs"]["age"]["tensor_shape"]["dim"][0]["size"], "-1");
    server.shutdown().await;
}

#[tokio::test]
async fn rest_classify_answers_label_score_pairs() {
    let server = start().await;
    let body = json!({
        "signature_name": "classification",
        "context": { "country": "fr" },
        "examples": [
            { "age": 30, "income": 40.0, "tenure_months": 2, "monthly_charges": 110.0, "support_calls": 6,
              "usage_hours": 5.0, "late_payments": 4, "satisfaction": 1.0 }
        ]
    });
    let response = client().post(rest_url(&server, "/v1/models/churn:classify")).json(&body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let pairs = body["results"][0].as_array().unwrap();
    assert_eq!(pairs.len(), 3);
    assert_eq!(pairs[0][0], "stay");
    assert!(pairs[2][1].as_f64().unwrap() > 0.5);
    server.shutdown().await;
}

#[tokio::test]
async fn rest_errors_are_tf_serving_error_objects_with_the_right_status() {
    let server = start().await;
    let post = |path: &str, body: &'static str| {
        client().post(rest_url(&server, path)).header("content-type", "application/json").body(body).send()
    };
    let cases = [
        ("/v1/models/churn:predict", "{\"instances\": [[1, 2,", 400, "JSON Parse error"),
        (
            "/v1/models/nope:predict",
            "{\"instances\": [{\"age\": 1}]}",
            404,
            "Servable not found for request: Latest(nope)",
        ),
        (
            "/v1/models/churn/versions/9:predict",
            "{\"instances\": []}",
            404,
            "Servable not found for request: Specific(churn, 9)",
        ),
        ("/v1/models/churn:predict", "{\"instances\": [{\"age\": 1}]}", 400, "Missing but required"),
        ("/v1/models/churn:predict", "{}", 400, "Missing 'inputs' or 'instances' key"),
        ("/v1/models/churn:explain", "{}", 400, "Malformed request: POST /v1/models/churn:explain"),
    ];
    for (path, body, status, message) in cases {
        let response = post(path, body).await.unwrap();
        assert_eq!(response.status(), status, "{path} {body}");
        let answer: Value = response.json().await.unwrap();
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains(message), "{path} {body}: {error}");
        assert_eq!(answer.as_object().unwrap().len(), 1, "only the error key: {answer}");
    }
    server.shutdown().await;
}

#[tokio::test]
async fn grpc_and_rest_answer_the_same_probabilities_for_the_same_rows() {
    let server = start().await;
    let model = LinearModel::churn();
    let grpc_answer = grpc(&server).await.predict(predict_request(&model, &rows())).await.unwrap().into_inner();
    let rest_answer: Value = client()
        .post(rest_url(&server, "/v1/models/churn:predict"))
        .json(&rest_body(&model, &rows()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let from_rest: Vec<f32> = rest_answer["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["probabilities"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32))
        .collect();
    assert_eq!(grpc_answer.outputs["probabilities"].float_val, from_rest);
    server.shutdown().await;
}
