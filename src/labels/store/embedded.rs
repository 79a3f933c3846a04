//! The embedded join store: one redb file under the output dir, for a single
//! replica. It survives restarts (a prediction before a restart joins a label after
//! it), drops rows once they expire, and holds at most `max_pending_rows` rows,
//! evicting those closest to expiry first and counting them.
//!
//! redb is synchronous, so every operation runs on the blocking pool. Writes commit
//! without fsync (`Durability::None`: an fsync per observation would cap recording
//! at a few hundred per second); `maintain`, called with every `due` tick, and
//! closing the store commit durably. A crash loses at most the writes since the last
//! tick, never the file.

use super::{BucketUpdate, ClaimedBucket, LabelStore, RecordBatch, StoreError, StoreFuture, StoreStats};
use crate::labels::aggregate::{apply_delta, BucketDelta, F_AUC_LEN, F_CLAIMED, F_PREDICTED};
use crate::labels::record::{BucketId, PendingRow, StreamMeta};
use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// Pending rows: id -> encoded `PendingRow`. Ids are keyed as bytes: `&str` keys
/// are checked for UTF-8 on every comparison, a measurable share of a label's cost.
const ROWS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("rows");
/// Expiry order of the rows: (expires_ms, id); also the eviction order.
const EXPIRY: TableDefinition<(i64, &[u8]), ()> = TableDefinition::new("row_expiry");
/// Stream metadata: stream id -> JSON `StreamMeta`.
const STREAMS: TableDefinition<u64, &str> = TableDefinition::new("streams");
/// Bucket aggregates: bucket key -> JSON map of fields.
const BUCKETS: TableDefinition<&str, &[u8]> = TableDefinition::new("buckets");
/// Due index: (due_ms, bucket key).
const DUE: TableDefinition<(i64, &str), ()> = TableDefinition::new("bucket_due");
/// Exact AUC entries: (bucket key, sequence) -> `score,label`.
const AUC: TableDefinition<(&str, u64), &str> = TableDefinition::new("bucket_auc");
/// Retention index of the buckets: (retain_until_ms, bucket key).
const RETAIN: TableDefinition<(i64, &str), ()> = TableDefinition::new("bucket_retain");
/// Counters that must survive restarts: name -> value.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// redb's page cache. Its default (1 GiB) fills up under sustained recording and
/// would alone exceed mltap's memory budget. Leaves are read back through the OS
/// page cache; label ingestion measured as fast with 4 MiB as with 1 GiB.
const CACHE_BYTES: usize = 4 << 20;
/// Buffered rows that trigger a write of the buffer.
const FLUSH_ROWS: usize = 4096;
/// Field of a bucket holding how long it is kept, epoch ms.
const F_RETAIN: &str = "rt";

/// The redb-backed store.
pub struct EmbeddedStore {
    /// Shared with the blocking tasks that run the transactions.
    inner: Arc<Inner>,
}

struct Inner {
    /// The redb file.
    db: Database,
    /// The file, for error messages.
    path: PathBuf,
    /// The size bound on pending rows.
    max_rows: u64,
    /// Entries per bucket in the exact AUC list.
    auc_cap: usize,
    /// Pending rows after the last write, for the gauge.
    pending: AtomicU64,
    /// Evictions since the file was created.
    evictions: AtomicU64,
    /// Recorded rows not yet written: one transaction per observation would cost
    /// more than the observation's whole processing, so rows are written in batches,
    /// at the latest by the next write of any kind (a label, a tick).
    buffer: std::sync::Mutex<Vec<RecordBatch>>,
    /// Rows in `buffer`.
    buffered_rows: AtomicUsize,
}

impl EmbeddedStore {
    /// Opens (or creates) the store file, creating its directory.
    pub fn open(path: &Path, max_rows: u64, auc_cap: usize) -> Result<EmbeddedStore, StoreError> {
        let fail = |detail: String| StoreError::Embedded { path: path.display().to_string(), detail };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| fail(format!("cannot create its directory: {e}")))?;
        }
        let db = redb::Builder::new().set_cache_size(CACHE_BYTES).create(path).map_err(|e| fail(e.to_string()))?;
        let inner = Inner {
            db,
            path: path.to_path_buf(),
            max_rows,
            auc_cap,
            pending: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            buffer: std::sync::Mutex::new(Vec::new()),
            buffered_rows: AtomicUsize::new(0),
        };
        // Create the tables up front so readers never meet a missing table.
        inner.write(Durability::Immediate, |txn| {
            txn.open_table(ROWS)?;
            txn.open_table(EXPIRY)?;
            txn.open_table(STREAMS)?;
            txn.open_table(BUCKETS)?;
            txn.open_table(DUE)?;
            txn.open_table(AUC)?;
            txn.open_table(RETAIN)?;
            let meta = txn.open_table(META)?;
            let evictions = meta.get("evictions")?.map(|v| v.value()).unwrap_or(0);
            inner.evictions.store(evictions, Ordering::Relaxed);
            inner.pending.store(txn.open_table(ROWS)?.len()?, Ordering::Relaxed);
            Ok(())
        })?;
        Ok(EmbeddedStore { inner: Arc::new(inner) })
    }

    /// Runs a blocking operation on the blocking pool.
    fn run<T, F>(&self, op: F) -> StoreFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        Box::pin(async move {
            let path = inner.path.display().to_string();
            tokio::task::spawn_blocking(move || op(&inner))
                .await
                .map_err(|e| StoreError::Embedded { path, detail: format!("store task failed: {e}") })?
        })
    }
}

/// redb's several error types, flattened for `?` inside transactions.
struct DbError(String);

impl<E: std::fmt::Display> From<E> for DbError {
    fn from(e: E) -> Self {
        DbError(e.to_string())
    }
}

fn load_fields(
    buckets: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<BTreeMap<String, String>, DbError> {
    Ok(match buckets.get(key)? {
        Some(v) => serde_json::from_slice(v.value()).unwrap_or_default(),
        None => BTreeMap::new(),
    })
}

fn save_fields(
    buckets: &mut redb::Table<&'static str, &'static [u8]>,
    key: &str,
    fields: &BTreeMap<String, String>,
) -> Result<(), DbError> {
    let bytes = serde_json::to_vec(fields)?;
    buckets.insert(key, bytes.as_slice())?;
    Ok(())
}

/// Keeps a bucket until `until_ms` at least, in its fields and the retention index.
fn keep_until(
    txn: &WriteTransaction,
    key: &str,
    fields: &mut BTreeMap<String, String>,
    until_ms: i64,
) -> Result<(), DbError> {
    let current = fields.get(F_RETAIN).and_then(|v| v.parse::<i64>().ok());
    if current.is_some_and(|c| c >= until_ms) {
        return Ok(());
    }
    if let Some(current) = current {
        txn.open_table(RETAIN)?.remove((current, key))?;
    }
    fields.insert(F_RETAIN.to_string(), until_ms.to_string());
    txn.open_table(RETAIN)?.insert((until_ms, key), ())?;
    Ok(())
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Makes the non-durable commits since the last tick durable on a clean stop.
        if let Err(e) = self.write(Durability::Immediate, |_| Ok(())) {
            tracing::warn!(message = "Label store not flushed on close.", error = %e);
        }
    }
}

impl Inner {
    fn write<T>(
        &self,
        durability: Durability,
        op: impl FnOnce(&WriteTransaction) -> Result<T, DbError>,
    ) -> Result<T, StoreError> {
        let fail = |DbError(detail)| StoreError::Embedded { path: self.path.display().to_string(), detail };
        let mut txn = self.db.begin_write().map_err(|e| fail(e.into()))?;
        txn.set_durability(durability);
        self.write_records(&txn, self.drain()).map_err(fail)?;
        let out = op(&txn).map_err(fail)?;
        txn.commit().map_err(|e| fail(e.into()))?;
        Ok(out)
    }

    /// Takes the buffered record batches, in arrival order.
    fn drain(&self) -> Vec<RecordBatch> {
        let mut buffer = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
        self.buffered_rows.store(0, Ordering::Relaxed);
        std::mem::take(&mut *buffer)
    }

    /// Writes buffered rows inside a transaction: every write transaction starts with
    /// it, so a label always sees the predictions recorded before it was posted.
    fn write_records(&self, txn: &WriteTransaction, batches: Vec<RecordBatch>) -> Result<(), DbError> {
        if batches.is_empty() {
            return Ok(());
        }
        let mut rows = txn.open_table(ROWS)?;
        let mut expiry = txn.open_table(EXPIRY)?;
        let mut per_bucket: BTreeMap<BucketId, (i64, i64, i64)> = BTreeMap::new();
        for batch in &batches {
            for (id, bytes, expires_ms) in &batch.rows {
                let replaced =
                    rows.insert(id.as_bytes(), bytes.as_slice())?.and_then(|old| PendingRow::decode(old.value()));
                if let Some(old) = replaced {
                    expiry.remove((old.expires_ms, id.as_bytes()))?;
                }
                expiry.insert((*expires_ms, id.as_bytes()), ())?;
            }
            let slot = per_bucket.entry(batch.bucket).or_insert((0, batch.due_ms, batch.retain_until_ms));
            slot.0 += batch.rows.len() as i64;
        }
        let mut evicted = 0;
        while rows.len()? > self.max_rows {
            let Some((key, _)) = expiry.pop_first()? else { break };
            let (_, id) = key.value();
            rows.remove(id)?;
            evicted += 1;
        }
        self.pending.store(rows.len()?, Ordering::Relaxed);
        if evicted > 0 {
            let mut meta = txn.open_table(META)?;
            let total = self.evictions.fetch_add(evicted, Ordering::Relaxed) + evicted;
            meta.insert("evictions", total)?;
        }
        let mut buckets = txn.open_table(BUCKETS)?;
        let mut due = txn.open_table(DUE)?;
        for (bucket, (count, due_ms, retain_until_ms)) in per_bucket {
            let key = bucket.key();
            let mut fields = load_fields(&buckets, &key)?;
            let mut delta = BucketDelta::default();
            delta.add_int(F_PREDICTED, count);
            apply_delta(&mut fields, &delta, 0);
            keep_until(txn, &key, &mut fields, retain_until_ms)?;
            if !fields.contains_key(F_CLAIMED) {
                due.insert((due_ms, key.as_str()), ())?;
            }
            save_fields(&mut buckets, &key, &fields)?;
        }
        Ok(())
    }

    fn take(&self, ids: Vec<String>, now_ms: i64) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.write(Durability::None, |txn| {
            let mut rows = txn.open_table(ROWS)?;
            let mut expiry = txn.open_table(EXPIRY)?;
            let mut out = Vec::with_capacity(ids.len());
            for id in &ids {
                let bytes = rows.remove(id.as_bytes())?.map(|v| v.value().to_vec());
                let row = bytes.as_deref().and_then(PendingRow::decode);
                if let Some(row) = &row {
                    expiry.remove((row.expires_ms, id.as_bytes()))?;
                }
                out.push(match row {
                    Some(row) if row.expires_ms > now_ms => bytes,
                    _ => None,
                });
            }
            self.pending.store(rows.len()?, Ordering::Relaxed);
            Ok(out)
        })
    }

    fn restore(&self, restored: Vec<(String, Vec<u8>, i64)>) -> Result<(), StoreError> {
        self.write(Durability::None, |txn| {
            let mut rows = txn.open_table(ROWS)?;
            let mut expiry = txn.open_table(EXPIRY)?;
            for (id, bytes, expires_ms) in &restored {
                if rows.get(id.as_bytes())?.is_none() {
                    rows.insert(id.as_bytes(), bytes.as_slice())?;
                    expiry.insert((*expires_ms, id.as_bytes()), ())?;
                }
            }
            self.pending.store(rows.len()?, Ordering::Relaxed);
            Ok(())
        })
    }

    fn apply(&self, updates: Vec<BucketUpdate>, now_ms: i64) -> Result<Vec<bool>, StoreError> {
        self.write(Durability::None, |txn| {
            let mut buckets = txn.open_table(BUCKETS)?;
            let mut due = txn.open_table(DUE)?;
            let mut auc = txn.open_table(AUC)?;
            let mut applied = Vec::with_capacity(updates.len());
            for update in &updates {
                let key = update.bucket.key();
                let mut fields = load_fields(&buckets, &key)?;
                let claimed = fields.contains_key(F_CLAIMED);
                if update.refuse_when_due && (claimed || now_ms >= update.due_ms) {
                    applied.push(false);
                    continue;
                }
                let kept = fields.get(F_AUC_LEN).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                let room = apply_delta(&mut fields, &update.delta, self.auc_cap);
                for (i, entry) in update.delta.auc.iter().take(room).enumerate() {
                    auc.insert((key.as_str(), kept + i as u64), entry.as_str())?;
                }
                keep_until(txn, &key, &mut fields, update.retain_until_ms)?;
                if !claimed {
                    due.insert((update.due_ms, key.as_str()), ())?;
                }
                save_fields(&mut buckets, &key, &fields)?;
                applied.push(true);
            }
            Ok(applied)
        })
    }

    fn claim_due(&self, now_ms: i64) -> Result<Vec<ClaimedBucket>, StoreError> {
        self.write(Durability::Immediate, |txn| {
            let mut due = txn.open_table(DUE)?;
            let mut buckets = txn.open_table(BUCKETS)?;
            let mut auc = txn.open_table(AUC)?;
            let mut ready = Vec::new();
            for entry in due.iter()? {
                let (key, _) = entry?;
                let (due_ms, bucket) = key.value();
                if due_ms > now_ms {
                    break;
                }
                ready.push((due_ms, bucket.to_string()));
            }
            let mut claimed = Vec::new();
            for (due_ms, key) in ready {
                due.remove((due_ms, key.as_str()))?;
                let mut fields = load_fields(&buckets, &key)?;
                let Some(bucket) = BucketId::parse(&key) else { continue };
                if fields.is_empty() || fields.contains_key(F_CLAIMED) {
                    continue;
                }
                fields.insert(F_CLAIMED.to_string(), "1".to_string());
                let mut entries = Vec::new();
                for entry in auc.range((key.as_str(), 0u64)..=(key.as_str(), u64::MAX))? {
                    let (_, v) = entry?;
                    entries.push(v.value().to_string());
                }
                auc.retain_in((key.as_str(), 0u64)..=(key.as_str(), u64::MAX), |_, _| false)?;
                save_fields(&mut buckets, &key, &fields)?;
                claimed.push(ClaimedBucket { bucket, fields, auc: entries });
            }
            Ok(claimed)
        })
    }

    fn maintain(&self, now_ms: i64) -> Result<(), StoreError> {
        self.write(Durability::Immediate, |txn| {
            let mut rows = txn.open_table(ROWS)?;
            let mut expiry = txn.open_table(EXPIRY)?;
            let mut expired = Vec::new();
            for entry in expiry.iter()? {
                let (key, _) = entry?;
                let (expires_ms, id) = key.value();
                if expires_ms > now_ms {
                    break;
                }
                expired.push((expires_ms, id.to_vec()));
            }
            for (expires_ms, id) in &expired {
                expiry.remove((*expires_ms, id.as_slice()))?;
                rows.remove(id.as_slice())?;
            }
            self.pending.store(rows.len()?, Ordering::Relaxed);
            let mut retain = txn.open_table(RETAIN)?;
            let mut stale = Vec::new();
            for entry in retain.iter()? {
                let (key, _) = entry?;
                let (until_ms, bucket) = key.value();
                if until_ms >= now_ms {
                    break;
                }
                stale.push((until_ms, bucket.to_string()));
            }
            let mut buckets = txn.open_table(BUCKETS)?;
            let mut auc = txn.open_table(AUC)?;
            for (until_ms, key) in &stale {
                retain.remove((*until_ms, key.as_str()))?;
                buckets.remove(key.as_str())?;
                auc.retain_in((key.as_str(), 0u64)..=(key.as_str(), u64::MAX), |_, _| false)?;
            }
            Ok(())
        })
    }
}

impl LabelStore for EmbeddedStore {
    fn put_stream(&self, meta: StreamMeta) -> StoreFuture<'_, ()> {
        self.run(move |inner| {
            inner.write(Durability::None, |txn| {
                let json = serde_json::to_string(&meta)?;
                txn.open_table(STREAMS)?.insert(meta.id(), json.as_str())?;
                Ok(())
            })
        })
    }

    fn stream(&self, id: u64) -> StoreFuture<'_, Option<StreamMeta>> {
        self.run(move |inner| {
            let fail = |detail: String| StoreError::Embedded { path: inner.path.display().to_string(), detail };
            let txn = inner.db.begin_read().map_err(|e| fail(e.to_string()))?;
            let table = txn.open_table(STREAMS).map_err(|e| fail(e.to_string()))?;
            let found = table.get(id).map_err(|e| fail(e.to_string()))?;
            Ok(found.and_then(|v| serde_json::from_str(v.value()).ok()))
        })
    }

    fn record(&self, batch: RecordBatch) -> StoreFuture<'_, ()> {
        let rows = batch.rows.len();
        self.inner.buffer.lock().unwrap_or_else(|e| e.into_inner()).push(batch);
        if self.inner.buffered_rows.fetch_add(rows, Ordering::Relaxed) + rows < FLUSH_ROWS {
            return Box::pin(async { Ok(()) });
        }
        self.run(|inner| inner.write(Durability::None, |_| Ok(())))
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        if self.inner.buffered_rows.load(Ordering::Relaxed) == 0 {
            return Box::pin(async { Ok(()) });
        }
        self.run(|inner| inner.write(Durability::None, |_| Ok(())))
    }

    fn take(&self, ids: Vec<String>, now_ms: i64) -> StoreFuture<'_, Vec<Option<Vec<u8>>>> {
        self.run(move |inner| inner.take(ids, now_ms))
    }

    fn restore(&self, rows: Vec<(String, Vec<u8>, i64)>) -> StoreFuture<'_, ()> {
        self.run(move |inner| inner.restore(rows))
    }

    fn apply(&self, updates: Vec<BucketUpdate>, now_ms: i64) -> StoreFuture<'_, Vec<bool>> {
        self.run(move |inner| inner.apply(updates, now_ms))
    }

    fn claim_due(&self, now_ms: i64) -> StoreFuture<'_, Vec<ClaimedBucket>> {
        self.run(move |inner| inner.claim_due(now_ms))
    }

    fn maintain(&self, now_ms: i64) -> StoreFuture<'_, ()> {
        self.run(move |inner| inner.maintain(now_ms))
    }

    fn stats(&self) -> StoreStats {
        StoreStats {
            pending_rows: Some(self.inner.pending.load(Ordering::Relaxed)),
            evictions: self.inner.evictions.load(Ordering::Relaxed),
            failed_rows: 0,
        }
    }
}
