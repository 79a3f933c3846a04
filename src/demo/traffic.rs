//! The demo's traffic generator: batches of synthetic customers and card transactions
//! sent to a TF-Serving-compatible endpoint over both protocols (gRPC Predict with
//! TensorProto inputs, REST `:predict` in the row format), each with an
//! `x-request-id`, at a steady gentle rate. Half-way through, the input distribution
//! drifts (shifted means, a different category mix) and the world the labels come
//! from changes (concept drift), so that both input drift and a real accuracy drop
//! show in mltap's output.
//!
//! It hands the true class of every row it sent to the label poster, and never
//! decides itself which labels are posted, late, wrong or lost.

use super::labels::PendingLabel;
use super::model::{LinearModel, Row};
use super::tensor::{float_tensor_content, string_tensor};
use crate::tfserving::proto::serving::model_spec::VersionChoice;
use crate::tfserving::proto::serving::prediction_service_client::PredictionServiceClient;
use crate::tfserving::proto::serving::{ModelSpec, PredictRequest};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The distribution of one numeric input.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NumericDist {
    /// Mean of the normal draw.
    pub mean: f64,
    /// Standard deviation of the normal draw.
    pub std: f64,
    /// Lower clamp, so that ages and counts stay plausible.
    pub min: f64,
    /// Upper clamp.
    pub max: f64,
    /// Counts (support calls, late payments) are whole numbers.
    pub integer: bool,
}

impl NumericDist {
    const fn new(mean: f64, std: f64, min: f64, max: f64, integer: bool) -> NumericDist {
        NumericDist { mean, std, min, max, integer }
    }

    fn sample(&self, rng: &mut StdRng) -> f64 {
        // Box-Muller: one standard normal from two uniforms.
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random();
        let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
        let x = (self.mean + self.std * z).clamp(self.min, self.max);
        if self.integer {
            x.round()
        } else {
            // Two decimals, as the values a form or a ledger would hold.
            (x * 100.0).round() / 100.0
        }
    }
}

/// The inputs of one model in one regime (before or after the drift).
#[derive(Debug, Clone, PartialEq)]
pub struct InputDist {
    /// One distribution per numeric input, in the model's input order.
    pub numeric: Vec<NumericDist>,
    /// Relative weights of the model's categories, in the model's category order.
    pub category_weights: Vec<f64>,
}

impl InputDist {
    fn sample(&self, categories: &[&'static str], rng: &mut StdRng) -> Row {
        let numeric = self.numeric.iter().map(|d| d.sample(rng)).collect();
        let total: f64 = self.category_weights.iter().sum();
        let mut pick = rng.random::<f64>() * total;
        let mut category = categories.last().copied().unwrap_or_default();
        for (c, w) in categories.iter().zip(&self.category_weights) {
            if pick < *w {
                category = c;
                break;
            }
            pick -= w;
        }
        Row { numeric, category: category.to_string() }
    }
}

/// One model's share of the traffic, its inputs before and after the drift, and the
/// true process the labels come from.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// The served model (names, inputs, classes).
    pub model: LinearModel,
    /// Relative share of the requests that go to this model.
    pub share: f64,
    /// Inputs before the drift point.
    pub before: InputDist,
    /// Inputs after the drift point.
    pub after: InputDist,
    /// How outcomes really arise after the drift; before it, the served model is right
    /// on average (its probabilities are the true ones).
    pub truth_after: LinearModel,
}

/// The demo's three scenarios: `churn` (most traffic), `fraud` and `eta` (a regression).
pub fn demo_scenarios() -> Vec<Scenario> {
    let churn = LinearModel::churn();
    let fraud = LinearModel::fraud();
    let eta = LinearModel::eta();
    let n = NumericDist::new;
    let churn_before = InputDist {
        numeric: vec![
            n(42.0, 12.0, 18.0, 90.0, true),   // age
            n(55.0, 20.0, 5.0, 250.0, false),  // income (k$)
            n(30.0, 18.0, 0.0, 120.0, true),   // tenure_months
            n(70.0, 25.0, 10.0, 200.0, false), // monthly_charges
            n(2.0, 1.5, 0.0, 15.0, true),      // support_calls
            n(20.0, 8.0, 0.0, 80.0, false),    // usage_hours
            n(1.0, 1.0, 0.0, 10.0, true),      // late_payments
            n(3.5, 1.0, 1.0, 5.0, false),      // satisfaction
        ],
        category_weights: vec![0.40, 0.15, 0.15, 0.15, 0.10, 0.05], // us gb de fr br in
    };
    let mut churn_after = churn_before.clone();
    churn_after.numeric[3].mean = 95.0; // a price rise
    churn_after.numeric[4].mean = 4.0; // support calls double
    churn_after.numeric[7].mean = 2.8; // satisfaction falls
    churn_after.category_weights = vec![0.15, 0.10, 0.10, 0.10, 0.30, 0.25]; // expansion to br, in
    let fraud_before = InputDist {
        numeric: vec![
            n(80.0, 60.0, 1.0, 2000.0, false),  // amount
            n(14.0, 5.0, 0.0, 23.0, true),      // hour_of_day
            n(15.0, 20.0, 0.0, 500.0, false),   // distance_km
            n(700.0, 400.0, 0.0, 4000.0, true), // account_age_days
        ],
        category_weights: vec![0.6, 0.3, 0.1], // pos web app
    };
    let mut fraud_after = fraud_before.clone();
    fraud_after.numeric[0].mean = 45.0;
    fraud_after.category_weights = vec![0.3, 0.3, 0.4];
    let eta_before = InputDist {
        numeric: vec![
            n(4.0, 2.5, 0.2, 25.0, false), // distance_km
            n(3.0, 2.0, 1.0, 20.0, true),  // items
            n(14.0, 5.0, 0.0, 23.0, true), // hour_of_day
            n(0.6, 0.2, 0.0, 1.0, false),  // courier_load
        ],
        category_weights: vec![0.7, 0.25, 0.05], // clear rain snow
    };
    let mut eta_after = eta_before.clone();
    eta_after.numeric[0].mean = 6.0; // deliveries go farther
    eta_after.category_weights = vec![0.4, 0.5, 0.1]; // the rainy season
    vec![
        Scenario {
            truth_after: churn.with_concept_drift(),
            model: churn,
            share: 0.6,
            before: churn_before,
            after: churn_after,
        },
        Scenario {
            truth_after: fraud.with_concept_drift(),
            model: fraud,
            share: 0.2,
            before: fraud_before,
            after: fraud_after,
        },
        Scenario {
            truth_after: eta.with_concept_drift(),
            model: eta,
            share: 0.2,
            before: eta_before,
            after: eta_after,
        },
    ]
}

/// The protocol a batch is sent with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    Rest,
}

/// One request's worth of rows.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Index into the scenarios.
    pub scenario: usize,
    /// The `x-request-id` of the request.
    pub request_id: String,
    /// Input rows.
    pub rows: Vec<Row>,
    /// The true class of each row, drawn from the true process of the moment (0 for
    /// a regression's rows).
    pub true_classes: Vec<usize>,
    /// A regression's true value of each row (the true process plus noise); empty for
    /// a classifier's batch.
    pub true_values: Vec<f64>,
    /// How the batch is sent.
    pub protocol: Protocol,
}

impl Batch {
    /// The label id of each row: the request id, suffixed `:<row>` when the batch has
    /// more than one row (docs/labels.md, "Ids").
    pub fn row_ids(&self) -> Vec<String> {
        if self.rows.len() == 1 {
            vec![self.request_id.clone()]
        } else {
            (0..self.rows.len()).map(|row| format!("{}:{row}", self.request_id)).collect()
        }
    }
}

/// Draws batches: which model, how many rows, which protocol, the rows and their truth.
#[derive(Debug)]
pub struct Generator {
    /// Models, their inputs and their truth.
    pub scenarios: Vec<Scenario>,
    /// Seeded, so that a run can be replayed.
    rng: StdRng,
    /// Prefix of request ids; distinct per run so that ids never collide with those of
    /// an earlier run still in a persistent label store.
    run_id: String,
    /// Requests drawn so far; the suffix of request ids.
    sequence: u64,
}

impl Generator {
    pub fn new(scenarios: Vec<Scenario>, seed: u64) -> Generator {
        let mut rng = StdRng::seed_from_u64(seed);
        let run_id = format!("{:08x}", rng.random::<u32>());
        Generator { scenarios, rng, run_id, sequence: 0 }
    }

    /// The next batch, from the regime before or after the drift.
    pub fn next_batch(&mut self, drifted: bool) -> Batch {
        let total: f64 = self.scenarios.iter().map(|s| s.share).sum();
        let mut pick = self.rng.random::<f64>() * total;
        let mut scenario = self.scenarios.len().saturating_sub(1);
        for (i, s) in self.scenarios.iter().enumerate() {
            if pick < s.share {
                scenario = i;
                break;
            }
            pick -= s.share;
        }
        // Mostly single rows, as online traffic is, with some client-side batches.
        let size = match self.rng.random_range(0..10) {
            0..=4 => 1,
            5..=7 => self.rng.random_range(2..=8),
            _ => self.rng.random_range(9..=32),
        };
        let protocol = if self.rng.random_bool(0.5) { Protocol::Grpc } else { Protocol::Rest };
        let s = &self.scenarios[scenario];
        let inputs = if drifted { &s.after } else { &s.before };
        let truth = if drifted { &s.truth_after } else { &s.model };
        let mut rows = Vec::with_capacity(size);
        let mut true_classes = Vec::with_capacity(size);
        let mut true_values = Vec::new();
        for _ in 0..size {
            let row = inputs.sample(&s.model.categories, &mut self.rng);
            if s.model.is_regression() {
                true_classes.push(0);
                true_values.push(sample_value(truth, &row, &mut self.rng));
            } else {
                true_classes.push(sample_class(truth, &row, &mut self.rng));
            }
            rows.push(row);
        }
        self.sequence += 1;
        let request_id = format!("demo-{}-{}", self.run_id, self.sequence);
        Batch { scenario, request_id, rows, true_classes, true_values, protocol }
    }
}

/// Draws a regression's true value: the true process's value plus noise (a standard
/// deviation of 3, from a sum of uniforms), never below 1.
fn sample_value(truth: &LinearModel, row: &Row, rng: &mut StdRng) -> f64 {
    let noise: f64 = (0..12).map(|_| rng.random::<f64>()).sum::<f64>() - 6.0;
    let value = truth.probabilities(row).first().copied().unwrap_or(0.0) + 3.0 * noise;
    (value.max(1.0) * 100.0).round() / 100.0
}

/// Draws an outcome from a model's probabilities, as nature would.
fn sample_class(truth: &LinearModel, row: &Row, rng: &mut StdRng) -> usize {
    let scores = truth.class_scores(&truth.probabilities(row));
    let mut pick: f64 = rng.random();
    for (class, p) in scores.iter().enumerate() {
        if pick < *p {
            return class;
        }
        pick -= p;
    }
    scores.len().saturating_sub(1)
}

/// The gRPC Predict request of a batch, with inputs as `tf.make_tensor_proto` encodes
/// them (`tensor_content` for floats, `string_val` for strings).
pub fn predict_request(model: &LinearModel, rows: &[Row]) -> PredictRequest {
    let n = rows.len() as i64;
    let mut inputs = HashMap::new();
    for (i, input) in model.numeric.iter().enumerate() {
        let values: Vec<f32> = rows.iter().map(|r| r.numeric[i] as f32).collect();
        inputs.insert(input.name.to_string(), float_tensor_content(&[n], &values));
    }
    let categories = rows.iter().map(|r| r.category.as_bytes().to_vec()).collect();
    inputs.insert(model.categorical.to_string(), string_tensor(&[n], categories));
    PredictRequest {
        model_spec: Some(ModelSpec {
            name: model.name.to_string(),
            version_choice: Some(VersionChoice::Version(model.version)),
            signature_name: "serving_default".to_string(),
        }),
        inputs,
        output_filter: Vec::new(),
    }
}

/// The REST `:predict` body of a batch in the row format.
pub fn rest_body(model: &LinearModel, rows: &[Row]) -> Value {
    let instances: Vec<Value> = rows
        .iter()
        .map(|row| {
            let mut fields = Map::new();
            for (input, value) in model.numeric.iter().zip(&row.numeric) {
                fields.insert(input.name.to_string(), json!(value));
            }
            fields.insert(model.categorical.to_string(), json!(row.category));
            Value::Object(fields)
        })
        .collect();
    json!({ "signature_name": "serving_default", "instances": instances })
}

/// Where the traffic goes: mltap's listeners in the demo, the model server directly in
/// tests.
#[derive(Debug, Clone)]
pub struct Targets {
    /// gRPC endpoint, e.g. `http://127.0.0.1:8500`.
    pub grpc: String,
    /// REST base URL, e.g. `http://127.0.0.1:8501`.
    pub rest: String,
}

/// How much traffic, for how long, and when it drifts.
#[derive(Debug, Clone)]
pub struct TrafficPlan {
    /// Requests per second (each with 1 to 32 rows).
    pub requests_per_second: f64,
    /// Time after the start at which inputs and truth drift.
    pub drift_at: Duration,
    /// Seed of the generator.
    pub seed: u64,
}

/// Counters of what the generator did, read by the runner's progress lines.
#[derive(Debug, Default)]
pub struct TrafficStats {
    /// Requests answered with success.
    pub requests_ok: AtomicU64,
    /// Requests that failed (connection refused, non-200, gRPC error).
    pub requests_failed: AtomicU64,
    /// Rows in successful requests.
    pub rows: AtomicU64,
    /// Successful gRPC requests.
    pub grpc: AtomicU64,
    /// Successful REST requests.
    pub rest: AtomicU64,
    /// Whether the drift point has been passed (0 or 1).
    pub drifted: AtomicU64,
}

/// Sends traffic until `stop` is cancelled. Each row of a successful request goes to
/// `labels` (when given) with its true class.
pub async fn run(
    targets: Targets,
    plan: TrafficPlan,
    stats: Arc<TrafficStats>,
    labels: Option<mpsc::UnboundedSender<PendingLabel>>,
    stop: CancellationToken,
) {
    let mut generator = Generator::new(demo_scenarios(), plan.seed);
    let channel = match tonic::transport::Endpoint::from_shared(targets.grpc.clone()) {
        Ok(endpoint) => endpoint.connect_lazy(),
        Err(error) => {
            tracing::error!(message = "Demo traffic: bad gRPC target.", %error, target = %targets.grpc);
            return;
        }
    };
    let grpc = PredictionServiceClient::new(channel);
    let rest = match reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(10)).build() {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(message = "Demo traffic: cannot build the HTTP client.", %error);
            return;
        }
    };
    let started = Instant::now();
    let period = Duration::from_secs_f64(1.0 / plan.requests_per_second.max(0.1));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A few requests in flight at most: the demo must not load the machine.
    let in_flight = Arc::new(tokio::sync::Semaphore::new(8));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = ticker.tick() => {}
        }
        let drifted = started.elapsed() >= plan.drift_at;
        stats.drifted.store(u64::from(drifted), Ordering::Relaxed);
        let batch = generator.next_batch(drifted);
        let model = generator.scenarios[batch.scenario].model.clone();
        let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
        let (grpc, rest, targets, stats, labels) =
            (grpc.clone(), rest.clone(), targets.clone(), stats.clone(), labels.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let sent = send(&grpc, &rest, &targets, &model, &batch).await;
            match sent {
                Ok(()) => {
                    stats.requests_ok.fetch_add(1, Ordering::Relaxed);
                    stats.rows.fetch_add(batch.rows.len() as u64, Ordering::Relaxed);
                    let counter = if batch.protocol == Protocol::Grpc { &stats.grpc } else { &stats.rest };
                    counter.fetch_add(1, Ordering::Relaxed);
                    if let Some(labels) = labels {
                        for (row, (id, class)) in batch.row_ids().into_iter().zip(&batch.true_classes).enumerate() {
                            let value = batch.true_values.get(row).copied();
                            let _ =
                                labels.send(PendingLabel { id, true_class: *class, classes: model.classes(), value });
                        }
                    }
                }
                Err(error) => {
                    stats.requests_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(message = "Demo traffic: request failed.", %error, request_id = %batch.request_id);
                }
            }
        });
    }
    // Wait for requests in flight, so that their labels are handed over.
    let _ = in_flight.acquire_many(8).await;
}

async fn send(
    grpc: &PredictionServiceClient<tonic::transport::Channel>,
    rest: &reqwest::Client,
    targets: &Targets,
    model: &LinearModel,
    batch: &Batch,
) -> Result<(), String> {
    match batch.protocol {
        Protocol::Grpc => {
            let mut request = tonic::Request::new(predict_request(model, &batch.rows));
            request.set_timeout(Duration::from_secs(10));
            let id = batch.request_id.parse().map_err(|_| "request id is not valid metadata".to_string())?;
            request.metadata_mut().insert("x-request-id", id);
            let response =
                grpc.clone().predict(request).await.map_err(|s| format!("gRPC {:?}: {}", s.code(), s.message()))?;
            let outputs = &response.get_ref().outputs;
            let rows = match outputs.get("class_ids") {
                Some(class_ids) => class_ids.int64_val.len(),
                None => outputs.get(super::serving::REGRESSION_OUTPUT).map_or(0, |t| t.float_val.len()),
            };
            if rows == batch.rows.len() {
                Ok(())
            } else {
                Err(format!("gRPC Predict answered {rows} rows for {} rows", batch.rows.len()))
            }
        }
        Protocol::Rest => {
            let url = format!("{}/v1/models/{}:predict", targets.rest.trim_end_matches('/'), model.name);
            let response = rest
                .post(&url)
                .header("x-request-id", &batch.request_id)
                .json(&rest_body(model, &batch.rows))
                .send()
                .await
                .map_err(|e| format!("REST {url}: {e}"))?;
            let status = response.status();
            let body: Value = response.json().await.map_err(|e| format!("REST {url}: {status}, {e}"))?;
            match body.get("predictions").and_then(Value::as_array) {
                Some(predictions) if status.is_success() && predictions.len() == batch.rows.len() => Ok(()),
                _ => Err(format!("REST {url}: {status} {body}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_suffixed_only_for_batches_of_several_rows() {
        let mut generator = Generator::new(demo_scenarios(), 7);
        let mut seen_single = false;
        let mut seen_batch = false;
        for _ in 0..50 {
            let batch = generator.next_batch(false);
            let ids = batch.row_ids();
            assert_eq!(ids.len(), batch.rows.len());
            if batch.rows.len() == 1 {
                seen_single = true;
                assert_eq!(ids[0], batch.request_id);
            } else {
                seen_batch = true;
                assert_eq!(ids[1], format!("{}:1", batch.request_id));
            }
        }
        assert!(seen_single && seen_batch);
    }

    #[test]
    fn the_served_model_is_calibrated_before_the_drift_and_wrong_after() {
        // The demo's story: before the drift the model's confidence matches its real
        // accuracy; after it, real accuracy falls well below.
        let mut generator = Generator::new(demo_scenarios(), 11);
        let churn = LinearModel::churn();
        let mut measure = |drifted: bool| {
            let (mut right, mut confidence, mut rows) = (0.0, 0.0, 0.0);
            while rows < 20_000.0 {
                let batch = generator.next_batch(drifted);
                if batch.scenario != 0 {
                    continue;
                }
                for (row, truth) in batch.rows.iter().zip(&batch.true_classes) {
                    let p = churn.probabilities(row);
                    let predicted = churn.class_id(&p);
                    right += f64::from(u8::from(predicted == *truth));
                    confidence += p[predicted];
                    rows += 1.0;
                }
            }
            (right / rows, confidence / rows)
        };
        let (accuracy_before, confidence_before) = measure(false);
        let (accuracy_after, confidence_after) = measure(true);
        assert!((accuracy_before - confidence_before).abs() < 0.02, "{accuracy_before} vs {confidence_before}");
        assert!(accuracy_before > 0.6, "{accuracy_before}");
        assert!(accuracy_after < accuracy_before - 0.2, "{accuracy_after} vs {accuracy_before}");
        assert!(
            confidence_after > accuracy_after + 0.2,
            "confidence alone cannot see concept drift: {confidence_after}"
        );
    }
}
