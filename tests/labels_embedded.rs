//! The embedded store: joins survive a restart, late and unmatched labels are
//! counted, rows expire after the horizon and the store's size is bounded with
//! evictions counted, and labels can be attributed to their arrival bucket.

mod labels_support;

use labels_support::*;
use mltap::config::LabelsStoreConfig;
use mltap::labels::endpoint::parse_body;
use mltap::labels::LabelService;
use std::sync::Arc;
use std::time::SystemTime;

async fn ingest(service: &LabelService, body: &str, now: SystemTime) -> mltap::labels::IngestOutcome {
    let (entries, rejected) = parse_body(body.as_bytes()).unwrap();
    assert!(rejected.is_empty(), "{rejected:?}");
    service.ingest(entries, now).await.unwrap()
}

#[tokio::test]
async fn a_restart_between_prediction_and_label_still_joins() {
    let (_dir, path) = temp_dir();
    let start = current_bucket();
    let before = service(settings(&path, LabelsStoreConfig::Embedded)).await;
    before.record(&fraud_observation("fraud"), start).await.unwrap();
    drop(before);

    let after = service(settings(&path, LabelsStoreConfig::Embedded)).await;
    let outcome = ingest(&after, FRAUD_LABELS, SystemTime::now()).await;
    assert_eq!((outcome.accepted, outcome.unmatched), (7, 0));
    drop(after);

    // And the aggregate survives a second restart before emission.
    let emitter = service(settings(&path, LabelsStoreConfig::Embedded)).await;
    let due = emitter.due(after_horizon(start)).await.unwrap();
    assert_fraud_metrics(&due[0].points);
}

#[tokio::test]
async fn late_and_unmatched_labels_are_counted_in_their_arrival_bucket() {
    let (_dir, path) = temp_dir();
    let service = service(settings(&path, LabelsStoreConfig::Embedded)).await;
    let start = current_bucket();
    service.record(&fraud_observation("fraud"), start).await.unwrap();
    assert_eq!(ingest(&service, r#"[{"id": "tx-batch:0", "label": 1}]"#, SystemTime::now()).await.accepted, 1);
    let first = service.due(after_horizon(start)).await.unwrap();
    assert_eq!(value(&first[0].points, "accuracy", &[]), Some(1.0));

    let late_at = after_horizon(start);
    let outcome = ingest(
        &service,
        r#"[{"id": "tx-batch:7", "label": 1},
            {"id": "never-seen", "label": 0, "model": "fraud"},
            {"id": "also-never-seen", "label": 0, "model": "../../etc"},
            {"id": "tx-batch:0", "label": 1}]"#,
        late_at,
    )
    .await;
    assert_eq!((outcome.accepted, outcome.late, outcome.unmatched), (1, 1, 3), "labeling tx-batch:0 twice");

    let arrival = start + (WIDTH + HORIZON) as i64;
    let due = service.due(after_horizon(arrival)).await.unwrap();
    let fraud = due.iter().find(|d| d.model == "fraud").expect("fraud points");
    assert_eq!(fraud.bucket_start, arrival);
    assert_eq!(value(&fraud.points, "label_late_count", &[]), Some(1.0));
    assert_eq!(value(&fraud.points, "label_unmatched_count", &[]), Some(1.0));
    let unknown = due.iter().find(|d| d.model == "_unknown").expect("unattributed points");
    assert_eq!(value(&unknown.points, "label_unmatched_count", &[]), Some(2.0));
    // The late label did not change the emitted bucket, and nothing is emitted twice.
    assert!(due.iter().all(|d| d.bucket_start == arrival));
    assert!(service.due(after_horizon(arrival)).await.unwrap().is_empty());
}

#[tokio::test]
async fn rows_expire_after_the_horizon_and_late_window() {
    let (_dir, path) = temp_dir();
    let mut settings = settings(&path, LabelsStoreConfig::Embedded);
    settings.labels.late_window_seconds = 60;
    let service = service(settings).await;
    let start = current_bucket();
    service.record(&fraud_observation("fraud"), start).await.unwrap();
    let expired_at = at(start, (WIDTH + HORIZON + 60) as i64);
    service.due(expired_at).await.unwrap();
    let outcome = ingest(&service, r#"[{"id": "tx-batch:7", "label": 1}]"#, expired_at).await;
    assert_eq!((outcome.accepted, outcome.unmatched), (0, 1));
}

#[tokio::test]
async fn the_store_is_bounded_and_evictions_are_counted() {
    let (_dir, path) = temp_dir();
    let mut settings = settings(&path, LabelsStoreConfig::Embedded);
    settings.labels.max_pending_rows = 5;
    let service = service(settings).await;
    let mut registry = prometheus_client::registry::Registry::with_prefix("mltap");
    service.register_metrics(&mut registry);
    let start = current_bucket();
    service.record(&fraud_observation("fraud"), start).await.unwrap();
    service.due(at(start, 1)).await.unwrap();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(text.contains("mltap_label_store_evictions_total 3"), "{text}");
    assert!(text.contains("mltap_label_store_pending_rows 5"), "{text}");

    // Rows with equal expiry go in id order: 0, 1 and 2 were evicted.
    let outcome = ingest(&service, FRAUD_LABELS, SystemTime::now()).await;
    assert_eq!((outcome.accepted, outcome.unmatched), (4, 3));
}

#[tokio::test]
async fn a_label_rejected_after_the_join_leaves_the_prediction_for_a_correct_one() {
    let (_dir, path) = temp_dir();
    let service = service(settings(&path, LabelsStoreConfig::Embedded)).await;
    let start = current_bucket();
    service.record(&fraud_observation("fraud"), start).await.unwrap();
    let (entries, _) =
        parse_body(br#"[{"id": "tx-batch:0", "label": 5}, {"id": "tx-batch:1", "label": "spam"}]"#).unwrap();
    let outcome = service.ingest(entries, SystemTime::now()).await.unwrap();
    assert_eq!(outcome.accepted, 0);
    assert_eq!(outcome.rejected.len(), 2);
    assert!(outcome.rejected[0].error.contains("out of range"), "{:?}", outcome.rejected);
    assert!(outcome.rejected[1].error.contains("legit, fraud"), "{:?}", outcome.rejected);
    let outcome =
        ingest(&service, r#"[{"id": "tx-batch:0", "label": 1}, {"id": "tx-batch:1", "label": 1}]"#, SystemTime::now())
            .await;
    assert_eq!(outcome.accepted, 2);
}

#[tokio::test]
async fn labels_can_be_attributed_to_the_bucket_of_their_arrival() {
    let (_dir, path) = temp_dir();
    let mut settings = settings(&path, LabelsStoreConfig::Embedded);
    settings.labels.attribute_to_arrival = true;
    let service: Arc<LabelService> = service(settings).await;
    let start = current_bucket();
    service.record(&fraud_observation("fraud"), start).await.unwrap();
    let arrival = start + 7200;
    let outcome = ingest(&service, FRAUD_LABELS, at(arrival, 10)).await;
    assert_eq!((outcome.accepted, outcome.late), (7, 0), "no label is late when attributed to its arrival");
    let due = service.due(at(arrival, WIDTH as i64 + 6)).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].bucket_start, arrival);
    assert_close(value(&due[0].points, "accuracy", &[]), 5.0 / 7.0, "accuracy");
    assert_eq!(value(&due[0].points, "labeled_fraction", &[]), None, "meaningless by arrival");
}

#[tokio::test]
async fn labels_join_by_the_id_feature_and_configured_class_names() {
    let (_dir, path) = temp_dir();
    let mut settings = settings(&path, LabelsStoreConfig::Embedded);
    let model =
        mltap::config::ModelConfig { class_names: Some(vec!["stay".into(), "churn".into()]), ..Default::default() };
    settings.models.insert("churn".into(), model);
    let service = service(settings).await;
    let start = current_bucket();
    let mut o = observation("churn", "req-9", &[vec![0.75, 0.25], vec![0.25, 0.75]], None);
    o.row_ids = Some(vec!["customer-17".into(), "customer-42".into()]);
    service.record(&o, start).await.unwrap();
    let outcome = ingest(
        &service,
        r#"{"id": "customer-17", "label": "stay"}
           {"id": "customer-42", "label": "stay"}
           {"id": "req-9:0", "label": "stay", "model": "churn"}"#,
        at(start, 1),
    )
    .await;
    assert_eq!((outcome.accepted, outcome.unmatched), (2, 1), "ids come from the id feature, not the request");
    let due = service.due(after_horizon(start)).await.unwrap();
    let churn = due.iter().find(|d| d.model == "churn").unwrap();
    assert_close(value(&churn.points, "accuracy", &[]), 0.5, "accuracy");
    assert_eq!(
        value(&churn.points, "confusion_count", &[("actual_class", "stay"), ("class_name", "churn")]),
        Some(1.0)
    );
    // The unmatched label named a configured model, so it is counted under it.
    assert_eq!(value(&churn.points, "label_unmatched_count", &[]), Some(1.0));
}
