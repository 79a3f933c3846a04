//! The embedded store: joins survive a restart, late and unmatched labels are
//! counted, rows expire after the horizon and the store's size is bounded with
//! evictions counted, and labels can be attributed to their arrival bucket.

mod labels_support;

use labels_support::*;
use mltap::config::LabelsStoreConfig;
use mltap::labels::endpoint::parse_body;
use mltap::labels::LabelService;
use redb::TableHandle;
use std::path::Path;
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

#[tokio::test]
async fn every_row_of_a_64_row_exchange_joins_by_id_and_row_and_a_one_row_exchange_by_id() {
    let (_dir, path) = temp_dir();
    let service = service(settings(&path, LabelsStoreConfig::Embedded)).await;
    let start = current_bucket();
    service.record(&exchange_observation("fraud", "req-64", 64), start).await.unwrap();
    service.record(&exchange_observation("fraud", "req-1", 1), start).await.unwrap();
    // Ids of the wrong shape name nothing: a one-row exchange has no `:0`, a batch no bare id.
    let wrong = ["req-1:0", "req-64", "req-64:64", "req-64:01"].map(String::from);
    let outcome = ingest(&service, &labels_body(&wrong), at(start, 1)).await;
    assert_eq!((outcome.accepted, outcome.unmatched), (0, 4));

    let mut ids = row_ids("req-64", 64);
    ids.push("req-1".into());
    let outcome = ingest(&service, &labels_body(&ids), at(start, 1)).await;
    assert_eq!((outcome.accepted, outcome.unmatched), (65, 0));
    let again = ingest(&service, &labels_body(&ids), at(start, 2)).await;
    assert_eq!((again.accepted, again.unmatched), (0, 65), "a row takes one label");
    assert!(metrics_text(&service).contains("mltap_label_rows_recorded_total 65"));

    let due = service.due(after_horizon(start)).await.unwrap();
    let fraud = due.iter().find(|d| d.model == "fraud").unwrap();
    assert_eq!(value(&fraud.points, "labeled_fraction", &[]), Some(1.0));
    // Every label is `fraud`; rows predict fraud when p > 0.5: rows 5, 6, 7 of every 8.
    assert_eq!(value(&fraud.points, "label_count", &[("class_name", "fraud")]), Some(65.0));
    let cell = |predicted: &str| {
        value(&fraud.points, "confusion_count", &[("actual_class", "fraud"), ("class_name", predicted)])
    };
    assert_eq!((cell("fraud"), cell("legit")), (Some(24.0), Some(41.0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tasks_racing_for_the_same_ids_join_each_row_once() {
    let (_dir, path) = temp_dir();
    let service = service(settings(&path, LabelsStoreConfig::Embedded)).await;
    let start = current_bucket();
    for exchange in 0..8 {
        service.record(&exchange_observation("fraud", &format!("race-{exchange}"), 64), start).await.unwrap();
    }
    let ids: Vec<String> = (0..8).flat_map(|exchange| row_ids(&format!("race-{exchange}"), 64)).collect();
    let tasks: Vec<_> = (0..2)
        .map(|task| {
            let service = service.clone();
            // Each task posts every id, in batches of 16, in its own order.
            let mut ids = ids.clone();
            if task == 1 {
                ids.reverse();
            }
            tokio::spawn(async move {
                let (mut accepted, mut unmatched) = (0, 0);
                for chunk in ids.chunks(16) {
                    let outcome = ingest(&service, &labels_body(chunk), SystemTime::now()).await;
                    accepted += outcome.accepted;
                    unmatched += outcome.unmatched;
                }
                (accepted, unmatched)
            })
        })
        .collect();
    let (mut accepted, mut unmatched) = (0, 0);
    for task in tasks {
        let (a, u) = task.await.unwrap();
        accepted += a;
        unmatched += u;
    }
    assert_eq!((accepted, unmatched), (512, 512), "each of the 512 rows joined exactly one of its two labels");
    service.due(SystemTime::now()).await.unwrap();
    assert!(metrics_text(&service).contains("mltap_label_store_pending_rows 0"));
}

#[tokio::test]
async fn expiry_drops_whole_exchanges_and_keeps_the_pending_count_exact() {
    let (_dir, path) = temp_dir();
    let mut settings = settings(&path, LabelsStoreConfig::Embedded);
    settings.labels.late_window_seconds = 60;
    let service = service(settings).await;
    let now = current_bucket();
    // An older bucket whose rows expire first, and the current one.
    let old = now - WIDTH as i64;
    service.record(&exchange_observation("fraud", "old", 64), old).await.unwrap();
    service.record(&exchange_observation("fraud", "new", 64), now).await.unwrap();
    let outcome = ingest(&service, &labels_body(&row_ids("old", 4)), at(now, 1)).await;
    assert_eq!(outcome.accepted, 4);
    service.due(at(now, 1)).await.unwrap();
    assert!(metrics_text(&service).contains("mltap_label_store_pending_rows 124"));

    // Past the old bucket's expiry, before the new one's.
    let between = at(old, (WIDTH + HORIZON + 60) as i64);
    service.due(between).await.unwrap();
    assert!(metrics_text(&service).contains("mltap_label_store_pending_rows 64"), "{}", metrics_text(&service));
    let outcome = ingest(&service, r#"[{"id": "old:10", "label": 1}, {"id": "new:10", "label": 1}]"#, between).await;
    assert_eq!((outcome.accepted, outcome.unmatched), (1, 1));
}

#[tokio::test]
async fn a_store_file_of_the_per_row_format_is_converted_and_its_rows_still_join() {
    use mltap::labels::record::{PendingRow, StreamMeta};
    let (_dir, path) = temp_dir();
    let start = current_bucket();
    let meta = StreamMeta {
        model: "fraud".into(),
        version: Some(3),
        signature: "serving_default".into(),
        class_names: vec!["legit".into(), "fraud".into()],
    };
    let expires_ms = (start + (WIDTH + HORIZON + 3600) as i64) * 1000;
    {
        // What the per-row format (1) wrote: one entry per row id, and its expiry index.
        let rows: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("rows");
        let expiry: redb::TableDefinition<(i64, &[u8]), ()> = redb::TableDefinition::new("row_expiry");
        let streams: redb::TableDefinition<u64, &str> = redb::TableDefinition::new("streams");
        let db = redb::Database::create(path.join(mltap::labels::service::EMBEDDED_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut rows = txn.open_table(rows).unwrap();
            let mut expiry = txn.open_table(expiry).unwrap();
            for (row, p) in [(0, 0.75f32), (1, 0.25)] {
                let id = format!("old-req:{row}");
                let pending = PendingRow {
                    stream: meta.id(),
                    bucket_start: start,
                    expires_ms,
                    predicted: u16::from(p > 0.5),
                    probabilities: vec![1.0 - p, p],
                    prediction: None,
                };
                rows.insert(id.as_bytes(), pending.encode().as_slice()).unwrap();
                expiry.insert((expires_ms, id.as_bytes()), ()).unwrap();
            }
            let json = serde_json::to_string(&meta).unwrap();
            txn.open_table(streams).unwrap().insert(meta.id(), json.as_str()).unwrap();
        }
        txn.commit().unwrap();
    }
    let service = service(settings(&path, LabelsStoreConfig::Embedded)).await;
    service.due(at(start, 1)).await.unwrap();
    assert!(metrics_text(&service).contains("mltap_label_store_pending_rows 2"));
    let body = r#"[{"id": "old-req:0", "label": "fraud"}, {"id": "old-req:1", "label": "fraud"}, {"id": "old-req:0", "label": 0}]"#;
    let outcome = ingest(&service, body, at(start, 1)).await;
    assert_eq!((outcome.accepted, outcome.unmatched), (2, 1));
    let due = service.due(after_horizon(start)).await.unwrap();
    let fraud = due.iter().find(|d| d.model == "fraud").expect("the converted rows' bucket");
    assert_close(value(&fraud.points, "accuracy", &[]), 0.5, "accuracy");
}

/// The stream of the records written by earlier formats in the conversion tests.
fn converted_stream() -> mltap::labels::record::StreamMeta {
    mltap::labels::record::StreamMeta {
        model: "fraud".into(),
        version: Some(3),
        signature: "serving_default".into(),
        class_names: vec!["legit".into(), "fraud".into()],
    }
}

/// What an earlier format held, by request id with its expiry: a 3-row exchange
/// whose row 1 was already taken, a one-row exchange, and an expired exchange that
/// must not come back.
fn earlier_format_records(start: i64) -> Vec<(&'static str, Vec<u8>, i64)> {
    use mltap::labels::record::ExchangeWriter;
    let stream = converted_stream().id();
    let expires_ms = (start + (WIDTH + HORIZON + 3600) as i64) * 1000;
    let expired_ms = (start - 10) * 1000;
    let mut three = ExchangeWriter::new(stream, start, expires_ms, true, 2, 3);
    for p in [0.75, 0.25, 0.75] {
        three.push_row(u16::from(p > 0.5), &[1.0 - p, p]);
    }
    three.mark_taken(1);
    let mut one = ExchangeWriter::new(stream, start, expires_ms, false, 2, 1);
    one.push_row(1, &[0.25, 0.75]);
    let mut gone = ExchangeWriter::new(stream, start, expired_ms, true, 2, 2);
    gone.push_row(1, &[0.25, 0.75]);
    gone.push_row(1, &[0.25, 0.75]);
    vec![
        ("req-3", three.finish(), expires_ms),
        ("req-1", one.finish(), expires_ms),
        ("req-old", gone.finish(), expired_ms),
    ]
}

/// Writes an earlier format's file: `fill` writes its records; the stream and the
/// format go in as every format stored them.
fn write_earlier_format(path: &Path, format: u64, fill: impl FnOnce(&redb::WriteTransaction)) {
    let streams: redb::TableDefinition<u64, &str> = redb::TableDefinition::new("streams");
    let meta_table: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
    let db = redb::Database::create(path.join(mltap::labels::service::EMBEDDED_FILE)).unwrap();
    let txn = db.begin_write().unwrap();
    fill(&txn);
    {
        let mut meta_table = txn.open_table(meta_table).unwrap();
        meta_table.insert("format", format).unwrap();
        meta_table.insert("pending_rows", 5).unwrap();
        let meta = converted_stream();
        let json = serde_json::to_string(&meta).unwrap();
        txn.open_table(streams).unwrap().insert(meta.id(), json.as_str()).unwrap();
    }
    txn.commit().unwrap();
}

/// Opens a converted file and checks that its rows join, exactly once, before and
/// after a restart in the current format.
async fn converted_rows_join(path: &Path, start: i64) {
    let service = service(settings(path, LabelsStoreConfig::Embedded)).await;
    service.due(at(start, 1)).await.unwrap();
    // The expired exchange is dropped by the conversion and the count recomputed.
    assert!(metrics_text(&service).contains("mltap_label_store_pending_rows 3"), "{}", metrics_text(&service));
    let body =
        r#"[{"id": "req-3:0", "label": "fraud"}, {"id": "req-3:1", "label": 1}, {"id": "req-old:0", "label": 1}]"#;
    let outcome = ingest(&service, body, at(start, 1)).await;
    assert_eq!((outcome.accepted, outcome.unmatched), (1, 2));
    drop(service);

    // Reopened in the new format: the index is rebuilt from the file.
    let service = labels_support::service(settings(path, LabelsStoreConfig::Embedded)).await;
    service.due(at(start, 2)).await.unwrap();
    assert!(metrics_text(&service).contains("mltap_label_store_pending_rows 2"), "{}", metrics_text(&service));
    let body =
        r#"[{"id": "req-3:2", "label": "fraud"}, {"id": "req-1", "label": "legit"}, {"id": "req-3:0", "label": 1}]"#;
    let outcome = ingest(&service, body, at(start, 2)).await;
    assert_eq!((outcome.accepted, outcome.unmatched), (2, 1));
    let due = service.due(after_horizon(start)).await.unwrap();
    let fraud = due.iter().find(|d| d.model == "fraud").expect("the converted rows' bucket");
    // req-3:0 (fraud, predicted fraud), req-3:2 (fraud, fraud), req-1 (legit, fraud).
    assert_close(value(&fraud.points, "accuracy", &[]), 2.0 / 3.0, "accuracy");
}

#[tokio::test]
async fn a_store_file_of_the_request_id_keyed_format_is_converted_and_its_rows_still_join() {
    let (_dir, path) = temp_dir();
    let start = current_bucket();
    // What format 2 wrote: one record per exchange under its request id and an
    // expiry index of them.
    write_earlier_format(&path, 2, |txn| {
        let exchanges: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("exchanges");
        let expiry: redb::TableDefinition<(i64, &[u8]), ()> = redb::TableDefinition::new("exchange_expiry");
        let mut exchanges = txn.open_table(exchanges).unwrap();
        let mut expiry = txn.open_table(expiry).unwrap();
        for (id, record, expires) in earlier_format_records(start) {
            exchanges.insert(id.as_bytes(), record.as_slice()).unwrap();
            expiry.insert((expires, id.as_bytes()), ()).unwrap();
        }
    });
    converted_rows_join(&path, start).await;
}

#[tokio::test]
async fn a_store_file_whose_log_is_in_redb_tables_is_converted_and_its_rows_still_join() {
    let (_dir, path) = temp_dir();
    let start = current_bucket();
    // What format 3 wrote: a log by sequence in tables of 4096 sequences, each entry
    // the key's length, the key and the record, and the log's start in `meta`. A
    // record before the start (evicted) must not come back either.
    write_earlier_format(&path, 3, |txn| {
        let mut entries = vec![("req-evicted", earlier_format_records(start).remove(0).1)];
        entries.extend(earlier_format_records(start).into_iter().map(|(id, record, _)| (id, record)));
        for (seq, (id, record)) in (4094u64..).zip(entries) {
            let table: redb::TableDefinition<u64, &[u8]> =
                redb::TableDefinition::new(if seq < 4096 { "exchange_log.0" } else { "exchange_log.1" });
            let mut entry = (id.len() as u16).to_le_bytes().to_vec();
            entry.extend_from_slice(id.as_bytes());
            entry.extend_from_slice(&record);
            txn.open_table(table).unwrap().insert(seq, entry.as_slice()).unwrap();
        }
        let meta_table: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
        txn.open_table(meta_table).unwrap().insert("log_start", 4095).unwrap();
    });
    converted_rows_join(&path, start).await;
    // Its tables are gone: the log is in segment files now.
    let db = redb::Database::open(path.join(mltap::labels::service::EMBEDDED_FILE)).unwrap();
    let txn = db.begin_read().unwrap();
    let tables: Vec<String> = txn.list_tables().unwrap().map(|t| t.name().to_string()).collect();
    assert!(!tables.iter().any(|t| t.starts_with("exchange_log.")), "{tables:?}");
    let segments = std::fs::read_dir(path.join("labels.redb.log")).unwrap().count();
    assert!(segments >= 1);
}

#[tokio::test]
async fn an_unreadable_or_newer_store_file_is_set_aside_and_the_store_starts_empty() {
    let (_dir, path) = temp_dir();
    let file = path.join(mltap::labels::service::EMBEDDED_FILE);
    // Store files set aside, and log segment directories set aside with them.
    let aside = |segments: bool| {
        std::fs::read_dir(&path)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let aside = name.starts_with("labels.redb.unusable-") || name.starts_with("labels.redb.corrupt-");
                aside && name.ends_with(".log") == segments
            })
            .count()
    };
    let set_aside = || aside(false);
    std::fs::write(&file, b"not a label store").unwrap();
    let service = service(settings(&path, LabelsStoreConfig::Embedded)).await;
    assert_eq!(set_aside(), 1);
    // Not redb at all: a damaged file, counted as such.
    service.due(SystemTime::now()).await.unwrap();
    assert!(metrics_text(&service).contains("mltap_label_store_corrupt_files_total 1"), "{}", metrics_text(&service));
    let start = current_bucket();
    service.record(&fraud_observation("fraud"), start).await.unwrap();
    assert_eq!(ingest(&service, FRAUD_LABELS, SystemTime::now()).await.accepted, 7);
    drop(service);

    // A file written by a later format is not guessed at either.
    {
        let meta: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");
        let db = redb::Database::create(&file).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(meta).unwrap().insert("format", 99).unwrap();
        txn.commit().unwrap();
    }
    let service = labels_support::service(settings(&path, LabelsStoreConfig::Embedded)).await;
    assert_eq!(set_aside(), 2);
    // The first store's log went aside with the newer file that replaced it.
    assert_eq!(aside(true), 1);
    service.record(&fraud_observation("fraud"), start).await.unwrap();
    assert_eq!(ingest(&service, FRAUD_LABELS, SystemTime::now()).await.accepted, 7);
}

#[tokio::test]
async fn a_rejected_label_for_the_last_waiting_row_leaves_it_for_a_correct_one() {
    let (_dir, path) = temp_dir();
    let service = service(settings(&path, LabelsStoreConfig::Embedded)).await;
    let start = current_bucket();
    service.record(&exchange_observation("fraud", "solo", 1), start).await.unwrap();
    service.record(&exchange_observation("fraud", "pair", 2), start).await.unwrap();
    assert_eq!(ingest(&service, r#"[{"id": "pair:0", "label": 1}]"#, SystemTime::now()).await.accepted, 1);
    let (entries, _) = parse_body(br#"[{"id": "solo", "label": 7}, {"id": "pair:1", "label": "spam"}]"#).unwrap();
    let outcome = service.ingest(entries, SystemTime::now()).await.unwrap();
    assert_eq!((outcome.accepted, outcome.rejected.len()), (0, 2));
    let outcome =
        ingest(&service, r#"[{"id": "solo", "label": 1}, {"id": "pair:1", "label": 0}]"#, SystemTime::now()).await;
    assert_eq!((outcome.accepted, outcome.unmatched), (2, 0));
}
