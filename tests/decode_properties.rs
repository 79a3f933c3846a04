//! Properties: a tensor decodes to the same values whichever TensorProto encoding
//! carries it (and the broadcast rule fills the rest), and no byte sequence makes a
//! decoder panic.

use bytes::Bytes;
use mltap::capture::{Exchange, Protocol};
use mltap::tfserving::proto::tensorflow::tensor_shape_proto::Dim;
use mltap::tfserving::proto::{DataType, TensorProto, TensorShapeProto};
use mltap::tfserving::tensor::{bfloat16_to_f32, half_to_f32, tensor_from_proto, Budget};
use mltap::tfserving::{Decoder, TensorValues};
use proptest::prelude::*;
use prost::Message;
use std::time::{Duration, SystemTime};

const DTYPES: [DataType; 14] = [
    DataType::DtFloat,
    DataType::DtDouble,
    DataType::DtHalf,
    DataType::DtBfloat16,
    DataType::DtInt8,
    DataType::DtInt16,
    DataType::DtInt32,
    DataType::DtInt64,
    DataType::DtUint8,
    DataType::DtUint16,
    DataType::DtUint32,
    DataType::DtUint64,
    DataType::DtBool,
    DataType::DtString,
];

/// The same elements in `tensor_content`, in the typed field, and as decoded values.
fn encodings(dtype: DataType, seeds: &[u64]) -> (Vec<u8>, TensorProto, TensorValues) {
    let mut content = Vec::new();
    let mut typed = TensorProto { dtype: dtype as i32, ..TensorProto::default() };
    let values = match dtype {
        DataType::DtFloat => TensorValues::Float(
            seeds
                .iter()
                .map(|s| {
                    let v = f32::from_bits(*s as u32);
                    content.extend_from_slice(&v.to_le_bytes());
                    typed.float_val.push(v);
                    f64::from(v)
                })
                .collect(),
        ),
        DataType::DtDouble => TensorValues::Float(
            seeds
                .iter()
                .map(|s| {
                    let v = f64::from_bits(*s);
                    content.extend_from_slice(&v.to_le_bytes());
                    typed.double_val.push(v);
                    v
                })
                .collect(),
        ),
        DataType::DtHalf | DataType::DtBfloat16 => TensorValues::Float(
            seeds
                .iter()
                .map(|s| {
                    let bits = *s as u16;
                    content.extend_from_slice(&bits.to_le_bytes());
                    typed.half_val.push(i32::from(bits));
                    f64::from(if dtype == DataType::DtHalf { half_to_f32(bits) } else { bfloat16_to_f32(bits) })
                })
                .collect(),
        ),
        DataType::DtInt8 => ints(seeds, |s| {
            let v = s as i8;
            content.push(v as u8);
            typed.int_val.push(i32::from(v));
            i64::from(v)
        }),
        DataType::DtInt16 => ints(seeds, |s| {
            let v = s as i16;
            content.extend_from_slice(&v.to_le_bytes());
            typed.int_val.push(i32::from(v));
            i64::from(v)
        }),
        DataType::DtInt32 => ints(seeds, |s| {
            let v = s as i32;
            content.extend_from_slice(&v.to_le_bytes());
            typed.int_val.push(v);
            i64::from(v)
        }),
        DataType::DtInt64 => ints(seeds, |s| {
            let v = s as i64;
            content.extend_from_slice(&v.to_le_bytes());
            typed.int64_val.push(v);
            v
        }),
        DataType::DtUint8 => uints(seeds, |s| {
            let v = s as u8;
            content.push(v);
            typed.int_val.push(i32::from(v));
            u64::from(v)
        }),
        DataType::DtUint16 => uints(seeds, |s| {
            let v = s as u16;
            content.extend_from_slice(&v.to_le_bytes());
            typed.int_val.push(i32::from(v));
            u64::from(v)
        }),
        DataType::DtUint32 => uints(seeds, |s| {
            let v = s as u32;
            content.extend_from_slice(&v.to_le_bytes());
            typed.uint32_val.push(v);
            u64::from(v)
        }),
        DataType::DtUint64 => uints(seeds, |s| {
            content.extend_from_slice(&s.to_le_bytes());
            typed.uint64_val.push(s);
            s
        }),
        DataType::DtBool => TensorValues::Bool(
            seeds
                .iter()
                .map(|s| {
                    let v = s & 1 == 1;
                    content.push(u8::from(v));
                    typed.bool_val.push(v);
                    v
                })
                .collect(),
        ),
        _ => TensorValues::Bytes(
            seeds
                .iter()
                .map(|s| {
                    let v = s.to_string().into_bytes();
                    typed.string_val.push(v.clone());
                    v
                })
                .collect(),
        ),
    };
    (content, typed, values)
}

fn ints(seeds: &[u64], mut f: impl FnMut(u64) -> i64) -> TensorValues {
    TensorValues::Int(seeds.iter().map(|s| f(*s)).collect())
}

fn uints(seeds: &[u64], mut f: impl FnMut(u64) -> u64) -> TensorValues {
    TensorValues::UInt(seeds.iter().map(|s| f(*s)).collect())
}

/// Equality where NaN equals NaN (bit patterns of NaN payloads may differ).
fn same(a: &TensorValues, b: &TensorValues) -> bool {
    match (a, b) {
        (TensorValues::Float(a), TensorValues::Float(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x.is_nan() && y.is_nan()) || x.to_bits() == y.to_bits())
        }
        _ => a == b,
    }
}

fn shape(dims: &[usize]) -> Option<TensorShapeProto> {
    Some(TensorShapeProto {
        dim: dims.iter().map(|d| Dim { size: *d as i64, name: String::new() }).collect(),
        unknown_rank: false,
    })
}

fn tensors() -> impl Strategy<Value = (usize, Vec<usize>, Vec<u64>)> {
    (0..DTYPES.len(), prop::collection::vec(0usize..5, 0..4)).prop_flat_map(|(dtype, dims)| {
        let n: usize = dims.iter().product();
        (Just(dtype), Just(dims), prop::collection::vec(any::<u64>(), n))
    })
}

proptest! {
    #[test]
    fn both_encodings_decode_to_the_same_values((dtype, dims, seeds) in tensors()) {
        let dtype = DTYPES[dtype];
        let (content, mut typed, expected) = encodings(dtype, &seeds);
        typed.tensor_shape = shape(&dims);
        let from_typed = tensor_from_proto(&typed, &mut Budget::new(1 << 20)).unwrap();
        prop_assert!(same(&from_typed.values, &expected), "typed {:?} != {:?}", from_typed.values, expected);
        prop_assert_eq!(&from_typed.shape, &dims);
        if dtype != DataType::DtString && !content.is_empty() {
            let packed = TensorProto {
                dtype: dtype as i32,
                tensor_shape: shape(&dims),
                tensor_content: Bytes::from(content),
                ..TensorProto::default()
            };
            let from_content = tensor_from_proto(&packed, &mut Budget::new(1 << 20)).unwrap();
            prop_assert!(same(&from_content.values, &from_typed.values));
            prop_assert_eq!(from_content.dtype, from_typed.dtype);
        }
    }

    #[test]
    fn fewer_typed_values_repeat_the_last_one((dtype, dims, seeds) in tensors(), keep in 1usize..4) {
        prop_assume!(seeds.len() > keep);
        let dtype = DTYPES[dtype];
        let mut filled = seeds.clone();
        for s in filled.iter_mut().skip(keep) {
            *s = seeds[keep - 1];
        }
        let (_, mut short, _) = encodings(dtype, &seeds[..keep]);
        short.tensor_shape = shape(&dims);
        let (_, _, expected) = encodings(dtype, &filled);
        let decoded = tensor_from_proto(&short, &mut Budget::new(1 << 20)).unwrap();
        prop_assert!(same(&decoded.values, &expected));
    }

    #[test]
    fn any_tensor_proto_bytes_decode_or_fail_without_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(proto) = TensorProto::decode(bytes.as_slice()) {
            let _ = tensor_from_proto(&proto, &mut Budget::new(1 << 16));
        }
    }

    #[test]
    fn grpc_decoding_never_panics_on_arbitrary_bodies(
        request in prop::collection::vec(any::<u8>(), 0..512),
        response in prop::collection::vec(any::<u8>(), 0..512),
        method in prop::sample::select(vec!["Predict", "Classify", "Regress", "MultiInference", "GetModelMetadata"]),
        chunk in 1usize..64,
        encoding in prop::sample::select(vec![None, Some("gzip"), Some("deflate"), Some("zstd")]),
    ) {
        let mut ex = exchange(Protocol::Grpc, &format!("/tensorflow.serving.PredictionService/{method}"), &request, &response, chunk);
        ex.request_encoding = encoding.map(String::from);
        let _ = Decoder::default().decode(&ex);
    }

    #[test]
    fn grpc_decoding_never_panics_on_mutated_real_messages(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        case in prop::sample::select(vec!["batch64x16", "estimator_multi_input", "classify", "regress", "half_val_field"]),
    ) {
        let dir = fixtures();
        let method = match case { "classify" => "Classify", "regress" => "Regress", _ => "Predict" };
        let mut request = std::fs::read(dir.join(format!("grpc/{case}.request.pb"))).unwrap();
        let mut response = std::fs::read(dir.join(format!("grpc/{case}.response.pb"))).unwrap();
        for (i, (at, byte)) in flips.iter().enumerate() {
            let target = if i % 2 == 0 { &mut request } else { &mut response };
            let at = at.index(target.len());
            target[at] = *byte;
        }
        let framed = |m: &[u8]| mltap::tfserving::grpc::frame(m).to_vec();
        let ex = exchange(Protocol::Grpc, &format!("/tensorflow.serving.PredictionService/{method}"), &framed(&request), &framed(&response), 13);
        let _ = Decoder::default().decode(&ex);
    }

    #[test]
    fn rest_decoding_never_panics_on_arbitrary_bodies(
        request in prop::collection::vec(any::<u8>(), 0..512),
        response in prop::collection::vec(any::<u8>(), 0..512),
        verb in prop::sample::select(vec!["predict", "classify", "regress"]),
    ) {
        let ex = exchange(Protocol::Rest, &format!("/v1/models/m:{verb}"), &request, &response, 17);
        let _ = Decoder::default().decode(&ex);
    }

    #[test]
    fn rest_decoding_never_panics_on_json_like_bodies(
        request in json_like(),
        response in json_like(),
        verb in prop::sample::select(vec!["predict", "classify", "regress"]),
    ) {
        let request = format!("{{\"instances\": {request}, \"examples\": {request}}}");
        let response = format!("{{\"predictions\": {response}, \"results\": {response}}}");
        let ex = exchange(Protocol::Rest, &format!("/v1/models/m:{verb}"), request.as_bytes(), response.as_bytes(), 1 << 20);
        let _ = Decoder::default().decode(&ex);
    }
}

fn json_like() -> impl Strategy<Value = String> {
    let tokens = vec![
        "[",
        "[",
        "]",
        "]",
        "{",
        "}",
        ",",
        ",",
        ":",
        "\"x\"",
        "\"b64\"",
        "1",
        "-2.5e3",
        "0.25",
        "NaN",
        "-Infinity",
        "true",
        "null",
        "\"s\\u00e9\"",
        "{\"b64\": \"aGk=\"}",
        "{\"a\": [1, 2]}",
        "[[1, 2], [3, 4]]",
        "[\"l\", 0.5]",
    ];
    prop::collection::vec(prop::sample::select(tokens), 0..40).prop_map(|t| t.concat())
}

/// The TF Serving fixtures in this repository (or `MLTAP_FIXTURES`).
fn fixtures() -> std::path::PathBuf {
    match std::env::var_os("MLTAP_FIXTURES") {
        Some(dir) => dir.into(),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tfserving"),
    }
}

fn exchange(protocol: Protocol, path: &str, request: &[u8], response: &[u8], chunk: usize) -> Exchange {
    let chunks = |b: &[u8]| b.chunks(chunk).map(Bytes::copy_from_slice).collect();
    Exchange {
        protocol,
        path: path.to_string(),
        method: mltap::capture::RouteKind::of_request(protocol, path).method,
        request_id: "p".into(),
        request_id_generated: false,
        request_encoding: None,
        response_encoding: None,
        bodies: mltap::capture::Bodies::Full,
        request_body: chunks(request),
        response_body: chunks(response),
        status: 200,
        grpc_status: None,
        origin: None,
        started_at: SystemTime::UNIX_EPOCH,
        upstream_latency: Duration::ZERO,
        complete: true,
    }
}
