//! The embedded join store: one redb file under the output dir, for a single
//! replica. It survives restarts (a prediction before a restart joins a label after
//! it), drops rows once they expire, and holds at most `max_pending_rows` rows
//! waiting for a label, evicting those closest to expiry first and counting them.
//!
//! Prediction rows are kept as one record per exchange (`record::ExchangeRecord`),
//! with a bitmap of the rows already taken: recording costs one insert per exchange,
//! and expiry drops whole exchanges. Records are buffered and written many per
//! transaction.
//!
//! Records are appended to a log under a sequence number that only grows, each with
//! its own key (request id or row id) inside, in append-only segment files beside the
//! redb file (`segments`: one file per generation of `GENERATION_RECORDS`
//! sequences, one write per transaction). redb keeps what changes: the rows labels
//! took (`TAKEN_PREFIX` tables, laid over the records when they are read), the
//! counts, the log's start and end, the streams and the bucket aggregates. Expiry and
//! eviction move the log's start past the oldest records instead of deleting them,
//! and drop the generations wholly behind it, file and table, so the oldest records
//! cost no delete each. A label finds its record through an in-memory index
//! (`KeyIndex`: a 32-bit hash of the key to the sequence, 8 bytes a record, rebuilt
//! by one scan of the segments when the store opens), and the key stored in the
//! record is compared on every lookup, so a hash collision misses instead of joining
//! a label to another exchange's row. There is no expiry index: expiry drops records
//! from the oldest while they are expired; a record of an older bucket recorded
//! after newer ones waits behind them (refused by its own expiry when a label asks
//! for it) and goes with them, or with eviction, oldest first.
//!
//! redb is synchronous, so every operation runs on the blocking pool. Writes commit
//! without fsync (`Durability::None`: an fsync per observation would cap recording
//! at a few hundred per second); `maintain`, called with every `due` tick, and
//! closing the store commit durably, after syncing the segments written since the
//! last durable commit. A crash loses at most the writes since the last tick, never
//! the file: redb rolls back to its last durable commit, and the segments are read up
//! to the log's end that commit stored (`META_LOG_END`), the frames after it cut off.
//!
//! The file carries its format (`meta.format`). A file of an earlier format is
//! converted on open: format 3's log in redb tables is appended to the segments in
//! its order, format 2's records keyed by request id in their expiry order, and each
//! row of the per-row format 1 becomes a one-row record under its own id, so all
//! still join; a file of a newer format is renamed aside (`labels.redb.unusable-TIME`)
//! with a warning, and a damaged one (truncated, corrupt) is renamed aside as
//! `labels.redb.corrupt-TIME`, logged at error and counted; the store starts empty.
//!
//! A store fault never stops mltap: when the file cannot be opened (no space, no
//! permission, held by another process) or an operation fails (redb refuses every
//! transaction after an I/O error such as a full disk), the store closes the file and
//! reopens it on a later operation, after a backoff doubling from 1 s to 60 s.
//! Meanwhile its operations fail (the label endpoint answers 503), recorded rows are
//! counted as failed, and `health` says what is wrong for `/readyz`.

use super::segments::Segments;
use super::{BucketUpdate, ClaimedBucket, LabelStore, RecordBatch, StoreError, StoreFuture, StoreStats, TakenRow};
use crate::labels::aggregate::{apply_delta, BucketDelta, F_AUC_LEN, F_CLAIMED, F_PREDICTED};
use crate::labels::record::{set_taken, BucketId, ExchangeRecord, PendingRow, RowRef, StreamMeta};
use redb::{
    Database, DatabaseError, Durability, ReadableTable, StorageError, TableDefinition, TableHandle, WriteTransaction,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// Format 3's log of pending exchanges, one table per generation of
/// `GENERATION_RECORDS` sequences (`exchange_log.<generation>`): sequence -> log
/// entry; converted into segments when such a file opens.
const V3_LOG_PREFIX: &str = "exchange_log.";
/// The rows taken from records of the log since they were appended, one table per
/// generation (`exchange_taken.<generation>`, dropped with its segment): sequence ->
/// the record's bitmap of taken rows. Segments are never rewritten.
const TAKEN_PREFIX: &str = "exchange_taken.";
/// Sequences per generation of the log (a segment file and a taken-row table).
const GENERATION_RECORDS: u64 = 4096;
/// Oldest records read at a time by expiry and eviction.
const OLDEST_RUN: usize = 64;
/// Format 2's pending exchanges (key -> encoded `ExchangeRecord`), converted when
/// such a file opens.
const V2_EXCHANGES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("exchanges");
/// Format 2's expiry order of its exchanges: (expires_ms, key).
const V2_EXPIRY: TableDefinition<(i64, &[u8]), ()> = TableDefinition::new("exchange_expiry");
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
/// The file layout this code writes (`meta.format`): 4 keeps the log of exchange
/// records in segment files beside the redb file; 3 kept it in redb tables by
/// sequence; 2 was one record per exchange keyed by request id; files without it
/// are of format 1 (one record per row).
const FORMAT: u64 = 4;
/// `meta` key of the format.
const META_FORMAT: &str = "format";
/// `meta` key of the rows waiting for a label, kept with the records they count.
const META_PENDING: &str = "pending_rows";
/// `meta` key of the log's start: records of smaller sequences are gone (evicted or
/// expired), even where their generation table is still in the file.
const META_LOG_START: &str = "log_start";
/// `meta` key of the log's end: the sequence after the last record appended. A
/// reopened store reads the segments up to the end of the last commit redb kept.
const META_LOG_END: &str = "log_end";
/// `meta` key of the evictions since the file was created.
const META_EVICTIONS: &str = "evictions";
/// redb's page cache. Its default (1 GiB) fills up under sustained recording and
/// would alone exceed mltap's memory budget. Leaves are read back through the OS
/// page cache; label ingestion measured as fast with 4 MiB as with 1 GiB.
const CACHE_BYTES: usize = 4 << 20;
/// Buffered rows that trigger a write of the buffer: a few hundred 64-row exchanges
/// per transaction, so a commit's fixed cost is shared by many of them.
const FLUSH_ROWS: usize = 16_384;
/// How far behind the next sequence a record may be: the index keeps the low 32 bits
/// of each record's sequence, which name it only within this window. A record this
/// old is evicted (at a million records a second, after 71 minutes of recording).
const SEQ_WINDOW: u64 = u32::MAX as u64;
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
    /// The log of pending exchanges: its index and segments.
    log: std::sync::Mutex<Log>,
}

/// The in-memory index from a record's key to its sequence in the log. A slot is 8
/// bytes (a 32-bit hash of the key and the sequence's low 32 bits, see `SEQ_WINDOW`)
/// plus hashbrown's control byte: 9 bytes at 44-88 % load, i.e. 10-21 bytes a pending
/// record. A 32-bit hash collides (two keys in a few billion of the keys pending at
/// once), so it only proposes candidates: the key stored in the record decides.
struct KeyIndex {
    /// Seeded per process: keys come from clients, who must not be able to choose
    /// colliding ones (each collision costs a record read on lookup).
    hasher: foldhash::fast::RandomState,
    slots: hashbrown::HashTable<Slot>,
    /// The sequence of the next record appended.
    next_seq: u64,
}

#[derive(Clone, Copy)]
struct Slot {
    /// The high 32 bits of the key's hash.
    tag: u32,
    /// The low 32 bits of the record's sequence.
    seq_low: u32,
}

impl KeyIndex {
    fn new() -> KeyIndex {
        KeyIndex { hasher: foldhash::fast::RandomState::default(), slots: hashbrown::HashTable::new(), next_seq: 0 }
    }

    fn tag(&self, key: &[u8]) -> u32 {
        (self.hasher.hash_one(key) >> 32) as u32
    }

    /// The table's hash of a slot, from its tag alone (the table rehashes slots when
    /// it grows, and a slot holds nothing else of its key).
    fn placement(tag: u32) -> u64 {
        u64::from(tag).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }

    /// The full sequence of a slot: the one below `next_seq` with its low 32 bits.
    fn seq_of(&self, slot: &Slot) -> Option<u64> {
        let behind = (self.next_seq as u32).wrapping_sub(slot.seq_low);
        self.next_seq.checked_sub(u64::from(behind))
    }

    /// Sequences of the records that may have `key`, to be checked against the log.
    fn candidates(&self, key: &[u8]) -> Vec<u64> {
        let tag = self.tag(key);
        self.slots
            .iter_hash(Self::placement(tag))
            .filter(|slot| slot.tag == tag)
            .filter_map(|slot| self.seq_of(slot))
            .collect()
    }

    fn insert(&mut self, key: &[u8], seq: u64) {
        let tag = self.tag(key);
        let slot = Slot { tag, seq_low: seq as u32 };
        self.slots.insert_unique(Self::placement(tag), slot, |s| Self::placement(s.tag));
    }

    fn remove(&mut self, key: &[u8], seq: u64) {
        let tag = self.tag(key);
        let found = self.slots.find_entry(Self::placement(tag), |s| s.tag == tag && s.seq_low == seq as u32);
        if let Ok(entry) = found {
            entry.remove();
        }
    }

    /// Heap bytes of the index.
    fn bytes(&self) -> usize {
        self.slots.allocation_size()
    }
}

/// A log entry: the key's length (u16, little-endian), the key, then the encoded
/// `ExchangeRecord`; None for a key too long to be a request or row id.
fn entry_bytes(key: &[u8], record: &[u8]) -> Option<Vec<u8>> {
    let len = u16::try_from(key.len()).ok()?;
    let mut entry = Vec::with_capacity(2 + key.len() + record.len());
    entry.extend_from_slice(&len.to_le_bytes());
    entry.extend_from_slice(key);
    entry.extend_from_slice(record);
    Some(entry)
}

/// Bytes of a log entry before its record.
fn entry_prefix(entry: &[u8]) -> Option<usize> {
    let len = usize::from(u16::from_le_bytes(entry.get(..2)?.try_into().ok()?));
    (entry.len() >= 2 + len).then_some(2 + len)
}

/// The key and record of a log entry.
fn split_entry(entry: &[u8]) -> Option<(&[u8], &[u8])> {
    let prefix = entry_prefix(entry)?;
    Some((&entry[2..prefix], &entry[prefix..]))
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
            Opened::Ready(inner) => return Ok(*inner),
            Opened::Unusable(reason) => set_aside(path, "unusable", &reason)?,
            Opened::Corrupt(reason) => {
                set_aside(path, "corrupt", &reason)?;
                self.corrupt_files.fetch_add(1, Ordering::Relaxed);
            }
        }
        match Inner::open(path, self.max_rows, self.auc_cap)? {
            Opened::Ready(inner) => Ok(*inner),
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
    /// A store in the current format (converted if it was of an earlier one).
    Ready(Box<Inner>),
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
    // The log's segments go with their file (`<aside>.log`), where the file alone
    // would leave them to be removed by the fresh store.
    let segments = Segments::dir_of(path);
    if segments.exists() {
        if let Err(e) = std::fs::rename(&segments, Segments::dir_of(&aside)) {
            tracing::warn!(message = "Label log segments not set aside with their file.", dir = %segments.display(), error = %e);
        }
    }
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

/// The log of pending exchanges in memory: the index from keys to sequences, the
/// segment files holding the records, and which generations have taken-row tables.
/// Changed only inside write transactions (which redb runs one at a time), and
/// rebuilt from the files when the store is reopened after a failed one.
struct Log {
    /// Where the segments are (`Segments::dir_of` the store file).
    dir: PathBuf,
    index: KeyIndex,
    segments: Segments,
    /// Generations with a taken-row table (`TAKEN_PREFIX`) in the file.
    taken_generations: BTreeSet<u64>,
}

impl Log {
    fn new(store: &Path) -> Log {
        let dir = Segments::dir_of(store);
        Log { segments: Segments::empty(&dir), dir, index: KeyIndex::new(), taken_generations: BTreeSet::new() }
    }
}

/// The pending-row log of one write transaction and its index, with the running
/// count of rows waiting for a label (stored in `meta` by `close`, so it always
/// matches the file).
struct Rows<'t> {
    txn: &'t WriteTransaction,
    /// The taken-row tables opened by this transaction, by generation.
    taken: BTreeMap<u64, redb::Table<'t, u64, &'static [u8]>>,
    meta: redb::Table<'t, &'static str, u64>,
    log: std::sync::MutexGuard<'t, Log>,
    /// Rows waiting for a label.
    pending: u64,
    /// Records of smaller sequences are gone (`META_LOG_START`).
    log_start: u64,
}

/// A record a batch of labels read from the log (None: there was none), to write
/// back by `write_back` if a row of it was taken.
struct Touched {
    /// Its sequence and log entry.
    found: Option<(u64, Vec<u8>)>,
    /// Whether a row was taken from it.
    changed: bool,
}

/// A record's sequence and log entry.
type LogEntry = (u64, Vec<u8>);

/// Records touched by one batch of labels, by key.
type TouchedRecords = HashMap<Vec<u8>, Touched, foldhash::fast::RandomState>;

/// The generation of a sequence.
fn generation_of(seq: u64) -> u64 {
    seq / GENERATION_RECORDS
}

/// The name of a taken-row table.
fn taken_table_name(generation: u64) -> String {
    format!("{TAKEN_PREFIX}{generation}")
}

/// The name of a format 3 generation table of the log.
fn v3_log_table_name(generation: u64) -> String {
    format!("{V3_LOG_PREFIX}{generation}")
}

/// Generations of the tables named `prefix<generation>`, in order.
fn tables_of(txn: &WriteTransaction, prefix: &str) -> Result<Vec<u64>, DbError> {
    let mut generations: Vec<u64> =
        txn.list_tables()?.filter_map(|table| table.name().strip_prefix(prefix).and_then(|g| g.parse().ok())).collect();
    generations.sort_unstable();
    Ok(generations)
}

/// Where the bitmap of taken rows is inside a log entry.
fn bitmap_range(entry: &[u8]) -> Option<std::ops::Range<usize>> {
    let prefix = entry_prefix(entry)?;
    let range = ExchangeRecord::parse(&entry[prefix..])?.taken_bitmap_range();
    Some(prefix + range.start..prefix + range.end)
}

/// Lays a stored bitmap of taken rows (`TAKEN_PREFIX`) over a log entry's own.
fn lay_taken(entry: &mut [u8], taken: &[u8]) {
    if let Some(bitmap) = bitmap_range(entry).and_then(|r| entry.get_mut(r)).filter(|b| b.len() == taken.len()) {
        bitmap.copy_from_slice(taken);
    }
}

impl<'t> Rows<'t> {
    fn open(txn: &'t WriteTransaction, log: &'t std::sync::Mutex<Log>) -> Result<Rows<'t>, DbError> {
        let meta = txn.open_table(META)?;
        let pending = meta.get(META_PENDING)?.map(|v| v.value()).unwrap_or(0);
        let log_start = meta.get(META_LOG_START)?.map(|v| v.value()).unwrap_or(0);
        let log = log.lock().unwrap_or_else(|e| e.into_inner());
        Ok(Rows { txn, taken: BTreeMap::new(), meta, log, pending, log_start })
    }

    /// The taken-row table of `generation`, opened once per transaction (and
    /// created by its first write).
    fn taken_table(&mut self, generation: u64) -> Result<&mut redb::Table<'t, u64, &'static [u8]>, DbError> {
        let txn = self.txn;
        Ok(match self.taken.entry(generation) {
            std::collections::btree_map::Entry::Occupied(open) => open.into_mut(),
            std::collections::btree_map::Entry::Vacant(slot) => {
                let name = taken_table_name(*slot.key());
                let table = txn.open_table(TableDefinition::new(&name))?;
                self.log.taken_generations.insert(*slot.key());
                slot.insert(table)
            }
        })
    }

    /// Overlays the rows taken since `entry` (of record `seq`) was appended.
    fn overlay_taken(&mut self, seq: u64, entry: &mut [u8]) -> Result<(), DbError> {
        let generation = generation_of(seq);
        if !self.log.taken_generations.contains(&generation) {
            return Ok(());
        }
        if let Some(taken) = self.taken_table(generation)?.get(seq)? {
            lay_taken(entry, taken.value());
        }
        Ok(())
    }

    /// Stores which rows of record `seq` are taken, from its entry `entry`.
    fn store_taken(&mut self, seq: u64, entry: &[u8]) -> Result<(), DbError> {
        let Some(bitmap) = bitmap_range(entry).and_then(|r| entry.get(r)) else { return Ok(()) };
        self.taken_table(generation_of(seq))?.insert(seq, bitmap)?;
        Ok(())
    }

    /// The entry of record `seq` as it is now (with its taken rows).
    fn read(&mut self, seq: u64) -> Result<Option<Vec<u8>>, DbError> {
        let Some(mut entry) = self.log.segments.read(generation_of(seq), seq)? else { return Ok(None) };
        self.overlay_taken(seq, &mut entry)?;
        Ok(Some(entry))
    }

    /// Rebuilds the index and the pending count from the segments: one scan, when
    /// the file opens. Frames past the log's committed end (written after the last
    /// commit redb kept) are cut off, segments and taken-row tables wholly before
    /// the log's start are dropped. Returns the records indexed.
    fn rebuild_index(&mut self) -> Result<u64, DbError> {
        let log_end = self.meta.get(META_LOG_END)?.map(|v| v.value()).unwrap_or(0);
        let start_generation = generation_of(self.log_start);
        let end_generation = generation_of(log_end.saturating_sub(1));
        self.log.taken_generations.clear();
        for generation in tables_of(self.txn, TAKEN_PREFIX)? {
            if log_end == 0 || generation < start_generation || generation > end_generation {
                self.txn.delete_table(TableDefinition::<u64, &[u8]>::new(&taken_table_name(generation)))?;
            } else {
                self.taken_table(generation)?;
            }
        }
        let log = &mut *self.log;
        log.index.slots.clear();
        log.index.next_seq = self.log_start.max(log_end);
        let (log_start, taken) = (self.log_start, &self.taken);
        let (mut records, mut pending, mut failed) = (0u64, 0u64, None);
        let index = &mut log.index;
        let mut visit = |seq: u64, entry: &[u8]| {
            if seq < log_start || failed.is_some() {
                return;
            }
            let mut entry = entry.to_vec();
            if let Some(table) = taken.get(&generation_of(seq)) {
                match table.get(seq) {
                    Ok(Some(bits)) => lay_taken(&mut entry, bits.value()),
                    Ok(None) => {}
                    Err(e) => failed = Some(DbError(e.to_string())),
                }
            }
            let Some((key, record)) = split_entry(&entry) else { return };
            let untaken = ExchangeRecord::parse(record).map_or(0, |r| r.untaken() as u64);
            if untaken > 0 {
                index.insert(key, seq);
                pending += untaken;
                records += 1;
            }
        };
        let (segments, damaged) = Segments::open(&log.dir, start_generation, log_end, generation_of, &mut visit)?;
        if let Some(error) = failed {
            return Err(error);
        }
        if damaged > 0 {
            tracing::error!(
                message = "Label log segments damaged; the records from the first damaged frame of each were dropped.",
                dir = %log.dir.display(),
                damaged_frames = damaged,
            );
        }
        log.segments = segments;
        self.pending = pending;
        Ok(records)
    }

    /// The record stored under `key`: its sequence and log entry.
    fn find(&mut self, key: &[u8]) -> Result<Option<(u64, Vec<u8>)>, DbError> {
        for seq in self.log.index.candidates(key) {
            if seq < self.log_start {
                continue;
            }
            let Some(entry) = self.read(seq)? else { continue };
            if split_entry(&entry).is_some_and(|(stored, _)| stored == key) {
                return Ok(Some((seq, entry)));
            }
        }
        Ok(None)
    }

    /// The sequence of the next record, of `len` bytes: the next in the current
    /// generation's segment, or the first of the next generation when the segment
    /// is full (or the next sequence was moved past its end).
    fn assign(&mut self, len: usize) -> u64 {
        let log = &mut *self.log;
        let mut seq = log.index.next_seq;
        let generation = generation_of(seq);
        let continues = log.segments.next_in(generation).is_none_or(|next| next == seq);
        if !continues || !log.segments.fits(generation, len) {
            seq = (generation + 1) * GENERATION_RECORDS;
        }
        log.index.next_seq = seq + 1;
        seq
    }

    /// Appends a record under `key`, replacing (and uncounting) a record of the same
    /// key: a request id reused by a later exchange names that exchange's rows.
    fn put(&mut self, key: &[u8], bytes: &[u8]) -> Result<(), DbError> {
        let Some(record) = ExchangeRecord::parse(bytes) else { return Ok(()) };
        let untaken = record.untaken() as u64;
        let Some(entry) = entry_bytes(key, bytes) else { return Ok(()) };
        if let Some((seq, old)) = self.find(key)? {
            self.remove(seq, key, &old)?;
        }
        let seq = self.assign(entry.len());
        self.log.segments.append(generation_of(seq), seq, &entry)?;
        self.log.index.insert(key, seq);
        self.pending += untaken;
        Ok(())
    }

    /// Removes the record `entry` of `key` at `seq` (all its rows taken), uncounting
    /// its waiting rows.
    fn remove(&mut self, seq: u64, key: &[u8], entry: &[u8]) -> Result<(), DbError> {
        let mut all_taken = entry.to_vec();
        if let Some(prefix) = entry_prefix(&all_taken) {
            let record = &mut all_taken[prefix..];
            let rows = ExchangeRecord::parse(record).map_or(0, |r| r.rows());
            for row in 0..rows {
                set_taken(record, row, true);
            }
        }
        self.store_taken(seq, &all_taken)?;
        self.forget(seq, key, entry);
        Ok(())
    }

    /// Unindexes the record `entry` of `key` at `seq` and uncounts its waiting rows.
    fn forget(&mut self, seq: u64, key: &[u8], entry: &[u8]) {
        self.log.index.remove(key, seq);
        let untaken = split_entry(entry).and_then(|(_, record)| ExchangeRecord::parse(record)).map(|r| r.untaken());
        self.pending = self.pending.saturating_sub(untaken.unwrap_or(0) as u64);
    }

    /// Moves the log's start to the next generation with a segment (the ones
    /// between are empty); false when the log has nothing left.
    fn skip_generation(&mut self) -> bool {
        let next_seq = self.log.index.next_seq;
        let next = self.log.segments.next_generation_after(generation_of(self.log_start));
        self.log_start = next.map_or(next_seq, |g| (g * GENERATION_RECORDS).min(next_seq));
        self.log_start < next_seq
    }

    /// Drops the oldest records (read by `oldest_while`) by moving the log's start
    /// past them: they stay in their segment until it is dropped whole. Returns the
    /// rows they had waiting.
    fn drop_oldest(&mut self, dropped: Vec<LogEntry>) -> u64 {
        let before = self.pending;
        for (seq, entry) in dropped {
            if let Some((key, _)) = split_entry(&entry) {
                self.forget(seq, key, &entry);
            }
            self.log_start = self.log_start.max(seq + 1);
        }
        before - self.pending
    }

    /// Reads the oldest records, from the log's start, a run of them at a time,
    /// while `more(sequence, waiting rows, expiry)` says to go on; the first record
    /// it refuses is returned apart. Empty generations are skipped.
    fn oldest_while(
        &mut self,
        mut more: impl FnMut(u64, u64, i64) -> bool,
    ) -> Result<(Vec<LogEntry>, Option<LogEntry>), DbError> {
        loop {
            let start = self.log_start;
            if start >= self.log.index.next_seq {
                return Ok((Vec::new(), None));
            }
            let run = self.log.segments.read_run(generation_of(start), start, OLDEST_RUN)?;
            let mut taken = Vec::new();
            let mut refused = None;
            for (seq, mut entry) in run {
                self.overlay_taken(seq, &mut entry)?;
                let record = split_entry(&entry).and_then(|(_, r)| ExchangeRecord::parse(r));
                // An entry that cannot be read has nothing waiting: it goes first.
                let (untaken, expires_ms) = record.map_or((0, i64::MIN), |r| (r.untaken() as u64, r.expires_ms()));
                if !more(seq, untaken, expires_ms) {
                    refused = Some((seq, entry));
                    break;
                }
                taken.push((seq, entry));
            }
            if let Some((seq, _)) = &refused {
                // Nothing is left before it but what was taken.
                if taken.is_empty() {
                    self.log_start = *seq;
                }
            }
            if !taken.is_empty() || refused.is_some() || !self.skip_generation() {
                return Ok((taken, refused));
            }
        }
    }

    /// Evicts the oldest rows until at most `max_rows` wait (whole exchanges, and the
    /// first rows of the last one) and no record is older than `SEQ_WINDOW`; returns
    /// how many rows were evicted.
    fn evict(&mut self, max_rows: u64) -> Result<u64, DbError> {
        let mut evicted = 0;
        loop {
            let next_seq = self.log.index.next_seq;
            let too_old = |seq: u64| next_seq - seq >= SEQ_WINDOW;
            if self.pending <= max_rows && !too_old(self.log_start) {
                return Ok(evicted);
            }
            let mut excess = self.pending.saturating_sub(max_rows);
            let (whole, partly) = self.oldest_while(|seq, untaken, _| {
                if excess == 0 && !too_old(seq) {
                    return false;
                }
                if untaken <= excess || too_old(seq) {
                    excess = excess.saturating_sub(untaken);
                    return true;
                }
                false
            })?;
            let progressed = !whole.is_empty();
            evicted += self.drop_oldest(whole);
            let excess = self.pending.saturating_sub(max_rows);
            match partly {
                Some((seq, mut entry)) if excess > 0 => {
                    let Some(prefix) = entry_prefix(&entry) else { continue };
                    let record = &mut entry[prefix..];
                    let first_rows: Vec<usize> = ExchangeRecord::parse(record)
                        .map(|r| r.untaken_rows().take(excess as usize).collect())
                        .unwrap_or_default();
                    for row in &first_rows {
                        set_taken(record, *row, true);
                    }
                    self.store_taken(seq, &entry)?;
                    self.pending -= first_rows.len() as u64;
                    evicted += first_rows.len() as u64;
                }
                None if !progressed => {
                    // Nothing left to evict: the count had drifted from the records.
                    if self.pending > max_rows {
                        self.pending = 0;
                    }
                    return Ok(evicted);
                }
                _ => {}
            }
        }
    }

    /// Drops the records expired by `now_ms`, from the oldest, up to the first one
    /// that is not; returns how many records were dropped.
    fn expire(&mut self, now_ms: i64) -> Result<u64, DbError> {
        let mut dropped = 0;
        loop {
            let (expired, first_alive) = self.oldest_while(|_, _, expires_ms| expires_ms <= now_ms)?;
            if expired.is_empty() {
                return Ok(dropped);
            }
            dropped += expired.len() as u64;
            self.drop_oldest(expired);
            if first_alive.is_some() {
                return Ok(dropped);
            }
        }
    }

    /// Takes one row for a label, through the records this transaction touched.
    fn take_row(
        &mut self,
        touched: &mut TouchedRecords,
        at: &RowRef,
        now_ms: i64,
    ) -> Result<Option<TakenRow>, DbError> {
        let key = at.key.as_bytes();
        if !touched.contains_key(key) {
            let found = self.find(key)?;
            touched.insert(key.to_vec(), Touched { found, changed: false });
        }
        let Some(entry) = touched.get_mut(key) else { return Ok(None) };
        let Some((_, bytes)) = entry.found.as_mut() else { return Ok(None) };
        let Some(prefix) = entry_prefix(bytes) else { return Ok(None) };
        let record_bytes = &mut bytes[prefix..];
        let Some(record) = ExchangeRecord::parse(record_bytes) else { return Ok(None) };
        let row = at.row as usize;
        if record.suffixed() != at.suffixed
            || row >= record.rows()
            || record.is_taken(row)
            || record.expires_ms() <= now_ms
        {
            return Ok(None);
        }
        let Some(pending) = record.row(row) else { return Ok(None) };
        set_taken(record_bytes, row, true);
        entry.changed = true;
        self.pending = self.pending.saturating_sub(1);
        Ok(Some(TakenRow { at: at.clone(), row: pending }))
    }

    /// Stores the taken rows of the records a batch of labels took rows from; a
    /// record whose rows are all taken is unindexed (nothing can join it any more).
    fn write_back(&mut self, touched: TouchedRecords) -> Result<(), DbError> {
        for (key, entry) in touched {
            let (true, Some((seq, bytes))) = (entry.changed, entry.found) else { continue };
            self.store_taken(seq, &bytes)?;
            let untaken = split_entry(&bytes).and_then(|(_, r)| ExchangeRecord::parse(r)).map(|r| r.untaken());
            if untaken == Some(0) {
                self.log.index.remove(&key, seq);
            }
        }
        Ok(())
    }

    /// Drops the segments and taken-row tables wholly before the log's start, writes
    /// the records appended, stores the count, the start and the end, and publishes
    /// the count to the gauge.
    fn close(mut self, gauge: &AtomicU64) -> Result<(), DbError> {
        let live = generation_of(self.log_start);
        self.log.segments.drop_before(live);
        let dead: Vec<u64> = self.log.taken_generations.range(..live).copied().collect();
        for generation in dead {
            // A table must be closed before it is deleted.
            self.taken.remove(&generation);
            self.txn.delete_table(TableDefinition::<u64, &[u8]>::new(&taken_table_name(generation)))?;
            self.log.taken_generations.remove(&generation);
        }
        self.log.segments.flush()?;
        self.meta.insert(META_PENDING, self.pending)?;
        self.meta.insert(META_LOG_START, self.log_start)?;
        self.meta.insert(META_LOG_END, self.log.index.next_seq)?;
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
/// label `ID:ROW` finds them through the second of `RowRef::candidates`), in their
/// expiry order and skipping expired rows, and removes format 1's tables. Streams
/// from one table to the other, so a full file converts without holding its rows in
/// memory.
fn convert_rows(txn: &WriteTransaction, rows: &mut Rows<'_>, now_ms: i64) -> Result<u64, DbError> {
    let mut converted = 0;
    {
        let legacy = txn.open_table(LEGACY_ROWS)?;
        let order = txn.open_table(LEGACY_EXPIRY)?;
        for entry in order.iter()? {
            let (key, _) = entry?;
            let (expires_ms, id) = key.value();
            if expires_ms <= now_ms {
                continue;
            }
            let Some(bytes) = legacy.get(id)? else { continue };
            let Some(row) = PendingRow::decode(bytes.value()) else { continue };
            rows.put(id, &row.to_record(0, false))?;
            converted += 1;
        }
    }
    txn.delete_table(LEGACY_ROWS)?;
    txn.delete_table(LEGACY_EXPIRY)?;
    Ok(converted)
}

/// Converts format 2's records keyed by request id into the log, in their expiry
/// order (so that the oldest are evicted and expire first, as before), skipping
/// expired ones, and removes format 2's tables. Streams like `convert_rows`.
fn convert_exchanges(txn: &WriteTransaction, rows: &mut Rows<'_>, now_ms: i64) -> Result<u64, DbError> {
    let mut converted = 0;
    {
        let exchanges = txn.open_table(V2_EXCHANGES)?;
        let order = txn.open_table(V2_EXPIRY)?;
        for entry in order.iter()? {
            let (key, _) = entry?;
            let (expires_ms, id) = key.value();
            if expires_ms <= now_ms {
                continue;
            }
            let Some(bytes) = exchanges.get(id)? else { continue };
            rows.put(id, bytes.value())?;
            converted += 1;
        }
    }
    txn.delete_table(V2_EXCHANGES)?;
    txn.delete_table(V2_EXPIRY)?;
    Ok(converted)
}

/// Converts format 3's log (redb tables by sequence, from its start) into segments,
/// in its order, skipping expired records and records with nothing waiting, and
/// removes its tables.
fn convert_log(txn: &WriteTransaction, rows: &mut Rows<'_>, log_start: u64, now_ms: i64) -> Result<u64, DbError> {
    let mut converted = 0;
    for generation in tables_of(txn, V3_LOG_PREFIX)? {
        let name = v3_log_table_name(generation);
        {
            let table = txn.open_table(TableDefinition::<u64, &[u8]>::new(&name))?;
            for item in table.range(log_start..)? {
                let (_, entry) = item?;
                let Some((key, bytes)) = split_entry(entry.value()) else { continue };
                let Some(record) = ExchangeRecord::parse(bytes) else { continue };
                if record.expires_ms() <= now_ms || record.untaken() == 0 {
                    continue;
                }
                rows.put(key, bytes)?;
                converted += 1;
            }
        }
        txn.delete_table(TableDefinition::<u64, &[u8]>::new(&name))?;
    }
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
            log: std::sync::Mutex::new(Log::new(path)),
        };
        // Create the tables up front so readers never meet a missing table.
        inner.write(Durability::Immediate, |txn| {
            txn.open_table(STREAMS)?;
            txn.open_table(BUCKETS)?;
            txn.open_table(DUE)?;
            txn.open_table(AUC)?;
            txn.open_table(RETAIN)?;
            let mut rows = Rows::open(txn, &inner.log)?;
            let mut evictions = rows.meta.get(META_EVICTIONS)?.map(|v| v.value()).unwrap_or(0);
            // An earlier format's log starts afresh in segments (any segment files
            // beside it are not its own: it has no `log_end`, so they are removed).
            let earlier_log_start = rows.log_start;
            if format != Some(FORMAT) {
                rows.log_start = 0;
            }
            let started = std::time::Instant::now();
            let records = rows.rebuild_index()?;
            if records > 0 {
                tracing::info!(
                    message = "Label store index rebuilt.",
                    path = %inner.path.display(),
                    records,
                    pending_rows = rows.pending,
                    index_bytes = rows.log.index.bytes(),
                    segment_bytes = rows.log.segments.bytes(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                );
            }
            if format != Some(FORMAT) {
                // Every pending row of an earlier format is in the tables converted.
                rows.pending = 0;
                let (converted, from) = match format {
                    Some(3) => (
                        convert_log(txn, &mut rows, earlier_log_start, now_ms())?,
                        "a log of exchange records in redb tables",
                    ),
                    Some(2) => (convert_exchanges(txn, &mut rows, now_ms())?, "one record per exchange by request id"),
                    _ => (convert_rows(txn, &mut rows, now_ms())?, "one record per row"),
                };
                if converted > 0 {
                    tracing::info!(
                        message = "Label store converted from an earlier format.",
                        path = %inner.path.display(),
                        from,
                        records = converted,
                        pending_rows = rows.pending,
                    );
                }
                evictions += rows.evict(inner.max_rows)?;
                rows.meta.insert(META_EVICTIONS, evictions)?;
                rows.meta.insert(META_FORMAT, FORMAT)?;
            }
            inner.evictions.store(evictions, Ordering::Relaxed);
            rows.close(&inner.pending)
        })?;
        Ok(Opened::Ready(Box::new(inner)))
    }

    fn write<T>(
        &self,
        durability: Durability,
        op: impl FnOnce(&WriteTransaction) -> Result<T, DbError>,
    ) -> Result<T, StoreError> {
        let fail = |DbError(detail)| StoreError::Embedded { path: self.path.display().to_string(), detail };
        let batches = self.drain();
        let rows = batches.iter().map(|b| b.rows).sum::<u64>();
        let durable = matches!(durability, Durability::Immediate);
        let result = (|| {
            let mut txn = self.db.begin_write()?;
            txn.set_durability(durability);
            self.write_records(&txn, batches)?;
            let out = op(&txn)?;
            let doomed = if durable {
                // The segments hold what this commit's `log_end` promises.
                let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
                log.segments.sync()?;
                log.segments.take_doomed()
            } else {
                Vec::new()
            };
            txn.commit()?;
            Segments::remove_files(doomed);
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
            let mut rows = Rows::open(txn, &self.log)?;
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
            let mut rows = Rows::open(txn, &self.log)?;
            // The labels of one batch often share exchanges: each record is read
            // and written back once per batch.
            let mut touched = TouchedRecords::default();
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
            let mut rows = Rows::open(txn, &self.log)?;
            for taken in &restored {
                let key = taken.at.key.as_bytes();
                let row = taken.at.row as usize;
                match rows.find(key)? {
                    Some((seq, mut entry)) => {
                        let Some(prefix) = entry_prefix(&entry) else { continue };
                        let bytes = &mut entry[prefix..];
                        let Some(record) = ExchangeRecord::parse(bytes) else { continue };
                        // Only into the record it came from: a later exchange under the
                        // same id has replaced it otherwise, and the row is gone.
                        let same = record.suffixed() == taken.at.suffixed
                            && row < record.rows()
                            && record.is_taken(row)
                            && record.row(row).as_ref() == Some(&taken.row);
                        if same {
                            set_taken(bytes, row, false);
                            rows.store_taken(seq, &entry)?;
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
        // The segments written since the last tick are synced first, outside any
        // transaction: at saturation that is a second of records, and recording
        // waits for no sync. Twice: the second pass syncs what was recorded during
        // the first, so that the durable commit, which recording does wait for,
        // syncs only the few records of the second pass's time.
        for _ in 0..2 {
            let unsynced = self.log.lock().unwrap_or_else(|e| e.into_inner()).segments.take_unsynced();
            unsynced.and_then(|u| u.sync()).map_err(|e| StoreError::Embedded {
                path: self.path.display().to_string(),
                detail: format!("cannot sync the label log: {e}"),
            })?;
        }
        self.write(Durability::Immediate, |txn| {
            {
                let mut rows = Rows::open(txn, &self.log)?;
                // Whole exchanges expire together: one delete per exchange, from
                // the log's start.
                rows.expire(now_ms)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::record::ExchangeWriter;

    fn open(dir: &Path) -> Inner {
        match Inner::open(&dir.join("labels.redb"), 1_000, 10).ok() {
            Some(Opened::Ready(inner)) => *inner,
            _ => panic!("the store opens"),
        }
    }

    fn one_row_record(p: f64) -> Vec<u8> {
        let mut writer = ExchangeWriter::new(7, 0, i64::MAX, false, 2, 1);
        writer.push_row(u16::from(p > 0.5), &[1.0 - p, p]);
        writer.finish()
    }

    #[test]
    fn a_key_whose_hash_collides_with_another_record_finds_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let inner = open(dir.path());
        inner
            .write(Durability::None, |txn| {
                let mut rows = Rows::open(txn, &inner.log)?;
                rows.put(b"request-a", &one_row_record(0.75))?;
                let (seq_a, _) = rows.find(b"request-a")?.expect("recorded");
                // As if "request-b" hashed like "request-a" and pointed at its record.
                let tag = rows.log.index.tag(b"request-b");
                let forged = Slot { tag, seq_low: seq_a as u32 };
                rows.log.index.slots.insert_unique(KeyIndex::placement(tag), forged, |s| KeyIndex::placement(s.tag));
                assert!(rows.find(b"request-b")?.is_none(), "the stored key decides, not the hash");
                assert_eq!(rows.find(b"request-a")?.map(|(seq, _)| seq), Some(seq_a));
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn records_are_found_across_the_wrap_of_their_sequences_low_bits() {
        let dir = tempfile::tempdir().unwrap();
        let inner = open(dir.path());
        inner.log.lock().unwrap().index.next_seq = (1 << 32) - 2;
        inner
            .write(Durability::None, |txn| {
                let mut rows = Rows::open(txn, &inner.log)?;
                rows.log_start = (1 << 32) - 2;
                for i in 0..4 {
                    rows.put(format!("request-{i}").as_bytes(), &one_row_record(0.75))?;
                }
                for i in 0..4u64 {
                    let found = rows.find(format!("request-{i}").as_bytes())?.map(|(seq, _)| seq);
                    assert_eq!(found, Some((1 << 32) - 2 + i));
                }
                // A reused key replaces its record: appended anew, counted once, the
                // earlier record all taken.
                rows.put(b"request-1", &one_row_record(0.25))?;
                assert_eq!(rows.find(b"request-1")?.map(|(seq, _)| seq), Some((1 << 32) + 2));
                let earlier = rows.read((1 << 32) - 1)?.expect("still in its segment");
                let earlier = ExchangeRecord::parse(split_entry(&earlier).unwrap().1).unwrap();
                assert_eq!(earlier.untaken(), 0);
                assert_eq!(rows.log.segments.generations().collect::<Vec<_>>(), vec![(1 << 20) - 1, 1 << 20]);
                assert_eq!(rows.pending, 4);
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn eviction_moves_the_log_start_and_drops_whole_generations() {
        let dir = tempfile::tempdir().unwrap();
        let inner = open(dir.path());
        let gauge = AtomicU64::new(0);
        inner
            .write(Durability::None, |txn| {
                let mut rows = Rows::open(txn, &inner.log)?;
                let mut three = ExchangeWriter::new(7, 0, i64::MAX, true, 2, 3);
                for _ in 0..3 {
                    three.push_row(1, &[0.25, 0.75]);
                }
                let three = three.finish();
                for i in 0..10_000 {
                    if i == 9_001 {
                        rows.put(b"three", &three)?;
                    }
                    rows.put(format!("request-{i}").as_bytes(), &one_row_record(0.75))?;
                }
                // 10,003 waiting: the 9,001 oldest one-row records go whole, then
                // the first two rows of the three-row one after them.
                assert_eq!(rows.evict(1_000)?, 9_003);
                assert_eq!(rows.pending, 1_000);
                assert!(rows.find(b"request-9000")?.is_none());
                assert!(rows.find(b"request-9001")?.is_some());
                let (_, entry) = rows.find(b"three")?.expect("kept, partly");
                let record = ExchangeRecord::parse(&entry[entry_prefix(&entry).unwrap()..]).unwrap();
                assert_eq!(record.untaken_rows().collect::<Vec<_>>(), vec![2]);
                rows.close(&gauge)
            })
            .unwrap();
        assert_eq!(gauge.load(Ordering::Relaxed), 1_000);
        // Sequences 0..8192 are gone with their two generations; the third stays.
        assert_eq!(inner.log.lock().unwrap().segments.generations().collect::<Vec<_>>(), vec![2]);
        inner
            .write(Durability::None, |txn| {
                let mut rows = Rows::open(txn, &inner.log)?;
                assert_eq!(rows.log_start, 9_001);
                assert_eq!(rows.rebuild_index()?, 1_000);
                // Records below the start are in the file but not indexed again.
                assert!(rows.find(b"request-8500")?.is_none());
                assert!(rows.find(b"request-9500")?.is_some());
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn the_index_of_a_full_store_of_one_row_records_stays_within_its_memory_budget() {
        // The worst case of the default bound: 2,000,000 records of one row each.
        let mut index = KeyIndex::new();
        let records = 2_000_000u64;
        for seq in 0..records {
            index.insert(&seq.to_le_bytes(), seq);
        }
        index.next_seq = records;
        let per_record = index.bytes() as f64 / records as f64;
        assert!(per_record <= 24.0, "{per_record} bytes a record");
        assert_eq!(index.candidates(&1_234_567u64.to_le_bytes()).iter().filter(|s| **s == 1_234_567).count(), 1);
    }

    #[test]
    fn a_record_a_full_window_behind_the_next_sequence_is_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let inner = open(dir.path());
        inner
            .write(Durability::None, |txn| {
                let mut rows = Rows::open(txn, &inner.log)?;
                rows.put(b"old", &one_row_record(0.75))?;
                rows.log.index.next_seq = SEQ_WINDOW;
                rows.put(b"new", &one_row_record(0.75))?;
                assert_eq!(rows.evict(1_000)?, 1);
                assert!(rows.find(b"old")?.is_none());
                assert!(rows.find(b"new")?.is_some());
                assert_eq!(rows.pending, 1);
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn frames_written_after_the_last_commit_are_cut_off_when_the_store_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let inner = open(dir.path());
        inner
            .write(Durability::None, |txn| {
                let mut rows = Rows::open(txn, &inner.log)?;
                for i in 0..10 {
                    rows.put(format!("request-{i}").as_bytes(), &one_row_record(0.75))?;
                }
                rows.close(&inner.pending)
            })
            .unwrap();
        // As if the process died between writing a transaction's frames and its
        // commit: a frame past the committed end, which no commit will ever name.
        {
            let mut log = inner.log.lock().unwrap();
            let entry = entry_bytes(b"uncommitted", &one_row_record(0.25)).unwrap();
            log.segments.append(0, 10, &entry).unwrap();
            log.segments.flush().unwrap();
        }
        drop(inner);
        let segment = dir.path().join("labels.redb.log").join("0.seg");
        let before = std::fs::metadata(&segment).unwrap().len();
        let inner = open(dir.path());
        assert!(std::fs::metadata(&segment).unwrap().len() < before, "the frame is cut off");
        inner
            .write(Durability::None, |txn| {
                let mut rows = Rows::open(txn, &inner.log)?;
                assert_eq!(rows.pending, 10);
                assert!(rows.find(b"uncommitted")?.is_none());
                // The next record takes its place and reads back as itself.
                rows.put(b"request-10", &one_row_record(0.25))?;
                let (seq, entry) = rows.find(b"request-10")?.expect("recorded");
                assert_eq!(seq, 10);
                assert_eq!(split_entry(&entry).map(|(key, _)| key), Some(&b"request-10"[..]));
                assert!(rows.find(b"request-9")?.is_some());
                Ok(())
            })
            .unwrap();
    }
}
