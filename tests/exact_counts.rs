//! Counts that do not depend on load: the real proxy and worker in front of a fake TF
//! Serving on loopback, with a capture queue far too small for a burst of concurrent
//! requests. Statistics are computed from a sample; request, row and class counts in
//! the Anodot files are exact.

mod support;

use std::path::{Path, PathBuf};
use support::fake_tfserving::{grpc_fixtures, rest_fixtures, FakeTfServing};
use support::mltap::{channel, config, Mltap};
use support::raw_codec::call_raw;
use tokio::task::JoinSet;

/// gRPC `Predict` calls of the 64-row fixture, and REST `:predict` calls of 3 rows.
const GRPC_CALLS: usize = 600;
const REST_CALLS: usize = 150;
/// Calls in flight at once on each protocol.
const CONCURRENCY: usize = 64;

fn all_points(dir: &Path) -> Vec<serde_json::Value> {
    let mut points = Vec::new();
    for model in std::fs::read_dir(dir.join("anodot")).expect("Anodot files were written") {
        for file in std::fs::read_dir(model.unwrap().path()).unwrap() {
            let text = std::fs::read_to_string(file.unwrap().path()).unwrap();
            points.extend(serde_json::from_str::<Vec<serde_json::Value>>(&text).unwrap());
        }
    }
    points
}

fn values<'p>(points: &'p [serde_json::Value], what: &'p str) -> impl Iterator<Item = f64> + 'p {
    points.iter().filter(move |p| p["properties"]["what"] == what).map(|p| p["value"].as_f64().unwrap())
}

/// An output dir outside the system temp dir, which `Mltap::stop` would remove before
/// the test reads the files.
fn output_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_overload_request_and_row_counts_are_exact_and_statistics_are_sampled() {
    let fake = FakeTfServing::start().await;
    let mut config = config(&fake.grpc_url(), &fake.rest_url());
    let dir = output_dir("exact-counts");
    config.output_dir = dir.clone();
    // Two exchanges: far too few for the burst, so most of it is shed from statistics.
    config.capture.queue_exchanges = 2;
    let mltap = Mltap::start(config).await;

    let grpc_case = grpc_fixtures().into_iter().find(|f| f.name == "batch64x16").unwrap();
    let rest_case = rest_fixtures().into_iter().find(|f| f.name == "row_single_input").unwrap();
    let grpc_channel = channel(mltap.grpc_url()).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let rest_url = format!("{}{}", mltap.rest_url(), rest_case.path);

    let mut calls = JoinSet::new();
    for lane in 0..CONCURRENCY {
        let (channel, case) = (grpc_channel.clone(), grpc_case.clone());
        calls.spawn(async move {
            for _ in (lane..GRPC_CALLS).step_by(CONCURRENCY) {
                let answer = call_raw(&channel, &case.path, case.request.clone(), &[]).await.expect("gRPC answer");
                assert_eq!(answer.get_ref(), &case.response, "responses pass unchanged under overload");
            }
        });
        let (http, url, case) = (http.clone(), rest_url.clone(), rest_case.clone());
        calls.spawn(async move {
            for _ in (lane..REST_CALLS).step_by(CONCURRENCY) {
                let answer = http.post(&url).body(case.request.clone()).send().await.expect("REST answer");
                assert_eq!(answer.status(), 200);
                assert_eq!(answer.bytes().await.unwrap(), case.response);
            }
        });
    }
    while let Some(done) = calls.join_next().await {
        done.expect("every call succeeds");
    }
    mltap.stop().await;

    let points = all_points(&dir);
    let requests: f64 = values(&points, "request_count").sum();
    assert_eq!(requests, (GRPC_CALLS + REST_CALLS) as f64, "every request is counted once");
    let rows = (GRPC_CALLS * 64 + REST_CALLS * 3) as f64;
    assert_eq!(values(&points, "prediction_count").sum::<f64>(), rows, "every row's predicted class is counted");
    assert_eq!(values(&points, "buffer_count").sum::<f64>(), rows, "every row is counted");
    let fractions: Vec<f64> = values(&points, "sampled_fraction").collect();
    assert!(!fractions.is_empty(), "the sampling ratio is reported");
    assert!(fractions.iter().all(|f| (0.0..=1.0).contains(f)), "{fractions:?}");
    assert!(fractions.iter().any(|f| *f < 1.0), "statistics were computed from a sample: {fractions:?}");
    assert!(values(&points, "feature_value").count() > 0, "sampled exchanges still give feature statistics");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_overload_every_exchange_is_sampled() {
    let fake = FakeTfServing::start().await;
    let mut config = config(&fake.grpc_url(), &fake.rest_url());
    let dir = output_dir("all-sampled");
    config.output_dir = dir.clone();
    let mltap = Mltap::start(config).await;
    let case = grpc_fixtures().into_iter().find(|f| f.name == "batch64x16").unwrap();
    let grpc_channel = channel(mltap.grpc_url()).await;
    for _ in 0..5 {
        call_raw(&grpc_channel, &case.path, case.request.clone(), &[]).await.expect("gRPC answer");
    }
    mltap.stop().await;

    let points = all_points(&dir);
    assert_eq!(values(&points, "request_count").sum::<f64>(), 5.0);
    assert_eq!(values(&points, "buffer_count").sum::<f64>(), 5.0 * 64.0);
    let fractions: Vec<f64> = values(&points, "sampled_fraction").collect();
    assert!(!fractions.is_empty() && fractions.iter().all(|f| *f == 1.0), "{fractions:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
