//! Model signatures, fetched from TF Serving once per model version and cached, to
//! name the tensors a REST body leaves unnamed (and to know their declared dtypes).
//!
//! `SchemaCache::get` never waits: on a miss it marks the key pending and asks a
//! background task, which calls gRPC `GetModelMetadata` (or, when that fails, REST
//! `GET /v1/models/M[/versions/V|/labels/L]/metadata`) with a timeout. Until the
//! answer arrives, or when both fail, the caller names the tensor `input`. A failed
//! fetch is retried after `retry_after`. The request channel is unbounded but each
//! key is sent at most once per attempt, and the number of keys is capped.

use super::proto::serving::{
    model_spec::VersionChoice, prediction_service_client::PredictionServiceClient, GetModelMetadataRequest, ModelSpec,
    SignatureDefMap,
};
use super::tensor::DType;
use prost::Message;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The tensors of one signature, by name (sorted), with their declared dtype.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SignatureSchema {
    pub inputs: Vec<(String, Option<DType>)>,
    pub outputs: Vec<(String, Option<DType>)>,
}

impl SignatureSchema {
    /// The declared dtype of an input.
    pub fn input_dtype(&self, name: &str) -> Option<DType> {
        self.inputs.iter().find(|(n, _)| n == name).and_then(|(_, d)| *d)
    }
}

/// The signatures of one model version, by signature name.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ModelSchema {
    pub signatures: BTreeMap<String, SignatureSchema>,
}

impl ModelSchema {
    /// The signature a call used: its name, or `serving_default` when it named none.
    pub fn signature(&self, name: &str) -> Option<&SignatureSchema> {
        let name = if name.is_empty() { "serving_default" } else { name };
        self.signatures.get(name)
    }

    /// From the `signature_def` entry of a `GetModelMetadataResponse`.
    pub fn from_signature_defs(map: &SignatureDefMap) -> Self {
        let tensors = |m: &HashMap<String, super::proto::tensorflow::TensorInfo>| {
            let mut v: Vec<_> = m.iter().map(|(name, info)| (name.clone(), DType::from_proto(info.dtype))).collect();
            v.sort();
            v
        };
        let signatures = map
            .signature_def
            .iter()
            .map(|(name, def)| {
                (name.clone(), SignatureSchema { inputs: tensors(&def.inputs), outputs: tensors(&def.outputs) })
            })
            .collect();
        ModelSchema { signatures }
    }

    /// From the body of REST `GET /v1/models/M/metadata`.
    pub fn from_rest_metadata(body: &[u8]) -> Result<Self, String> {
        let value: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| format!("metadata is not JSON: {e}"))?;
        let defs = value
            .pointer("/metadata/signature_def/signature_def")
            .and_then(|v| v.as_object())
            .ok_or("metadata has no signature_def")?;
        let tensors = |v: Option<&serde_json::Value>| {
            let mut out: Vec<(String, Option<DType>)> = v
                .and_then(|v| v.as_object())
                .map(|m| {
                    m.iter()
                        .map(|(name, info)| {
                            let dtype = info.get("dtype").and_then(|d| d.as_str()).and_then(DType::from_tf_name);
                            (name.clone(), dtype)
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.sort();
            out
        };
        let signatures = defs
            .iter()
            .map(|(name, def)| {
                (
                    name.clone(),
                    SignatureSchema { inputs: tensors(def.get("inputs")), outputs: tensors(def.get("outputs")) },
                )
            })
            .collect();
        Ok(ModelSchema { signatures })
    }
}

/// A model version as a call names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SchemaKey {
    pub model: String,
    /// The version the call asked for or was served by; None means the latest.
    pub version: Option<i64>,
    /// The version label the call asked for, when it used one.
    pub label: Option<String>,
}

#[derive(Debug)]
enum Entry {
    /// Asked for; the fetcher has not answered yet.
    Pending,
    Ready(Arc<ModelSchema>),
    /// The fetch failed; asked again after this instant.
    Failed(Instant),
}

/// Where and how to fetch signatures.
#[derive(Debug, Clone)]
pub struct SchemaSource {
    /// TF Serving's gRPC port (`GetModelMetadata`), tried first.
    pub grpc_upstream: Option<http::Uri>,
    /// TF Serving's REST port (`/metadata`), tried when gRPC fails or is not given.
    pub rest_upstream: Option<http::Uri>,
    /// Bound on each fetch attempt.
    pub timeout: Duration,
    /// How long a failed fetch is remembered before it is tried again.
    pub retry_after: Duration,
    /// Model versions remembered at most; past it, new ones stay unnamed.
    pub max_entries: usize,
}

impl SchemaSource {
    pub fn new(grpc_upstream: Option<http::Uri>, rest_upstream: Option<http::Uri>, timeout: Duration) -> Self {
        SchemaSource {
            grpc_upstream,
            rest_upstream,
            timeout,
            retry_after: Duration::from_secs(60),
            max_entries: 10_000,
        }
    }
}

#[derive(Debug)]
struct Inner {
    /// What is known per model version.
    entries: Mutex<HashMap<SchemaKey, Entry>>,
    /// To the fetcher; None for a cache filled by hand (tests, fixed schemas).
    requests: Option<mpsc::UnboundedSender<SchemaKey>>,
    retry_after: Duration,
    max_entries: usize,
}

/// The shared cache of model signatures. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SchemaCache {
    inner: Arc<Inner>,
}

impl SchemaCache {
    /// A cache without a fetcher: only what `insert` puts in it is known.
    pub fn fixed() -> Self {
        SchemaCache {
            inner: Arc::new(Inner {
                entries: Mutex::new(HashMap::new()),
                requests: None,
                retry_after: Duration::from_secs(60),
                max_entries: 10_000,
            }),
        }
    }

    /// A cache whose misses are fetched by a task spawned on the current tokio
    /// runtime; the task ends when the last clone of the cache is dropped.
    pub fn spawn(source: SchemaSource) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            entries: Mutex::new(HashMap::new()),
            requests: Some(tx),
            retry_after: source.retry_after,
            max_entries: source.max_entries,
        });
        tokio::spawn(fetch_loop(rx, Arc::downgrade(&inner), source));
        SchemaCache { inner }
    }

    /// The schema of a model version if known; never waits. On a miss (or an
    /// expired failure) it asks the fetcher once.
    pub fn get(&self, key: &SchemaKey) -> Option<Arc<ModelSchema>> {
        let mut entries = self.inner.entries.lock().unwrap_or_else(|p| p.into_inner());
        match entries.get(key) {
            Some(Entry::Ready(schema)) => return Some(schema.clone()),
            Some(Entry::Pending) => return None,
            Some(Entry::Failed(retry_at)) if Instant::now() < *retry_at => return None,
            Some(Entry::Failed(_)) => {}
            None if entries.len() >= self.inner.max_entries => return None,
            None => {}
        }
        if let Some(requests) = &self.inner.requests {
            if requests.send(key.clone()).is_ok() {
                entries.insert(key.clone(), Entry::Pending);
            }
        }
        None
    }

    /// Records a schema (what the fetcher does; also for fixed schemas).
    pub fn insert(&self, key: SchemaKey, schema: ModelSchema) {
        let mut entries = self.inner.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.insert(key, Entry::Ready(Arc::new(schema)));
    }

    /// Waits until a key is resolved (ready or failed), polling; for tests and
    /// start-up warm-up, never for the decode path.
    pub async fn resolved(&self, key: &SchemaKey, within: Duration) -> Option<Arc<ModelSchema>> {
        let deadline = Instant::now() + within;
        loop {
            {
                let entries = self.inner.entries.lock().unwrap_or_else(|p| p.into_inner());
                match entries.get(key) {
                    Some(Entry::Ready(schema)) => return Some(schema.clone()),
                    Some(Entry::Failed(_)) => return None,
                    _ => {}
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn fetch_loop(mut rx: mpsc::UnboundedReceiver<SchemaKey>, cache: Weak<Inner>, source: SchemaSource) {
    let grpc = source.grpc_upstream.as_ref().map(|uri| {
        let channel = tonic::transport::Endpoint::from(uri.clone())
            .connect_timeout(source.timeout)
            .timeout(source.timeout)
            .connect_lazy();
        PredictionServiceClient::new(channel)
    });
    let rest = reqwest::Client::builder().timeout(source.timeout).build().ok();
    while let Some(key) = rx.recv().await {
        let mut result = Err("no upstream configured".to_string());
        if let Some(client) = &grpc {
            result = fetch_grpc(client.clone(), &key, source.timeout).await;
        }
        if result.is_err() {
            if let (Some(client), Some(base)) = (&rest, &source.rest_upstream) {
                result = fetch_rest(client, base, &key).await;
            }
        }
        let Some(inner) = cache.upgrade() else { return };
        let mut entries = inner.entries.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(schema) => {
                tracing::debug!(message = "Fetched model signature.", model = %key.model, version = ?key.version);
                entries.insert(key, Entry::Ready(Arc::new(schema)));
            }
            Err(error) => {
                tracing::debug!(message = "Model signature unavailable from TF Serving.", model = %key.model, %error);
                entries.insert(key, Entry::Failed(Instant::now() + inner.retry_after));
            }
        }
    }
}

async fn fetch_grpc(
    mut client: PredictionServiceClient<tonic::transport::Channel>,
    key: &SchemaKey,
    timeout: Duration,
) -> Result<ModelSchema, String> {
    let version_choice = match (&key.version, &key.label) {
        (Some(v), _) => Some(VersionChoice::Version(*v)),
        (None, Some(l)) => Some(VersionChoice::VersionLabel(l.clone())),
        (None, None) => None,
    };
    let request = GetModelMetadataRequest {
        model_spec: Some(ModelSpec { name: key.model.clone(), signature_name: String::new(), version_choice }),
        metadata_field: vec!["signature_def".to_string()],
    };
    let response = tokio::time::timeout(timeout, client.get_model_metadata(request))
        .await
        .map_err(|_| "GetModelMetadata timed out".to_string())?
        .map_err(|status| format!("GetModelMetadata failed: {}", status.message()))?
        .into_inner();
    let any = response.metadata.get("signature_def").ok_or("GetModelMetadata answered without signature_def")?;
    let map = SignatureDefMap::decode(any.value.as_slice()).map_err(|e| format!("bad SignatureDefMap: {e}"))?;
    Ok(ModelSchema::from_signature_defs(&map))
}

async fn fetch_rest(client: &reqwest::Client, base: &http::Uri, key: &SchemaKey) -> Result<ModelSchema, String> {
    let base = base.to_string();
    let mut url = format!("{}/v1/models/{}", base.trim_end_matches('/'), key.model);
    match (&key.version, &key.label) {
        (Some(v), _) => url.push_str(&format!("/versions/{v}")),
        (None, Some(l)) => url.push_str(&format!("/labels/{l}")),
        (None, None) => {}
    }
    url.push_str("/metadata");
    let response = client.get(&url).send().await.map_err(|e| format!("GET {url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("GET {url}: status {}", response.status()));
    }
    let body = response.bytes().await.map_err(|e| format!("GET {url}: {e}"))?;
    ModelSchema::from_rest_metadata(&body)
}
