//! `POST /v1/labels` through a real HTTP server on loopback: answers, bad bodies,
//! body limit, bearer token.

mod labels_support;

use labels_support::*;
use mltap::config::LabelsStoreConfig;
use mltap::labels::{LabelSettings, LabelsRoute};
use serde_json::json;
use std::sync::Arc;

async fn route_over(settings: LabelSettings) -> (std::net::SocketAddr, Arc<mltap::labels::LabelService>) {
    let service = service(settings).await;
    let route = LabelsRoute::new(service.clone()).unwrap();
    (serve_route(Arc::new(route)).await, service)
}

#[tokio::test]
async fn valid_entries_are_joined_even_when_others_are_rejected() {
    let (_dir, path) = temp_dir();
    let (addr, service) = route_over(settings(&path, LabelsStoreConfig::Embedded)).await;
    service.record(&fraud_observation("fraud"), current_bucket()).await.unwrap();
    let body = r#"[
        {"id": "tx-batch:0", "label": "fraud"},
        {"id": "tx-batch:1"},
        {"id": "tx-batch:2", "label": 7},
        {"id": "nobody", "label": 1},
        {"id": "tx-batch:3", "label": [1]},
        {"id": "tx-batch:4", "label": false}
    ]"#;
    let (status, answer) = post_labels(addr, body, None).await;
    assert_eq!(status, 200);
    assert_eq!(answer["accepted"], 2);
    assert_eq!(answer["unmatched"], 1);
    let rejected: Vec<u64> =
        answer["rejected"].as_array().unwrap().iter().map(|r| r["index"].as_u64().unwrap()).collect();
    assert_eq!(rejected, vec![1, 2, 4]);
    assert_eq!(answer["rejected"][0]["error"], "missing \"label\"");
    assert!(answer["rejected"][1]["error"].as_str().unwrap().contains("out of range"));
}

#[tokio::test]
async fn ndjson_bodies_are_accepted() {
    let (_dir, path) = temp_dir();
    let (addr, service) = route_over(settings(&path, LabelsStoreConfig::Embedded)).await;
    service.record(&fraud_observation("fraud"), current_bucket()).await.unwrap();
    let body = "{\"id\": \"tx-batch:0\", \"label\": 1}\r\n\n{\"id\": \"tx-batch:1\", \"label\": \"legit\"}\n";
    let (status, answer) = post_labels(addr, body, None).await;
    assert_eq!(status, 200);
    assert_eq!(answer, json!({"accepted": 2, "unmatched": 0, "late": 0, "rejected": []}));
}

#[tokio::test]
async fn a_body_that_is_not_json_gets_400_naming_the_failing_entry() {
    let (_dir, path) = temp_dir();
    let (addr, _service) = route_over(settings(&path, LabelsStoreConfig::Embedded)).await;
    let (status, answer) =
        post_labels(addr, r#"[{"id": "a", "label": 1}, {"id": "b", "label": 2}, {"id": "c", "label": }]"#, None).await;
    assert_eq!(status, 400);
    let message = answer["error"].as_str().unwrap();
    assert!(message.contains("entry 2") && message.contains("column"), "{message}");

    let (status, answer) = post_labels(addr, "{\"id\": \"a\", \"label\": 1}\nnot json\n", None).await;
    assert_eq!(status, 400);
    assert!(answer["error"].as_str().unwrap().contains("line 2 (entry 1)"), "{answer}");

    let (status, _) = post_labels(addr, "  \n", None).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn bodies_over_the_limit_get_413() {
    let (_dir, path) = temp_dir();
    let mut settings = settings(&path, LabelsStoreConfig::Embedded);
    settings.labels.max_body_bytes = 64;
    let (addr, _service) = route_over(settings).await;
    let body = format!("[{}]", [r#"{"id": "a", "label": 1}"#; 10].join(","));
    let (status, answer) = post_labels(addr, &body, None).await;
    assert_eq!(status, 413);
    assert!(answer["error"].as_str().unwrap().contains("max_body_bytes"));
    let (status, _) = post_labels(addr, r#"[{"id": "a", "label": 1}]"#, None).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_configured_token_is_required_and_never_echoed() {
    let (_dir, path) = temp_dir();
    let variable = "MLTAP_TEST_LABELS_TOKEN_ENDPOINT";
    std::env::set_var(variable, "s3cret-token");
    let mut settings = settings(&path, LabelsStoreConfig::Embedded);
    settings.labels.token_env = Some(variable.to_string());
    let (addr, _service) = route_over(settings).await;
    let body = r#"[{"id": "a", "label": 1}]"#;

    let (status, answer) = post_labels(addr, body, None).await;
    assert_eq!(status, 401);
    assert!(!answer.to_string().contains("s3cret"));
    let (status, _) = post_labels(addr, body, Some("wrong")).await;
    assert_eq!(status, 401);
    let (status, answer) = post_labels(addr, body, Some("s3cret-token")).await;
    assert_eq!(status, 200);
    assert_eq!(answer["unmatched"], 1);
}

#[tokio::test]
async fn a_token_variable_that_is_not_set_stops_start_up() {
    let (_dir, path) = temp_dir();
    let mut settings = settings(&path, LabelsStoreConfig::Embedded);
    settings.labels.token_env = Some("MLTAP_TEST_LABELS_TOKEN_NEVER_SET".to_string());
    let service = service(settings).await;
    let error = LabelsRoute::new(service).unwrap_err();
    assert!(error.to_string().contains("MLTAP_TEST_LABELS_TOKEN_NEVER_SET"), "{error}");
}

#[tokio::test]
async fn other_methods_get_405() {
    let (_dir, path) = temp_dir();
    let (addr, _service) = route_over(settings(&path, LabelsStoreConfig::Embedded)).await;
    let response = client().get(format!("http://{addr}/v1/labels")).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 405);
    assert_eq!(response.headers()["allow"], "POST");
}
