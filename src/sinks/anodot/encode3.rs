//! The Anodot 3.0 view of mltap's points: two stream schemas per model, one for the
//! metrics of the traffic (complete when the bucket closes) and one for the metrics of
//! joined labels (complete only after the label horizon), so that the traffic stream's
//! watermark is not held back an hour by labels that may still come. A 2.0 point
//! becomes a 3.0 sample of its schema: its `what` is the measure, its other properties
//! (but `target_type` and `ver`) the dimensions.
//!
//! Which stream a metric belongs to, and the measures and dimensions of each schema,
//! come from the metric catalogue (`catalog`), so a schema covers every
//! metric mltap emits by construction. This module only maps; it never talks to Anodot.

use serde_json::{json, Map, Value};
use std::collections::BTreeSet;

use super::{Point, TargetType};
use crate::catalog;
pub use crate::catalog::Stream;

impl Stream {
    /// The bit flag the delivery cursor keeps for a watermark already posted.
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

/// The stream a metric belongs to, as the catalogue declares it; a metric it does not
/// declare (a file of another version) goes with the traffic.
pub fn stream_of(what: &str) -> Stream {
    catalog::find(what).map_or(Stream::Traffic, |m| m.stream)
}

/// The schema of one model's stream: every measure the catalogue puts in the stream,
/// with every dimension those measures carry, plus measures and dimensions of points
/// of metrics the catalogue does not declare (files of another version). Missing
/// dimensions are ignored, since each measure uses only some of them.
pub fn schema(name: &str, stream: Stream, points: &[Point]) -> Value {
    let mut measures: Vec<(String, &'static str)> = Vec::new();
    let mut dimensions: BTreeSet<String> = BTreeSet::new();
    for metric in catalog::of_stream(stream) {
        measures.push((metric.name.to_string(), aggregation(TargetType::of(metric.kind))));
        dimensions.extend(metric.all_dims().map(|d| d.key().to_string()));
    }
    for p in points.iter().filter(|p| p.metric().is_none() && stream_of(p.what()) == stream) {
        if !measures.iter().any(|(n, _)| n == p.what()) {
            let agg = if p.property("target_type") == Some("counter") { "sum" } else { "average" };
            measures.push((p.what().to_string(), agg));
        }
        dimensions.extend(p.dimensions().map(|(_, key, _)| key.to_string()));
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
    let dimensions: Map<String, Value> =
        point.dimensions().map(|(_, k, v)| (k.to_string(), Value::String(v.to_string()))).collect();
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
        assert_eq!(stream_of("label_count"), Stream::Labels);
        assert_eq!(stream_of("label_late_count"), Stream::Labels);
        assert_eq!(stream_of("label_unmatched_count"), Stream::Labels);
    }

    #[test]
    fn schemas_hold_every_declared_metric_and_dimension_of_their_stream() {
        for stream in Stream::ALL {
            let s = schema("x", stream, &[]);
            let dimensions = s["dimensions"].as_array().unwrap();
            for metric in catalog::ALL {
                assert_eq!(s["measurements"].get(metric.name).is_some(), metric.stream == stream, "{}", metric.name);
                if metric.stream == stream {
                    for dim in metric.all_dims() {
                        assert!(dimensions.contains(&json!(dim.key())), "{} of {}", dim.key(), metric.name);
                    }
                }
            }
        }
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
