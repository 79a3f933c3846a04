//! The embedded join store: one redb file under the output dir, for a single
//! replica. It survives restarts (a prediction before a restart joins a label after
//! it), drops rows once they expire, and holds at most `max_pending_rows` rows
//! waiting for a label, evicting those closest to expiry first and counting them.
//!
//! Prediction rows are kept as one record per exchange (`record::ExchangeRecord`),
//! keyed by its request id, with a bitmap of the rows already taken: recording costs
//! one insert per exchange, and expiry drops whole exchanges. Records are buffered
//! and written many per transaction.
//!
//! redb is synchronous, so every operation runs on the blocking pool. Writes commit
//! without fsync (`Durability::None`: an fsync per observation would cap recording
//! at a few hundred per second); `maintain`, called with every `due` tick, and
//! closing the store commit durably. A crash loses at most the writes since the last
//! tick, never the file.
//!
//! The file carries its format (`meta.format`). A file of the per-row format 1 is
//! converted on open (each row becomes a one-row record under its own id, so it still
//! joins); a file of a newer format is renamed aside (`labels.redb.unusable-TIME`)
//! with a warning, and a damaged one (truncated, corrupt) is renamed aside as
//! `labels.redb.corrupt-TIME`, logged at error and counted; the store starts empty.
//!
//! A store fault never stops mltap: when the file cannot be opened (no space, no
//! permission, held by another process) or an operation fails (redb refuses every
//! transaction after an I/O error such as a full disk), the store closes the file and
//! reopens it on a later operation, after a backoff doubling from 1 s to 60 s.
//! Meanwhile its operations fail (the label endpoint answers 503), recorded rows are
//! counted as failed, and `health` says what is wrong for `/readyz`.

use super::{BucketUpdate, ClaimedBucket, LabelStore, RecordBatch, StoreError, StoreFuture, StoreStats, TakenRow};
use crate::labels::aggregate::{apply_delta, BucketDelta, F_AUC_LEN, F_CLAIMED, F_PREDICTED};
use crate::labels::record::{set_taken, BucketId, ExchangeRecord, PendingRow, RowRef, StreamMeta};
use redb::{Database, DatabaseError, Durability, ReadableTable, StorageError, TableDefinition, WriteTransaction};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// Pending exchanges: key (request id, or a row's own id) -> encoded
/// `ExchangeRecord`. Keys are bytes: `&str` keys are checked for UTF-8 on every
/// comparison, a measurable share of a label's cost.
const EXCHANGES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("exchanges");
/// Expiry order of the exchanges: (expires_ms, key); also the eviction order.
const EXPIRY: TableDefinition<(i64, &[u8]), ()> = TableDefinition::new("exchange_expiry");
/// Format 1's pending rows (id -> per-row record), converted when such a file opens.
const LEGACY_ROWS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("rows");
/// Format 1's expiry index of its rows.
const LEGACY_EXPIRY: TableDefinition<(i64, &[u8]), ()> = TableDefinition::new("row_expiry");
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
/// Counters that must survive restarts, and the file's format: name -> value.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The file layout this code writes (`meta.format`): 2 is one record per exchange.
/// Files without it are of format 1 (one record per row).
const FORMAT: u64 = 2;
/// `meta` key of the format.
const META_FORMAT: &str = "format";
/// `meta` key of the rows waiting for a label, kept with the records they count.
const META_PENDING: &str = "pending_rows";
/// `meta` key of the evictions since the file was created.
const META_EVICTIONS: &str = "evictions";
/// redb's page cache. Its default (1 GiB) fills up under sustained recording and
/// would alone exceed mltap's memory budget. Leaves are read back through the OS
/// page cache; label ingestion measured as fast with 4 MiB as with 1 GiB.
const CACHE_BYTES: usize = 4 << 20;
/// Buffered rows that trigger a write of the buffer: a few hundred 64-row exchanges
/// per transaction, so a commit's fixed cost is shared by many of them.
const FLUSH_ROWS: usize = 16_384;
/// Field of a bucket holding how long it is kept, epoch ms.
const F_RETAIN: &str = "rt";

/// First wait before reopening a failed store; doubles up to `REOPEN_BACKOFF_MAX`.
const REOPEN_BACKOFF_MIN: std::time::Duration = std::time::Duration::from_secs(1);
const REOPEN_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(60);

/// The redb-backed store.
pub struct EmbeddedStore {
    /// The file.
    path: PathBuf,
    /// The size bound on pending rows.
    max_rows: u64,
    /// Entries per bucket in the exact AUC list.
    auc_cap: usize,
    /// The open file, or why it is not open.
    state: std::sync::Mutex<State>,
    /// Rows lost to failures, of files closed since start and while none is open.
    failed_rows: AtomicU64,
    /// Damaged files moved aside since start.
    corrupt_files: AtomicU64,
}

/// Whether the store file is open.
enum State {
    /// Shared with the blocking tasks that run the transactions.
    Open(Arc<Inner>),
    /// Closed after a failure; reopened by the first operation after `retry_at`.
    Failed {
        /// What failed, for `/readyz` and the 503 answers.
        error: String,
        retry_at: std::time::Instant,
        /// The wait after the next failed attempt.
        backoff: std::time::Duration,
    },
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
    /// Rows waiting for a label after the last write, for the gauge.
    pending: AtomicU64,
    /// Evictions since the file was created.
    evictions: AtomicU64,
    /// Recorded exchanges not yet written: one transaction per observation would cost
    /// more than the observation's whole processing, so records are written in
    /// batches, at the latest by the next write of any kind (a label, a tick).
    buffer: std::sync::Mutex<Vec<RecordBatch>>,
    /// Rows in `buffer`.
    buffered_rows: AtomicUsize,
    /// Buffered rows lost because the write that carried them failed.
    failed_rows: AtomicU64,
}

impl EmbeddedStore {
    /// Opens (or creates) the store file, creating its directory. A file that cannot
    /// be read as a label store (not redb, damaged, or a newer format) is renamed
    /// aside and the store starts empty. A file that cannot be opened at all leaves
    /// the store failed, to be reopened later (see the module's doc): opening never
    /// fails, so that a monitoring fault cannot stop the proxy from serving.
    pub fn open(path: &Path, max_rows: u64, auc_cap: usize) -> Result<EmbeddedStore, StoreError> {
        let store = EmbeddedStore {
            path: path.to_path_buf(),
            max_rows,
            auc_cap,
            state: std::sync::Mutex::new(State::Failed {
                error: "not opened yet".into(),
                retry_at: std::time::Instant::now(),
                backoff: REOPEN_BACKOFF_MIN,
            }),
            failed_rows: AtomicU64::new(0),
            corrupt_files: AtomicU64::new(0),
        };
        let _ = store.current();
        Ok(store)
    }

    /// Opens the file, setting a damaged or unusable one aside first if need be.
    fn open_file(&self) -> Result<Inner, StoreError> {
        let path = &self.path;
        let fail = |detail: String| StoreError::Embedded { path: path.display().to_string(), detail };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| fail(format!("cannot create its directory: {e}")))?;
        }
        match Inner::open(path, self.max_rows, self.auc_cap)? {
            Opened::Ready(inner) => return Ok(inner),
            Opened::Unusable(reason) => set_aside(path, "unusable", &reason)?,
            Opened::Corrupt(reason) => {
                set_aside(path, "corrupt", &reason)?;
                self.corrupt_files.fetch_add(1, Ordering::Relaxed);
            }
        }
        match Inner::open(path, self.max_rows, self.auc_cap)? {
            Opened::Ready(inner) => Ok(inner),
            Opened::Unusable(reason) | Opened::Corrupt(reason) => Err(fail(reason)),
        }
    }

    /// The open file, reopening a failed store once its backoff has passed.
    fn current(&self) -> Result<Arc<Inner>, StoreError> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let backoff = match &*state {
            State::Open(inner) => return Ok(inner.clone()),
            State::Failed { error, retry_at, .. } if std::time::Instant::now() < *retry_at => {
                return Err(StoreError::Embedded {
                    path: self.path.display().to_string(),
                    detail: format!("unavailable after a failure ({error}); reopening is retried"),
                })
            }
            State::Failed { backoff, .. } => *backoff,
        };
        match self.open_file() {
            Ok(inner) => {
                let inner = Arc::new(inner);
                tracing::info!(message = "Label store open.", path = %self.path.display());
                *state = State::Open(inner.clone());
                Ok(inner)
            }
            Err(error) => {
                tracing::error!(
                    message = "Label store cannot be opened; labels are not joined until it can be. Serving continues.",
                    %error,
                    retry_in = ?backoff,
                );
                *state = State::Failed {
                    error: error.to_string(),
                    retry_at: std::time::Instant::now() + backoff,
                    backoff: (backoff * 2).min(REOPEN_BACKOFF_MAX),
                };
                Err(error)
            }
        }
    }

    /// Closes the file after `inner` failed an operation, so that the next operation
    /// past the backoff reopens it; a store that another operation already closed or
    /// reopened is left as it is.
    fn failed(&self, inner: &Arc<Inner>, error: &StoreError) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if !matches!(&*state, State::Open(open) if Arc::ptr_eq(open, inner)) {
            return;
        }
        tracing::error!(
            message = "Label store failed; closing it to reopen after a backoff. Serving continues.",
            %error,
            retry_in = ?REOPEN_BACKOFF_MIN,
        );
        // Rows still buffered in the closed file are lost: count them now.
        let buffered = inner.drain().iter().map(|b| b.rows).sum::<u64>();
        self.failed_rows.fetch_add(buffered + inner.failed_rows.load(Ordering::Relaxed), Ordering::Relaxed);
        *state = State::Failed {
            error: error.to_string(),
            retry_at: std::time::Instant::now() + REOPEN_BACKOFF_MIN,
            backoff: REOPEN_BACKOFF_MIN * 2,
        };
    }

    /// Runs a blocking operation on the blocking pool.
    fn run<T, F>(&self, op: F) -> StoreFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        Box::pin(async move {
            let inner = self.current()?;
            let path = inner.path.display().to_string();
            let task_inner = inner.clone();
            let result = tokio::task::spawn_blocking(move || op(&task_inner))
                .await
                .map_err(|e| StoreError::Embedded { path, detail: format!("store task failed: {e}") })?;
            if let Err(error) = &result {
                self.failed(&inner, error);
            }
            result
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

/// What opening the file gave.
enum Opened {
    /// A store in the current format (converted if it was of format 1).
    Ready(Inner),
    /// A file this version cannot use (a newer format), and why.
    Unusable(String),
    /// A damaged file (truncated, corrupt, not redb), and why.
    Corrupt(String),
}

/// Renames a store file aside (`labels.redb.unusable-TIME` or `labels.redb.corrupt-TIME`,
/// TIME in UTC to the nanosecond), so the store can start empty without destroying
/// what an operator may want to inspect.
fn set_aside(path: &Path, why: &str, reason: &str) -> Result<(), StoreError> {
    let now = std::time::SystemTime::now();
    let stamp = humantime::format_rfc3339_nanos(now).to_string().replace(':', "");
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".{why}-{stamp}"));
    let aside = PathBuf::from(aside);
    std::fs::rename(path, &aside).map_err(|e| StoreError::Embedded {
        path: path.display().to_string(),
        detail: format!("{reason}; it cannot be set aside either: {e}"),
    })?;
    if why == "corrupt" {
        tracing::error!(
            message = "Label store file damaged; set aside, starting with an empty store (pending labels of earlier predictions are lost).",
            path = %path.display(),
            set_aside_as = %aside.display(),
            reason,
        );
    } else {
        tracing::warn!(
            message = "Label store file unusable; set aside, starting with an empty store.",
            path = %path.display(),
            set_aside_as = %aside.display(),
            reason,
        );
    }
    Ok(())
}

/// Epoch ms now.
fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The pending-row tables of one write transaction, with the running count of rows
/// waiting for a label (stored in `meta` by `close`, so it always matches the file).
struct Rows<'t> {
    exchanges: redb::Table<'t, &'static [u8], &'static [u8]>,
    expiry: redb::Table<'t, (i64, &'static [u8]), ()>,
    meta: redb::Table<'t, &'static str, u64>,
    /// Rows waiting for a label.
    pending: u64,
}

/// A record a batch of labels took out of the table (None: there was none), to put
/// back by `write_back` unless all its rows are taken.
struct Touched {
    bytes: Option<Vec<u8>>,
}

impl<'t> Rows<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Rows<'t>, DbError> {
        let meta = txn.open_table(META)?;
        let pending = meta.get(META_PENDING)?.map(|v| v.value()).unwrap_or(0);
        Ok(Rows { exchanges: txn.open_table(EXCHANGES)?, expiry: txn.open_table(EXPIRY)?, meta, pending })
    }

    /// Stores a record under `key`, replacing (and uncounting) a record of the same
    /// key: a request id reused by a later exchange names that exchange's rows.
    fn put(&mut self, key: &[u8], bytes: &[u8]) -> Result<(), DbError> {
        let Some(record) = ExchangeRecord::parse(bytes) else { return Ok(()) };
        let (expires_ms, untaken) = (record.expires_ms(), record.untaken() as u64);
        let replaced = self.exchanges.insert(key, bytes)?.map(|old| old.value().to_vec());
        if let Some(old) = replaced.as_deref().and_then(ExchangeRecord::parse) {
            self.expiry.remove((old.expires_ms(), key))?;
            self.pending = self.pending.saturating_sub(old.untaken() as u64);
        }
        self.expiry.insert((expires_ms, key), ())?;
        self.pending += untaken;
        Ok(())
    }

    /// Removes a record and its expiry entry, uncounting its waiting rows.
    fn remove(&mut self, key: &[u8]) -> Result<(), DbError> {
        let removed = self.exchanges.remove(key)?.map(|old| old.value().to_vec());
        if let Some(old) = removed.as_deref().and_then(ExchangeRecord::parse) {
            self.expiry.remove((old.expires_ms(), key))?;
            self.pending = self.pending.saturating_sub(old.untaken() as u64);
        }
        Ok(())
    }

    /// Evicts rows closest to expiry until at most `max_rows` wait (whole exchanges,
    /// and the first rows of the last one); returns how many were evicted.
    fn evict(&mut self, max_rows: u64) -> Result<u64, DbError> {
        let mut evicted = 0;
        while self.pending > max_rows {
            let first = self.expiry.first()?.map(|(k, _)| {
                let (expires_ms, key) = k.value();
                (expires_ms, key.to_vec())
            });
            let Some((expires_ms, key)) = first else {
                // Nothing left to evict: the count had drifted from the records.
                self.pending = 0;
                break;
            };
            let bytes = self.exchanges.get(key.as_slice())?.map(|v| v.value().to_vec());
            let Some(mut bytes) = bytes else {
                self.expiry.remove((expires_ms, key.as_slice()))?;
                continue;
            };
            let Some(record) = ExchangeRecord::parse(&bytes) else {
                self.exchanges.remove(key.as_slice())?;
                self.expiry.remove((expires_ms, key.as_slice()))?;
                continue;
            };
            let excess = self.pending - max_rows;
            let untaken = record.untaken() as u64;
            if untaken <= excess {
                self.remove(&key)?;
                evicted += untaken;
            } else {
                let first_rows: Vec<usize> = record.untaken_rows().take(excess as usize).collect();
                for row in first_rows {
                    set_taken(&mut bytes, row, true);
                }
                self.exchanges.insert(key.as_slice(), bytes.as_slice())?;
                self.pending -= excess;
                evicted += excess;
            }
        }
        Ok(evicted)
    }

    /// Takes one row for a label, through the records this transaction touched.
    fn take_row(
        &mut self,
        touched: &mut HashMap<Vec<u8>, Touched>,
        at: &RowRef,
        now_ms: i64,
    ) -> Result<Option<TakenRow>, DbError> {
        let key = at.key.as_bytes();
        if !touched.contains_key(key) {
            // Removed rather than read: a one-row record, the most common, is then
            // gone in one step once taken, as a row was before records held exchanges.
            let bytes = self.exchanges.remove(key)?.map(|v| v.value().to_vec());
            touched.insert(key.to_vec(), Touched { bytes });
        }
        let Some(entry) = touched.get_mut(key) else { return Ok(None) };
        let Some(bytes) = entry.bytes.as_mut() else { return Ok(None) };
        let Some(record) = ExchangeRecord::parse(bytes) else { return Ok(None) };
        let row = at.row as usize;
        if record.suffixed() != at.suffixed
            || row >= record.rows()
            || record.is_taken(row)
            || record.expires_ms() <= now_ms
        {
            return Ok(None);
        }
        let Some(pending) = record.row(row) else { return Ok(None) };
        set_taken(bytes, row, true);
        self.pending = self.pending.saturating_sub(1);
        Ok(Some(TakenRow { at: at.clone(), row: pending }))
    }

    /// Puts back the records a batch of labels took out; a record whose rows are all
    /// taken stays out, with its expiry entry (nothing can join it any more).
    fn write_back(&mut self, touched: HashMap<Vec<u8>, Touched>) -> Result<(), DbError> {
        for (key, entry) in touched {
            let Some(bytes) = entry.bytes else { continue };
            match ExchangeRecord::parse(&bytes) {
                Some(record) if record.untaken() == 0 => {
                    self.expiry.remove((record.expires_ms(), key.as_slice()))?;
                }
                _ => {
                    self.exchanges.insert(key.as_slice(), bytes.as_slice())?;
                }
            }
        }
        Ok(())
    }

    /// Stores the count and publishes it to the gauge.
    fn close(mut self, gauge: &AtomicU64) -> Result<(), DbError> {
        self.meta.insert(META_PENDING, self.pending)?;
        gauge.store(self.pending, Ordering::Relaxed);
        Ok(())
    }
}

/// The file's format: None for a new file or one of format 1 (which had no `meta`
/// entry for it).
fn read_format(db: &Database) -> Result<Option<u64>, DbError> {
    let txn = db.begin_read()?;
    let meta = match txn.open_table(META) {
        Ok(meta) => meta,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    Ok(meta.get(META_FORMAT)?.map(|v| v.value()))
}

/// Converts format 1's per-row records into one-row records under the same ids (a
/// label `ID:ROW` finds them through the second of `RowRef::candidates`), skipping
/// expired rows, and removes format 1's tables. Streams from one table to the other,
/// so a full file converts without holding its rows in memory.
fn convert_rows(txn: &WriteTransaction, rows: &mut Rows<'_>, now_ms: i64) -> Result<u64, DbError> {
    let mut converted = 0;
    {
        let legacy = txn.open_table(LEGACY_ROWS)?;
        for entry in legacy.iter()? {
            let (id, bytes) = entry?;
            let Some(row) = PendingRow::decode(bytes.value()) else { continue };
            if row.expires_ms <= now_ms {
                continue;
            }
            rows.put(id.value(), &row.to_record(0, false))?;
            converted += 1;
        }
    }
    txn.delete_table(LEGACY_ROWS)?;
    txn.delete_table(LEGACY_EXPIRY)?;
    Ok(converted)
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
    /// Opens the file and brings it to the current format.
    fn open(path: &Path, max_rows: u64, auc_cap: usize) -> Result<Opened, StoreError> {
        let fail = |detail: String| StoreError::Embedded { path: path.display().to_string(), detail };
        // redb asserts some of a file's invariants instead of returning an error (a
        // truncated file trips one): a panic while opening means a damaged file.
        let opened = std::panic::catch_unwind(|| redb::Builder::new().set_cache_size(CACHE_BYTES).create(path));
        let Ok(opened) = opened else {
            return Ok(Opened::Corrupt("redb could not read the file (it failed an integrity check)".into()));
        };
        let db = match opened {
            Ok(db) => db,
            Err(e @ DatabaseError::UpgradeRequired(_)) => {
                return Ok(Opened::Unusable(format!("not a readable label store: {e}")))
            }
            Err(e @ DatabaseError::Storage(StorageError::Corrupted(_))) => {
                return Ok(Opened::Corrupt(format!("not a readable label store: {e}")))
            }
            Err(DatabaseError::Storage(StorageError::Io(e)))
                if matches!(e.kind(), std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof) =>
            {
                return Ok(Opened::Corrupt(format!("not a whole redb file: {e}")))
            }
            Err(e) => return Err(fail(e.to_string())),
        };
        let format = read_format(&db).map_err(|DbError(detail)| fail(detail))?;
        if let Some(newer) = format.filter(|f| *f > FORMAT) {
            return Ok(Opened::Unusable(format!("written in format {newer}; this version reads up to {FORMAT}")));
        }
        let inner = Inner {
            db,
            path: path.to_path_buf(),
            max_rows,
            auc_cap,
            pending: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            buffer: std::sync::Mutex::new(Vec::new()),
            buffered_rows: AtomicUsize::new(0),
            failed_rows: AtomicU64::new(0),
        };
        // Create the tables up front so readers never meet a missing table.
        inner.write(Durability::Immediate, |txn| {
            txn.open_table(STREAMS)?;
            txn.open_table(BUCKETS)?;
            txn.open_table(DUE)?;
            txn.open_table(AUC)?;
            txn.open_table(RETAIN)?;
            let mut rows = Rows::open(txn)?;
            let mut evictions = rows.meta.get(META_EVICTIONS)?.map(|v| v.value()).unwrap_or(0);
            if format.is_none() {
                let converted = convert_rows(txn, &mut rows, now_ms())?;
                if converted > 0 {
                    tracing::info!(
                        message = "Label store converted from the per-row format.",
                        path = %inner.path.display(),
                        rows = converted
                    );
                }
                evictions += rows.evict(inner.max_rows)?;
                rows.meta.insert(META_EVICTIONS, evictions)?;
                rows.meta.insert(META_FORMAT, FORMAT)?;
            }
            inner.evictions.store(evictions, Ordering::Relaxed);
            rows.close(&inner.pending)
        })?;
        Ok(Opened::Ready(inner))
    }

    fn write<T>(
        &self,
        durability: Durability,
        op: impl FnOnce(&WriteTransaction) -> Result<T, DbError>,
    ) -> Result<T, StoreError> {
        let fail = |DbError(detail)| StoreError::Embedded { path: self.path.display().to_string(), detail };
        let batches = self.drain();
        let rows = batches.iter().map(|b| b.rows).sum::<u64>();
        let result = (|| {
            let mut txn = self.db.begin_write()?;
            txn.set_durability(durability);
            self.write_records(&txn, batches)?;
            let out = op(&txn)?;
            txn.commit()?;
            Ok(out)
        })();
        if result.is_err() {
            self.failed_rows.fetch_add(rows, Ordering::Relaxed);
        }
        result.map_err(fail)
    }

    /// Takes the buffered record batches, in arrival order.
    fn drain(&self) -> Vec<RecordBatch> {
        let mut buffer = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
        self.buffered_rows.store(0, Ordering::Relaxed);
        std::mem::take(&mut *buffer)
    }

    /// Writes buffered records inside a transaction: every write transaction starts
    /// with it, so a label always sees the predictions recorded before it was posted.
    fn write_records(&self, txn: &WriteTransaction, batches: Vec<RecordBatch>) -> Result<(), DbError> {
        if batches.is_empty() {
            return Ok(());
        }
        let mut per_bucket: BTreeMap<BucketId, (i64, i64, i64)> = BTreeMap::new();
        {
            let mut rows = Rows::open(txn)?;
            for batch in &batches {
                for (key, bytes) in &batch.records {
                    rows.put(key.as_bytes(), bytes)?;
                }
                let slot = per_bucket.entry(batch.bucket).or_insert((0, batch.due_ms, batch.retain_until_ms));
                slot.0 += batch.rows as i64;
            }
            let evicted = rows.evict(self.max_rows)?;
            if evicted > 0 {
                let total = self.evictions.fetch_add(evicted, Ordering::Relaxed) + evicted;
                rows.meta.insert(META_EVICTIONS, total)?;
            }
            rows.close(&self.pending)?;
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

    fn take(&self, ids: Vec<String>, now_ms: i64) -> Result<Vec<Option<TakenRow>>, StoreError> {
        self.write(Durability::None, |txn| {
            let mut rows = Rows::open(txn)?;
            // The labels of one batch often share exchanges: each record is taken
            // out and put back once per batch.
            let mut touched = HashMap::new();
            let mut out = Vec::with_capacity(ids.len());
            for id in &ids {
                let (first, fallback) = RowRef::candidates(id);
                let mut taken = rows.take_row(&mut touched, &first, now_ms)?;
                if let (None, Some(fallback)) = (&taken, fallback) {
                    taken = rows.take_row(&mut touched, &fallback, now_ms)?;
                }
                out.push(taken);
            }
            rows.write_back(touched)?;
            rows.close(&self.pending)?;
            Ok(out)
        })
    }

    fn restore(&self, restored: Vec<TakenRow>) -> Result<(), StoreError> {
        self.write(Durability::None, |txn| {
            let mut rows = Rows::open(txn)?;
            for taken in &restored {
                let key = taken.at.key.as_bytes();
                let row = taken.at.row as usize;
                let current = rows.exchanges.get(key)?.map(|v| v.value().to_vec());
                match current {
                    Some(mut bytes) => {
                        let Some(record) = ExchangeRecord::parse(&bytes) else { continue };
                        // Only into the record it came from: a later exchange under the
                        // same id has replaced it otherwise, and the row is gone.
                        let same = record.suffixed() == taken.at.suffixed
                            && row < record.rows()
                            && record.is_taken(row)
                            && record.row(row).as_ref() == Some(&taken.row);
                        if same {
                            set_taken(&mut bytes, row, false);
                            rows.exchanges.insert(key, bytes.as_slice())?;
                            rows.pending += 1;
                        }
                    }
                    // Its record was dropped once all its rows were taken.
                    None => rows.put(key, &taken.row.to_record(row, taken.at.suffixed))?,
                }
            }
            rows.close(&self.pending)
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
            {
                let mut rows = Rows::open(txn)?;
                let mut expired = Vec::new();
                for entry in rows.expiry.iter()? {
                    let (key, _) = entry?;
                    let (expires_ms, id) = key.value();
                    if expires_ms > now_ms {
                        break;
                    }
                    expired.push((expires_ms, id.to_vec()));
                }
                // Whole exchanges expire together: one delete per exchange.
                for (expires_ms, key) in &expired {
                    rows.expiry.remove((*expires_ms, key.as_slice()))?;
                    let removed = rows.exchanges.remove(key.as_slice())?.map(|v| v.value().to_vec());
                    if let Some(record) = removed.as_deref().and_then(ExchangeRecord::parse) {
                        rows.pending = rows.pending.saturating_sub(record.untaken() as u64);
                    }
                }
                rows.close(&self.pending)?;
            }
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
        self.run(move |inner: &Inner| {
            let fail = |detail: String| StoreError::Embedded { path: inner.path.display().to_string(), detail };
            let txn = inner.db.begin_read().map_err(|e| fail(e.to_string()))?;
            let table = txn.open_table(STREAMS).map_err(|e| fail(e.to_string()))?;
            let found = table.get(id).map_err(|e| fail(e.to_string()))?;
            Ok(found.and_then(|v| serde_json::from_str(v.value()).ok()))
        })
    }

    fn record(&self, batches: Vec<RecordBatch>) -> StoreFuture<'_, ()> {
        let inner = match self.current() {
            Ok(inner) => inner,
            Err(error) => {
                self.failed_rows.fetch_add(batches.iter().map(|b| b.rows).sum::<u64>(), Ordering::Relaxed);
                return Box::pin(async move { Err(error) });
            }
        };
        let rows = batches.iter().map(|b| b.records.len().max(b.rows as usize)).sum::<usize>();
        inner.buffer.lock().unwrap_or_else(|e| e.into_inner()).extend(batches);
        if inner.buffered_rows.fetch_add(rows, Ordering::Relaxed) + rows < FLUSH_ROWS {
            return Box::pin(async { Ok(()) });
        }
        self.run(|inner| inner.write(Durability::None, |_| Ok(())))
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        let idle = self.current().is_ok_and(|inner| inner.buffered_rows.load(Ordering::Relaxed) == 0);
        if idle {
            return Box::pin(async { Ok(()) });
        }
        self.run(|inner| inner.write(Durability::None, |_| Ok(())))
    }

    fn take(&self, ids: Vec<String>, now_ms: i64) -> StoreFuture<'_, Vec<Option<TakenRow>>> {
        self.run(move |inner| inner.take(ids, now_ms))
    }

    fn restore(&self, rows: Vec<TakenRow>) -> StoreFuture<'_, ()> {
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
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let open = match &*state {
            State::Open(inner) => Some(inner.clone()),
            State::Failed { .. } => None,
        };
        drop(state);
        let failed_now = open.as_ref().map_or(0, |inner| inner.failed_rows.load(Ordering::Relaxed));
        StoreStats {
            pending_rows: open.as_ref().map(|inner| inner.pending.load(Ordering::Relaxed)),
            evictions: open.as_ref().map_or(0, |inner| inner.evictions.load(Ordering::Relaxed)),
            failed_rows: self.failed_rows.load(Ordering::Relaxed) + failed_now,
            corrupt_files: self.corrupt_files.load(Ordering::Relaxed),
        }
    }

    fn health(&self) -> Option<String> {
        match &*self.state.lock().unwrap_or_else(|e| e.into_inner()) {
            State::Open(_) => None,
            State::Failed { error, .. } => Some(format!("embedded label store unavailable ({error}); reopening")),
        }
    }
}
