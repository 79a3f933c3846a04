//! The join store behind one trait: pending prediction rows (one record per
//! exchange, see `record`), per-stream metadata, per-bucket label aggregates, and the
//! due index from which buckets are claimed for emission.
//!
//! `embedded` keeps everything in one redb file under the output dir (one replica);
//! `redis` keeps it in Redis or a Redis Cluster, where aggregate updates are Lua
//! scripts and the claim of a bucket is atomic, so several replicas share the work
//! and emit each bucket once. A store never computes metrics and never sees raw
//! features.

pub mod embedded;
pub mod redis;
mod segments;

use super::aggregate::BucketDelta;
use super::record::{BucketId, PendingRow, RowRef, StreamMeta};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

/// A store operation in flight.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Why the store failed; the label endpoint answers 503 with it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("embedded label store {path}: {detail}")]
    Embedded { path: String, detail: String },
    #[error("redis label store: {0}")]
    Redis(String),
}

/// Rows of one observation, all in one bucket of one stream.
#[derive(Debug, Clone)]
pub struct RecordBatch {
    /// The bucket the rows were predicted in.
    pub bucket: BucketId,
    /// When the bucket's label metrics are due, epoch ms (indexes the bucket).
    pub due_ms: i64,
    /// Until when the bucket's aggregate is kept (to recognise late labels), epoch ms.
    pub retain_until_ms: i64,
    /// When the records may be forgotten, epoch ms.
    pub expires_ms: i64,
    /// Rows a label can join through the records (added to the bucket's count).
    pub rows: u64,
    /// `(key, encoded ExchangeRecord)`: one record for the exchange, keyed by its
    /// request id, plus one one-row record per row that has its own id (id feature).
    pub records: Vec<(String, Vec<u8>)>,
}

/// A row taken for a label: where it was, and what label metrics need of it.
#[derive(Debug, Clone, PartialEq)]
pub struct TakenRow {
    /// The record and row it was taken from (to put it back, see `restore`).
    pub at: RowRef,
    /// The prediction.
    pub row: PendingRow,
}

/// What one batch of labels adds to one bucket.
#[derive(Debug, Clone)]
pub struct BucketUpdate {
    /// The bucket the delta belongs to.
    pub bucket: BucketId,
    /// When the bucket is due, epoch ms: it is indexed for emission by that time.
    pub due_ms: i64,
    /// Until when the bucket's aggregate is kept, epoch ms.
    pub retain_until_ms: i64,
    /// Refuse the update when the bucket was claimed or is due by `now_ms` (labels for
    /// it are then late). Counters of arrival buckets are not checked.
    pub refuse_when_due: bool,
    /// What the batch adds.
    pub delta: BucketDelta,
}

/// A bucket whose emission this replica won, with everything needed to emit it.
#[derive(Debug, Clone)]
pub struct ClaimedBucket {
    /// The bucket won (its stream and start name the points).
    pub bucket: BucketId,
    /// The aggregate's fields (see `aggregate`).
    pub fields: BTreeMap<String, String>,
    /// The exact AUC entries.
    pub auc: Vec<String>,
}

/// Gauges of the store for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Prediction rows waiting for a label (embedded store only).
    pub pending_rows: Option<u64>,
    /// Rows evicted because the store was full, since start.
    pub evictions: u64,
    /// Rows that could not be written (store errors), since start.
    pub failed_rows: u64,
    /// Damaged store files moved aside and replaced by an empty store, since start.
    pub corrupt_files: u64,
}

/// The join store. Every method is safe to call from several tasks (and, for Redis,
/// several replicas) at once.
pub trait LabelStore: Send + Sync + 'static {
    /// Remembers a stream's metadata (idempotent).
    fn put_stream(&self, meta: StreamMeta) -> StoreFuture<'_, ()>;
    /// A stream's metadata, if known.
    fn stream(&self, id: u64) -> StoreFuture<'_, Option<StreamMeta>>;
    /// Stores exchange records, counts their rows in their bucket and indexes the
    /// bucket. The write may happen after the call returns (see `flush`).
    fn record(&self, batches: Vec<RecordBatch>) -> StoreFuture<'_, ()>;
    /// Returns once every row recorded before the call is written.
    fn flush(&self) -> StoreFuture<'_, ()>;
    /// Takes the rows these label ids name (`RowRef::candidates`), atomically per
    /// row: of concurrent takers, exactly one gets a row, and a row is taken once.
    /// Unknown, already taken and expired rows come back as None.
    fn take(&self, ids: Vec<String>, now_ms: i64) -> StoreFuture<'_, Vec<Option<TakenRow>>>;
    /// Puts back rows taken for labels that turned out invalid.
    fn restore(&self, rows: Vec<TakenRow>) -> StoreFuture<'_, ()>;
    /// Adds deltas to buckets, each atomically; returns, per update, whether it was
    /// applied (false: refused because the bucket is due or claimed).
    fn apply(&self, updates: Vec<BucketUpdate>, now_ms: i64) -> StoreFuture<'_, Vec<bool>>;
    /// Claims the buckets due by `now_ms`; a bucket is returned to exactly one caller
    /// across all replicas, once.
    fn claim_due(&self, now_ms: i64) -> StoreFuture<'_, Vec<ClaimedBucket>>;
    /// Confirms that claimed buckets' points were written. A store shared by replicas
    /// holds a claim only for a lease until then, so that a replica dying between
    /// claim and write does not lose the bucket; a store of one process claims for good.
    fn confirm(&self, _buckets: Vec<BucketId>) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    /// Drops expired rows and aggregates and makes recent writes durable.
    fn maintain(&self, now_ms: i64) -> StoreFuture<'_, ()>;
    /// Current gauges.
    fn stats(&self) -> StoreStats;
    /// What is wrong with the store when it cannot serve (failed, reopening); None
    /// when it works. `/readyz` reports it as degraded monitoring.
    fn health(&self) -> Option<String> {
        None
    }
}
