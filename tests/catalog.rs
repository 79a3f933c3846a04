//! The metric catalogue is the single source of what mltap emits: every point the real
//! producers write (the demo end to end, the engine's limit and error paths, the label
//! metrics) is declared with its dimensions, every point maps to a measure and
//! dimensions of its Anodot 3.0 stream schema, and the docs list every metric.

use mltap::capture::{CallMethod, ErrorOrigin};
use mltap::catalog::{self, Stream};
use mltap::labels::aggregate::Aggregate;
use mltap::labels::record::StreamMeta;
use mltap::monitor::{Engine, EngineOptions, ExchangeFacts, MonitorConfig};
use mltap::sinks::anodot::encode3 as anodot_v3;
use mltap::sinks::Point;
use mltap::tfserving::{FeatureColumn, FeatureValues, InferenceMethod, Observation, Probabilities, StreamKey};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Checks that a point is a declared metric with declared dimensions, in order, and
/// the target type its kind implies; returns the metric.
fn assert_declared(point: &Point) -> &'static catalog::MetricDef {
    let metric = catalog::find(point.what())
        .unwrap_or_else(|| panic!("`{}` is emitted but not in the catalogue: {point:?}", point.what()));
    assert_eq!(point.metric().map(|m| m.name), Some(metric.name));
    let expected_type = if metric.kind.is_counter() { "counter" } else { "gauge" };
    assert_eq!(point.property("target_type"), Some(expected_type), "{point:?}");
    assert_eq!(point.property("ver"), Some("1"), "{point:?}");
    let keys = point.dimensions().map(|(_, key, _)| key);
    if let Err(problem) = catalog::check_dims(metric, keys) {
        panic!("{problem}: {point:?}");
    }
    metric
}

/// The points of every Anodot file under `OUTPUT_DIR/anodot/`, by model.
fn points_in(output_dir: &Path) -> BTreeMap<String, Vec<Point>> {
    let mut out = BTreeMap::new();
    for model in std::fs::read_dir(output_dir.join("anodot")).expect("the anodot folder exists") {
        let model = model.unwrap();
        let points: &mut Vec<Point> = out.entry(model.file_name().to_string_lossy().into_owned()).or_default();
        for file in std::fs::read_dir(model.path()).unwrap() {
            let path = file.unwrap().path();
            if path.extension().is_some_and(|x| x == "json") {
                let bytes = std::fs::read(&path).unwrap();
                points.extend(serde_json::from_slice::<Vec<Point>>(&bytes).unwrap());
            }
        }
    }
    out
}

/// Runs `mltap demo` once for every test of this file (short buckets and label
/// horizon, so that label metrics are written too) and returns its output dir.
fn demo_output() -> &'static Path {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, out) = DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_mltap"))
            .args(["demo", "--for", "12s", "--bucket", "2s", "--label-horizon", "2s"])
            .args(["--output-dir", out.to_str().unwrap()])
            .output()
            .expect("the mltap binary runs");
        assert!(
            output.status.success(),
            "demo failed: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (dir, out)
    });
    out
}

#[test]
fn every_point_the_demo_writes_is_a_declared_metric_with_declared_dimensions() {
    let models = points_in(demo_output());
    let mut names = BTreeSet::new();
    for points in models.values() {
        for point in points {
            names.insert(assert_declared(point).name);
        }
    }
    // The demo covers the traffic, the exchanges and the labels: the check above ran
    // over every kind of producer.
    for expected in ["buffer_count", "feature_value", "feature_category_freq", "request_count", "accuracy"] {
        assert!(names.contains(expected), "the demo emitted no {expected}: {names:?}");
    }
}

#[test]
fn every_point_the_demo_writes_maps_to_its_anodot_30_stream_schema() {
    let models = points_in(demo_output());
    let mut streams_seen = BTreeSet::new();
    for (model, points) in &models {
        for stream in Stream::ALL {
            let schema = anodot_v3::schema(&stream.schema_name("mltap_", model), stream, points);
            let measures = schema["measurements"].as_object().unwrap();
            let dimensions: BTreeSet<&str> =
                schema["dimensions"].as_array().unwrap().iter().map(|d| d.as_str().unwrap()).collect();
            // The schema is the catalogue's stream, whatever the points.
            let declared: BTreeSet<&str> = catalog::of_stream(stream).map(|m| m.name).collect();
            assert_eq!(measures.keys().map(String::as_str).collect::<BTreeSet<_>>(), declared);
            for point in points.iter().filter(|p| anodot_v3::stream_of(p.what()) == stream) {
                streams_seen.insert(stream);
                let sample = anodot_v3::sample("id", point);
                let what = point.what();
                let aggregation = if point.property("target_type") == Some("counter") { "sum" } else { "average" };
                assert_eq!(measures[what]["aggregation"], aggregation, "{what} in {}", schema["name"]);
                assert!(sample["measurements"].get(what).is_some());
                for key in sample["dimensions"].as_object().unwrap().keys() {
                    assert!(dimensions.contains(key.as_str()), "{what}'s `{key}` is not in {}", schema["name"]);
                }
            }
        }
    }
    assert_eq!(streams_seen, BTreeSet::from(Stream::ALL), "the demo fed both streams");
}

#[test]
fn the_30_schemas_carry_the_label_counters_drop_counters_and_reasons() {
    let labels = anodot_v3::schema("l", Stream::Labels, &[]);
    for name in ["label_count", "label_late_count", "label_unmatched_count", "accuracy", "confusion_count"] {
        assert!(labels["measurements"].get(name).is_some(), "{name} in the labels schema");
    }
    let traffic = anodot_v3::schema("t", Stream::Traffic, &[]);
    for name in [
        "late_dropped",
        "feature_limit_dropped",
        "category_limit_dropped",
        "stream_limit_dropped",
        "capture_dropped",
        "class_count_mismatch",
        "sampled_fraction",
    ] {
        assert!(traffic["measurements"].get(name).is_some(), "{name} in the traffic schema");
        assert!(labels["measurements"].get(name).is_none(), "{name} not in the labels schema");
    }
    assert!(traffic["dimensions"].as_array().unwrap().iter().any(|d| d == "reason"));
    assert!(labels["dimensions"].as_array().unwrap().iter().any(|d| d == "actual_class"));
}

const T0: i64 = 1_700_000_000;

fn at(seconds: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(seconds as u64)
}

fn observation(model: &str, t: i64, classes: usize) -> Observation {
    let probabilities: Vec<f64> = (0..2).flat_map(|_| (0..classes).map(move |_| 1.0 / classes as f64)).collect();
    Observation {
        stream: StreamKey { model: model.into(), version: Some(1), signature: "serving_default".into() },
        method: InferenceMethod::Predict,
        event_time: at(t),
        request_id: "r".into(),
        rows: 2,
        features: vec![
            FeatureColumn {
                name: "x".into(),
                values: FeatureValues::Numeric { values: vec![1.0, 3.0], integer: true },
            },
            FeatureColumn {
                name: "y".into(),
                values: FeatureValues::Numeric { values: vec![f64::NAN, 2.0], integer: false },
            },
        ],
        probabilities: Some(Probabilities { classes, values: probabilities, class_names: None, threshold: None }),
        regression: None,
        row_ids: None,
        upstream_latency: Duration::from_millis(3),
    }
}

#[test]
fn the_engines_limit_and_error_paths_emit_declared_metrics() {
    let config = MonitorConfig {
        grace_seconds: 0,
        max_features: 1,
        max_categories: 2,
        top_k: 2,
        integer_categorical_max_distinct: 2,
        max_streams: 1,
        reference_buckets: 1,
        ..MonitorConfig::default()
    };
    let categorical = BTreeMap::from([("iris".to_string(), BTreeSet::from(["x".to_string()]))]);
    let mut engine = Engine::new(EngineOptions {
        bucket: Duration::from_secs(10),
        monitor: config,
        output_dir: None,
        categorical_features: categorical,
        started_at: UNIX_EPOCH,
    })
    .unwrap();
    let mut closed = Vec::new();
    for bucket in 0..4 {
        let t = T0 + 10 * bucket;
        engine.observe(&observation("iris", t, 3));
        let mut more = observation("iris", t + 1, 3);
        if let FeatureValues::Numeric { values, .. } = &mut more.features[0].values {
            *values = vec![5.0, 7.0];
        }
        engine.observe(&more);
        engine.observe(&observation("iris", t + 2, 2));
        engine.observe(&observation("other", t, 3));
        engine.record_exchange(&ExchangeFacts {
            model: Some("iris".into()),
            method: CallMethod::Predict,
            status: "200".into(),
            origin: None,
            event_time: at(t),
            upstream_latency: Duration::from_millis(4),
            decode_errors: vec!["bad_json"],
        });
        // mltap's own answer for an unreachable upstream carries the `origin` dimension.
        engine.record_exchange(&ExchangeFacts {
            model: Some("iris".into()),
            method: CallMethod::Predict,
            status: "502".into(),
            origin: Some(ErrorOrigin::Mltap),
            event_time: at(t),
            upstream_latency: Duration::ZERO,
            decode_errors: vec![],
        });
        engine.record_capture_dropped(at(t), 1);
        closed.extend(engine.close_due(at(t + 10)));
        // Late: its bucket just closed.
        engine.observe(&observation("iris", t, 3));
    }
    let mut names = BTreeSet::new();
    closed.extend(engine.flush_all());
    for bucket in &closed {
        for point in &bucket.points {
            names.insert(assert_declared(point).name);
        }
    }
    for expected in [
        "stream_limit_dropped",
        "capture_dropped",
        "late_dropped",
        "feature_limit_dropped",
        "category_limit_dropped",
        "class_count_mismatch",
        "feature_missing_count",
        "decode_errors",
        "upstream_latency_ms",
    ] {
        assert!(names.contains(expected), "{expected} not emitted: {names:?}");
    }
}

#[test]
fn every_label_metric_is_declared_in_the_labels_stream() {
    let meta = StreamMeta { model: "m".into(), version: Some(3), signature: "s".into(), class_names: vec![] };
    let agg = Aggregate {
        predicted_rows: 10,
        labeled: 4,
        confusion: BTreeMap::from([((0, 0), 1), ((0, 1), 1), ((1, 1), 2)]),
        log_loss_sum: 2.0,
        brier_sum: 1.0,
        auc_rows: vec![(0.2, false), (0.6, false), (0.7, true), (0.9, true)],
        late: 2,
        unmatched: 1,
        ..Aggregate::default()
    };
    let mut points = mltap::labels::metrics::points(&meta, T0, &agg, false);
    // A regression stream's bucket: numeric labels give the regression label metrics.
    let mut regression = Aggregate { predicted_rows: 4, labeled: 3, ..Aggregate::default() };
    for (field, value) in [("r:n", "3"), ("r:ae", "3"), ("r:se", "5"), ("r:e", "-1"), ("r:y", "6")] {
        assert!(regression.regression.parse_field(field, value));
    }
    for (field, value) in [("r:yy", "20"), ("r:ape", "1.5"), ("r:y0", "1"), ("r:eb:70", "3"), ("r:lb:z", "3")] {
        assert!(regression.regression.parse_field(field, value));
    }
    points.extend(mltap::labels::metrics::points(&meta, T0, &regression, false));
    let names: BTreeSet<&str> = points.iter().map(|p| assert_declared(p).name).collect();
    let label_stream: BTreeSet<&str> = catalog::of_stream(Stream::Labels).map(|m| m.name).collect();
    assert_eq!(names, label_stream, "every label metric is emitted and belongs to the labels stream");
}

/// The rows of docs/metrics.md's table of every metric: name → [dims, scope, kind,
/// exactness, stream, Prometheus family].
fn documented_metrics() -> BTreeMap<String, [String; 6]> {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/metrics.md")).unwrap();
    let table = doc.split("## Every metric").nth(1).expect("docs/metrics.md has an `Every metric` section");
    table
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|row| {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let cell = |i: usize| cells[i].trim_matches('`').to_string();
            (cell(1), [cells[2].to_string(), cell(3), cell(4), cell(6), cell(7), cell(8)])
        })
        .collect()
}

#[test]
fn the_docs_list_every_metric_as_the_catalogue_declares_it() {
    let documented = documented_metrics();
    for metric in catalog::ALL {
        let kind = match metric.kind {
            catalog::Kind::Counter => "counter",
            catalog::Kind::Gauge => "gauge",
            catalog::Kind::Statistic => "statistic",
        };
        let row = documented.get(metric.name).unwrap_or_else(|| panic!("{} is not in docs/metrics.md", metric.name));
        let stream = match metric.stream {
            Stream::Traffic => "traffic",
            Stream::Labels => "labels",
        };
        let family = metric.prometheus.map_or("—".to_string(), |f| format!("mltap_{f}"));
        let dims: Vec<String> = metric
            .dims
            .iter()
            .map(|d| {
                let optional = if metric.optional_dims.contains(d) { " (optional)" } else { "" };
                format!("`{}`{optional}", d.key())
            })
            .collect();
        let dims = if dims.is_empty() { "—".to_string() } else { dims.join(", ") };
        let scope = match metric.scope {
            catalog::Scope::Stream => "stream",
            catalog::Scope::Model => "model",
        };
        let expected = [
            dims,
            scope.to_string(),
            kind.to_string(),
            metric.exactness.as_str().to_string(),
            stream.to_string(),
            family,
        ];
        assert_eq!(row, &expected, "{}", metric.name);
    }
    assert_eq!(documented.len(), catalog::ALL.len(), "docs/metrics.md lists a metric the catalogue does not declare");
}
