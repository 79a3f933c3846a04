//! End-to-end: headless Chromium (Debian's package, driven by playwright-core from
//! `tests/browser/`) opens the dashboard served over loopback from a history fed with
//! realistic synthetic points, checks that the charts hold data points for classes,
//! features and accuracy (and, for a regression model, its predictions' distribution
//! and MAE/RMSE), waits for a bucket pushed live by Server-Sent Events, and
//! saves a screenshot; then the same against `mltap demo` itself. It fails, never
//! skips, when Chromium or Node is missing.

#[path = "browser/synthetic.rs"]
mod synthetic;

use mltap::admin::dashboard::routes;
use mltap::admin::history::History;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use synthetic::{global_bucket, serve, SyntheticModel, GLOBAL_MODEL};

const BUCKET: i64 = 60;
const PAST_BUCKETS: u64 = 90;
/// Label metrics arrive this many buckets after their predictions.
const LABEL_DELAY: u64 = 5;

/// `MLTAP_CHROMIUM`, else `chromium` (or `chromium-browser`) on `PATH`.
fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("MLTAP_CHROMIUM") {
        return PathBuf::from(path);
    }
    let dirs: Vec<PathBuf> = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    ["chromium", "chromium-browser"]
        .iter()
        .flat_map(|name| dirs.iter().map(move |dir| dir.join(name)))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| PathBuf::from("chromium"))
}

/// Installs playwright-core from the lockfile when it is not there yet; once per
/// process, since the tests of this file run in parallel and share the directory.
fn ensure_playwright(dir: &Path) {
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _once = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    if dir.join("node_modules").join("playwright-core").exists() {
        return;
    }
    let status = std::process::Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(dir)
        .status()
        .unwrap_or_else(|e| panic!("the dashboard browser test needs npm to install playwright-core: {e}"));
    assert!(status.success(), "`npm ci` in {} failed ({status}); the browser test cannot run", dir.display());
}

fn record_bucket(history: &History, models: &[SyntheticModel], start: i64, index: u64) {
    history.record(GLOBAL_MODEL, &global_bucket(start + BUCKET * index as i64, index));
    for model in models {
        history.record(&model.name, &model.bucket(start + BUCKET * index as i64, index));
        if index >= LABEL_DELAY {
            let labelled = index - LABEL_DELAY;
            history.record(&model.name, &model.labels(start + BUCKET * labelled as i64, labelled));
        }
    }
}

/// Chromium's path, after checking that Chromium, Node and playwright-core are there;
/// a missing tool fails the test with how to install it.
fn require_browser_tools() -> PathBuf {
    let chromium = chromium();
    assert!(
        chromium.exists(),
        "Chromium is required by the dashboard browser test and was not found ({}): install it with \
         `apt-get install -y chromium` (or point MLTAP_CHROMIUM at it)",
        chromium.display()
    );
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "Node.js is required by the dashboard browser test: install it with `apt-get install -y nodejs npm`"
    );
    ensure_playwright(&browser_dir());
    chromium
}

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("browser")
}

/// Where the screenshot goes: the README's copy when asked to refresh it, else the
/// test's scratch directory (so that test runs leave the tree clean).
fn screenshot_path(name: &str) -> PathBuf {
    if std::env::var_os("MLTAP_UPDATE_SCREENSHOT").is_some() {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs").join("screenshot-dashboard.png")
    } else {
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(name)
    }
}

/// Runs the browser check against `url`, with a bound on its whole run.
async fn run_browser_check(chromium: &Path, url: &str, screenshot: &Path, extra: &[&str]) -> std::process::Output {
    let run = tokio::process::Command::new("node")
        .arg(browser_dir().join("dashboard.mjs"))
        .args(["--url", url])
        .arg("--chromium")
        .arg(chromium)
        .arg("--screenshot")
        .arg(screenshot)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("the browser check did not finish within 240 s")
        .expect("node could not be started")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_classes_features_and_accuracy_and_updates_live_in_chromium() {
    let chromium = tokio::task::spawn_blocking(require_browser_tools).await.unwrap();
    let models = vec![
        SyntheticModel::new(
            "iris",
            &["sepal_length", "sepal_width", "petal_length", "petal_width"],
            &["setosa", "versicolor", "virginica"],
            PAST_BUCKETS / 2,
        ),
        SyntheticModel::wide("churn", 12, 2, PAST_BUCKETS / 2),
    ];
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let start = now - now % BUCKET - BUCKET * PAST_BUCKETS as i64;
    let history = Arc::new(History::default());
    for index in 0..PAST_BUCKETS {
        record_bucket(&history, &models, start, index);
    }
    let addr = serve(routes(history.clone())).await;

    // Buckets keep closing while the browser watches, as the worker would do; bounded
    // so that the task ends by itself.
    let producer = {
        let history = history.clone();
        tokio::spawn(async move {
            for index in PAST_BUCKETS..PAST_BUCKETS + 400 {
                tokio::time::sleep(Duration::from_millis(700)).await;
                record_bucket(&history, &models, start, index);
            }
        })
    };

    let screenshot = screenshot_path("screenshot-dashboard-synthetic.png");
    let output = run_browser_check(&chromium, &format!("http://{addr}/?model=iris"), &screenshot, &[]).await;
    producer.abort();
    history.close();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "browser check failed ({}):\n{stderr}\n{stdout}", output.status);
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("the browser check prints a summary");
    assert_eq!(summary["ok"], true, "{summary}");
    assert_eq!(summary["features"], 4, "{summary}");
    assert_eq!(summary["classes"], serde_json::json!(["setosa", "versicolor", "virginica"]), "{summary}");
    assert!(summary["liveUpdates"].as_u64().unwrap_or(0) >= 1, "{summary}");
    assert!(screenshot.exists(), "no screenshot at {}", screenshot.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_a_regression_models_predictions_and_errors_live_in_chromium() {
    let chromium = tokio::task::spawn_blocking(require_browser_tools).await.unwrap();
    let models = vec![SyntheticModel::regression(
        "eta",
        &["distance_km", "items", "hour_of_day", "courier_load"],
        PAST_BUCKETS / 2,
    )];
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let start = now - now % BUCKET - BUCKET * PAST_BUCKETS as i64;
    let history = Arc::new(History::default());
    for index in 0..PAST_BUCKETS {
        record_bucket(&history, &models, start, index);
    }
    let addr = serve(routes(history.clone())).await;
    let producer = {
        let history = history.clone();
        tokio::spawn(async move {
            for index in PAST_BUCKETS..PAST_BUCKETS + 400 {
                tokio::time::sleep(Duration::from_millis(700)).await;
                record_bucket(&history, &models, start, index);
            }
        })
    };

    let screenshot = screenshot_path("screenshot-dashboard-regression.png");
    let output =
        run_browser_check(&chromium, &format!("http://{addr}/?model=eta"), &screenshot, &["--regression"]).await;
    producer.abort();
    history.close();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "browser check failed ({}):\n{stderr}\n{stdout}", output.status);
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("the browser check prints a summary");
    assert_eq!(summary["ok"], true, "{summary}");
    assert_eq!(summary["features"], 4, "{summary}");
    assert!(summary["liveUpdates"].as_u64().unwrap_or(0) >= 1, "{summary}");
    assert!(screenshot.exists(), "no screenshot at {}", screenshot.display());
}

/// The same check against the real thing: `mltap demo` (model server, proxy, traffic,
/// delayed labels), its dashboard found in the demo's printout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_of_mltap_demo_shows_classes_features_and_accuracy_live_in_chromium() {
    use tokio::io::AsyncBufReadExt;
    let chromium = tokio::task::spawn_blocking(require_browser_tools).await.unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut demo = tokio::process::Command::new(env!("CARGO_BIN_EXE_mltap"))
        .args(["demo", "--for", "150s", "--bucket", "2s", "--output-dir"])
        .arg(out.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("mltap demo starts");
    let mut lines = tokio::io::BufReader::new(demo.stdout.take().unwrap()).lines();
    let find_dashboard = async {
        while let Some(line) = lines.next_line().await.ok().flatten() {
            if let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://")) {
                if line.contains("dashboard") {
                    return Some(url.to_string());
                }
            }
        }
        None
    };
    let url = tokio::time::timeout(Duration::from_secs(60), find_dashboard)
        .await
        .expect("the demo printed its dashboard address within 60 s")
        .expect("the demo's printout names the dashboard");
    // Keep reading the printout so the demo never blocks on a full pipe.
    let drain = tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let screenshot = screenshot_path("screenshot-dashboard-demo.png");
    let output = run_browser_check(
        &chromium,
        &format!("{}?model=churn", url.trim_end_matches('/').to_string() + "/"),
        &screenshot,
        &["--no-capture-health", "--check-timeout-ms", "90000"],
    )
    .await;
    let _ = demo.kill().await;
    drain.abort();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "browser check against the demo failed ({}):\n{stderr}\n{stdout}", output.status);
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("the browser check prints a summary");
    assert_eq!(summary["ok"], true, "{summary}");
    assert!(summary["features"].as_u64().unwrap_or(0) >= 8, "the churn model's features are charted: {summary}");
    assert_eq!(summary["classes"].as_array().map(Vec::len), Some(3), "three churn classes: {summary}");
    assert!(summary["liveUpdates"].as_u64().unwrap_or(0) >= 1, "{summary}");
    assert!(screenshot.exists(), "no screenshot at {}", screenshot.display());
}
