//! What the join store keeps per prediction row and per stream, and how it is encoded.
//!
//! A pending row is a fixed little-endian record of `29 + 4k` bytes (k classes): the
//! stream is interned as a 64-bit hash whose metadata (names, classes) is stored once
//! per stream. This module never holds raw features: only what label metrics need.

use crate::tfserving::StreamKey;
use serde::{Deserialize, Serialize};

/// Format byte of an encoded row, so a future layout can be told apart on disk.
const ROW_FORMAT: u8 = 1;
/// Header bytes before the probabilities.
const ROW_HEADER: usize = 1 + 8 + 8 + 8 + 2 + 2;
/// Most classes a row may carry (the class index is encoded in 16 bits).
pub const MAX_CLASSES: usize = u16::MAX as usize;

/// FNV-1a, 64 bits: stable across processes and versions, unlike `DefaultHasher`,
/// because replicas must agree on the ids of streams and buckets.
pub fn fnv1a64(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.iter() {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        // A separator keeps ("ab", "c") and ("a", "bc") apart.
        hash ^= 0xff;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// A stream as the store remembers it: the key of its points and its class names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamMeta {
    /// Model name (the `model` property and the Anodot file's folder).
    pub model: String,
    /// Served version, when known (`version` property).
    pub version: Option<i64>,
    /// Signature name (`signature` property); empty for the streams that only count
    /// unmatched labels, which have no signature.
    pub signature: String,
    /// Class names by index, to resolve labels given by name and to name points.
    pub class_names: Vec<String>,
}

impl StreamMeta {
    /// The metadata of an observed stream with `classes` classes.
    pub fn of(stream: &StreamKey, class_names: Vec<String>) -> Self {
        StreamMeta {
            model: stream.model.clone(),
            version: stream.version,
            signature: stream.signature.clone(),
            class_names,
        }
    }

    /// The pseudo-stream under which labels matching no prediction are counted.
    pub fn unmatched(model: &str) -> Self {
        StreamMeta { model: model.to_string(), version: None, signature: String::new(), class_names: Vec::new() }
    }

    /// The interned id of the stream (class names excluded: they follow the stream).
    pub fn id(&self) -> u64 {
        let version = self.version.map(|v| v.to_string()).unwrap_or_default();
        fnv1a64(&[self.model.as_bytes(), version.as_bytes(), self.signature.as_bytes()])
    }
}

/// One bucket of one stream: where label aggregates accumulate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketId {
    /// `StreamMeta::id` of the stream.
    pub stream: u64,
    /// Bucket start, epoch seconds.
    pub start: i64,
}

impl BucketId {
    /// `<stream hex>:<start>`: the member of the due index and, inside braces, the
    /// Redis Cluster hash tag of the bucket's keys.
    pub fn key(&self) -> String {
        format!("{:016x}:{}", self.stream, self.start)
    }

    /// Parses `key`.
    pub fn parse(key: &str) -> Option<BucketId> {
        let (stream, start) = key.split_once(':')?;
        Some(BucketId { stream: u64::from_str_radix(stream, 16).ok()?, start: start.parse().ok()? })
    }
}

/// What one prediction row leaves in the store.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingRow {
    /// `StreamMeta::id` of the row's stream.
    pub stream: u64,
    /// Start of the bucket the prediction belongs to, epoch seconds.
    pub bucket_start: i64,
    /// When the store may forget the row, epoch milliseconds.
    pub expires_ms: i64,
    /// The class the model predicted.
    pub predicted: u16,
    /// The row's class probabilities (f32: label metrics need no more precision, and
    /// it halves the row).
    pub probabilities: Vec<f32>,
}

impl PendingRow {
    /// The fixed binary layout, `29 + 4k` bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ROW_HEADER + 4 * self.probabilities.len());
        out.push(ROW_FORMAT);
        out.extend_from_slice(&self.stream.to_le_bytes());
        out.extend_from_slice(&self.bucket_start.to_le_bytes());
        out.extend_from_slice(&self.expires_ms.to_le_bytes());
        out.extend_from_slice(&self.predicted.to_le_bytes());
        out.extend_from_slice(&(self.probabilities.len() as u16).to_le_bytes());
        for p in &self.probabilities {
            out.extend_from_slice(&p.to_le_bytes());
        }
        out
    }

    /// Decodes a row; None for bytes that are not one (another format, truncation).
    pub fn decode(bytes: &[u8]) -> Option<PendingRow> {
        if bytes.len() < ROW_HEADER || bytes[0] != ROW_FORMAT {
            return None;
        }
        let u64_at = |at: usize| bytes.get(at..at + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
        let u16_at = |at: usize| bytes.get(at..at + 2).and_then(|b| b.try_into().ok()).map(u16::from_le_bytes);
        let stream = u64_at(1)?;
        let bucket_start = u64_at(9)? as i64;
        let expires_ms = u64_at(17)? as i64;
        let predicted = u16_at(25)?;
        let classes = usize::from(u16_at(27)?);
        let body = &bytes[ROW_HEADER..];
        if body.len() != 4 * classes || usize::from(predicted) >= classes.max(1) {
            return None;
        }
        let probabilities =
            body.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<_>>();
        Some(PendingRow { stream, bucket_start, expires_ms, predicted, probabilities })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_through_their_binary_layout() {
        let row = PendingRow {
            stream: 0xdead_beef_0102_0304,
            bucket_start: 1_700_000_040,
            expires_ms: 1_700_007_300_000,
            predicted: 2,
            probabilities: vec![0.125, 0.25, 0.625],
        };
        let bytes = row.encode();
        assert_eq!(bytes.len(), 29 + 4 * 3);
        assert_eq!(PendingRow::decode(&bytes), Some(row));
        assert_eq!(PendingRow::decode(&bytes[..bytes.len() - 1]), None);
        assert_eq!(PendingRow::decode(b"garbage"), None);
    }

    #[test]
    fn bucket_keys_parse_back() {
        let id = BucketId { stream: 42, start: -5 };
        assert_eq!(BucketId::parse(&id.key()), Some(id));
        assert_eq!(BucketId::parse("zz:1"), None);
    }

    #[test]
    fn stream_ids_do_not_depend_on_class_names_and_separate_fields() {
        let a = StreamMeta { model: "ab".into(), version: Some(1), signature: "c".into(), class_names: vec![] };
        let b = StreamMeta { class_names: vec!["x".into()], ..a.clone() };
        let c = StreamMeta { model: "a".into(), signature: "bc".into(), ..a.clone() };
        assert_eq!(a.id(), b.id());
        assert_ne!(a.id(), c.id());
    }
}
