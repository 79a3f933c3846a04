//! The rate limit of delivery: a token bucket of points, so that no more than the
//! account's contracted points per second leave, retries included (Anodot throttles
//! above it, and throttled requests only add load).

use std::time::Duration;
use tokio::time::Instant;

/// A token bucket of points: `capacity` may go at once, then `per_second`. Time is
/// tokio's, so tests can pause it.
#[derive(Debug)]
pub struct RateLimiter {
    /// Refill rate.
    per_second: f64,
    /// Most tokens held; the burst after an idle time.
    capacity: f64,
    /// Current tokens; negative while a reserved send waits.
    tokens: f64,
    /// When `tokens` was last brought up to date.
    updated: Instant,
}

impl RateLimiter {
    pub fn new(per_second: u32, capacity: usize) -> RateLimiter {
        let capacity = capacity.max(1) as f64;
        RateLimiter { per_second: f64::from(per_second.max(1)), capacity, tokens: capacity, updated: Instant::now() }
    }

    /// Takes `n` tokens at `now` and says how long to wait before sending them.
    pub fn reserve(&mut self, n: usize, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        self.updated = now;
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.per_second)
        }
    }

    /// Waits until `n` points may be sent.
    pub async fn acquire(&mut self, n: usize) {
        let wait = self.reserve(n, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_limiter_holds_the_configured_points_per_second() {
        let mut limiter = RateLimiter::new(2000, 1000);
        let start = Instant::now();
        let mut now = start;
        let mut sent = 0usize;
        // 20 requests of 1000 points, each sent as soon as the limiter allows: one
        // burst of 1000, then 2000 points per second.
        for _ in 0..20 {
            now += limiter.reserve(1000, now);
            sent += 1000;
            let allowed = 1000.0 + 2000.0 * (now - start).as_secs_f64();
            assert!(sent as f64 <= allowed + 1e-6, "{sent} points by {:?}", now - start);
        }
        assert_eq!((now - start).as_millis(), 9500);
    }
}
