//! The demo's label poster: plays the part of a business system that learns the truth
//! later. It takes the true class of every row the traffic generator sent, loses some
//! (never labelled), corrupts some (wrong labels), holds the rest for a few seconds,
//! and posts them to mltap's `POST /v1/labels` as a JSON array of `{"id", "label"}`,
//! counting what the endpoint answers.
//!
//! It never fails the demo: an absent endpoint (404) or a refused connection is
//! counted and the labels are dropped.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The truth about one predicted row, as the traffic generator knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingLabel {
    /// The row's label id: the request id, suffixed `:<row>` in batches of several rows.
    pub id: String,
    /// The class the row really belongs to.
    pub true_class: usize,
    /// Number of classes of the model, to draw a wrong label from.
    pub classes: usize,
    /// A regression's true value, posted instead of a class.
    pub value: Option<f64>,
}

/// How labels arrive: after how long, how many wrong, how many never.
#[derive(Debug, Clone, PartialEq)]
pub struct LabelPolicy {
    /// Shortest delay between the prediction and its label.
    pub min_delay: Duration,
    /// Longest delay.
    pub max_delay: Duration,
    /// Fraction of labels replaced by another class (data-entry mistakes).
    pub wrong_fraction: f64,
    /// Fraction of rows never labelled (customers who never come back).
    pub missing_fraction: f64,
    /// Seed of the draws.
    pub seed: u64,
}

impl Default for LabelPolicy {
    fn default() -> Self {
        LabelPolicy {
            min_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(5),
            wrong_fraction: 0.05,
            missing_fraction: 0.10,
            seed: 2019,
        }
    }
}

/// Counters of what the poster did and what the endpoint answered.
#[derive(Debug, Default)]
pub struct LabelStats {
    /// Labels sent in POST bodies.
    pub posted: AtomicU64,
    /// `accepted` summed over the endpoint's answers.
    pub accepted: AtomicU64,
    /// `unmatched` summed over the answers.
    pub unmatched: AtomicU64,
    /// Length of `rejected` summed over the answers.
    pub rejected: AtomicU64,
    /// Labels deliberately corrupted before posting.
    pub wrong: AtomicU64,
    /// Rows deliberately never labelled.
    pub withheld: AtomicU64,
    /// Labels dropped because the endpoint answered 404 (not there).
    pub endpoint_missing: AtomicU64,
    /// Labels dropped because the POST failed otherwise.
    pub failed: AtomicU64,
    /// POST requests made.
    pub requests: AtomicU64,
}

/// The largest number of labels in one POST.
const MAX_LABELS_PER_POST: usize = 1000;

/// Posts labels to `url` (the admin port's `/v1/labels`) as they fall due, until the
/// sender side of `pending` is closed and every held label has been posted, or until
/// `abort` is cancelled.
pub async fn run(
    url: String,
    policy: LabelPolicy,
    mut pending: mpsc::UnboundedReceiver<PendingLabel>,
    stats: Arc<LabelStats>,
    abort: CancellationToken,
) {
    let client = match reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(10)).build() {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(message = "Demo labels: cannot build the HTTP client.", %error);
            return;
        }
    };
    let mut rng = StdRng::seed_from_u64(policy.seed);
    // Min-heap by due time; the sequence number keeps equal times in arrival order.
    let mut held: BinaryHeap<Reverse<Held>> = BinaryHeap::new();
    let mut sequence = 0u64;
    let mut open = true;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    // Each kind of delivery problem is logged once; the counters carry the rest.
    let mut warned = Warned::default();
    loop {
        tokio::select! {
            _ = abort.cancelled() => break,
            received = pending.recv(), if open => match received {
                Some(label) => {
                    if rng.random_bool(policy.missing_fraction.clamp(0.0, 1.0)) {
                        stats.withheld.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let mut class = label.true_class;
                    if label.classes > 1 && rng.random_bool(policy.wrong_fraction.clamp(0.0, 1.0)) {
                        class = (class + rng.random_range(1..label.classes)) % label.classes;
                        stats.wrong.fetch_add(1, Ordering::Relaxed);
                    }
                    let spread = policy.max_delay.saturating_sub(policy.min_delay);
                    let delay = policy.min_delay + spread.mul_f64(rng.random::<f64>());
                    sequence += 1;
                    let value = label.value.map(f64::to_bits);
                    held.push(Reverse((Instant::now() + delay, sequence, label.id, class, value)));
                }
                None => open = false,
            },
            _ = tick.tick() => {
                let now = Instant::now();
                let mut due = Vec::new();
                while let Some(Reverse((at, ..))) = held.peek() {
                    if *at > now || due.len() >= MAX_LABELS_PER_POST {
                        break;
                    }
                    if let Some(Reverse((_, _, id, class, value))) = held.pop() {
                        match value {
                            Some(bits) => due.push(json!({ "id": id, "label": f64::from_bits(bits) })),
                            None => due.push(json!({ "id": id, "label": class })),
                        }
                    }
                }
                if !due.is_empty() {
                    post(&client, &url, due, &stats, &mut warned).await;
                }
                if !open && held.is_empty() {
                    break;
                }
            }
        }
    }
}

/// A label held until it is due: when, its arrival order, the row id, the class, and
/// the bits of a regression's value (f64 is not `Ord`).
type Held = (Instant, u64, String, usize, Option<u64>);

/// Which delivery problems have been logged already.
#[derive(Debug, Default)]
struct Warned {
    missing: bool,
    unreachable: bool,
    refused: bool,
}

async fn post(client: &reqwest::Client, url: &str, labels: Vec<Value>, stats: &LabelStats, warned: &mut Warned) {
    let count = labels.len() as u64;
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let response = match client.post(url).json(&Value::Array(labels)).send().await {
        Ok(response) => response,
        Err(error) => {
            stats.failed.fetch_add(count, Ordering::Relaxed);
            if !std::mem::replace(&mut warned.unreachable, true) {
                tracing::warn!(message = "Demo labels: POST failed; labels are dropped.", %error, url);
            }
            return;
        }
    };
    let status = response.status();
    if status == reqwest::StatusCode::NOT_FOUND {
        stats.endpoint_missing.fetch_add(count, Ordering::Relaxed);
        if !std::mem::replace(&mut warned.missing, true) {
            tracing::info!(
                message = "Demo labels: the label endpoint is not available (404); labels are dropped.",
                url
            );
        }
        return;
    }
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        stats.failed.fetch_add(count, Ordering::Relaxed);
        if !std::mem::replace(&mut warned.refused, true) {
            tracing::warn!(message = "Demo labels: the label endpoint refused a batch.", %status, %body);
        }
        return;
    }
    stats.posted.fetch_add(count, Ordering::Relaxed);
    let field = |name: &str| body.get(name).and_then(Value::as_u64).unwrap_or(0);
    let (accepted, unmatched) = (field("accepted"), field("unmatched"));
    let rejected = body.get("rejected").and_then(Value::as_array).map(Vec::len).unwrap_or(0) as u64;
    stats.accepted.fetch_add(accepted, Ordering::Relaxed);
    stats.unmatched.fetch_add(unmatched, Ordering::Relaxed);
    stats.rejected.fetch_add(rejected, Ordering::Relaxed);
    tracing::debug!(message = "Demo labels: posted.", count, accepted, unmatched, rejected);
    if rejected > 0 {
        tracing::warn!(message = "Demo labels: some labels were rejected.", rejected, first = %body["rejected"][0]);
    }
}
