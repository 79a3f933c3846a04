//! The `mltap demo` runner: starts the embedded model server, mltap in front of it
//! (the same composition as `mltap serve`), the traffic generator and the label
//! poster; prints where everything is, progress while it runs, and a summary of the
//! files written; then shuts everything down in order so that the last buckets and
//! labels are flushed.
//!
//! It reads what mltap produced only through its public outputs (the Anodot files).

use super::labels::{self, LabelPolicy, LabelStats};
use super::model::demo_models;
use super::server::ModelServer;
use super::traffic::{self, Targets, TrafficPlan, TrafficStats};
use crate::config::{Config, Flags, ModelConfig};
use crate::units::{format_duration, parse_duration, EXIT_CONFIG};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Bucket width of the demo unless `--bucket` says otherwise: short, so that metrics
/// show within seconds.
pub const DEMO_BUCKET: &str = "5s";
/// Label horizon of the demo unless `--label-horizon` says otherwise: labels arrive
/// within seconds, so buckets need not wait an hour for them.
pub const DEMO_LABEL_HORIZON: &str = "10s";
/// When the inputs drift if the demo runs until Ctrl-C.
pub const OPEN_ENDED_DRIFT_AT: Duration = Duration::from_secs(60);
/// Requests per second the demo sends: enough for every bucket to hold hundreds of
/// rows, little enough to leave the machine idle.
pub const DEMO_REQUESTS_PER_SECOND: f64 = 20.0;

/// Runs the demo on a runtime of its own; for the command line.
pub fn run_blocking(run_for: Option<&str>, serve: Flags) -> ExitCode {
    match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(runtime) => runtime.block_on(run(run_for, serve)),
        Err(error) => {
            eprintln!("mltap demo: cannot start the async runtime: {error}");
            ExitCode::from(1)
        }
    }
}

fn config_error(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("mltap: {message}");
    ExitCode::from(EXIT_CONFIG)
}

/// The address a `--grpc-upstream`/`--rest-upstream` URL asks the model server to
/// listen on, or a free loopback port.
fn upstream_bind(key: &str, url: Option<&str>) -> Result<SocketAddr, String> {
    let Some(url) = url else { return Ok(SocketAddr::from(([127, 0, 0, 1], 0))) };
    let uri: http::Uri = url.parse().map_err(|e| format!("configuration key `{key}`: `{url}` is not a URL ({e})"))?;
    let authority = uri.authority().ok_or_else(|| format!("configuration key `{key}`: `{url}` has no host:port"))?;
    let host = if authority.host() == "localhost" { "127.0.0.1" } else { authority.host() };
    let port = authority.port_u16().unwrap_or(80);
    format!("{host}:{port}").parse().map_err(|_| {
        format!("configuration key `{key}`: the demo serves its model at `{url}`, which needs an IP address and port")
    })
}

/// Runs the demo until `run_for` (`--for`) has passed or Ctrl-C, with mltap
/// configured by the `serve` flags.
pub async fn run(run_for: Option<&str>, mut serve: Flags) -> ExitCode {
    let run_for = match run_for.map(parse_duration).transpose() {
        Ok(d) => d,
        Err(problem) => return config_error(format!("configuration key `for` (from --for): {problem}")),
    };
    let drift_at = run_for.map(|d| d / 2).unwrap_or(OPEN_ENDED_DRIFT_AT);

    let grpc_bind = match upstream_bind("grpc_upstream", serve.grpc_upstream.as_deref()) {
        Ok(a) => a,
        Err(e) => return config_error(e),
    };
    let rest_bind = match upstream_bind("rest_upstream", serve.rest_upstream.as_deref()) {
        Ok(a) => a,
        Err(e) => return config_error(e),
    };
    let model_server = match ModelServer::bind(grpc_bind, rest_bind, demo_models()).await {
        Ok(server) => server,
        Err(error) => {
            return config_error(format!("the demo model server cannot listen on {grpc_bind} / {rest_bind}: {error}"))
        }
    };
    serve.grpc_upstream = Some(format!("http://{}", model_server.grpc_addr));
    serve.rest_upstream = Some(format!("http://{}", model_server.rest_addr));
    for listen in [&mut serve.grpc_listen, &mut serve.rest_listen, &mut serve.admin_listen] {
        listen.get_or_insert_with(|| "127.0.0.1:0".to_string());
    }
    serve.bucket.get_or_insert_with(|| DEMO_BUCKET.to_string());
    serve.label_horizon.get_or_insert_with(|| DEMO_LABEL_HORIZON.to_string());
    // mltap's own logs would drown the demo's printout; warnings still show.
    serve.log.get_or_insert_with(|| "warn".to_string());
    let mut config = match Config::load(&serve) {
        Ok(config) => config,
        Err(error) => {
            model_server.shutdown().await;
            return config_error(error);
        }
    };
    // The drift reference must be learned before the drift: unless the user chose
    // its length, it ends two buckets before the drift starts.
    if config.monitor.reference_buckets == crate::monitor::MonitorConfig::default().reference_buckets {
        let before_drift = (drift_at.as_secs_f64() / config.bucket.as_secs_f64()).floor() as usize;
        config.monitor.reference_buckets = before_drift.saturating_sub(2).clamp(1, config.monitor.reference_buckets);
    }
    // The demo's own label poster sends no token; its admin port is on loopback.
    if config.labels.token_env.is_none() {
        config.labels.allow_unauthenticated = true;
    }
    for model in demo_models() {
        let entry = config.models.entry(model.name.to_string()).or_insert_with(ModelConfig::default);
        if model.is_regression() {
            entry.task.get_or_insert(crate::tfserving::Task::Regression);
        } else {
            entry.class_names.get_or_insert_with(|| model.class_names.iter().map(|c| c.to_string()).collect());
        }
        // The demo keeps every call in the request log unless the configuration says otherwise.
        if config.request_log.sampling_rate == 0.0 {
            entry.request_log_sampling_rate.get_or_insert(1.0);
        }
    }
    // The filter was checked when the configuration loaded.
    let _ = crate::logging::init(&config.log, config.log_format);

    let mltap = match super::mltap::start(config.clone()).await {
        Ok(running) => running,
        Err(error) => {
            model_server.shutdown().await;
            return error;
        }
    };
    let started = SystemTime::now();
    let output_dir = config.output_dir.clone();
    let bucket = config.bucket;
    // Listening on 0.0.0.0 (a serve flag) is reached, and shown, as loopback.
    let addresses = super::mltap::Addresses {
        grpc: reachable(mltap.addresses.grpc),
        rest: reachable(mltap.addresses.rest),
        admin: reachable(mltap.addresses.admin),
    };
    print_banner(&addresses, &model_server, &config, run_for, drift_at);

    let traffic_stats = Arc::new(TrafficStats::default());
    let label_stats = Arc::new(LabelStats::default());
    let (label_sender, label_receiver) = mpsc::unbounded_channel();
    let traffic_stop = CancellationToken::new();
    let labels_abort = CancellationToken::new();
    let targets = Targets { grpc: format!("http://{}", addresses.grpc), rest: format!("http://{}", addresses.rest) };
    let plan = TrafficPlan { requests_per_second: DEMO_REQUESTS_PER_SECOND, drift_at, seed: seed() };
    let traffic_task =
        tokio::spawn(traffic::run(targets, plan, traffic_stats.clone(), Some(label_sender), traffic_stop.clone()));
    let policy = LabelPolicy::default();
    let labels_url = format!("http://{}/v1/labels", addresses.admin);
    let labels_task = tokio::spawn(labels::run(
        labels_url,
        policy.clone(),
        label_receiver,
        label_stats.clone(),
        labels_abort.clone(),
    ));

    // Until --for has passed or Ctrl-C, with a progress line every few seconds.
    let deadline = run_for.map(|d| tokio::time::Instant::now() + d);
    let mut progress = tokio::time::interval(Duration::from_secs(5));
    progress.tick().await;
    let mut announced_drift = false;
    let mut interrupted = false;
    loop {
        let until_deadline = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = until_deadline => break,
            _ = tokio::signal::ctrl_c() => {
                interrupted = true;
                println!();
                println!("Ctrl-C: stopping traffic, posting the last labels (Ctrl-C again to skip)...");
                break;
            }
            _ = progress.tick() => {
                if !announced_drift && traffic_stats.drifted.load(Ordering::Relaxed) == 1 {
                    announced_drift = true;
                    println!(
                        "  >> drift: customers now call support more, pay more, come more from br and in; \
                         and what makes them churn has changed"
                    );
                }
                println!("{}", progress_line(started, &traffic_stats, &label_stats, &output_dir));
            }
        }
    }

    traffic_stop.cancel();
    let _ = traffic_task.await;
    // Labels of the last requests fall due within the policy's longest delay.
    let drain = policy.max_delay + Duration::from_secs(2);
    tokio::select! {
        _ = tokio::time::sleep(drain) => labels_abort.cancel(),
        _ = tokio::signal::ctrl_c(), if interrupted => labels_abort.cancel(),
        _ = async { while !labels_task.is_finished() { tokio::time::sleep(Duration::from_millis(100)).await } } => {}
    }
    let _ = labels_task.await;
    println!("{}", progress_line(started, &traffic_stats, &label_stats, &output_dir));
    println!("Stopping mltap (flushing open buckets)...");
    let mltap_result = mltap.stop().await;
    model_server.shutdown().await;

    let drift_epoch = started + drift_at;
    print_summary(started, drift_epoch, bucket, &traffic_stats, &label_stats, &output_dir);
    if let Err(error) = mltap_result {
        eprintln!("mltap demo: mltap failed: {error}");
        return ExitCode::from(1);
    }
    if traffic_stats.requests_ok.load(Ordering::Relaxed) == 0 {
        eprintln!("mltap demo: no request went through mltap; see the warnings above");
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

/// The address a local client uses to reach a listener: loopback for a wildcard one.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::from(([127, 0, 0, 1], addr.port())),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    }
}

fn seed() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(2019)
}

fn print_banner(
    addresses: &super::mltap::Addresses,
    model_server: &ModelServer,
    config: &Config,
    run_for: Option<Duration>,
    drift_at: Duration,
) {
    let files = config.output_dir.join("anodot");
    println!();
    println!(
        "mltap demo: a TF-Serving-compatible model server, mltap in front of it, drifting traffic and delayed labels"
    );
    println!();
    println!("  dashboard       http://{}/", addresses.admin);
    println!("  metrics         http://{}/metrics", addresses.admin);
    println!("  labels          POST http://{}/v1/labels", addresses.admin);
    println!("  files           {}/MODEL/*.json (one per {:?} bucket and model)", files.display(), config.bucket);
    println!(
        "  request log     {}/MODEL/*.tfrecord (tensorflow.serving.PredictionLog; docs/request-log.md)",
        crate::request_log::request_dir(&config.request_log, &config.output_dir).display()
    );
    println!("  mltap           gRPC {}   REST http://{}   (clients call these)", addresses.grpc, addresses.rest);
    println!("  model server    gRPC {}   REST http://{}", model_server.grpc_addr, model_server.rest_addr);
    println!("  models          churn (3 classes: stay, downgrade, churn), fraud (binary), eta (regression, minutes)");
    println!();
    println!("  try: curl -s http://{}/v1/models/churn/metadata", addresses.rest);
    println!();
    match run_for {
        Some(d) => println!(
            "Sending ~{DEMO_REQUESTS_PER_SECOND} requests/s (gRPC and REST) for {}; inputs drift after {}. Labels follow 1-5 s later.",
            format_duration(d),
            format_duration(drift_at)
        ),
        None => println!(
            "Sending ~{DEMO_REQUESTS_PER_SECOND} requests/s (gRPC and REST) until Ctrl-C; inputs drift after {}. Labels follow 1-5 s later.",
            format_duration(drift_at)
        ),
    }
    println!();
}

fn progress_line(started: SystemTime, traffic: &TrafficStats, labels: &LabelStats, output_dir: &Path) -> String {
    let elapsed = started.elapsed().unwrap_or_default().as_secs();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let mut line = format!(
        "  {elapsed:>4}s  requests {} (gRPC {}, REST {}, failed {}), rows {}  |  labels posted {} (accepted {}, unmatched {}, rejected {})",
        load(&traffic.requests_ok),
        load(&traffic.grpc),
        load(&traffic.rest),
        load(&traffic.requests_failed),
        load(&traffic.rows),
        load(&labels.posted),
        load(&labels.accepted),
        load(&labels.unmatched),
        load(&labels.rejected),
    );
    let missing = load(&labels.endpoint_missing);
    if missing > 0 {
        line.push_str(&format!(", {missing} dropped: no label endpoint"));
    }
    let failed = load(&labels.failed);
    if failed > 0 {
        line.push_str(&format!(", {failed} not delivered"));
    }
    line.push_str(&format!("  |  files {}", files_since(output_dir, started).len()));
    line
}

/// Anodot files written since `since`, sorted by path (model, then bucket start).
fn files_since(output_dir: &Path, since: SystemTime) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let Ok(models) = std::fs::read_dir(output_dir.join("anodot")) else { return files };
    for model in models.flatten() {
        let Ok(entries) = std::fs::read_dir(model.path()) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let fresh = entry.metadata().and_then(|m| m.modified()).map(|t| t >= since).unwrap_or(false);
            if fresh && path.extension().is_some_and(|e| e == "json") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Per bucket start, the headline metrics found in the files of one model.
#[derive(Debug, Default, Clone, PartialEq)]
struct BucketSummary {
    rows: Option<f64>,
    estimated_accuracy: Option<f64>,
    accuracy: Option<f64>,
    /// The largest per-feature PSI and its feature.
    worst_psi: Option<(f64, String)>,
}

/// Reads the headline metrics of each model's buckets from its files.
fn summarize(files: &[PathBuf]) -> BTreeMap<String, BTreeMap<i64, BucketSummary>> {
    let mut models: BTreeMap<String, BTreeMap<i64, BucketSummary>> = BTreeMap::new();
    for file in files {
        let Ok(text) = std::fs::read_to_string(file) else { continue };
        let Ok(Value::Array(points)) = serde_json::from_str::<Value>(&text) else { continue };
        for point in points {
            let properties = &point["properties"];
            let (Some(what), Some(model), Some(timestamp), Some(value)) = (
                properties["what"].as_str(),
                properties["model"].as_str(),
                point["timestamp"].as_i64(),
                point["value"].as_f64(),
            ) else {
                continue;
            };
            let bucket = models.entry(model.to_string()).or_default().entry(timestamp).or_default();
            let overall = properties.get("class_name").is_none();
            match what {
                "buffer_count" => bucket.rows = Some(bucket.rows.unwrap_or(0.0) + value),
                "estimated_accuracy" if overall => bucket.estimated_accuracy = Some(value),
                "accuracy" if overall => bucket.accuracy = Some(value),
                "feature_drift" if properties["method"] == "psi" => {
                    let feature = properties["feat_name"].as_str().unwrap_or("?").to_string();
                    if bucket.worst_psi.as_ref().is_none_or(|(worst, _)| value > *worst) {
                        bucket.worst_psi = Some((value, feature));
                    }
                }
                _ => {}
            }
        }
    }
    models
}

fn print_summary(
    started: SystemTime,
    drift_epoch: SystemTime,
    bucket: Duration,
    traffic: &TrafficStats,
    labels: &LabelStats,
    output_dir: &Path,
) {
    let bucket_secs = bucket.as_secs().max(1) as i64;
    let drift_epoch =
        drift_epoch.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(i64::MAX);
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let files = files_since(output_dir, started);
    let anodot_dir = output_dir.join("anodot");
    println!();
    println!(
        "Summary: {} requests ({} rows) through mltap; {} labels posted ({} wrong on purpose, {} rows never labelled).",
        load(&traffic.requests_ok),
        load(&traffic.rows),
        load(&labels.posted),
        load(&labels.wrong),
        load(&labels.withheld),
    );
    println!("Files written: {} in {}", files.len(), anodot_dir.display());
    let mut per_model: BTreeMap<String, Vec<&PathBuf>> = BTreeMap::new();
    for file in &files {
        let model =
            file.parent().and_then(Path::file_name).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        per_model.entry(model).or_default().push(file);
    }
    for (model, files) in &per_model {
        if let Some(latest) = files.last() {
            println!("  {model}: {} files, latest {}", files.len(), latest.display());
        }
    }
    let models = summarize(&files);
    for (model, buckets) in &models {
        if buckets.values().all(|b| b.estimated_accuracy.is_none() && b.accuracy.is_none() && b.worst_psi.is_none()) {
            continue;
        }
        println!();
        println!(
            "  {model}: bucket (UTC)        rows  estimated_accuracy  accuracy (labels)  largest input drift (PSI)"
        );
        let show = |v: Option<f64>| v.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".to_string());
        for (timestamp, bucket) in buckets.iter().rev().take(12).rev() {
            let time =
                humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_secs(*timestamp as u64));
            let drift = bucket.worst_psi.as_ref().map(|(v, f)| format!("{v:.2} {f}")).unwrap_or_else(|| "-".into());
            // Buckets that end after the drift point hold drifted traffic.
            let marker = if *timestamp + bucket_secs > drift_epoch { "*" } else { " " };
            println!(
                "         {} {marker}  {:>5}  {:>18}  {:>17}  {}",
                &time.to_string()[11..19],
                bucket.rows.map(|r| format!("{r:.0}")).unwrap_or_else(|| "-".into()),
                show(bucket.estimated_accuracy),
                show(bucket.accuracy),
                drift
            );
        }
        println!("         (* holds traffic after the drift)");
        let latest = |pick: fn(&BucketSummary) -> Option<f64>| buckets.values().rev().find_map(pick);
        println!(
            "  latest {model}: estimated_accuracy {}, accuracy {}",
            show(latest(|b| b.estimated_accuracy)),
            show(latest(|b| b.accuracy))
        );
    }
    if files.is_empty() {
        println!("  (no files yet: buckets are written when they close, one bucket width plus the grace period after they start)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reads_headline_metrics_per_model_and_bucket() {
        let dir = tempfile::tempdir().unwrap();
        let model_dir = dir.path().join("churn");
        std::fs::create_dir_all(&model_dir).unwrap();
        let point = |what: &str, extra: Value, value: f64| {
            let mut properties = serde_json::json!({ "what": what, "target_type": "gauge", "model": "churn" });
            for (k, v) in extra.as_object().unwrap() {
                properties[k] = v.clone();
            }
            serde_json::json!({ "properties": properties, "tags": {}, "timestamp": 1_700_000_000, "value": value })
        };
        let points = serde_json::json!([
            point("estimated_accuracy", serde_json::json!({}), 0.8),
            point("accuracy", serde_json::json!({}), 0.7),
            point("accuracy", serde_json::json!({ "class_name": "stay" }), 0.9),
            point("feature_drift", serde_json::json!({ "feat_name": "age", "method": "psi" }), 0.1),
            point("feature_drift", serde_json::json!({ "feat_name": "support_calls", "method": "psi" }), 0.9),
            point("buffer_count", serde_json::json!({}), 120.0),
        ]);
        let file = model_dir.join("20231114T221320Z.json");
        std::fs::write(&file, points.to_string()).unwrap();
        let summary = summarize(&[file]);
        let bucket = &summary["churn"][&1_700_000_000];
        assert_eq!(bucket.estimated_accuracy, Some(0.8));
        assert_eq!(bucket.accuracy, Some(0.7), "the per-class accuracy is not the overall one");
        assert_eq!(bucket.worst_psi, Some((0.9, "support_calls".to_string())));
        assert_eq!(bucket.rows, Some(120.0));
    }

    #[test]
    fn wildcard_listeners_are_reached_and_shown_as_loopback() {
        assert_eq!(reachable("0.0.0.0:9090".parse().unwrap()), "127.0.0.1:9090".parse().unwrap());
        assert_eq!(reachable("[::]:9090".parse().unwrap()), "[::1]:9090".parse().unwrap());
        assert_eq!(reachable("10.1.2.3:9090".parse().unwrap()), "10.1.2.3:9090".parse().unwrap());
    }

    #[test]
    fn upstream_flags_choose_where_the_model_server_listens() {
        assert_eq!(upstream_bind("grpc_upstream", None).unwrap(), "127.0.0.1:0".parse().unwrap());
        assert_eq!(
            upstream_bind("grpc_upstream", Some("http://localhost:9500")).unwrap(),
            "127.0.0.1:9500".parse().unwrap()
        );
        assert!(upstream_bind("rest_upstream", Some("http://tfserving.internal:8501"))
            .unwrap_err()
            .contains("rest_upstream"));
    }
}
