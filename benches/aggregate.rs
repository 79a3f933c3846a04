//! Aggregation throughput of the monitoring engine, in feature values per second on
//! one core, for the reference batch of 64 rows × 16 float features with 3-class
//! probabilities: while a drift reference is being learned (reservoir sampling),
//! once it is frozen (values also binned for drift), and closing a bucket into points.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use mltap::monitor::{Engine, EngineOptions, MonitorConfig};
use mltap::tfserving::{FeatureColumn, FeatureValues, InferenceMethod, Observation, Probabilities, StreamKey};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const ROWS: usize = 64;
const FEATURES: usize = 16;
const T0: u64 = 1_700_000_000;

fn batch(seed: u64, at: SystemTime) -> Observation {
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let features = (0..FEATURES)
        .map(|f| FeatureColumn {
            name: format!("x_{f}"),
            values: FeatureValues::Numeric {
                values: (0..ROWS).map(|_| (next() - 0.3) * 100.0 * (f + 1) as f64).collect(),
                integer: false,
            },
        })
        .collect();
    let mut probs = Vec::with_capacity(ROWS * 3);
    for _ in 0..ROWS {
        let (a, b, c) = (next(), next(), next());
        let s = a + b + c;
        probs.extend([a / s, b / s, c / s]);
    }
    Observation {
        stream: StreamKey { model: "bench".into(), version: Some(1), signature: "serving_default".into() },
        method: InferenceMethod::Predict,
        event_time: at,
        request_id: "r".into(),
        rows: ROWS,
        features,
        probabilities: Some(Probabilities { classes: 3, values: probs, class_names: None, threshold: None }),
        regression: None,
        row_ids: None,
        upstream_latency: Duration::from_millis(1),
    }
}

fn engine() -> Engine {
    Engine::new(EngineOptions {
        bucket: Duration::from_secs(60),
        monitor: MonitorConfig { reference_buckets: 1, ..MonitorConfig::default() },
        output_dir: None,
        categorical_features: BTreeMap::new(),
        started_at: UNIX_EPOCH,
    })
    .expect("engine")
}

fn aggregate(c: &mut Criterion) {
    let mut group = c.benchmark_group("aggregate_64x16");
    group.throughput(Throughput::Elements((ROWS * FEATURES) as u64));
    let batches: Vec<Observation> = (0..16).map(|i| batch(i + 1, UNIX_EPOCH + Duration::from_secs(T0))).collect();

    group.bench_function("learning_reference", |b| {
        let mut e = engine();
        let mut i = 0;
        b.iter(|| {
            i += 1;
            black_box(e.observe(&batches[i % batches.len()]));
        });
    });

    group.bench_function("frozen_reference", |b| {
        let mut e = engine();
        e.observe(&batches[0]);
        let later: Vec<Observation> =
            (0..16).map(|i| batch(i + 100, UNIX_EPOCH + Duration::from_secs(T0 + 60))).collect();
        e.observe(&later[0]);
        let mut i = 0;
        b.iter(|| {
            i += 1;
            black_box(e.observe(&later[i % later.len()]));
        });
    });
    group.finish();

    let mut group = c.benchmark_group("close_bucket");
    group.bench_function("64x16_batches_x100_to_points", |b| {
        b.iter_batched(
            || {
                let mut e = engine();
                e.observe(&batches[0]);
                let t = UNIX_EPOCH + Duration::from_secs(T0 + 60);
                for i in 0..100 {
                    e.observe(&batch(i + 7, t));
                }
                e
            },
            |mut e| black_box(e.flush_all()),
            criterion::BatchSize::LargeInput,
        );
    });
    group.finish();
}

criterion_group!(benches, aggregate);
criterion_main!(benches);
