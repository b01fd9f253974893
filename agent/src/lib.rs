//! The kernelflow node agent. Runs on every GPU node (a DaemonSet), learns its node from
//! `NODE_NAME`, warms kernels, runs the AsyncTrainingJob workers assigned to the node, and
//! publishes the node's `NodeReport`, the only kernelflow object it writes.

pub mod artifact;
pub mod compute;
mod files;
pub mod report;
pub mod rollout;
pub mod training;
pub mod warm;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use axum::{Router, extract::State, http::StatusCode, routing::get};
use prometheus::{Encoder, IntCounter, Registry, TextEncoder};
use tracing::{info, warn};

/// Field manager of everything the agent writes.
pub const FIELD_MANAGER: &str = kernelflow_crds::node_report::AGENT_FIELD_MANAGER;

/// How long a terminating agent waits for its training workers to checkpoint and stop: within
/// the 30 s a pod gets by default.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Limit on one write of the node report.
const REPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Command-line flags (each also read from the environment).
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "kernelflow-agent", version, about)]
pub struct Args {
    /// The node this agent serves (the downward API's spec.nodeName in the chart).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Address of /healthz and /metrics.
    #[arg(long, env = "KERNELFLOW_HTTP_ADDR", default_value = "0.0.0.0:8081")]
    pub http_addr: SocketAddr,
    /// Seconds between node reports; bounds the agent's write rate to the API server.
    #[arg(long, env = "KERNELFLOW_REPORT_INTERVAL", default_value_t = 10)]
    pub report_interval_seconds: u64,
    /// Directory of the on-disk kernel cache (a hostPath in the chart); none keeps memory only.
    #[arg(long, env = "KERNELFLOW_CACHE_DIR")]
    pub cache_dir: Option<std::path::PathBuf>,
    /// Directory under which `file://` artifacts and training data may be read; without
    /// it `file://` URLs are refused, as they could name any file the agent can read.
    #[arg(long, env = "KERNELFLOW_FILE_ROOT")]
    pub file_root: Option<std::path::PathBuf>,
    /// Bytes of kernels kept in memory, beyond those in use (served, or trained with).
    #[arg(long, env = "KERNELFLOW_MEMORY_CACHE_BYTES", default_value_t = 512 << 20)]
    pub memory_cache_bytes: usize,
    /// Bytes of kernel weights kept on the device (GPU memory; on the CPU backend they share
    /// the memory tier's), beyond those of the lanes running.
    #[arg(long, env = "KERNELFLOW_DEVICE_CACHE_BYTES", default_value_t = 2 << 30)]
    pub device_cache_bytes: usize,
    /// Bytes of artifacts kept on disk.
    #[arg(long, env = "KERNELFLOW_DISK_CACHE_BYTES", default_value_t = 10 << 30)]
    pub disk_cache_bytes: u64,
    /// Largest parameter count an artifact may hold.
    #[arg(long, env = "KERNELFLOW_MAX_PARAMETERS", default_value_t = 10_000_000)]
    pub max_parameters: usize,
    /// Shadow pairs per second per rollout in progress: identical inputs through canary and
    /// stable, so that analysis has data on an idle node (0 turns it off).
    #[arg(long, env = "KERNELFLOW_SHADOW_OPS_PER_SECOND", default_value_t = 20.0)]
    pub shadow_ops_per_second: f64,
    /// Shadow operations issued at once per revision: the load each stream pool is judged
    /// under.
    #[arg(long, env = "KERNELFLOW_SHADOW_CONCURRENCY", default_value_t = 4)]
    pub shadow_concurrency: usize,
    /// Synthetic conv2d traffic through each deployment's split, per second (demos and
    /// tests of the split; 0: none).
    #[arg(
        long,
        env = "KERNELFLOW_SYNTHETIC_OPS_PER_SECOND",
        default_value_t = 0.0
    )]
    pub synthetic_ops_per_second: f64,
    /// Seconds after which a conv2d operation counts as failed.
    #[arg(long, env = "KERNELFLOW_OP_TIMEOUT_SECONDS", default_value_t = 10.0)]
    pub op_timeout_seconds: f64,
    /// Directory of training checkpoints (default: `checkpoints` under the cache directory;
    /// without either, checkpoints stay in memory). Storage shared between nodes lets a
    /// worker moved to another node resume too.
    #[arg(long, env = "KERNELFLOW_CHECKPOINT_DIR")]
    pub checkpoint_dir: Option<std::path::PathBuf>,
    /// Compute backend: `cuda` when a GPU, cuBLAS and cuDNN are usable (auto) or required
    /// (cuda: the agent does not start without them), or `cpu`.
    #[arg(long, env = "KERNELFLOW_BACKEND", value_enum, default_value_t = compute::device::BackendChoice::Auto)]
    pub backend: compute::device::BackendChoice,
}

impl Args {
    fn checkpoint_dir(&self) -> Option<std::path::PathBuf> {
        self.checkpoint_dir
            .clone()
            .or_else(|| Some(self.cache_dir.as_ref()?.join("checkpoints")))
    }
}

/// The agent's metrics.
#[derive(Clone)]
struct Metrics {
    registry: Registry,
    reports: IntCounter,
    report_errors: IntCounter,
}

impl Metrics {
    fn new() -> Self {
        let registry =
            Registry::new_custom(Some("kernelflow_agent".into()), None).expect("a valid prefix");
        let reports =
            IntCounter::new("reports_total", "Node reports written.").expect("valid metric");
        let report_errors =
            IntCounter::new("report_errors_total", "Node reports that failed to write.")
                .expect("valid metric");
        registry
            .register(Box::new(reports.clone()))
            .expect("registered once");
        registry
            .register(Box::new(report_errors.clone()))
            .expect("registered once");
        Self {
            registry,
            reports,
            report_errors,
        }
    }

    fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

/// Logs a failed watch, which retries with backoff: an object that does not deserialize fails
/// every list of its kind, and unlogged, that would stop the node's work in silence.
pub(crate) fn watched<T>(kind: &str, r: Result<T, kube::runtime::watcher::Error>) {
    if let Err(error) = r {
        warn!(kind, %error, "watch failed; retrying");
    }
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(args: Args) -> anyhow::Result<()> {
    // object_store links aws-lc-rs beside kube's ring: pick one for the process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Opening the driver (loading libcuda, initialising the GPU) can take seconds: off the
    // runtime's threads.
    let choice = args.backend;
    let device = tokio::task::spawn_blocking(move || compute::device::detect(choice))
        .await
        .context("detecting the compute backend")?
        .context("choosing the compute backend")?;
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let metrics = Metrics::new();
    let backend = device.name();
    info!(node = %args.node_name, backend, "starting");
    // Ready once the caches have synced and a report has been written: a DaemonSet update
    // then moves on to the next node only when this one serves again.
    let ready = Arc::new(AtomicBool::new(false));
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(
                |State((_, ready)): State<(Metrics, Arc<AtomicBool>)>| async move {
                    match ready.load(Ordering::Relaxed) {
                        true => (StatusCode::OK, "ok"),
                        false => (StatusCode::SERVICE_UNAVAILABLE, "not ready"),
                    }
                },
            ),
        )
        .route(
            "/metrics",
            get(|State((m, _)): State<(Metrics, Arc<AtomicBool>)>| async move { m.render() }),
        )
        .with_state((metrics.clone(), ready.clone()));
    let listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .with_context(|| format!("binding {}", args.http_addr))?;
    let http = tokio::spawn(async move { axum::serve(listener, app).await });

    let cache_metrics = artifact::metrics::CacheMetrics::default();
    cache_metrics.register(&metrics.registry)?;
    let store_config = artifact::store::StoreConfig {
        memory_bytes: args.memory_cache_bytes,
        disk_dir: args.cache_dir.clone(),
        disk_bytes: args.disk_cache_bytes,
        file_root: args.file_root.clone(),
        limits: artifact::format::Limits::with_parameters(args.max_parameters),
        ..Default::default()
    };
    let store = artifact::store::KernelStore::new(store_config, cache_metrics.clone())
        .context("opening the kernel cache")?;
    let warmer = warm::Warmer::new(store.clone());
    let router = rollout::Router::new(
        rollout::RouterConfig {
            op_timeout: Duration::from_secs_f64(args.op_timeout_seconds.max(0.001)),
            shadow_ops_per_second: args.shadow_ops_per_second,
            shadow_concurrency: args.shadow_concurrency,
            device,
            device_cache_bytes: args.device_cache_bytes,
        },
        rollout::RolloutMetrics::new(&metrics.registry)?,
        cache_metrics,
    );
    let synced = Arc::new(AtomicBool::new(false));
    let warming = tokio::spawn(warm::run(
        client.clone(),
        args.node_name.clone(),
        warmer.clone(),
        router.clone(),
        synced.clone(),
    ));
    let shadow = tokio::spawn(router.clone().shadow_load());
    let traffic = tokio::spawn(
        router
            .clone()
            .synthetic_traffic(args.synthetic_ops_per_second),
    );

    let checkpoint_dir = args.checkpoint_dir();
    if checkpoint_dir.is_none() {
        warn!("no --checkpoint-dir or --cache-dir: checkpoints do not survive a restart");
    }
    let counters = training::metrics::Counters::default();
    counters.register(&metrics.registry)?;
    let trainer = training::Trainer::new(
        &args.node_name,
        training::Env {
            warmer: warmer.clone(),
            router: router.clone(),
            store,
            checkpoints: training::checkpoint::Checkpoints::new(checkpoint_dir),
            metrics: counters,
        },
    );
    metrics
        .registry
        .register(Box::new(training::metrics::WorkerMetrics::new(
            trainer.clone(),
        )))?;
    let training = tokio::spawn(training::run(client.clone(), trainer.clone()));

    let reporter = report::Reporter::new(client, &args.node_name, backend);
    // Bounded, so that a hung write does not hold the heartbeat up past the worker grace.
    let publish = || async {
        let mut kernels = warmer.report();
        router.annotate(&mut kernels);
        let write = reporter.publish(kernels, trainer.report());
        let written = match tokio::time::timeout(REPORT_TIMEOUT, write).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer in {REPORT_TIMEOUT:?}")),
        };
        match &written {
            Ok(()) => metrics.reports.inc(),
            Err(e) => {
                metrics.report_errors.inc();
                warn!(error = %e, "writing the node report failed");
            }
        }
        written.is_ok()
    };
    let mut tick = tokio::time::interval(Duration::from_secs(args.report_interval_seconds.max(1)));
    let reports = async {
        loop {
            tick.tick().await;
            if publish().await && synced.load(Ordering::Relaxed) {
                ready.store(true, Ordering::Relaxed);
            }
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let result: anyhow::Result<()> = tokio::select! {
        () = reports => Ok(()),
        r = http => r.map_err(Into::into).and_then(|r| r.map_err(Into::into)),
        r = warming => r.map_err(Into::into),
        r = shadow => r.map_err(Into::into),
        r = traffic => r.map_err(Into::into),
        r = training => r.map_err(Into::into),
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = term.recv() => Ok(()),
    };
    ready.store(false, Ordering::Relaxed);
    // Within the pod's 45 s of grace (the chart's), on a signal or a failed task alike:
    // workers that finish their step checkpoint and stop; the others are left to the
    // runtime's shutdown.
    if tokio::time::timeout(SHUTDOWN_GRACE, trainer.shut_down())
        .await
        .is_err()
    {
        warn!("training workers still running at shutdown; their last checkpoints stand");
    }
    // What the workers ended as (suspended, finished, checkpointed), for the operator.
    publish().await;
    if let Err(e) = &result {
        warn!(error = %e, "stopping after a failure");
    }
    info!("stopped");
    result
}
