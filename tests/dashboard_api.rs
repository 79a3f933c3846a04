//! The dashboard's JSON API, event stream, page and history, through a real HTTP
//! server on loopback serving the dashboard's admin routes.

#[path = "browser/synthetic.rs"]
mod synthetic;

use mltap::admin::dashboard::routes;
use mltap::admin::history::{History, HistoryConfig};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use synthetic::{serve, SyntheticModel};

const T0: i64 = 1_764_144_000; // 2025-11-26T08:00:00Z, a bucket start

fn iris() -> SyntheticModel {
    SyntheticModel::new(
        "iris",
        &["sepal_length", "petal_width", "x_10", "x_2"],
        &["setosa", "versicolor", "virginica"],
        5,
    )
}

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, Value) {
    let response = reqwest::get(format!("http://{addr}{path}")).await.expect("request");
    let status = response.status().as_u16();
    let body = response.text().await.expect("body");
    (status, serde_json::from_str(&body).unwrap_or(Value::String(body)))
}

async fn server_with(history: Arc<History>) -> std::net::SocketAddr {
    serve(routes(history)).await
}

#[tokio::test]
async fn models_lists_streams_features_classes_and_latest_bucket() {
    let history = Arc::new(History::default());
    let model = iris();
    for i in 0..3 {
        history.record("iris", &model.bucket(T0 + 60 * i, i as u64));
    }
    let addr = server_with(history).await;
    let (status, body) = get(addr, "/api/models").await;
    assert_eq!(status, 200, "{body}");
    let m = &body["models"][0];
    assert_eq!(m["model"], "iris");
    assert_eq!(m["streams"], serde_json::json!([{"version": "1", "signature": "serving_default"}]));
    assert_eq!(m["features"], serde_json::json!(["petal_width", "sepal_length", "x_2", "x_10"]));
    assert_eq!(m["classes"], serde_json::json!(["setosa", "versicolor", "virginica"]));
    assert_eq!(m["latest_bucket"], T0 + 120);
    assert_eq!(m["first_bucket"], T0);
    assert_eq!(m["bucket_seconds"], 60);
    assert!(m["metrics"].as_array().unwrap().iter().any(|w| w == "feature_drift"));
}

#[tokio::test]
async fn series_are_aligned_on_buckets_and_filtered_by_labels_and_range() {
    let history = Arc::new(History::default());
    let model = iris();
    for i in 0..5 {
        history.record("iris", &model.bucket(T0 + 60 * i, i as u64));
    }
    let addr = server_with(history).await;
    let (status, body) = get(addr, "/api/models/iris/series?what=feature_value&feat_name=x_2&stat=mean,q25").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["buckets"].as_array().unwrap().len(), 5);
    let series = body["series"].as_array().unwrap();
    assert_eq!(series.len(), 2, "{body}");
    for s in series {
        assert_eq!(s["labels"]["feat_name"], "x_2");
        assert_eq!(s["values"].as_array().unwrap().len(), 5);
        assert!(s["values"].as_array().unwrap().iter().all(Value::is_f64));
    }
    let (_, last) = get(addr, "/api/models/iris/series?what=buffer_count&last=60").await;
    assert_eq!(last["buckets"], serde_json::json!([T0 + 180, T0 + 240]));
    let (_, since) =
        get(addr, &format!("/api/models/iris/series?what=buffer_count&since={}&until={}", T0 + 60, T0 + 60)).await;
    assert_eq!(since["buckets"], serde_json::json!([T0 + 60]));
    let (_, none) = get(addr, "/api/models/iris/series?what=feature_value&feat_name=nope").await;
    assert_eq!(none["series"], serde_json::json!([]));
}

#[tokio::test]
async fn unknown_models_get_404_and_malformed_queries_get_400_with_a_message() {
    let history = Arc::new(History::default());
    history.record("iris", &iris().bucket(T0, 0));
    let addr = server_with(history).await;
    let (status, body) = get(addr, "/api/models/nope/series").await;
    assert_eq!(status, 404);
    assert!(body["error"].as_str().unwrap().contains("nope"), "{body}");
    let (status, body) = get(addr, "/api/models/iris/series?since=yesterday").await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("since"), "{body}");
    let (status, _) = get(addr, "/api/models/ir%ZZis/series").await;
    assert_eq!(status, 400);
}

/// Reads the event stream until `count` events named `name` arrived.
async fn read_events(response: &mut reqwest::Response, name: &str, count: usize) -> Vec<Value> {
    let mut text = String::new();
    let mut events = Vec::new();
    while events.len() < count {
        let chunk = tokio::time::timeout(Duration::from_secs(10), response.chunk())
            .await
            .expect("an event within 10 s")
            .expect("stream readable")
            .expect("stream still open");
        text.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            if block.lines().any(|l| l == format!("event: {name}")) {
                let data = block.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
                events.push(serde_json::from_str(data).unwrap());
            }
        }
    }
    events
}

#[tokio::test]
async fn events_stream_one_event_per_closed_bucket_and_names_older_buckets_for_labels() {
    let history = Arc::new(History::default());
    let model = iris();
    history.record("iris", &model.bucket(T0, 0));
    let addr = server_with(history.clone()).await;
    let mut response = reqwest::get(format!("http://{addr}/api/events")).await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    // The stream greets first, so the subscription exists before anything is recorded.
    let first = response.chunk().await.unwrap().unwrap();
    assert!(std::str::from_utf8(&first).unwrap().contains("connected"));
    history.record("iris", &model.bucket(T0 + 60, 1));
    history.record("iris", &model.labels(T0, 0));
    let events = read_events(&mut response, "bucket", 2).await;
    assert_eq!(events[0]["model"], "iris");
    assert_eq!(events[0]["buckets"], serde_json::json!([T0 + 60]));
    assert_eq!(events[0]["latest_bucket"], T0 + 60);
    assert_eq!(events[1]["buckets"], serde_json::json!([T0]));
    let (_, acc) = get(addr, "/api/models/iris/series?what=accuracy&class_name=setosa").await;
    assert!(acc["series"][0]["values"][0].is_f64(), "{acc}");
    assert!(acc["series"][0]["values"][1].is_null(), "{acc}");
}

#[tokio::test]
async fn closing_the_history_ends_open_event_streams() {
    let history = Arc::new(History::default());
    let addr = server_with(history.clone()).await;
    let mut response = reqwest::get(format!("http://{addr}/api/events")).await.unwrap();
    response.chunk().await.unwrap().unwrap();
    history.close();
    let end = tokio::time::timeout(Duration::from_secs(10), response.chunk()).await.expect("stream ends");
    assert!(end.unwrap().is_none());
}

#[tokio::test]
async fn the_page_and_its_assets_are_served_from_the_binary_without_external_urls() {
    let addr = server_with(Arc::new(History::default())).await;
    let page = reqwest::get(format!("http://{addr}/")).await.unwrap();
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    let etag = page.headers()["etag"].clone();
    let html = page.text().await.unwrap();
    assert!(html.contains(r#"src="/assets/dashboard/app.js""#));
    assert!(!html.contains("src=\"http") && !html.contains("href=\"http"), "{html}");
    let js = reqwest::get(format!("http://{addr}/assets/dashboard/app.js")).await.unwrap();
    assert_eq!(js.headers()["content-type"], "text/javascript; charset=utf-8");
    let js = js.text().await.unwrap();
    // uPlot is bundled, not fetched: its class names are in the script.
    assert!(js.contains("u-legend") && js.len() > 20_000);
    assert!(!js.contains("import(\"http") && !js.contains("fetch(\"http"));
    let css = reqwest::get(format!("http://{addr}/assets/dashboard/app.css")).await.unwrap().text().await.unwrap();
    assert!(css.contains(".uplot"));
    let again =
        reqwest::Client::new().get(format!("http://{addr}/")).header("if-none-match", etag).send().await.unwrap();
    assert_eq!(again.status(), 304);
}

#[test]
fn history_reloads_anodot_files_including_rewritten_ones_and_skips_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("anodot").join("iris");
    std::fs::create_dir_all(&model_dir).unwrap();
    let model = iris();
    for i in 0..3i64 {
        let mut points = model.bucket(T0 + 60 * i, i as u64);
        if i == 1 {
            // A file rewritten later with label metrics of an older bucket appended.
            points.extend(model.labels(T0, 0));
        }
        let name = format!("20251126T08{:02}00Z.json", i);
        std::fs::write(model_dir.join(name), serde_json::to_vec(&points).unwrap()).unwrap();
    }
    std::fs::write(model_dir.join("20251126T080300Z.json"), b"[{\"truncated\":").unwrap();
    std::fs::write(model_dir.join("20251126T080400Z.json.tmp"), b"partial").unwrap();
    let history = History::default();
    let report = history.load_from_dir(dir.path());
    assert_eq!(report.files, 3);
    assert_eq!(report.skipped.len(), 1, "{report:?}");
    assert!(report.skipped[0].1.contains("Anodot"), "{report:?}");
    let models = history.models();
    assert_eq!(models[0].buckets, 3);
    assert_eq!(models[0].latest_bucket, T0 + 120);
    let acc = history
        .series("iris", &mltap::admin::history::SeriesQuery { what: vec!["accuracy".into()], ..Default::default() })
        .unwrap();
    assert!(acc.series.iter().all(|s| s.values[0].is_some() && s.values[1].is_none()));
    // Loading again is idempotent: rewrites replace values.
    let before = history.total_points();
    history.load_from_dir(dir.path());
    assert_eq!(history.total_points(), before);
    assert_eq!(History::default().load_from_dir(&dir.path().join("missing")).files, 0);
}

#[test]
fn history_keeps_at_most_the_configured_buckets_per_model() {
    let history = History::new(HistoryConfig { max_buckets_per_model: 4, max_points: 1_000_000 });
    let model = iris();
    for i in 0..10 {
        history.record("iris", &model.bucket(T0 + 60 * i, i as u64));
    }
    let m = &history.models()[0];
    assert_eq!((m.buckets, m.first_bucket, m.latest_bucket), (4, T0 + 360, T0 + 540));
    assert_eq!(history.total_points(), 4 * model.bucket(T0, 0).len());
    // Labels for a bucket already evicted are dropped, not resurrected.
    history.record("iris", &model.labels(T0, 0));
    assert_eq!(history.models()[0].first_bucket, T0 + 360);
}

#[test]
fn the_point_budget_evicts_the_oldest_buckets_across_models() {
    let per_bucket = iris().bucket(T0, 0).len();
    let history = History::new(HistoryConfig { max_buckets_per_model: 100, max_points: 5 * per_bucket });
    let iris = iris();
    let mut other = iris.clone();
    other.name = "other".into();
    for i in 0..3 {
        history.record("iris", &iris.bucket(T0 + 60 * i, i as u64));
    }
    for i in 3..6 {
        history.record("other", &other.bucket(T0 + 60 * i, i as u64));
    }
    assert!(history.total_points() <= 5 * per_bucket);
    let models = history.models();
    let iris_summary = models.iter().find(|m| m.model == "iris").unwrap();
    assert_eq!((iris_summary.buckets, iris_summary.first_bucket), (2, T0 + 60));
    assert_eq!(models.iter().find(|m| m.model == "other").unwrap().buckets, 3);
}

#[tokio::test]
async fn events_can_be_limited_to_one_model() {
    let history = Arc::new(History::default());
    let addr = server_with(history.clone()).await;
    let mut response = reqwest::get(format!("http://{addr}/api/events?model=iris")).await.unwrap();
    response.chunk().await.unwrap().unwrap();
    let mut other = iris();
    other.name = "other".into();
    history.record("other", &other.bucket(T0, 0));
    history.record("iris", &iris().bucket(T0 + 60, 1));
    let events = read_events(&mut response, "bucket", 1).await;
    assert_eq!(events[0]["model"], "iris");
}

#[tokio::test]
async fn events_tell_a_subscriber_that_fell_behind_to_refetch() {
    let history = Arc::new(History::default());
    let addr = server_with(history.clone()).await;
    let mut response = reqwest::get(format!("http://{addr}/api/events")).await.unwrap();
    response.chunk().await.unwrap().unwrap();
    let model = iris();
    // More updates than the stream buffers, recorded before the client reads any.
    for i in 0..300 {
        history.record("iris", &model.labels(T0 + 60 * i, i as u64));
    }
    let lagged = read_events(&mut response, "lagged", 1).await;
    assert!(lagged[0]["missed"].as_u64().unwrap() > 0, "{lagged:?}");
}

#[test]
fn loading_reads_only_the_newest_files_the_history_can_hold() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("anodot").join("iris");
    std::fs::create_dir_all(&model_dir).unwrap();
    let model = iris();
    for i in 0..6i64 {
        let name = format!("20251126T08{:02}00Z.json", i);
        std::fs::write(model_dir.join(name), serde_json::to_vec(&model.bucket(T0 + 60 * i, i as u64)).unwrap())
            .unwrap();
    }
    let history = History::new(HistoryConfig { max_buckets_per_model: 2, max_points: 1_000_000 });
    let report = history.load_from_dir(dir.path());
    assert_eq!(report.files, 2);
    let m = &history.models()[0];
    assert_eq!((m.first_bucket, m.latest_bucket), (T0 + 240, T0 + 300));
}
