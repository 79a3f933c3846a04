//! What the join store keeps per exchange, per prediction row and per stream, and how
//! it is encoded.
//!
//! The store keeps one *exchange record* per captured exchange, keyed by its request
//! id and holding every row (`ExchangeRecord`): recording costs one write per
//! exchange, not one per row. A label `ID:ROW` finds row ROW of the record `ID`; a
//! label `ID` finds the single row of a one-row record (`RowRef::candidates`). Each
//! record carries a bitmap of the rows already taken by a label, so a row joins one
//! label only. The stream is interned as a 64-bit hash whose metadata (names,
//! classes) is stored once per stream. This module never holds raw features: only
//! what label metrics need.

use crate::tfserving::StreamKey;
use serde::{Deserialize, Serialize};

/// Format byte of an encoded row (the per-row layout of format 1, which the embedded
/// store converts when it opens a file written with it).
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
    /// it halves the row); empty for a regression row.
    pub probabilities: Vec<f32>,
    /// A regression row's prediction (kept in full: its errors are exact metrics);
    /// None for a classifier's row.
    pub prediction: Option<f64>,
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
        Some(PendingRow { stream, bucket_start, expires_ms, predicted, probabilities, prediction: None })
    }
}

/// Format byte of an exchange record, so a future layout can be told apart on disk.
pub const EXCHANGE_FORMAT: u8 = 2;
/// Bytes of an exchange record before its taken-row bitmap: format, flags, classes
/// (u16), rows (u32), stream, bucket start, expiry (8 bytes each), little-endian.
pub const EXCHANGE_HEADER: usize = 32;
/// Flag: the record's rows are addressed `ID:ROW` (the exchange had several rows);
/// without it the record has one row, addressed `ID`.
const FLAG_SUFFIXED: u8 = 1;
/// Flag: the record holds a regression model's rows. Each row has the width of a
/// two-class row (so the Redis scripts, which compute widths from the class count,
/// need not know): two unused bytes, then the prediction as an f64.
const FLAG_REGRESSION: u8 = 2;
/// The class count a regression record declares, for its row width.
const REGRESSION_WIDTH_CLASSES: usize = 2;

/// Where a label id points: a row of the exchange record stored under `key`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RowRef {
    /// The record's key: the exchange's request id, or a row's own id.
    pub key: String,
    /// The row within the record.
    pub row: u32,
    /// Whether the label id carried the `:ROW` suffix: a suffixed id only matches a
    /// record of a several-row exchange, an unsuffixed one only a one-row record.
    pub suffixed: bool,
}

impl RowRef {
    /// The rows a label id may name, in the order they are tried. `P:N` (N a row
    /// number as the proxy writes it: decimal, no leading zero) is first row N of the
    /// several-row exchange `P`, then the one-row record `P:N` (a request id or an id
    /// feature that happens to end in `:N`); any other id names a one-row record.
    pub fn candidates(id: &str) -> (RowRef, Option<RowRef>) {
        let whole = RowRef { key: id.to_string(), row: 0, suffixed: false };
        let Some((prefix, digits)) = id.rsplit_once(':') else { return (whole, None) };
        let canonical = !digits.is_empty()
            && digits.bytes().all(|b| b.is_ascii_digit())
            && (digits == "0" || !digits.starts_with('0'));
        match digits.parse::<u32>() {
            Ok(row) if canonical => (RowRef { key: prefix.to_string(), row, suffixed: true }, Some(whole)),
            _ => (whole, None),
        }
    }
}

/// Bytes of one row in an exchange record: predicted class and k probabilities.
fn row_bytes(classes: usize) -> usize {
    2 + 4 * classes
}

/// Bytes of the taken-row bitmap of `rows` rows.
fn bitmap_bytes(rows: usize) -> usize {
    rows.div_ceil(8)
}

/// Position and mask of a row's bit in the bitmap, in the bit order of Redis
/// `SETBIT` (bit 0 is the high bit of the first byte), so Redis can flip it in place.
fn taken_bit(row: usize) -> (usize, u8) {
    (EXCHANGE_HEADER + row / 8, 0x80 >> (row % 8))
}

/// Builds an exchange record row by row.
#[derive(Debug)]
pub struct ExchangeWriter {
    /// The record being written; its length is final from the start.
    bytes: Vec<u8>,
    /// Rows written so far.
    written: usize,
    /// Classes per row.
    classes: usize,
}

impl ExchangeWriter {
    /// A record of `rows` rows of `classes` classes. `suffixed`: the rows are
    /// addressed `KEY:ROW` (the exchange had several rows).
    pub fn new(stream: u64, bucket_start: i64, expires_ms: i64, suffixed: bool, classes: usize, rows: usize) -> Self {
        let len = EXCHANGE_HEADER + bitmap_bytes(rows) + rows * row_bytes(classes);
        let mut bytes = Vec::with_capacity(len);
        bytes.push(EXCHANGE_FORMAT);
        bytes.push(if suffixed { FLAG_SUFFIXED } else { 0 });
        bytes.extend_from_slice(&(classes as u16).to_le_bytes());
        bytes.extend_from_slice(&(rows as u32).to_le_bytes());
        bytes.extend_from_slice(&stream.to_le_bytes());
        bytes.extend_from_slice(&bucket_start.to_le_bytes());
        bytes.extend_from_slice(&expires_ms.to_le_bytes());
        bytes.resize(EXCHANGE_HEADER + bitmap_bytes(rows), 0);
        ExchangeWriter { bytes, written: 0, classes }
    }

    /// A record of `rows` regression rows (see `FLAG_REGRESSION`); fill it with
    /// `push_prediction`.
    pub fn new_regression(stream: u64, bucket_start: i64, expires_ms: i64, suffixed: bool, rows: usize) -> Self {
        let mut writer =
            ExchangeWriter::new(stream, bucket_start, expires_ms, suffixed, REGRESSION_WIDTH_CLASSES, rows);
        writer.bytes[1] |= FLAG_REGRESSION;
        writer
    }

    /// Appends the next row of a regression record.
    pub fn push_prediction(&mut self, prediction: f64) {
        self.bytes.extend_from_slice(&[0, 0]);
        self.bytes.extend_from_slice(&prediction.to_le_bytes());
        self.written += 1;
    }

    /// Appends the next row (`probabilities` has the record's class count).
    pub fn push_row(&mut self, predicted: u16, probabilities: &[f64]) {
        debug_assert_eq!(probabilities.len(), self.classes);
        self.bytes.extend_from_slice(&predicted.to_le_bytes());
        for p in probabilities {
            self.bytes.extend_from_slice(&(*p as f32).to_le_bytes());
        }
        self.written += 1;
    }

    /// Appends rows at once: `probabilities` holds them one after the other (the
    /// record's class count each); `predicted` gives the predicted class of the n-th
    /// of them. The same bytes as `push_row` per row, written in place.
    pub fn push_rows(&mut self, probabilities: &[f64], mut predicted: impl FnMut(usize) -> u16) {
        let width = row_bytes(self.classes);
        let rows = probabilities.len().checked_div(self.classes).unwrap_or(0);
        let start = self.bytes.len();
        self.bytes.resize(start + rows * width, 0);
        let out = self.bytes[start..].chunks_exact_mut(width);
        for (row, (out, probs)) in out.zip(probabilities.chunks_exact(self.classes)).enumerate() {
            let (class, values) = out.split_at_mut(2);
            class.copy_from_slice(&predicted(row).to_le_bytes());
            for (value, p) in values.chunks_exact_mut(4).zip(probs) {
                value.copy_from_slice(&(*p as f32).to_le_bytes());
            }
        }
        self.written += rows;
    }

    /// Marks a row as not joinable through this record (its id is another's, or too
    /// long to be posted).
    pub fn mark_taken(&mut self, row: usize) {
        let (at, mask) = taken_bit(row);
        self.bytes[at] |= mask;
    }

    /// The encoded record.
    pub fn finish(self) -> Vec<u8> {
        self.bytes
    }
}

/// A checked view of an encoded exchange record.
#[derive(Debug, Clone, Copy)]
pub struct ExchangeRecord<'a> {
    bytes: &'a [u8],
    rows: usize,
    classes: usize,
}

impl<'a> ExchangeRecord<'a> {
    /// Checks the layout; None for bytes that are not a record of this format.
    pub fn parse(bytes: &'a [u8]) -> Option<ExchangeRecord<'a>> {
        let header = RecordHeader::parse(bytes)?;
        let (rows, classes) = (header.rows, header.classes);
        if bytes.len() != EXCHANGE_HEADER + bitmap_bytes(rows) + rows * row_bytes(classes) {
            return None;
        }
        Some(ExchangeRecord { bytes, rows, classes })
    }

    fn header(&self) -> RecordHeader {
        RecordHeader::parse(self.bytes).unwrap_or_default()
    }

    /// Rows in the record.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Whether the rows are addressed `KEY:ROW`.
    pub fn suffixed(&self) -> bool {
        self.bytes[1] & FLAG_SUFFIXED != 0
    }

    /// When the store may forget the record, epoch ms.
    pub fn expires_ms(&self) -> i64 {
        self.header().expires_ms
    }

    /// Whether a row was taken by a label (or was never joinable through the record).
    pub fn is_taken(&self, row: usize) -> bool {
        let (at, mask) = taken_bit(row);
        self.bytes[at] & mask != 0
    }

    /// Rows still waiting for a label.
    pub fn untaken(&self) -> usize {
        let bitmap = &self.bytes[EXCHANGE_HEADER..EXCHANGE_HEADER + bitmap_bytes(self.rows)];
        // Padding bits past the last row are never set.
        self.rows - bitmap.iter().map(|b| b.count_ones() as usize).sum::<usize>()
    }

    /// Where the bitmap of taken rows is in the record's bytes.
    pub fn taken_bitmap_range(&self) -> std::ops::Range<usize> {
        EXCHANGE_HEADER..EXCHANGE_HEADER + bitmap_bytes(self.rows)
    }

    /// The rows still waiting for a label, in row order.
    pub fn untaken_rows(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.rows).filter(|r| !self.is_taken(*r))
    }

    /// The bytes of one row (predicted class and probabilities).
    pub fn row_bytes(&self, row: usize) -> &'a [u8] {
        let len = row_bytes(self.classes);
        let at = EXCHANGE_HEADER + bitmap_bytes(self.rows) + row * len;
        &self.bytes[at..at + len]
    }

    /// One row as label metrics see it; None past the last row.
    pub fn row(&self, row: usize) -> Option<PendingRow> {
        if row >= self.rows {
            return None;
        }
        PendingRow::from_record_parts(&self.bytes[..EXCHANGE_HEADER], self.row_bytes(row))
    }
}

/// Sets or clears a row's taken bit in an encoded record (checked by the caller).
pub fn set_taken(bytes: &mut [u8], row: usize, taken: bool) {
    let (at, mask) = taken_bit(row);
    if taken {
        bytes[at] |= mask;
    } else {
        bytes[at] &= !mask;
    }
}

/// The fixed header of an exchange record.
#[derive(Debug, Clone, Copy, Default)]
struct RecordHeader {
    regression: bool,
    classes: usize,
    rows: usize,
    stream: u64,
    bucket_start: i64,
    expires_ms: i64,
}

impl RecordHeader {
    fn parse(bytes: &[u8]) -> Option<RecordHeader> {
        let head = bytes.get(..EXCHANGE_HEADER)?;
        if head[0] != EXCHANGE_FORMAT {
            return None;
        }
        let u64_at = |at: usize| u64::from_le_bytes(head[at..at + 8].try_into().unwrap_or_default());
        let classes = usize::from(u16::from_le_bytes([head[2], head[3]]));
        let rows = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
        if classes == 0 || rows == 0 {
            return None;
        }
        let regression = head[1] & FLAG_REGRESSION != 0;
        if regression && classes != REGRESSION_WIDTH_CLASSES {
            return None;
        }
        Some(RecordHeader {
            regression,
            classes,
            rows,
            stream: u64_at(8),
            bucket_start: u64_at(16) as i64,
            expires_ms: u64_at(24) as i64,
        })
    }
}

impl PendingRow {
    /// A row from a record's header and the bytes of that row (what the Redis take
    /// script returns); None when they do not fit together.
    pub fn from_record_parts(header: &[u8], row: &[u8]) -> Option<PendingRow> {
        let header = RecordHeader::parse(header)?;
        if row.len() != row_bytes(header.classes) {
            return None;
        }
        if header.regression {
            let prediction = f64::from_le_bytes(row[2..10].try_into().ok()?);
            return Some(PendingRow {
                stream: header.stream,
                bucket_start: header.bucket_start,
                expires_ms: header.expires_ms,
                predicted: 0,
                probabilities: Vec::new(),
                prediction: Some(prediction),
            });
        }
        let predicted = u16::from_le_bytes([row[0], row[1]]);
        if usize::from(predicted) >= header.classes {
            return None;
        }
        let probabilities =
            row[2..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<_>>();
        Some(PendingRow {
            stream: header.stream,
            bucket_start: header.bucket_start,
            expires_ms: header.expires_ms,
            predicted,
            probabilities,
            prediction: None,
        })
    }

    /// A record holding this row alone at `row` (the rows before it marked taken), to
    /// put back a row whose record is gone when a label for it proved invalid.
    pub fn to_record(&self, row: usize, suffixed: bool) -> Vec<u8> {
        if let Some(prediction) = self.prediction {
            let mut writer =
                ExchangeWriter::new_regression(self.stream, self.bucket_start, self.expires_ms, suffixed, row + 1);
            for r in 0..row {
                writer.push_prediction(0.0);
                writer.mark_taken(r);
            }
            writer.push_prediction(prediction);
            return writer.finish();
        }
        let classes = self.probabilities.len();
        let mut writer =
            ExchangeWriter::new(self.stream, self.bucket_start, self.expires_ms, suffixed, classes, row + 1);
        let filler = vec![0.0; classes];
        for r in 0..row {
            writer.push_row(0, &filler);
            writer.mark_taken(r);
        }
        let probabilities: Vec<f64> = self.probabilities.iter().map(|p| f64::from(*p)).collect();
        writer.push_row(self.predicted, &probabilities);
        writer.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exchange_records_round_trip_every_row_and_track_taken_rows() {
        let mut writer = ExchangeWriter::new(7, 1_700_000_040, 1_700_007_300_000, true, 3, 10);
        for r in 0..10u16 {
            writer.push_row(r % 3, &[0.125, 0.25 + f64::from(r) / 64.0, 0.625 - f64::from(r) / 64.0]);
        }
        writer.mark_taken(9);
        let mut bytes = writer.finish();
        assert_eq!(bytes.len(), EXCHANGE_HEADER + 2 + 10 * (2 + 12));
        let record = ExchangeRecord::parse(&bytes).unwrap();
        assert!(record.suffixed());
        assert_eq!((record.rows(), record.untaken(), record.expires_ms()), (10, 9, 1_700_007_300_000));
        let row = record.row(4).unwrap();
        assert_eq!((row.stream, row.bucket_start, row.predicted), (7, 1_700_000_040, 1));
        assert_eq!(row.probabilities, vec![0.125, 0.3125, 0.5625]);
        assert_eq!(PendingRow::from_record_parts(&bytes[..EXCHANGE_HEADER], record.row_bytes(4)), Some(row));
        assert!(record.row(10).is_none());
        set_taken(&mut bytes, 0, true);
        set_taken(&mut bytes, 9, false);
        let record = ExchangeRecord::parse(&bytes).unwrap();
        assert!(record.is_taken(0) && !record.is_taken(9));
        assert_eq!(record.untaken_rows().collect::<Vec<_>>(), (1..10).collect::<Vec<_>>());
        // Bit order of Redis SETBIT: row 0 is the high bit of the bitmap's first byte.
        assert_eq!(bytes[EXCHANGE_HEADER], 0x80);
        assert!(ExchangeRecord::parse(&bytes[..bytes.len() - 1]).is_none());
        assert!(ExchangeRecord::parse(b"garbage").is_none());
        let mut old_format = bytes.clone();
        old_format[0] = ROW_FORMAT;
        assert!(ExchangeRecord::parse(&old_format).is_none());
    }

    #[test]
    fn rows_pushed_at_once_are_the_bytes_of_rows_pushed_one_by_one() {
        let values: Vec<f64> = (0..21).map(|i| f64::from(i) / 20.0 + 1e-9).collect();
        let mut one_by_one = ExchangeWriter::new(7, 60, 9_000, true, 3, 7);
        for (row, probs) in values.chunks_exact(3).enumerate() {
            one_by_one.push_row((row % 3) as u16, probs);
        }
        one_by_one.mark_taken(2);
        let mut at_once = ExchangeWriter::new(7, 60, 9_000, true, 3, 7);
        at_once.push_rows(&values, |row| (row % 3) as u16);
        at_once.mark_taken(2);
        assert_eq!(at_once.written, 7);
        let bytes = at_once.finish();
        assert_eq!(bytes, one_by_one.finish());
        let record = ExchangeRecord::parse(&bytes).unwrap();
        assert_eq!(record.row(4).unwrap().predicted, 1);
        assert_eq!(record.row(6).unwrap().probabilities, vec![0.9f32, 0.95, 1.0]);
    }

    #[test]
    fn a_row_put_back_alone_keeps_its_address_and_values() {
        let row = PendingRow {
            stream: 3,
            bucket_start: 60,
            expires_ms: 9_000,
            predicted: 1,
            probabilities: vec![0.25, 0.75],
            prediction: None,
        };
        let bytes = row.to_record(5, true);
        let record = ExchangeRecord::parse(&bytes).unwrap();
        assert_eq!((record.rows(), record.untaken(), record.suffixed()), (6, 1, true));
        assert_eq!(record.row(5), Some(row));
    }

    #[test]
    fn regression_records_keep_full_predictions_and_put_back_alone() {
        let mut writer = ExchangeWriter::new_regression(7, 60, 9_000, true, 3);
        for v in [12.345678901234567, -0.1, 1e300] {
            writer.push_prediction(v);
        }
        let bytes = writer.finish();
        // The width of a two-class row: what the Redis scripts compute from the header.
        assert_eq!(bytes.len(), EXCHANGE_HEADER + 1 + 3 * (2 + 4 * 2));
        let record = ExchangeRecord::parse(&bytes).unwrap();
        assert!(record.suffixed());
        let row = record.row(0).unwrap();
        assert_eq!((row.prediction, row.probabilities.len()), (Some(12.345678901234567), 0));
        assert_eq!(record.row(2).unwrap().prediction, Some(1e300));
        let alone = record.row(1).unwrap().to_record(1, true);
        let back = ExchangeRecord::parse(&alone).unwrap();
        assert_eq!((back.rows(), back.untaken()), (2, 1));
        assert_eq!(back.row(1).unwrap().prediction, Some(-0.1));
        // A classifier's record is never read as a regression one, nor the reverse.
        let mut classifier = ExchangeWriter::new(7, 60, 9_000, false, 2, 1);
        classifier.push_row(1, &[0.25, 0.75]);
        let classifier = classifier.finish();
        assert_eq!(ExchangeRecord::parse(&classifier).unwrap().row(0).unwrap().prediction, None);
    }

    #[test]
    fn label_ids_name_a_row_of_an_exchange_then_a_one_row_record() {
        let suffixed = |key: &str, row| RowRef { key: key.into(), row, suffixed: true };
        let whole = |key: &str| RowRef { key: key.into(), row: 0, suffixed: false };
        assert_eq!(RowRef::candidates("req-1:63"), (suffixed("req-1", 63), Some(whole("req-1:63"))));
        assert_eq!(RowRef::candidates("a:b:0"), (suffixed("a:b", 0), Some(whole("a:b:0"))));
        assert_eq!(RowRef::candidates(":2"), (suffixed("", 2), Some(whole(":2"))));
        for id in ["req-1", "req:01", "req:", "req:x1", "req:99999999999", "req:+1"] {
            assert_eq!(RowRef::candidates(id), (whole(id), None), "{id}");
        }
    }

    #[test]
    fn rows_round_trip_through_their_binary_layout() {
        let row = PendingRow {
            stream: 0xdead_beef_0102_0304,
            bucket_start: 1_700_000_040,
            expires_ms: 1_700_007_300_000,
            predicted: 2,
            probabilities: vec![0.125, 0.25, 0.625],
            prediction: None,
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
