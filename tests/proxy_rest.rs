//! Black-box transparency tests of the REST listener: reqwest and raw HTTP/1.1 talk
//! to the fake TF Serving directly and through mltap, and the answers must agree.

mod support;

use support::fake_tfserving::{rest_fixtures, FakeTfServing};
use support::mltap::{config, dead_address, Mltap};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn setup() -> (FakeTfServing, Mltap) {
    let fake = FakeTfServing::start().await;
    let mltap = Mltap::start(config(&fake.grpc_url(), &fake.rest_url())).await;
    (fake, mltap)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// A response as raw HTTP/1.1: status, header lines in order (names lowercased), body bytes.
struct Raw {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Raw {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Sends raw request bytes on a fresh connection and reads until the server closes
/// it (requests ask for `Connection: close`).
async fn raw_exchange(addr: std::net::SocketAddr, request: &[u8]) -> Raw {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut bytes = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), stream.read_to_end(&mut bytes))
        .await
        .expect("the server closes the connection")
        .unwrap();
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head");
    let head = String::from_utf8(bytes[..end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    Raw { status, headers, body: bytes[end + 4..].to_vec() }
}

fn post(path: &str, extra: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: tfserving\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

#[tokio::test]
async fn rest_every_fixture_is_answered_byte_identically_through_mltap() {
    let (fake, mltap) = setup().await;
    let fixtures = rest_fixtures();
    assert!(fixtures.len() >= 8, "fixtures found: {}", fixtures.len());
    for f in fixtures {
        let direct = raw_exchange(fake.rest, &post(&f.path, "", &f.request)).await;
        let proxied = raw_exchange(mltap.rest, &post(&f.path, "", &f.request)).await;
        assert_eq!(direct.status, f.status, "{}: the fake answers the recording", f.name);
        assert_eq!(direct.body, f.response.to_vec(), "{}", f.name);
        assert_eq!(proxied.status, direct.status, "{}", f.name);
        // Order across different field names carries no meaning (RFC 9110 §5.3).
        let sorted = |raw: &Raw| {
            let mut h = raw.headers.clone();
            h.sort();
            h
        };
        assert_eq!(sorted(&proxied), sorted(&direct), "{}: headers differ", f.name);
        assert_eq!(proxied.body, direct.body, "{}: body bytes differ", f.name);
    }
}

#[tokio::test]
async fn rest_model_status_and_metadata_pass() {
    let (fake, mltap) = setup().await;
    for path in ["/v1/models/iris", "/v1/models/iris/versions/1", "/v1/models/iris/metadata"] {
        let direct = client().get(format!("{}{path}", fake.rest_url())).send().await.unwrap();
        let proxied = client().get(format!("{}{path}", mltap.rest_url())).send().await.unwrap();
        assert_eq!(proxied.status(), 200, "{path}");
        assert_eq!(proxied.headers(), direct.headers(), "{path}");
        assert_eq!(proxied.bytes().await.unwrap(), direct.bytes().await.unwrap(), "{path}");
    }
}

#[tokio::test]
async fn rest_every_method_and_path_is_forwarded() {
    let (fake, mltap) = setup().await;
    let cases = [
        (reqwest::Method::GET, "/monitoring/prometheus/metrics"),
        (reqwest::Method::PUT, "/v1/models/iris/labels"),
        (reqwest::Method::DELETE, "/no/such/path?x=1"),
    ];
    for (method, path) in cases {
        let direct = client().request(method.clone(), format!("{}{path}", fake.rest_url())).send().await.unwrap();
        let proxied = client().request(method.clone(), format!("{}{path}", mltap.rest_url())).send().await.unwrap();
        assert_eq!(proxied.status(), direct.status(), "{method} {path}");
        assert_eq!(proxied.bytes().await.unwrap(), direct.bytes().await.unwrap(), "{method} {path}");
        let seen = fake.state.last_headers();
        assert_eq!(seen.get("host").unwrap(), mltap.rest.to_string().as_str(), "the client's Host passes");
    }
}

#[tokio::test]
async fn rest_content_length_zero_is_preserved() {
    let (fake, mltap) = setup().await;
    let raw = raw_exchange(mltap.rest, &post("/v1/models/iris:predict", "x-fake-empty: 1\r\n", b"")).await;
    assert_eq!(raw.status, 200);
    assert_eq!(raw.header("content-length"), Some("0"));
    assert_eq!(raw.header("transfer-encoding"), None);
    assert!(raw.body.is_empty());
    assert_eq!(fake.state.last_headers().get("content-length").unwrap(), "0", "the request's Content-Length: 0 passes");
}

#[tokio::test]
async fn rest_content_length_is_kept_not_switched_to_chunked() {
    let (fake, mltap) = setup().await;
    let f = rest_fixtures().into_iter().find(|f| f.name == "row_single_input").unwrap();
    let raw = raw_exchange(mltap.rest, &post(&f.path, "", &f.request)).await;
    assert_eq!(raw.header("content-length"), Some(f.response.len().to_string().as_str()));
    assert_eq!(raw.header("transfer-encoding"), None);
    let seen = fake.state.last_headers();
    assert_eq!(seen.get("content-length").unwrap(), f.request.len().to_string().as_str());
    assert!(seen.get("transfer-encoding").is_none());
}

#[tokio::test]
async fn rest_chunked_upstream_response_streams_through() {
    let (fake, mltap) = setup().await;
    let f = rest_fixtures().into_iter().find(|f| f.name == "row_single_input").unwrap();
    let direct =
        client().post(format!("{}{}", fake.rest_url(), f.path)).header("x-fake-chunked", "1").body(f.request.clone());
    let proxied =
        client().post(format!("{}{}", mltap.rest_url(), f.path)).header("x-fake-chunked", "1").body(f.request.clone());
    let (direct, proxied) = (direct.send().await.unwrap(), proxied.send().await.unwrap());
    assert!(proxied.headers().get("content-length").is_none());
    assert_eq!(proxied.bytes().await.unwrap(), direct.bytes().await.unwrap());
}

#[tokio::test]
async fn rest_hop_by_hop_headers_are_removed_both_ways() {
    let (fake, mltap) = setup().await;
    let f = rest_fixtures().into_iter().find(|f| f.name == "row_single_input").unwrap();
    let extra = "Connection: X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: gzip\r\nX-End-To-End: kept\r\nx-fake-hop-by-hop: 1\r\n";
    let raw = raw_exchange(mltap.rest, &post(&f.path, extra, &f.request)).await;
    let seen = fake.state.last_headers();
    for name in ["x-secret", "keep-alive", "proxy-connection", "te", "connection"] {
        assert!(seen.get(name).is_none(), "request header {name} reached TF Serving: {seen:?}");
    }
    assert_eq!(seen.get("x-end-to-end").unwrap(), "kept");
    for name in ["x-hop", "keep-alive", "proxy-connection"] {
        assert!(raw.header(name).is_none(), "response header {name} reached the client: {:?}", raw.headers);
    }
    assert_ne!(raw.header("connection"), Some("x-hop"));
    assert_eq!(raw.header("x-end-to-end"), Some("kept"));
    assert_eq!(raw.body, f.response.to_vec());
}

#[tokio::test]
async fn rest_no_date_or_server_header_is_added() {
    let (_fake, mltap) = setup().await;
    let f = rest_fixtures().into_iter().find(|f| f.name == "classify").unwrap();
    let raw = raw_exchange(mltap.rest, &post(&f.path, "", &f.request)).await;
    assert_eq!(raw.status, 200);
    assert_eq!(raw.header("date"), None, "{:?}", raw.headers);
    assert_eq!(raw.header("server"), None, "{:?}", raw.headers);
}

#[tokio::test]
async fn rest_gzip_request_body_passes_as_it_is() {
    use std::io::Write;
    let (fake, mltap) = setup().await;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(br#"{"instances": [[1.0, 2.0, 3.0, 4.0]]}"#).unwrap();
    let compressed = gz.finish().unwrap();
    let response = client()
        .post(format!("{}/v1/models/iris:predict", mltap.rest_url()))
        .header("content-encoding", "gzip")
        .body(compressed.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400, "the fake has no fixture for it and says so");
    assert_eq!(fake.state.last_body().to_vec(), compressed);
    assert_eq!(fake.state.last_headers().get("content-encoding").unwrap(), "gzip");
}

#[tokio::test]
async fn rest_upstream_errors_pass_unchanged() {
    let (fake, mltap) = setup().await;
    for status in ["400", "404", "500", "503"] {
        let send = |url: String| client().post(url).header("x-fake-status", status).body("{}").send();
        let direct = send(format!("{}/v1/models/iris:predict", fake.rest_url())).await.unwrap();
        let proxied = send(format!("{}/v1/models/iris:predict", mltap.rest_url())).await.unwrap();
        assert_eq!(proxied.status(), direct.status());
        assert_eq!(proxied.bytes().await.unwrap(), direct.bytes().await.unwrap());
    }
}

#[tokio::test]
async fn rest_keep_alive_connection_serves_many_requests() {
    let (_fake, mltap) = setup().await;
    let f = rest_fixtures().into_iter().find(|f| f.name == "row_single_input").unwrap();
    let mut stream = tokio::net::TcpStream::connect(mltap.rest).await.unwrap();
    for _ in 0..3 {
        let request = format!("POST {} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", f.path, f.request.len());
        stream.write_all(request.as_bytes()).await.unwrap();
        stream.write_all(&f.request).await.unwrap();
        // Read exactly one response: head, then Content-Length bytes.
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).await.unwrap();
            got.push(byte[0]);
        }
        let mut body = vec![0u8; f.response.len()];
        stream.read_exact(&mut body).await.unwrap();
        assert_eq!(body, f.response.to_vec());
    }
}

#[tokio::test]
async fn rest_dead_upstream_answers_502_naming_it() {
    let fake = FakeTfServing::start().await;
    let dead = dead_address().await;
    let mltap = Mltap::start(config(&fake.grpc_url(), &format!("http://{dead}"))).await;
    let response =
        client().post(format!("{}/v1/models/iris:predict", mltap.rest_url())).body("{}").send().await.unwrap();
    assert_eq!(response.status(), 502);
    assert_eq!(response.headers().get("content-type").unwrap(), "application/json");
    let body: serde_json::Value = response.json().await.unwrap();
    let error = body["error"].as_str().expect("TF Serving's error shape");
    assert!(error.contains(&dead.to_string()), "{error}");
}

#[tokio::test]
async fn rest_slow_upstream_answers_504() {
    let fake = FakeTfServing::start().await;
    let mut config = config(&fake.grpc_url(), &fake.rest_url());
    config.upstream_timeout = std::time::Duration::from_millis(200);
    let mltap = Mltap::start(config).await;
    let response = client()
        .post(format!("{}/v1/models/iris:predict", mltap.rest_url()))
        .header("x-fake-delay-ms", "5000")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains(&fake.rest.to_string()), "{body}");
}
