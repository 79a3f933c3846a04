//! mltap started in-process on loopback ports chosen by the OS, in front of given
//! upstreams, through the same `app::run` that `mltap serve` uses.

use mltap::app::{Listeners, ServeError};
use mltap::cli::ServeArgs;
use mltap::config::Config;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct Mltap {
    pub grpc: SocketAddr,
    pub rest: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    /// Removed at `stop` when it is one of the test's own temporary dirs.
    output_dir: std::path::PathBuf,
    task: Option<JoinHandle<Result<(), ServeError>>>,
}

/// A configuration for upstreams at these URLs, as `Config::load` builds it.
pub fn config(grpc_upstream: &str, rest_upstream: &str) -> Config {
    Config::load(&ServeArgs {
        grpc_upstream: Some(grpc_upstream.to_string()),
        rest_upstream: Some(rest_upstream.to_string()),
        output_dir: Some(fresh_output_dir()),
        ..ServeArgs::default()
    })
    .expect("valid test configuration")
}

/// An output dir of its own for each instance: instances in one test process must
/// not share the embedded label store's file.
fn fresh_output_dir() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("mltap-test-{}-{n}", std::process::id()));
    dir.display().to_string()
}

/// A loopback address on which nothing listens.
pub async fn dead_address() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

impl Mltap {
    pub async fn start(config: Config) -> Mltap {
        Self::start_with_routes(config, Vec::new()).await
    }

    pub async fn start_with_routes(config: Config, routes: Vec<Arc<dyn mltap::admin::AdminRoute>>) -> Mltap {
        let listeners = Listeners {
            grpc: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            rest: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            admin: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let (grpc, rest, admin) = (
            listeners.grpc.local_addr().unwrap(),
            listeners.rest.local_addr().unwrap(),
            listeners.admin.local_addr().unwrap(),
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let output_dir = config.output_dir.clone();
        let task = tokio::spawn(mltap::app::run(Arc::new(config), listeners, routes, async move {
            let _ = stopped.await;
        }));
        Mltap { grpc, rest, admin, stop: Some(stop), output_dir, task: Some(task) }
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub fn rest_url(&self) -> String {
        format!("http://{}", self.rest)
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// Shuts down gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("mltap task").expect("mltap ran");
        }
        if self.output_dir.starts_with(std::env::temp_dir()) {
            let _ = std::fs::remove_dir_all(&self.output_dir);
        }
    }
}

impl Drop for Mltap {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A tonic channel (one HTTP/2 connection) to `url`.
pub async fn channel(url: String) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(url).unwrap().connect().await.expect("connect")
}
