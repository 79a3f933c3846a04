//! The merge of closed buckets' partial states: observations split across engines,
//! each bucket's states written and read back as the fleet does (`fleet::codec`) and
//! merged, give the points of one engine fed every observation: counts, class counts,
//! missing counts, category frequencies, means and extremes exactly; quantiles within
//! the sketch's α.

use mltap::fleet::{codec, merge_states};
use mltap::monitor::{Engine, EngineOptions, MonitorConfig};
use mltap::sinks::Point;
use mltap::tfserving::{FeatureColumn, FeatureValues, InferenceMethod, Observation, Probabilities, StreamKey};
use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

/// A bucket start (a multiple of 60 s): every observation falls in one bucket.
const T0: u64 = 1_699_999_980;

fn engine() -> Engine {
    Engine::new(EngineOptions {
        bucket: Duration::from_secs(60),
        monitor: MonitorConfig { reference_buckets: 1, ..MonitorConfig::default() },
        output_dir: None,
        categorical_features: BTreeMap::new(),
        started_at: UNIX_EPOCH,
    })
    .unwrap()
}

/// Observation `i`: 8 rows, a float, an integer and a string feature (the string one
/// only on even observations, so that the other side counts it missing), 3 classes.
fn observation(i: u64) -> Observation {
    let mut state = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let rows = 8;
    let mut features = vec![
        FeatureColumn {
            name: "amount".into(),
            values: FeatureValues::Numeric {
                values: (0..rows).map(|_| next() * 1000.0 - 200.0).collect(),
                integer: false,
            },
        },
        FeatureColumn {
            name: "age".into(),
            values: FeatureValues::Numeric {
                values: (0..rows).map(|_| (next() * 8.0).floor()).collect(),
                integer: true,
            },
        },
    ];
    if i.is_multiple_of(2) {
        let cities = ["paris", "lyon", "nice", "lille"];
        features.push(FeatureColumn {
            name: "city".into(),
            values: FeatureValues::Categorical(
                (0..rows).map(|_| Some(cities[(next() * 4.0) as usize % 4].to_string())).collect(),
            ),
        });
    }
    let mut probabilities = Vec::new();
    for _ in 0..rows {
        let (a, b, c) = (next(), next(), next());
        let s = a + b + c;
        probabilities.extend([a / s, b / s, c / s]);
    }
    Observation {
        stream: StreamKey { model: "credit".into(), version: Some(2), signature: "serving_default".into() },
        method: InferenceMethod::Predict,
        event_time: UNIX_EPOCH + Duration::from_secs(T0 + i % 50),
        request_id: format!("r{i}"),
        rows,
        features,
        probabilities: Some(Probabilities { classes: 3, values: probabilities, class_names: None, threshold: None }),
        regression: None,
        row_ids: None,
        upstream_latency: Duration::from_millis(1 + i % 7),
    }
}

fn by_identity(points: &[Point]) -> BTreeMap<String, f64> {
    points
        .iter()
        .map(|p| {
            let json = serde_json::to_value(p).unwrap();
            (format!("{}@{}", json["properties"], json["timestamp"]), p.value)
        })
        .collect()
}

#[test]
fn partial_states_split_across_three_engines_merge_to_the_points_of_one() {
    let mut single = engine();
    let mut replicas = [engine(), engine(), engine()];
    for i in 0..600 {
        let obs = observation(i);
        single.observe(&obs);
        // Uneven shares, the first replica alone sees the string feature's first values.
        replicas[(i as usize * 7 / 3) % 3].observe(&obs);
    }
    let close = UNIX_EPOCH + Duration::from_secs(T0 + 3600);
    let expected = single.close_due(close);
    let mut partials = Vec::new();
    for replica in &mut replicas {
        for state in replica.close_due_states(close) {
            // Through the bytes the fleet writes to Redis.
            partials.push(codec::decode(&codec::encode(&state).unwrap()).unwrap());
        }
    }
    let merged = merge_states(partials).expect("partials").into_closed(&MonitorConfig::default());
    assert_eq!(expected.len(), 1);
    let (expected, merged) = (by_identity(&expected[0].points), by_identity(&merged.points));
    assert_eq!(expected.keys().collect::<Vec<_>>(), merged.keys().collect::<Vec<_>>(), "the same points");
    let alpha = MonitorConfig::default().quantile_relative_accuracy;
    for (id, e) in &expected {
        let m = merged[id];
        let estimated =
            ["median", "q01", "q25", "q50", "q75", "q99", "iqr", "\"std\"", "distinct"].iter().any(|s| id.contains(s));
        let tolerance = if estimated { 2.0 * alpha * e.abs() + 1e-9 } else { 1e-9 * e.abs().max(1.0) };
        assert!((m - e).abs() <= tolerance, "{id}: merged {m}, one engine {e}");
    }
    for what in ["buffer_count", "prediction_count", "feature_missing_count", "feature_category_freq"] {
        assert!(expected.keys().any(|id| id.contains(&format!("\"what\":\"{what}\""))), "{what} is covered");
    }
}

#[test]
fn a_corrupt_partial_is_an_error_not_a_panic() {
    assert!(codec::decode(b"not deflate").is_err());
    assert!(codec::decode(&[]).is_err());
}
