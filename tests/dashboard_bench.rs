//! Load benchmark of the dashboard, not a test (it asserts no timing and is ignored
//! by default): 3 models x 100 features x 1440 buckets of realistic history, served
//! over loopback, the API answers timed on the server side, then the page loaded in
//! headless Chromium with the 24 h and 1 h ranges. Figures go to
//! docs/benchmarks/dashboard.md. Run with:
//!
//! cargo test --release --test dashboard_bench -- --ignored --nocapture

#[path = "browser/synthetic.rs"]
mod synthetic;

use mltap::admin::dashboard::routes;
use mltap::admin::history::History;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use synthetic::{global_bucket, serve, SyntheticModel, GLOBAL_MODEL};

const MODELS: usize = 3;
const FEATURES: usize = 100;
const BUCKETS: u64 = 1440;
const BUCKET: i64 = 60;

/// The page's requests per model and range (see dashboard/src/main.js).
const PAGE_QUERIES: [&str; 4] = [
    "what=buffer_count,request_count,prediction_freq,prediction_count,max_prediction_proba,estimated_accuracy,accuracy,prediction_drift",
    "what=capture_dropped,decode_errors,label_late_count",
    "what=feature_value&stat=mean,q25,q75",
    "what=feature_drift&method=psi",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run explicitly, in release mode"]
async fn dashboard_load_with_3_models_100_features_1440_buckets() {
    let models: Vec<SyntheticModel> =
        (0..MODELS).map(|m| SyntheticModel::wide(&format!("model_{m}"), FEATURES, 3, BUCKETS / 2)).collect();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let start = now - now % BUCKET - BUCKET * BUCKETS as i64;
    let history = Arc::new(History::default());
    let fill = Instant::now();
    for index in 0..BUCKETS {
        history.record(GLOBAL_MODEL, &global_bucket(start + BUCKET * index as i64, index));
        for model in &models {
            history.record(&model.name, &model.bucket(start + BUCKET * index as i64, index));
            if index >= 5 {
                history.record(&model.name, &model.labels(start + BUCKET * (index - 5) as i64, index - 5));
            }
        }
    }
    let fill = fill.elapsed();
    // Resident memory of the whole test process (history, runtime, allocator slack).
    let rss = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).map(str::to_string))
        .unwrap_or_default();
    println!("process memory after fill: {rss}");
    println!(
        "history: {} models, {} points, filled in {:.1} s (generation included)",
        history.models().len(),
        history.total_points(),
        fill.as_secs_f64()
    );

    let addr = serve(routes(history.clone())).await;
    let client = reqwest::Client::new();
    for range in [86_400, 3_600] {
        for run in 1..=2 {
            let mut bytes = 0;
            let started = Instant::now();
            for q in PAGE_QUERIES {
                let url = format!("http://{addr}/api/models/model_0/series?{q}&last={range}");
                bytes += client.get(url).send().await.unwrap().bytes().await.unwrap().len();
            }
            println!(
                "server, range {range} s, run {run}: the page's 4 queries of one model answered over HTTP in {:.1} ms, {:.2} MB JSON",
                started.elapsed().as_secs_f64() * 1e3,
                bytes as f64 / 1e6
            );
        }
    }

    let producer = {
        let history = history.clone();
        tokio::spawn(async move {
            for index in BUCKETS..BUCKETS + 300 {
                tokio::time::sleep(Duration::from_secs(2)).await;
                history.record(GLOBAL_MODEL, &global_bucket(start + BUCKET * index as i64, index));
                for model in &models {
                    history.record(&model.name, &model.bucket(start + BUCKET * index as i64, index));
                }
            }
        })
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("browser").join("dashboard.mjs");
    for range in ["86400", "3600"] {
        for (run, mode) in [(1, "lazy"), (1, "eager"), (2, "lazy"), (2, "eager")] {
            let output = tokio::process::Command::new("node")
                .arg(&script)
                .args(["--url", &format!("http://{addr}/"), "--bench", "--range", range])
                .args((mode == "eager").then_some("--eager"))
                .kill_on_drop(true)
                .output()
                .await
                .expect("node runs");
            assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
            println!("browser, range {range} s, {mode}, run {run}: {}", String::from_utf8_lossy(&output.stdout).trim());
        }
    }
    producer.abort();
    history.close();
}
