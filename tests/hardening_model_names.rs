//! Model names chosen by clients cannot break or mix up mltap's files: a name longer
//! than a file name allows is cut with a hash suffix (one warning), names that an
//! older sanitising made equal get directories of their own, and a client model named
//! `__mltap__` does not write into the pseudo-model's directory. Against the binary.

mod hardening_support;
mod support;

use hardening_support::{raw_status, Serve, ServeOptions};
use std::collections::BTreeSet;
use std::time::Duration;
use support::fake_tfserving::{rest_fixtures, FakeTfServing};

/// A REST predict of the fixture's body for `model` (URL-encoded in the path).
async fn predict(mltap: &Serve, model_in_path: &str) {
    let fixture = rest_fixtures().into_iter().find(|f| f.status == 200 && f.path.ends_with(":predict")).unwrap();
    let head = format!(
        "POST /v1/models/{model_in_path}:predict HTTP/1.1\r\nHost: mltap\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        fixture.request.len()
    );
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&fixture.request);
    assert!(raw_status(mltap.rest, &bytes).await.is_some(), "{model_in_path}");
}

fn model_dirs(out: &std::path::Path) -> BTreeSet<String> {
    std::fs::read_dir(out.join("anodot"))
        .map(|dirs| dirs.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn long_colliding_and_reserved_model_names_get_files_of_their_own() {
    let fake = FakeTfServing::start().await;
    let out = tempfile::tempdir().unwrap();
    let mut options = ServeOptions::new(fake.grpc_url(), fake.rest_url(), out.path());
    options.args = vec!["--bucket", "1s"];
    options.config = Some("[monitor]\ngrace_seconds = 1\n");
    let mut mltap = Serve::start(options).await;

    let long_a = "m".repeat(300);
    let long_b = format!("{}n", "m".repeat(299));
    for model in [long_a.as_str(), long_b.as_str(), "a%b", "a&b", "a_b", "__mltap__"] {
        for _ in 0..3 {
            predict(&mltap, model).await;
        }
    }
    let expected = 6;
    let mut dirs = BTreeSet::new();
    for _ in 0..100 {
        dirs = model_dirs(out.path());
        if dirs.iter().filter(|d| d.as_str() != "__mltap__").count() >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let client_dirs: Vec<&String> = dirs.iter().filter(|d| d.as_str() != "__mltap__").collect();
    assert_eq!(client_dirs.len(), expected, "{dirs:?}");
    // Long names: bounded, distinct, with a hash suffix.
    let long: Vec<&&String> = client_dirs.iter().filter(|d| d.starts_with("mmmm")).collect();
    assert_eq!(long.len(), 2, "{dirs:?}");
    for dir in &long {
        assert!(dir.len() <= 200 && dir.contains('~'), "{dir}");
    }
    // `a%b`, `a&b` and `a_b` (the path is not decoded: these are the model names)
    // used to share `a_b`.
    for dir in ["a%25b", "a%26b", "a_b"] {
        assert!(dirs.contains(dir), "{dir} in {dirs:?}");
    }
    // The client's `__mltap__` is not the pseudo-model's.
    assert!(client_dirs.iter().any(|d| d.contains("mltap__") && d.starts_with('%')), "{dirs:?}");
    if let Ok(files) = std::fs::read_dir(out.path().join("anodot/__mltap__")) {
        for file in files.filter_map(|e| e.ok()) {
            let text = std::fs::read_to_string(file.path()).unwrap();
            assert!(!text.contains("\"model\":\"__mltap__\""), "no client point in the pseudo-model's files: {text}");
        }
    }
    let stderr = mltap.stderr().await;
    assert!(!stderr.contains("File name too long"), "{stderr}");
    let warnings = stderr.lines().filter(|l| l.contains("too long for a file name")).count();
    assert_eq!(warnings, 1, "one rate-limited warning: {stderr}");
    assert!(!stderr.contains(&long_a), "the warning does not carry the whole name");
}
