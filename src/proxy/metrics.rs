//! Prometheus metrics of the proxy: requests by protocol, method and status, and the
//! upstream latency. Recorded once per exchange when it ends.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::borrow::Cow;

/// Labels of `requests`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `grpc` or `rest`.
    pub protocol: &'static str,
    /// The gRPC method of a TF Serving service, or the kind of REST call
    /// (`predict`, `metadata`, ...); `other` for anything else, to bound cardinality.
    pub method: &'static str,
    /// HTTP status for REST; the grpc-status code for gRPC (`none` when the stream
    /// ended without one, e.g. on a reset or a cancel). Borrowed for the codes seen
    /// on nearly every request, so that counting one allocates nothing.
    pub status: Cow<'static, str>,
}

/// The text of a status code: a static string for gRPC's codes and the common HTTP
/// statuses, else formatted.
pub fn status_text(code: i64) -> Cow<'static, str> {
    const GRPC: [&str; 17] =
        ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16"];
    let known = match code {
        0..=16 => GRPC[code as usize],
        200 => "200",
        400 => "400",
        408 => "408",
        404 => "404",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        _ => return Cow::Owned(code.to_string()),
    };
    Cow::Borrowed(known)
}

/// Labels of `upstream_latency_seconds`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    pub protocol: &'static str,
}

/// The proxy's metric families, shared by both listeners.
#[derive(Debug, Clone)]
pub struct ProxyMetrics {
    /// Finished exchanges, counted at their end.
    pub requests: Family<RequestLabels, Counter>,
    /// From sending the request upstream to the end of the upstream's response.
    pub upstream_latency: Family<ProtocolLabels, Histogram>,
    /// Requests refused before they became an exchange, for the client's fault
    /// (malformed or unfinished heads): they never reach TF Serving.
    pub client_faults: Counter,
    /// Client connections refused because the listeners hold `limits.max_connections`.
    pub connections_refused: Counter,
    /// Client connections open on the proxy's listeners.
    pub open_connections: Gauge,
}

impl ProxyMetrics {
    /// Counts a request refused for the client's fault.
    pub fn client_fault(&self) {
        self.client_faults.inc();
    }
}

impl ProxyMetrics {
    /// Creates the families and registers them.
    pub fn register(registry: &mut Registry) -> Self {
        let requests = Family::<RequestLabels, Counter>::default();
        let upstream_latency = Family::<ProtocolLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.000_25, 2.0, 17))) as fn() -> Histogram,
        );
        registry.register("requests", "Proxied requests by protocol, method and status", requests.clone());
        registry.register(
            "upstream_latency_seconds",
            "From sending a request to TF Serving to the end of its response",
            upstream_latency.clone(),
        );
        let (client_faults, connections_refused, open_connections) =
            (Counter::default(), Counter::default(), Gauge::default());
        registry.register(
            "client_faults",
            "Requests refused for the client's fault before reaching TF Serving (malformed or unfinished heads)",
            client_faults.clone(),
        );
        registry.register(
            "connections_refused",
            "Client connections refused because limits.max_connections were open",
            connections_refused.clone(),
        );
        registry.register(
            "open_connections",
            "Client connections open on the proxy listeners",
            open_connections.clone(),
        );
        ProxyMetrics { requests, upstream_latency, client_faults, connections_refused, open_connections }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_texts_match_the_formatted_codes() {
        for code in [0, 5, 16, 17, 200, 201, 404, 408, 502, 504, -1] {
            assert_eq!(status_text(code), code.to_string());
        }
    }
}
