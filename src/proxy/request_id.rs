//! Request ids for exchanges whose client sent none: a random per-process prefix and
//! a counter, so generating one costs an atomic increment and a short format.

use std::sync::atomic::{AtomicU64, Ordering};

/// Generates ids unique within the process and, with high probability, across
/// replicas and restarts.
#[derive(Debug)]
pub struct RequestIds {
    /// Random per process, so ids from replicas or restarts do not collide.
    prefix: u64,
    /// Numbers the ids of this process.
    next: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        RequestIds { prefix: rand::random(), next: AtomicU64::new(0) }
    }
}

impl RequestIds {
    /// A new id such as `3f2a9c01d4e5b6a7-42`.
    pub fn generate(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}-{n}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_differ() {
        let ids = RequestIds::default();
        assert_ne!(ids.generate(), ids.generate());
    }
}
