//! `/metrics` of the real `mltap serve` binary after real traffic (REST predicts from
//! the TF Serving fixtures through the fake TF Serving), labels posted to the admin
//! port and garbage payloads: the counters, units, the label accuracy gauge and the
//! build info are there with the right values; `promtool check metrics` finds nothing;
//! a real Prometheus server scraping mltap (OpenMetrics) answers queries on requests,
//! decode errors and real accuracy; every metric the Grafana dashboard and the alert
//! rules use is exported.
//!
//! Needs `promtool` and `prometheus` (Debian's `prometheus` package; scripts/test
//! installs it).

mod support;

use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::fake_tfserving::FakeTfServing;
use support::mltap::channel;
use support::raw_codec::call_raw;

const LABELS_TOKEN: &str = "scrape-test-token";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn wait_port(port: u16) {
    for _ in 0..400 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("port {port} did not open");
}

fn tool(name: &str) -> PathBuf {
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let path = dir.join(name);
        if path.is_file() {
            return path;
        }
    }
    panic!("`{name}` is not installed: `apt-get install -y prometheus` (scripts/test does it)");
}

/// Kills a child process when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One sample of the exposition text.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (series, value) = line.rsplit_once(' ').expect("a sample line has a value");
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut map = BTreeMap::new();
        // Label values here hold no `",` sequence.
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once("=\"").expect("label=\"value\"");
            map.insert(k.to_string(), v.trim_end_matches('"').to_string());
        }
        samples.push(Sample { name: name.to_string(), labels: map, value: value.parse().expect("a number") });
    }
    samples
}

fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .collect()
}

/// The metric names a PromQL expression mentions (identifiers starting `mltap_` or
/// `process_`).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let boundary = i == 0 || !(chars[i - 1].is_ascii_alphanumeric() || chars[i - 1] == '_');
        if boundary && chars[i].is_ascii_alphabetic() {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if word.starts_with("mltap_") || word.starts_with("process_") {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

async fn scrape(client: &reqwest::Client, admin: &str) -> String {
    let response = client.get(format!("{admin}/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap().to_string();
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    response.text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_prometheus_conventions_after_traffic_labels_and_garbage() {
    let fake = FakeTfServing::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("mltap.toml");
    std::fs::write(
        &config,
        "[monitor]\ngrace_seconds = 1\nreference_buckets = 1\n\n[labels]\ntoken_env = \"MLTAP_SCRAPE_LABELS_TOKEN\"\n",
    )
    .unwrap();
    let (grpc_port, rest_port, admin_port) = (free_port(), free_port(), free_port());
    let mltap = Running(
        Command::new(env!("CARGO_BIN_EXE_mltap"))
            .args(["serve", "--config"])
            .arg(&config)
            .args(["--grpc-listen", &format!("127.0.0.1:{grpc_port}")])
            .args(["--rest-listen", &format!("127.0.0.1:{rest_port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
            .args(["--grpc-upstream", &fake.grpc_url(), "--rest-upstream", &fake.rest_url()])
            .args(["--bucket", "1s", "--label-horizon", "2s", "--output-dir"])
            .arg(dir.path().join("out"))
            .env("MLTAP_SCRAPE_LABELS_TOKEN", LABELS_TOKEN)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for port in [grpc_port, rest_port, admin_port] {
        wait_port(port).await;
    }
    let (rest, admin) = (format!("http://127.0.0.1:{rest_port}"), format!("http://127.0.0.1:{admin_port}"));
    let client = reqwest::Client::builder().no_proxy().build().unwrap();

    // Four predicts of the iris fixture: its three rows are predicted class 1, 2, 2.
    let fixture = std::fs::read(support::fixtures_dir().join("rest/row_single_input.request.json")).unwrap();
    // One per bucket: the first bucket is the drift reference of the next ones.
    for i in 0..4 {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        let response = client
            .post(format!("{rest}/v1/models/iris:predict"))
            .header("x-request-id", format!("scrape-{i}"))
            .body(fixture.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        post_labels(&client, &admin, i).await;
    }
    // Garbage answered 200: an empty REST answer to iris (the model is in the URL) and
    // a gRPC Predict that is no protobuf, echoed back (no model can be read).
    let empty = client
        .post(format!("{rest}/v1/models/iris:predict"))
        .header("x-fake-empty", "1")
        .body(fixture.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(empty.status(), 200);
    let garbage = Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0x0f, 0x01]);
    let echoed = call_raw(
        &channel(format!("http://127.0.0.1:{grpc_port}")).await,
        "/tensorflow.serving.PredictionService/Predict",
        garbage,
        &[("x-fake-echo", "1")],
    )
    .await;
    assert!(echoed.is_ok(), "{echoed:?}");

    // The traffic's bucket closes after 1 s + 1 s grace, its labels settle 2 s later.
    let mut text = String::new();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        text = scrape(&client, &admin).await;
        // The exchanges may straddle two buckets: wait for both to close and settle.
        let samples = parse(&text);
        let requests: f64 =
            find(&samples, "mltap_model_requests_total", &[("model", "iris")]).iter().map(|s| s.value).sum();
        let labels: f64 =
            find(&samples, "mltap_model_labels_total", &[("model", "iris")]).iter().map(|s| s.value).sum();
        let drift = text.contains("mltap_model_feature_drift{");
        if requests >= 5.0 && labels >= 12.0 && drift && text.contains("mltap_decode_errors_total{reason") {
            break;
        }
    }
    let samples = parse(&text);

    // Counters: the proxy's, the model's (cumulative over closed buckets), decode
    // errors with and without a model.
    let proxied =
        find(&samples, "mltap_requests_total", &[("protocol", "rest"), ("method", "predict"), ("status", "200")]);
    assert_eq!(proxied.iter().map(|s| s.value).sum::<f64>(), 5.0, "{text}");
    let model_requests = find(&samples, "mltap_model_requests_total", &[("model", "iris"), ("status", "200")]);
    assert_eq!(model_requests.iter().map(|s| s.value).sum::<f64>(), 5.0, "four predicts and the empty answer: {text}");
    assert_eq!(
        find(&samples, "mltap_model_rows_total", &[("model", "iris")]).iter().map(|s| s.value).sum::<f64>(),
        15.0,
        "the empty answer's request rows count too"
    );
    let predictions = find(&samples, "mltap_model_predictions_total", &[("model", "iris"), ("class", "class_2")]);
    assert_eq!(predictions.iter().map(|s| s.value).sum::<f64>(), 8.0, "{text}");
    let decode_errors = find(&samples, "mltap_decode_errors_total", &[]);
    assert!(decode_errors.iter().any(|s| s.labels.get("model").map(String::as_str) == Some("iris")), "{text}");
    assert!(decode_errors.iter().any(|s| !s.labels.contains_key("model") && s.value >= 1.0), "{text}");
    assert_eq!(
        find(&samples, "mltap_model_labels_total", &[("model", "iris")]).iter().map(|s| s.value).sum::<f64>(),
        12.0
    );

    // Units: seconds and bytes, a latency histogram per model, no per-bucket counts
    // posing as gauges, no milliseconds.
    let latency = find(&samples, "mltap_model_upstream_latency_seconds_count", &[("model", "iris")]);
    assert_eq!(latency.iter().map(|s| s.value).sum::<f64>(), 5.0, "four predicts and the garbage one: {text}");
    assert!(
        !find(&samples, "mltap_model_upstream_latency_seconds_bucket", &[("model", "iris"), ("le", "+Inf")]).is_empty()
    );
    assert!(!text.contains("_ms{") && !text.contains("_ms "), "{text}");
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let parts: Vec<&str> = line.split(' ').collect();
        let (name, kind) = (parts[2], parts[3]);
        if kind == "gauge" {
            assert!(!name.ends_with("_total") && !name.ends_with("_count"), "a gauge named like a counter: {line}");
        }
        if kind == "counter" {
            assert!(name.ends_with("_total"), "{line}");
        }
    }
    assert!(!find(&samples, "process_resident_memory_bytes", &[]).is_empty(), "{text}");
    assert!(!find(&samples, "process_cpu_seconds_total", &[]).is_empty(), "{text}");

    // Real accuracy of the latest settled bucket, with that bucket's start.
    let accuracy: Vec<&Sample> = find(&samples, "mltap_model_accuracy", &[("model", "iris")])
        .into_iter()
        .filter(|s| !s.labels.contains_key("class"))
        .collect();
    assert_eq!(accuracy.len(), 1, "{text}");
    assert!((accuracy[0].value - 8.0 / 12.0).abs() < 1e-6, "{text}");
    let settled = find(&samples, "mltap_model_label_bucket_start_seconds", &[("model", "iris")]);
    let closed = find(&samples, "mltap_model_bucket_start_seconds", &[("model", "iris")]);
    assert_eq!((settled.len(), closed.len()), (1, 1), "{text}");
    assert!(settled[0].value > 1.7e9 && settled[0].value <= closed[0].value, "{text}");

    // Build info.
    let build = find(&samples, "mltap_build_info", &[("version", env!("CARGO_PKG_VERSION"))]);
    assert_eq!(build.len(), 1, "{text}");
    assert_eq!(build[0].value, 1.0);
    let commit = &build[0].labels["commit"];
    assert!(commit == "unknown" || commit.chars().all(|c| c.is_ascii_hexdigit()), "{commit}");

    // promtool's linter finds nothing.
    let mut promtool = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    promtool.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let checked = promtool.wait_with_output().unwrap();
    let findings = format!("{}{}", String::from_utf8_lossy(&checked.stdout), String::from_utf8_lossy(&checked.stderr));
    assert!(checked.status.success() && findings.trim().is_empty(), "promtool check metrics: {findings}");

    // Every metric the Grafana dashboard and the alert rules use is exported (the
    // Anodot delivery's only with delivery on: declared in its source).
    let exported: BTreeSet<String> = samples
        .iter()
        .flat_map(|s| {
            let base = ["_bucket", "_sum", "_count"].iter().find_map(|x| s.name.strip_suffix(x)).map(str::to_string);
            std::iter::once(s.name.clone()).chain(base)
        })
        .collect();
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo("deploy/grafana/mltap.json")).unwrap()).unwrap();
    let mut used = BTreeSet::new();
    collect_exprs(&dashboard, &mut used);
    assert!(used.len() >= 10, "{used:?}");
    for name in &used {
        assert!(exported.contains(name), "the Grafana dashboard uses {name}, which mltap does not export");
    }
    let rules = std::fs::read_to_string(repo("deploy/prometheus/mltap.rules.yml")).unwrap();
    let delivery_source = std::fs::read_to_string(repo("src/sinks/anodot/metrics.rs")).unwrap();
    for name in metric_names(&rules) {
        let delivery = name.strip_prefix("mltap_").is_some_and(|n| delivery_source.contains(&format!("\"{n}\"")));
        assert!(exported.contains(&name) || delivery, "the alert rules use {name}, which mltap does not export");
    }

    // A real Prometheus scrapes mltap (in OpenMetrics) and answers queries.
    let prometheus_port = free_port();
    let prometheus_dir = dir.path().join("prometheus");
    std::fs::create_dir_all(&prometheus_dir).unwrap();
    std::fs::write(
        prometheus_dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: mltap\n    static_configs:\n      - targets: ['127.0.0.1:{admin_port}']\n",
            repo("deploy/prometheus/mltap.rules.yml").display()
        ),
    )
    .unwrap();
    let _prometheus = Running(
        Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", prometheus_dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", prometheus_dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{prometheus_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port(prometheus_port).await;
    let query = |q: &str| {
        let (client, q) = (client.clone(), q.to_string());
        async move {
            let url = format!("http://127.0.0.1:{prometheus_port}/api/v1/query");
            // Until its storage is ready Prometheus answers 503 in plain text: no result yet.
            let answer: serde_json::Value =
                client.get(url).query(&[("query", q.as_str())]).send().await.unwrap().json().await.unwrap_or_default();
            answer["data"]["result"].as_array().cloned().unwrap_or_default()
        }
    };
    let value = |result: &[serde_json::Value]| -> Option<f64> { result.first()?["value"][1].as_str()?.parse().ok() };
    let mut requests = None;
    for _ in 0..100 {
        requests = value(&query(r#"sum(mltap_requests_total{protocol="rest",status="200"})"#).await);
        if requests.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(requests, Some(5.0), "Prometheus scraped mltap_requests_total");
    let unknown = value(&query(r#"sum(mltap_decode_errors_total{model=""})"#).await);
    assert!(unknown.is_some_and(|v| v >= 1.0), "decode errors without a model: {unknown:?}");
    let iris = value(&query(r#"sum(mltap_decode_errors_total{model="iris"})"#).await);
    assert!(iris.is_some_and(|v| v >= 1.0), "decode errors of iris: {iris:?}");
    let accuracy = value(&query(r#"mltap_model_accuracy{model="iris",class=""}"#).await);
    assert!(accuracy.is_some_and(|v| (v - 8.0 / 12.0).abs() < 1e-6), "real accuracy: {accuracy:?}");
    let rules: serde_json::Value = client
        .get(format!("http://127.0.0.1:{prometheus_port}/api/v1/rules"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rules["data"]["groups"].as_array().map(Vec::len), Some(2), "the shipped rules load: {rules}");
    drop(mltap);
}

/// Posts the labels of request `scrape-{i}`: rows 0 and 1 right, row 2 wrong (so
/// accuracy is 2/3 in every bucket), before its bucket's label horizon passes.
async fn post_labels(client: &reqwest::Client, admin: &str, i: usize) {
    let label = |row: usize, label: usize| serde_json::json!({"id": format!("scrape-{i}:{row}"), "label": label});
    let post = |body: serde_json::Value| async move {
        let response =
            client.post(format!("{admin}/v1/labels")).bearer_auth(LABELS_TOKEN).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.json::<serde_json::Value>().await.unwrap()
    };
    // Predictions are recorded for labels off the hot path: the first label is posted
    // until it joins, then the others.
    let mut answer = serde_json::Value::Null;
    for _ in 0..100 {
        answer = post(serde_json::json!([label(0, 1)])).await;
        if answer["accepted"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(answer["accepted"], 1, "{answer}");
    let answer = post(serde_json::json!([label(1, 2), label(2, 0)])).await;
    assert_eq!(answer["accepted"], 2, "{answer}");
}

/// Every metric name in the `expr` of a dashboard's targets and template queries.
fn collect_exprs(value: &serde_json::Value, names: &mut BTreeSet<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr" | "definition", serde_json::Value::String(expr)) => names.extend(metric_names(expr)),
                    _ => collect_exprs(v, names),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, names)),
        _ => {}
    }
}
