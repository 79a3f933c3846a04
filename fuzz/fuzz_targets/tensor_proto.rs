//! The TensorProto decoder on arbitrary protobuf bytes: every dtype, both
//! encodings, shapes and the broadcast rule, under a small element budget.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mltap::tfserving::proto::TensorProto;
use mltap::tfserving::tensor::{tensor_from_proto, Budget};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(proto) = TensorProto::decode(data) {
        if let Ok(tensor) = tensor_from_proto(&proto, &mut Budget::new(1 << 16)) {
            let elements = tensor.shape.iter().try_fold(1usize, |n, d| n.checked_mul(*d));
            assert_eq!(Some(tensor.len()), elements, "a decoded tensor has exactly its shape's elements");
        }
    }
});
