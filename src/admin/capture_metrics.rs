//! Exposes the capture queue's atomics (`capture::CaptureStats`) on `/metrics`, read
//! at scrape time so the hot path only ever touches its atomics.

use crate::capture::CaptureStats;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// Scrape-time view of the capture queue.
#[derive(Debug)]
pub struct CaptureCollector {
    /// Shared with the queue's sender and receiver.
    pub stats: Arc<CaptureStats>,
}

impl Collector for CaptureCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.stats;
        let counters: [(&str, &str, &AtomicU64); 5] = [
            ("capture_enqueued", "Exchanges put on the capture queue", &s.enqueued),
            (
                "capture_dropped",
                "Exchanges shed from statistics (sampled out, or the sampled lane full); still counted",
                &s.dropped,
            ),
            (
                "capture_skipped_oversize",
                "Exchanges whose statistics were not computed because their bodies exceeded capture.max_exchange_bytes",
                &s.skipped_oversize,
            ),
            (
                "capture_count_enqueued",
                "Exchanges shed from statistics and queued to be counted only",
                &s.count_enqueued,
            ),
            (
                "capture_uncounted",
                "Exchanges missing from the counts because the capture byte budget was spent",
                &s.uncounted,
            ),
        ];
        for (name, help, value) in counters {
            let counter = ConstCounter::new(value.load(Ordering::Relaxed));
            counter.encode(encoder.encode_descriptor(name, help, None, counter.metric_type())?)?;
        }
        let gauges: [(&str, &str, &AtomicUsize); 4] = [
            ("capture_queue_depth", "Exchanges waiting in the capture queue", &s.depth),
            ("capture_queue_bytes", "Body bytes waiting in the capture queue", &s.depth_bytes),
            ("capture_count_queue_depth", "Count records waiting in the capture queue's count lane", &s.count_depth),
            ("capture_count_queue_bytes", "Bytes waiting in the capture queue's count lane", &s.count_depth_bytes),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value.load(Ordering::Relaxed) as i64);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        let share = f64::from(s.statistics_share()) / f64::from(crate::capture::FULL_SHARE);
        let gauge = ConstGauge::new(share);
        gauge.encode(encoder.encode_descriptor(
            "capture_statistics_share",
            "Share of exchanges sampled for statistics while the sampled lane has room (lowered while mltap waits for CPU)",
            None,
            gauge.metric_type(),
        )?)?;
        Ok(())
    }
}
