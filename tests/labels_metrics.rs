//! Label metrics have exactly the values computed by hand, through the service and
//! the embedded store.

mod labels_support;

use labels_support::*;
use mltap::config::LabelsStoreConfig;
use std::time::SystemTime;

#[tokio::test]
async fn a_labeled_binary_batch_gives_the_hand_computed_metrics() {
    let (_dir, path) = temp_dir();
    let service = service(settings(&path, LabelsStoreConfig::Embedded)).await;
    let start = current_bucket();
    service.record(&fraud_observation("fraud"), start).await.unwrap();
    let (entries, rejected) = mltap::labels::endpoint::parse_body(FRAUD_LABELS.as_bytes()).unwrap();
    assert!(rejected.is_empty());
    let outcome = service.ingest(entries, SystemTime::now()).await.unwrap();
    assert_eq!((outcome.accepted, outcome.unmatched, outcome.late), (7, 0, 0));

    assert!(service.due(at(start, 30)).await.unwrap().is_empty(), "emitted before the horizon");
    let due = service.due(after_horizon(start)).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!((due[0].model.as_str(), due[0].bucket_start), ("fraud", start));
    assert!(due[0].points.iter().all(|p| p.timestamp == start));
    assert_fraud_metrics(&due[0].points);
    assert!(service.due(after_horizon(start)).await.unwrap().is_empty(), "a bucket is emitted once");
}

#[tokio::test]
async fn undefined_metrics_are_omitted_not_written_as_zero() {
    let (_dir, path) = temp_dir();
    let service = service(settings(&path, LabelsStoreConfig::Embedded)).await;
    let start = current_bucket();
    // Single-row requests (the id is the request id); class_2 is never predicted nor actual.
    let rows = [([0.5, 0.25, 0.25], 0), ([0.25, 0.5, 0.25], 0), ([0.125, 0.75, 0.125], 1), ([0.5, 0.25, 0.25], 1)];
    let mut body = String::new();
    for (i, (probs, actual)) in rows.iter().enumerate() {
        let id = format!("req-{i}");
        service.record(&observation("iris", &id, &[probs.to_vec()], None), start).await.unwrap();
        body.push_str(&format!("{{\"id\": \"{id}\", \"label\": {actual}}}\n"));
    }
    let (entries, _) = mltap::labels::endpoint::parse_body(body.as_bytes()).unwrap();
    assert_eq!(service.ingest(entries, SystemTime::now()).await.unwrap().accepted, 4);
    let due = service.due(after_horizon(start)).await.unwrap();
    let points = &due[0].points;

    assert_close(value(points, "accuracy", &[]), 0.5, "accuracy");
    for class in ["class_0", "class_1"] {
        assert_close(value(points, "precision", &[("class_name", class)]), 0.5, "precision");
        assert_close(value(points, "recall", &[("class_name", class)]), 0.5, "recall");
        assert_close(value(points, "f1", &[("class_name", class)]), 0.5, "f1");
    }
    for what in ["precision", "recall", "f1"] {
        assert_eq!(value(points, what, &[("class_name", "class_2")]), None, "{what} of a class never seen");
    }
    // Never predicted nor actual: every row is a true negative.
    assert_close(value(points, "accuracy", &[("class_name", "class_2")]), 1.0, "accuracy class_2");
    assert_close(value(points, "macro_f1", &[]), 0.5, "macro_f1 over the classes present");
    assert_close(value(points, "weighted_f1", &[]), 0.5, "weighted_f1");
    assert_eq!(value(points, "roc_auc", &[]), None, "roc_auc is for binary models");
    let log_loss = -(0.5f64.ln() + 0.25f64.ln() + 0.75f64.ln() + 0.25f64.ln()) / 4.0;
    assert_close(value(points, "log_loss", &[]), log_loss, "log_loss");
    // Multiclass Brier, summed over classes: 0.375 + 0.875 + 0.09375 + 0.875.
    assert_close(value(points, "brier_score", &[]), 2.21875 / 4.0, "brier_score");
    assert_eq!(value(points, "label_count", &[("class_name", "class_2")]), Some(0.0));
    assert_eq!(value(points, "confusion_count", &[("actual_class", "class_2"), ("class_name", "class_2")]), None);
}

#[tokio::test]
async fn a_bucket_without_labels_reports_only_its_labeled_fraction() {
    let (_dir, path) = temp_dir();
    let service = service(settings(&path, LabelsStoreConfig::Embedded)).await;
    let start = current_bucket();
    service.record(&fraud_observation("fraud"), start).await.unwrap();
    let due = service.due(after_horizon(start)).await.unwrap();
    let whats: Vec<&str> = due[0].points.iter().map(|p| p.what()).collect();
    assert_eq!(whats, vec!["labeled_fraction"]);
    assert_eq!(due[0].points[0].value, 0.0);
}
