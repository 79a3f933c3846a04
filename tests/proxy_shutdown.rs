//! `mltap serve` as a process: graceful shutdown on SIGTERM and start-up failures.

mod support;

use std::process::Stdio;
use std::time::Duration;
use support::fake_tfserving::{grpc_fixtures, rest_fixtures, FakeTfServing};
use support::mltap::{channel, dead_address};
use support::raw_codec::call_raw;

async fn wait_for_port(addr: std::net::SocketAddr) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("mltap did not open {addr}");
}

fn serve_command(
    grpc: &str,
    rest: &str,
    admin: &str,
    grpc_up: &str,
    rest_up: &str,
    out: &std::path::Path,
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_mltap"));
    command
        .args(["serve", "--grpc-listen", grpc, "--rest-listen", rest, "--admin-listen", admin])
        .args(["--grpc-upstream", grpc_up, "--rest-upstream", rest_up, "--log", "info"])
        .arg("--output-dir")
        .arg(out)
        .env_remove("MLTAP_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

#[tokio::test]
async fn sigterm_finishes_in_flight_exchanges_drains_and_exits_zero() {
    let fake = FakeTfServing::start().await;
    let out = tempfile::tempdir().unwrap();
    let (grpc, rest, admin) = (dead_address().await, dead_address().await, dead_address().await);
    let mut child = serve_command(
        &grpc.to_string(),
        &rest.to_string(),
        &admin.to_string(),
        &fake.grpc_url(),
        &fake.rest_url(),
        out.path(),
    )
    .spawn()
    .unwrap();
    for addr in [grpc, rest, admin] {
        wait_for_port(addr).await;
    }

    // One slow exchange per protocol is in flight when SIGTERM arrives.
    let f = grpc_fixtures().into_iter().find(|f| f.name == "batch64x16").unwrap();
    let r = rest_fixtures().into_iter().find(|f| f.name == "row_single_input").unwrap();
    let grpc_call = {
        let f = f.clone();
        tokio::spawn(async move {
            let proxied = channel(format!("http://{grpc}")).await;
            call_raw(&proxied, &f.path, f.request.clone(), &[("x-fake-delay-ms", "1000")]).await
        })
    };
    let rest_call = {
        let r = r.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::builder().no_proxy().build().unwrap();
            let response = client
                .post(format!("http://{rest}{}", r.path))
                .header("x-fake-delay-ms", "1000")
                .body(r.request.clone());
            response.send().await?.bytes().await
        })
    };
    fake.state.wait_received(2).await;
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());

    assert_eq!(grpc_call.await.unwrap().expect("in-flight gRPC call finishes").get_ref(), &f.response);
    assert_eq!(rest_call.await.unwrap().expect("in-flight REST call finishes"), r.response);
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait()).await.expect("mltap exits").unwrap();
    assert_eq!(status.code(), Some(0));
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).await.unwrap();
    assert!(stderr.contains("capture queue drained"), "{stderr}");
    assert!(tokio::net::TcpStream::connect(rest).await.is_err(), "the listener is closed");
}

#[tokio::test]
async fn a_port_in_use_stops_start_up_with_exit_code_2_naming_the_key() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = busy.local_addr().map(|a| (a, busy)).unwrap();
    let out = tempfile::tempdir().unwrap();
    let (rest, admin) = (dead_address().await, dead_address().await);
    let output = serve_command(
        &busy.0.to_string(),
        &rest.to_string(),
        &admin.to_string(),
        "http://127.0.0.1:1",
        "http://127.0.0.1:1",
        out.path(),
    )
    .output()
    .await
    .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("grpc_listen") && stderr.contains(&busy.0.to_string()), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
}

#[tokio::test]
async fn an_upstream_that_is_not_http_or_https_is_refused_at_start_up_naming_the_key() {
    let out = tempfile::tempdir().unwrap();
    let (grpc, rest, admin) = (dead_address().await, dead_address().await, dead_address().await);
    let output = serve_command(
        &grpc.to_string(),
        &rest.to_string(),
        &admin.to_string(),
        "http://127.0.0.1:1",
        "ftp://127.0.0.1:1",
        out.path(),
    )
    .output()
    .await
    .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("rest_upstream"));
}
