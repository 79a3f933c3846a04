//! The Anodot 3.0 view of mltap's points: two stream schemas per model, one for the
//! metrics of the traffic (complete when the bucket closes) and one for the metrics of
//! joined labels (complete only after the label horizon), so that the traffic stream's
//! watermark is not held back an hour by labels that may still come. A 2.0 point
//! becomes a 3.0 sample of its schema: its `what` is the measure, its other properties
//! (but `target_type` and `ver`) the dimensions.
//!
//! This module only maps; it never talks to Anodot.

use serde_json::{json, Map, Value};
use std::collections::BTreeSet;

use super::{Point, TargetType};

/// Which of a model's two streams a point belongs to. The values are the bit flags the
/// cursor keeps for watermarks already posted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stream {
    Traffic = 1,
    Labels = 2,
}

impl Stream {
    pub const ALL: [Stream; 2] = [Stream::Traffic, Stream::Labels];

    pub fn bit(self) -> u8 {
        self as u8
    }

    /// The schema name for a model.
    pub fn schema_name(self, prefix: &str, model: &str) -> String {
        match self {
            Stream::Traffic => format!("{prefix}{model}"),
            Stream::Labels => format!("{prefix}{model}_labels"),
        }
    }
}

/// Metrics computed from joined labels (DESIGN.md): they are appended to a bucket's
/// file up to the label horizon after it closed.
pub const LABEL_METRICS: &[(&str, TargetType)] = &[
    ("accuracy", TargetType::Gauge),
    ("precision", TargetType::Gauge),
    ("recall", TargetType::Gauge),
    ("f1", TargetType::Gauge),
    ("macro_f1", TargetType::Gauge),
    ("weighted_f1", TargetType::Gauge),
    ("log_loss", TargetType::Gauge),
    ("brier_score", TargetType::Gauge),
    ("roc_auc", TargetType::Gauge),
    ("confusion_count", TargetType::Counter),
    ("labeled_fraction", TargetType::Gauge),
];

/// Metrics of the traffic itself (DESIGN.md), complete when the bucket closes.
pub const TRAFFIC_METRICS: &[(&str, TargetType)] = &[
    ("prediction_count", TargetType::Counter),
    ("prediction_freq", TargetType::Gauge),
    ("buffer_count", TargetType::Counter),
    ("max_prediction_proba", TargetType::Gauge),
    ("spread12_prediction_proba", TargetType::Gauge),
    ("feature_value", TargetType::Gauge),
    ("request_count", TargetType::Counter),
    ("upstream_latency_ms", TargetType::Gauge),
    ("class_proba_mean", TargetType::Gauge),
    ("prediction_entropy", TargetType::Gauge),
    ("feature_missing_count", TargetType::Counter),
    ("feature_distinct_estimate", TargetType::Gauge),
    ("feature_category_freq", TargetType::Gauge),
    ("feature_drift", TargetType::Gauge),
    ("prediction_drift", TargetType::Gauge),
    ("estimated_accuracy", TargetType::Gauge),
    ("estimated_f1", TargetType::Gauge),
    ("capture_dropped", TargetType::Counter),
    ("decode_errors", TargetType::Counter),
];

/// Dimensions mltap's points carry (DESIGN.md).
pub const DIMENSIONS: &[&str] = &[
    "model",
    "version",
    "signature",
    "class_name",
    "actual_class",
    "feat_name",
    "stat",
    "method",
    "status",
    "category",
];

/// Properties that are not dimensions in 3.0: the measure name, its aggregation
/// (a property of the measure in the schema) and the 2.0 metric version.
const NOT_DIMENSIONS: &[&str] = &["what", "target_type", "ver"];

/// The stream a metric belongs to.
pub fn stream_of(what: &str) -> Stream {
    if LABEL_METRICS.iter().any(|(name, _)| *name == what) {
        Stream::Labels
    } else {
        Stream::Traffic
    }
}

/// The schema of one model's stream: the catalogue's measures and dimensions, plus any
/// seen in `points` (metrics added after this catalogue). Missing dimensions are
/// ignored, since each measure uses only some of them.
pub fn schema(name: &str, stream: Stream, points: &[Point]) -> Value {
    let catalogue = match stream {
        Stream::Traffic => TRAFFIC_METRICS,
        Stream::Labels => LABEL_METRICS,
    };
    let mut measures: Vec<(String, &'static str)> =
        catalogue.iter().map(|(n, t)| (n.to_string(), aggregation(*t))).collect();
    let mut dimensions: BTreeSet<String> = DIMENSIONS.iter().map(|d| d.to_string()).collect();
    for p in points.iter().filter(|p| stream_of(p.what()) == stream) {
        if !measures.iter().any(|(n, _)| n == p.what()) {
            let agg = if p.property("target_type") == Some("counter") { "sum" } else { "average" };
            measures.push((p.what().to_string(), agg));
        }
        for (k, _) in p.properties() {
            if !NOT_DIMENSIONS.contains(&k.as_str()) {
                dimensions.insert(k.clone());
            }
        }
    }
    let measurements: Map<String, Value> =
        measures.into_iter().map(|(n, agg)| (n, json!({ "aggregation": agg, "countBy": "none" }))).collect();
    json!({
        "version": "1",
        "name": name,
        "dimensions": dimensions.into_iter().collect::<Vec<_>>(),
        "measurements": measurements,
        "missingDimPolicy": { "action": "ignore" },
    })
}

fn aggregation(t: TargetType) -> &'static str {
    match t {
        TargetType::Counter => "sum",
        TargetType::Gauge => "average",
    }
}

/// One 3.0 sample of `schema_id` from a 2.0 point.
pub fn sample(schema_id: &str, point: &Point) -> Value {
    let dimensions: Map<String, Value> = point
        .properties()
        .iter()
        .filter(|(k, _)| !NOT_DIMENSIONS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    json!({
        "schemaId": schema_id,
        "timestamp": point.timestamp,
        "dimensions": dimensions,
        "measurements": { point.what(): point.value },
        "tags": {},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(what: &str, t: TargetType) -> Point {
        Point::builder(what, t, 60, 2.5).with("model", "iris").with("class_name", "class_0").finish().unwrap()
    }

    #[test]
    fn label_metrics_go_to_their_own_stream() {
        assert_eq!(stream_of("accuracy"), Stream::Labels);
        assert_eq!(stream_of("confusion_count"), Stream::Labels);
        assert_eq!(stream_of("feature_value"), Stream::Traffic);
        assert_eq!(stream_of("something_new"), Stream::Traffic);
    }

    #[test]
    fn samples_carry_the_measure_and_the_dimensions_but_not_ver() {
        let s = sample("sid", &point("prediction_count", TargetType::Counter));
        assert_eq!(
            s,
            json!({"schemaId": "sid", "timestamp": 60, "dimensions": {"model": "iris", "class_name": "class_0"},
                   "measurements": {"prediction_count": 2.5}, "tags": {}})
        );
    }

    #[test]
    fn schemas_add_measures_and_dimensions_seen_in_points() {
        let p = Point::builder("brand_new", TargetType::Counter, 0, 1.0).with("shard", "a").finish().unwrap();
        let s = schema("mltap_iris", Stream::Traffic, &[p]);
        assert_eq!(s["measurements"]["brand_new"]["aggregation"], "sum");
        assert_eq!(s["measurements"]["feature_value"]["aggregation"], "average");
        assert!(s["dimensions"].as_array().unwrap().contains(&json!("shard")));
        assert!(s["measurements"].get("accuracy").is_none());
    }
}
