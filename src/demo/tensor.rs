//! TensorProto and tf.Example conversions the demo's model server and traffic generator
//! need: reading one input column out of a request, and writing the typed fields TF
//! Serving writes. It covers the dtypes the demo models take (floats, integers,
//! strings), not every TensorFlow dtype; the monitoring decoders live in `tfserving`.

use crate::tfserving::proto::tensorflow::tensor_shape_proto::Dim;
use crate::tfserving::proto::tensorflow::{feature, BytesList, FloatList};
use crate::tfserving::proto::{DataType, Example, Feature, Features, TensorProto, TensorShapeProto};
use std::collections::HashMap;

/// One input column of a batch, one value per row.
#[derive(Debug, Clone, PartialEq)]
pub enum Column {
    /// Any numeric dtype, widened to f64.
    Numeric(Vec<f64>),
    /// DT_STRING values, decoded as UTF-8 (lossily: the model only compares them).
    Strings(Vec<String>),
}

impl Column {
    /// Number of rows.
    pub fn len(&self) -> usize {
        match self {
            Column::Numeric(v) => v.len(),
            Column::Strings(v) => v.len(),
        }
    }

    /// Whether the column has no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A shape as a list of sizes.
pub fn shape(dims: &[i64]) -> TensorShapeProto {
    TensorShapeProto { dim: dims.iter().map(|&size| Dim { size, name: String::new() }).collect(), unknown_rank: false }
}

fn dims(tensor: &TensorProto) -> Vec<i64> {
    tensor.tensor_shape.as_ref().map(|s| s.dim.iter().map(|d| d.size).collect()).unwrap_or_default()
}

/// Reads an input tensor of shape `[n]` or `[n, 1]` into a column of n rows. A typed
/// field holding a single value is broadcast to the shape, as TensorFlow does.
pub fn column_from_tensor(name: &str, tensor: &TensorProto) -> Result<Column, String> {
    let dims = dims(tensor);
    let rows = match dims.as_slice() {
        [n] | [n, 1] if *n >= 0 => *n as usize,
        _ => return Err(format!("input '{name}' must have shape [batch] or [batch, 1], got {dims:?}")),
    };
    let dtype = DataType::try_from(tensor.dtype).unwrap_or(DataType::DtInvalid);
    let content = &tensor.tensor_content;
    let numeric = |typed: Vec<f64>, width: usize, decode: &dyn Fn(&[u8]) -> f64| -> Result<Column, String> {
        let values: Vec<f64> = if !content.is_empty() {
            if content.len() != rows * width {
                return Err(format!(
                    "input '{name}': tensor_content holds {} bytes, shape {dims:?} needs {}",
                    content.len(),
                    rows * width
                ));
            }
            content.chunks_exact(width).map(decode).collect()
        } else {
            typed
        };
        broadcast(name, values, rows).map(Column::Numeric)
    };
    match dtype {
        DataType::DtFloat => numeric(tensor.float_val.iter().map(|&v| f64::from(v)).collect(), 4, &|b| {
            f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }),
        DataType::DtDouble => numeric(tensor.double_val.clone(), 8, &|b| {
            f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
        }),
        DataType::DtInt32 => numeric(tensor.int_val.iter().map(|&v| f64::from(v)).collect(), 4, &|b| {
            f64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }),
        DataType::DtInt64 => numeric(tensor.int64_val.iter().map(|&v| v as f64).collect(), 8, &|b| {
            i64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f64
        }),
        DataType::DtString => {
            let values = tensor.string_val.iter().map(|b| String::from_utf8_lossy(b).into_owned()).collect();
            broadcast(name, values, rows).map(Column::Strings)
        }
        other => Err(format!("input '{name}' has unsupported dtype {}", other.as_str_name())),
    }
}

fn broadcast<T: Clone>(name: &str, values: Vec<T>, rows: usize) -> Result<Vec<T>, String> {
    if values.len() == rows {
        Ok(values)
    } else if values.len() == 1 {
        Ok(vec![values[0].clone(); rows])
    } else {
        Err(format!("input '{name}' holds {} values for {rows} rows", values.len()))
    }
}

/// A DT_FLOAT tensor in `float_val`, as TF Serving writes its outputs.
pub fn float_tensor(dims: &[i64], values: Vec<f32>) -> TensorProto {
    TensorProto {
        dtype: DataType::DtFloat as i32,
        tensor_shape: Some(shape(dims)),
        float_val: values,
        ..Default::default()
    }
}

/// A DT_FLOAT tensor in `tensor_content`, as `tf.make_tensor_proto` writes arrays.
pub fn float_tensor_content(dims: &[i64], values: &[f32]) -> TensorProto {
    let content: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    TensorProto {
        dtype: DataType::DtFloat as i32,
        tensor_shape: Some(shape(dims)),
        tensor_content: content.into(),
        ..Default::default()
    }
}

/// A DT_INT64 tensor in `int64_val`.
pub fn int64_tensor(dims: &[i64], values: Vec<i64>) -> TensorProto {
    TensorProto {
        dtype: DataType::DtInt64 as i32,
        tensor_shape: Some(shape(dims)),
        int64_val: values,
        ..Default::default()
    }
}

/// A DT_STRING tensor in `string_val`.
pub fn string_tensor(dims: &[i64], values: Vec<Vec<u8>>) -> TensorProto {
    TensorProto {
        dtype: DataType::DtString as i32,
        tensor_shape: Some(shape(dims)),
        string_val: values,
        ..Default::default()
    }
}

/// The value of one feature of a tf.Example, as the model reads it.
#[derive(Debug, Clone, PartialEq)]
pub enum FeatureValue {
    /// A float_list or int64_list with one value.
    Number(f64),
    /// A bytes_list with one value.
    Text(String),
}

/// Reads one single-valued feature from an Example's features, or None when absent.
pub fn example_feature(features: &HashMap<String, Feature>, name: &str) -> Result<Option<FeatureValue>, String> {
    let Some(feature) = features.get(name) else { return Ok(None) };
    let one = |len: usize| {
        if len == 1 {
            Ok(())
        } else {
            Err(format!("Name: <unknown>, Key: {name}, Index: 0.  Number of values != expected.  values size: {len} but output shape: []"))
        }
    };
    match &feature.kind {
        Some(feature::Kind::FloatList(list)) => {
            one(list.value.len()).map(|_| Some(FeatureValue::Number(f64::from(list.value[0]))))
        }
        Some(feature::Kind::Int64List(list)) => {
            one(list.value.len()).map(|_| Some(FeatureValue::Number(list.value[0] as f64)))
        }
        Some(feature::Kind::BytesList(list)) => one(list.value.len())
            .map(|_| Some(FeatureValue::Text(String::from_utf8_lossy(&list.value[0]).into_owned()))),
        None => Ok(None),
    }
}

/// A tf.Example with float features and one bytes feature.
pub fn example(numeric: &[(&str, f64)], text: &[(&str, &str)]) -> Example {
    let mut feature = HashMap::new();
    for (name, value) in numeric {
        feature.insert(
            name.to_string(),
            Feature { kind: Some(feature::Kind::FloatList(FloatList { value: vec![*value as f32] })) },
        );
    }
    for (name, value) in text {
        feature.insert(
            name.to_string(),
            Feature { kind: Some(feature::Kind::BytesList(BytesList { value: vec![value.as_bytes().to_vec()] })) },
        );
    }
    Example { features: Some(Features { feature }) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_content_and_typed_floats_read_the_same() {
        let content = float_tensor_content(&[3], &[1.5, 2.0, -3.25]);
        let typed = float_tensor(&[3, 1], vec![1.5, 2.0, -3.25]);
        assert_eq!(column_from_tensor("x", &content).unwrap(), Column::Numeric(vec![1.5, 2.0, -3.25]));
        assert_eq!(column_from_tensor("x", &typed).unwrap(), Column::Numeric(vec![1.5, 2.0, -3.25]));
    }

    #[test]
    fn a_single_typed_value_is_broadcast_and_a_short_content_is_an_error() {
        assert_eq!(
            column_from_tensor("c", &string_tensor(&[2], vec![b"fr".to_vec()])).unwrap(),
            Column::Strings(vec!["fr".into(), "fr".into()])
        );
        let mut bad = float_tensor_content(&[3], &[1.0, 2.0, 3.0]);
        bad.tensor_content = bad.tensor_content.slice(0..5);
        assert!(column_from_tensor("x", &bad).unwrap_err().contains("tensor_content"));
        assert!(column_from_tensor("x", &float_tensor(&[2, 2], vec![0.0; 4])).is_err());
    }
}
