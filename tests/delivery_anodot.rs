//! Delivery of the spool to a fake Anodot on loopback: batching, order, parameters,
//! retries, crash and restart, refused points, rate limit, 3.0 schemas and
//! watermarks, appended files, retention and self-metrics.

mod delivery_support;

use delivery_support::{identity, points, wait_until, write_spool, FakeAnodot, Reply};
use mltap::sinks::anodot::{
    AnodotConfig, AnodotProtocol, Delivery, DeliveryError, DeliveryMetrics, DeliverySettings, Engine, PassReport,
    Persistence, Totals,
};
use serde_json::json;
use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A bucket start (aligned to a minute), long enough ago that every watermark is due.
const T0: i64 = 1_700_000_040;

fn env(name: &str) -> Option<String> {
    match name {
        "ANODOT_TOKEN" => Some("tok-secret".to_string()),
        "ANODOT_ACCESS_KEY" => Some("key-secret".to_string()),
        _ => None,
    }
}

fn fast() -> AnodotConfig {
    AnodotConfig {
        points_per_second: 1_000_000,
        max_backoff: Duration::from_millis(100),
        request_timeout: Duration::from_secs(5),
        scan_interval: Duration::from_millis(50),
        ..AnodotConfig::default()
    }
}

fn settings(server: &FakeAnodot, anodot: AnodotConfig) -> DeliverySettings {
    DeliverySettings::resolve(&server.url(), anodot, Duration::from_secs(60), Duration::from_secs(3600), env).unwrap()
}

fn open(out: &Path, s: DeliverySettings) -> Engine {
    Engine::open(
        s,
        &out.join("anodot"),
        &out.join("delivery"),
        DeliveryMetrics::default(),
        Persistence::GiveUpAfter(Duration::from_secs(30)),
    )
    .unwrap()
}

/// An engine as `serve` runs it: it never gives up.
fn open_serve(out: &Path, s: DeliverySettings) -> Engine {
    Engine::open(s, &out.join("anodot"), &out.join("delivery"), DeliveryMetrics::default(), Persistence::Forever)
        .unwrap()
}

/// One `send`-style pass over the spool.
fn deliver(out: &Path, s: DeliverySettings) -> (Result<PassReport, DeliveryError>, Totals) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut engine = open(out, s);
        let result = engine.pass(&CancellationToken::new()).await;
        (result, engine.totals())
    })
}

fn assert_exactly_once(server: &FakeAnodot, expected: usize) {
    let accepted = server.accepted_points();
    let unique: HashSet<_> = accepted.iter().map(identity).collect();
    assert_eq!(unique.len(), accepted.len(), "some points were accepted twice");
    assert_eq!(accepted.len(), expected, "points accepted");
}

#[test]
fn batches_hold_at_most_1000_points_in_timestamp_order_with_token_and_protocol() {
    let server = FakeAnodot::start();
    let out = tempfile::tempdir().unwrap();
    for (i, model) in ["iris", "mnist"].iter().enumerate() {
        for b in 0..3 {
            write_spool(out.path(), model, T0 + 60 * b, &points(model, T0 + 60 * b, i * 10_000, 700));
        }
    }
    let (result, totals) = deliver(out.path(), settings(&server, fast()));
    result.unwrap();
    assert_eq!(totals.accepted, 4200);

    let posts = server.metric_posts();
    assert_eq!(posts.len(), 5, "4200 points in requests of 1000");
    let mut last = i64::MIN;
    for post in &posts {
        assert_eq!(post.query.get("token").map(String::as_str), Some("tok-secret"));
        assert_eq!(post.query.get("protocol").map(String::as_str), Some("anodot20"));
        let batch = post.body.as_array().unwrap();
        assert!(batch.len() <= 1000, "{} points in one request", batch.len());
        for p in batch {
            let t = p["timestamp"].as_i64().unwrap();
            assert!(t >= last, "timestamp {t} after {last}");
            last = t;
        }
    }
    assert_exactly_once(&server, 4200);
}

#[test]
fn a_run_of_500s_then_recovery_delivers_everything_exactly_once() {
    let server = FakeAnodot::start();
    let out = tempfile::tempdir().unwrap();
    write_spool(out.path(), "iris", T0, &points("iris", T0, 0, 1500));
    server.script([Reply::Ok, Reply::Status(500), Reply::Status(503), Reply::Status(500), Reply::Status(502)]);
    let (result, totals) = deliver(out.path(), settings(&server, fast()));
    result.unwrap();
    assert_eq!(totals.retries, 4);
    assert_eq!(server.metric_posts().len(), 6);
    assert_exactly_once(&server, 1500);

    // A later pass finds nothing left to send.
    let (result, totals) = deliver(out.path(), settings(&server, fast()));
    assert_eq!(result.unwrap().pending, 0);
    assert_eq!(totals.accepted, 0);
    assert_eq!(server.metric_posts().len(), 6);
}

#[test]
fn rate_limit_answers_are_retried_not_counted_as_rejections() {
    let server = FakeAnodot::start();
    let out = tempfile::tempdir().unwrap();
    write_spool(out.path(), "iris", T0, &points("iris", T0, 0, 10));
    let limited = |code: i64| Reply::Json(200, json!({"errors": [{"error": code, "description": "slow down"}]}));
    server.script([limited(2003), Reply::Status(429), limited(1004), limited(2002)]);
    let (result, totals) = deliver(out.path(), settings(&server, fast()));
    result.unwrap();
    assert_eq!((totals.retries, totals.rejected, totals.accepted), (4, 0, 10));
    assert_exactly_once(&server, 10);
}

#[test]
fn killed_mid_delivery_and_restarted_delivers_the_rest_without_duplicates() {
    let server = FakeAnodot::start();
    let out = tempfile::tempdir().unwrap();
    for b in 0..5 {
        write_spool(out.path(), "iris", T0 + 60 * b, &points("iris", T0 + 60 * b, 1000 * b as usize, 1000));
    }
    // Two requests answered, the third never: the process dies while it is in flight.
    server.script([Reply::Ok, Reply::Ok, Reply::Hang]);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let handle = {
        let _guard = rt.enter();
        Delivery::spawn_engine(open_serve(out.path(), settings(&server, fast())))
    };
    assert!(wait_until(Duration::from_secs(20), || server.metric_posts().len() >= 3));
    // The crash: the runtime goes, and with it the task and its request in flight.
    drop(handle);
    drop(rt);
    assert_eq!(server.accepted_points().len(), 2000);

    // Restart: the rest goes, and nothing acknowledged goes again.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let handle = {
        let _guard = rt.enter();
        Delivery::spawn_engine(open_serve(out.path(), settings(&server, fast())))
    };
    assert!(wait_until(Duration::from_secs(20), || server.accepted_points().len() >= 5000));
    rt.block_on(handle.finish(Duration::from_secs(5)));
    assert_exactly_once(&server, 5000);
    // The request left hanging is the only one sent twice.
    assert_eq!(server.metric_posts().len(), 6);
}

#[test]
fn a_200_with_errors_counts_the_rejected_points_and_does_not_retry_them() {
    let server = FakeAnodot::start();
    let out = tempfile::tempdir().unwrap();
    write_spool(out.path(), "iris", T0, &points("iris", T0, 0, 8));
    server.script([Reply::Json(
        200,
        json!({"errors": [
            {"error": 2011, "description": "Property value contains illegal characters", "index": 1},
            {"error": 2009, "description": "Property value length exceeded", "index": "3"},
        ]}),
    )]);
    let s = settings(&server, fast());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (totals, rejected_metric) = rt.block_on(async {
        let mut engine = open(out.path(), s);
        engine.pass(&CancellationToken::new()).await.unwrap();
        (engine.totals(), engine.metrics().rejected.get())
    });
    assert_eq!((totals.accepted, totals.rejected, totals.retries), (6, 2, 0));
    assert_eq!(rejected_metric, 2);
    assert_eq!(server.metric_posts().len(), 1);

    let (result, _) = deliver(out.path(), settings(&server, fast()));
    assert_eq!(result.unwrap().pending, 0, "refused points are not sent again");
    assert_eq!(server.metric_posts().len(), 1);
}

#[test]
fn a_400_naming_bad_points_sends_the_others_again_without_them() {
    let server = FakeAnodot::start();
    let out = tempfile::tempdir().unwrap();
    write_spool(out.path(), "iris", T0, &points("iris", T0, 0, 5));
    server.script([Reply::Json(400, json!({"errors": [{"error": 2026, "description": "NaN", "index": 2}]}))]);
    let (result, totals) = deliver(out.path(), settings(&server, fast()));
    result.unwrap();
    assert_eq!((totals.accepted, totals.rejected), (4, 1));
    let posts = server.metric_posts();
    assert_eq!(posts.len(), 2);
    assert_eq!(posts[1].body.as_array().unwrap().len(), 4);
    assert_exactly_once(&server, 4);
}

#[test]
fn a_refused_token_stops_send_without_losing_points() {
    let server = FakeAnodot::start();
    let out = tempfile::tempdir().unwrap();
    write_spool(out.path(), "iris", T0, &points("iris", T0, 0, 20));
    server.script([Reply::Status(401)]);
    let (result, totals) = deliver(out.path(), settings(&server, fast()));
    assert!(matches!(result, Err(DeliveryError::Halted(_))), "{result:?}");
    assert_eq!(totals.accepted, 0);
    let (result, totals) = deliver(out.path(), settings(&server, fast()));
    result.unwrap();
    assert_eq!(totals.accepted, 20);
    assert_exactly_once(&server, 20);
}

#[test]
fn rate_limiting_holds_the_configured_points_per_second() {
    let server = FakeAnodot::start();
    let out = tempfile::tempdir().unwrap();
    for b in 0..3 {
        write_spool(out.path(), "iris", T0 + 60 * b, &points("iris", T0 + 60 * b, 400 * b as usize, 400));
    }
    let anodot = AnodotConfig { points_per_second: 400, batch_points: 100, ..fast() };
    let (result, _) = deliver(out.path(), settings(&server, anodot));
    result.unwrap();
    let posts = server.metric_posts();
    assert_eq!(posts.len(), 12);
    // A token bucket of 100 points refilled at 400/s lets at most 100 + 400·w points
    // through in any window of w seconds; one more request of slack absorbs the
    // network between client and server. Only upper bounds: slowness cannot fail it.
    let window = Duration::from_secs(1);
    for (i, first) in posts.iter().enumerate() {
        let in_window: usize = posts[i..]
            .iter()
            .take_while(|p| p.at.duration_since(first.at) < window)
            .map(|p| p.body.as_array().unwrap().len())
            .sum();
        assert!(in_window <= 100 + 400 + 100, "{in_window} points within one second");
    }
    let span = posts.last().unwrap().at.duration_since(posts[0].at);
    assert!(span >= Duration::from_millis(2500), "1200 points at 400/s went out in {span:?}");
    assert_exactly_once(&server, 1200);
}

#[test]
fn label_points_appended_to_a_closed_bucket_are_sent_alone() {
    let server = FakeAnodot::start();
    let out = tempfile::tempdir().unwrap();
    let all = points("iris", T0, 0, 15);
    write_spool(out.path(), "iris", T0, &all[..10]);
    deliver(out.path(), settings(&server, fast())).0.unwrap();
    write_spool(out.path(), "iris", T0, &all);
    let (result, totals) = deliver(out.path(), settings(&server, fast()));
    assert_eq!(result.unwrap().pending, 5);
    assert_eq!(totals.accepted, 5);
    assert_eq!(server.metric_posts()[1].body.as_array().unwrap().len(), 5);
    assert_exactly_once(&server, 15);
}

#[test]
fn retention_deletes_delivered_files_only() {
    let server = FakeAnodot::start();
    let out = tempfile::tempdir().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let recent = now - now % 60;
    write_spool(out.path(), "iris", T0, &points("iris", T0, 0, 3));
    write_spool(out.path(), "iris", T0 + 60, &points("iris", T0 + 60, 10, 3));
    write_spool(out.path(), "iris", recent, &points("iris", recent, 20, 3));
    let anodot = AnodotConfig { retention: Some(Duration::from_secs(3600)), ..fast() };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut engine = open(out.path(), settings(&server, anodot));
    rt.block_on(engine.pass(&CancellationToken::new())).unwrap();
    // A label point arrives for the second old bucket: it is not delivered yet.
    write_spool(out.path(), "iris", T0 + 60, &points("iris", T0 + 60, 10, 4));
    assert_eq!(engine.prune().unwrap(), 1);
    let dir = out.path().join("anodot/iris");
    assert!(!dir.join(format!("{}.json", delivery_support::stem(T0))).exists());
    assert!(dir.join(format!("{}.json", delivery_support::stem(T0 + 60))).exists());
    assert!(dir.join(format!("{}.json", delivery_support::stem(recent))).exists());
}

#[test]
fn serve_delivery_reports_its_self_metrics() {
    let server = FakeAnodot::start();
    let out = tempfile::tempdir().unwrap();
    let mut registry = prometheus_client::registry::Registry::with_prefix("mltap");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let handle = {
        let _guard = rt.enter();
        Delivery::spawn(settings(&server, fast()), out.path(), &mut registry).unwrap()
    };
    // The spool fills while delivery runs, as the engine closes buckets.
    write_spool(out.path(), "iris", T0, &points("iris", T0, 0, 30));
    server.script([Reply::Status(500)]);
    write_spool(out.path(), "iris", T0 + 60, &points("iris", T0 + 60, 100, 12));
    assert!(wait_until(Duration::from_secs(20), || server.accepted_points().len() >= 42));
    rt.block_on(handle.finish(Duration::from_secs(5)));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for expected in [
        "mltap_anodot_points_delivered_total 42",
        "mltap_anodot_points_rejected_total 0",
        "mltap_anodot_backlog_points 0",
        "mltap_anodot_delivery_lag_seconds 0",
    ] {
        assert!(text.contains(expected), "{expected} missing from\n{text}");
    }
    assert!(!text.contains("mltap_anodot_points_retried_total 0\n"), "{text}");
    assert_exactly_once(&server, 42);
}

#[test]
fn protocol_30_creates_schemas_then_posts_samples_and_one_watermark_per_stream() {
    let server = FakeAnodot::start();
    let out = tempfile::tempdir().unwrap();
    for b in 0..2 {
        let start = T0 + 60 * b;
        let mut ps = points("iris", start, 10 * b as usize, 4);
        ps.push(
            mltap::sinks::Point::builder("accuracy", mltap::sinks::TargetType::Gauge, start, 0.9)
                .with("model", "iris")
                .finish()
                .unwrap(),
        );
        write_spool(out.path(), "iris", start, &ps);
    }
    let anodot = AnodotConfig { protocol: AnodotProtocol::V30, ..fast() };
    let (result, totals) = deliver(out.path(), settings(&server, anodot.clone()));
    result.unwrap();
    assert_eq!(totals.accepted, 10);

    let tokens = server.requests_to("/api/v2/access-token");
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0].body, json!({"refreshToken": "key-secret"}));
    let created = server.requests_to("/api/v2/stream-schemas");
    let names: Vec<&str> = created.iter().map(|r| r.body["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["mltap_iris", "mltap_iris_labels"]);
    for r in &created {
        assert!(r.authorization.as_deref().unwrap().starts_with("Bearer "), "{r:?}");
        assert_eq!(r.body["missingDimPolicy"], json!({"action": "ignore"}));
    }
    assert_eq!(created[0].body["measurements"]["feature_missing_count"]["aggregation"], "sum");

    for post in server.metric_posts() {
        assert_eq!(post.query.get("protocol").map(String::as_str), Some("anodot30"));
        assert_eq!(post.query.get("token").map(String::as_str), Some("tok-secret"));
        for sample in post.body.as_array().unwrap() {
            let what = sample["measurements"].as_object().unwrap().keys().next().unwrap().clone();
            let expected = if what == "accuracy" { "schema-2" } else { "schema-1" };
            assert_eq!(sample["schemaId"], expected, "{sample}");
            assert!(sample["dimensions"].get("ver").is_none());
        }
    }
    let watermarks: Vec<_> = server.requests_to("/api/v1/metrics/watermark").into_iter().map(|r| r.body).collect();
    assert_eq!(
        watermarks,
        [
            json!({"schemaId": "schema-1", "watermark": T0 + 120}),
            json!({"schemaId": "schema-2", "watermark": T0 + 120})
        ]
    );

    // Restarted: the schemas are found by name, and no watermark is posted again.
    let (result, _) = deliver(out.path(), settings(&server, anodot));
    result.unwrap();
    assert_eq!(server.requests_to("/api/v2/stream-schemas").len(), 2);
    assert_eq!(server.requests_to("/api/v1/metrics/watermark").len(), 2);
}

#[test]
fn the_bearer_token_is_refreshed_before_it_expires() {
    use mltap::sinks::anodot::api::{AnodotClient, Endpoints, Secret};
    let server = FakeAnodot::start();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let client = AnodotClient::new(
        Endpoints::new(&server.url(), None).unwrap(),
        Secret::new("tok"),
        Some(Secret::new("key")),
        Duration::from_secs(5),
    )
    .unwrap();
    rt.block_on(async {
        let first = client.bearer().await.unwrap();
        assert_eq!(client.bearer().await.unwrap(), first, "a fresh token is reused");
        assert_eq!(server.tokens_issued(), 1);
    });
    server.token_ttl(1);
    let client2 = AnodotClient::new(
        Endpoints::new(&server.url(), None).unwrap(),
        Secret::new("tok"),
        Some(Secret::new("key")),
        Duration::from_secs(5),
    )
    .unwrap();
    rt.block_on(async {
        let short = client2.bearer().await.unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let next = client2.bearer().await.unwrap();
        assert_ne!(next, short, "an expiring token is replaced");
    });
    assert_eq!(server.tokens_issued(), 3);
}

#[test]
fn finishing_delivers_the_files_written_at_shutdown() {
    let server = FakeAnodot::start();
    let out = tempfile::tempdir().unwrap();
    let anodot = AnodotConfig { scan_interval: Duration::from_secs(3600), ..fast() };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let handle = {
        let _guard = rt.enter();
        Delivery::spawn_engine(open_serve(out.path(), settings(&server, anodot)))
    };
    // The first scan found an empty spool; the next is an hour away.
    std::thread::sleep(Duration::from_millis(200));
    write_spool(out.path(), "iris", T0, &points("iris", T0, 0, 25));
    rt.block_on(handle.finish(Duration::from_secs(10)));
    assert_exactly_once(&server, 25);
}

#[test]
fn serve_keeps_the_spool_through_a_refused_token_and_delivers_once_accepted() {
    let server = FakeAnodot::start();
    let out = tempfile::tempdir().unwrap();
    write_spool(out.path(), "iris", T0, &points("iris", T0, 0, 7));
    server.script([
        Reply::Status(401),
        Reply::Json(200, json!({"errors": [{"error": 2001, "description": "Token is not active"}]})),
    ]);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let handle = {
        let _guard = rt.enter();
        Delivery::spawn_engine(open_serve(out.path(), settings(&server, fast())))
    };
    assert!(wait_until(Duration::from_secs(20), || server.accepted_points().len() >= 7));
    rt.block_on(handle.finish(Duration::from_secs(5)));
    assert_eq!(server.metric_posts().len(), 3);
    assert_exactly_once(&server, 7);
}
