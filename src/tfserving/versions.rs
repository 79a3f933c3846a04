//! The version TF Serving serves for calls that name none, per model, so that a REST
//! call without `/versions/N` is attributed to the version that answered it (gRPC
//! responses carry it in their `model_spec`): one served version is one stream.
//!
//! The version comes from TF Serving's model status, `GET /v1/models/NAME`: the
//! highest version whose state is `AVAILABLE` (TF Serving's default policy serves the
//! latest version to calls that name none). A background task fetches it and
//! refreshes it every `refresh_after` (a new version rolled out shows up within that
//! time). `ServedVersions::get` runs on the decode threads, never on the proxy's: it
//! returns the cached version at once, and only the first call for a model waits,
//! at most `first_wait`, for the first answer. When the status cannot be read, calls
//! keep having no version (the behaviour before this cache) and the decoder counts
//! them (`decode_errors` with reason `unresolved_version`).

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Where and how to read model status.
#[derive(Debug, Clone)]
pub struct VersionSource {
    /// TF Serving's REST port.
    pub rest_upstream: http::Uri,
    /// Bound on each status request.
    pub timeout: Duration,
    /// How long a known version is used before it is fetched again (served on).
    pub refresh_after: Duration,
    /// How long a failed fetch is remembered before it is tried again.
    pub retry_after: Duration,
    /// How long the first call of a model waits for its first answer.
    pub first_wait: Duration,
    /// Models remembered at most; calls of further models keep no version.
    pub max_models: usize,
}

impl VersionSource {
    pub fn new(rest_upstream: http::Uri) -> Self {
        VersionSource {
            rest_upstream,
            timeout: Duration::from_secs(2),
            refresh_after: Duration::from_secs(30),
            retry_after: Duration::from_secs(30),
            // A status request answers in milliseconds; a busy machine may need more.
            first_wait: Duration::from_secs(3),
            max_models: 10_000,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Entry {
    /// Asked for; no answer yet. Calls of the model wait for it until this instant.
    Pending(Instant),
    /// The served version, as of `fetched`; `refreshing` while a newer fetch is asked,
    /// so that a model's calls ask for one refresh, not one each.
    Known { version: i64, fetched: Instant, refreshing: bool },
    /// The status could not be read; asked again after this instant.
    Failed(Instant),
}

#[derive(Debug)]
struct Inner {
    /// What is known per model name.
    entries: Mutex<HashMap<String, Entry>>,
    /// Wakes first callers when an answer arrives.
    answered: Condvar,
    /// To the fetcher; None for a cache filled by hand.
    requests: Option<mpsc::UnboundedSender<String>>,
    /// `VersionSource::refresh_after`: when a known version is asked again.
    refresh_after: Duration,
    /// `VersionSource::retry_after`: when a failed model is asked again.
    retry_after: Duration,
    /// `VersionSource::first_wait`: how long a model's first call waits.
    first_wait: Duration,
    /// `VersionSource::max_models`: the bound on `entries`.
    max_models: usize,
}

/// The shared cache of served versions. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ServedVersions {
    /// Shared by the decode threads and the fetcher task (which holds it weakly, so
    /// that it ends with the last clone).
    inner: Arc<Inner>,
}

impl ServedVersions {
    /// A cache without a fetcher: only what `insert` puts in it is known.
    pub fn fixed() -> Self {
        ServedVersions { inner: Arc::new(Self::inner(None, &VersionSource::new(http::Uri::default()))) }
    }

    fn inner(requests: Option<mpsc::UnboundedSender<String>>, source: &VersionSource) -> Inner {
        Inner {
            entries: Mutex::new(HashMap::new()),
            answered: Condvar::new(),
            requests,
            refresh_after: source.refresh_after,
            retry_after: source.retry_after,
            first_wait: source.first_wait,
            max_models: source.max_models,
        }
    }

    /// A cache whose fetches run on a task spawned on the current tokio runtime; the
    /// task ends when the last clone of the cache is dropped.
    pub fn spawn(source: VersionSource) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Self::inner(Some(tx), &source));
        tokio::spawn(fetch_loop(rx, Arc::downgrade(&inner), source));
        ServedVersions { inner }
    }

    /// Records a model's served version (what the fetcher does).
    pub fn insert(&self, model: &str, version: i64) {
        let mut entries = self.inner.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.insert(model.to_string(), Entry::Known { version, fetched: Instant::now(), refreshing: false });
        self.inner.answered.notify_all();
    }

    /// The version serving `model`'s calls that name none; None when unknown. Call it
    /// from a plain thread (it may wait up to `first_wait` on a model's first call),
    /// never from an async task.
    pub fn get(&self, model: &str) -> Option<i64> {
        let inner = &*self.inner;
        let mut entries = inner.entries.lock().unwrap_or_else(|p| p.into_inner());
        match entries.get(model).copied() {
            Some(Entry::Known { version, fetched, refreshing }) => {
                if !refreshing && fetched.elapsed() >= inner.refresh_after && self.ask(model) {
                    entries.insert(model.to_string(), Entry::Known { version, fetched, refreshing: true });
                }
                return Some(version);
            }
            // Another decode thread asked first: wait for the same answer, so that no
            // call of the model's first moments goes to a versionless stream.
            Some(Entry::Pending(deadline)) => return self.wait(model, entries, deadline),
            Some(Entry::Failed(retry_at)) if Instant::now() < retry_at => return None,
            Some(Entry::Failed(_)) => {}
            None if entries.len() >= inner.max_models => return None,
            None => {}
        }
        if !self.ask(model) {
            return None;
        }
        // The first calls of a model wait for the first answer, so that a model's
        // first bucket is not split between a versioned and a versionless stream.
        let deadline = Instant::now() + inner.first_wait;
        entries.insert(model.to_string(), Entry::Pending(deadline));
        self.wait(model, entries, deadline)
    }

    /// Waits until `model`'s version is answered, or `deadline`.
    fn wait(
        &self,
        model: &str,
        mut entries: std::sync::MutexGuard<'_, HashMap<String, Entry>>,
        deadline: Instant,
    ) -> Option<i64> {
        let inner = &*self.inner;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            entries = match inner.answered.wait_timeout(entries, deadline - now) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
            match entries.get(model) {
                Some(Entry::Known { version, .. }) => return Some(*version),
                Some(Entry::Failed(_)) => return None,
                _ => {}
            }
        }
    }

    fn ask(&self, model: &str) -> bool {
        self.inner.requests.as_ref().is_some_and(|r| r.send(model.to_string()).is_ok())
    }
}

/// The version serving calls that name none, from a model status body
/// (`{"model_version_status": [{"version": "3", "state": "AVAILABLE", ...}]}`): the
/// highest available one.
pub fn served_version(status_body: &[u8]) -> Result<i64, String> {
    let value: serde_json::Value =
        serde_json::from_slice(status_body).map_err(|e| format!("model status is not JSON: {e}"))?;
    let statuses = value["model_version_status"].as_array().ok_or("model status without model_version_status")?;
    statuses
        .iter()
        .filter(|s| s["state"] == "AVAILABLE")
        .filter_map(|s| match &s["version"] {
            serde_json::Value::String(v) => v.parse::<i64>().ok(),
            v => v.as_i64(),
        })
        .max()
        .ok_or_else(|| "no AVAILABLE version".to_string())
}

async fn fetch_loop(mut rx: mpsc::UnboundedReceiver<String>, cache: Weak<Inner>, source: VersionSource) {
    let Ok(client) = reqwest::Client::builder().timeout(source.timeout).build() else { return };
    let base = source.rest_upstream.to_string();
    while let Some(model) = rx.recv().await {
        let url = format!("{}/v1/models/{}", base.trim_end_matches('/'), model);
        let result = match client.get(&url).send().await {
            Ok(response) if response.status().is_success() => match response.bytes().await {
                Ok(body) => served_version(&body),
                Err(e) => Err(format!("GET {url}: {e}")),
            },
            Ok(response) => Err(format!("GET {url}: status {}", response.status())),
            Err(e) => Err(format!("GET {url}: {e}")),
        };
        let Some(inner) = cache.upgrade() else { return };
        let mut entries = inner.entries.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(version) => {
                entries.insert(model, Entry::Known { version, fetched: Instant::now(), refreshing: false });
            }
            Err(error) => {
                tracing::debug!(message = "Served version unavailable from TF Serving.", model = %model, %error);
                match entries.get(&model).copied() {
                    // A refresh that failed keeps the version known so far, and tries again later.
                    Some(Entry::Known { version, .. }) => {
                        let wait = inner.refresh_after.saturating_sub(inner.retry_after);
                        let fetched = Instant::now().checked_sub(wait).unwrap_or_else(Instant::now);
                        entries.insert(model, Entry::Known { version, fetched, refreshing: false });
                    }
                    _ => {
                        entries.insert(model, Entry::Failed(Instant::now() + inner.retry_after));
                    }
                }
            }
        }
        inner.answered.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_served_version_is_the_highest_available_one() {
        let body = br#"{"model_version_status": [
            {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}},
            {"version": "3", "state": "LOADING", "status": {"error_code": "OK", "error_message": ""}},
            {"version": "2", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}"#;
        assert_eq!(served_version(body), Ok(2));
        assert!(served_version(br#"{"model_version_status": []}"#).is_err());
        assert!(served_version(b"not json").is_err());
        assert!(served_version(br#"{"error": "Servable not found"}"#).is_err());
    }

    #[test]
    fn a_fixed_cache_knows_only_what_was_inserted_and_never_waits() {
        let versions = ServedVersions::fixed();
        let started = Instant::now();
        assert_eq!(versions.get("churn"), None);
        assert!(started.elapsed() < Duration::from_millis(500));
        versions.insert("churn", 4);
        assert_eq!(versions.get("churn"), Some(4));
    }
}
