//! `mltap demo`, run as the real binary: it starts, sends traffic through mltap,
//! prints where the dashboard, metrics and files are, writes files, and exits 0.

use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn demo(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mltap")).arg("demo").args(args).output().expect("the mltap binary runs")
}

fn json_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|entries| {
            entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "json")).collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Runs `demo --for 10s --bucket 2s` into a fresh output dir and checks the run
/// itself; returns the output dir and stdout.
fn run_demo_checked(dir: &Path) -> (std::path::PathBuf, String, String) {
    let out = dir.join("out");
    let output = demo(&["--for", "10s", "--bucket", "2s", "--output-dir", out.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}", output.status);

    let anodot = out.join("anodot");
    assert!(stdout.contains("dashboard       http://127.0.0.1:"), "{stdout}");
    assert!(stdout.contains("/metrics"), "{stdout}");
    assert!(stdout.contains(&anodot.display().to_string()), "the files' place is printed: {stdout}");
    assert!(stdout.contains("Summary:"), "{stdout}");

    // The last progress line counts requests through mltap, over both protocols, none failed.
    let last = stdout.lines().rfind(|l| l.contains("requests ") && l.contains("gRPC")).unwrap();
    let number_after = |key: &str| -> u64 {
        let rest = &last[last.find(key).unwrap_or_else(|| panic!("{key} in {last}")) + key.len()..];
        rest.chars().take_while(char::is_ascii_digit).collect::<String>().parse().unwrap()
    };
    assert!(number_after("requests ") > 20, "{last}");
    assert!(number_after("gRPC ") > 0 && number_after("REST ") > 0, "{last}");
    assert_eq!(number_after("failed "), 0, "{last}");
    (out, stdout, stderr)
}

#[test]
fn demo_for_ten_seconds_sends_traffic_through_mltap_prints_where_things_are_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    run_demo_checked(dir.path());
}

#[test]
fn demo_writes_anodot_files_with_input_output_and_estimated_accuracy_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let (out, stdout, stderr) = run_demo_checked(dir.path());
    let anodot = out.join("anodot");

    // The monitoring engine wrote valid Anodot files for the churn model, named in
    // the printout.
    let churn = json_files(&anodot.join("churn"));
    assert!(!churn.is_empty(), "no churn files in {}\nstdout:\n{stdout}\nstderr:\n{stderr}", anodot.display());
    assert!(stdout.contains(&churn.last().unwrap().display().to_string()), "the latest file is printed: {stdout}");
    let mut whats = std::collections::BTreeSet::new();
    for file in &churn {
        let points: Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
        for point in points.as_array().unwrap() {
            assert_eq!(point["properties"]["model"], "churn");
            whats.insert(point["properties"]["what"].as_str().unwrap().to_string());
        }
    }
    for what in ["feature_value", "prediction_count", "estimated_accuracy"] {
        assert!(whats.contains(what), "{what} missing from {whats:?}");
    }
}

/// The stream points (those with a signature) of a model's files.
fn stream_points(dir: &Path) -> Vec<Value> {
    json_files(dir)
        .iter()
        .flat_map(|file| {
            let points: Value = serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
            points.as_array().unwrap().clone()
        })
        .filter(|p| p["properties"].get("signature").is_some())
        .collect()
}

#[test]
fn demo_streams_carry_their_served_version_and_the_regression_model_its_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let output =
        demo(&["--for", "12s", "--bucket", "2s", "--label-horizon", "2s", "--output-dir", out.to_str().unwrap()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let anodot = out.join("anodot");
    // REST calls name no version, gRPC calls do: both are attributed to the served
    // version, so each model is one stream.
    for model in ["churn", "fraud", "eta"] {
        let points = stream_points(&anodot.join(model));
        assert!(!points.is_empty(), "no points of {model}");
        for point in &points {
            assert_eq!(point["properties"]["version"], "1", "a point of {model} without its served version: {point}");
        }
    }
    let eta: std::collections::BTreeSet<String> = stream_points(&anodot.join("eta"))
        .iter()
        .map(|p| p["properties"]["what"].as_str().unwrap().to_string())
        .collect();
    for what in ["prediction_value", "feature_value", "mae", "rmse", "r2", "error_mean", "label_value"] {
        assert!(eta.contains(what), "{what} missing from eta's metrics {eta:?}");
    }
    for what in ["prediction_count", "accuracy", "max_prediction_proba"] {
        assert!(!eta.contains(what), "the regression model was scored as a classifier: {what}");
    }
}

#[test]
fn demo_with_a_bad_duration_names_the_flag_and_exits_2() {
    let output = demo(&["--for", "soon"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--for") && stderr.contains("soon"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");
}
