//! Prometheus view of the model metrics, on `/metrics` by a prometheus-client
//! `Collector` (names below without the app registry's `mltap_` prefix):
//!
//! - **counters**: a catalogue metric of kind `Counter` (rows, predictions per class,
//!   requests, decode errors, labels, ...) is exported as a cumulative counter, its
//!   family ending in `_total`: each closed bucket's counts (and each settled bucket's
//!   label counts) are added once, so `rate()` and `increase()` work. Counts of the
//!   global pseudo-model (payloads whose model could not be read, models beyond
//!   `max_streams`) carry no `model` label, so `decode_errors_total` covers every
//!   payload.
//! - **traffic gauges**: the other metrics of the traffic stream show the last closed
//!   bucket of each model, with its start in `model_bucket_start_seconds`.
//! - **label gauges**: accuracy, F1, log loss, ... show the latest bucket whose labels
//!   settled (label points arrive for buckets older than the last closed one), with
//!   its start in `model_label_bucket_start_seconds`.
//! - **latency**: `model_upstream_latency_seconds{model}`, a histogram observed per
//!   exchange by the worker.
//!
//! The metric catalogue (`catalog`) decides what is shown: a metric's family, or that
//! it is not exposed (metrics with an unbounded dimension such as `category` are left
//! to the Anodot files), and each dimension's label (`class_name` → `class`,
//! `feat_name` → `feature`, ...). Cardinality is bounded: gauges are replaced (not
//! accumulated) at each bucket, and gauges plus counters share a hard cap on series.
//! This sink never decides what a metric means.

use crate::catalog::{self, MetricDef, Stream};
use crate::sinks::Point;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Most series exposed in total (gauges and counters); further points are not exposed
/// (and counted in `mltap_model_series_dropped_total`).
pub const MAX_SERIES: usize = 20_000;

/// Most models with a latency histogram of their own; exchanges of further models are
/// observed without a `model` label.
pub const MAX_LATENCY_MODELS: usize = 1_000;

type Labels = Vec<(&'static str, String)>;

/// The values of one metric's family.
#[derive(Debug)]
struct GaugeFamily {
    /// The metric, for the family's help text.
    metric: &'static MetricDef,
    /// Each series' labels and value.
    series: Vec<(Labels, f64)>,
}

/// One model's latest bucket of one stream, ready to encode.
#[derive(Debug, Default)]
struct Snapshot {
    /// Bucket start, epoch seconds.
    start: i64,
    /// Per Prometheus family name, its values.
    metrics: BTreeMap<&'static str, GaugeFamily>,
    /// Series in `metrics`.
    len: usize,
}

#[derive(Debug, Default)]
struct State {
    /// Per model, the traffic gauges of its last closed bucket.
    traffic: BTreeMap<String, Snapshot>,
    /// Per model, the label gauges of its latest settled bucket.
    labels: BTreeMap<String, Snapshot>,
    /// Cumulative counters: per family, per label set, the total.
    counters: BTreeMap<&'static str, (&'static MetricDef, BTreeMap<Labels, f64>)>,
    /// Series in `counters`.
    counter_series: usize,
    /// Points not exposed because of `MAX_SERIES`, over the whole run.
    dropped: u64,
}

impl State {
    fn series(&self) -> usize {
        self.traffic.values().chain(self.labels.values()).map(|s| s.len).sum::<usize>() + self.counter_series
    }
}

/// Label of `model_upstream_latency_seconds`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    /// Absent (empty) for exchanges whose model could not be read or beyond the cap.
    model: String,
}

/// The model metrics; cheap to clone, all clones share the same state.
#[derive(Debug, Clone)]
pub struct ModelGauges {
    state: Arc<Mutex<State>>,
    latency: Family<ModelLabel, Histogram>,
    latency_models: Arc<Mutex<BTreeSet<String>>>,
}

impl Default for ModelGauges {
    fn default() -> Self {
        ModelGauges {
            state: Arc::default(),
            // 0.25 ms to about 16 s, doubling.
            latency: Family::new_with_constructor(
                (|| Histogram::new(exponential_buckets(0.000_25, 2.0, 17))) as fn() -> Histogram,
            ),
            latency_models: Arc::default(),
        }
    }
}

impl ModelGauges {
    pub fn new() -> Self {
        ModelGauges::default()
    }

    /// Registers the collector and the latency histogram; `/metrics` then shows them.
    pub fn register(&self, registry: &mut Registry) {
        registry.register_collector(Box::new(self.clone()));
        registry.register(
            "model_upstream_latency_seconds",
            "From sending a model's inference request to TF Serving to the end of its response",
            self.latency.clone(),
        );
    }

    /// Observes one exchange's upstream latency under its model (None: not known).
    pub fn observe_latency(&self, model: Option<&str>, latency: Duration) {
        let model = match model {
            Some(model) => {
                let mut known = self.latency_models.lock().unwrap_or_else(|p| p.into_inner());
                if known.contains(model) || (known.len() < MAX_LATENCY_MODELS && known.insert(model.to_string())) {
                    model.to_string()
                } else {
                    String::new()
                }
            }
            None => String::new(),
        };
        self.latency.get_or_create(&ModelLabel { model }).observe(latency.as_secs_f64());
    }

    /// Shows the points of a model's bucket (starting at `start`): a closed bucket's
    /// traffic points, or a bucket's label points once its labels settled. Counters
    /// add to their totals; gauges replace the model's series of that stream when the
    /// bucket is newer, add to them when it is the same bucket (points merged later),
    /// and older buckets' gauges are ignored.
    pub fn update(&self, model: &str, start: i64, points: &[Point]) {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let state = &mut *guard;
        let mut series = state.series();
        let mut dropped = 0;
        for point in points {
            let Some((metric, family)) = point.metric().and_then(|m| Some((m, m.prometheus?))) else {
                continue;
            };
            let labels: Labels = metric
                .all_dims()
                .filter_map(|dim| Some((dim.prometheus_label()?, point.dim(dim)?.to_string())))
                .collect();
            if metric.kind.is_counter() {
                let (_, totals) = state.counters.entry(family).or_insert_with(|| (metric, BTreeMap::new()));
                match totals.get_mut(&labels) {
                    Some(total) => *total += point.value,
                    None if series < MAX_SERIES => {
                        totals.insert(labels, point.value);
                        state.counter_series += 1;
                        series += 1;
                    }
                    None => dropped += 1,
                }
                continue;
            }
            let snapshots = match metric.stream {
                Stream::Traffic => &mut state.traffic,
                Stream::Labels => &mut state.labels,
            };
            let current = snapshots.entry(model.to_string()).or_default();
            if start < current.start {
                continue;
            }
            if start > current.start {
                series -= current.len;
                *current = Snapshot { start, ..Snapshot::default() };
            }
            if series >= MAX_SERIES {
                dropped += 1;
                continue;
            }
            current
                .metrics
                .entry(family)
                .or_insert_with(|| GaugeFamily { metric, series: Vec::new() })
                .series
                .push((labels, point.value));
            current.len += 1;
            series += 1;
        }
        state.dropped += dropped;
    }

    /// The exposed value of one series of metric `what` (a gauge's value, a counter's
    /// total), for tests and the dashboard.
    pub fn value(&self, what: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let metric = catalog::find(what)?;
        let family = metric.prometheus?;
        let matches = |l: &Labels| labels.iter().all(|(k, want)| l.iter().any(|(lk, lv)| lk == k && lv == want));
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if metric.kind.is_counter() {
            let (_, totals) = state.counters.get(family)?;
            return totals.iter().find_map(|(l, v)| matches(l).then_some(*v));
        }
        state
            .traffic
            .values()
            .chain(state.labels.values())
            .filter_map(|m| m.metrics.get(family))
            .flat_map(|f| &f.series)
            .find_map(|(l, v)| matches(l).then_some(*v))
    }
}

/// Encodes the gauge families of snapshots, each family once over every model.
fn encode_snapshots(
    encoder: &mut DescriptorEncoder,
    snapshots: &BTreeMap<String, Snapshot>,
    of_what: &str,
) -> Result<(), std::fmt::Error> {
    let mut by_family: BTreeMap<&str, Vec<&GaugeFamily>> = BTreeMap::new();
    for snapshot in snapshots.values() {
        for (name, family) in &snapshot.metrics {
            by_family.entry(name).or_default().push(family);
        }
    }
    for (family, of_models) in by_family {
        let Some(metric) = of_models.first().map(|f| f.metric) else { continue };
        let help = format!("{}: {}, of {of_what} (see docs/metrics.md)", metric.name, metric.help);
        let mut encoder = encoder.encode_descriptor(family, &help, None, MetricType::Gauge)?;
        for (labels, value) in of_models.iter().flat_map(|f| &f.series) {
            let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
            ConstGauge::new(*value).encode(encoder.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

/// Encodes a gauge of each model's bucket start.
fn encode_starts(
    encoder: &mut DescriptorEncoder,
    snapshots: &BTreeMap<String, Snapshot>,
    name: &str,
    help: &str,
) -> Result<(), std::fmt::Error> {
    if snapshots.is_empty() {
        return Ok(());
    }
    let mut encoder = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (model, snapshot) in snapshots {
        ConstGauge::new(snapshot.start).encode(encoder.encode_family(&[("model", model.as_str())])?)?;
    }
    Ok(())
}

impl Collector for ModelGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        for (family, (metric, totals)) in &state.counters {
            // prometheus-client appends `_total` to a counter's samples.
            let name = family.strip_suffix("_total").unwrap_or(family);
            let help = format!("{}: {}, cumulative (see docs/metrics.md)", metric.name, metric.help);
            let mut encoder = encoder.encode_descriptor(name, &help, None, MetricType::Counter)?;
            for (labels, total) in totals {
                let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                ConstCounter::new(*total).encode(encoder.encode_family(&labels)?)?;
            }
        }
        encode_snapshots(&mut encoder, &state.traffic, "the last closed bucket")?;
        encode_snapshots(&mut encoder, &state.labels, "the latest bucket whose labels settled")?;
        encode_starts(
            &mut encoder,
            &state.traffic,
            "model_bucket_start_seconds",
            "Start of the last closed bucket shown, epoch seconds",
        )?;
        encode_starts(
            &mut encoder,
            &state.labels,
            "model_label_bucket_start_seconds",
            "Start of the latest bucket whose label metrics are shown, epoch seconds",
        )?;
        let counter = ConstCounter::new(state.dropped);
        counter.encode(encoder.encode_descriptor(
            "model_series_dropped",
            "Model metric points not exposed because of the series cap",
            None,
            MetricType::Counter,
        )?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{Dimension, ScopeValues};
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
    fn counts_accumulate_into_total_counters_for_every_model() {
        use crate::catalog::{CONFUSION_COUNT, DECODE_ERRORS, REQUEST_COUNT};
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
        gauges.update("iris", 120, &points[..1]);
        // The global pseudo-model's points have no model.
        let unknown = ScopeValues::default();
        let garbage = DECODE_ERRORS.sample(3.0).with(Dimension::Reason, "not_json");
        gauges.update("__mltap__", 60, &[Point::from_sample(&garbage, &unknown, 60).unwrap()]);
        let text = scrape(&gauges);
        assert!(text.contains("# TYPE mltap_model_requests counter"), "{text}");
        assert!(text.contains(r#"mltap_model_requests_total{model="iris",method="predict",status="200"} 2"#), "{text}");
        assert!(text.contains(r#"mltap_model_requests_total{model="iris",method="predict",status="404"} 1"#), "{text}");
        assert!(text.contains(r#"mltap_decode_errors_total{reason="not_json"} 3"#), "{text}");
        assert!(text.contains("# HELP mltap_model_requests request_count: exchanges"), "{text}");
        assert!(!text.contains("confusion") && !text.contains("not_declared"), "{text}");
        assert_eq!(gauges.value("request_count", &[("status", "200")]), Some(2.0));
    }

    #[test]
    fn label_gauges_show_the_latest_settled_bucket_apart_from_the_traffic() {
        use crate::catalog::ACCURACY;
        let scope = ScopeValues { model: Some("iris"), ..ScopeValues::default() };
        let gauges = ModelGauges::new();
        gauges.update("iris", 600, &bucket(600, 1.0));
        // Labels settle for buckets older than the last closed one.
        gauges.update("iris", 120, &[Point::from_sample(&ACCURACY.sample(0.75), &scope, 120).unwrap()]);
        gauges.update("iris", 60, &[Point::from_sample(&ACCURACY.sample(0.25), &scope, 60).unwrap()]);
        let text = scrape(&gauges);
        assert!(text.contains(r#"mltap_model_accuracy{model="iris"} 0.75"#), "{text}");
        assert!(text.contains(r#"mltap_model_label_bucket_start_seconds{model="iris"} 120"#), "{text}");
        assert!(text.contains(r#"mltap_model_bucket_start_seconds{model="iris"} 600"#), "{text}");
        assert!(text.contains(r#"mltap_model_feature_value{"#), "{text}");
    }

    #[test]
    fn latency_is_a_histogram_per_model_with_bounded_models() {
        let gauges = ModelGauges::new();
        gauges.observe_latency(Some("iris"), Duration::from_millis(3));
        gauges.observe_latency(None, Duration::from_millis(3));
        let text = scrape(&gauges);
        assert!(text.contains("# TYPE mltap_model_upstream_latency_seconds histogram"), "{text}");
        assert!(text.contains(r#"mltap_model_upstream_latency_seconds_count{model="iris"} 1"#), "{text}");
        assert!(text.contains(r#"mltap_model_upstream_latency_seconds_bucket{le="0.004",model="iris"} 1"#), "{text}");
        for i in 0..MAX_LATENCY_MODELS + 5 {
            gauges.observe_latency(Some(&format!("m{i}")), Duration::from_millis(1));
        }
        assert_eq!(gauges.latency_models.lock().unwrap().len(), MAX_LATENCY_MODELS);
    }
}
