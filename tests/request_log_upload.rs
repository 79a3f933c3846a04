//! Closed request log files are uploaded to an S3-compatible server (moto's server
//! mode, started here on a loopback port) and deleted locally only once uploaded,
//! including when the server is down at first and then has no bucket yet.
//!
//! Needs `moto_server` (`pip install 'moto[server]'`, which .ci/run does): without it
//! this test fails rather than skips.

mod support;

use mltap::demo::model::{demo_models, LinearModel, Row};
use mltap::demo::server::ModelServer;
use mltap::demo::traffic::rest_body;
use mltap::request_log::tfrecord;
use mltap::tfserving::proto::serving::PredictionLog;
use prost::Message;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::mltap::{config, Mltap};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// moto's S3-compatible server, stopped when dropped.
struct Moto(Child);

impl Moto {
    fn start(port: u16) -> Moto {
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server must be installed for this test: pip install 'moto[server]'");
        Moto(child)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(10)).build().unwrap()
}

async fn metric(mltap: &Mltap, name: &str) -> u64 {
    let text = client().get(format!("{}/metrics", mltap.admin_url())).send().await.unwrap().text().await.unwrap();
    let prefix = format!("mltap_{name} ");
    text.lines().find_map(|line| line.strip_prefix(&prefix)).unwrap_or("0").trim().parse().unwrap()
}

async fn wait_until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..600 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting until {what}");
}

fn local_files(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir.join("churn")).map(|entries| entries.flatten().count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_files_reach_the_bucket_and_leave_the_disk_only_once_uploaded() {
    let s3_port = free_port();
    // Standard AWS variables: the only configuration the upload takes besides its URL.
    // This test binary holds this one test, so nothing else reads the environment.
    std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
    std::env::set_var("AWS_REGION", "us-east-1");
    std::env::set_var("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{s3_port}"));
    std::env::set_var("AWS_ALLOW_HTTP", "true");

    let server =
        ModelServer::bind("127.0.0.1:0".parse().unwrap(), "127.0.0.1:0".parse().unwrap(), demo_models()).await.unwrap();
    let mut config = config(&format!("http://{}", server.grpc_addr), &format!("http://{}", server.rest_addr));
    let requests_dir = tempfile::tempdir().unwrap();
    config.request_log.sampling_rate = 1.0;
    config.request_log.dir = Some(requests_dir.path().to_path_buf());
    config.request_log.flush_interval = Duration::from_millis(100);
    config.request_log.max_file_age = Duration::from_millis(500);
    config.request_log.upload = Some("s3://request-logs/mltap/prod".into());
    let mltap = Mltap::start(config).await;

    let row = Row { numeric: vec![30.0, 40.0, 2.0, 110.0, 6.0, 5.0, 4.0, 1.0], category: "br".into() };
    let body = rest_body(&LinearModel::churn(), &[row]);
    const CALLS: usize = 20;
    for _ in 0..CALLS {
        let response =
            client().post(format!("{}/v1/models/churn:predict", mltap.rest_url())).json(&body).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }

    // The server is down: attempts fail, and the closed file stays on disk.
    wait_until("an upload attempt failed", async || metric(&mltap, "request_log_upload_failures_total").await >= 1)
        .await;
    assert_eq!(metric(&mltap, "request_log_uploaded_files_total").await, 0);
    assert!(local_files(requests_dir.path()) >= 1, "the file waits on disk");

    // Up, but without the bucket: still failing.
    let _moto = Moto::start(s3_port);
    wait_until("moto answers", async || client().get(format!("http://127.0.0.1:{s3_port}/")).send().await.is_ok())
        .await;
    let failures = metric(&mltap, "request_log_upload_failures_total").await;
    wait_until("an upload to a missing bucket failed", async || {
        metric(&mltap, "request_log_upload_failures_total").await > failures
    })
    .await;
    assert_eq!(metric(&mltap, "request_log_uploaded_files_total").await, 0);

    // With the bucket, the retries succeed and the local copies go.
    let created = client().put(format!("http://127.0.0.1:{s3_port}/request-logs")).send().await.unwrap();
    assert!(created.status().is_success(), "bucket created: {}", created.status());
    wait_until("the files are uploaded and deleted locally", async || {
        metric(&mltap, "request_log_uploaded_files_total").await >= 1 && local_files(requests_dir.path()) == 0
    })
    .await;

    // The bucket holds the records, whole (read with a client of its own).
    use futures_util::TryStreamExt;
    use object_store::ObjectStore;
    let bucket = object_store::aws::AmazonS3Builder::from_env().with_bucket_name("request-logs").build().unwrap();
    let prefix = object_store::path::Path::from("mltap/prod/churn");
    let objects: Vec<_> = bucket.list(Some(&prefix)).try_collect().await.unwrap();
    assert!(!objects.is_empty(), "objects under {prefix}");
    let mut records = 0;
    for object in &objects {
        assert!(object.location.as_ref().ends_with(".tfrecord"), "{}", object.location);
        let bytes = bucket.get(&object.location).await.unwrap().bytes().await.unwrap();
        let read = tfrecord::read(&bytes);
        assert_eq!(read.tail, tfrecord::Tail::Clean, "{} is whole", object.location);
        for record in read.records {
            let log = PredictionLog::decode(record).unwrap();
            assert_eq!(log.log_metadata.unwrap().model_spec.unwrap().name, "churn");
            records += 1;
        }
    }
    assert_eq!(records, CALLS, "every logged call reached the bucket");
    assert_eq!(metric(&mltap, "request_log_uploaded_files_total").await, objects.len() as u64);
    mltap.stop().await;
    server.shutdown().await;
}
