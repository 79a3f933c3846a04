//! The request log under failure, with `mltap serve` as a real process: killed with
//! SIGKILL it leaves no corrupt record in a closed file, and the torn tail of its open
//! file is detected, skipped, and cut off at the next start; with the disk full (a
//! file-size limit on the process) records are dropped and counted while every call
//! is still answered.

mod support;

use mltap::demo::model::{demo_models, LinearModel, Row};
use mltap::demo::server::ModelServer;
use mltap::demo::traffic::rest_body;
use mltap::request_log::tfrecord::{self, Tail};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `mltap serve` configuration in front of `server`, logging every request.
struct Instance {
    dir: tempfile::TempDir,
    config: PathBuf,
    rest: String,
    admin: String,
}

impl Instance {
    fn new(server: &ModelServer) -> Instance {
        let dir = tempfile::tempdir().unwrap();
        let (grpc, rest, admin) = (free_port(), free_port(), free_port());
        let config = dir.path().join("mltap.toml");
        std::fs::write(
            &config,
            format!(
                "grpc_listen = \"127.0.0.1:{grpc}\"\nrest_listen = \"127.0.0.1:{rest}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
                 grpc_upstream = \"http://{}\"\nrest_upstream = \"http://{}\"\noutput_dir = \"{}\"\nlog = \"error\"\n\
                 [request_log]\nsampling_rate = 1.0\nflush_interval = \"100ms\"\n",
                server.grpc_addr,
                server.rest_addr,
                dir.path().join("out").display(),
            ),
        )
        .unwrap();
        Instance { config, rest: format!("http://127.0.0.1:{rest}"), admin: format!("http://127.0.0.1:{admin}"), dir }
    }

    fn requests_dir(&self) -> PathBuf {
        self.dir.path().join("out").join("requests")
    }

    fn command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_mltap"));
        command.arg("serve").arg("--config").arg(&self.config).stdout(Stdio::null());
        command
    }

    async fn wait_ready(&self) {
        for _ in 0..200 {
            if let Ok(response) = client().get(format!("{}/healthz", self.admin)).send().await {
                if response.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("mltap did not start");
    }

    async fn outcome(&self, name: &str) -> u64 {
        let text = client().get(format!("{}/metrics", self.admin)).send().await.unwrap().text().await.unwrap();
        let prefix = format!("mltap_request_log_exchanges_total{{outcome=\"{name}\"}} ");
        text.lines().find_map(|line| line.strip_prefix(&prefix)).expect("outcome on /metrics").trim().parse().unwrap()
    }

    async fn predict(&self, rows: usize) -> reqwest::StatusCode {
        let row = Row { numeric: vec![30.0, 40.0, 2.0, 110.0, 6.0, 5.0, 4.0, 1.0], category: "br".into() };
        let body = rest_body(&LinearModel::churn(), &vec![row; rows]);
        let response = client().post(format!("{}/v1/models/churn:predict", self.rest)).json(&body).send().await;
        match response {
            Ok(response) => {
                let status = response.status();
                let _ = response.bytes().await;
                status
            }
            Err(_) => reqwest::StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(10)).build().unwrap()
}

fn files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir.join("churn"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(suffix))
        .collect();
    out.sort();
    out
}

/// A running `mltap serve`, killed if the test ends without stopping it.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

async fn terminate(running: Running) {
    let child = &mut { running }.0;
    let pid = child.id() as libc::pid_t;
    // SAFETY: signalling a child process this test started and still owns.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    for _ in 0..200 {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "mltap stopped with {status}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    panic!("mltap did not stop on SIGTERM");
}

async fn model_server() -> ModelServer {
    ModelServer::bind("127.0.0.1:0".parse().unwrap(), "127.0.0.1:0".parse().unwrap(), demo_models()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_no_closed_file_is_corrupt_and_the_torn_tail_is_cut_at_the_next_start() {
    let server = model_server().await;
    let instance = Instance::new(&server);
    let mut running = Running(instance.command().spawn().unwrap());
    instance.wait_ready().await;
    for _ in 0..100 {
        assert_eq!(instance.predict(4).await, 200);
    }
    for _ in 0..100 {
        if instance.outcome("logged").await >= 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logged = instance.outcome("logged").await;
    assert_eq!(logged, 100, "flushed within the flush interval");

    // Killed while calls are in flight.
    let rest = instance.rest.clone();
    let traffic = tokio::spawn(async move {
        let row = Row { numeric: vec![30.0, 40.0, 2.0, 110.0, 6.0, 5.0, 4.0, 1.0], category: "de".into() };
        let body = rest_body(&LinearModel::churn(), &vec![row; 4]);
        for _ in 0..400 {
            if client().post(format!("{rest}/v1/models/churn:predict")).json(&body).send().await.is_err() {
                return;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    running.0.kill().unwrap();
    running.0.wait().unwrap();
    let _ = traffic.await;

    let dir = instance.requests_dir();
    for path in files(&dir, ".tfrecord") {
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(tfrecord::read(&bytes).tail, Tail::Clean, "closed file {} is whole", path.display());
    }
    let open = files(&dir, ".tfrecord.open");
    assert_eq!(open.len(), 1, "the file being written is left open");
    let mut bytes = std::fs::read(&open[0]).unwrap();
    let records = tfrecord::read(&bytes);
    assert!(matches!(records.tail, Tail::Clean | Tail::Torn { .. }), "never corrupt: {:?}", records.tail);
    let on_disk = records.records.len();
    assert!(on_disk as u64 >= logged, "records counted as logged are on disk: {on_disk} < {logged}");
    // A crash in the middle of a write: half a record at the end.
    let whole = records.valid_len();
    bytes.truncate(whole);
    let half = tfrecord::frame(b"a record cut short by the crash");
    bytes.extend_from_slice(&half[..half.len() / 2]);
    std::fs::write(&open[0], &bytes).unwrap();
    assert!(matches!(tfrecord::read(&bytes).tail, Tail::Torn { offset } if offset == whole));

    // The next start closes it, cut to its last whole record.
    let child = Running(instance.command().spawn().unwrap());
    instance.wait_ready().await;
    assert!(files(&dir, ".tfrecord.open").is_empty());
    let mut total = 0;
    for path in files(&dir, ".tfrecord") {
        let bytes = std::fs::read(&path).unwrap();
        let records = tfrecord::read(&bytes);
        assert_eq!(records.tail, Tail::Clean, "{} is whole after recovery", path.display());
        total += records.records.len();
    }
    assert_eq!(total, on_disk);
    terminate(child).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_drops_and_counts_records_while_every_call_is_answered() {
    /// Bytes any file of the process may grow to: past the embedded label store's
    /// initial size, far below what the calls below log.
    const FILE_SIZE_LIMIT: u64 = 3 << 20;
    let server = model_server().await;
    let instance = Instance::new(&server);
    let mut command = instance.command();
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(|| {
            // Past the limit a write fails with EFBIG, as with a full disk, instead of
            // the default SIGXFSZ ending the process.
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit { rlim_cur: FILE_SIZE_LIMIT, rlim_max: FILE_SIZE_LIMIT };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = Running(command.spawn().unwrap());
    instance.wait_ready().await;
    // About 8 KB a record: well past the limit.
    const CALLS: u64 = 600;
    for _ in 0..CALLS {
        assert_eq!(instance.predict(128).await, 200, "the proxy answers whatever the disk does");
    }
    let (mut logged, mut failed) = (0, 0);
    for _ in 0..100 {
        logged = instance.outcome("logged").await;
        failed = instance.outcome("dropped_write_error").await;
        if logged + failed == CALLS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(logged + failed, CALLS, "every record is either on disk or counted as dropped");
    assert!(failed > 0, "the file-size limit was reached");
    assert!(logged > 0);
    terminate(child).await;

    let closed = files(&instance.requests_dir(), ".tfrecord");
    let mut total = 0;
    for path in &closed {
        let bytes = std::fs::read(path).unwrap();
        let records = tfrecord::read(&bytes);
        assert_eq!(records.tail, Tail::Clean, "a failed write leaves no torn record behind");
        total += records.records.len() as u64;
    }
    assert_eq!(total, logged);
    server.shutdown().await;
}
