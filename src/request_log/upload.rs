//! Upload of closed request log files to S3-compatible object storage
//! (`[request_log] upload = "s3://bucket/prefix"`), with the `object_store` crate.
//! Credentials, region and endpoint come from the standard AWS environment variables
//! (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`,
//! `AWS_ENDPOINT_URL` for S3-compatible servers, `AWS_ALLOW_HTTP=true` for a
//! cleartext one).
//!
//! Files go up one at a time, oldest first, as `PREFIX/MODEL/FILE.tfrecord`. A failed
//! upload is retried with a growing pause (up to `MAX_BACKOFF`) and the file stays on
//! disk; it is deleted only once the object store has accepted it. A file that the
//! total size cap deleted before its turn is counted as lost.

use super::RequestLogStats;
use object_store::aws::AmazonS3Builder;
use object_store::{ObjectStore, PutPayload, RetryConfig};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tracing::warn;

/// Longest pause between two attempts at a failing upload.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Bound on one attempt, including the object store client's own quick retries.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);

/// Where closed files go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadTarget {
    pub bucket: String,
    /// Key prefix, without leading or trailing `/`; may be empty.
    pub prefix: String,
}

impl UploadTarget {
    /// Parses `s3://bucket[/prefix]`.
    pub fn parse(url: &str) -> Result<UploadTarget, String> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| format!("`{url}` is not an s3://bucket/prefix URL"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(format!("`{url}` names no bucket"));
        }
        Ok(UploadTarget { bucket: bucket.to_string(), prefix: prefix.trim_matches('/').to_string() })
    }

    /// The object key of a file `MODEL/FILE` under the request log's directory.
    fn key(&self, relative: &Path) -> String {
        let relative = relative.to_string_lossy();
        if self.prefix.is_empty() {
            relative.into_owned()
        } else {
            format!("{}/{relative}", self.prefix)
        }
    }
}

/// Starts the uploader on the current tokio runtime: closed files sent to the
/// returned channel are uploaded, then deleted.
pub fn spawn(
    target: UploadTarget,
    dir: PathBuf,
    stats: Arc<RequestLogStats>,
) -> Result<(UnboundedSender<PathBuf>, tokio::task::JoinHandle<()>), String> {
    let store = AmazonS3Builder::from_env()
        .with_bucket_name(&target.bucket)
        .with_retry(RetryConfig { max_retries: 2, retry_timeout: Duration::from_secs(20), ..RetryConfig::default() })
        .build()
        .map_err(|e| format!("the S3 client cannot be built: {e}"))?;
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    let uploader = Uploader { store: Arc::new(store), target, dir, stats, last_warning: None };
    Ok((sender, tokio::spawn(uploader.run(receiver))))
}

struct Uploader {
    store: Arc<dyn ObjectStore>,
    target: UploadTarget,
    /// The request log's directory: keys are paths relative to it.
    dir: PathBuf,
    stats: Arc<RequestLogStats>,
    last_warning: Option<Instant>,
}

/// Why one attempt did not upload a file.
enum Failure {
    /// The file is gone (deleted by the total cap, or by hand): nothing to retry.
    Gone,
    /// The object store or the disk failed: retried.
    Failed(String),
}

impl Uploader {
    async fn run(mut self, mut files: UnboundedReceiver<PathBuf>) {
        while let Some(path) = files.recv().await {
            let mut pause = Duration::from_secs(1);
            loop {
                match self.upload(&path).await {
                    Ok(()) => break,
                    Err(Failure::Gone) => {
                        self.stats.upload_lost.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Err(Failure::Failed(error)) => {
                        self.stats.upload_failures.fetch_add(1, Ordering::Relaxed);
                        self.warn_failed(&path, &error);
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(MAX_BACKOFF);
                    }
                }
            }
        }
    }

    async fn upload(&self, path: &Path) -> Result<(), Failure> {
        let bytes = match tokio::fs::read(path).await {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Err(Failure::Gone),
            Err(error) => return Err(Failure::Failed(format!("cannot read the file: {error}"))),
        };
        let relative = path.strip_prefix(&self.dir).unwrap_or(path);
        let key = object_store::path::Path::from(self.target.key(relative));
        let length = bytes.len() as u64;
        let put = self.store.put(&key, PutPayload::from(bytes));
        match tokio::time::timeout(ATTEMPT_TIMEOUT, put).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => return Err(Failure::Failed(error.to_string())),
            Err(_) => return Err(Failure::Failed(format!("no answer within {ATTEMPT_TIMEOUT:?}"))),
        }
        self.stats.uploaded_files.fetch_add(1, Ordering::Relaxed);
        self.stats.uploaded_bytes.fetch_add(length, Ordering::Relaxed);
        // Uploaded: the local copy goes (the total cap's accounting notices it is gone).
        if let Err(error) = tokio::fs::remove_file(path).await {
            warn!(message = "An uploaded request log file cannot be deleted.", file = %path.display(), %error);
        }
        Ok(())
    }

    fn warn_failed(&mut self, path: &Path, error: &str) {
        if self.last_warning.is_some_and(|at| at.elapsed() < Duration::from_secs(10)) {
            return;
        }
        self.last_warning = Some(Instant::now());
        warn!(
            message = "Request log upload failed; the file stays on disk and is retried.",
            file = %path.display(),
            bucket = %self.target.bucket,
            %error,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_s3_url_gives_bucket_and_prefix() {
        let target = UploadTarget::parse("s3://logs/mltap/prod/").unwrap();
        assert_eq!((target.bucket.as_str(), target.prefix.as_str()), ("logs", "mltap/prod"));
        assert_eq!(target.key(Path::new("churn/a.tfrecord")), "mltap/prod/churn/a.tfrecord");
        let bare = UploadTarget::parse("s3://logs").unwrap();
        assert_eq!(bare.key(Path::new("churn/a.tfrecord")), "churn/a.tfrecord");
        assert!(UploadTarget::parse("gs://logs").is_err());
        assert!(UploadTarget::parse("s3:///x").is_err());
    }
}
