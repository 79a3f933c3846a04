//! `mltap send DIR --anodot-url URL` end to end, through the real binary, against a
//! fake Anodot on loopback.

mod delivery_support;

use delivery_support::{identity, points, write_spool, FakeAnodot, Reply};
use serde_json::json;
use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Output};

const T0: i64 = 1_700_000_040;

fn send(dir: &Path, url: &str, token: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mltap"));
    cmd.arg("send").arg(dir).arg("--anodot-url").arg(url).env_remove("MLTAP_ANODOT_URL").env("MLTAP_LOG", "warn");
    match token {
        Some(t) => cmd.env("ANODOT_TOKEN", t),
        None => cmd.env_remove("ANODOT_TOKEN"),
    };
    cmd.output().unwrap()
}

fn text(output: &Output) -> (String, String) {
    (String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn send_uploads_an_output_dir_once_with_progress_and_a_summary() {
    let server = FakeAnodot::start();
    let out = tempfile::tempdir().unwrap();
    write_spool(out.path(), "iris", T0, &points("iris", T0, 0, 1200));
    write_spool(out.path(), "mnist", T0 + 60, &points("mnist", T0 + 60, 0, 300));

    let first = send(out.path(), &server.url(), Some("tok-cli-secret"));
    let (stdout, stderr) = text(&first);
    assert!(first.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("1500 points accepted, 0 rejected"), "{stdout}");
    assert!(stderr.contains("100%"), "progress on stderr: {stderr}");
    assert!(!stdout.contains("tok-cli-secret") && !stderr.contains("tok-cli-secret"));
    let posts = server.metric_posts();
    assert_eq!(posts.iter().map(|p| p.body.as_array().unwrap().len()).collect::<Vec<_>>(), [1000, 500]);
    assert!(posts.iter().all(|p| p.query.get("token").map(String::as_str) == Some("tok-cli-secret")));
    // The cursor is the one `serve` keeps beside the spool.
    assert!(out.path().join("delivery/cursor.json").exists());

    let second = send(out.path(), &server.url(), Some("tok-cli-secret"));
    let (stdout, _) = text(&second);
    assert!(second.status.success());
    assert!(stdout.contains("0 points accepted") && stdout.contains("1500 points were delivered by an earlier run"));
    assert_eq!(server.metric_posts().len(), 2);
    let accepted = server.accepted_points();
    assert_eq!(accepted.iter().map(identity).collect::<HashSet<_>>().len(), 1500);
}

#[test]
fn send_exits_non_zero_and_says_why_when_anodot_refuses_the_token() {
    let server = FakeAnodot::start();
    let out = tempfile::tempdir().unwrap();
    write_spool(out.path(), "iris", T0, &points("iris", T0, 0, 10));
    server.script([Reply::Status(401)]);
    let output = send(&out.path().join("anodot"), &server.url(), Some("bad-token"));
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(1), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stderr.contains("refused the token"), "{stderr}");
    assert!(stderr.contains("Run the same command again"), "{stderr}");
    assert!(stdout.contains("10 points not sent"), "{stdout}");
    assert!(!stderr.contains("bad-token") && !stdout.contains("bad-token"));

    // Fixed: the next run sends everything.
    let output = send(&out.path().join("anodot"), &server.url(), Some("good-token"));
    assert!(output.status.success(), "{:?}", text(&output));
    assert_eq!(server.accepted_points().len(), 10);
}

#[test]
fn send_exits_non_zero_when_anodot_rejects_points() {
    let server = FakeAnodot::start();
    let out = tempfile::tempdir().unwrap();
    write_spool(out.path(), "iris", T0, &points("iris", T0, 0, 4));
    server.script([Reply::Json(200, json!({"errors": [{"error": 2011, "description": "illegal value", "index": 0}]}))]);
    let output = send(out.path(), &server.url(), Some("tok"));
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(1));
    assert!(stdout.contains("3 points accepted, 1 rejected"), "{stdout}");
    assert!(stderr.contains("1 points were rejected by Anodot"), "{stderr}");
    assert!(stderr.contains("2011"), "the rejection is logged with its code: {stderr}");
}

#[test]
fn send_without_a_token_or_a_spool_explains_itself() {
    let server = FakeAnodot::start();
    let out = tempfile::tempdir().unwrap();
    write_spool(out.path(), "iris", T0, &points("iris", T0, 0, 4));
    let output = send(out.path(), &server.url(), None);
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output).1.contains("ANODOT_TOKEN"), "{:?}", text(&output));

    let empty = tempfile::tempdir().unwrap();
    let output = send(empty.path(), &server.url(), Some("tok"));
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output).1.contains("no Anodot files"), "{:?}", text(&output));
    assert!(server.metric_posts().is_empty());
}

#[test]
fn connection_failures_are_reported_without_the_token() {
    let out = tempfile::tempdir().unwrap();
    write_spool(out.path(), "iris", T0, &points("iris", T0, 0, 3));
    // A port nobody listens on: every request fails to connect.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mltap"));
    cmd.arg("send")
        .arg(out.path())
        .args(["--anodot-url", &format!("http://127.0.0.1:{port}"), "--give-up-after", "1s"])
        .env("ANODOT_TOKEN", "tok-never-shown")
        .env("MLTAP_LOG", "debug");
    let output = cmd.output().unwrap();
    let (stdout, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr.contains("connection failed") && stderr.contains("gave up"), "{stderr}");
    assert!(stdout.contains("3 points not sent"), "{stdout}");
    assert!(!stderr.contains("tok-never-shown") && !stdout.contains("tok-never-shown"), "{stderr}");
}

#[test]
fn send_refuses_a_spool_another_live_process_is_delivering() {
    let server = FakeAnodot::start();
    let out = tempfile::tempdir().unwrap();
    write_spool(out.path(), "iris", T0, &points("iris", T0, 0, 3));
    // A live process (this test) holds the cursor's OS lock, as a running `serve` would.
    std::fs::create_dir_all(out.path().join("delivery")).unwrap();
    let lock_path = out.path().join("delivery/lock");
    std::fs::write(&lock_path, format!("pid {} on a-host", std::process::id())).unwrap();
    let held = std::fs::OpenOptions::new().write(true).open(&lock_path).unwrap();
    held.lock().unwrap();
    let output = send(out.path(), &server.url(), Some("tok"));
    let (_, stderr) = text(&output);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr.contains(&format!("another mltap process (pid {} on a-host)", std::process::id())), "{stderr}");
    assert!(server.metric_posts().is_empty());

    // A lock file nobody holds (its process is gone, whatever pid it names) is taken.
    drop(held);
    std::fs::write(&lock_path, "pid 1 on a-host").unwrap();
    let output = send(out.path(), &server.url(), Some("tok"));
    assert!(output.status.success(), "{:?}", text(&output));
    let after = std::fs::OpenOptions::new().write(true).open(&lock_path).unwrap();
    after.try_lock().expect("the lock goes with the process");
}
