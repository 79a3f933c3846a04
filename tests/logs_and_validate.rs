//! The real binary's logs and its `validate` command: logs written to a pipe carry no
//! ANSI escape; every `--log-format json` line is a JSON object with `level`,
//! `target`, `message` and `fields`; `RUST_LOG` is honoured when `--log` and
//! `MLTAP_LOG` are unset; an invalid filter stops start-up with one line and exit 2;
//! `validate` exits 0 on a good configuration and 2 with serve's one-line error on a
//! bad one, and with `--check-upstreams` 1 when an upstream does not answer.

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn mltap() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mltap"));
    for var in ["MLTAP_LOG", "MLTAP_LOG_FORMAT", "RUST_LOG", "NO_COLOR", "MLTAP_CONFIG", "MLTAP_ADMIN_LISTEN"] {
        command.env_remove(var);
    }
    // A terminal type that would get colours if stderr were a terminal.
    command.env("TERM", "xterm-256color");
    command
}

/// Runs `serve` on free loopback ports with `extra` flags and env until it has logged
/// that it serves (or 10 s), sends a request that fails upstream (a warning), stops
/// it with SIGTERM, and returns its stderr.
fn serve_logs(extra: &[&str], env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let dead_upstream = format!("http://127.0.0.1:{}", free_port());
    let rest_port = free_port();
    let mut command = mltap();
    command
        .args(["serve", "--output-dir"])
        .arg(dir.path())
        .args(["--grpc-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--rest-listen", &format!("127.0.0.1:{rest_port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--grpc-upstream", &dead_upstream, "--rest-upstream", &dead_upstream])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", rest_port)).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    // A request to an upstream that is down: a warning with fields.
    if let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", rest_port)) {
        use std::io::Write;
        let _ = stream.write_all(b"GET /v1/models/iris HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
    }
    std::thread::sleep(Duration::from_millis(300));
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    child.wait().unwrap();
    stderr
}

#[test]
fn text_logs_on_a_pipe_carry_no_ansi_escape() {
    let logs = serve_logs(&[], &[]);
    assert!(logs.contains("mltap serving."), "{logs}");
    assert!(logs.contains("WARN"), "the failed upstream is logged: {logs}");
    assert!(!logs.contains('\u{1b}'), "ANSI escape in piped logs: {logs:?}");
}

#[test]
fn every_json_log_line_is_an_object_with_level_target_message_and_fields() {
    let logs = serve_logs(&["--log-format", "json"], &[]);
    let lines: Vec<&str> = logs.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "{logs}");
    for line in &lines {
        let value: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(value["level"].is_string() && value["target"].is_string(), "{line}");
        assert!(value["message"].is_string() && value["fields"].is_object(), "{line}");
        assert!(value["timestamp"].is_string(), "{line}");
    }
    let serving = lines.iter().find(|l| l.contains("mltap serving.")).expect("the start-up line");
    let serving: serde_json::Value = serde_json::from_str(serving).unwrap();
    assert_eq!(serving["level"], "INFO");
    assert_eq!(serving["message"], "mltap serving.");
    assert!(serving["fields"]["threads"].is_u64(), "{serving}");
    assert!(!logs.contains('\u{1b}'));
}

#[test]
fn the_format_comes_from_the_environment_and_rust_log_sets_the_filter() {
    // MLTAP_LOG_FORMAT=json with RUST_LOG=mltap=debug: debug lines of mltap, in JSON.
    let logs = serve_logs(&[], &[("MLTAP_LOG_FORMAT", "json"), ("RUST_LOG", "mltap=debug")]);
    let levels: Vec<String> = logs
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["level"].as_str().unwrap().to_string())
        .collect();
    assert!(levels.iter().any(|l| l == "DEBUG"), "RUST_LOG=mltap=debug gives debug lines: {logs}");
    // --log wins over RUST_LOG.
    let logs = serve_logs(&["--log", "warn"], &[("MLTAP_LOG_FORMAT", "json"), ("RUST_LOG", "debug")]);
    assert!(!logs.contains("\"DEBUG\"") && !logs.contains("\"INFO\""), "{logs}");
    assert!(logs.contains("\"WARN\""), "{logs}");
}

fn run(command: &mut Command) -> Output {
    command.stdin(Stdio::null()).output().unwrap()
}

fn one_line(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr:?}");
    stderr
}

#[test]
fn an_invalid_log_filter_stops_start_up_with_exit_2_and_one_line() {
    let output = run(mltap().args(["serve", "--log", "mltap=loud", "--admin-listen", "127.0.0.1:0"]));
    assert_eq!(output.status.code(), Some(2));
    let line = one_line(&output);
    assert!(line.contains("`log`") && line.contains("mltap=loud"), "{line}");

    let output = run(mltap().args(["serve", "--admin-listen", "127.0.0.1:0"]).env("RUST_LOG", "="));
    assert_eq!(output.status.code(), Some(2));
    assert!(one_line(&output).contains("RUST_LOG"));

    let output = run(mltap().args(["serve", "--log-format", "yaml"]));
    assert_eq!(output.status.code(), Some(2));
    assert!(one_line(&output).contains("log_format"));

    // `send` reads MLTAP_LOG too.
    let dir = tempfile::tempdir().unwrap();
    let output = run(mltap()
        .arg("send")
        .arg(dir.path())
        .args(["--anodot-url", "http://127.0.0.1:9"])
        .env("MLTAP_LOG", "x=loud"));
    assert_eq!(output.status.code(), Some(2));
    assert!(one_line(&output).contains("x=loud"));
}

#[test]
fn validate_checks_the_configuration_as_serve_does() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "bucket = \"30s\"\n[capture]\nqueue_exchanges = 100\n").unwrap();
    let output = run(mltap().args(["validate", "--config"]).arg(&good));
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("valid"));

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "bucket = \"soon\"\n").unwrap();
    let validated = run(mltap().args(["validate", "--config"]).arg(&bad));
    assert_eq!(validated.status.code(), Some(2));
    let served = run(mltap().args(["serve", "--config"]).arg(&bad));
    assert_eq!(served.status.code(), Some(2));
    assert_eq!(one_line(&validated), one_line(&served), "the same error as serve");
    assert!(one_line(&validated).contains("`bucket`"));

    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, "buckets = \"30s\"\n").unwrap();
    let output = run(mltap().args(["validate", "--config"]).arg(&unknown));
    assert_eq!(output.status.code(), Some(2));
    one_line(&output);
}

#[test]
fn validate_check_upstreams_names_the_one_that_does_not_answer() {
    let open = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up = format!("http://{}", open.local_addr().unwrap());
    let down = format!("http://127.0.0.1:{}", free_port());
    let output = run(mltap().args(["validate", "--check-upstreams", "--grpc-upstream", &up, "--rest-upstream", &up]));
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let output = run(mltap().args(["validate", "--check-upstreams", "--grpc-upstream", &up, "--rest-upstream", &down]));
    assert_eq!(output.status.code(), Some(1));
    let line = one_line(&output);
    assert!(line.contains("rest_upstream") && line.contains(&down), "{line}");
}
