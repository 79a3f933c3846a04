//! Aggregation throughput of the monitoring engine, in feature values per second on
//! one core, for the reference batch of 64 rows × 16 float features with 3-class
//! probabilities: while a drift reference is being learned (reservoir sampling),
//! once it is frozen (values also binned for drift), and closing a bucket into points.
//!
//! `aggregate_exchange` measures the aggregation thread's work per exchange as
//! `mltap serve` does it at saturation, on real decoded exchanges of the 64×16 gRPC
//! `Predict` fixture (5-class probabilities): the exchange's facts (request count,
//! latency), the outputs of its observation (row and class counts, CBPE sums, the
//! `max_prediction_proba`, `spread12` and entropy sketches), and the label record
//! `LabelService::prepare` builds for the join. `count_record` is an exchange of the
//! count lane (outputs only: nearly every exchange at saturation), `sampled` one whose
//! inputs are also aggregated.
//!
//! Run: `cargo bench --bench aggregate -- aggregate_exchange`.

#[path = "../tests/support/mod.rs"]
mod support;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use mltap::capture::{Bodies, Exchange, Protocol, RouteKind};
use mltap::labels::{LabelService, LabelSettings, LabelsConfig, LabelsStoreConfig};
use mltap::monitor::{Engine, EngineOptions, ExchangeFacts, MonitorConfig};
use mltap::tfserving::grpc::frame;
use mltap::tfserving::{Decoder, FeatureColumn, FeatureValues, InferenceMethod, Observation, Probabilities, StreamKey};
use std::collections::BTreeMap;
use std::sync::Arc;
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

/// One decoded exchange as the aggregation thread receives it.
struct DecodedExchange {
    facts: ExchangeFacts,
    observations: Vec<Observation>,
    sampled: bool,
}

/// `count` decoded exchanges of the 64×16 gRPC `Predict` fixture, each with its own
/// request id, started now; as count records (response and request prefix) or whole.
fn fixture_exchanges(count: usize, sampled: bool) -> Vec<DecodedExchange> {
    let dir = support::fixtures_dir().join("grpc");
    let request = frame(&std::fs::read(dir.join("batch64x16.request.pb")).expect("fixture request"));
    let response = frame(&std::fs::read(dir.join("batch64x16.response.pb")).expect("fixture response"));
    let path = "/tensorflow.serving.PredictionService/Predict";
    let decoder = Decoder::default();
    (0..count)
        .map(|i| {
            let (bodies, request_body) = if sampled {
                (Bodies::Full, vec![request.clone()])
            } else {
                (
                    Bodies::ResponseOnly,
                    mltap::capture::prefix(std::slice::from_ref(&request), mltap::capture::REQUEST_PREFIX_BYTES),
                )
            };
            let exchange = Exchange {
                protocol: Protocol::Grpc,
                path: path.into(),
                method: RouteKind::of_request(Protocol::Grpc, path).method,
                request_id: format!("bench-{i:08x}-4b1d-9f2e-{:012x}", i * 7919),
                request_id_generated: false,
                request_encoding: None,
                response_encoding: None,
                bodies,
                request_body,
                response_body: vec![response.clone()],
                status: 200,
                grpc_status: Some(0),
                origin: None,
                started_at: SystemTime::now(),
                upstream_latency: Duration::from_micros(800 + (i as u64 % 400)),
                complete: true,
            };
            let decoded = decoder.decode(&exchange);
            assert!(decoded.errors.is_empty(), "{:?}", decoded.errors);
            assert_eq!(decoded.observations.len(), 1);
            let observation = &decoded.observations[0];
            assert_eq!((observation.rows, observation.probabilities.as_ref().map(|p| p.classes)), (64, Some(5)));
            assert_eq!(observation.features.is_empty(), !sampled);
            DecodedExchange {
                facts: ExchangeFacts::new(&exchange, &decoded),
                observations: decoded.observations,
                sampled,
            }
        })
        .collect()
}

fn live_engine() -> Engine {
    Engine::new(EngineOptions {
        bucket: Duration::from_secs(60),
        monitor: MonitorConfig::default(),
        output_dir: None,
        categorical_features: BTreeMap::new(),
        started_at: SystemTime::now(),
    })
    .expect("engine")
}

/// The aggregation thread's work per exchange (`worker::MonitorThread::feed` with the
/// label join's `prepare`), in time per exchange.
fn aggregate_exchange(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let settings = LabelSettings {
        bucket: Duration::from_secs(60),
        horizon: Duration::from_secs(3600),
        output_dir: dir.path().to_path_buf(),
        store: LabelsStoreConfig::Embedded,
        labels: LabelsConfig::default(),
        models: BTreeMap::new(),
    };
    let labels: Arc<LabelService> = runtime.block_on(LabelService::open(settings)).expect("label service");

    let mut group = c.benchmark_group("aggregate_exchange");
    group.throughput(Throughput::Elements(1));
    for (name, sampled) in [("count_record", false), ("sampled", true)] {
        let exchanges = fixture_exchanges(256, sampled);
        group.bench_function(format!("grpc_64x16/{name}"), |b| {
            let mut engine = live_engine();
            let mut i = 0;
            b.iter(|| {
                let decoded = &exchanges[i % exchanges.len()];
                i += 1;
                engine.record_exchange(&decoded.facts);
                for observation in &decoded.observations {
                    let observed = if decoded.sampled {
                        engine.observe(observation)
                    } else {
                        engine.observe_unsampled(observation)
                    };
                    black_box(labels.prepare(observation, observed.bucket_start));
                }
            });
        });
    }
    group.finish();
}

criterion_group!(benches, aggregate, aggregate_exchange);
criterion_main!(benches);
