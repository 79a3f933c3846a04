//! Promises of the monitoring engine: exact statistics equal naive computations,
//! quantiles stay within the sketch's bound, counters add up whatever the bucket
//! boundaries, drift is 0 for identical traffic and large for shifted traffic, and
//! confidence-based estimates match hand-computed values.

use mltap::monitor::{ClosedBucket, Engine, EngineOptions, MonitorConfig};
use mltap::sinks::Point;
use mltap::tfserving::{FeatureColumn, FeatureValues, InferenceMethod, Observation, Probabilities, StreamKey};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const T0: i64 = 1_700_000_000;
const WIDTH: u64 = 10;
const ALPHA: f64 = 0.01;

fn key() -> StreamKey {
    StreamKey { model: "iris".into(), version: Some(2), signature: "serving_default".into() }
}

fn engine_with(config: MonitorConfig, output_dir: Option<std::path::PathBuf>) -> Engine {
    Engine::new(EngineOptions {
        bucket: Duration::from_secs(WIDTH),
        monitor: config,
        output_dir,
        categorical_features: BTreeMap::new(),
        started_at: UNIX_EPOCH,
    })
    .unwrap()
}

fn engine() -> Engine {
    engine_with(MonitorConfig { grace_seconds: 0, ..MonitorConfig::default() }, None)
}

fn at(seconds: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(seconds as u64)
}

fn observation(t: i64, x: Vec<f64>, probs: Option<Vec<[f64; 3]>>) -> Observation {
    let rows = x.len();
    Observation {
        stream: key(),
        method: InferenceMethod::Predict,
        event_time: at(t),
        request_id: "r".into(),
        rows,
        features: vec![FeatureColumn {
            name: "x".into(),
            values: FeatureValues::Numeric { values: x, integer: false },
        }],
        probabilities: probs.map(|p| Probabilities {
            classes: 3,
            values: p.iter().flatten().copied().collect(),
            class_names: None,
            threshold: None,
        }),
        regression: None,
        row_ids: None,
        upstream_latency: Duration::from_millis(3),
    }
}

fn value(points: &[Point], what: &str, dims: &[(&str, &str)]) -> Option<f64> {
    points.iter().find(|p| p.what() == what && dims.iter().all(|(k, v)| p.property(k) == Some(*v))).map(|p| p.value)
}

fn sum(buckets: &[ClosedBucket], what: &str) -> f64 {
    buckets.iter().flat_map(|b| &b.points).filter(|p| p.what() == what).map(|p| p.value).sum()
}

fn close_enough(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs()))
}

fn argmax(p: &[f64; 3]) -> usize {
    let mut best = 0;
    for i in 1..3 {
        if p[i] > p[best] {
            best = i;
        }
    }
    best
}

/// A row: its second within the window, its feature value (NaN = missing) and its probabilities.
fn row() -> impl Strategy<Value = (i64, f64, [f64; 3])> {
    let x = prop_oneof![
        8 => -1e6f64..1e6,
        1 => Just(0.0),
        1 => Just(f64::NAN),
        1 => -1.0f64..1.0,
    ];
    (0i64..35, x, (0.0f64..1.0, 0.0f64..1.0, 0.0f64..1.0)).prop_map(|(t, x, (a, b, c))| {
        let s = a + b + c + 1e-9;
        (t, x, [a / s, b / s, c / s])
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn exact_statistics_equal_a_naive_computation(rows in prop::collection::vec(row(), 1..200), batch in 1usize..8) {
        let mut e = engine();
        for chunk in rows.chunks(batch) {
            // One observation per chunk, at the chunk's first time.
            let t = T0 + chunk[0].0;
            let x = chunk.iter().map(|r| r.1).collect();
            let p = chunk.iter().map(|r| r.2).collect();
            e.observe(&observation(t, x, Some(p)));
        }
        let closed = e.flush_all();
        let mut by_bucket: BTreeMap<i64, Vec<(f64, [f64; 3])>> = BTreeMap::new();
        for chunk in rows.chunks(batch) {
            let start = (T0 + chunk[0].0).div_euclid(WIDTH as i64) * WIDTH as i64;
            by_bucket.entry(start).or_default().extend(chunk.iter().map(|r| (r.1, r.2)));
        }
        for bucket in &closed {
            let Some(expected) = by_bucket.get(&bucket.start) else {
                // A heartbeat between buckets with data.
                prop_assert_eq!(value(&bucket.points, "buffer_count", &[]), Some(0.0));
                continue;
            };
            let points = &bucket.points;
            prop_assert_eq!(value(points, "buffer_count", &[]), Some(expected.len() as f64));
            let finite: Vec<f64> = expected.iter().map(|r| r.0).filter(|v| v.is_finite()).collect();
            let missing = (expected.len() - finite.len()) as f64;
            prop_assert_eq!(value(points, "feature_missing_count", &[("feat_name", "x")]), Some(missing));
            if !finite.is_empty() {
                let n = finite.len() as f64;
                let mean = finite.iter().sum::<f64>() / n;
                let min = finite.iter().copied().fold(f64::INFINITY, f64::min);
                let max = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let got = |stat: &str| value(points, "feature_value", &[("feat_name", "x"), ("stat", stat)]);
                prop_assert!(close_enough(got("mean").unwrap(), mean), "mean {:?} vs {}", got("mean"), mean);
                prop_assert_eq!(got("min"), Some(min));
                prop_assert_eq!(got("max"), Some(max));
                prop_assert!(close_enough(got("range").unwrap(), max - min));
                if finite.len() > 1 {
                    let var = finite.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
                    prop_assert!(close_enough(got("std").unwrap(), var.sqrt()), "std {:?} vs {}", got("std"), var.sqrt());
                } else {
                    prop_assert_eq!(got("std"), None);
                }
            }
            let n = expected.len() as f64;
            for c in 0..3 {
                let class = format!("class_{c}");
                let count = expected.iter().filter(|r| argmax(&r.1) == c).count() as f64;
                prop_assert_eq!(value(points, "prediction_count", &[("class_name", &class)]), Some(count));
                prop_assert!(close_enough(value(points, "prediction_freq", &[("class_name", &class)]).unwrap(), count / n));
                let mean_p = expected.iter().map(|r| r.1[c]).sum::<f64>() / n;
                prop_assert!(close_enough(value(points, "class_proba_mean", &[("class_name", &class)]).unwrap(), mean_p));
            }
            let accuracy = expected.iter().map(|r| r.1[argmax(&r.1)]).sum::<f64>() / n;
            prop_assert!(close_enough(value(points, "estimated_accuracy", &[]).unwrap(), accuracy));
            let max_mean = expected.iter().map(|r| r.1[argmax(&r.1)]).sum::<f64>() / n;
            prop_assert!(close_enough(value(points, "max_prediction_proba", &[("stat", "mean")]).unwrap(), max_mean));
        }
    }

    #[test]
    fn quantiles_are_within_the_sketch_bound(values in prop::collection::vec(prop_oneof![
        4 => -1e9f64..1e9,
        2 => -10.0f64..10.0,
        1 => Just(0.0),
        1 => 1e-6f64..1e-3,
    ], 1..400)) {
        let mut e = engine();
        e.observe(&observation(T0, values.clone(), None));
        let closed = e.flush_all();
        let mut sorted = values.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        for (stat, q) in [("q01", 0.01), ("q25", 0.25), ("median", 0.5), ("q50", 0.5), ("q75", 0.75), ("q99", 0.99)] {
            let exact = sorted[(q * (n - 1) as f64) as usize];
            let got = value(&closed[0].points, "feature_value", &[("feat_name", "x"), ("stat", stat)]).unwrap();
            // DDSketch: relative error alpha (the 1e-9 absorbs float rounding).
            prop_assert!((got - exact).abs() <= ALPHA * exact.abs() + 1e-9,
                "{} = {} but the exact value is {}", stat, got, exact);
        }
    }

    #[test]
    fn counters_sum_to_the_rows_whatever_the_bucket_boundaries(
        events in prop::collection::vec((0i64..60, 1usize..5), 1..100),
        closes in prop::collection::vec(0i64..80, 0..10),
    ) {
        let mut e = engine();
        let mut closed = Vec::new();
        let mut closes = closes;
        closes.sort();
        let mut total = 0usize;
        for (i, (t, rows)) in events.iter().enumerate() {
            // Close at arbitrary moments, so that some observations come late.
            if let Some(c) = closes.get(i) {
                closed.extend(e.close_due(at(T0 + c)));
            }
            let p = vec![[0.2, 0.3, 0.5]; *rows];
            e.observe(&observation(T0 + t, vec![1.0; *rows], Some(p)));
            total += rows;
        }
        closed.extend(e.flush_all());
        let counted = sum(&closed, "buffer_count");
        let late = sum(&closed, "late_dropped");
        prop_assert_eq!(counted + late, total as f64);
        prop_assert_eq!(sum(&closed, "prediction_count"), counted);
        for b in &closed {
            prop_assert_eq!(b.start % WIDTH as i64, 0);
            prop_assert!(b.points.iter().all(|p| p.timestamp == b.start));
        }
    }
}

/// Feeds `buckets` reference buckets of the same data, then one bucket of `current`.
fn drift_after_reference(reference: &[f64], current: &[f64], categories: (&str, &str)) -> Vec<Point> {
    let config = MonitorConfig { grace_seconds: 0, reference_buckets: 3, ..MonitorConfig::default() };
    let mut e = engine_with(config, None);
    let probs = |xs: &[f64]| xs.iter().map(|x| if *x > 50.0 { [0.1, 0.1, 0.8] } else { [0.8, 0.1, 0.1] }).collect();
    let with_city = |mut o: Observation, city: &str| {
        o.features.push(FeatureColumn {
            name: "city".into(),
            values: FeatureValues::Categorical(vec![Some(city.to_string()); o.rows]),
        });
        o
    };
    for b in 0..3 {
        e.observe(&with_city(
            observation(T0 + b * WIDTH as i64, reference.to_vec(), Some(probs(reference))),
            categories.0,
        ));
    }
    e.observe(&with_city(observation(T0 + 3 * WIDTH as i64, current.to_vec(), Some(probs(current))), categories.1));
    let closed = e.flush_all();
    let last = closed.iter().find(|b| b.start == T0 + 3 * WIDTH as i64).unwrap();
    // No drift is reported while the reference is being learned.
    assert!(closed
        .iter()
        .filter(|b| b.start < last.start)
        .flat_map(|b| &b.points)
        .all(|p| p.what() != "feature_drift"));
    last.points.clone()
}

#[test]
fn drift_is_zero_for_unchanged_traffic() {
    let data: Vec<f64> = (0..100).map(f64::from).collect();
    let points = drift_after_reference(&data, &data, ("paris", "paris"));
    for method in ["psi", "js"] {
        assert_eq!(value(&points, "feature_drift", &[("feat_name", "x"), ("method", method)]), Some(0.0), "{method}");
    }
    assert_eq!(value(&points, "feature_drift", &[("feat_name", "city"), ("method", "linf")]), Some(0.0));
    for method in ["psi", "js", "linf"] {
        assert_eq!(value(&points, "prediction_drift", &[("method", method)]), Some(0.0), "{method}");
    }
}

#[test]
fn drift_is_large_for_shifted_traffic() {
    let data: Vec<f64> = (0..100).map(f64::from).collect();
    let shifted: Vec<f64> = data.iter().map(|v| v + 60.0).collect();
    let points = drift_after_reference(&data, &shifted, ("paris", "lyon"));
    let psi = value(&points, "feature_drift", &[("feat_name", "x"), ("method", "psi")]).unwrap();
    let js = value(&points, "feature_drift", &[("feat_name", "x"), ("method", "js")]).unwrap();
    assert!(psi > 1.0, "psi {psi}");
    assert!(js > 0.4, "js {js}");
    assert_eq!(value(&points, "feature_drift", &[("feat_name", "city"), ("method", "linf")]), Some(1.0));
    assert!(value(&points, "prediction_drift", &[("method", "psi")]).unwrap() > 0.5);
}

#[test]
fn estimated_performance_matches_the_hand_computed_values() {
    let mut e = engine();
    // Binary sigmoid with threshold 0.7: p = 0.8 -> 1, 0.6 -> 0, 0.9 -> 1.
    let mut o = observation(T0, vec![1.0, 2.0, 3.0], None);
    o.probabilities = Some(Probabilities {
        classes: 2,
        values: vec![0.2, 0.8, 0.4, 0.6, 0.1, 0.9],
        class_names: Some(vec!["no".into(), "yes".into()]),
        threshold: Some(0.7),
    });
    e.observe(&o);
    let points = &e.flush_all()[0].points;
    // Confidence of the predicted class: 0.8, 0.4 (class 0 predicted at p = 0.6), 0.9.
    assert!(close_enough(value(points, "estimated_accuracy", &[]).unwrap(), 2.1 / 3.0));
    // yes: TP = 0.8 + 0.9, FP = 0.2 + 0.1, FN = 0.6.
    let yes = [("class_name", "yes")];
    assert!(close_enough(value(points, "estimated_precision", &yes).unwrap(), 1.7 / 2.0));
    assert!(close_enough(value(points, "estimated_recall", &yes).unwrap(), 1.7 / 2.3));
    assert!(close_enough(value(points, "estimated_f1", &yes).unwrap(), 3.4 / (3.4 + 0.3 + 0.6)));
    assert_eq!(value(points, "prediction_count", &[("class_name", "no")]), Some(1.0));
}

#[test]
fn quiet_streams_emit_zero_counts_and_late_rows_are_counted() {
    let mut e = engine();
    e.observe(&observation(T0, vec![1.0, 2.0], Some(vec![[1.0, 0.0, 0.0]; 2])));
    let first = e.close_due(at(T0 + 10));
    assert_eq!(first.len(), 1);
    // A late observation for the closed bucket, then silence for two buckets.
    e.observe(&observation(T0 + 5, vec![1.0], Some(vec![[1.0, 0.0, 0.0]])));
    let later = e.close_due(at(T0 + 30));
    let starts: Vec<i64> = later.iter().map(|b| b.start).collect();
    assert_eq!(starts, vec![T0 + 10, T0 + 20]);
    for b in &later {
        assert_eq!(value(&b.points, "buffer_count", &[]), Some(0.0));
        assert_eq!(value(&b.points, "prediction_count", &[("class_name", "class_0")]), Some(0.0));
    }
    assert_eq!(value(&later[0].points, "late_dropped", &[]), Some(1.0));
    assert_eq!(value(&later[1].points, "late_dropped", &[]), Some(0.0));
}

#[test]
fn a_bucket_stays_open_for_the_grace_period() {
    let mut e = engine_with(MonitorConfig { grace_seconds: 5, ..MonitorConfig::default() }, None);
    e.observe(&observation(T0, vec![1.0], None));
    assert!(e.close_due(at(T0 + 14)).is_empty());
    e.observe(&observation(T0 + 9, vec![1.0], None));
    let closed = e.close_due(at(T0 + 15));
    assert_eq!(value(&closed[0].points, "buffer_count", &[]), Some(2.0));
}

#[test]
fn the_reference_is_persisted_and_reused_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = MonitorConfig { grace_seconds: 0, reference_buckets: 1, ..MonitorConfig::default() };
    let data: Vec<f64> = (0..50).map(f64::from).collect();
    let mut first = engine_with(config.clone(), Some(dir.path().to_path_buf()));
    first.observe(&observation(T0, data.clone(), None));
    first.flush_all();
    let saved = dir.path().join("reference/iris/v2_serving_default.json");
    assert!(saved.is_file());
    let exported = first.export_references();
    assert_eq!(exported.as_array().map(Vec::len), Some(1));

    let mut second = engine_with(config, Some(dir.path().to_path_buf()));
    second.observe(&observation(T0 + 1000, data, None));
    let points = &second.flush_all()[0].points;
    assert_eq!(value(points, "feature_drift", &[("feat_name", "x"), ("method", "psi")]), Some(0.0));
}

#[test]
fn limits_on_features_and_categories_are_counted() {
    let config =
        MonitorConfig { grace_seconds: 0, max_features: 1, max_categories: 2, top_k: 1, ..MonitorConfig::default() };
    let mut e = engine_with(config, None);
    let mut o = observation(T0, vec![1.0, 2.0, 3.0, 4.0], None);
    o.features.insert(
        0,
        FeatureColumn {
            name: "city".into(),
            values: FeatureValues::Categorical(vec![Some("a".into()), Some("b".into()), Some("c".into()), None]),
        },
    );
    e.observe(&o);
    let points = &e.flush_all()[0].points;
    assert_eq!(value(points, "feature_limit_dropped", &[]), Some(4.0));
    assert_eq!(value(points, "category_limit_dropped", &[("feat_name", "city")]), Some(1.0));
    assert_eq!(value(points, "feature_missing_count", &[("feat_name", "city")]), Some(1.0));
    assert_eq!(value(points, "feature_category_freq", &[("feat_name", "city"), ("category", "a")]), Some(1.0 / 3.0));
    assert_eq!(
        value(points, "feature_category_freq", &[("feat_name", "city"), ("category", "__other__")]),
        Some(2.0 / 3.0)
    );
    assert!((value(points, "feature_distinct_estimate", &[("feat_name", "city")]).unwrap() - 3.0).abs() < 0.5);
}

#[test]
fn integer_features_with_few_values_get_frequencies_and_absent_features_count_missing() {
    let mut e = engine();
    let mut o = observation(T0, vec![1.0, 2.0], None);
    o.features.push(FeatureColumn {
        name: "age".into(),
        values: FeatureValues::Numeric { values: vec![3.0, 3.0], integer: true },
    });
    e.observe(&o);
    e.observe(&observation(T0 + 1, vec![5.0, 6.0, 7.0], None));
    let points = &e.flush_all()[0].points;
    assert_eq!(value(points, "feature_category_freq", &[("feat_name", "age"), ("category", "3")]), Some(1.0));
    assert_eq!(value(points, "feature_distinct_estimate", &[("feat_name", "age")]), Some(1.0));
    assert_eq!(value(points, "feature_missing_count", &[("feat_name", "age")]), Some(3.0));
    assert_eq!(value(points, "feature_missing_count", &[("feat_name", "x")]), Some(0.0));
}

#[test]
fn points_carry_the_stream_properties_in_order() {
    let mut e = engine();
    e.observe(&observation(T0, vec![1.0], None));
    let closed = e.flush_all();
    let p = closed[0].points.iter().find(|p| p.what() == "feature_value").unwrap();
    let keys: Vec<&str> = p.properties().iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["what", "target_type", "model", "version", "signature", "feat_name", "stat", "ver"]);
}
