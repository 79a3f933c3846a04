//! The REST relay on the wire: framing across read boundaries, pipelining, the
//! request-smuggling cases and oversized heads answered as hyper's server answers
//! them, `Expect: 100-continue`, HEAD, pooled upstream connections that TF Serving
//! closed, and clients that leave mid-body. Raw TCP on both sides where it matters.

mod support;

use mltap::capture::CaptureReceiver;
use mltap::proxy::{Proxy, ProxyMetrics, ProxySettings};
use std::net::SocketAddr;
use std::time::Duration;
use support::fake_tfserving::{rest_fixtures, FakeTfServing, RestFixture};
use support::mltap::{config, Mltap};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A response read off the wire: status, header fields (names lowercased), decoded body.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// Reads exactly one response from `stream`, leaving what follows in `pending`.
/// `bodiless` for answers to HEAD.
async fn read_answer(stream: &mut TcpStream, pending: &mut Vec<u8>, bodiless: bool) -> Answer {
    let deadline = Duration::from_secs(10);
    let (status, headers, head_len) = loop {
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut fields);
        if let httparse::Status::Complete(len) = response.parse(pending).expect("a valid response head") {
            let headers = response
                .headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned()))
                .collect::<Vec<_>>();
            break (response.code.unwrap(), headers, len);
        }
        fill(stream, pending, deadline).await;
    };
    pending.drain(..head_len);
    let mut answer = Answer { status, headers, body: Vec::new() };
    if bodiless || status == 204 || status == 304 || (100..200).contains(&status) {
        return answer;
    }
    if answer.header("transfer-encoding") == Some("chunked") {
        loop {
            let (used, size) = loop {
                if let Ok(httparse::Status::Complete(found)) = httparse::parse_chunk_size(pending) {
                    break found;
                }
                fill(stream, pending, deadline).await;
            };
            pending.drain(..used);
            let size = size as usize;
            while pending.len() < size + 2 {
                fill(stream, pending, deadline).await;
            }
            answer.body.extend_from_slice(&pending[..size]);
            assert_eq!(&pending[size..size + 2], b"\r\n", "chunk data ends with CRLF");
            pending.drain(..size + 2);
            if size == 0 {
                return answer;
            }
        }
    }
    let len: usize = answer.header("content-length").expect("a framed answer").parse().unwrap();
    while pending.len() < len {
        fill(stream, pending, deadline).await;
    }
    answer.body = pending.drain(..len).collect();
    answer
}

async fn fill(stream: &mut TcpStream, pending: &mut Vec<u8>, deadline: Duration) {
    let mut chunk = [0u8; 4096];
    let n = tokio::time::timeout(deadline, stream.read(&mut chunk)).await.expect("an answer in time").unwrap();
    assert!(n > 0, "connection closed early; got so far: {:?}", String::from_utf8_lossy(pending));
    pending.extend_from_slice(&chunk[..n]);
}

/// True when the peer closes the connection (after any bytes still in flight).
async fn closes(stream: &mut TcpStream) -> bool {
    let mut rest = Vec::new();
    matches!(tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await, Ok(Ok(_)))
}

fn predict_fixture() -> RestFixture {
    rest_fixtures().into_iter().find(|f| f.name == "row_single_input").unwrap()
}

fn chunked(body: &[u8], chunk: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for part in body.chunks(chunk) {
        out.extend_from_slice(format!("{:x};ext=1\r\n", part.len()).as_bytes());
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\nx-trailer: t\r\n\r\n");
    out
}

async fn setup() -> (FakeTfServing, Mltap) {
    let fake = FakeTfServing::start().await;
    let mltap = Mltap::start(config(&fake.grpc_url(), &fake.rest_url())).await;
    (fake, mltap)
}

/// The proxy alone in front of `rest_upstream`, the worker's end of the queue left to the test.
async fn tapped(fake: &FakeTfServing, rest_upstream: &str) -> (SocketAddr, CaptureReceiver, watch::Sender<bool>) {
    let config = config(&fake.grpc_url(), rest_upstream);
    let (sender, receiver) = mltap::capture::queue(&config.capture);
    let mut registry = prometheus_client::registry::Registry::default();
    let proxy = Proxy::new(&ProxySettings::from(&config), sender, ProxyMetrics::register(&mut registry)).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move { proxy.serve_rest(listener, stopped).await });
    (addr, receiver, stop)
}

async fn next_exchange(receiver: &mut CaptureReceiver) -> mltap::capture::Exchange {
    tokio::time::timeout(Duration::from_secs(5), receiver.recv()).await.expect("an exchange is queued").unwrap()
}

#[tokio::test]
async fn relay_chunked_request_split_across_reads_arrives_whole_and_is_captured_decoded() {
    let fake = FakeTfServing::start().await;
    let (addr, mut receiver, _stop) = tapped(&fake, &fake.rest_url()).await;
    let f = predict_fixture();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!("POST {} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", f.path);
    let mut request = head.into_bytes();
    request.extend_from_slice(&chunked(&f.request, 7));
    // Small writes with pauses: chunk sizes, data and CRLFs straddle the relay's reads.
    for piece in request.chunks(5) {
        stream.write_all(piece).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let answer = read_answer(&mut stream, &mut Vec::new(), false).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, f.response.to_vec());
    assert_eq!(fake.state.last_body(), f.request, "TF Serving got the decoded body");
    let seen = fake.state.last_headers();
    assert_eq!(seen.get("transfer-encoding").unwrap(), "chunked");
    let exchange = next_exchange(&mut receiver).await;
    assert_eq!(exchange.request_bytes(), f.request);
    assert_eq!(exchange.response_bytes(), f.response);
    assert!(exchange.complete);
}

#[tokio::test]
async fn relay_chunked_response_is_rechunked_and_the_connection_stays_usable() {
    let (_fake, mltap) = setup().await;
    let f = predict_fixture();
    let mut stream = TcpStream::connect(mltap.rest).await.unwrap();
    let mut pending = Vec::new();
    for _ in 0..2 {
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: x\r\nx-fake-chunked: 1\r\nContent-Length: {}\r\n\r\n",
            f.path,
            f.request.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&f.request).await.unwrap();
        let answer = read_answer(&mut stream, &mut pending, false).await;
        assert_eq!(answer.header("transfer-encoding"), Some("chunked"));
        assert_eq!(answer.header("content-length"), None);
        assert_eq!(answer.body, f.response.to_vec());
    }
}

#[tokio::test]
async fn relay_pipelined_requests_are_answered_in_order() {
    let (_fake, mltap) = setup().await;
    let f = predict_fixture();
    let mut batch = Vec::new();
    let paths = ["/v1/models/iris", "predict", "/v1/models/iris/metadata", "predict"];
    for path in paths {
        if path == "predict" {
            let head = format!("POST {} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", f.path, f.request.len());
            batch.extend_from_slice(head.as_bytes());
            batch.extend_from_slice(&f.request);
        } else {
            batch.extend_from_slice(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
        }
    }
    let mut stream = TcpStream::connect(mltap.rest).await.unwrap();
    stream.write_all(&batch).await.unwrap();
    let mut pending = Vec::new();
    for path in paths {
        let answer = read_answer(&mut stream, &mut pending, false).await;
        assert_eq!(answer.status, 200, "{path}");
        let body = String::from_utf8_lossy(&answer.body);
        match path {
            "predict" => assert_eq!(answer.body, f.response.to_vec()),
            "/v1/models/iris" => assert!(body.contains("model_version_status"), "{body}"),
            _ => assert!(body.contains("model_spec"), "{body}"),
        }
    }
}

#[tokio::test]
async fn relay_head_split_over_many_writes_is_forwarded() {
    let (fake, mltap) = setup().await;
    let f = predict_fixture();
    let mut request = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nX-Request-Id: split-1\r\nContent-Length: {}\r\n\r\n",
        f.path,
        f.request.len()
    )
    .into_bytes();
    request.extend_from_slice(&f.request);
    let mut stream = TcpStream::connect(mltap.rest).await.unwrap();
    for byte in &request[..request.len() - f.request.len()] {
        stream.write_all(std::slice::from_ref(byte)).await.unwrap();
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    stream.write_all(&f.request).await.unwrap();
    let answer = read_answer(&mut stream, &mut Vec::new(), false).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, f.response.to_vec());
    assert_eq!(fake.state.last_headers().get("x-request-id").unwrap(), "split-1");
}

#[tokio::test]
async fn relay_content_length_with_transfer_encoding_is_read_as_chunked_and_closes() {
    let (fake, mltap) = setup().await;
    let f = predict_fixture();
    let mut request =
        format!("POST {} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", f.path)
            .into_bytes();
    request.extend_from_slice(&chunked(&f.request, 64));
    // A smuggled second request: must never be read as one.
    request.extend_from_slice(b"GET /v1/models/smuggled HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut stream = TcpStream::connect(mltap.rest).await.unwrap();
    stream.write_all(&request).await.unwrap();
    let answer = read_answer(&mut stream, &mut Vec::new(), false).await;
    assert_eq!((answer.status, answer.header("connection")), (200, Some("close")));
    assert_eq!(answer.body, f.response.to_vec());
    let seen = fake.state.last_headers();
    assert!(seen.get("content-length").is_none(), "{seen:?}");
    assert_eq!(seen.get("transfer-encoding").unwrap(), "chunked");
    assert!(closes(&mut stream).await);
    assert_eq!(fake.state.received.load(std::sync::atomic::Ordering::SeqCst), 1, "the smuggled request never ran");
}

#[tokio::test]
async fn relay_duplicate_equal_content_lengths_pass_once() {
    let (fake, mltap) = setup().await;
    let f = predict_fixture();
    let len = f.request.len();
    let mut request =
        format!("POST {} HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\nContent-Length: {len}\r\n\r\n", f.path)
            .into_bytes();
    request.extend_from_slice(&f.request);
    let mut stream = TcpStream::connect(mltap.rest).await.unwrap();
    stream.write_all(&request).await.unwrap();
    let answer = read_answer(&mut stream, &mut Vec::new(), false).await;
    assert_eq!(answer.status, 200);
    let seen = fake.state.last_headers();
    assert_eq!(seen.get_all("content-length").iter().count(), 1);
}

/// Sends `request` and expects hyper's automatic refusal with `status`, the
/// connection closed, and nothing sent to TF Serving.
async fn refused(mltap: &Mltap, fake: &FakeTfServing, request: &[u8], status: u16) {
    let before = fake.state.received.load(std::sync::atomic::Ordering::SeqCst);
    let mut stream = TcpStream::connect(mltap.rest).await.unwrap();
    let _ = stream.write_all(request).await;
    let answer = read_answer(&mut stream, &mut Vec::new(), false).await;
    let shown = String::from_utf8_lossy(&request[..request.len().min(120)]).into_owned();
    assert_eq!(answer.status, status, "{shown}");
    assert_eq!((answer.header("connection"), answer.header("content-length")), (Some("close"), Some("0")), "{shown}");
    assert!(closes(&mut stream).await, "{shown}");
    let after = fake.state.received.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(after, before, "TF Serving got nothing for {shown}");
}

#[tokio::test]
async fn relay_request_smuggling_shapes_are_refused_with_400() {
    let (fake, mltap) = setup().await;
    let cases: [&[u8]; 10] = [
        b"POST /v1/models/iris:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}x",
        b"POST /v1/models/iris:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 2, 2\r\n\r\n{}",
        b"POST /v1/models/iris:predict HTTP/1.1\r\nHost: x\r\nContent-Length: +2\r\n\r\n{}",
        b"POST /v1/models/iris:predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n{}",
        b"POST /v1/models/iris:predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        b"POST /v1/models/iris:predict HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"GET /v1/models/iris HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n",
        b"GET /v1/models/iris HTTP/1.1\r\nHost: x\r\nBad Name: x\r\n\r\n",
        b"GET /v1/models/iris HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
        b"G(T /v1/models/iris HTTP/1.1\r\nHost: x\r\n\r\n",
    ];
    for request in cases {
        refused(&mltap, &fake, request, 400).await;
    }
}

#[tokio::test]
async fn relay_bad_chunk_sizes_are_refused_with_400_and_close() {
    let (fake, mltap) = setup().await;
    let head = "POST /v1/models/iris:predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    for body in [
        "zz\r\n{}\r\n0\r\n\r\n",
        "\r\n{}\r\n0\r\n\r\n",
        "-2\r\n{}\r\n0\r\n\r\n",
        "2 2\r\n{}\r\n0\r\n\r\n",
        "2\n{}\r\n0\r\n\r\n",
        "2\r\n{}XX0\r\n\r\n",
        "10000000000000000\r\n{}\r\n0\r\n\r\n",
    ] {
        let mut stream = TcpStream::connect(mltap.rest).await.unwrap();
        stream
            .write_all(format!("{head}{body}GET /v1/models/smuggled HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let answer = read_answer(&mut stream, &mut Vec::new(), false).await;
        assert_eq!((answer.status, answer.header("connection")), (400, Some("close")), "{body:?}");
        assert!(closes(&mut stream).await, "{body:?}");
    }
    // The head went upstream before the body turned out bad; TF Serving never
    // completed a request, and nothing after the bad body was read as a request.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(fake.state.received.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test]
async fn relay_oversized_heads_are_refused_with_431() {
    let (fake, mltap) = setup().await;
    let big = format!("GET /v1/models/iris HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(500_000));
    refused(&mltap, &fake, big.as_bytes(), 431).await;
    let many: String = (0..101).map(|i| format!("X-H{i}: v\r\n")).collect();
    refused(&mltap, &fake, format!("GET /v1/models/iris HTTP/1.1\r\n{many}\r\n").as_bytes(), 431).await;
    let long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000));
    refused(&mltap, &fake, long.as_bytes(), 414).await;
}

#[tokio::test]
async fn relay_expect_100_continue_gets_the_interim_answer_before_the_body() {
    let (_fake, mltap) = setup().await;
    let f = predict_fixture();
    let mut stream = TcpStream::connect(mltap.rest).await.unwrap();
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        f.path,
        f.request.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut pending = Vec::new();
    let interim = read_answer(&mut stream, &mut pending, false).await;
    assert_eq!(interim.status, 100);
    stream.write_all(&f.request).await.unwrap();
    let answer = read_answer(&mut stream, &mut pending, false).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, f.response.to_vec());
}

#[tokio::test]
async fn relay_head_answers_have_no_body_and_keep_the_connection() {
    let (fake, mltap) = setup().await;
    let pair = b"HEAD /v1/models/iris HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/models/iris HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut answers = Vec::new();
    for addr in [fake.rest, mltap.rest] {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut pending = Vec::new();
        stream.write_all(pair).await.unwrap();
        let head = read_answer(&mut stream, &mut pending, true).await;
        // Had the HEAD answer carried body bytes, this would read them as a head.
        let get = read_answer(&mut stream, &mut pending, false).await;
        answers.push((head.status, head.header("content-length").map(str::to_string), get.status, get.body));
    }
    assert!(answers[0].1.as_deref().is_some_and(|len| len != "0"), "the HEAD answer announces a length");
    assert_eq!(answers[1], answers[0], "through mltap as directly");
}

/// An upstream that answers one request per connection with a keep-alive response
/// and then closes the connection, as a server closing idle connections does;
/// with `answer` false it closes without answering.
async fn one_shot_upstream(answer: bool) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut chunk = [0u8; 1024];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&chunk[..n]),
                    }
                }
                if answer {
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn relay_a_pooled_connection_the_upstream_closed_is_not_used() {
    let fake = FakeTfServing::start().await;
    let upstream = one_shot_upstream(true).await;
    let mltap = Mltap::start(config(&fake.grpc_url(), &format!("http://{upstream}"))).await;
    let mut stream = TcpStream::connect(mltap.rest).await.unwrap();
    let mut pending = Vec::new();
    for round in 0..3 {
        stream.write_all(b"GET /v1/models/m HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let answer = read_answer(&mut stream, &mut pending, false).await;
        assert_eq!((answer.status, answer.body.as_slice()), (200, b"ok".as_slice()), "round {round}");
        // Time for the upstream's close to reach the proxy's idle connection.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn relay_an_upstream_that_closes_without_answering_gives_502() {
    let fake = FakeTfServing::start().await;
    let upstream = one_shot_upstream(false).await;
    let mltap = Mltap::start(config(&fake.grpc_url(), &format!("http://{upstream}"))).await;
    let mut stream = TcpStream::connect(mltap.rest).await.unwrap();
    let mut pending = Vec::new();
    stream.write_all(b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}").await.unwrap();
    let answer = read_answer(&mut stream, &mut pending, false).await;
    assert_eq!(answer.status, 502);
    assert_eq!(answer.header("content-type"), Some("application/json"));
    let body: serde_json::Value = serde_json::from_slice(&answer.body).unwrap();
    assert!(body["error"].as_str().unwrap().contains(&upstream.to_string()), "{body}");
    // The body was read whole: the connection serves the next request.
    stream.write_all(b"GET /v1/models/m HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    assert_eq!(read_answer(&mut stream, &mut pending, false).await.status, 502);
}

#[tokio::test]
async fn relay_a_client_leaving_mid_body_ends_the_exchange_as_incomplete() {
    let fake = FakeTfServing::start().await;
    let (addr, mut receiver, _stop) = tapped(&fake, &fake.rest_url()).await;
    let f = predict_fixture();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let head = format!("POST {} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", f.path, f.request.len());
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&f.request[..10]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(stream);
    let exchange = next_exchange(&mut receiver).await;
    assert!(!exchange.complete);
    assert_eq!(exchange.request_bytes(), f.request.slice(..10));
    assert!(exchange.response_body.is_empty());
    // The proxy serves the next client as before.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut request = head.into_bytes();
    request.extend_from_slice(&f.request);
    stream.write_all(&request).await.unwrap();
    let answer = read_answer(&mut stream, &mut Vec::new(), false).await;
    assert_eq!(answer.body, f.response.to_vec());
    assert!(next_exchange(&mut receiver).await.complete);
}
