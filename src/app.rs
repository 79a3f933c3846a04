//! `mltap serve`: composes listeners, proxy, capture queue, worker, admin server and
//! graceful shutdown from one validated `Config`.
//!
//! Listeners are bound first, so a port in use stops start-up with a configuration
//! error naming its key before anything else starts. On shutdown the listeners stop
//! accepting, in-flight exchanges finish, the capture queue drains into the worker,
//! all within `shutdown_grace`. The proxy listeners are served by one thread per core,
//! each with its own single-threaded runtime and upstream pools; the worker and the
//! admin server run on the caller's runtime. This module owns composition only: no
//! request handling, no payload knowledge (logging is set up by `logging`).

use crate::admin::capture_metrics::CaptureCollector;
use crate::admin::history::History;
use crate::admin::process_metrics::{BuildInfo, ProcessMetrics};
use crate::admin::{AdminRoute, AdminServer, MonitoringHealth, ReadinessTarget};
use crate::config::Config;
use crate::labels::endpoint::{LabelsRoute, PendingLabelsRoute};
use crate::labels::link::LabelLink;
use crate::labels::{LabelCounters, LabelService, LabelSettings, LabelsStoreConfig};
use crate::monitor::ClosedBucket;
use crate::proxy::{Proxy, ProxyMetrics, ProxySettings};
use crate::request_log::{LogSettings, RunningLogs};
use crate::sinks::anodot::{Delivery, DeliverySettings};
use crate::sinks::files::FileSink;
use crate::units::ConfigError;
use crate::worker::{BucketListener, WorkerSettings};
use prometheus_client::registry::Registry;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tracing::{error, info, warn};

/// mimalloc instead of glibc malloc: the proxy allocates per exchange on several
/// threads and the worker frees captured buffers on another, which made glibc's arena
/// locks show up as futex calls in profiles of the proxy benchmark.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Shows every closed bucket on the dashboard.
struct HistoryFeed(Arc<History>);

impl BucketListener for HistoryFeed {
    fn on_closed(&self, bucket: &ClosedBucket) {
        self.0.record(&bucket.model, &bucket.points);
    }
}

/// Why `serve` stopped with a failure.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A bad configuration: exit code 2.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Anything failing at run time: exit code 1.
    #[error("{0}")]
    Runtime(String),
}

/// The three bound listeners.
#[derive(Debug)]
pub struct Listeners {
    pub grpc: TcpListener,
    pub rest: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds the three addresses; a failure names the configuration key.
    pub async fn bind(config: &Config) -> Result<Listeners, ConfigError> {
        Ok(Listeners {
            grpc: bind_shared("grpc_listen", config.grpc_listen).await?,
            rest: bind_shared("rest_listen", config.rest_listen).await?,
            admin: bind("admin_listen", config.admin_listen).await?,
        })
    }
}

/// A proxy listener the serving threads add sockets of their own to (`SO_REUSEPORT`).
async fn bind_shared(key: &str, address: SocketAddr) -> Result<TcpListener, ConfigError> {
    crate::proxy::listen::bind_shared(address)
        .await
        .map_err(|error| ConfigError::new(key, "", format!("cannot listen on {address}: {error}")))
}

async fn bind(key: &str, address: SocketAddr) -> Result<TcpListener, ConfigError> {
    TcpListener::bind(address)
        .await
        .map_err(|error| ConfigError::new(key, "", format!("cannot listen on {address}: {error}")))
}

// What each component takes from the whole configuration.

impl From<&Config> for ProxySettings {
    fn from(config: &Config) -> ProxySettings {
        ProxySettings {
            grpc_upstream: config.grpc_upstream.clone(),
            rest_upstream: config.rest_upstream.clone(),
            upstream_timeout: config.upstream_timeout,
            request_id_header: config.request_id_header.clone(),
            return_request_id: config.capture.return_request_id,
            tls: config.tls.clone(),
            limits: config.limits.clone(),
            connections: crate::proxy::limits::ConnectionBudget::new(config.limits.effective_max_connections()),
        }
    }
}

impl From<&Config> for WorkerSettings {
    fn from(config: &Config) -> WorkerSettings {
        WorkerSettings {
            bucket: config.bucket,
            output_dir: config.output_dir.clone(),
            grpc_upstream: config.grpc_upstream.clone(),
            rest_upstream: config.rest_upstream.clone(),
            monitor: config.monitor.clone(),
            models: config.models.clone(),
            references: config.references.clone(),
            fleet: fleet_settings(config),
        }
    }
}

/// The fleet's settings: on when the label store is Redis (the replicas share it)
/// and `[fleet] enabled` is not turned off.
fn fleet_settings(config: &Config) -> Option<crate::fleet::FleetSettings> {
    let nodes = match &config.labels_store {
        LabelsStoreConfig::Embedded => return None,
        LabelsStoreConfig::Redis(url) => vec![url.clone()],
        LabelsStoreConfig::RedisCluster(nodes) => nodes.clone(),
    };
    config.fleet.enabled.then(|| crate::fleet::FleetSettings {
        nodes,
        prefix: config.labels.redis_key_prefix.clone(),
        bucket: config.bucket,
        monitor: config.monitor.clone(),
        config: config.fleet.clone(),
    })
}

impl From<&Config> for LogSettings {
    fn from(config: &Config) -> LogSettings {
        LogSettings {
            request_log: config.request_log.clone(),
            access_log: config.access_log.clone(),
            model_rates: config
                .models
                .iter()
                .filter_map(|(name, model)| model.request_log_sampling_rate.map(|rate| (name.clone(), rate)))
                .collect(),
            output_dir: config.output_dir.clone(),
            grpc_upstream: config.grpc_upstream.clone(),
            rest_upstream: config.rest_upstream.clone(),
        }
    }
}

impl From<&Config> for LabelSettings {
    fn from(config: &Config) -> LabelSettings {
        LabelSettings {
            bucket: config.bucket,
            horizon: config.label_horizon,
            output_dir: config.output_dir.clone(),
            store: config.labels_store.clone(),
            labels: config.labels.clone(),
            models: config.models.clone(),
        }
    }
}

/// Delivery to Anodot, or None when no `anodot_url` is configured; its secrets come
/// from the process environment.
fn delivery_settings(config: &Config) -> Result<Option<DeliverySettings>, ConfigError> {
    let Some(url) = &config.anodot_url else { return Ok(None) };
    DeliverySettings::resolve(url, config.anodot.clone(), config.bucket, config.label_horizon, |name| {
        std::env::var(name).ok()
    })
    .map(Some)
}

/// Runs mltap until SIGTERM or SIGINT, then shuts down gracefully.
pub async fn serve(config: Config) -> Result<(), ServeError> {
    let listeners = Listeners::bind(&config).await?;
    let shutdown = termination_signal()?;
    run(Arc::new(config), listeners, Vec::new(), shutdown).await
}

/// How long start-up waits for the label store before the listeners serve anyway.
const LABEL_STORE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// First and longest wait between attempts to open a label store that failed to open.
const LABEL_STORE_RETRY_FIRST: std::time::Duration = std::time::Duration::from_secs(1);
const LABEL_STORE_RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(30);
/// How long one attempt to open the label store may take.
const LABEL_STORE_OPEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The label service once open: its route serves `/v1/labels` and its link records
/// the worker's observations. A store that cannot open at start (Redis not reachable
/// yet, a directory not writable) is retried in the background with a backoff while
/// the proxy serves, and `/readyz` reports it on its monitoring line: monitoring state
/// never stops serving.
struct Labels {
    route: PendingLabelsRoute,
    service: std::sync::OnceLock<Arc<LabelService>>,
    link: std::sync::Mutex<Option<LabelLink>>,
    /// Why the store is not open, while it is not.
    problem: std::sync::Mutex<String>,
    counters: LabelCounters,
    dropped: prometheus_client::metrics::counter::Counter,
    hooks: crate::worker::Hooks,
    files: FileSink,
    history: Arc<History>,
    gauges: crate::sinks::prometheus::ModelGauges,
}

/// The outcome of opening the label store, a task's panic included.
type Opened = Result<Arc<LabelService>, String>;

fn joined(result: Result<Result<Arc<LabelService>, crate::labels::LabelError>, tokio::task::JoinError>) -> Opened {
    match result {
        Ok(Ok(service)) => Ok(service),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(format!("opening task failed: {e}")),
    }
}

impl Labels {
    /// Serves labels with an opened service from now on.
    fn attach(&self, service: Arc<LabelService>) -> Result<(), String> {
        let route = LabelsRoute::new(service.clone()).map_err(|e| e.to_string())?;
        let link = LabelLink::spawn_counted(
            service.clone(),
            &self.hooks,
            self.files.clone(),
            Some(self.history.clone()),
            Some(self.gauges.clone()),
            self.dropped.clone(),
        );
        *self.link.lock().unwrap_or_else(|e| e.into_inner()) = Some(link);
        self.route.open(route);
        let _ = self.service.set(service);
        Ok(())
    }

    /// What `/readyz` says of the label store.
    fn health(&self) -> Option<String> {
        match self.service.get() {
            Some(service) => service.store_health(),
            None => Some(self.problem.lock().unwrap_or_else(|e| e.into_inner()).clone()),
        }
    }

    fn set_problem(&self, problem: String) {
        *self.problem.lock().unwrap_or_else(|e| e.into_inner()) = problem;
    }

    /// Finishes opening the store (`opening`), or after it failed opens it again and
    /// again, with a backoff, until it opens.
    async fn open_later(
        self: Arc<Self>,
        opening: Result<tokio::task::JoinHandle<Result<Arc<LabelService>, crate::labels::LabelError>>, String>,
        settings: LabelSettings,
    ) {
        let opened = match opening {
            Ok(handle) => Self::bounded(handle).await.and_then(|service| self.attach(service)),
            Err(problem) => Err(problem),
        };
        match opened {
            Ok(()) => return,
            Err(problem) => {
                error!(message = "The label store cannot be opened; serving continues and it is retried.", %problem);
                self.set_problem(format!("not open: {problem}; retrying"));
            }
        }
        let mut backoff = LABEL_STORE_RETRY_FIRST;
        loop {
            tokio::time::sleep(backoff).await;
            let opened =
                Self::bounded(tokio::spawn(LabelService::open_counted(settings.clone(), self.counters.clone()))).await;
            match opened.and_then(|service| self.attach(service)) {
                Ok(()) => {
                    info!(message = "Label store open; labels are joined from now on.");
                    return;
                }
                Err(problem) => {
                    warn!(message = "Label store still cannot be opened.", %problem, retry_in = ?backoff);
                    self.set_problem(format!("not open: {problem}; retrying"));
                }
            }
            backoff = (backoff * 2).min(LABEL_STORE_RETRY_MAX);
        }
    }

    /// An attempt to open the store, given up after `LABEL_STORE_OPEN_TIMEOUT` (the
    /// Redis client's own reconnection backoff can outlast the server's return).
    async fn bounded(
        mut handle: tokio::task::JoinHandle<Result<Arc<LabelService>, crate::labels::LabelError>>,
    ) -> Opened {
        match tokio::time::timeout(LABEL_STORE_OPEN_TIMEOUT, &mut handle).await {
            Ok(result) => joined(result),
            Err(_) => {
                handle.abort();
                Err(format!("not open within {LABEL_STORE_OPEN_TIMEOUT:?}"))
            }
        }
    }

    /// Records what is pending and stops the link, if the store ever opened.
    async fn finish(&self) {
        let link = self.link.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(link) = link {
            link.finish().await;
        }
    }
}

/// Threads serving the proxy's listeners: one per core, as nginx runs one worker
/// process per core. Each has its own single-threaded runtime and upstream pools,
/// so an exchange never hops between threads.
fn serving_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Starts one serving thread on shared listener sockets; `done` fires when its
/// connections have all closed (or it could not start).
fn spawn_serving_thread(
    index: usize,
    proxy: Proxy,
    (grpc, rest): (std::net::TcpListener, std::net::TcpListener),
    (grpc_spread, rest_spread): (crate::proxy::listen::Spread, crate::proxy::listen::Spread),
    stopped: watch::Receiver<bool>,
    done: oneshot::Sender<()>,
) -> Result<(), ServeError> {
    std::thread::Builder::new()
        .name(format!("mltap-proxy-{index}"))
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(error) => {
                    error!(message = "Cannot start a serving thread's runtime.", %error);
                    return;
                }
            };
            runtime.block_on(async move {
                match (TcpListener::from_std(grpc), TcpListener::from_std(rest)) {
                    (Ok(grpc), Ok(rest)) => {
                        tokio::join!(
                            proxy.serve_grpc_spread(grpc, stopped.clone(), grpc_spread),
                            proxy.serve_rest_spread(rest, stopped, rest_spread)
                        );
                    }
                    (Err(error), _) | (_, Err(error)) => {
                        error!(message = "Cannot register a listener on a serving thread.", %error);
                    }
                }
            });
            // Idle upstream connections end with the runtime, before `done` fires.
            drop(runtime);
            let _ = done.send(());
        })
        .map(|_| ())
        .map_err(|e| ServeError::Runtime(format!("cannot start a serving thread: {e}")))
}

/// Resolves on the first SIGTERM or SIGINT.
fn termination_signal() -> Result<impl Future<Output = ()>, ServeError> {
    use tokio::signal::unix::{signal, SignalKind};
    let signal_error = |e: std::io::Error| ServeError::Runtime(format!("cannot install signal handlers: {e}"));
    let mut terminate = signal(SignalKind::terminate()).map_err(signal_error)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(signal_error)?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => info!(message = "SIGTERM received, shutting down."),
            _ = interrupt.recv() => info!(message = "SIGINT received, shutting down."),
        }
    })
}

/// Runs the proxy, the worker and the admin server on bound listeners until
/// `shutdown` resolves; `routes` are extra admin endpoints (labels, dashboard).
///
/// The serving threads start as soon as the proxy and the worker exist: monitoring
/// state (the dashboard's history, the label store, Anodot delivery and its spool
/// cursor) loads afterwards, so a large history or a slow or damaged store never
/// delays serving, and a monitoring component that cannot start is reported on
/// `/readyz` as degraded monitoring while the proxy serves.
pub async fn run(
    config: Arc<Config>,
    listeners: Listeners,
    routes: Vec<Arc<dyn AdminRoute>>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    // The process metrics keep their standard unprefixed names; all else is `mltap_`.
    let mut root = Registry::default();
    root.register_collector(Box::new(ProcessMetrics));
    let registry = root.sub_registry_with_prefix("mltap");
    registry.register_collector(Box::new(BuildInfo));
    let (sender, receiver) = crate::capture::queue(&config.capture);
    registry.register_collector(Box::new(CaptureCollector { stats: sender.stats().clone() }));
    let metrics = ProxyMetrics::register(registry);
    let exchange_logs = RunningLogs::start(&LogSettings::from(config.as_ref()), registry)?;
    let proxy_settings = ProxySettings::from(config.as_ref());
    // Built before any thread starts so that a bad upstream stops start-up cleanly.
    let first =
        Proxy::new(&proxy_settings, sender.clone(), metrics.clone())?.with_exchange_logs(exchange_logs.logs.clone());
    let readiness =
        first.upstream_addresses().into_iter().map(|(name, address)| ReadinessTarget { name, address }).collect();
    // Configuration errors the admin port would hit, found before anything serves.
    let admin_token = config.admin.token().map_err(|problem| ConfigError::new("admin.token_env", "", problem))?;
    if let Some(name) = &config.labels.token_env {
        if std::env::var(name).map_or(true, |token| token.trim().is_empty()) {
            return Err(ConfigError::new(
                "labels.token_env",
                "",
                format!("labels.token_env names `{name}`, which is not set or empty"),
            )
            .into());
        }
    }
    let worker = crate::worker::spawn(WorkerSettings::from(config.as_ref()), receiver, registry);
    let history = Arc::new(History::default());

    // The label store opens before the listeners serve when it can, so that the first
    // exchanges are recorded for their labels; one that takes longer (a large file to
    // convert, a slow Redis) finishes opening while the proxy already serves.
    let labels = Arc::new(Labels {
        route: PendingLabelsRoute::default(),
        service: std::sync::OnceLock::new(),
        link: std::sync::Mutex::new(None),
        problem: std::sync::Mutex::new("opening".to_string()),
        counters: LabelCounters::default(),
        dropped: LabelLink::register_dropped(registry),
        hooks: worker.hooks().clone(),
        files: FileSink::new(&config.output_dir),
        history: history.clone(),
        gauges: worker.model_gauges(),
    });
    labels.counters.register(registry);
    let label_settings = LabelSettings::from(config.as_ref());
    let mut opening = tokio::spawn(LabelService::open_counted(label_settings.clone(), labels.counters.clone()));
    // None: still opening; Some(None): open; Some(Some(problem)): it failed.
    let label_problem = match tokio::time::timeout(LABEL_STORE_WAIT, &mut opening).await {
        Ok(opened) => Some(joined(opened).and_then(|service| labels.attach(service)).err()),
        Err(_) => None,
    };

    let (stop, stopped) = watch::channel(false);
    let (grpc_addr, rest_addr, admin_addr) =
        (listeners.grpc.local_addr().ok(), listeners.rest.local_addr().ok(), listeners.admin.local_addr().ok());
    let runtime_error = |e: std::io::Error| ServeError::Runtime(format!("cannot share the listeners: {e}"));
    let grpc = listeners.grpc.into_std().map_err(runtime_error)?;
    let rest = listeners.rest.into_std().map_err(runtime_error)?;
    let threads = serving_threads();
    let mut proxy = Some(first);
    let mut finished = Vec::with_capacity(threads);
    let mut spreads =
        crate::proxy::listen::Spread::group(threads).into_iter().zip(crate::proxy::listen::Spread::group(threads));
    for index in 0..threads {
        let proxy = match proxy.take() {
            Some(first) => first,
            None => Proxy::new(&proxy_settings, sender.clone(), metrics.clone())?
                .with_exchange_logs(exchange_logs.logs.clone()),
        };
        let listeners = (
            crate::proxy::listen::for_thread(&grpc, index).map_err(runtime_error)?,
            crate::proxy::listen::for_thread(&rest, index).map_err(runtime_error)?,
        );
        let (done, done_seen) = oneshot::channel::<()>();
        finished.push(done_seen);
        let spread = spreads.next().expect("one part of each group per thread");
        spawn_serving_thread(index, proxy, listeners, spread, stopped.clone(), done)?;
    }
    // The serving threads hold the only listener handles and the only senders of the
    // capture queue now: the ports close and the queue ends when the threads do.
    drop((grpc, rest, sender));
    info!(
        message = "mltap serving.",
        grpc = ?grpc_addr, rest = ?rest_addr, admin = ?admin_addr,
        grpc_upstream = %config.grpc_upstream, rest_upstream = %config.rest_upstream,
        threads,
        max_connections = proxy_settings.connections.max(),
    );

    let monitoring = Arc::new(MonitoringHealth::default());
    // The dashboard's history starts from the files of earlier runs, loaded in the
    // background; live buckets are shown once it is loaded.
    let history_loaded = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let (history, output_dir, loaded) = (history.clone(), config.output_dir.clone(), history_loaded.clone());
        let hooks = worker.hooks().clone();
        tokio::spawn(async move {
            let report = {
                let history = history.clone();
                tokio::task::spawn_blocking(move || history.load_from_dir(&output_dir)).await.unwrap_or_default()
            };
            for skipped in &report.skipped {
                warn!(message = "A stored Anodot file was not loaded into the dashboard's history.", file = ?skipped);
            }
            hooks.add_bucket_listener(Arc::new(HistoryFeed(history)));
            loaded.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    }
    monitoring.add(
        "dashboard history",
        Box::new(move || (!history_loaded.load(std::sync::atomic::Ordering::Relaxed)).then(|| "loading".to_string())),
    );

    // A store still opening, or that failed to open, is finished in the background.
    let label_retry = match label_problem {
        Some(None) => None,
        Some(Some(problem)) => Some(tokio::spawn(labels.clone().open_later(Err(problem), label_settings))),
        None => Some(tokio::spawn(labels.clone().open_later(Ok(opening), label_settings))),
    };
    {
        let labels = labels.clone();
        monitoring.add("label store", Box::new(move || labels.health()));
    }
    let delivery = match delivery_settings(&config) {
        Ok(Some(settings)) => match Delivery::spawn(settings, &config.output_dir, registry) {
            Ok(delivery) => Some(delivery),
            Err(e) => {
                // The files are still written: `mltap send` can deliver them later.
                error!(message = "Anodot delivery cannot start; serving and writing files continue.", error = %e);
                let problem = format!("not running: {e}");
                monitoring.add("anodot delivery", Box::new(move || Some(problem.clone())));
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            let _ = stop.send(true);
            for done in finished {
                let _ = done.await;
            }
            return Err(e.into());
        }
    };

    let mut routes = routes;
    routes.push(Arc::new(labels.route.clone()));
    routes.extend(crate::admin::dashboard::routes(history.clone()));
    let admin = Arc::new(AdminServer::new(root, readiness, routes).with_monitoring(monitoring).with_token(admin_token));
    let admin_task = tokio::spawn(admin.serve(listeners.admin, stopped));

    shutdown.await;
    // Open SSE streams would otherwise hold the admin server's graceful stop.
    history.close();
    let _ = stop.send(true);
    let drained = tokio::time::timeout(config.shutdown_grace, async {
        for done in finished {
            let _ = done.await;
        }
        worker.finish().await;
        if let Some(retry) = &label_retry {
            retry.abort();
        }
        labels.finish().await;
        exchange_logs.finish().await;
    })
    .await;
    if let Some(delivery) = delivery {
        delivery.finish(config.shutdown_grace).await;
    }
    match drained {
        Ok(()) => info!(message = "Shut down: in-flight exchanges finished, capture queue drained."),
        Err(_) => warn!(
            message = "Shutdown grace expired before every exchange finished and the capture queue drained.",
            grace = ?config.shutdown_grace,
        ),
    }
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), admin_task).await;
    Ok(())
}
