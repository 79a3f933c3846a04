//! The Redis join store, for several replicas behind one load balancer: a label
//! posted to any replica joins a prediction recorded by any other. One Redis
//! (`redis://host:port/db`) or a Redis Cluster (several node addresses).
//!
//! Layout, under a configurable prefix `P`:
//! - `P:lx:<key>`: a pending exchange of several rows (binary `ExchangeRecord`,
//!   keyed by its request id), expiring at its `expires_ms`. A label takes a row with
//!   the take script, which sets the row's bit in the record's bitmap with `SETBIT`
//!   (so of concurrent replicas exactly one joins a label) and returns the row; a
//!   record whose rows are all taken is deleted.
//! - `P:l1:<id>`: a one-row record (a one-row exchange, or a row with its own id),
//!   taken whole with `GETDEL`.
//! - `P:ls:<stream hex>`: a stream's metadata (JSON).
//! - `P:lb:{<stream hex>:<start>}` (hash) and `P:la:{...}` (list): a bucket's
//!   aggregate fields and exact AUC entries. The braces are a Redis Cluster hash tag,
//!   so both keys share a slot and one Lua script updates (or claims) them atomically.
//! - `P:lidx`: the due index, a sorted set of bucket keys scored by due time.
//!
//! A bucket is claimed by the script that sets its `claimed` field to the end of a
//! lease (`CLAIM_LEASE_MS`) and returns its fields in the same step; updates check
//! that field in their own script, so every label is either in the emitted aggregate
//! or counted late, never both. The claimer `confirm`s the bucket once its points are
//! written (the lease becomes permanent, the index entry goes); a replica that dies
//! in between leaves the bucket in the index, and another claims it once the lease
//! has ended, so label metrics are emitted exactly once.
//! Recorded rows are written behind the worker's back by one task, which batches
//! whatever queued up meanwhile; `flush` waits for them (every label batch and tick
//! flushes first, so a replica always sees its own predictions; another replica sees
//! them one round trip later). Writes are batched: one pipeline per call on a single
//! Redis, concurrent commands (pipelined per node by the client) on a cluster, where a
//! pipeline must stay in one slot; on a single Redis the take script handles a whole
//! batch of labels in one call. This store never scans keys.

use super::{BucketUpdate, ClaimedBucket, LabelStore, RecordBatch, StoreError, StoreFuture, StoreStats, TakenRow};
use crate::fleet::store::Connection;
use crate::labels::aggregate::{F_CLAIMED, F_PREDICTED};
use crate::labels::record::{BucketId, ExchangeRecord, PendingRow, RowRef, StreamMeta};
use futures_util::future::try_join_all;
use redis::{Cmd, ErrorKind, FromRedisValue, RedisError, Script};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};

/// Takes rows from exchange records. KEYS: records; ARGV, per key: row, `1` if the
/// label id was suffixed (`ID:ROW`) else `0`. Returns, per key, nil or the record's
/// 32-byte header and the row's bytes. The layout is `record::ExchangeRecord`'s:
/// format byte 2, flags (bit 0: suffixed), classes (u16 LE), rows (u32 LE), then 24
/// bytes, the taken bitmap (bit `row` after the header, in `SETBIT` order), the rows.
/// One `GET` reads the record; a one-row record is then deleted (like `GETDEL`), a
/// row of a larger one is marked with `SETBIT`, and the record deleted once every
/// row is taken.
const TAKE_LUA: &str = r#"
local out = {}
for i, key in ipairs(KEYS) do
  local row = tonumber(ARGV[2 * i - 1])
  local taken = false
  local record = redis.call('GET', key)
  if record and #record > 32 and string.byte(record, 1) == 2
      and tostring(string.byte(record, 2) % 2) == ARGV[2 * i] then
    local classes = string.byte(record, 3) + 256 * string.byte(record, 4)
    local rows = string.byte(record, 5) + 256 * string.byte(record, 6) + 65536 * string.byte(record, 7)
      + 16777216 * string.byte(record, 8)
    local bitmap = math.floor((rows + 7) / 8)
    local mask = 2 ^ (7 - row % 8)
    local bits = string.byte(record, 33 + math.floor(row / 8))
    if row < rows and bits and math.floor(bits / mask) % 2 == 0 then
      local width = 2 + 4 * classes
      local at = 32 + bitmap + row * width
      taken = {string.sub(record, 1, 32), string.sub(record, at + 1, at + width)}
      if rows == 1 then
        redis.call('DEL', key)
      else
        redis.call('SETBIT', key, 256 + row, 1)
        if redis.call('BITCOUNT', key, 32, 31 + bitmap) == rows then
          redis.call('DEL', key)
        end
      end
    end
  end
  out[i] = taken
end
return out
"#;

/// Puts back rows taken for invalid labels. KEYS: records; ARGV, per key: row, the
/// row alone as a record (`PendingRow::to_record`), its expiry (epoch ms). The bit is
/// cleared in the record it came from (same flags, stream, bucket and expiry); a
/// record dropped once all its rows were taken is put back holding that row alone.
const RESTORE_LUA: &str = r#"
for i, key in ipairs(KEYS) do
  local row = tonumber(ARGV[3 * i - 2])
  local alone = ARGV[3 * i - 1]
  local head = redis.call('GETRANGE', key, 0, 31)
  if #head == 0 then
    redis.call('SET', key, alone, 'PXAT', ARGV[3 * i])
  elseif #head == 32 and string.sub(head, 1, 2) == string.sub(alone, 1, 2)
      and string.sub(head, 9, 32) == string.sub(alone, 9, 32) then
    local rows = string.byte(head, 5) + 256 * string.byte(head, 6) + 65536 * string.byte(head, 7)
      + 16777216 * string.byte(head, 8)
    if row < rows then
      redis.call('SETBIT', key, 256 + row, 0)
    end
  end
end
return 1
"#;

/// Adds a delta to a bucket unless it is claimed or due. KEYS: hash, AUC list.
/// ARGV: now, due, retain_until, refuse (0/1), auc_cap, n_ints, (field, incr)...,
/// n_floats, (field, incr)..., AUC entries... Floats are added in double precision
/// and kept as `%.17g`, which reads back as the same double.
const APPLY_LUA: &str = r#"
local h = KEYS[1]
if ARGV[4] == '1' and (redis.call('HEXISTS', h, 'claimed') == 1 or tonumber(ARGV[1]) >= tonumber(ARGV[2])) then
  return 0
end
local i = 7
local n = tonumber(ARGV[6])
for _ = 1, n do
  redis.call('HINCRBY', h, ARGV[i], ARGV[i + 1])
  i = i + 2
end
n = tonumber(ARGV[i])
i = i + 1
for _ = 1, n do
  local current = tonumber(redis.call('HGET', h, ARGV[i]) or '0')
  redis.call('HSET', h, ARGV[i], string.format('%.17g', current + tonumber(ARGV[i + 1])))
  i = i + 2
end
local room = tonumber(ARGV[5]) - redis.call('LLEN', KEYS[2])
local last = math.min(#ARGV, i + room - 1)
while i <= last do
  local stop = math.min(last, i + 999)
  redis.call('RPUSH', KEYS[2], unpack(ARGV, i, stop))
  i = stop + 1
end
redis.call('PEXPIREAT', h, ARGV[3])
redis.call('PEXPIREAT', KEYS[2], ARGV[3])
return 1
"#;

/// Claims a bucket: the one caller that finds no live lease (`claimed` holds the
/// lease's end, ms) sets one and gets its fields and AUC entries; everyone else gets
/// `held`, or `gone` when the bucket no longer exists. KEYS: hash, AUC list.
/// ARGV: now ms, lease end ms.
const CLAIM_LUA: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone', {}, {}} end
local lease = tonumber(redis.call('HGET', KEYS[1], 'claimed') or '0') or 0
if lease > tonumber(ARGV[1]) then return {'held', {}, {}} end
redis.call('HSET', KEYS[1], 'claimed', ARGV[2])
local fields = redis.call('HGETALL', KEYS[1])
local auc = redis.call('LRANGE', KEYS[2], 0, -1)
return {'claimed', fields, auc}
"#;

/// Confirms an emitted bucket: its lease never ends, its AUC list goes.
/// KEYS: hash, AUC list.
const CONFIRM_LUA: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'claimed', '9007199254740991') end
redis.call('DEL', KEYS[2])
return 1
"#;

/// How long a claimed label bucket stays with its claimer before another replica may
/// claim it (the claimer died before confirming its emission).
pub const CLAIM_LEASE_MS: i64 = 10_000;

/// Records waiting for the writer task before `record` waits for room: a bound on
/// the memory of rows not yet in Redis (a few MiB of 64-row exchanges).
const WRITER_QUEUE_RECORDS: usize = 8192;
/// Records the writer task puts in one round trip at most.
const WRITER_CHUNK_RECORDS: usize = 1024;
/// Rows one take script call handles at most on a single Redis.
const TAKE_CALL_KEYS: usize = 1000;
/// Buckets claimed per `claim_due` call at most; the rest wait for the next tick.
const CLAIM_BATCH: isize = 1000;

/// The Redis-backed store: a handle over the shared connection and the task that
/// writes recorded rows behind the worker's back.
pub struct RedisStore {
    /// Connection, keys and scripts, shared with the writer task.
    shared: Arc<Shared>,
    /// Recorded rows on their way to the writer task, each with its share of
    /// `writer_room`.
    writer: mpsc::UnboundedSender<(Vec<RecordBatch>, OwnedSemaphorePermit)>,
    /// Records the writer queue may still take: a Redis that cannot keep up slows
    /// `record` down rather than growing memory.
    writer_room: Arc<Semaphore>,
}

/// What the store's calls and its writer task share.
struct Shared {
    /// Shared by every call; cloning it is cheap.
    connection: Connection,
    /// Key prefix, so deployments can share a Redis.
    prefix: String,
    /// Entries per bucket in the exact AUC list.
    auc_cap: usize,
    /// `APPLY_LUA`, for its SHA.
    apply_script: Script,
    /// `CLAIM_LUA`, for its SHA.
    claim_script: Script,
    /// `CONFIRM_LUA`, for its SHA.
    confirm_script: Script,
    /// `TAKE_LUA`, for its SHA.
    take_script: Script,
    /// `RESTORE_LUA`, for its SHA.
    restore_script: Script,
    /// Record batches handed to the writer (counted before they are sent).
    queued: AtomicU64,
    /// Record batches the writer has finished with (written or failed).
    written: AtomicU64,
    /// Wakes `flush` callers when `written` moves.
    progress: Notify,
    /// Rows the writer could not write (Redis errors), since start.
    failed_rows: AtomicU64,
}

fn redis_error(e: RedisError) -> StoreError {
    StoreError::Redis(e.to_string())
}

impl RedisStore {
    /// Connects to one Redis (one URL) or a cluster (several node URLs).
    pub async fn connect(nodes: &[String], prefix: &str, auc_cap: usize) -> Result<RedisStore, StoreError> {
        let connection = Connection::open(nodes).await.map_err(redis_error)?;
        let shared = Arc::new(Shared {
            connection,
            prefix: prefix.to_string(),
            auc_cap,
            apply_script: Script::new(APPLY_LUA),
            claim_script: Script::new(CLAIM_LUA),
            confirm_script: Script::new(CONFIRM_LUA),
            take_script: Script::new(TAKE_LUA),
            restore_script: Script::new(RESTORE_LUA),
            queued: AtomicU64::new(0),
            written: AtomicU64::new(0),
            progress: Notify::new(),
            failed_rows: AtomicU64::new(0),
        });
        let (writer, batches) = mpsc::unbounded_channel();
        tokio::spawn(write_behind(shared.clone(), batches));
        Ok(RedisStore { shared, writer, writer_room: Arc::new(Semaphore::new(WRITER_QUEUE_RECORDS)) })
    }
}

/// Writes recorded rows as they come, taking whatever has queued up meanwhile into
/// the same round trip, so a busy worker gets large pipelines and an idle one gets
/// its rows written at once. Ends when the store is dropped.
async fn write_behind(
    shared: Arc<Shared>,
    mut queued: mpsc::UnboundedReceiver<(Vec<RecordBatch>, OwnedSemaphorePermit)>,
) {
    while let Some(first) = queued.recv().await {
        let mut records = first.0.iter().map(|b| b.records.len()).sum::<usize>();
        let mut chunk = vec![first];
        while records < WRITER_CHUNK_RECORDS {
            match queued.try_recv() {
                Ok(more) => {
                    records += more.0.iter().map(|b| b.records.len()).sum::<usize>();
                    chunk.push(more);
                }
                Err(_) => break,
            }
        }
        let count = chunk.len() as u64;
        let (batches, permits): (Vec<Vec<RecordBatch>>, Vec<OwnedSemaphorePermit>) = chunk.into_iter().unzip();
        let batches: Vec<RecordBatch> = batches.into_iter().flatten().collect();
        let rows = batches.iter().map(|b| b.rows).sum::<u64>();
        if let Err(error) = shared.write_records(batches).await {
            shared.failed_rows.fetch_add(rows, Ordering::Relaxed);
            tracing::warn!(message = "Prediction rows not written to the label store.", rows, %error);
        }
        drop(permits);
        shared.written.fetch_add(count, Ordering::Release);
        shared.progress.notify_waiters();
    }
}

impl Shared {
    /// The key of a record: `lx` for an exchange of several rows (rows taken by the
    /// take script), `l1` for a one-row record (taken whole with `GETDEL`).
    fn record_key(&self, key: &str, suffixed: bool) -> String {
        let kind = if suffixed { "lx" } else { "l1" };
        format!("{}:{kind}:{key}", self.prefix)
    }

    fn stream_key(&self, id: u64) -> String {
        format!("{}:ls:{id:016x}", self.prefix)
    }

    fn bucket_keys(&self, bucket: &BucketId) -> (String, String) {
        let tag = bucket.key();
        (format!("{}:lb:{{{tag}}}", self.prefix), format!("{}:la:{{{tag}}}", self.prefix))
    }

    fn index_key(&self) -> String {
        format!("{}:lidx", self.prefix)
    }

    async fn query_raw<T: FromRedisValue>(&self, cmd: Cmd) -> Result<T, RedisError> {
        self.connection.query(cmd).await
    }

    async fn query<T: FromRedisValue>(&self, cmd: Cmd) -> Result<T, StoreError> {
        self.query_raw(cmd).await.map_err(redis_error)
    }

    /// Runs independent commands in one round trip where Redis allows it.
    async fn query_all<T: FromRedisValue>(&self, cmds: Vec<Cmd>) -> Result<Vec<T>, StoreError> {
        if cmds.is_empty() {
            return Ok(Vec::new());
        }
        match self.connection.clone() {
            Connection::Single(mut c) => {
                let mut pipe = redis::pipe();
                for cmd in cmds {
                    pipe.add_command(cmd);
                }
                pipe.query_async(&mut c).await.map_err(redis_error)
            }
            Connection::Cluster(c) => try_join_all(cmds.into_iter().map(|cmd| {
                let mut c = c.clone();
                async move { cmd.query_async::<T>(&mut c).await }
            }))
            .await
            .map_err(redis_error),
        }
    }

    /// `EVALSHA`, falling back to `EVAL` (which also caches the script on that node)
    /// when the node does not know it: on a cluster, `SCRIPT LOAD` would reach a
    /// random node rather than the key's.
    async fn eval<T: FromRedisValue>(
        &self,
        script: &Script,
        source: &str,
        keys: &[&str],
        args: &[Vec<u8>],
    ) -> Result<T, StoreError> {
        let build = |verb: &str, body: &str| {
            let mut cmd = redis::cmd(verb);
            cmd.arg(body).arg(keys.len()).arg(keys);
            for a in args {
                cmd.arg(a.as_slice());
            }
            cmd
        };
        match self.query_raw::<T>(build("EVALSHA", script.get_hash())).await {
            Err(e) if e.kind() == ErrorKind::NoScriptError => self.query(build("EVAL", source)).await,
            other => other.map_err(redis_error),
        }
    }

    /// Writes record batches: one `SET` per exchange record, then per bucket its
    /// count of rows, its retention and its due index entry.
    async fn write_records(&self, batches: Vec<RecordBatch>) -> Result<(), StoreError> {
        let mut cmds = Vec::new();
        let mut per_bucket: BTreeMap<BucketId, (u64, i64, i64)> = BTreeMap::new();
        for batch in &batches {
            for (key, bytes) in &batch.records {
                let suffixed = ExchangeRecord::parse(bytes).is_some_and(|r| r.suffixed());
                let mut cmd = redis::cmd("SET");
                cmd.arg(self.record_key(key, suffixed)).arg(bytes.as_slice()).arg("PXAT").arg(batch.expires_ms);
                cmds.push(cmd);
            }
            let slot = per_bucket.entry(batch.bucket).or_insert((0, batch.due_ms, batch.retain_until_ms));
            slot.0 += batch.rows;
            slot.2 = slot.2.max(batch.retain_until_ms);
        }
        for (bucket, (rows, due_ms, retain_until_ms)) in per_bucket {
            let (hash, _) = self.bucket_keys(&bucket);
            let mut count = redis::cmd("HINCRBY");
            count.arg(&hash).arg(F_PREDICTED).arg(rows);
            let mut keep = redis::cmd("PEXPIREAT");
            keep.arg(&hash).arg(retain_until_ms);
            let mut index = redis::cmd("ZADD");
            index.arg(self.index_key()).arg("NX").arg(due_ms).arg(bucket.key());
            cmds.extend([count, keep, index]);
        }
        self.query_all::<redis::Value>(cmds).await.map(drop)
    }

    /// Takes the rows at `refs`, exactly once each across replicas: one-row records
    /// with `GETDEL`; rows of larger exchanges with the take script, one call for all
    /// of them on a single Redis, one per record on a cluster (a script's keys must
    /// share a slot).
    async fn take_rows(&self, refs: &[&RowRef]) -> Result<Vec<Option<PendingRow>>, StoreError> {
        let mut out: Vec<Option<PendingRow>> = vec![None; refs.len()];
        let (whole, of_exchanges): (Vec<usize>, Vec<usize>) = (0..refs.len()).partition(|i| !refs[*i].suffixed);
        let cmds = whole
            .iter()
            .map(|i| {
                let mut cmd = redis::cmd("GETDEL");
                cmd.arg(self.record_key(&refs[*i].key, false));
                cmd
            })
            .collect();
        let records: Vec<Option<Vec<u8>>> = self.query_all(cmds).await?;
        for (i, bytes) in whole.iter().zip(records) {
            let record = bytes.as_deref().and_then(ExchangeRecord::parse);
            out[*i] = record.filter(|r| !r.suffixed() && !r.is_taken(0)).and_then(|r| r.row(0));
        }
        if of_exchanges.is_empty() {
            return Ok(out);
        }
        let args_of = |at: &RowRef| [arg(at.row), arg(u8::from(at.suffixed))];
        let replies: Vec<Option<(Vec<u8>, Vec<u8>)>> = match &self.connection {
            Connection::Single(_) => {
                // Bounded calls, so a large label body does not hold Redis for long.
                let calls = of_exchanges.chunks(TAKE_CALL_KEYS).map(|chunk| async move {
                    let keys: Vec<String> = chunk.iter().map(|i| self.record_key(&refs[*i].key, true)).collect();
                    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                    let args: Vec<Vec<u8>> = chunk.iter().flat_map(|i| args_of(refs[*i])).collect();
                    self.eval::<Vec<Option<(Vec<u8>, Vec<u8>)>>>(&self.take_script, TAKE_LUA, &keys, &args).await
                });
                try_join_all(calls).await?.into_iter().flatten().collect()
            }
            Connection::Cluster(_) => {
                let calls = of_exchanges.iter().map(|i| async move {
                    let at = refs[*i];
                    let key = self.record_key(&at.key, true);
                    let mut reply: Vec<Option<(Vec<u8>, Vec<u8>)>> =
                        self.eval(&self.take_script, TAKE_LUA, &[&key], &args_of(at)).await?;
                    Ok::<_, StoreError>(reply.pop().flatten())
                });
                try_join_all(calls).await?
            }
        };
        for (i, reply) in of_exchanges.iter().zip(replies) {
            out[*i] = reply.and_then(|(header, row)| PendingRow::from_record_parts(&header, &row));
        }
        Ok(out)
    }
}

fn arg(value: impl ToString) -> Vec<u8> {
    value.to_string().into_bytes()
}

impl LabelStore for RedisStore {
    fn put_stream(&self, meta: StreamMeta) -> StoreFuture<'_, ()> {
        let s = &*self.shared;
        Box::pin(async move {
            let json = serde_json::to_string(&meta).map_err(|e| StoreError::Redis(e.to_string()))?;
            let mut cmd = redis::cmd("SET");
            cmd.arg(s.stream_key(meta.id())).arg(json);
            s.query::<()>(cmd).await
        })
    }

    fn stream(&self, id: u64) -> StoreFuture<'_, Option<StreamMeta>> {
        let s = &*self.shared;
        Box::pin(async move {
            let mut cmd = redis::cmd("GET");
            cmd.arg(s.stream_key(id));
            let json: Option<String> = s.query(cmd).await?;
            Ok(json.and_then(|j| serde_json::from_str(&j).ok()))
        })
    }

    fn record(&self, batches: Vec<RecordBatch>) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let records = batches.iter().map(|b| b.records.len()).sum::<usize>().clamp(1, WRITER_QUEUE_RECORDS);
            let stopped = || StoreError::Redis("the label store's writer has stopped".into());
            let room = self.writer_room.clone().acquire_many_owned(records as u32).await.map_err(|_| stopped())?;
            // Counted before it is sent, so `flush` never returns while it is in flight.
            self.shared.queued.fetch_add(1, Ordering::AcqRel);
            if self.writer.send((batches, room)).is_err() {
                self.shared.written.fetch_add(1, Ordering::Release);
                return Err(stopped());
            }
            Ok(())
        })
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            let target = self.shared.queued.load(Ordering::Acquire);
            loop {
                let progressed = self.shared.progress.notified();
                tokio::pin!(progressed);
                progressed.as_mut().enable();
                if self.shared.written.load(Ordering::Acquire) >= target {
                    return Ok(());
                }
                progressed.await;
            }
        })
    }

    fn take(&self, ids: Vec<String>, now_ms: i64) -> StoreFuture<'_, Vec<Option<TakenRow>>> {
        let s = &*self.shared;
        Box::pin(async move {
            let candidates: Vec<(RowRef, Option<RowRef>)> = ids.iter().map(|id| RowRef::candidates(id)).collect();
            // Redis expires lazily to the millisecond; a row read just past its expiry
            // is treated as expired, as the embedded store does.
            let live = |row: Option<PendingRow>| row.filter(|r| r.expires_ms > now_ms);
            let first: Vec<&RowRef> = candidates.iter().map(|(first, _)| first).collect();
            let mut taken: Vec<Option<TakenRow>> = s
                .take_rows(&first)
                .await?
                .into_iter()
                .zip(&first)
                .map(|(row, at)| live(row).map(|row| TakenRow { at: (*at).clone(), row }))
                .collect();
            // Ids that may also name a one-row record, where the first reading missed.
            let retry: Vec<usize> =
                (0..taken.len()).filter(|i| taken[*i].is_none() && candidates[*i].1.is_some()).collect();
            let second: Vec<&RowRef> = retry.iter().filter_map(|i| candidates[*i].1.as_ref()).collect();
            for ((i, row), at) in retry.iter().zip(s.take_rows(&second).await?).zip(&second) {
                taken[*i] = live(row).map(|row| TakenRow { at: (*at).clone(), row });
            }
            Ok(taken)
        })
    }

    fn restore(&self, rows: Vec<TakenRow>) -> StoreFuture<'_, ()> {
        let s = &*self.shared;
        Box::pin(async move {
            let alone = |taken: &TakenRow| taken.row.to_record(taken.at.row as usize, taken.at.suffixed);
            // A one-row record was deleted when taken: it is put back whole.
            let (whole, of_exchanges): (Vec<&TakenRow>, Vec<&TakenRow>) = rows.iter().partition(|t| !t.at.suffixed);
            let cmds = whole
                .iter()
                .map(|taken| {
                    let mut cmd = redis::cmd("SET");
                    cmd.arg(s.record_key(&taken.at.key, false))
                        .arg(alone(taken))
                        .arg("NX")
                        .arg("PXAT")
                        .arg(taken.row.expires_ms);
                    cmd
                })
                .collect();
            s.query_all::<redis::Value>(cmds).await?;
            let args_of = |taken: &TakenRow| vec![arg(taken.at.row), alone(taken), arg(taken.row.expires_ms)];
            let keys: Vec<String> = of_exchanges.iter().map(|t| s.record_key(&t.at.key, true)).collect();
            match &s.connection {
                Connection::Single(_) if !of_exchanges.is_empty() => {
                    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
                    let args: Vec<Vec<u8>> = of_exchanges.iter().flat_map(|t| args_of(t)).collect();
                    s.eval::<redis::Value>(&s.restore_script, RESTORE_LUA, &keys, &args).await.map(drop)
                }
                Connection::Single(_) => Ok(()),
                Connection::Cluster(_) => {
                    let calls = of_exchanges.iter().zip(&keys).map(|(taken, key)| async move {
                        let args = args_of(taken);
                        s.eval::<redis::Value>(&s.restore_script, RESTORE_LUA, &[key.as_str()], &args).await
                    });
                    try_join_all(calls).await.map(drop)
                }
            }
        })
    }

    fn apply(&self, updates: Vec<BucketUpdate>, now_ms: i64) -> StoreFuture<'_, Vec<bool>> {
        let s = &*self.shared;
        Box::pin(async move {
            let scripts = updates.iter().map(|update| {
                let (hash, list) = s.bucket_keys(&update.bucket);
                let d = &update.delta;
                let mut args = vec![
                    arg(now_ms),
                    arg(update.due_ms),
                    arg(update.retain_until_ms),
                    arg(u8::from(update.refuse_when_due)),
                    arg(s.auc_cap),
                    arg(d.ints.len()),
                ];
                for (field, n) in &d.ints {
                    args.push(arg(field));
                    args.push(arg(n));
                }
                args.push(arg(d.floats.len()));
                for (field, x) in &d.floats {
                    args.push(arg(field));
                    args.push(arg(crate::labels::aggregate::format_float(*x)));
                }
                args.extend(d.auc.iter().map(|e| e.as_bytes().to_vec()));
                async move {
                    let applied: i64 = s.eval(&s.apply_script, APPLY_LUA, &[&hash, &list], &args).await?;
                    Ok::<bool, StoreError>(applied == 1)
                }
            });
            let applied = try_join_all(scripts).await?;
            let index: Vec<Cmd> = updates
                .iter()
                .zip(&applied)
                .filter(|(_, applied)| **applied)
                .map(|(u, _)| {
                    let mut cmd = redis::cmd("ZADD");
                    cmd.arg(s.index_key()).arg("NX").arg(u.due_ms).arg(u.bucket.key());
                    cmd
                })
                .collect();
            s.query_all::<redis::Value>(index).await?;
            Ok(applied)
        })
    }

    fn claim_due(&self, now_ms: i64) -> StoreFuture<'_, Vec<ClaimedBucket>> {
        let s = &*self.shared;
        Box::pin(async move {
            let mut range = redis::cmd("ZRANGE");
            range.arg(s.index_key()).arg("-inf").arg(now_ms).arg("BYSCORE").arg("LIMIT").arg(0).arg(CLAIM_BATCH);
            let members: Vec<String> = s.query(range).await?;
            let lease_end = now_ms + CLAIM_LEASE_MS;
            let claims = members.iter().map(|member| async move {
                let Some(bucket) = BucketId::parse(member) else { return Ok((member, "gone".to_string(), None)) };
                let (hash, list) = s.bucket_keys(&bucket);
                let (status, flat, auc): (String, Vec<String>, Vec<String>) =
                    s.eval(&s.claim_script, CLAIM_LUA, &[&hash, &list], &[arg(now_ms), arg(lease_end)]).await?;
                let claimed = (status == "claimed").then(|| {
                    let mut fields = BTreeMap::new();
                    for pair in flat.chunks_exact(2) {
                        fields.insert(pair[0].clone(), pair[1].clone());
                    }
                    debug_assert!(fields.contains_key(F_CLAIMED));
                    ClaimedBucket { bucket, fields, auc }
                });
                Ok::<_, StoreError>((member, status, claimed))
            });
            let outcomes = try_join_all(claims).await?;
            // A claimed bucket stays in the index until confirmed, due again when its
            // lease ends; a bucket that is gone leaves it.
            let gone: Vec<&String> = outcomes.iter().filter(|(_, status, _)| status == "gone").map(|o| o.0).collect();
            let taken: Vec<&String> = outcomes.iter().filter(|(_, _, c)| c.is_some()).map(|o| o.0).collect();
            if !gone.is_empty() {
                let mut remove = redis::cmd("ZREM");
                remove.arg(s.index_key()).arg(&gone);
                s.query::<()>(remove).await?;
            }
            if !taken.is_empty() {
                let mut later = redis::cmd("ZADD");
                later.arg(s.index_key()).arg("XX");
                for member in &taken {
                    later.arg(lease_end).arg(member.as_str());
                }
                s.query::<()>(later).await?;
            }
            Ok(outcomes.into_iter().filter_map(|(_, _, claimed)| claimed).collect())
        })
    }

    fn confirm(&self, buckets: Vec<BucketId>) -> StoreFuture<'_, ()> {
        let s = &*self.shared;
        Box::pin(async move {
            if buckets.is_empty() {
                return Ok(());
            }
            let confirms = buckets.iter().map(|bucket| async move {
                let (hash, list) = s.bucket_keys(bucket);
                s.eval::<i64>(&s.confirm_script, CONFIRM_LUA, &[&hash, &list], &[]).await
            });
            try_join_all(confirms).await?;
            let mut remove = redis::cmd("ZREM");
            remove.arg(s.index_key());
            for bucket in &buckets {
                remove.arg(bucket.key());
            }
            s.query::<()>(remove).await
        })
    }

    fn maintain(&self, _now_ms: i64) -> StoreFuture<'_, ()> {
        // Rows and aggregates carry absolute expiries; Redis drops them itself.
        Box::pin(async { Ok(()) })
    }

    fn stats(&self) -> StoreStats {
        StoreStats { failed_rows: self.shared.failed_rows.load(Ordering::Relaxed), ..StoreStats::default() }
    }
}
