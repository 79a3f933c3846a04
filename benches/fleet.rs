//! What the fleet costs per bucket, for 3 models × 100 numeric features (64-row
//! batches, 3-class probabilities, 600 observations per model and bucket): the bytes
//! of one replica's partial states, encoding them, decoding and merging three
//! replicas' partials into points, and the Redis round trips of writing a partial and
//! of claiming, fencing and finishing a bucket against a real local `redis-server`
//! (started here; the Redis part is skipped when it is not installed).
//!
//! Round trips are fixed by the design (docs/fleet.md): a partial is written with 2
//! (`ZADD` to the due index, the write script), a bucket is emitted with 4 (claim,
//! renew, finish, `ZREM`), plus one `ZRANGEBYSCORE` per claim tick for all buckets.
//! None of it runs on the proxy's threads: the fleet has its own thread and runtime.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use mltap::fleet::codec;
use mltap::fleet::store::{Claim, FleetStore};
use mltap::monitor::{BucketState, Engine, EngineOptions, Merge, MonitorConfig};
use mltap::tfserving::{FeatureColumn, FeatureValues, InferenceMethod, Observation, Probabilities, StreamKey};
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, UNIX_EPOCH};

const MODELS: usize = 3;
const FEATURES: usize = 100;
const ROWS: usize = 64;
const OBSERVATIONS: usize = 600;
const T0: u64 = 1_700_000_000;

fn batch(model: usize, seed: u64) -> Observation {
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
        stream: StreamKey { model: format!("model_{model}"), version: Some(1), signature: "serving_default".into() },
        method: InferenceMethod::Predict,
        event_time: UNIX_EPOCH + Duration::from_secs(T0 + 1),
        request_id: "r".into(),
        rows: ROWS,
        features,
        probabilities: Some(Probabilities { classes: 3, values: probs, class_names: None, threshold: None }),
        regression: None,
        row_ids: None,
        upstream_latency: Duration::from_millis(1),
    }
}

/// One replica's closed bucket of every model.
fn replica_states(seed: u64) -> Vec<BucketState> {
    let mut engine = Engine::new(EngineOptions {
        bucket: Duration::from_secs(60),
        monitor: MonitorConfig::default(),
        output_dir: None,
        categorical_features: BTreeMap::new(),
        started_at: UNIX_EPOCH,
    })
    .unwrap();
    for i in 0..OBSERVATIONS {
        for model in 0..MODELS {
            engine.observe(&batch(model, seed * 1_000_003 + (i * MODELS + model) as u64));
        }
    }
    engine.close_due_states(UNIX_EPOCH + Duration::from_secs(T0 + 3600))
}

fn local_redis() -> Option<(std::process::Child, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some((child, format!("redis://127.0.0.1:{port}/0")));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    None
}

fn fleet(c: &mut Criterion) {
    let replicas: Vec<Vec<BucketState>> = (1..=3).map(replica_states).collect();
    let encoded: Vec<Vec<Vec<u8>>> =
        replicas.iter().map(|states| states.iter().map(|s| codec::encode(s).unwrap()).collect()).collect();
    let json_bytes: usize = replicas[0].iter().map(|s| serde_json::to_vec(s).unwrap().len()).sum();
    let partial_bytes: usize = encoded[0].iter().map(Vec::len).sum();
    println!(
        "fleet: one replica's partials of {MODELS} models x {FEATURES} features: {partial_bytes} bytes deflated \
         ({} per model), {json_bytes} bytes of JSON",
        partial_bytes / MODELS
    );

    let mut group = c.benchmark_group("fleet");
    group.sample_size(10);
    group.bench_function("encode one replica's partials (3 models)", |b| {
        b.iter(|| replicas[0].iter().map(|s| codec::encode(black_box(s)).unwrap().len()).sum::<usize>())
    });
    group.bench_function("decode and merge 3 replicas' partials into points (3 models)", |b| {
        let config = MonitorConfig::default();
        b.iter(|| {
            let mut points = 0;
            for model in 0..MODELS {
                let mut merged = codec::decode(&encoded[0][model]).unwrap();
                for replica in &encoded[1..] {
                    merged.merge(&codec::decode(&replica[model]).unwrap());
                }
                points += merged.into_closed(&config).points.len();
            }
            points
        })
    });

    if let Some((mut child, url)) = local_redis() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let store = runtime.block_on(FleetStore::connect(&[url], "bench")).unwrap();
        let mut start = 0i64;
        group.bench_function("Redis: 3 replicas write a partial, one claims, fences, finishes (1 model)", |b| {
            b.iter(|| {
                start += 60;
                runtime.block_on(async {
                    for (r, replica) in encoded.iter().enumerate() {
                        let name = format!("replica-{r}");
                        store.write_partial("model_0", start, &name, &replica[0], 0, 600_000).await.unwrap();
                    }
                    let Claim::Claimed { token, partials } =
                        store.claim("model_0", start, 10_000, 600_000).await.unwrap()
                    else {
                        panic!("the bucket is claimable")
                    };
                    assert_eq!(partials.len(), 3);
                    assert!(store.renew("model_0", start, token, 10_000).await.unwrap());
                    assert!(store.finish("model_0", start, token, 600_000).await.unwrap());
                    store.forget_due("model_0", start).await.unwrap();
                })
            })
        });
        let _ = child.kill();
        let _ = child.wait();
    } else {
        println!("fleet: redis-server not found; the Redis round trips are not measured");
    }
    group.finish();
}

criterion_group!(benches, fleet);
criterion_main!(benches);
