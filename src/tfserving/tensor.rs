//! The tensor layer: one representation, `Tensor { dtype, shape, values }`, for what a
//! TensorProto, a tf.Example feature list or a REST JSON value carries.
//!
//! It owns TensorFlow's decoding rules (both TensorProto encodings, the broadcast
//! rule, half/bfloat16 bit patterns, shape checks) and never allocates more elements
//! than the exchange's `Budget` allows, whatever the shape claims.

use super::proto::{DataType, TensorProto};
use super::{reason, DecodeError};

/// The element types mltap decodes. Others (complex, quantized, resource, variant,
/// float8, int4) are reported as `unsupported_dtype` and skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    Half,
    BFloat16,
    Float,
    Double,
    Int8,
    Int16,
    Int32,
    Int64,
    UInt8,
    UInt16,
    UInt32,
    UInt64,
    Bool,
    /// DT_STRING: bytes, usually UTF-8 text.
    String,
}

impl DType {
    /// The TensorFlow name (`DT_FLOAT`, ...), as `tf.make_ndarray` fixtures spell it.
    pub fn tf_name(self) -> &'static str {
        match self {
            DType::Half => "DT_HALF",
            DType::BFloat16 => "DT_BFLOAT16",
            DType::Float => "DT_FLOAT",
            DType::Double => "DT_DOUBLE",
            DType::Int8 => "DT_INT8",
            DType::Int16 => "DT_INT16",
            DType::Int32 => "DT_INT32",
            DType::Int64 => "DT_INT64",
            DType::UInt8 => "DT_UINT8",
            DType::UInt16 => "DT_UINT16",
            DType::UInt32 => "DT_UINT32",
            DType::UInt64 => "DT_UINT64",
            DType::Bool => "DT_BOOL",
            DType::String => "DT_STRING",
        }
    }

    /// The dtype of a TensorFlow name, for signatures read from REST metadata.
    pub fn from_tf_name(name: &str) -> Option<DType> {
        Self::from_proto(DataType::from_str_name(name)? as i32)
    }

    /// The dtype of a `DataType` enum value; None for the unsupported ones.
    pub fn from_proto(value: i32) -> Option<DType> {
        Some(match DataType::try_from(value).ok()? {
            DataType::DtHalf => DType::Half,
            DataType::DtBfloat16 => DType::BFloat16,
            DataType::DtFloat => DType::Float,
            DataType::DtDouble => DType::Double,
            DataType::DtInt8 => DType::Int8,
            DataType::DtInt16 => DType::Int16,
            DataType::DtInt32 => DType::Int32,
            DataType::DtInt64 => DType::Int64,
            DataType::DtUint8 => DType::UInt8,
            DataType::DtUint16 => DType::UInt16,
            DataType::DtUint32 => DType::UInt32,
            DataType::DtUint64 => DType::UInt64,
            DataType::DtBool => DType::Bool,
            DataType::DtString => DType::String,
            _ => return None,
        })
    }

    /// Floating-point dtypes: the candidates for probabilities.
    pub fn is_float(self) -> bool {
        matches!(self, DType::Half | DType::BFloat16 | DType::Float | DType::Double)
    }

    /// Integer dtypes: numeric, and also counted by value while their values are few.
    pub fn is_integer(self) -> bool {
        matches!(
            self,
            DType::Int8
                | DType::Int16
                | DType::Int32
                | DType::Int64
                | DType::UInt8
                | DType::UInt16
                | DType::UInt32
                | DType::UInt64
        )
    }

    /// Bytes per element in `tensor_content`; None for strings.
    fn content_width(self) -> Option<usize> {
        Some(match self {
            DType::Int8 | DType::UInt8 | DType::Bool => 1,
            DType::Half | DType::BFloat16 | DType::Int16 | DType::UInt16 => 2,
            DType::Float | DType::Int32 | DType::UInt32 => 4,
            DType::Double | DType::Int64 | DType::UInt64 => 8,
            DType::String => return None,
        })
    }
}

/// The elements of a tensor, row-major. Integers keep their exact value (ids are
/// often int64); every float dtype is widened to f64, which is exact.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorValues {
    Float(Vec<f64>),
    Int(Vec<i64>),
    UInt(Vec<u64>),
    Bool(Vec<bool>),
    Bytes(Vec<Vec<u8>>),
}

impl TensorValues {
    pub fn len(&self) -> usize {
        match self {
            TensorValues::Float(v) => v.len(),
            TensorValues::Int(v) => v.len(),
            TensorValues::UInt(v) => v.len(),
            TensorValues::Bool(v) => v.len(),
            TensorValues::Bytes(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` as a number (NaN for text and out-of-range indices).
    pub fn number(&self, i: usize) -> f64 {
        match self {
            TensorValues::Float(v) => v.get(i).copied().unwrap_or(f64::NAN),
            TensorValues::Int(v) => v.get(i).map_or(f64::NAN, |x| *x as f64),
            TensorValues::UInt(v) => v.get(i).map_or(f64::NAN, |x| *x as f64),
            TensorValues::Bool(v) => v.get(i).map_or(f64::NAN, |x| f64::from(u8::from(*x))),
            TensorValues::Bytes(_) => f64::NAN,
        }
    }
}

/// A decoded tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// The declared dtype (gRPC), or the one the JSON values imply (REST: `Double`,
    /// `Int64`, `Bool` or `String`).
    pub dtype: DType,
    /// Dimensions; empty for a rank-0 scalar.
    pub shape: Vec<usize>,
    /// Exactly `shape.iter().product()` elements.
    pub values: TensorValues,
}

impl Tensor {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// A tensor and its name (input or output key; `""` for an unnamed REST tensor).
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub tensor: Tensor,
}

/// The number of elements one exchange may still decode. Every decoder takes from it
/// before it allocates, so a shape or a body that claims billions of values fails
/// with `too_large` instead of exhausting memory.
#[derive(Debug, Clone)]
pub struct Budget {
    /// Elements left.
    remaining: usize,
}

impl Budget {
    pub fn new(max_elements: usize) -> Self {
        Budget { remaining: max_elements }
    }

    /// Reserves `n` elements, or fails with `too_large`.
    pub fn take(&mut self, n: usize) -> Result<(), DecodeError> {
        match self.remaining.checked_sub(n) {
            Some(left) => {
                self.remaining = left;
                Ok(())
            }
            None => Err(DecodeError::new(
                reason::TOO_LARGE,
                format!("{n} more elements exceed the configured maximum per exchange"),
            )),
        }
    }

    /// Reserves a copy of `values`: its elements, plus one element per 8 bytes of
    /// its strings, so that repeating strings (broadcast, context features) is bounded
    /// in bytes too.
    pub fn take_copy(&mut self, values: &TensorValues) -> Result<(), DecodeError> {
        let bytes = match values {
            TensorValues::Bytes(v) => v.iter().map(|b| b.len().div_ceil(8)).fold(0usize, usize::saturating_add),
            _ => 0,
        };
        self.take(values.len().saturating_add(bytes))
    }

    /// Elements left.
    pub fn remaining(&self) -> usize {
        self.remaining
    }
}

/// IEEE 754 binary16 bits to f32 (exact).
pub fn half_to_f32(bits: u16) -> f32 {
    let sign = u32::from(bits >> 15) << 31;
    let exponent = u32::from((bits >> 10) & 0x1f);
    let mantissa = u32::from(bits & 0x3ff);
    let magnitude = match (exponent, mantissa) {
        (0, 0) => 0,
        (0, m) => {
            // Subnormal: m × 2^-24, exactly representable in f32.
            let value = m as f32 * f32::from_bits(0x3380_0000);
            value.to_bits()
        }
        (31, m) => 0x7f80_0000 | (m << 13),
        (e, m) => ((e + 112) << 23) | (m << 13),
    };
    f32::from_bits(sign | magnitude)
}

/// bfloat16 bits to f32 (exact: bfloat16 is the top half of an f32).
pub fn bfloat16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// Checks a shape and returns its element count, bounded by `max_elements`.
///
/// The product of the non-zero dimensions must stay within the bound too, so that a
/// zero-element shape such as `[2^62, 2^62, 0]` is refused instead of overflowing
/// whoever multiplies its dimensions later.
pub fn element_count(shape: &[usize], max_elements: usize) -> Result<usize, DecodeError> {
    let mut product: usize = 1;
    for &d in shape.iter().filter(|d| **d != 0) {
        product = product.checked_mul(d).filter(|c| *c <= max_elements).ok_or_else(|| {
            DecodeError::new(reason::TOO_LARGE, format!("shape {shape:?} exceeds the configured maximum element count"))
        })?;
    }
    Ok(if shape.contains(&0) { 0 } else { product })
}

fn proto_shape(proto: &TensorProto) -> Result<Vec<usize>, DecodeError> {
    let Some(shape) = &proto.tensor_shape else {
        return Ok(Vec::new());
    };
    if shape.unknown_rank {
        return Err(DecodeError::new(reason::BAD_SHAPE, "tensor shape has unknown rank"));
    }
    if shape.dim.len() > MAX_RANK {
        return Err(DecodeError::new(reason::BAD_SHAPE, format!("rank {} is above {MAX_RANK}", shape.dim.len())));
    }
    shape
        .dim
        .iter()
        .map(|d| {
            usize::try_from(d.size)
                .map_err(|_| DecodeError::new(reason::BAD_SHAPE, format!("dimension {} is negative", d.size)))
        })
        .collect()
}

/// TensorFlow's own limit on tensor rank.
pub const MAX_RANK: usize = 254;

/// Decodes a TensorProto, in either encoding, into a `Tensor`.
///
/// `tensor_content` must hold exactly `elements × width` bytes. The typed fields may
/// hold fewer values than the shape: the last one is repeated, and none means zeros
/// (TensorFlow's broadcast rule); more values than the shape is an error.
pub fn tensor_from_proto(proto: &TensorProto, budget: &mut Budget) -> Result<Tensor, DecodeError> {
    let dtype = DType::from_proto(proto.dtype).ok_or_else(|| {
        let name = DataType::try_from(proto.dtype).map(|d| d.as_str_name()).unwrap_or("unknown");
        DecodeError::new(reason::UNSUPPORTED_DTYPE, format!("dtype {name} ({}) is not decoded", proto.dtype))
    })?;
    let shape = proto_shape(proto)?;
    let count = element_count(&shape, budget.remaining())?;
    budget.take(count)?;
    let values = if !proto.tensor_content.is_empty() {
        from_content(dtype, &proto.tensor_content, count)?
    } else {
        from_typed_fields(dtype, proto, count, budget)?
    };
    Ok(Tensor { dtype, shape, values })
}

fn from_content(dtype: DType, content: &[u8], count: usize) -> Result<TensorValues, DecodeError> {
    let width = dtype.content_width().unwrap_or(1);
    if count.checked_mul(width) != Some(content.len()) {
        return Err(DecodeError::new(
            reason::BAD_TENSOR_CONTENT,
            format!("tensor_content has {} bytes; {count} {} elements need {}", content.len(), dtype.tf_name(), {
                count.saturating_mul(width)
            }),
        ));
    }
    fn chunks<const N: usize>(content: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        content.chunks_exact(N).map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            a
        })
    }
    Ok(match dtype {
        DType::Float => TensorValues::Float(chunks::<4>(content).map(|b| f64::from(f32::from_le_bytes(b))).collect()),
        DType::Double => TensorValues::Float(chunks::<8>(content).map(f64::from_le_bytes).collect()),
        DType::Half => {
            TensorValues::Float(chunks::<2>(content).map(|b| f64::from(half_to_f32(u16::from_le_bytes(b)))).collect())
        }
        DType::BFloat16 => TensorValues::Float(
            chunks::<2>(content).map(|b| f64::from(bfloat16_to_f32(u16::from_le_bytes(b)))).collect(),
        ),
        DType::Int8 => TensorValues::Int(content.iter().map(|b| i64::from(*b as i8)).collect()),
        DType::Int16 => TensorValues::Int(chunks::<2>(content).map(|b| i64::from(i16::from_le_bytes(b))).collect()),
        DType::Int32 => TensorValues::Int(chunks::<4>(content).map(|b| i64::from(i32::from_le_bytes(b))).collect()),
        DType::Int64 => TensorValues::Int(chunks::<8>(content).map(i64::from_le_bytes).collect()),
        DType::UInt8 => TensorValues::UInt(content.iter().map(|b| u64::from(*b)).collect()),
        DType::UInt16 => TensorValues::UInt(chunks::<2>(content).map(|b| u64::from(u16::from_le_bytes(b))).collect()),
        DType::UInt32 => TensorValues::UInt(chunks::<4>(content).map(|b| u64::from(u32::from_le_bytes(b))).collect()),
        DType::UInt64 => TensorValues::UInt(chunks::<8>(content).map(u64::from_le_bytes).collect()),
        DType::Bool => TensorValues::Bool(content.iter().map(|b| *b != 0).collect()),
        DType::String => {
            return Err(DecodeError::new(
                reason::BAD_TENSOR_CONTENT,
                "DT_STRING tensors in tensor_content are not decoded",
            ))
        }
    })
}

/// Applies the broadcast rule to the `present` values of a typed field.
fn broadcast<T: Clone, U>(present: &[T], count: usize, zero: U, map: impl Fn(&T) -> U) -> Result<Vec<U>, DecodeError>
where
    U: Clone,
{
    if present.len() > count {
        return Err(DecodeError::new(
            reason::BAD_TENSOR,
            format!("{} values for a shape of {count} elements", present.len()),
        ));
    }
    let mut out = Vec::with_capacity(count);
    out.extend(present.iter().map(&map));
    let fill = present.last().map(&map).unwrap_or(zero);
    out.resize(count, fill);
    Ok(out)
}

fn from_typed_fields(
    dtype: DType,
    p: &TensorProto,
    count: usize,
    budget: &mut Budget,
) -> Result<TensorValues, DecodeError> {
    Ok(match dtype {
        DType::Float => TensorValues::Float(broadcast(&p.float_val, count, 0.0, |v| f64::from(*v))?),
        DType::Double => TensorValues::Float(broadcast(&p.double_val, count, 0.0, |v| *v)?),
        DType::Half => TensorValues::Float(broadcast(&p.half_val, count, 0.0, |v| f64::from(half_to_f32(*v as u16)))?),
        DType::BFloat16 => {
            TensorValues::Float(broadcast(&p.half_val, count, 0.0, |v| f64::from(bfloat16_to_f32(*v as u16)))?)
        }
        // Narrow integer dtypes travel in int_val; TensorFlow truncates to the width.
        DType::Int8 => TensorValues::Int(broadcast(&p.int_val, count, 0, |v| i64::from(*v as i8))?),
        DType::Int16 => TensorValues::Int(broadcast(&p.int_val, count, 0, |v| i64::from(*v as i16))?),
        DType::Int32 => TensorValues::Int(broadcast(&p.int_val, count, 0, |v| i64::from(*v))?),
        DType::Int64 => TensorValues::Int(broadcast(&p.int64_val, count, 0, |v| *v)?),
        DType::UInt8 => TensorValues::UInt(broadcast(&p.int_val, count, 0, |v| u64::from(*v as u8))?),
        DType::UInt16 => TensorValues::UInt(broadcast(&p.int_val, count, 0, |v| u64::from(*v as u16))?),
        DType::UInt32 => TensorValues::UInt(broadcast(&p.uint32_val, count, 0, |v| u64::from(*v))?),
        DType::UInt64 => TensorValues::UInt(broadcast(&p.uint64_val, count, 0, |v| *v)?),
        DType::Bool => TensorValues::Bool(broadcast(&p.bool_val, count, false, |v| *v)?),
        DType::String => {
            // Repeated strings cost their bytes, not just one element each.
            if let Some(last) = p.string_val.last() {
                let copies = count.saturating_sub(p.string_val.len());
                budget.take(copies.saturating_mul(last.len().div_ceil(8)))?;
            }
            TensorValues::Bytes(broadcast(&p.string_val, count, Vec::new(), |v| v.clone())?)
        }
    })
}

/// Values of one tf.Example feature: its list, typed as the list's kind says.
pub fn feature_values(
    feature: &super::proto::Feature,
    budget: &mut Budget,
) -> Result<Option<TensorValues>, DecodeError> {
    use super::proto::tensorflow::feature::Kind;
    Ok(match &feature.kind {
        None => None,
        Some(Kind::FloatList(list)) => {
            budget.take(list.value.len())?;
            Some(TensorValues::Float(list.value.iter().map(|v| f64::from(*v)).collect()))
        }
        Some(Kind::Int64List(list)) => {
            budget.take(list.value.len())?;
            Some(TensorValues::Int(list.value.clone()))
        }
        Some(Kind::BytesList(list)) => {
            budget.take(list.value.len())?;
            Some(TensorValues::Bytes(list.value.clone()))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_patterns_decode_exactly() {
        assert_eq!(half_to_f32(0x3800), 0.5);
        assert_eq!(half_to_f32(0xc000), -2.0);
        assert_eq!(half_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(half_to_f32(0x7c00), f32::INFINITY);
        assert!(half_to_f32(0x7e00).is_nan());
        assert_eq!(half_to_f32(0x8000).to_bits(), (-0.0f32).to_bits());
        assert_eq!(bfloat16_to_f32(0x3f80), 1.0);
    }

    #[test]
    fn an_overflowing_shape_is_too_large_not_a_panic() {
        let e = element_count(&[usize::MAX, 3], usize::MAX).unwrap_err();
        assert_eq!(e.reason, reason::TOO_LARGE);
        assert_eq!(element_count(&[3, 0], 10).unwrap(), 0);
        let e = element_count(&[usize::MAX, usize::MAX, 0], usize::MAX).unwrap_err();
        assert_eq!(e.reason, reason::TOO_LARGE, "a zero dimension does not excuse the others");
        assert_eq!(element_count(&[], 10).unwrap(), 1);
    }
}
