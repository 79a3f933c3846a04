//! When a call to Anodot fails, how long to wait before the next attempt and when to
//! stop trying. Every call delivery makes (posting points, posting a watermark, finding
//! or creating a stream schema) goes through one `Retry`, so the rules are written once:
//!
//! - a transient failure (5xx, 408, 429, rate-limit code, timeout, connection failure)
//!   waits an exponential backoff with jitter, or the server's `Retry-After`, never
//!   more than `max_backoff`;
//! - a failure that needs an operator (token or URL refused) stops `send` at once and
//!   makes `serve`, whose spool keeps every point, try again every `max_backoff`;
//! - `send` gives up once failures have lasted `--give-up-after`.
//!
//! This module only decides; the caller waits, logs and counts.

use rand::Rng;
use std::time::Duration;
use tokio::time::Instant;

/// First wait before a retry; doubled per failure up to `max_backoff`.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(500);

/// Exponential backoff with jitter: a random wait in [d/2, d], d = 500ms · 2^(attempt-1)
/// capped at `max`; an explicit Retry-After wins, capped the same way.
pub fn backoff(attempt: u32, max: Duration, retry_after: Option<Duration>) -> Duration {
    if let Some(after) = retry_after {
        return after.min(max);
    }
    let exp = INITIAL_BACKOFF.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let d = exp.min(max);
    let half = d / 2;
    half + Duration::from_secs_f64(rand::rng().random_range(0.0..=1.0) * half.as_secs_f64())
}

/// How long to keep trying when Anodot fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// `serve`: the spool holds everything, so keep trying until stopped.
    Forever,
    /// `send`: give up after this long of consecutive failures (or at once when the
    /// token or URL is refused).
    GiveUpAfter(Duration),
}

/// Why one attempt failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Sending the same again may succeed.
    Transient {
        /// What went wrong, safe to log.
        reason: String,
        /// The server's `Retry-After`, which wins over the backoff.
        retry_after: Option<Duration>,
    },
    /// Needs an operator: sending the same again cannot succeed until the token, key or
    /// URL is fixed, and dropping the points would lose them.
    Halt {
        /// What Anodot refused, safe to log.
        reason: String,
    },
}

impl Failure {
    pub fn reason(&self) -> &str {
        match self {
            Failure::Transient { reason, .. } | Failure::Halt { reason } => reason,
        }
    }
}

/// Why a call is no longer retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GiveUp {
    /// `send` met a failure that needs an operator.
    Halted(String),
    /// `send` failed for longer than it was allowed to.
    After { after: Duration, reason: String },
}

/// The consecutive failures of one call (one request, one watermark, one schema).
#[derive(Debug)]
pub struct Retry {
    /// Whether failing for long ends the call.
    persistence: Persistence,
    /// Longest wait between two attempts.
    max_backoff: Duration,
    /// Failures so far; the backoff doubles with each.
    failures: u32,
    /// When the first failure happened, to give up after `GiveUpAfter`.
    failing_since: Option<Instant>,
}

impl Retry {
    pub fn new(persistence: Persistence, max_backoff: Duration) -> Retry {
        Retry { persistence, max_backoff, failures: 0, failing_since: None }
    }

    /// Failures counted so far (the attempt number of the last one).
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Counts a failure at `now` and says how long to wait before the next attempt,
    /// or why to stop.
    pub fn after(&mut self, failure: &Failure, now: Instant) -> Result<Duration, GiveUp> {
        let retry_after = match failure {
            Failure::Transient { retry_after, .. } => *retry_after,
            Failure::Halt { reason } => match self.persistence {
                Persistence::GiveUpAfter(_) => return Err(GiveUp::Halted(reason.clone())),
                Persistence::Forever => Some(self.max_backoff),
            },
        };
        self.failures += 1;
        let since = *self.failing_since.get_or_insert(now);
        if let Persistence::GiveUpAfter(limit) = self.persistence {
            if now.saturating_duration_since(since) >= limit {
                return Err(GiveUp::After { after: limit, reason: failure.reason().to_string() });
            }
        }
        Ok(backoff(self.failures, self.max_backoff, retry_after))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transient(retry_after: Option<Duration>) -> Failure {
        Failure::Transient { reason: "HTTP 503".into(), retry_after }
    }

    #[test]
    fn backoff_grows_with_jitter_and_stays_under_the_cap() {
        let max = Duration::from_secs(60);
        for attempt in 1..30 {
            let d = backoff(attempt, max, None);
            let full = INITIAL_BACKOFF.saturating_mul(1 << (attempt - 1).min(20)).min(max);
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
        assert_eq!(backoff(1, max, Some(Duration::from_secs(600))), max);
    }

    #[test]
    fn transient_failures_back_off_longer_each_time_and_honour_retry_after() {
        let mut retry = Retry::new(Persistence::Forever, Duration::from_secs(60));
        let now = Instant::now();
        for attempt in 1..=8u32 {
            let wait = retry.after(&transient(None), now).unwrap();
            let full = INITIAL_BACKOFF.saturating_mul(1 << (attempt - 1)).min(Duration::from_secs(60));
            assert!(wait >= full / 2 && wait <= full, "attempt {attempt}: {wait:?}");
        }
        assert_eq!(retry.failures(), 8);
        let wait = retry.after(&transient(Some(Duration::from_secs(7))), now).unwrap();
        assert_eq!(wait, Duration::from_secs(7));
    }

    #[test]
    fn a_halt_stops_send_at_once_and_makes_serve_wait_the_longest_backoff() {
        let halt = Failure::Halt { reason: "HTTP 401".into() };
        let mut send = Retry::new(Persistence::GiveUpAfter(Duration::from_secs(600)), Duration::from_secs(60));
        assert_eq!(send.after(&halt, Instant::now()), Err(GiveUp::Halted("HTTP 401".into())));
        assert_eq!(send.failures(), 0);
        let mut serve = Retry::new(Persistence::Forever, Duration::from_secs(60));
        for _ in 0..3 {
            assert_eq!(serve.after(&halt, Instant::now()), Ok(Duration::from_secs(60)));
        }
    }

    #[test]
    fn send_gives_up_once_failures_last_longer_than_allowed() {
        let limit = Duration::from_secs(30);
        let mut retry = Retry::new(Persistence::GiveUpAfter(limit), Duration::from_secs(60));
        let start = Instant::now();
        assert!(retry.after(&transient(None), start).is_ok());
        assert!(retry.after(&transient(None), start + Duration::from_secs(29)).is_ok());
        let stopped = retry.after(&transient(None), start + limit);
        assert_eq!(stopped, Err(GiveUp::After { after: limit, reason: "HTTP 503".into() }));
        let mut serve = Retry::new(Persistence::Forever, Duration::from_secs(60));
        assert!(serve.after(&transient(None), start).is_ok());
        assert!(serve.after(&transient(None), start + Duration::from_secs(86_400)).is_ok());
    }
}
