//! Label recording and ingestion, for the embedded store, one Redis and a 3-node
//! Redis Cluster (started on loopback).
//!
//! Two parts:
//! - criterion benches `record_64_row_exchanges/{embedded,redis}`: recording throughput
//!   in rows/s of 64-row exchanges (binary model, one random request id per exchange,
//!   as the worker records `Predict` traffic), counted until the rows are stored
//!   (`flush`). The store runs at its default bound (2,000,000 pending rows), so a long
//!   run also measures recording with evictions. `.../embedded_at_bound` first fills
//!   the store to that bound, so that every measured batch evicts as many rows as it
//!   records: the regime of `mltap serve` at saturation. `record_64_row_exchanges_cpu/...`
//!   measures the same with the process's CPU time instead of elapsed time: rows per
//!   CPU-second, i.e. on one core, whatever else runs on the machine (for Redis it
//!   leaves out the Redis server's own CPU).
//! - a table of ingestion rates (labels/s) and bytes per pending prediction row.
//!
//! Run: `cargo bench --bench labels -- --warm-up-time 1 --measurement-time 3`
//! (criterion arguments filter and time the first part; `LABELS_BENCH_TABLE=0` skips
//! the table; `LABELS_BENCH_ROWS` sets the table's pending rows, 200000 by default;
//! `LABELS_BENCH_EMBEDDED_ONLY=1` skips Redis in both parts).

#[path = "../tests/labels_support/mod.rs"]
mod labels_support;

use criterion::{Criterion, Throughput};
use labels_support::*;
use mltap::config::LabelsStoreConfig;
use mltap::labels::endpoint::parse_body;
use mltap::labels::LabelService;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

const BATCH: usize = 1000;

struct Figures {
    store: &'static str,
    record_single_row_per_s: f64,
    record_batched_rows_per_s: f64,
    bytes_per_row: f64,
    ingest_sequential_per_s: f64,
    ingest_concurrent_per_s: f64,
}

fn rows_of(n: usize, prefix: &str) -> Vec<mltap::tfserving::Observation> {
    (0..n / BATCH)
        .map(|b| {
            let rows: Vec<Vec<f64>> = (0..BATCH)
                .map(|i| {
                    let p = ((b * BATCH + i) % 97) as f64 / 97.0;
                    vec![1.0 - p, p]
                })
                .collect();
            let mut o = observation("bench", &format!("{prefix}{b}"), &rows, Some(&["legit", "fraud"]));
            o.row_ids = Some((0..BATCH).map(|i| format!("{prefix}{}", b * BATCH + i)).collect());
            o
        })
        .collect()
}

fn bodies(n: usize, prefix: &str) -> Vec<String> {
    (0..n / BATCH)
        .map(|b| {
            let entries: Vec<String> = (0..BATCH)
                .map(|i| format!("{{\"id\":\"{prefix}{}\",\"label\":{}}}", b * BATCH + i, (b + i) % 2))
                .collect();
            format!("[{}]", entries.join(","))
        })
        .collect()
}

async fn ingest_all(service: &LabelService, bodies: &[String]) -> u64 {
    let mut accepted = 0;
    for body in bodies {
        let (entries, _) = parse_body(body.as_bytes()).unwrap();
        accepted += service.ingest(entries, SystemTime::now()).await.unwrap().accepted;
    }
    accepted
}

async fn run(store: &'static str, config: LabelsStoreConfig, rows: usize, measure_bytes: impl Fn() -> u64) -> Figures {
    let (_dir, path) = temp_dir();
    let mut s = settings(&path, config);
    s.labels.max_pending_rows = 10_000_000;
    let service = LabelService::open(s).await.unwrap();
    let start = current_bucket();
    let file = path.join(mltap::labels::service::EMBEDDED_FILE);
    // The redb file and the log's segment files beside it.
    let segments = path.join(format!("{}.log", mltap::labels::service::EMBEDDED_FILE));
    let file_len = || {
        let segment_bytes: u64 = std::fs::read_dir(&segments)
            .map(|dir| dir.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum())
            .unwrap_or(0);
        std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) + segment_bytes
    };
    let bytes_before = measure_bytes() + file_len();

    // What the worker does per observation: one single-row request at a time.
    let singles = 5_000;
    let t = Instant::now();
    for i in 0..singles {
        let o = observation("bench", &format!("single-{i}"), &[vec![0.25, 0.75]], Some(&["legit", "fraud"]));
        service.record(&o, start).await.unwrap();
    }
    // Recording writes behind the caller; the figure counts until the rows are stored.
    service.flush().await.unwrap();
    let record_single_row_per_s = singles as f64 / t.elapsed().as_secs_f64();

    let batches = rows_of(rows, "row-");
    let t = Instant::now();
    for o in &batches {
        service.record(o, start).await.unwrap();
    }
    service.flush().await.unwrap();
    let record_batched_rows_per_s = rows as f64 / t.elapsed().as_secs_f64();
    service.due(SystemTime::now()).await.unwrap();
    let bytes_after = measure_bytes() + file_len();
    let bytes_per_row = bytes_after.saturating_sub(bytes_before) as f64 / (rows + singles) as f64;

    let half = rows / 2;
    let all = bodies(rows, "row-");
    let (sequential, concurrent) = all.split_at(half / BATCH);
    let t = Instant::now();
    let accepted = ingest_all(&service, sequential).await;
    let ingest_sequential_per_s = accepted as f64 / t.elapsed().as_secs_f64();
    assert_eq!(accepted as usize, half, "every label must join");

    // Four clients posting at once, as the admin server would serve them.
    let service = Arc::new(service);
    let t = Instant::now();
    let chunks: Vec<Vec<String>> = concurrent.chunks(concurrent.len().div_ceil(4)).map(|c| c.to_vec()).collect();
    let tasks: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            let service = service.clone();
            tokio::spawn(async move { ingest_all(&service, &chunk).await })
        })
        .collect();
    let mut accepted = 0;
    for task in tasks {
        accepted += task.await.unwrap();
    }
    let ingest_concurrent_per_s = accepted as f64 / t.elapsed().as_secs_f64();
    assert_eq!(accepted as usize, rows - half, "every label must join");

    Figures {
        store,
        record_single_row_per_s,
        record_batched_rows_per_s,
        bytes_per_row,
        ingest_sequential_per_s,
        ingest_concurrent_per_s,
    }
}

/// Rows per exchange in the recording bench: the reference `Predict` batch.
const EXCHANGE_ROWS: usize = 64;
/// Exchanges recorded per measured iteration (then flushed).
const EXCHANGES_PER_ITERATION: usize = 256;

/// A 64-row exchange of a binary model under a random-looking request id, as a
/// client's `x-request-id` (a UUID) would be.
fn exchange(seq: u64) -> mltap::tfserving::Observation {
    let mut state = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let id = format!("{:016x}-{:016x}", next(), next());
    let rows: Vec<Vec<f64>> = (0..EXCHANGE_ROWS)
        .map(|_| {
            let p = (next() >> 11) as f64 / (1u64 << 53) as f64;
            vec![1.0 - p, p]
        })
        .collect();
    observation("bench", &id, &rows, Some(&["legit", "fraud"]))
}

/// CPU time this process has used (all threads: the runtime's and the blocking
/// pool's, where the embedded store writes), so a figure is per core even on a
/// machine whose other processes compete for the cores.
fn process_cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// Which clock a recording bench reads.
#[derive(Clone, Copy)]
enum Clock {
    /// Elapsed time: what a caller waits.
    Wall,
    /// CPU time of this process: what it costs, per core.
    Cpu,
}

/// Rows/s of recording 64-row exchanges into one store, until they are stored.
fn bench_record(
    c: &mut Criterion,
    runtime: &tokio::runtime::Runtime,
    group: &str,
    name: &str,
    clock: Clock,
    store: LabelsStoreConfig,
    fill: bool,
) {
    let (_dir, path) = temp_dir();
    let settings = settings(&path, store);
    let bound = settings.labels.max_pending_rows;
    let service = runtime.block_on(LabelService::open(settings)).unwrap();
    let start = current_bucket();
    let mut seq = 0u64;
    if fill {
        // Up to the bound (and one batch past it), unmeasured: from then on every
        // recorded exchange evicts the oldest one.
        let exchanges = (bound as usize).div_ceil(EXCHANGE_ROWS) + EXCHANGES_PER_ITERATION;
        runtime.block_on(async {
            for _ in 0..exchanges {
                seq += 1;
                service.record(&exchange(seq), start).await.unwrap();
            }
            service.flush().await.unwrap();
        });
    }
    let mut group = c.benchmark_group(group);
    group.throughput(Throughput::Elements((EXCHANGE_ROWS * EXCHANGES_PER_ITERATION) as u64));
    group.bench_function(name, |b| {
        b.iter_custom(|iterations| {
            let mut measured = Duration::ZERO;
            for _ in 0..iterations {
                let exchanges: Vec<_> = (0..EXCHANGES_PER_ITERATION)
                    .map(|_| {
                        seq += 1;
                        exchange(seq)
                    })
                    .collect();
                let (t, cpu) = (Instant::now(), process_cpu_time());
                runtime.block_on(async {
                    for o in &exchanges {
                        service.record(o, start).await.unwrap();
                    }
                    service.flush().await.unwrap();
                });
                measured += match clock {
                    Clock::Wall => t.elapsed(),
                    Clock::Cpu => process_cpu_time().saturating_sub(cpu),
                };
            }
            measured
        })
    });
    group.finish();
    drop(service);
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    {
        // One worker thread: the figure is what one core records.
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        for (group, clock) in [("record_64_row_exchanges", Clock::Wall), ("record_64_row_exchanges_cpu", Clock::Cpu)] {
            bench_record(&mut criterion, &runtime, group, "embedded", clock, LabelsStoreConfig::Embedded, false);
            let name = "embedded_at_bound";
            bench_record(&mut criterion, &runtime, group, name, clock, LabelsStoreConfig::Embedded, true);
            if std::env::var("LABELS_BENCH_EMBEDDED_ONLY").is_err() {
                let redis = RedisServer::start(false);
                let store = LabelsStoreConfig::Redis(redis.url());
                bench_record(&mut criterion, &runtime, group, "redis", clock, store, false);
            }
        }
    }
    criterion.final_summary();
    if std::env::var("LABELS_BENCH_TABLE").is_ok_and(|v| v == "0") {
        return;
    }
    let rows: usize = std::env::var("LABELS_BENCH_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let figures = runtime.block_on(async {
        let mut figures = vec![run("embedded", LabelsStoreConfig::Embedded, rows, || 0).await];
        if std::env::var("LABELS_BENCH_EMBEDDED_ONLY").is_ok() {
            return figures;
        }
        let redis = RedisServer::start(false);
        figures.push(run("redis", LabelsStoreConfig::Redis(redis.url()), rows, || redis.used_memory()).await);
        drop(redis);
        let cluster = RedisCluster::start();
        let used = || cluster.nodes.iter().map(|n| n.used_memory()).sum();
        figures.push(run("redis cluster (3 nodes)", LabelsStoreConfig::RedisCluster(cluster.urls()), rows, used).await);
        figures
    });
    println!("pending rows: {rows} (+5000 single-row), labels per request: {BATCH}, binary model");
    println!(
        "| store | record, 1-row observations/s | record, rows/s (1000-row observations) | bytes per pending row | labels/s, 1 client | labels/s, 4 clients |"
    );
    println!("|---|---|---|---|---|---|");
    for f in figures {
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            f.store,
            f.record_single_row_per_s,
            f.record_batched_rows_per_s,
            f.bytes_per_row,
            f.ingest_sequential_per_s,
            f.ingest_concurrent_per_s
        );
    }
}
