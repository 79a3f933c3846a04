//! Several replicas over one real Redis, and over a real 3-node Redis Cluster:
//! predictions recorded by one replica join labels posted to another, and each
//! bucket's label metrics are emitted exactly once, with the values a single
//! replica (embedded store) emits for the same traffic.

mod labels_support;

use labels_support::*;
use mltap::config::LabelsStoreConfig;
use mltap::labels::endpoint::parse_body;
use mltap::labels::{DueBucket, LabelService, LabelsRoute};
use std::sync::Arc;
use std::time::SystemTime;

/// What one replica alone emits for the fraud batch.
async fn single_instance(start: i64) -> Vec<DueBucket> {
    let (_dir, path) = temp_dir();
    let single = service(settings(&path, LabelsStoreConfig::Embedded)).await;
    single.record(&fraud_observation("fraud"), start).await.unwrap();
    let (entries, _) = parse_body(FRAUD_LABELS.as_bytes()).unwrap();
    single.ingest(entries, SystemTime::now()).await.unwrap();
    single.due(after_horizon(start)).await.unwrap()
}

async fn both_due(a: &LabelService, b: &LabelService, now: SystemTime) -> Vec<DueBucket> {
    let (from_a, from_b) = tokio::join!(a.due(now), b.due(now));
    let mut all = from_a.unwrap();
    all.extend(from_b.unwrap());
    all
}

async fn two_replicas_emit_each_bucket_once(store: LabelsStoreConfig, after_record: impl Fn()) {
    let start = current_bucket();
    let expected = single_instance(start).await;
    let (_dir_a, path_a) = temp_dir();
    let (_dir_b, path_b) = temp_dir();
    let a = service(settings(&path_a, store.clone())).await;
    let b = service(settings(&path_b, store)).await;
    let b_labels = serve_route(Arc::new(LabelsRoute::new(b.clone()).unwrap())).await;

    a.record(&fraud_observation("fraud"), start).await.unwrap();
    a.flush().await.unwrap();
    after_record();
    let (status, answer) = post_labels(b_labels, FRAUD_LABELS, None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!((answer["accepted"].as_u64(), answer["unmatched"].as_u64()), (Some(7), Some(0)), "{answer}");

    assert!(both_due(&a, &b, at(start, 30)).await.is_empty(), "emitted before the horizon");
    let emitted = both_due(&a, &b, after_horizon(start)).await;
    assert_eq!(emitted.len(), 1, "the bucket must be emitted by exactly one replica");
    assert_eq!(emitted, expected, "replicas must emit what a single instance emits");
    assert_fraud_metrics(&emitted[0].points);
    assert!(both_due(&a, &b, after_horizon(start)).await.is_empty(), "emitted twice");

    // A label for the emitted bucket, posted to the replica that made the prediction.
    let (entries, _) = parse_body(br#"[{"id": "tx-batch:7", "label": 1}, {"id": "ghost", "label": 0}]"#).unwrap();
    let outcome = a.ingest(entries, after_horizon(start)).await.unwrap();
    assert_eq!((outcome.accepted, outcome.late, outcome.unmatched), (1, 1, 1));
    let arrival = start + (WIDTH + HORIZON) as i64;
    let counted = both_due(&a, &b, after_horizon(arrival)).await;
    let late: Vec<f64> = counted.iter().filter_map(|d| value(&d.points, "label_late_count", &[])).collect();
    let unmatched: Vec<f64> = counted.iter().filter_map(|d| value(&d.points, "label_unmatched_count", &[])).collect();
    assert_eq!((late, unmatched), (vec![1.0], vec![1.0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_over_one_redis_emit_the_single_instance_values_once() {
    let redis = RedisServer::start(false);
    two_replicas_emit_each_bucket_once(LabelsStoreConfig::Redis(redis.url()), || {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_over_a_redis_cluster_emit_the_single_instance_values_once() {
    let cluster = RedisCluster::start();
    // The rows must really be spread over the nodes, or this would test one Redis.
    let spread = || {
        let used = cluster.nodes.iter().filter(|n| n.dbsize() > 0).count();
        assert!(used >= 2, "keys on {used} of 3 nodes");
    };
    two_replicas_emit_each_bucket_once(LabelsStoreConfig::RedisCluster(cluster.urls()), spread).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_label_posted_to_two_replicas_at_once_joins_once() {
    let redis = RedisServer::start(false);
    let store = LabelsStoreConfig::Redis(redis.url());
    let (_dir_a, path_a) = temp_dir();
    let (_dir_b, path_b) = temp_dir();
    let a = service(settings(&path_a, store.clone())).await;
    let b = service(settings(&path_b, store)).await;
    let start = current_bucket();
    a.record(&fraud_observation("fraud"), start).await.unwrap();
    a.flush().await.unwrap();
    let (to_a, _) = parse_body(FRAUD_LABELS.as_bytes()).unwrap();
    let (to_b, _) = parse_body(FRAUD_LABELS.as_bytes()).unwrap();
    // Posted within the prediction's bucket, so the unmatched count lands in it too.
    let now = at(start, 1);
    let (from_a, from_b) = tokio::join!(a.ingest(to_a, now), b.ingest(to_b, now));
    let (from_a, from_b) = (from_a.unwrap(), from_b.unwrap());
    assert_eq!(from_a.accepted + from_b.accepted, 7);
    assert_eq!(from_a.unmatched + from_b.unmatched, 7);
    let mut emitted = both_due(&a, &b, after_horizon(start)).await;
    // Which replica claims which bucket is a race; the order of the union is not.
    emitted.sort_by(|x, y| x.model.cmp(&y.model));
    let models: Vec<&str> = emitted.iter().map(|d| d.model.as_str()).collect();
    assert_eq!(models, vec!["_unknown", "fraud"], "each bucket emitted once");
    // The losers of the race count their labels as unmatched, in the arrival bucket.
    assert_eq!(value(&emitted[0].points, "label_unmatched_count", &[]), Some(7.0));
    assert_eq!(value(&emitted[1].points, "label_count", &[("class_name", "fraud")]), Some(3.0));
    assert_close(value(&emitted[1].points, "accuracy", &[]), 5.0 / 7.0, "accuracy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labels_get_503_when_redis_is_gone() {
    let redis = RedisServer::start(false);
    let (_dir, path) = temp_dir();
    let replica = service(settings(&path, LabelsStoreConfig::Redis(redis.url()))).await;
    let addr = serve_route(Arc::new(LabelsRoute::new(replica).unwrap())).await;
    drop(redis);
    let (status, answer) = post_labels(addr, r#"[{"id": "a", "label": 1}]"#, None).await;
    assert_eq!(status, 503, "{answer}");
    assert!(answer["error"].as_str().unwrap().starts_with("label store unavailable: redis label store"), "{answer}");
}

/// Two replicas post the labels of every row of four 64-row exchanges and a one-row
/// exchange at once: each row joins exactly one of its two labels, and a label the
/// store refused leaves its row for a correct one.
async fn replicas_race_for_every_row(store: LabelsStoreConfig) {
    let (_dir_a, path_a) = temp_dir();
    let (_dir_b, path_b) = temp_dir();
    let a = service(settings(&path_a, store.clone())).await;
    let b = service(settings(&path_b, store)).await;
    let start = current_bucket();
    for exchange in 0..4 {
        a.record(&exchange_observation("fraud", &format!("race-{exchange}"), 64), start).await.unwrap();
    }
    a.record(&exchange_observation("fraud", "solo", 1), start).await.unwrap();
    a.record(&exchange_observation("fraud", "pair", 2), start).await.unwrap();
    a.flush().await.unwrap();

    // Invalid labels for the last waiting row of `solo` and of `pair` are refused
    // after the join, and leave both rows in place.
    let pair_0 = b.ingest(parse_body(br#"[{"id": "pair:0", "label": 1}]"#).unwrap().0, at(start, 1));
    assert_eq!(pair_0.await.unwrap().accepted, 1);
    let (invalid, _) = parse_body(br#"[{"id": "solo", "label": 7}, {"id": "pair:1", "label": "spam"}]"#).unwrap();
    let refused = b.ingest(invalid, at(start, 1)).await.unwrap();
    assert_eq!((refused.accepted, refused.rejected.len()), (0, 2));

    let mut ids: Vec<String> = (0..4).flat_map(|exchange| row_ids(&format!("race-{exchange}"), 64)).collect();
    ids.extend(["solo".to_string(), "pair:1".to_string()]);
    let body = labels_body(&ids);
    let (to_a, _) = parse_body(body.as_bytes()).unwrap();
    let (to_b, _) = parse_body(body.as_bytes()).unwrap();
    let now = at(start, 1);
    let (from_a, from_b) = tokio::join!(a.ingest(to_a, now), b.ingest(to_b, now));
    let (from_a, from_b) = (from_a.unwrap(), from_b.unwrap());
    assert_eq!(from_a.accepted + from_b.accepted, 258, "{from_a:?} {from_b:?}");
    assert_eq!(from_a.unmatched + from_b.unmatched, 258, "{from_a:?} {from_b:?}");
    let (again, _) = parse_body(body.as_bytes()).unwrap();
    assert_eq!(a.ingest(again, now).await.unwrap().accepted, 0, "every row is taken");

    let emitted = both_due(&a, &b, after_horizon(start)).await;
    let fraud = emitted.iter().find(|d| d.model == "fraud").expect("the bucket is emitted");
    assert_eq!(value(&fraud.points, "label_count", &[("class_name", "fraud")]), Some(259.0));
    assert_eq!(value(&fraud.points, "labeled_fraction", &[]), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_over_one_redis_racing_for_every_row_join_each_once() {
    let redis = RedisServer::start(false);
    replicas_race_for_every_row(LabelsStoreConfig::Redis(redis.url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_over_a_redis_cluster_racing_for_every_row_join_each_once() {
    let cluster = RedisCluster::start();
    replicas_race_for_every_row(LabelsStoreConfig::RedisCluster(cluster.urls())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_64_row_exchange_is_one_redis_key_until_its_rows_are_taken() {
    let redis = RedisServer::start(false);
    let (_dir, path) = temp_dir();
    let replica = service(settings(&path, LabelsStoreConfig::Redis(redis.url()))).await;
    let start = current_bucket();
    replica.record(&exchange_observation("fraud", "one-key", 64), start).await.unwrap();
    replica.flush().await.unwrap();
    // The exchange's record, the stream, the bucket's aggregate and the due index.
    assert_eq!(redis.dbsize(), 4);
    assert!(redis.exists("mltap:lx:one-key"));
    let mut ids = row_ids("one-key", 64);
    let last = ids.pop().unwrap();
    let outcome = replica.ingest(parse_body(labels_body(&ids).as_bytes()).unwrap().0, at(start, 1));
    assert_eq!(outcome.await.unwrap().accepted, 63);
    assert!(redis.exists("mltap:lx:one-key"), "one row still waits");
    let outcome = replica.ingest(parse_body(labels_body(&[last]).as_bytes()).unwrap().0, at(start, 1));
    assert_eq!(outcome.await.unwrap().accepted, 1);
    assert!(!redis.exists("mltap:lx:one-key"), "a record whose rows are all taken is deleted");
}

/// A regression model's exchange of four rows (predictions 3, 5, 7, 9).
fn eta_observation(request_id: &str) -> mltap::tfserving::Observation {
    // Built as a classifier's observation of four rows, then given predictions instead.
    let rows: Vec<Vec<f64>> = (0..4).map(|_| vec![0.5, 0.5]).collect();
    let mut observation = observation("eta", request_id, &rows, None);
    observation.probabilities = None;
    observation.regression = Some(vec![3.0, 5.0, 7.0, 9.0]);
    observation
}

/// Labels 2, 7, 4, 13 of the four rows, and one label of the wrong type.
const ETA_LABELS: &str = r#"[{"id": "eta-1:0", "label": 2}, {"id": "eta-1:1", "label": 7.0},
    {"id": "eta-1:2", "label": 4}, {"id": "eta-1:3", "label": 13}, {"id": "eta-2:0", "label": "late"}]"#;

/// Numeric labels posted to one replica join predictions recorded by another over
/// `store`; the bucket is emitted once, with the values a single replica emits.
async fn regression_labels_join_across_replicas_once(store: LabelsStoreConfig) {
    let start = current_bucket();
    let (_dir, path) = temp_dir();
    let single = service(settings(&path, LabelsStoreConfig::Embedded)).await;
    single.record(&eta_observation("eta-1"), start).await.unwrap();
    single.record(&eta_observation("eta-2"), start).await.unwrap();
    let (entries, _) = parse_body(ETA_LABELS.as_bytes()).unwrap();
    single.ingest(entries, SystemTime::now()).await.unwrap();
    let expected = single.due(after_horizon(start)).await.unwrap();

    let (_dir_a, path_a) = temp_dir();
    let (_dir_b, path_b) = temp_dir();
    let a = service(settings(&path_a, store.clone())).await;
    let b = service(settings(&path_b, store)).await;
    a.record(&eta_observation("eta-1"), start).await.unwrap();
    a.record(&eta_observation("eta-2"), start).await.unwrap();
    a.flush().await.unwrap();
    let b_labels = serve_route(Arc::new(LabelsRoute::new(b.clone()).unwrap())).await;
    let (status, answer) = post_labels(b_labels, ETA_LABELS, None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["accepted"], 4, "{answer}");
    assert_eq!(answer["rejected"][0]["index"], 4, "{answer}");
    assert!(answer["rejected"][0]["error"].as_str().unwrap().contains("must be a number"), "{answer}");

    let emitted = both_due(&a, &b, after_horizon(start)).await;
    assert_eq!(emitted.len(), 1, "the bucket must be emitted by exactly one replica");
    assert_eq!(emitted, expected, "replicas must emit what a single instance emits");
    let points = &emitted[0].points;
    assert_eq!(value(points, "mae", &[]), Some(2.5));
    assert_eq!(value(points, "rmse", &[]), Some(7.5f64.sqrt()));
    assert_eq!(value(points, "error_mean", &[]), Some(-0.5));
    assert_eq!(value(points, "r2", &[]), Some(1.0 - 30.0 / 69.0));
    // Four of the eight recorded rows are labeled; the rejected label's row stays.
    assert_eq!(value(points, "labeled_fraction", &[]), Some(0.5));
    assert_eq!(value(points, "accuracy", &[]), None, "a regression scored as a classifier");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_labels_over_one_redis_join_once_with_the_single_instance_values() {
    let redis = RedisServer::start(false);
    regression_labels_join_across_replicas_once(LabelsStoreConfig::Redis(redis.url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_labels_over_a_redis_cluster_join_once_with_the_single_instance_values() {
    let cluster = RedisCluster::start();
    regression_labels_join_across_replicas_once(LabelsStoreConfig::RedisCluster(cluster.urls())).await;
}
