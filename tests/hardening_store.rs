//! Monitoring faults never stop `mltap serve` (the real binary): a damaged embedded
//! label store is moved aside and replaced at start-up, and a store that fails on a
//! full disk recovers once space is freed, saying so on `/readyz` meanwhile without
//! failing readiness.

mod hardening_support;
mod support;

use hardening_support::{client, get, metric, raw_status, Serve, ServeOptions};
use std::path::Path;
use std::time::Duration;
use support::fake_tfserving::{rest_fixtures, FakeTfServing};

/// A REST predict through mltap with this request id; its status.
async fn predict(mltap: &Serve, id: &str) -> Option<u16> {
    let fixture = rest_fixtures().into_iter().find(|f| f.status == 200 && f.path.ends_with(":predict")).unwrap();
    post_predict(mltap, id, fixture).await
}

/// A classifier's REST predict (iris, 3 classes), whose rows are recorded for labels.
async fn predict_classifier(mltap: &Serve, id: &str) -> Option<u16> {
    let fixture = rest_fixtures().into_iter().find(|f| f.name == "row_single_input").unwrap();
    post_predict(mltap, id, fixture).await
}

async fn post_predict(mltap: &Serve, id: &str, fixture: support::fake_tfserving::RestFixture) -> Option<u16> {
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: mltap\r\nx-request-id: {id}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        fixture.path,
        fixture.request.len()
    );
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&fixture.request);
    raw_status(mltap.rest, &bytes).await
}

async fn post_labels(mltap: &Serve, ids: &[String]) -> (u16, String) {
    let body: Vec<serde_json::Value> = ids.iter().map(|id| serde_json::json!({"id": id, "label": 0})).collect();
    let response = client()
        .post(format!("{}/v1/labels", mltap.admin_url()))
        .header("content-type", "application/json")
        .body(serde_json::to_string(&body).unwrap())
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

const OPEN_LABELS: &str = "[labels]\nallow_unauthenticated = true\n";

fn set_aside(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("labels.redb.corrupt-"))
        .collect()
}

#[tokio::test]
async fn a_truncated_label_store_is_moved_aside_and_serving_starts_anyway() {
    let fake = FakeTfServing::start().await;
    let out = tempfile::tempdir().unwrap();
    // A real store file, cut in half as a full disk or a crash of the volume would.
    let file = out.path().join("labels.redb");
    {
        let db = redb::Database::create(&file).unwrap();
        let table: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("exchanges");
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(table).unwrap();
            for i in 0..2000 {
                t.insert(format!("id-{i}").as_str(), vec![7u8; 200].as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
    }
    let len = std::fs::metadata(&file).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(len / 2).unwrap();

    let mut options = ServeOptions::new(fake.grpc_url(), fake.rest_url(), out.path());
    options.config = Some(OPEN_LABELS);
    let mut mltap = Serve::start(options).await;
    assert_eq!(predict(&mltap, "after-restart").await, Some(200));
    // The store opens after the listeners serve: wait for it.
    for _ in 0..50 {
        if !set_aside(out.path()).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if set_aside(out.path()).len() != 1 {
        panic!("the damaged file is not set aside: {}", mltap.stderr().await);
    }
    // A fresh store works.
    let (status, body) = post_labels(&mltap, &["after-restart".to_string()]).await;
    assert_eq!(status, 200, "{body}");
    let (status, ready) = get(format!("{}/readyz", mltap.admin_url())).await;
    assert_eq!(status, 200, "{ready}");
    // The counter follows the store's next tick (each second).
    let mut corrupt = None;
    for _ in 0..50 {
        let (_, metrics) = get(format!("{}/metrics", mltap.admin_url())).await;
        corrupt = metric(&metrics, "mltap_label_store_corrupt_files_total");
        if corrupt == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(corrupt, Some(1.0));
    let stderr = mltap.stderr().await;
    let line = stderr.lines().find(|l| l.contains("Label store file damaged")).expect(&stderr);
    assert!(line.contains("ERROR"), "{line}");
}

/// A tmpfs of `megabytes` mounted on `dir`, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, megabytes: u32) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(dir)
            .status()
            .ok()?;
        status.success().then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system of `dir` until it has no space left.
fn fill(dir: &Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let block = vec![1u8; 64 << 10];
    while file.write_all(&block).is_ok() {}
    while file.write_all(&block[..512]).is_ok() {}
    let _ = file.sync_all();
    path
}

#[tokio::test]
async fn the_label_store_recovers_after_a_disk_full_and_says_so_meanwhile() {
    let fake = FakeTfServing::start().await;
    let base = tempfile::tempdir().unwrap();
    let out = base.path().join("out");
    let Some(_tmpfs) = Tmpfs::mount(&out, 16) else {
        // Mounting needs CAP_SYS_ADMIN (root in a container); scripts/test runs as root.
        panic!("cannot mount a tmpfs for the disk-full test: run the tests as root");
    };
    let mut options = ServeOptions::new(fake.grpc_url(), fake.rest_url(), &out);
    options.config = Some(OPEN_LABELS);
    let mut mltap = Serve::start(options).await;
    let admin = mltap.admin_url();
    assert_eq!(post_labels(&mltap, &["warm-up".to_string()]).await.0, 200);

    let filler = fill(&out);
    let ids: Vec<String> = (0..300).map(|i| format!("full-{i}")).collect();
    for id in &ids {
        // Serving is unaffected by the full disk.
        assert_eq!(predict(&mltap, id).await, Some(200));
    }
    // The store fails: labels are refused with 503 and /readyz says monitoring is
    // degraded while serving stays ready.
    let mut failed = false;
    for _ in 0..100 {
        if post_labels(&mltap, &ids[..1]).await.0 == 503 {
            failed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(failed, "the full disk reaches the label store");
    // Predictions made while the store cannot write still serve; their rows are lost.
    for i in 0..50 {
        assert_eq!(predict(&mltap, &format!("while-full-{i}")).await, Some(200));
    }
    let (status, ready) = get(format!("{admin}/readyz")).await;
    assert_eq!(status, 200, "{ready}");
    assert!(ready.contains("monitoring: degraded") && ready.contains("label store"), "{ready}");
    // Rows recorded meanwhile are counted as failed at the store's next tick (a busy
    // machine can take several seconds to get there).
    let mut failed_rows = 0.0;
    for _ in 0..200 {
        let (_, metrics) = get(format!("{admin}/metrics")).await;
        failed_rows = metric(&metrics, "mltap_label_rows_failed_total").unwrap_or(0.0);
        if failed_rows > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(failed_rows > 0.0, "rows lost to the full disk are counted");

    // Space comes back: the store reopens by itself within its backoff.
    std::fs::remove_file(filler).unwrap();
    let mut recovered = None;
    for _ in 0..300 {
        let (status, body) = post_labels(&mltap, &["after".to_string()]).await;
        if status == 200 {
            recovered = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered.is_some(), "labels accepted again after space was freed");
    let (status, ready) = get(format!("{admin}/readyz")).await;
    assert_eq!(status, 200);
    assert!(ready.contains("monitoring: ok"), "{ready}");
    let stderr = mltap.stderr().await;
    assert!(stderr.contains("Label store failed; closing it to reopen"), "{stderr}");
    assert!(stderr.contains("Label store open."), "{stderr}");
}

/// A `redis-server` on a given port, killed when dropped.
struct RedisOnPort(std::process::Child);

impl RedisOnPort {
    fn start(port: u16) -> RedisOnPort {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server on PATH (scripts/test installs it)");
        RedisOnPort(child)
    }
}

impl Drop for RedisOnPort {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_redis_label_store_not_reachable_at_start_is_retried_while_serving() {
    let fake = FakeTfServing::start().await;
    let out = tempfile::tempdir().unwrap();
    let redis_port = hardening_support::free_port().port();
    let store = format!("redis://127.0.0.1:{redis_port}");
    let mut options = ServeOptions::new(fake.grpc_url(), fake.rest_url(), out.path());
    options.config = Some(OPEN_LABELS);
    options.args = vec!["--labels-store", &store];
    let mut mltap = Serve::start(options).await;

    // No Redis: mltap serves, says monitoring is degraded, and refuses labels for now.
    assert_eq!(predict(&mltap, "before-redis").await, Some(200));
    let (status, ready) = get(format!("{}/readyz", mltap.admin_url())).await;
    assert_eq!(status, 200, "{ready}");
    assert!(ready.contains("monitoring: degraded") && ready.contains("label store"), "{ready}");
    assert_eq!(post_labels(&mltap, &["before-redis:0".to_string()]).await.0, 503);

    // Redis comes up: the store opens within the retry backoff, and predictions made
    // from then on join their labels.
    let _redis = RedisOnPort::start(redis_port);
    let mut open = false;
    for _ in 0..400 {
        if post_labels(&mltap, &["nothing".to_string()]).await.0 == 200 {
            open = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(open, "the label store opens once Redis is reachable\n{}", mltap.stderr().await);
    assert_eq!(predict_classifier(&mltap, "after-redis").await, Some(200));
    let mut accepted = String::new();
    for _ in 0..100 {
        let (status, body) = post_labels(&mltap, &["after-redis:0".to_string()]).await;
        assert_eq!(status, 200, "{body}");
        if body.contains("\"accepted\":1") || body.contains("\"accepted\": 1") {
            accepted = body;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!accepted.is_empty(), "a prediction made after the store opened joins its label");
    let (_, ready) = get(format!("{}/readyz", mltap.admin_url())).await;
    assert!(ready.contains("monitoring: ok"), "{ready}");
    let (_, metrics) = get(format!("{}/metrics", mltap.admin_url())).await;
    assert!(metric(&metrics, "mltap_labels_accepted_total").is_some_and(|v| v >= 1.0), "{metrics}");
    let stderr = mltap.stderr().await;
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn a_label_store_that_opens_at_start_serves_labels_without_a_fault() {
    let fake = FakeTfServing::start().await;
    let out = tempfile::tempdir().unwrap();
    let mut options = ServeOptions::new(fake.grpc_url(), fake.rest_url(), out.path());
    options.config = Some(OPEN_LABELS);
    let mut mltap = Serve::start(options).await;
    assert_eq!(predict_classifier(&mltap, "at-start").await, Some(200));
    let mut accepted = false;
    for _ in 0..100 {
        let (status, body) = post_labels(&mltap, &["at-start:0".to_string()]).await;
        assert_eq!(status, 200, "{body}");
        if body.contains("\"accepted\":1") {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(accepted, "the first exchange joins its label");
    let (_, ready) = get(format!("{}/readyz", mltap.admin_url())).await;
    assert!(ready.contains("monitoring: ok"), "{ready}");
    let stderr = mltap.stderr().await;
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn predictions_recorded_before_a_crash_still_join_after_a_restart() {
    let fake = FakeTfServing::start().await;
    let out = tempfile::tempdir().unwrap();
    let options = || {
        let mut options = ServeOptions::new(fake.grpc_url(), fake.rest_url(), out.path());
        options.config = Some(OPEN_LABELS);
        options
    };
    let mltap = Serve::start(options()).await;
    let ids: Vec<String> = (0..20).map(|i| format!("before-crash-{i}")).collect();
    for id in &ids {
        assert_eq!(predict_classifier(&mltap, id).await, Some(200));
    }
    // Recorded (the gauge follows each write), then made durable by a tick (each
    // second): what a crash must not lose.
    let mut pending = None;
    for _ in 0..100 {
        let (_, metrics) = get(format!("{}/metrics", mltap.admin_url())).await;
        pending = metric(&metrics, "mltap_label_store_pending_rows");
        if pending.is_some_and(|p| p >= 60.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(pending, Some(60.0), "three rows per predict");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // SIGKILL: no clean close of the store.
    drop(mltap);
    let segments = out.path().join("labels.redb.log");
    assert!(std::fs::read_dir(&segments).unwrap().count() >= 1, "the log is in segment files");

    let mltap = Serve::start(options()).await;
    let rows: Vec<String> = ids.iter().flat_map(|id| (0..3).map(move |row| format!("{id}:{row}"))).collect();
    let mut answer = String::new();
    for _ in 0..50 {
        // The store opens after the listeners serve: 503 until it has.
        let (status, body) = post_labels(&mltap, &rows).await;
        answer = body;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answer: serde_json::Value = serde_json::from_str(&answer).expect(&answer);
    assert_eq!(answer["accepted"], 60, "{answer}");
    assert_eq!(answer["unmatched"], 0, "{answer}");
}
