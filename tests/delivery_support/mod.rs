//! A fake Anodot on loopback for delivery tests: records every request and answers
//! metric posts from a script (status codes, `errors` arrays, or never), the rest with
//! what Anodot answers. It runs on its own runtime so that a test may drop the
//! runtime delivery runs on, as a crash would.
#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use mltap::sinks::{Point, TargetType};
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How to answer one metric post.
#[derive(Debug, Clone)]
pub enum Reply {
    /// 200 with an empty `errors` array.
    Ok,
    /// This status and an empty body.
    Status(u16),
    /// This status and this JSON body.
    Json(u16, Value),
    /// Never answer (the connection stays open until the client goes).
    Hang,
}

/// One request as received, with the answer given.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    pub path: String,
    pub query: HashMap<String, String>,
    pub authorization: Option<String>,
    pub body: Value,
    pub at: Instant,
    /// Status answered; None when the request was left hanging.
    pub status: Option<u16>,
    /// Body answered.
    pub answer: Value,
}

#[derive(Default)]
struct State {
    received: Vec<Received>,
    script: VecDeque<Reply>,
    schemas: Vec<(String, String)>,
    tokens_issued: usize,
    token_ttl_secs: u64,
}

pub struct FakeAnodot {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    _runtime: tokio::runtime::Runtime,
}

impl FakeAnodot {
    pub fn start() -> FakeAnodot {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let state = Arc::new(Mutex::new(State { token_ttl_secs: 3600, ..State::default() }));
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = state.clone();
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let state = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(req, state.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        FakeAnodot { addr, state, _runtime: runtime }
    }

    /// The base URL (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues answers for the next metric posts; once used up, posts get `Reply::Ok`.
    pub fn script(&self, replies: impl IntoIterator<Item = Reply>) {
        self.state.lock().unwrap().script.extend(replies);
    }

    /// Lifetime of the bearer tokens issued from now on.
    pub fn token_ttl(&self, secs: u64) {
        self.state.lock().unwrap().token_ttl_secs = secs;
    }

    pub fn tokens_issued(&self) -> usize {
        self.state.lock().unwrap().tokens_issued
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    /// Requests to `path`.
    pub fn requests_to(&self, path: &str) -> Vec<Received> {
        self.received().into_iter().filter(|r| r.path == path).collect()
    }

    /// Metric posts, answered or not.
    pub fn metric_posts(&self) -> Vec<Received> {
        self.requests_to("/api/v1/metrics")
    }

    /// Points Anodot took: those of metric posts answered 200, less the indexes the
    /// answer's `errors` array refused.
    pub fn accepted_points(&self) -> Vec<Value> {
        let mut points = Vec::new();
        for r in self.metric_posts().into_iter().filter(|r| r.status == Some(200)) {
            if r.answer["errors"]
                .as_array()
                .is_some_and(|e| e.iter().any(|e| [1004, 2001, 2002, 2003].contains(&e["error"].as_i64().unwrap_or(0))))
            {
                continue;
            }
            let refused: Vec<u64> =
                r.answer["errors"].as_array().into_iter().flatten().filter_map(|e| e["index"].as_u64()).collect();
            for (i, p) in r.body.as_array().into_iter().flatten().enumerate() {
                if !refused.contains(&(i as u64)) {
                    points.push(p.clone());
                }
            }
        }
        points
    }
}

async fn handle(
    req: hyper::Request<hyper::body::Incoming>,
    state: Arc<Mutex<State>>,
) -> Result<hyper::Response<Full<Bytes>>, hyper::Error> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let authorization = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);
    let bytes = req.into_body().collect().await?.to_bytes();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let at = Instant::now();

    let (reply, answer) = {
        let mut s = state.lock().unwrap();
        match (method.as_str(), path.as_str()) {
            ("POST", "/api/v1/metrics") => {
                let reply = s.script.pop_front().unwrap_or(Reply::Ok);
                let answer = match &reply {
                    Reply::Json(_, v) => v.clone(),
                    Reply::Ok => json!({ "errors": [] }),
                    _ => Value::Null,
                };
                (reply, answer)
            }
            ("POST", "/api/v1/metrics/watermark") => (Reply::Ok, json!({ "errors": [] })),
            ("POST", "/api/v2/access-token") => {
                s.tokens_issued += 1;
                let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
                    + s.token_ttl_secs;
                let token = jwt(exp, s.tokens_issued);
                (Reply::Json(200, Value::String(token.clone())), Value::String(token))
            }
            ("GET", "/api/v2/stream-schemas/schemas") => {
                if !authorization.as_deref().is_some_and(|a| a.starts_with("Bearer ")) {
                    (Reply::Status(401), Value::Null)
                } else {
                    let list: Vec<Value> = s
                        .schemas
                        .iter()
                        .map(|(name, id)| json!({"streamSchemaWrapper": {"schema": {"id": id, "name": name}}}))
                        .collect();
                    (Reply::Json(200, Value::Array(list.clone())), Value::Array(list))
                }
            }
            ("POST", "/api/v2/stream-schemas") => {
                if !authorization.as_deref().is_some_and(|a| a.starts_with("Bearer ")) {
                    (Reply::Status(401), Value::Null)
                } else {
                    let name = body["name"].as_str().unwrap_or("").to_string();
                    let id = format!("schema-{}", s.schemas.len() + 1);
                    s.schemas.push((name, id.clone()));
                    let answer = json!({ "schema": { "id": id, "name": body["name"] } });
                    (Reply::Json(200, answer.clone()), answer)
                }
            }
            _ => (Reply::Status(404), Value::Null),
        }
    };
    let status = match &reply {
        Reply::Ok => Some(200),
        Reply::Status(s) | Reply::Json(s, _) => Some(*s),
        Reply::Hang => None,
    };
    state.lock().unwrap().received.push(Received {
        method,
        path,
        query,
        authorization,
        body,
        at,
        status,
        answer: answer.clone(),
    });
    match reply {
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(hyper::Response::new(Full::new(Bytes::new())))
        }
        Reply::Status(code) => Ok(hyper::Response::builder().status(code).body(Full::new(Bytes::new())).unwrap()),
        Reply::Ok | Reply::Json(..) => Ok(hyper::Response::builder()
            .status(status.unwrap_or(200))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(answer.to_string())))
            .unwrap()),
    }
}

/// An unsigned JWT-shaped token with an `exp` claim.
fn jwt(exp: u64, n: usize) -> String {
    use base64::Engine;
    let enc = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.as_bytes());
    format!("{}.{}.sig{n}", enc(r#"{"alg":"none"}"#), enc(&format!(r#"{{"exp":{exp},"n":{n}}}"#)))
}

/// `YYYYMMDDTHHMMSSZ` of epoch seconds (UTC).
pub fn stem(epoch: i64) -> String {
    let days = epoch.div_euclid(86_400);
    let secs = epoch.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z", secs / 3600, secs % 3600 / 60, secs % 60)
}

/// `n` points of bucket `start` for `model`, told apart by `feat_name` = `f{first+i}`,
/// half counters, half gauges.
pub fn points(model: &str, start: i64, first: usize, n: usize) -> Vec<Point> {
    (first..first + n)
        .map(|i| {
            let (what, t) = if i % 2 == 0 {
                ("feature_value", TargetType::Gauge)
            } else {
                ("feature_missing_count", TargetType::Counter)
            };
            Point::builder(what, t, start, i as f64)
                .with("model", model)
                .with("feat_name", format!("f{i}"))
                .with("stat", "mean")
                .finish()
                .unwrap()
        })
        .collect()
}

/// Writes a spool file `root/anodot/MODEL/STEM.json` atomically, as the engine does.
pub fn write_spool(output_dir: &Path, model: &str, start: i64, points: &[Point]) {
    let dir = output_dir.join("anodot").join(model);
    std::fs::create_dir_all(&dir).unwrap();
    let tmp = dir.join(format!(".{}.json.tmp", stem(start)));
    std::fs::write(&tmp, serde_json::to_vec(points).unwrap()).unwrap();
    std::fs::rename(&tmp, dir.join(format!("{}.json", stem(start)))).unwrap();
}

/// The identity of a delivered 2.0 point: model, timestamp and feat_name.
pub fn identity(p: &Value) -> (String, i64, String) {
    let props = if p.get("properties").is_some() { &p["properties"] } else { &p["dimensions"] };
    (
        props["model"].as_str().unwrap_or("").to_string(),
        p["timestamp"].as_i64().unwrap_or(-1),
        props["feat_name"].as_str().unwrap_or("").to_string(),
    )
}

/// Waits (up to `limit`) until `done` holds, polling.
pub fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    done()
}
