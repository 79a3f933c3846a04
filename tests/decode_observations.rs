//! The observations built from real TF Serving payloads: feature names as docs/architecture.md
//! gives them, probabilities found by its rules and the per-model config, class
//! names, row ids, regression values and the stream key.

use bytes::Bytes;
use mltap::capture::{Exchange, Protocol};
use mltap::config::ModelConfig;
use mltap::tfserving::grpc::frame;
use mltap::tfserving::{
    reason, DType, Decoded, Decoder, FeatureValues, InferenceMethod, ModelSchema, Observation, SchemaCache, SchemaKey,
    SignatureSchema,
};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

mod support;

fn exchange(protocol: Protocol, path: &str, request: Bytes, response: Bytes) -> Exchange {
    Exchange {
        protocol,
        path: path.to_string(),
        method: mltap::capture::RouteKind::of_request(protocol, path).method,
        request_id: "req-7".into(),
        request_id_generated: false,
        request_encoding: None,
        response_encoding: None,
        bodies: mltap::capture::Bodies::Full,
        request_body: vec![request],
        response_body: vec![response],
        status: 200,
        grpc_status: (protocol == Protocol::Grpc).then_some(0),
        origin: None,
        started_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        upstream_latency: Duration::from_millis(3),
        complete: true,
    }
}

fn grpc(decoder: &Decoder, case: &str, method: &str) -> Decoded {
    let dir = support::fixtures_dir().join("grpc");
    let request = std::fs::read(dir.join(format!("{case}.request.pb"))).unwrap();
    let response = std::fs::read(dir.join(format!("{case}.response.pb"))).unwrap();
    let path = format!("/tensorflow.serving.PredictionService/{method}");
    decoder.decode(&exchange(Protocol::Grpc, &path, frame(&request), frame(&response)))
}

fn rest(decoder: &Decoder, case: &str, path: &str) -> Decoded {
    let dir = support::fixtures_dir().join("rest");
    let request = std::fs::read(dir.join(format!("{case}.request.json"))).unwrap();
    let response = std::fs::read(dir.join(format!("{case}.response.json"))).unwrap();
    decoder.decode(&exchange(Protocol::Rest, path, request.into(), response.into()))
}

fn only(decoded: &Decoded) -> &Observation {
    assert!(decoded.errors.is_empty(), "{:?}", decoded.errors);
    assert_eq!(decoded.observations.len(), 1);
    &decoded.observations[0]
}

fn names(obs: &Observation) -> Vec<&str> {
    obs.features.iter().map(|f| f.name.as_str()).collect()
}

fn numeric<'o>(obs: &'o Observation, name: &str) -> (&'o [f64], bool) {
    match &obs.features.iter().find(|f| f.name == name).unwrap().values {
        FeatureValues::Numeric { values, integer } => (values, *integer),
        other => panic!("`{name}` is not numeric: {other:?}"),
    }
}

fn categorical<'o>(obs: &'o Observation, name: &str) -> Vec<Option<&'o str>> {
    match &obs.features.iter().find(|f| f.name == name).unwrap().values {
        FeatureValues::Categorical(values) => values.iter().map(|v| v.as_deref()).collect(),
        other => panic!("`{name}` is not categorical: {other:?}"),
    }
}

fn models(name: &str, config: ModelConfig) -> BTreeMap<String, ModelConfig> {
    BTreeMap::from([(name.to_string(), config)])
}

#[test]
fn a_rank_two_input_becomes_one_feature_per_column_and_softmax_rows_become_probabilities() {
    let decoded = grpc(&Decoder::default(), "batch64x16", "Predict");
    let obs = only(&decoded);
    assert_eq!(decoded.model.as_deref(), Some("bench"));
    assert_eq!(decoded.method, Some(InferenceMethod::Predict));
    assert_eq!(obs.stream.model, "bench");
    assert_eq!(obs.stream.version, Some(7));
    assert_eq!(obs.stream.signature, "serving_default");
    assert_eq!(obs.rows, 64);
    let expected: Vec<String> = (0..16).map(|i| format!("x_{i}")).collect();
    assert_eq!(names(obs), expected);
    let (x0, integer) = numeric(obs, "x_0");
    assert!(!integer);
    assert_eq!(x0.len(), 64);
    assert_eq!(x0[0], -1.4623278379440308);
    assert_eq!(x0[1], 1.0768046379089355, "row 1 of column 0 is element 16 (row-major)");
    let p = obs.probabilities.as_ref().unwrap();
    assert_eq!((p.classes, p.rows(), p.threshold), (5, 64, None));
    assert_eq!(p.class_name(4), "class_4");
    assert_eq!(obs.event_time, SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    assert_eq!(obs.row_id(3), "req-7:3");
}

#[test]
fn a_single_sigmoid_column_is_a_binary_distribution_with_the_configured_threshold() {
    let config = ModelConfig {
        threshold: Some(0.7),
        class_names: Some(vec!["stays".into(), "churns".into()]),
        ..ModelConfig::default()
    };
    let decoded = grpc(&Decoder::new(models("churn", config)), "binary_sigmoid", "Predict");
    let obs = only(&decoded);
    let p = obs.probabilities.as_ref().unwrap();
    assert_eq!((p.classes, p.rows(), p.threshold), (2, 5, Some(0.7)));
    assert_eq!(p.row(1), &[1.0 - 0.8062153458595276, 0.8062153458595276]);
    assert_eq!(p.predicted_class(1), 1);
    assert_eq!(p.predicted_class(4), 0, "0.698 is below the configured 0.7");
    assert_eq!(p.class_name(1), "churns");
    assert_eq!(names(obs), ["x_0", "x_1", "x_2", "x_3"]);
}

#[test]
fn estimator_inputs_keep_their_names_dtypes_and_the_id_feature_gives_row_ids() {
    let config = ModelConfig { id_feature: Some("count".into()), ..ModelConfig::default() };
    let decoded = grpc(&Decoder::new(models("credit", config)), "estimator_multi_input", "Predict");
    let obs = only(&decoded);
    assert_eq!(obs.stream.signature, "predict");
    assert_eq!(obs.stream.version, Some(2));
    assert_eq!(names(obs), ["age", "country"], "the id feature is not a monitored feature");
    assert_eq!(numeric(obs, "age"), (&[59.0, 50.0, 30.0, 75.0, 75.0][..], false));
    assert_eq!(categorical(obs, "country"), [Some("de"), Some("de"), Some("us"), Some("de"), Some("il")]);
    assert_eq!(obs.row_ids.as_deref().unwrap(), ["2", "0", "2", "1", "7"]);
    assert_eq!(obs.row_id(4), "7");
    let p = obs.probabilities.as_ref().unwrap();
    assert_eq!((p.classes, p.rows()), (2, 5));
    assert_eq!(p.row(0)[0], 0.505591630935669, "the `probabilities` output, not `logits`");
}

#[test]
fn integer_inputs_are_numeric_integers_unless_configured_categorical() {
    let decoded = grpc(&Decoder::default(), "estimator_multi_input", "Predict");
    assert_eq!(numeric(only(&decoded), "count"), (&[2.0, 0.0, 2.0, 1.0, 7.0][..], true));
    let config = ModelConfig { categorical_features: vec!["count".into()], ..ModelConfig::default() };
    let decoded = grpc(&Decoder::new(models("credit", config)), "estimator_multi_input", "Predict");
    assert_eq!(categorical(only(&decoded), "count"), [Some("2"), Some("0"), Some("2"), Some("1"), Some("7")]);
}

#[test]
fn a_scalar_input_applies_to_every_row_and_bools_are_categorical() {
    let decoded = grpc(&Decoder::default(), "bool_and_scalar", "Predict");
    let obs = only(&decoded);
    assert_eq!(obs.rows, 5);
    assert_eq!(names(obs), ["flag", "t"]);
    assert_eq!(numeric(obs, "t").0, &[0.25; 5]);
    assert_eq!(categorical(obs, "flag"), [Some("false"), Some("true"), Some("false"), Some("false"), Some("false")]);
}

#[test]
fn scores_in_double_and_bfloat16_probabilities_are_found() {
    let decoded = grpc(&Decoder::default(), "int32_double", "Predict");
    let p = only(&decoded).probabilities.clone().unwrap();
    assert_eq!((p.classes, p.rows()), (4, 5));
    let decoded = grpc(&Decoder::default(), "half_bfloat16", "Predict");
    let obs = only(&decoded);
    assert_eq!(obs.probabilities.as_ref().unwrap().classes, 3, "bfloat16 rows sum to 1 within rounding");
    assert_eq!(names(obs)[..3], ["h_0", "h_1", "h_2"]);
}

#[test]
fn classify_scores_become_probabilities_named_by_label() {
    let decoded = grpc(&Decoder::default(), "classify", "Classify");
    let obs = only(&decoded);
    assert_eq!(obs.method, InferenceMethod::Classify);
    assert_eq!(obs.stream.version, Some(4));
    assert_eq!(obs.rows, 3);
    assert_eq!(names(obs), ["age", "country", "hours"]);
    assert_eq!(numeric(obs, "hours"), (&[30.0, 31.0, 32.0][..], true));
    let p = obs.probabilities.as_ref().unwrap();
    assert_eq!(p.class_names.as_deref().unwrap(), ["<=50K", ">50K"]);
    assert_eq!(p.predicted_class(0), 1);
    assert_eq!(p.predicted_class(2), 0);
}

#[test]
fn regress_values_and_context_features_reach_every_example() {
    let decoded = grpc(&Decoder::default(), "regress", "Regress");
    let obs = only(&decoded);
    assert_eq!(obs.method, InferenceMethod::Regress);
    assert_eq!(obs.regression.as_deref().unwrap(), [101.5, 180.25]);
    assert_eq!(categorical(obs, "region"), [Some("north"), Some("north")]);
    assert!(obs.probabilities.is_none());
}

#[test]
fn an_unnamed_rest_input_is_called_input_until_the_signature_names_it() {
    let decoded = rest(&Decoder::default(), "row_single_input", "/v1/models/iris:predict");
    let obs = only(&decoded);
    assert_eq!(names(obs), ["input_0", "input_1", "input_2", "input_3"]);
    assert_eq!(obs.stream.version, None);
    assert_eq!(obs.probabilities.as_ref().unwrap().classes, 3, "the only float output");

    let schemas = SchemaCache::fixed();
    let signature = SignatureSchema {
        inputs: vec![("x".into(), Some(DType::Float))],
        outputs: vec![("probabilities".into(), Some(DType::Float))],
    };
    let schema = ModelSchema { signatures: BTreeMap::from([("serving_default".to_string(), signature)]) };
    schemas.insert(SchemaKey { model: "iris".into(), version: None, label: None }, schema);
    let decoder = Decoder::default().with_schemas(schemas);
    let decoded = rest(&decoder, "row_single_input", "/v1/models/iris:predict");
    assert_eq!(names(only(&decoded)), ["x_0", "x_1", "x_2", "x_3"]);
    let decoded = rest(&decoder, "columnar_single", "/v1/models/iris:predict");
    assert_eq!(names(only(&decoded)), ["x_0", "x_1", "x_2", "x_3"]);
}

#[test]
fn rest_named_rows_give_named_features_and_the_probabilities_output() {
    let path = "/v1/models/credit/versions/2:predict";
    let decoded = rest(&Decoder::default(), "row_named_inputs_multi_output", path);
    let obs = only(&decoded);
    assert_eq!(obs.stream.version, Some(2));
    assert_eq!(obs.stream.signature, "predict");
    assert_eq!(names(obs), ["age", "count", "country"]);
    assert_eq!(numeric(obs, "count"), (&[2.0, 0.0][..], true));
    assert_eq!(categorical(obs, "country"), [Some("fr"), Some("us")]);
    assert_eq!(obs.probabilities.as_ref().unwrap().row(1), &[0.3153177797794342, 0.6846821904182434]);
}

#[test]
fn a_nan_row_is_not_silently_used_as_probabilities() {
    let decoded = rest(&Decoder::default(), "nan_in_response", "/v1/models/iris:predict");
    assert_eq!(decoded.observations.len(), 1, "the inputs are still observed");
    assert!(decoded.observations[0].probabilities.is_none());
    assert_eq!(decoded.errors.len(), 1);
    assert_eq!(decoded.errors[0].reason, reason::NOT_PROBABILITIES);
}

#[test]
fn rest_classify_merges_the_context_into_every_example() {
    let decoded = rest(&Decoder::default(), "classify", "/v1/models/census:classify");
    let obs = only(&decoded);
    assert_eq!(obs.stream.signature, "classification");
    assert_eq!(names(obs), ["age", "country", "hours"]);
    assert_eq!(categorical(obs, "country"), [Some("fr"), Some("fr")]);
    assert_eq!(numeric(obs, "age"), (&[30.0, 52.5][..], false));
    let p = obs.probabilities.as_ref().unwrap();
    assert_eq!(p.class_names.as_deref().unwrap(), ["<=50K", ">50K"]);
    assert_eq!(p.row(1), &[0.4, 0.6]);
}

#[test]
fn rest_b64_strings_are_categorical_and_failed_exchanges_give_no_observation() {
    let decoded = rest(&Decoder::default(), "b64_input", "/v1/models/img:predict");
    let obs = only(&decoded);
    assert_eq!(categorical(obs, "image_bytes"), [Some("b64:iVBORyBmYWtl")]);
    let dir = support::fixtures_dir().join("rest");
    let mut ex = exchange(
        Protocol::Rest,
        "/v1/models/nope:predict",
        std::fs::read(dir.join("error_not_found.request.json")).unwrap().into(),
        std::fs::read(dir.join("error_not_found.response.json")).unwrap().into(),
    );
    ex.status = 404;
    let decoded = Decoder::default().decode(&ex);
    assert!(decoded.observations.is_empty() && decoded.errors.is_empty());
    assert_eq!(decoded.model.as_deref(), Some("nope"));
}

#[test]
fn a_configured_probabilities_output_wins_and_is_checked() {
    let config = ModelConfig { probabilities_output: Some("logits".into()), ..ModelConfig::default() };
    let decoded = grpc(&Decoder::new(models("credit", config)), "estimator_multi_input", "Predict");
    assert!(decoded.observations[0].probabilities.is_none());
    assert_eq!(decoded.errors[0].reason, reason::NOT_PROBABILITIES, "logits are not probabilities");
}

#[test]
fn a_regression_task_reads_the_sigmoid_fixture_as_predictions_and_refuses_classify_results() {
    let regression = ModelConfig { task: Some(mltap::tfserving::Task::Regression), ..ModelConfig::default() };
    // The binary_sigmoid fixture's [5,1] output lies in [0, 1]: without a task it is a
    // classifier's; a regression model's predictions are never probabilities.
    let decoded = grpc(&Decoder::new(models("churn", regression.clone())), "binary_sigmoid", "Predict");
    let obs = only(&decoded);
    assert!(obs.probabilities.is_none());
    assert_eq!(obs.regression.as_ref().map(Vec::len), Some(5));
    assert_eq!(obs.regression.as_ref().unwrap()[1], 0.8062153458595276);
    // Classify results of a model configured as a regression are not scored.
    let decoded = grpc(&Decoder::new(models("census", regression)), "classify", "Classify");
    assert_eq!(decoded.errors.iter().map(|e| e.reason).collect::<Vec<_>>(), [reason::TASK_MISMATCH]);
    assert!(decoded.observations.iter().all(|o| o.probabilities.is_none() && o.regression.is_none()));
}

#[test]
fn a_classification_task_never_reads_a_single_column_as_a_regression() {
    let classifier = ModelConfig { task: Some(mltap::tfserving::Task::Classification), ..ModelConfig::default() };
    // The recorded Regress response of `price` (101.5, 180.25): not scored for a classifier.
    let decoded = grpc(&Decoder::new(models("price", classifier)), "regress", "Regress");
    assert_eq!(decoded.errors.iter().map(|e| e.reason).collect::<Vec<_>>(), [reason::TASK_MISMATCH]);
    assert!(decoded.observations.iter().all(|o| o.regression.is_none() && o.probabilities.is_none()));
    // Without a task, Regress results are a regression.
    let decoded = grpc(&Decoder::new(BTreeMap::new()), "regress", "Regress");
    assert_eq!(only(&decoded).regression, Some(vec![101.5, 180.25]));
}

#[test]
fn rest_calls_without_a_version_get_the_served_version_or_count_as_unresolved() {
    let versions = mltap::tfserving::ServedVersions::fixed();
    let decoder = Decoder::new(BTreeMap::new()).with_versions(versions.clone());
    let decoded = rest(&decoder, "regress", "/v1/models/price:regress");
    assert_eq!(decoded.errors.iter().map(|e| e.reason).collect::<Vec<_>>(), [reason::UNRESOLVED_VERSION]);
    assert_eq!(decoded.observations[0].stream.version, None, "unknown: observed without a version, as before");
    versions.insert("price", 4);
    let decoded = rest(&decoder, "regress", "/v1/models/price:regress");
    assert_eq!(only(&decoded).stream.version, Some(4));
    // A version in the URL is the one that served the call.
    let decoded = rest(&decoder, "regress", "/v1/models/price/versions/2:regress");
    assert_eq!(only(&decoded).stream.version, Some(2));
}
