//! Payloads the fixtures lack (compressed gRPC messages, gzip REST bodies, unsigned
//! dtypes, MultiInference) and hostile ones: each decodes, or fails with its fixed
//! reason, without a panic and without allocating past the configured bounds.

use bytes::Bytes;
use flate2::write::{GzEncoder, ZlibEncoder};
use flate2::Compression;
use mltap::capture::{Exchange, Protocol};
use mltap::tfserving::call::{Inputs, Outputs};
use mltap::tfserving::grpc::frame;
use mltap::tfserving::proto::serving::{
    inference_result, model_spec::VersionChoice, Class, ClassificationResult, Classifications, ExampleList,
    InferenceResult, InferenceTask, Input, ModelSpec, MultiInferenceRequest, MultiInferenceResponse, PredictRequest,
    PredictResponse, Regression, RegressionResult,
};
use mltap::tfserving::proto::tensorflow::{feature, tensor_shape_proto::Dim, FloatList, Int64List};
use mltap::tfserving::proto::{DataType, Example, Feature, Features, TensorProto, TensorShapeProto};
use mltap::tfserving::{reason, DecodeLimits, Decoder, InferenceMethod, TensorValues};
use prost::Message;
use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, SystemTime};

fn exchange(protocol: Protocol, path: &str, request: Vec<Bytes>, response: Vec<Bytes>) -> Exchange {
    Exchange {
        protocol,
        path: path.to_string(),
        method: mltap::capture::RouteKind::of_request(protocol, path).method,
        request_id: "r".into(),
        request_id_generated: true,
        request_encoding: None,
        response_encoding: None,
        bodies: mltap::capture::Bodies::Full,
        request_body: request,
        response_body: response,
        status: 200,
        grpc_status: (protocol == Protocol::Grpc).then_some(0),
        origin: None,
        started_at: SystemTime::UNIX_EPOCH,
        upstream_latency: Duration::ZERO,
        complete: true,
    }
}

const PREDICT: &str = "/tensorflow.serving.PredictionService/Predict";

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

fn predict_pair(inputs: Vec<(&str, TensorProto)>) -> (Vec<u8>, Vec<u8>) {
    let request = PredictRequest {
        model_spec: spec("m", None),
        inputs: inputs.into_iter().map(|(n, t)| (n.to_string(), t)).collect(),
        output_filter: vec![],
    };
    let probs = TensorProto {
        dtype: DataType::DtFloat as i32,
        tensor_shape: shape(&[2, 2]),
        float_val: vec![0.25, 0.75, 0.5, 0.5],
        ..TensorProto::default()
    };
    let response = PredictResponse {
        model_spec: spec("m", Some(3)),
        outputs: HashMap::from([("probabilities".to_string(), probs)]),
    };
    (request.encode_to_vec(), response.encode_to_vec())
}

fn float_input() -> TensorProto {
    TensorProto {
        dtype: DataType::DtFloat as i32,
        tensor_shape: shape(&[2, 1]),
        float_val: vec![1.5, -2.0],
        ..TensorProto::default()
    }
}

/// A gRPC frame with the compressed flag set.
fn compressed_frame(compressed: &[u8]) -> Bytes {
    let mut out = vec![1u8];
    out.extend_from_slice(&(compressed.len() as u32).to_be_bytes());
    out.extend_from_slice(compressed);
    Bytes::from(out)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zlib(data: &[u8]) -> Vec<u8> {
    let mut e = ZlibEncoder::new(Vec::new(), Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn errors_of(decoder: &Decoder, ex: &Exchange) -> Vec<&'static str> {
    decoder.decode(ex).errors.iter().map(|e| e.reason).collect()
}

#[test]
fn grpc_messages_compressed_with_gzip_or_deflate_are_inflated() {
    let (request, response) = predict_pair(vec![("x", float_input())]);
    for (encoding, compress) in [("gzip", gzip as fn(&[u8]) -> Vec<u8>), ("deflate", zlib)] {
        let mut ex = exchange(
            Protocol::Grpc,
            PREDICT,
            vec![compressed_frame(&compress(&request))],
            vec![compressed_frame(&compress(&response))],
        );
        ex.request_encoding = Some(encoding.into());
        ex.response_encoding = Some(encoding.into());
        let decoded = Decoder::default().decode(&ex);
        assert!(decoded.errors.is_empty(), "{encoding}: {:?}", decoded.errors);
        let obs = &decoded.observations[0];
        assert_eq!(obs.stream.version, Some(3));
        assert_eq!(obs.features[0].name, "x");
        assert_eq!(obs.probabilities.as_ref().unwrap().row(0), &[0.25, 0.75]);
    }
}

#[test]
fn a_compressed_grpc_message_past_the_cap_is_too_large() {
    let big = TensorProto {
        dtype: DataType::DtFloat as i32,
        tensor_shape: shape(&[2, 1 << 18]),
        tensor_content: Bytes::from(vec![0u8; 8 << 18]),
        ..TensorProto::default()
    };
    let (request, response) = predict_pair(vec![("x", big)]);
    let mut ex = exchange(Protocol::Grpc, PREDICT, vec![compressed_frame(&gzip(&request))], vec![frame(&response)]);
    ex.request_encoding = Some("gzip".into());
    let decoder =
        Decoder::default().with_limits(DecodeLimits { max_decompressed_bytes: 1 << 20, ..Default::default() });
    assert_eq!(errors_of(&decoder, &ex), [reason::TOO_LARGE]);
    ex.request_encoding = Some("snappy".into());
    assert_eq!(errors_of(&decoder, &ex), [reason::UNSUPPORTED_ENCODING]);
}

#[test]
fn gzip_rest_bodies_are_inflated_and_bombs_stop_at_the_cap() {
    let request = br#"{"instances": [[1.0, 2.0], [3.0, 4.0]]}"#;
    let response = br#"{"predictions": [[0.1, 0.9], [0.6, 0.4]]}"#;
    let mut ex = exchange(
        Protocol::Rest,
        "/v1/models/m:predict",
        vec![Bytes::from(gzip(request))],
        vec![Bytes::from_static(response)],
    );
    ex.request_encoding = Some("gzip".into());
    let decoded = Decoder::default().decode(&ex);
    assert!(decoded.errors.is_empty(), "{:?}", decoded.errors);
    assert_eq!(decoded.observations[0].features.len(), 2);

    let mut bomb = vec![b' '; 8 << 20];
    bomb[..request.len()].copy_from_slice(request);
    ex.request_body = vec![Bytes::from(gzip(&bomb))];
    let decoder =
        Decoder::default().with_limits(DecodeLimits { max_decompressed_bytes: 1 << 20, ..Default::default() });
    assert_eq!(errors_of(&decoder, &ex), [reason::TOO_LARGE]);
    assert_eq!(errors_of(&Decoder::default(), &ex), Vec::<&str>::new(), "the default cap is 100 MiB");
}

#[test]
fn unsigned_and_narrow_integer_dtypes_decode_in_both_encodings() {
    let typed = |dtype: DataType, f: &dyn Fn(&mut TensorProto)| {
        let mut t = TensorProto { dtype: dtype as i32, tensor_shape: shape(&[2]), ..TensorProto::default() };
        f(&mut t);
        t
    };
    let cases: Vec<(&str, TensorProto, TensorValues)> = vec![
        ("u8_typed", typed(DataType::DtUint8, &|t| t.int_val = vec![255, 7]), TensorValues::UInt(vec![255, 7])),
        (
            "u8_content",
            typed(DataType::DtUint8, &|t| t.tensor_content = Bytes::from_static(&[255, 7])),
            TensorValues::UInt(vec![255, 7]),
        ),
        ("u16_typed", typed(DataType::DtUint16, &|t| t.int_val = vec![65535, 1]), TensorValues::UInt(vec![65535, 1])),
        (
            "u32_typed",
            typed(DataType::DtUint32, &|t| t.uint32_val = vec![u32::MAX, 2]),
            TensorValues::UInt(vec![u32::MAX as u64, 2]),
        ),
        (
            "u64_content",
            typed(DataType::DtUint64, &|t| {
                t.tensor_content = Bytes::from([u64::MAX.to_le_bytes(), 3u64.to_le_bytes()].concat())
            }),
            TensorValues::UInt(vec![u64::MAX, 3]),
        ),
        (
            "u64_typed",
            typed(DataType::DtUint64, &|t| t.uint64_val = vec![u64::MAX]),
            TensorValues::UInt(vec![u64::MAX; 2]),
        ),
        ("i8_typed", typed(DataType::DtInt8, &|t| t.int_val = vec![-128, 127]), TensorValues::Int(vec![-128, 127])),
        (
            "i16_content",
            typed(DataType::DtInt16, &|t| t.tensor_content = Bytes::from_static(&[0xff, 0xff, 2, 0])),
            TensorValues::Int(vec![-1, 2]),
        ),
    ];
    for (name, proto, want) in cases {
        let (request, response) = predict_pair(vec![(name, proto)]);
        let ex = exchange(Protocol::Grpc, PREDICT, vec![frame(&request)], vec![frame(&response)]);
        let decoded = Decoder::default().decode_call(&ex);
        assert!(decoded.errors.is_empty(), "{name}: {:?}", decoded.errors);
        let Some(Inputs::Tensors(t)) = decoded.call.map(|c| c.inputs) else { panic!("{name}") };
        assert_eq!(t[0].tensor.values, want, "{name}");
        assert!(t[0].tensor.dtype.is_integer());
    }
}

fn example(features: Vec<(&str, feature::Kind)>) -> Example {
    Example {
        features: Some(Features {
            feature: features.into_iter().map(|(n, k)| (n.to_string(), Feature { kind: Some(k) })).collect(),
        }),
    }
}

#[test]
fn multi_inference_gives_one_observation_per_task_over_the_same_examples() {
    let examples = vec![
        example(vec![("age", feature::Kind::FloatList(FloatList { value: vec![31.0] }))]),
        example(vec![("age", feature::Kind::FloatList(FloatList { value: vec![62.0] }))]),
    ];
    let request = MultiInferenceRequest {
        tasks: vec![
            InferenceTask { model_spec: spec("census", None), method_name: "tensorflow/serving/classify".into() },
            InferenceTask { model_spec: spec("census", None), method_name: "tensorflow/serving/regress".into() },
        ],
        input: Some(Input {
            kind: Some(mltap::tfserving::proto::serving::input::Kind::ExampleList(ExampleList { examples })),
        }),
    };
    let class = |label: &str, score: f32| Class { label: label.into(), score };
    let response = MultiInferenceResponse {
        results: vec![
            InferenceResult {
                model_spec: spec("census", Some(5)),
                result: Some(inference_result::Result::ClassificationResult(ClassificationResult {
                    classifications: vec![
                        Classifications { classes: vec![class("no", 0.25), class("yes", 0.75)] },
                        Classifications { classes: vec![class("yes", 0.5), class("no", 0.5)] },
                    ],
                })),
            },
            InferenceResult {
                model_spec: spec("census", Some(5)),
                result: Some(inference_result::Result::RegressionResult(RegressionResult {
                    regressions: vec![Regression { value: 1.5 }, Regression { value: 2.5 }],
                })),
            },
        ],
    };
    let ex = exchange(
        Protocol::Grpc,
        "/tensorflow.serving.PredictionService/MultiInference",
        vec![frame(&request.encode_to_vec())],
        vec![frame(&response.encode_to_vec())],
    );
    let decoded = Decoder::default().decode(&ex);
    assert!(decoded.errors.is_empty(), "{:?}", decoded.errors);
    assert_eq!(decoded.method, Some(InferenceMethod::MultiInference));
    let [classify, regress] = decoded.observations.as_slice() else { panic!("{:?}", decoded.observations) };
    assert_eq!(classify.method, InferenceMethod::Classify);
    assert_eq!(classify.stream.version, Some(5));
    assert_eq!(classify.features[0].name, "age");
    let p = classify.probabilities.as_ref().unwrap();
    assert_eq!(p.class_names.as_deref().unwrap(), ["no", "yes"]);
    assert_eq!(p.values, [0.25, 0.75, 0.5, 0.5], "the second row is reordered to the first row's labels");
    assert_eq!(regress.method, InferenceMethod::Regress);
    assert_eq!(regress.regression.as_deref().unwrap(), [1.5, 2.5]);
}

#[test]
fn examples_with_lists_of_several_values_give_indexed_features_and_missing_values() {
    let request = mltap::tfserving::proto::serving::ClassificationRequest {
        model_spec: spec("m", None),
        input: Some(Input {
            kind: Some(mltap::tfserving::proto::serving::input::Kind::ExampleList(ExampleList {
                examples: vec![
                    example(vec![("v", feature::Kind::Int64List(Int64List { value: vec![1, 2] }))]),
                    example(vec![]),
                ],
            })),
        }),
    };
    let response = mltap::tfserving::proto::serving::ClassificationResponse {
        model_spec: spec("m", Some(1)),
        result: Some(ClassificationResult {
            classifications: vec![
                Classifications { classes: vec![Class { label: "a".into(), score: 0.9 }] },
                Classifications { classes: vec![Class { label: "a".into(), score: 0.2 }] },
            ],
        }),
    };
    let ex = exchange(
        Protocol::Grpc,
        "/tensorflow.serving.PredictionService/Classify",
        vec![frame(&request.encode_to_vec())],
        vec![frame(&response.encode_to_vec())],
    );
    let decoded = Decoder::default().decode(&ex);
    assert!(decoded.errors.is_empty(), "{:?}", decoded.errors);
    let obs = &decoded.observations[0];
    let names: Vec<&str> = obs.features.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["v_0", "v_1"]);
    let mltap::tfserving::FeatureValues::Numeric { values, integer: true } = &obs.features[1].values else { panic!() };
    assert_eq!(values[0], 2.0);
    assert!(values[1].is_nan(), "an example without the feature is a missing value");
    let p = obs.probabilities.as_ref().unwrap();
    assert_eq!((p.classes, p.threshold, p.predicted_class(0), p.predicted_class(1)), (2, Some(0.5), 1, 0));
}

#[test]
fn an_unsupported_dtype_is_skipped_and_counted_while_other_inputs_are_observed() {
    let complex = TensorProto {
        dtype: DataType::DtComplex64 as i32,
        tensor_shape: shape(&[2]),
        scomplex_val: vec![1.0, 2.0, 3.0, 4.0],
        ..TensorProto::default()
    };
    let (request, response) = predict_pair(vec![("x", float_input()), ("z", complex)]);
    let ex = exchange(Protocol::Grpc, PREDICT, vec![frame(&request)], vec![frame(&response)]);
    let decoded = Decoder::default().decode(&ex);
    assert_eq!(decoded.errors.iter().map(|e| e.reason).collect::<Vec<_>>(), [reason::UNSUPPORTED_DTYPE]);
    assert_eq!(decoded.observations[0].features.len(), 1);
    assert!(decoded.observations[0].probabilities.is_some());
}

#[test]
fn hostile_grpc_payloads_fail_with_their_reason() {
    let (good_request, response) = predict_pair(vec![("x", float_input())]);
    let decoder = Decoder::default();
    let run =
        |request: Vec<Bytes>| errors_of(&decoder, &exchange(Protocol::Grpc, PREDICT, request, vec![frame(&response)]));

    assert_eq!(run(vec![frame(b"\xff\xff\xff\xff garbage")]), [reason::BAD_PROTOBUF]);
    assert_eq!(run(vec![frame(&good_request).slice(..20)]), [reason::TRUNCATED_FRAME]);
    assert_eq!(run(vec![Bytes::from_static(&[0, 0])]), [reason::TRUNCATED_FRAME]);
    assert_eq!(run(vec![]), [reason::MISSING_MESSAGE]);

    let wrong_length = TensorProto {
        dtype: DataType::DtFloat as i32,
        tensor_shape: shape(&[2, 1]),
        tensor_content: Bytes::from_static(&[0; 7]),
        ..TensorProto::default()
    };
    let (request, _) = predict_pair(vec![("x", wrong_length)]);
    assert_eq!(run(vec![frame(&request)]), [reason::BAD_TENSOR_CONTENT]);

    let overflowing = TensorProto {
        dtype: DataType::DtFloat as i32,
        tensor_shape: shape(&[i64::MAX, i64::MAX, 2]),
        float_val: vec![1.0],
        ..TensorProto::default()
    };
    let (request, _) = predict_pair(vec![("x", overflowing)]);
    assert_eq!(run(vec![frame(&request)]), [reason::TOO_LARGE]);

    let huge_broadcast = TensorProto {
        dtype: DataType::DtFloat as i32,
        tensor_shape: shape(&[1 << 20, 1 << 20]),
        float_val: vec![1.0],
        ..TensorProto::default()
    };
    let (request, _) = predict_pair(vec![("x", huge_broadcast)]);
    assert_eq!(run(vec![frame(&request)]), [reason::TOO_LARGE], "a broadcast cannot allocate past max_elements");

    let empty_but_wide = TensorProto {
        dtype: DataType::DtFloat as i32,
        tensor_shape: shape(&[0, i64::MAX, i64::MAX]),
        ..TensorProto::default()
    };
    let (request, _) = predict_pair(vec![("x", empty_but_wide)]);
    let no_rows = PredictResponse {
        model_spec: spec("m", Some(3)),
        outputs: HashMap::from([(
            "probabilities".to_string(),
            TensorProto { dtype: DataType::DtFloat as i32, tensor_shape: shape(&[0, 2]), ..TensorProto::default() },
        )]),
    };
    let ex = exchange(Protocol::Grpc, PREDICT, vec![frame(&request)], vec![frame(&no_rows.encode_to_vec())]);
    assert_eq!(errors_of(&decoder, &ex), [reason::TOO_LARGE], "zero rows of absurd width");

    let negative =
        TensorProto { dtype: DataType::DtFloat as i32, tensor_shape: shape(&[-1]), ..TensorProto::default() };
    let (request, _) = predict_pair(vec![("x", negative)]);
    assert_eq!(run(vec![frame(&request)]), [reason::BAD_SHAPE]);

    let too_many = TensorProto {
        dtype: DataType::DtFloat as i32,
        tensor_shape: shape(&[1]),
        float_val: vec![1.0, 2.0],
        ..TensorProto::default()
    };
    let (request, _) = predict_pair(vec![("x", too_many)]);
    assert_eq!(run(vec![frame(&request)]), [reason::BAD_TENSOR]);
}

#[test]
fn hostile_rest_payloads_fail_with_their_reason() {
    let decoder = Decoder::default();
    let response = Bytes::from_static(br#"{"predictions": [[0.5, 0.5]]}"#);
    let run = |request: &[u8]| {
        errors_of(
            &decoder,
            &exchange(
                Protocol::Rest,
                "/v1/models/m:predict",
                vec![Bytes::copy_from_slice(request)],
                vec![response.clone()],
            ),
        )
    };
    let deep = format!(r#"{{"instances": {}}}"#, "[".repeat(1_000_000));
    assert_eq!(run(deep.as_bytes()), [reason::TOO_DEEP]);
    let deep_skipped = format!(r#"{{"other": {}}}"#, "{\"a\":".repeat(1_000_000));
    assert_eq!(run(deep_skipped.as_bytes()), [reason::TOO_DEEP]);
    assert_eq!(run(br#"{"instances": [{"b64": "not base64!"}]}"#), [reason::BAD_BASE64]);
    assert_eq!(run(br#"{"instances": [[1, 2], [3]]}"#), [reason::RAGGED]);
    assert_eq!(run(br#"{"instances": [1, "a"]}"#), [reason::MIXED_TYPES]);
    assert_eq!(run(br#"{"instances": [1, 2"#), [reason::BAD_JSON]);
    assert_eq!(run(b"\xff\xfe"), [reason::BAD_JSON]);
    assert_eq!(run(br#"{"instances": [[1]]} trailing"#), [reason::BAD_JSON]);
    assert_eq!(run(br#"{"instances": [{"a": 1}, {"b": 2}]}"#), [reason::RAGGED], "a named input missing from a row");
    assert_eq!(run(br#"{"instances": [[1]]}"#), Vec::<&str>::new());

    let limited = Decoder::default().with_limits(DecodeLimits { max_elements: 100, ..Default::default() });
    let many = format!(r#"{{"instances": [{}]}}"#, vec!["1"; 1000].join(","));
    let ex = exchange(Protocol::Rest, "/v1/models/m:predict", vec![Bytes::from(many)], vec![response.clone()]);
    assert_eq!(errors_of(&limited, &ex), [reason::TOO_LARGE]);

    let ex = exchange(Protocol::Rest, "/v1/models/m/metadata", vec![], vec![]);
    assert_eq!(errors_of(&decoder, &ex), [reason::UNKNOWN_PATH]);
}

#[test]
fn rest_columnar_objects_and_special_floats_decode() {
    let decoder = Decoder::default();
    let ex = exchange(
        Protocol::Rest,
        "/v1/models/m/versions/4:predict",
        vec![Bytes::from_static(br#"{"signature_name": "s", "inputs": {"a": [[1, 2], [3, 4]], "t": 0.5}}"#)],
        vec![Bytes::from_static(br#"{"outputs": {"scores": [[Infinity, -Infinity], [0.5, 0.5]]}}"#)],
    );
    let decoded = decoder.decode_call(&ex);
    let call = decoded.call.unwrap();
    assert_eq!((call.signature.as_str(), call.version), ("s", Some(4)));
    let Inputs::Tensors(inputs) = &call.inputs else { panic!() };
    assert_eq!(inputs[0].tensor.shape, [2, 2]);
    assert_eq!(inputs[1].tensor.shape, Vec::<usize>::new());
    let Outputs::Tensors(outputs) = &call.outputs else { panic!() };
    assert_eq!(outputs[0].tensor.values, TensorValues::Float(vec![f64::INFINITY, f64::NEG_INFINITY, 0.5, 0.5]));
    let decoded = decoder.decode(&ex);
    assert_eq!(decoded.errors[0].reason, reason::NOT_PROBABILITIES);
    let names: Vec<&str> = decoded.observations[0].features.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["a_0", "a_1", "t"]);
}
