//! Prometheus view of the model metrics: the points of the last closed bucket of each
//! model, exposed as gauges `model_<what>` (`mltap_model_<what>` in the app's
//! registry, whose prefix is `mltap`) on `/metrics` by a prometheus-client `Collector`.
//!
//! The metric catalogue (`catalog`) decides what is shown: a metric's family,
//! or that it is not exposed (metrics with an unbounded dimension such as `category`
//! are left to the Anodot files), and each dimension's label (`class_name` → `class`,
//! `feat_name` → `feature`, ...). Label cardinality is bounded: the global
//! pseudo-model's points are left to the capture counters (the worker does not hand
//! them here), and a model's series are
//! replaced (not accumulated) at each bucket, with a hard cap on the total. This sink
//! never decides what a metric means.

use crate::catalog::{self, MetricDef};
use crate::sinks::Point;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// Most series exposed in total; further points of a bucket are not exposed (and
/// counted in `mltap_model_series_dropped`).
pub const MAX_SERIES: usize = 20_000;

type Labels = Vec<(&'static str, String)>;

/// The values of one metric's family.
#[derive(Debug)]
struct Family {
    /// The metric, for the family's help text.
    metric: &'static MetricDef,
    /// Each series' labels and value.
    series: Vec<(Labels, f64)>,
}

/// One model's last closed bucket, ready to encode.
#[derive(Debug, Default)]
struct ModelSeries {
    /// Bucket start, epoch seconds.
    start: i64,
    /// Per Prometheus family name, its values.
    metrics: BTreeMap<&'static str, Family>,
    /// Series in `metrics`.
    len: usize,
}

#[derive(Debug, Default)]
struct State {
    models: BTreeMap<String, ModelSeries>,
    /// Points not exposed because of `MAX_SERIES`, over the whole run.
    dropped: u64,
}

/// The model gauges; cheap to clone, all clones share the same state.
#[derive(Debug, Clone, Default)]
pub struct ModelGauges {
    state: Arc<Mutex<State>>,
}

impl ModelGauges {
    pub fn new() -> Self {
        ModelGauges::default()
    }

    /// Registers the collector; `/metrics` then shows the gauges.
    pub fn register(&self, registry: &mut Registry) {
        registry.register_collector(Box::new(self.clone()));
    }

    /// Shows the points of a model's closed bucket (starting at `start`): replaces the
    /// model's series when the bucket is newer, adds to them when it is the same bucket
    /// (points merged later), ignores older.
    pub fn update(&self, model: &str, start: i64, points: &[Point]) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let others: usize = state.models.iter().filter(|(m, _)| **m != model).map(|(_, s)| s.len).sum();
        let current = state.models.entry(model.to_string()).or_default();
        if start < current.start {
            return;
        }
        if start > current.start {
            *current = ModelSeries { start, ..ModelSeries::default() };
        }
        let mut dropped = 0;
        for point in points {
            let Some((metric, family)) = point.metric().and_then(|m| Some((m, m.prometheus?))) else {
                continue;
            };
            if others + current.len >= MAX_SERIES {
                dropped += 1;
                continue;
            }
            let labels: Labels = metric
                .all_dims()
                .filter_map(|dim| Some((dim.prometheus_label()?, point.dim(dim)?.to_string())))
                .collect();
            current
                .metrics
                .entry(family)
                .or_insert_with(|| Family { metric, series: Vec::new() })
                .series
                .push((labels, point.value));
            current.len += 1;
        }
        state.dropped += dropped;
    }

    /// The exposed value of one series of metric `what`, for tests and the dashboard.
    pub fn value(&self, what: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let family = catalog::find(what).and_then(|m: &MetricDef| m.prometheus)?;
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.models.values().filter_map(|m| m.metrics.get(family)).flat_map(|f| &f.series).find_map(|(l, v)| {
            let matches = labels.iter().all(|(k, want)| l.iter().any(|(lk, lv)| lk == k && lv == want));
            matches.then_some(*v)
        })
    }
}

impl Collector for ModelGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut by_family: BTreeMap<&str, Vec<&Family>> = BTreeMap::new();
        for series in state.models.values() {
            for (name, family) in &series.metrics {
                by_family.entry(name).or_default().push(family);
            }
        }
        for (family, of_models) in by_family {
            let Some(metric) = of_models.first().map(|f| f.metric) else { continue };
            let values = of_models.iter().flat_map(|f| &f.series).map(|(l, v)| (l, *v));
            let help = format!("{}: {}, of the last closed bucket (see docs/metrics.md)", metric.name, metric.help);
            let mut metric =
                encoder.encode_descriptor(family, &help, None, prometheus_client::metrics::MetricType::Gauge)?;
            for (labels, value) in values {
                let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                ConstGauge::new(value).encode(metric.encode_family(&labels)?)?;
            }
        }
        let starts: Vec<(&String, i64)> = state.models.iter().map(|(m, s)| (m, s.start)).collect();
        if !starts.is_empty() {
            let mut metric = encoder.encode_descriptor(
                "model_bucket_start_seconds",
                "Start of the last closed bucket shown, epoch seconds",
                None,
                prometheus_client::metrics::MetricType::Gauge,
            )?;
            for (model, start) in starts {
                ConstGauge::new(start).encode(metric.encode_family(&[("model", model.as_str())])?)?;
            }
        }
        let metric = encoder.encode_descriptor(
            "model_series_dropped",
            "Model metric points not exposed because of the series cap",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        ConstGauge::new(state.dropped as i64).encode(metric)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::TargetType;

    fn bucket(start: i64, value: f64) -> Vec<Point> {
        vec![
            Point::builder("feature_value", TargetType::Gauge, start, value)
                .with("model", "iris")
                .with("version", "2")
                .with("signature", "serving_default")
                .with("feat_name", "petal.length")
                .with("stat", "mean")
                .finish()
                .unwrap(),
            Point::builder("feature_category_freq", TargetType::Gauge, start, 0.5)
                .with("model", "iris")
                .with("feat_name", "city")
                .with("category", "paris")
                .finish()
                .unwrap(),
        ]
    }

    fn scrape(gauges: &ModelGauges) -> String {
        let mut registry = Registry::with_prefix("mltap");
        gauges.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    }

    #[test]
    fn the_last_closed_bucket_is_exposed_with_bounded_labels() {
        let gauges = ModelGauges::new();
        gauges.update("iris", 100, &bucket(100, 1.5));
        gauges.update("iris", 160, &bucket(160, 2.5));
        gauges.update("iris", 40, &bucket(40, 9.0));
        let text = scrape(&gauges);
        assert!(
            text.contains(
                r#"mltap_model_feature_value{model="iris",version="2",signature="serving_default",feature="petal_length",stat="mean"} 2.5"#
            ),
            "{text}"
        );
        assert!(!text.contains("category"), "{text}");
        assert!(text.contains(r#"mltap_model_bucket_start_seconds{model="iris"} 160"#), "{text}");
        assert_eq!(gauges.value("feature_value", &[("stat", "mean")]), Some(2.5));
    }

    #[test]
    fn families_and_labels_come_from_the_catalogue() {
        use crate::catalog::{Dimension, ScopeValues, CONFUSION_COUNT, REQUEST_COUNT};
        let scope = ScopeValues { model: Some("iris"), ..ScopeValues::default() };
        let sample =
            |status| REQUEST_COUNT.sample(1.0).with(Dimension::Method, "predict").with(Dimension::Status, status);
        let points = vec![
            Point::from_sample(&sample("200"), &scope, 60).unwrap(),
            Point::from_sample(&sample("404"), &scope, 60).unwrap(),
            Point::from_sample(
                &CONFUSION_COUNT.sample(2.0).with(Dimension::ActualClass, "a").with(Dimension::ClassName, "b"),
                &scope,
                60,
            )
            .unwrap(),
            Point::builder("not_declared", TargetType::Gauge, 60, 1.0).with("model", "iris").finish().unwrap(),
        ];
        let gauges = ModelGauges::new();
        gauges.update("iris", 60, &points);
        let text = scrape(&gauges);
        assert!(text.contains(r#"mltap_model_request_count{model="iris",method="predict",status="404"} 1"#), "{text}");
        assert!(text.contains("# HELP mltap_model_request_count request_count: exchanges"), "{text}");
        assert!(!text.contains("confusion") && !text.contains("not_declared"), "{text}");
    }
}
