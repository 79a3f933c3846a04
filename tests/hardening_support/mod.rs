//! `mltap serve` run as a process for the hardening tests: the real binary, with its
//! output captured, optionally under a lowered open-file limit (`ulimit -n` in the
//! shell that execs it).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// A running `mltap serve` process; killed when dropped.
pub struct Serve {
    pub grpc: SocketAddr,
    pub rest: SocketAddr,
    pub admin: SocketAddr,
    pub child: tokio::process::Child,
}

/// How to start it.
pub struct ServeOptions<'a> {
    pub grpc_upstream: String,
    pub rest_upstream: String,
    pub output_dir: PathBuf,
    /// `ulimit -n` for the process, when set.
    pub open_files: Option<u32>,
    /// A configuration file's contents.
    pub config: Option<&'a str>,
    pub env: Vec<(&'a str, &'a str)>,
    pub args: Vec<&'a str>,
    /// A command the process runs under (`unshare ...`), when set.
    pub wrapper: Vec<&'a str>,
}

impl<'a> ServeOptions<'a> {
    pub fn new(grpc_upstream: String, rest_upstream: String, output_dir: &Path) -> ServeOptions<'a> {
        ServeOptions {
            grpc_upstream,
            rest_upstream,
            output_dir: output_dir.to_path_buf(),
            open_files: None,
            config: None,
            env: Vec::new(),
            args: Vec::new(),
            wrapper: Vec::new(),
        }
    }
}

/// A loopback port nothing listens on (yet).
pub fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

pub async fn wait_for_port(addr: SocketAddr) {
    for _ in 0..400 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("mltap did not open {addr}");
}

impl Serve {
    /// Starts the binary and waits for its three ports.
    pub async fn start(options: ServeOptions<'_>) -> Serve {
        let mut serve = Self::spawn(options);
        for addr in [serve.grpc, serve.rest, serve.admin] {
            if let Ok(Some(status)) = serve.child.try_wait() {
                panic!("mltap exited with {status}: {}", serve.stderr().await);
            }
            wait_for_port(addr).await;
        }
        serve
    }

    /// Starts the binary without waiting for anything.
    pub fn spawn(options: ServeOptions<'_>) -> Serve {
        let (grpc, rest, admin) = (free_port(), free_port(), free_port());
        let binary = env!("CARGO_BIN_EXE_mltap");
        let mut words = vec![
            "serve".to_string(),
            "--grpc-listen".into(),
            grpc.to_string(),
            "--rest-listen".into(),
            rest.to_string(),
            "--admin-listen".into(),
            admin.to_string(),
            "--grpc-upstream".into(),
            options.grpc_upstream.clone(),
            "--rest-upstream".into(),
            options.rest_upstream.clone(),
            "--output-dir".into(),
            options.output_dir.display().to_string(),
            "--log".into(),
            "info".into(),
        ];
        if let Some(config) = options.config {
            let path = options.output_dir.with_extension("toml");
            std::fs::write(&path, config).unwrap();
            words.push("--config".into());
            words.push(path.display().to_string());
        }
        words.extend(options.args.iter().map(|a| a.to_string()));
        let mut command = match options.wrapper.split_first() {
            None => tokio::process::Command::new("sh"),
            Some((program, args)) => {
                let mut command = tokio::process::Command::new(program);
                command.args(args).arg("sh");
                command
            }
        };
        let limit = options.open_files.map(|n| format!("ulimit -n {n} && ")).unwrap_or_default();
        command.arg("-c").arg(format!("{limit}exec \"$0\" \"$@\"")).arg(binary).args(&words);
        command
            .env_remove("MLTAP_CONFIG")
            .envs(options.env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = command.spawn().expect("mltap starts");
        Serve { grpc, rest, admin, child }
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// Stops the process and returns what it wrote to stderr.
    pub async fn stderr(&mut self) -> String {
        let _ = self.child.start_kill();
        let mut text = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), stderr.read_to_string(&mut text)).await;
        }
        text
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(10)).build().unwrap()
}

/// GET on the admin port: status and body.
pub async fn get(url: String) -> (u16, String) {
    let response = client().get(url).send().await.expect("admin answers");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

/// One request written raw on a fresh connection; the status of the answer (None
/// when the connection closes without one).
pub async fn raw_status(addr: SocketAddr, request: &[u8]) -> Option<u16> {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream.write_all(request).await.ok()?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await.ok()?.ok()?;
        if read == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..read]);
        if answer.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&answer);
    text.split_whitespace().nth(1)?.parse().ok()
}

/// The value of an unlabelled counter or gauge in `/metrics`.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
