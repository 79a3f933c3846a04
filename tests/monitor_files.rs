//! Promises of the Anodot file sink: one valid Anodot 2.0 JSON array per bucket and
//! model at `OUTPUT_DIR/anodot/MODEL/YYYYMMDDTHHMMSSZ.json`, written atomically, and
//! later points for the same bucket merged after the existing ones.

use mltap::monitor::{Engine, EngineOptions, MonitorConfig};
use mltap::sinks::files::FileSink;
use mltap::sinks::{Point, TargetType};
use mltap::tfserving::{FeatureColumn, FeatureValues, InferenceMethod, Observation, Probabilities, StreamKey};
use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

const T0: i64 = 1_700_000_000;

fn point(what: &str, value: f64) -> Point {
    Point::builder(what, TargetType::Counter, T0, value).with("model", "iris").finish().unwrap()
}

/// Checks Anodot 2.0's shape and property rules on a file's raw JSON.
fn assert_valid_anodot(path: &std::path::Path, bucket_start: i64) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    let points: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert!(!points.is_empty());
    for p in &points {
        let obj = p.as_object().unwrap();
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        assert_eq!(keys, ["properties", "tags", "timestamp", "value"]);
        let props = obj["properties"].as_object().unwrap();
        assert!(props.len() <= 20);
        assert!(props.contains_key("what") && props.contains_key("ver"));
        assert!(matches!(props["target_type"].as_str(), Some("gauge" | "counter")));
        for (k, v) in props {
            let v = v.as_str().unwrap();
            assert!(k.chars().count() <= 50 && v.chars().count() <= 150 && !v.is_empty());
            assert!(!v.contains(['.', '=', ' ']), "{k}={v}");
        }
        assert_eq!(obj["tags"], serde_json::json!({}));
        assert_eq!(obj["timestamp"].as_i64(), Some(bucket_start));
        assert!(obj["value"].as_f64().unwrap().is_finite());
    }
    points
}

#[test]
fn a_closed_bucket_becomes_one_valid_anodot_file_per_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = Engine::new(EngineOptions {
        bucket: Duration::from_secs(60),
        monitor: MonitorConfig::default(),
        output_dir: Some(dir.path().to_path_buf()),
        categorical_features: BTreeMap::new(),
        started_at: UNIX_EPOCH,
    })
    .unwrap();
    for model in ["iris", "credit.v2"] {
        engine.observe(&Observation {
            stream: StreamKey { model: model.into(), version: Some(1), signature: "serving_default".into() },
            method: InferenceMethod::Predict,
            event_time: UNIX_EPOCH + Duration::from_secs(T0 as u64 + 5),
            request_id: "r".into(),
            rows: 2,
            features: vec![FeatureColumn {
                name: "petal length".into(),
                values: FeatureValues::Numeric { values: vec![1.5, f64::NAN], integer: false },
            }],
            probabilities: Some(Probabilities {
                classes: 2,
                values: vec![0.1, 0.9, 0.7, 0.3],
                class_names: Some(vec!["a.b".into(), "c=d".into()]),
                threshold: None,
            }),
            regression: None,
            row_ids: None,
            upstream_latency: Duration::from_millis(1),
        });
    }
    let sink = FileSink::new(dir.path());
    let closed = engine.flush_all();
    assert_eq!(closed.len(), 2);
    for bucket in &closed {
        sink.write(&bucket.model, bucket.start, &bucket.points).unwrap();
    }
    let start = T0 - T0 % 60;
    for model in ["iris", "credit.v2"] {
        let path = dir.path().join(format!("anodot/{model}/20231114T221300Z.json"));
        let points = assert_valid_anodot(&path, start);
        assert!(points.iter().any(|p| p["properties"]["class_name"] == "a_b"));
        assert!(points.iter().any(|p| p["properties"]["feat_name"] == "petal_length"));
    }
}

#[test]
fn later_points_are_merged_after_the_existing_ones() {
    let dir = tempfile::tempdir().unwrap();
    let sink = FileSink::new(dir.path());
    let path = sink.write("iris", T0, &[point("buffer_count", 3.0), point("late_dropped", 0.0)]).unwrap();
    sink.write("iris", T0, &[point("accuracy", 0.75)]).unwrap();
    let points = assert_valid_anodot(&path, T0);
    let names: Vec<&str> = points.iter().map(|p| p["properties"]["what"].as_str().unwrap()).collect();
    assert_eq!(names, ["buffer_count", "late_dropped", "accuracy"]);
}

#[test]
fn writes_are_atomic_and_leave_no_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let sink = FileSink::new(dir.path());
    let path = sink.path("iris", T0);
    sink.write("iris", T0, &[point("buffer_count", 1.0)]).unwrap();
    let reader = {
        let path = path.clone();
        std::thread::spawn(move || {
            // Every read during the writes sees a whole array, never a partial file.
            let mut lengths = Vec::new();
            for _ in 0..300 {
                let text = std::fs::read_to_string(&path).unwrap();
                let points: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
                lengths.push(points.len());
            }
            lengths
        })
    };
    for i in 0..100 {
        sink.write("iris", T0, &[point("buffer_count", f64::from(i))]).unwrap();
    }
    let lengths = reader.join().unwrap();
    assert!(lengths.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(assert_valid_anodot(&path, T0).len(), 101);
    let names: Vec<String> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["20231114T221320Z.json"]);
}

#[test]
fn an_unreadable_existing_file_is_kept_aside_not_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let sink = FileSink::new(dir.path());
    let path = sink.path("iris", T0);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, b"{half a fi").unwrap();
    sink.write("iris", T0, &[point("buffer_count", 2.0)]).unwrap();
    assert_eq!(assert_valid_anodot(&path, T0).len(), 1);
    let kept = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("unreadable"))
        .unwrap();
    assert_eq!(std::fs::read(kept).unwrap(), b"{half a fi");
}
