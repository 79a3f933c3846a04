//! The captured copy of one inference exchange and the bounded queue that carries it
//! from the proxy's hot path to the worker.
//!
//! The queue's policy is drop-newest: `CaptureSender::offer` never waits. When the
//! queue holds its maximum number of exchanges or bytes, the new exchange is dropped
//! and counted in `capture_dropped`. This module never parses a payload.

use crate::units::MIB;
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;

/// The wire protocol an exchange arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// gRPC over HTTP/2 cleartext.
    Grpc,
    /// TF Serving's REST API over HTTP/1.1.
    Rest,
}

/// A copy of one request/response pair, taken as the bytes passed through the proxy.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// Which listener saw it; decides how the bodies are framed.
    pub protocol: Protocol,
    /// The request path: `/tensorflow.serving.PredictionService/Predict` for gRPC,
    /// `/v1/models/iris/versions/2:predict` for REST. Model, version and verb of a
    /// REST call are read from it by the decoder.
    pub path: String,
    /// The request id: the configured header's value, or a generated one.
    pub request_id: String,
    /// True when mltap generated `request_id` (the client sent none).
    pub request_id_generated: bool,
    /// `Content-Encoding` (REST) or `grpc-encoding` (gRPC) of the request, to inflate it.
    pub request_encoding: Option<String>,
    /// `Content-Encoding` (REST) or `grpc-encoding` (gRPC) of the response.
    pub response_encoding: Option<String>,
    /// Request body chunks in the order they passed; gRPC frames may span chunks.
    pub request_body: Vec<Bytes>,
    /// Response body chunks in the order they passed.
    pub response_body: Vec<Bytes>,
    /// HTTP status of the response (502/504 when mltap answered for a dead upstream).
    pub status: u16,
    /// gRPC status from the trailers (or a trailers-only response); None for REST.
    pub grpc_status: Option<i32>,
    /// When the request reached mltap: the event time that buckets the exchange.
    pub started_at: SystemTime,
    /// From sending the request upstream to the end of the upstream's response.
    pub upstream_latency: Duration,
    /// False when the exchange ended early (client cancel, upstream reset).
    pub complete: bool,
}

impl Exchange {
    /// Bytes of request and response bodies held by this copy.
    pub fn captured_bytes(&self) -> usize {
        self.request_body.iter().chain(&self.response_body).map(Bytes::len).sum()
    }

    /// The request body as one contiguous buffer (no copy when it arrived in one chunk).
    pub fn request_bytes(&self) -> Bytes {
        concat(&self.request_body)
    }

    /// The response body as one contiguous buffer (no copy when it arrived in one chunk).
    pub fn response_bytes(&self) -> Bytes {
        concat(&self.response_body)
    }
}

fn concat(chunks: &[Bytes]) -> Bytes {
    match chunks {
        [] => Bytes::new(),
        [one] => one.clone(),
        many => {
            let mut all = Vec::with_capacity(many.iter().map(Bytes::len).sum());
            for chunk in many {
                all.extend_from_slice(chunk);
            }
            Bytes::from(all)
        }
    }
}

/// Counters of the capture path, read by `/metrics`.
#[derive(Debug, Default)]
pub struct CaptureStats {
    /// Exchanges put on the queue.
    pub enqueued: AtomicU64,
    /// Exchanges dropped because the queue was full (by count or bytes).
    pub dropped: AtomicU64,
    /// Exchanges not captured because their bodies exceeded the per-exchange cap.
    pub skipped_oversize: AtomicU64,
    /// Exchanges currently waiting in the queue.
    pub depth: AtomicUsize,
    /// Body bytes currently waiting in the queue.
    pub depth_bytes: AtomicUsize,
}

/// The hot path's end of the queue. Cheap to clone.
#[derive(Debug, Clone)]
pub struct CaptureSender {
    /// The channel; its capacity bounds the number of queued exchanges.
    tx: mpsc::Sender<Exchange>,
    /// Shared with the receiver, which gives bytes back as it takes exchanges.
    stats: Arc<CaptureStats>,
    /// Byte budget of the whole queue.
    max_bytes: usize,
    /// Bytes kept per exchange; above it the tee stops copying.
    max_exchange_bytes: usize,
}

/// The worker's end of the queue.
#[derive(Debug)]
pub struct CaptureReceiver {
    rx: mpsc::Receiver<Exchange>,
    stats: Arc<CaptureStats>,
}

/// Creates the bounded capture queue.
pub fn queue(config: &CaptureConfig) -> (CaptureSender, CaptureReceiver) {
    let (tx, rx) = mpsc::channel(config.queue_exchanges.max(1));
    let stats = Arc::new(CaptureStats::default());
    (
        CaptureSender {
            tx,
            stats: stats.clone(),
            max_bytes: config.queue_bytes,
            max_exchange_bytes: config.max_exchange_bytes,
        },
        CaptureReceiver { rx, stats },
    )
}

impl CaptureSender {
    /// Puts an exchange on the queue without waiting; drops and counts it when full.
    /// Returns whether it was queued.
    pub fn offer(&self, exchange: Exchange) -> bool {
        let bytes = exchange.captured_bytes();
        let before = self.stats.depth_bytes.fetch_add(bytes, Ordering::AcqRel);
        if before + bytes > self.max_bytes {
            self.stats.depth_bytes.fetch_sub(bytes, Ordering::AcqRel);
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        match self.tx.try_send(exchange) {
            Ok(()) => {
                self.stats.depth.fetch_add(1, Ordering::AcqRel);
                self.stats.enqueued.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(_) => {
                self.stats.depth_bytes.fetch_sub(bytes, Ordering::AcqRel);
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Counts an exchange whose bodies were larger than the per-exchange cap.
    pub fn skip_oversize(&self) {
        self.stats.skipped_oversize.fetch_add(1, Ordering::Relaxed);
    }

    /// Bytes the tee may keep for one exchange.
    pub fn max_exchange_bytes(&self) -> usize {
        self.max_exchange_bytes
    }

    /// The queue's counters.
    pub fn stats(&self) -> &Arc<CaptureStats> {
        &self.stats
    }
}

impl CaptureReceiver {
    /// The next exchange; None once every sender is gone and the queue is empty.
    pub async fn recv(&mut self) -> Option<Exchange> {
        let exchange = self.rx.recv().await?;
        self.release(&exchange);
        Some(exchange)
    }

    /// The next exchange if one is waiting.
    pub fn try_recv(&mut self) -> Option<Exchange> {
        let exchange = self.rx.try_recv().ok()?;
        self.release(&exchange);
        Some(exchange)
    }

    fn release(&self, exchange: &Exchange) {
        self.stats.depth.fetch_sub(1, Ordering::AcqRel);
        self.stats.depth_bytes.fetch_sub(exchange.captured_bytes(), Ordering::AcqRel);
    }

    /// The queue's counters.
    pub fn stats(&self) -> &Arc<CaptureStats> {
        &self.stats
    }
}

/// Bounds of the capture tap and its queue (`[capture]`).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureConfig {
    /// Exchanges the queue holds before it drops the newest.
    pub queue_exchanges: usize,
    /// Bytes of captured bodies the queue holds before it drops the newest.
    pub queue_bytes: usize,
    /// Bytes kept per exchange (request + response); larger exchanges are skipped.
    pub max_exchange_bytes: usize,
    /// Return a generated request id to the client in the request-id header.
    pub return_request_id: bool,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            queue_exchanges: 10_000,
            // Together with the worker's small hand-offs, these bound what monitoring
            // adds to mltap's memory whatever the traffic (< 100 MiB RSS in all).
            queue_bytes: 16 * MIB,
            max_exchange_bytes: 8 * MIB,
            return_request_id: false,
        }
    }
}

impl CaptureConfig {
    /// Checks the section; the error names the key within it.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.queue_exchanges == 0 {
            return Err(("queue_exchanges".into(), "must be at least 1".into()));
        }
        if self.max_exchange_bytes == 0 || self.queue_bytes < self.max_exchange_bytes {
            return Err((
                "queue_bytes".into(),
                "must be at least capture.max_exchange_bytes, which must be positive".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(body: usize) -> Exchange {
        Exchange {
            protocol: Protocol::Rest,
            path: "/v1/models/m:predict".into(),
            request_id: "r".into(),
            request_id_generated: false,
            request_encoding: None,
            response_encoding: None,
            request_body: vec![Bytes::from(vec![0u8; body])],
            response_body: vec![],
            status: 200,
            grpc_status: None,
            started_at: SystemTime::now(),
            upstream_latency: Duration::ZERO,
            complete: true,
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_the_newest_and_counts_it() {
        let config = CaptureConfig { queue_exchanges: 2, ..CaptureConfig::default() };
        let (tx, mut rx) = queue(&config);
        assert!(tx.offer(exchange(1)));
        assert!(tx.offer(exchange(2)));
        assert!(!tx.offer(exchange(3)));
        assert_eq!(tx.stats().dropped.load(Ordering::Relaxed), 1);
        assert_eq!(rx.recv().await.unwrap().captured_bytes(), 1);
        assert_eq!(rx.recv().await.unwrap().captured_bytes(), 2);
        assert_eq!(rx.stats().depth.load(Ordering::Relaxed), 0);
        assert_eq!(rx.stats().depth_bytes.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn the_byte_budget_bounds_the_queue() {
        let config = CaptureConfig { queue_bytes: 100, max_exchange_bytes: 100, ..CaptureConfig::default() };
        let (tx, mut rx) = queue(&config);
        assert!(tx.offer(exchange(60)));
        assert!(!tx.offer(exchange(60)));
        rx.recv().await.unwrap();
        assert!(tx.offer(exchange(60)));
        assert_eq!(tx.stats().dropped.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn split_bodies_are_joined_in_order() {
        let mut e = exchange(0);
        e.request_body = vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cd")];
        assert_eq!(e.request_bytes(), Bytes::from_static(b"abcd"));
    }
}
