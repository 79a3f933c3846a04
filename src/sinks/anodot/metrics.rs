//! Delivery's self-metrics, registered on the admin server's `/metrics`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Delivery's self-metrics, on the admin server's `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct DeliveryMetrics {
    /// Points Anodot accepted.
    pub delivered: Counter,
    /// Points Anodot refused for good (logged with its code and description).
    pub rejected: Counter,
    /// Points sent again after a transient failure.
    pub retried: Counter,
    /// 3.0 watermarks posted.
    pub watermarks: Counter,
    /// Points in the spool not yet answered for.
    pub backlog_points: Gauge,
    /// Seconds since the start of the oldest bucket with points not yet answered for;
    /// 0 when the spool is delivered.
    pub lag_seconds: Gauge<f64, AtomicU64>,
}

impl DeliveryMetrics {
    /// Registers the metrics (names start with `mltap_anodot_`).
    pub fn register(&self, registry: &mut Registry) {
        let counters = [
            ("anodot_points_delivered", "Points Anodot accepted", &self.delivered),
            ("anodot_points_rejected", "Points Anodot refused for good", &self.rejected),
            ("anodot_points_retried", "Points sent again after a transient failure", &self.retried),
            ("anodot_watermarks_posted", "Anodot 3.0 watermarks posted", &self.watermarks),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "anodot_backlog_points",
            "Points in the spool not yet delivered",
            self.backlog_points.clone(),
        );
        let lag_help = "Seconds since the start of the oldest bucket not yet delivered";
        registry.register("anodot_delivery_lag_seconds", lag_help, self.lag_seconds.clone());
    }
}
