//! Realistic synthetic Anodot points for the dashboard's tests and load benchmark, and
//! a loopback HTTP server that serves admin routes as the admin server does.
//!
//! The points follow docs/architecture.md's metric names and dimensions: request and row counts,
//! predicted class counts and shares, top-1 probability statistics, per-feature value
//! statistics and drift, estimated accuracy, label accuracy for older buckets, and
//! capture health counters. Inputs drift after `drift_from`, so drift scores rise and
//! the heat strip has something to show.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mltap::admin::{AdminRequest, AdminRoute};
use mltap::sinks::{Point, TargetType};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

/// Statistics of a numeric feature, as the engine emits them.
pub const FEATURE_STATS: [&str; 12] =
    ["mean", "median", "std", "range", "q25", "q50", "q75", "iqr", "min", "max", "q01", "q99"];
/// Drift methods, as the engine emits them.
pub const DRIFT_METHODS: [&str; 3] = ["psi", "js", "linf"];

/// A model whose traffic is synthesized.
#[derive(Debug, Clone)]
pub struct SyntheticModel {
    pub name: String,
    pub version: String,
    pub features: Vec<String>,
    pub classes: Vec<String>,
    /// Bucket index from which inputs drift.
    pub drift_from: u64,
    /// A regression model: prediction statistics and errors instead of classes.
    pub regression: bool,
}

/// A deterministic noise source, so runs are reproducible without a seed file.
fn noise(a: u64, b: u64, c: u64) -> f64 {
    let mut x =
        a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F) ^ c.wrapping_add(0x1656_67B1);
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^= x >> 33;
    (x >> 11) as f64 / (1u64 << 53) as f64
}

impl SyntheticModel {
    pub fn new(name: &str, features: &[&str], classes: &[&str], drift_from: u64) -> SyntheticModel {
        SyntheticModel {
            name: name.to_string(),
            version: "1".to_string(),
            features: features.iter().map(|s| s.to_string()).collect(),
            classes: classes.iter().map(|s| s.to_string()).collect(),
            drift_from,
            regression: false,
        }
    }

    /// A regression model (minutes of a delivery, say) with these features.
    pub fn regression(name: &str, features: &[&str], drift_from: u64) -> SyntheticModel {
        SyntheticModel { regression: true, ..SyntheticModel::new(name, features, &[], drift_from) }
    }

    /// A model with `n` features named `f_000`... and `k` classes.
    pub fn wide(name: &str, n: usize, k: usize, drift_from: u64) -> SyntheticModel {
        let features: Vec<String> = (0..n).map(|i| format!("f_{i:03}")).collect();
        let classes: Vec<String> = (0..k).map(|i| format!("class_{i}")).collect();
        SyntheticModel {
            name: name.to_string(),
            version: "1".to_string(),
            features,
            classes,
            drift_from,
            regression: false,
        }
    }

    fn point(&self, what: &str, kind: TargetType, t: i64, value: f64, dims: &[(&str, &str)]) -> Point {
        let mut b = Point::builder(what, kind, t, value)
            .with("model", &self.name)
            .with("version", &self.version)
            .with("signature", "serving_default");
        for (k, v) in dims {
            b = b.with(k, v);
        }
        b.finish().expect("synthetic values are finite")
    }

    /// The points of the closed bucket number `index`, starting at `t`.
    pub fn bucket(&self, t: i64, index: u64) -> Vec<Point> {
        use TargetType::{Counter, Gauge};
        let drift = if index >= self.drift_from { ((index - self.drift_from) as f64 / 20.0).min(1.0) } else { 0.0 };
        let seed = self.name.len() as u64;
        let wave = (index as f64 / 30.0).sin();
        let rows = (200.0 + 60.0 * wave + 40.0 * noise(seed, index, 1)).round();
        let mut out = Vec::with_capacity(self.features.len() * 16 + 64);
        out.push(self.point("buffer_count", Counter, t, rows, &[]));
        out.push(self.point(
            "request_count",
            Counter,
            t,
            (rows / 4.0).round(),
            &[("method", "predict"), ("status", "200")],
        ));
        out.push(self.point(
            "request_count",
            Counter,
            t,
            (3.0 * noise(seed, index, 2)).round(),
            &[("method", "predict"), ("status", "400")],
        ));
        if self.regression {
            self.regression_outputs(&mut out, t, index, drift);
            return out;
        }
        // Class shares move with the drift: the first class loses to the last.
        let k = self.classes.len().max(1);
        let mut weights: Vec<f64> = (0..k).map(|c| 1.0 + 0.3 * noise(seed, index, 10 + c as u64)).collect();
        weights[0] *= 1.0 + 1.5 * (1.0 - drift);
        weights[k - 1] *= 1.0 + 1.5 * drift;
        let total: f64 = weights.iter().sum();
        for (c, class) in self.classes.iter().enumerate() {
            let share = weights[c] / total;
            out.push(self.point("prediction_count", Counter, t, (share * rows).round(), &[("class_name", class)]));
            out.push(self.point("prediction_freq", Gauge, t, share, &[("class_name", class)]));
        }
        let confidence = 0.85 - 0.2 * drift + 0.03 * noise(seed, index, 3);
        for (stat, offset) in [
            ("mean", 0.0),
            ("median", 0.02),
            ("q25", -0.12),
            ("q50", 0.02),
            ("q75", 0.08),
            ("q01", -0.4),
            ("q99", 0.14),
        ] {
            out.push(self.point(
                "max_prediction_proba",
                Gauge,
                t,
                (confidence + offset).clamp(0.0, 1.0),
                &[("stat", stat)],
            ));
        }
        for (i, feature) in self.features.iter().enumerate() {
            let shift = if i % 3 == 0 { 1.5 * drift } else { 0.0 };
            let center = 10.0 + i as f64 + shift + 0.2 * wave + 0.1 * noise(seed, index, 100 + i as u64);
            let spread = 1.0 + 0.1 * (i % 5) as f64;
            for stat in FEATURE_STATS {
                let v = match stat {
                    "mean" | "median" | "q50" => center,
                    "std" => spread,
                    "range" => 6.0 * spread,
                    "q25" => center - 0.67 * spread,
                    "q75" => center + 0.67 * spread,
                    "iqr" => 1.34 * spread,
                    "min" => center - 3.0 * spread,
                    "max" => center + 3.0 * spread,
                    "q01" => center - 2.33 * spread,
                    _ => center + 2.33 * spread,
                };
                out.push(self.point("feature_value", Gauge, t, v, &[("feat_name", feature), ("stat", stat)]));
            }
            let base = 0.01 + 0.02 * noise(seed, index, 200 + i as u64);
            let score = if i % 3 == 0 { base + 0.4 * drift } else { base };
            for (m, method) in DRIFT_METHODS.iter().enumerate() {
                let scale = [1.0, 0.5, 0.6][m];
                out.push(self.point(
                    "feature_drift",
                    Gauge,
                    t,
                    score * scale,
                    &[("feat_name", feature), ("method", method)],
                ));
            }
        }
        for method in DRIFT_METHODS {
            out.push(self.point("prediction_drift", Gauge, t, 0.02 + 0.3 * drift, &[("method", method)]));
        }
        out.push(self.point("estimated_accuracy", Gauge, t, confidence, &[]));
        out.push(self.point("decode_errors", Counter, t, if index % 23 == 7 { 1.0 } else { 0.0 }, &[]));
        out
    }

    /// A regression bucket's outputs: prediction statistics that rise with the drift,
    /// feature statistics and drift as a classifier's.
    fn regression_outputs(&self, out: &mut Vec<Point>, t: i64, index: u64, drift: f64) {
        use TargetType::Gauge;
        let seed = self.name.len() as u64;
        let center = 30.0 + 8.0 * drift + noise(seed, index, 5);
        for (stat, offset) in
            [("mean", 0.0), ("median", -0.5), ("q25", -4.0), ("q50", -0.5), ("q75", 4.0), ("std", 6.0)]
        {
            let value = if stat == "std" { offset } else { center + offset };
            out.push(self.point("prediction_value", Gauge, t, value, &[("stat", stat)]));
        }
        for (i, feature) in self.features.iter().enumerate() {
            let shift = if i % 2 == 0 { 1.5 * drift } else { 0.0 };
            let center = 5.0 + i as f64 + shift + 0.1 * noise(seed, index, 100 + i as u64);
            for stat in FEATURE_STATS {
                let v = match stat {
                    "q25" => center - 0.7,
                    "q75" => center + 0.7,
                    "std" | "iqr" => 1.0,
                    _ => center,
                };
                out.push(self.point("feature_value", Gauge, t, v, &[("feat_name", feature), ("stat", stat)]));
            }
            let score = 0.01 + if i % 2 == 0 { 0.4 * drift } else { 0.0 };
            for method in ["psi", "js"] {
                out.push(self.point("feature_drift", Gauge, t, score, &[("feat_name", feature), ("method", method)]));
            }
        }
        for method in ["psi", "js"] {
            out.push(self.point("prediction_drift", Gauge, t, 0.02 + 0.3 * drift, &[("method", method)]));
        }
    }

    /// Label metrics for the bucket number `index` starting at `t`, as they arrive
    /// later and are attributed to that (older) bucket.
    pub fn labels(&self, t: i64, index: u64) -> Vec<Point> {
        use TargetType::{Counter, Gauge};
        let drift = if index >= self.drift_from { ((index - self.drift_from) as f64 / 20.0).min(1.0) } else { 0.0 };
        if self.regression {
            let mae = 2.4 + 6.0 * drift + 0.2 * noise(self.name.len() as u64, index, 4);
            return vec![
                self.point("mae", Gauge, t, mae, &[]),
                self.point("rmse", Gauge, t, 1.25 * mae, &[]),
                self.point("error_mean", Gauge, t, -5.0 * drift, &[]),
                self.point("labeled_fraction", Gauge, t, 0.9, &[]),
            ];
        }
        let accuracy = 0.9 - 0.3 * drift + 0.03 * noise(self.name.len() as u64, index, 4);
        let mut out = vec![
            self.point("accuracy", Gauge, t, accuracy, &[]),
            self.point("labeled_fraction", Gauge, t, 0.8, &[]),
            self.point("label_late_count", Counter, t, if index % 11 == 3 { 2.0 } else { 0.0 }, &[]),
        ];
        for class in &self.classes {
            out.push(self.point("accuracy", Gauge, t, accuracy, &[("class_name", class)]));
        }
        out
    }
}

/// The pseudo-model the engine files facts under that belong to no model.
pub const GLOBAL_MODEL: &str = "__mltap__";

/// Points of the pseudo-model for bucket number `index`: capture drops happen before
/// a payload is decoded, so they belong to no model and carry no `model` property.
pub fn global_bucket(t: i64, index: u64) -> Vec<Point> {
    let dropped = if index % 17 == 5 { 3.0 } else { 0.0 };
    let unknown = if index % 29 == 11 { 1.0 } else { 0.0 };
    vec![
        Point::builder("capture_dropped", TargetType::Counter, t, dropped).finish().expect("finite"),
        Point::builder("decode_errors", TargetType::Counter, t, unknown)
            .with("reason", "unknown_model")
            .finish()
            .expect("finite"),
    ]
}

/// Serves `routes` on a fresh loopback port, as the admin server composes them.
pub async fn serve(routes: Vec<Arc<dyn AdminRoute>>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    let routes = Arc::new(routes);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let routes = routes.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                    let routes = routes.clone();
                    async move {
                        let request: AdminRequest = request.map(|b| b.boxed_unsync());
                        let route = routes.iter().find(|r| r.matches(request.method(), request.uri().path()));
                        let response = match route {
                            Some(route) => route.call(request).await,
                            None => {
                                let mut r =
                                    http::Response::new(Full::new(Bytes::from_static(b"not found")).boxed_unsync());
                                *r.status_mut() = http::StatusCode::NOT_FOUND;
                                r
                            }
                        };
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}
