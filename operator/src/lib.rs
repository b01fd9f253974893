//! The kernelflow operator: reconciles KernelDeployments and AsyncTrainingJobs while it holds
//! the leader Lease, serves the validating admission webhook on every replica, and exports
//! health and Prometheus metrics.

pub mod controller;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod nodes;
pub mod plugin;
pub mod rollout;
pub mod telemetry;
pub mod training;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use axum::http::StatusCode;
use axum::{Router, extract::State, routing::get};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use tracing::info;

use crate::metrics::Metrics;

/// Field manager of everything the operator writes by server-side apply.
pub const FIELD_MANAGER: &str = "kernelflow-operator";

/// How often a mounted webhook certificate is checked for renewal; the kubelet itself takes
/// up to a minute or so to update a Secret volume.
const CERT_DIR_PERIOD: std::time::Duration = std::time::Duration::from_secs(30);

/// Command-line flags (each also read from a `KERNELFLOW_*` environment variable).
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "kernelflow-operator", version, about)]
pub struct Args {
    /// Namespace of the operator's own objects: the leader Lease and the webhook certificate.
    #[arg(
        long,
        env = "KERNELFLOW_NAMESPACE",
        default_value = "kernelflow-system"
    )]
    pub namespace: String,
    /// Reconcile only this namespace (default: all).
    #[arg(long, env = "KERNELFLOW_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// This replica's name in the Lease (default: POD_NAME, else host name and process id).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "KERNELFLOW_LEASE_NAME",
        default_value = "kernelflow-operator"
    )]
    pub lease_name: String,
    /// Seconds a leader's Lease lasts without renewal; a standby takes over after it. At
    /// least 3: the leader renews a third of it before expiry.
    #[arg(long, env = "KERNELFLOW_LEASE_DURATION", default_value_t = 15,
          value_parser = clap::value_parser!(u64).range(3..))]
    pub lease_duration_seconds: u64,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "KERNELFLOW_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// Address the admission webhook listens on (TLS).
    #[arg(long, env = "KERNELFLOW_WEBHOOK_ADDR", default_value = "0.0.0.0:9443")]
    pub webhook_addr: SocketAddr,
    /// URL the API server calls the webhook at, for an operator outside the cluster.
    #[arg(
        long,
        env = "KERNELFLOW_WEBHOOK_URL",
        conflicts_with = "webhook_service"
    )]
    pub webhook_url: Option<String>,
    /// Service (in `--namespace`, port 443) the API server calls the webhook through.
    #[arg(long, env = "KERNELFLOW_WEBHOOK_SERVICE")]
    pub webhook_service: Option<String>,
    /// Serve the webhook with the `tls.crt` and `tls.key` in this directory (a mounted Secret,
    /// e.g. from cert-manager), reloading them when they change. The operator then creates
    /// no CA and no ValidatingWebhookConfiguration: whoever issues the certificate provides
    /// both (cert-manager's CA injector fills in the CA bundle).
    #[arg(
        long,
        env = "KERNELFLOW_WEBHOOK_CERT_DIR",
        conflicts_with_all = ["webhook_url", "webhook_service"]
    )]
    pub webhook_cert_dir: Option<std::path::PathBuf>,
    /// Secret (in `--namespace`) that keeps the self-signed webhook CA and certificate.
    #[arg(long, env = "KERNELFLOW_WEBHOOK_SECRET", default_value = webhook::SECRET_NAME)]
    pub webhook_secret: String,
    /// ValidatingWebhookConfiguration the operator writes for `--webhook-url` or
    /// `--webhook-service`.
    #[arg(
        long,
        env = "KERNELFLOW_WEBHOOK_CONFIGURATION",
        default_value = webhook::CONFIGURATION_NAME
    )]
    pub webhook_configuration: String,
    /// Serve only the webhook: no leader election, no controllers.
    #[arg(long, env = "KERNELFLOW_WEBHOOK_ONLY")]
    pub webhook_only: bool,
    /// Reconciles run at once per controller.
    #[arg(long, env = "KERNELFLOW_CONCURRENCY", default_value_t = 16)]
    pub concurrency: u16,
    /// Apply the CRDs at start-up (for local use; in clusters the chart installs them).
    #[arg(long, env = "KERNELFLOW_INSTALL_CRDS")]
    pub install_crds: bool,
    /// Seconds a node's agent may go without reporting before its training workers are
    /// restarted on other nodes (counted against the job's backoffLimit).
    #[arg(long, env = "KERNELFLOW_WORKER_GRACE_SECONDS", default_value_t = 60)]
    pub worker_grace_seconds: u64,
    /// Seconds the webhook goes on serving after SIGTERM, reported not ready, while the
    /// Service's endpoints drop this pod: with `failurePolicy: Fail`, a webhook that stopped
    /// at once would refuse users' writes during every rollout of the operator. The Lease is
    /// released first, so a standby takes over the controllers meanwhile.
    #[arg(long, env = "KERNELFLOW_SHUTDOWN_DELAY_SECONDS", default_value_t = 5)]
    pub shutdown_delay_seconds: u64,
}

impl Args {
    fn webhook_target(&self) -> Option<webhook::Target> {
        match (&self.webhook_url, &self.webhook_service) {
            (Some(url), _) => Some(webhook::Target::Url(url.clone())),
            (None, Some(name)) => Some(webhook::Target::Service {
                name: name.clone(),
                namespace: self.namespace.clone(),
            }),
            (None, None) => None,
        }
    }

    fn identity(&self) -> String {
        self.identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        })
    }
}

/// Runs the operator until SIGINT or SIGTERM.
pub async fn run(args: Args) -> anyhow::Result<()> {
    // kube and the webhook both use rustls; both are built with ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let identity = args.identity();
    let metrics = Metrics::default();
    let ready = Arc::new(AtomicBool::new(false));
    info!(%identity, version = env!("CARGO_PKG_VERSION"), "starting");
    if args.webhook_only && args.webhook_target().is_none() && args.webhook_cert_dir.is_none() {
        anyhow::bail!(
            "--webhook-only needs --webhook-url, --webhook-service or --webhook-cert-dir"
        );
    }

    if args.install_crds {
        install_crds(&client).await?;
    }
    let http = tokio::spawn(serve_http(args.http_addr, metrics.clone(), ready.clone()));
    let webhook = match (&args.webhook_cert_dir, args.webhook_target()) {
        (Some(dir), _) => {
            // Fail at start-up, not in the task, when the mount lacks the files.
            webhook::read_cert_dir(dir)?;
            let (addr, dir, metrics) = (args.webhook_addr, dir.clone(), metrics.clone());
            info!(addr = %addr, dir = %dir.display(), "admission webhook serving");
            Some(tokio::spawn(async move {
                webhook::serve_cert_dir(addr, &dir, CERT_DIR_PERIOD, metrics).await
            }))
        }
        (None, Some(target)) => {
            let cert = webhook::ensure_certificate(
                &client,
                &args.namespace,
                &args.webhook_secret,
                &target,
            )
            .await?;
            let server = tokio::spawn({
                let (addr, cert, metrics) = (args.webhook_addr, cert.clone(), metrics.clone());
                async move { webhook::serve(addr, &cert, metrics).await }
            });
            webhook::register(&client, &args.webhook_configuration, &target, &cert.ca).await?;
            info!(addr = %args.webhook_addr, "admission webhook serving");
            Some(server)
        }
        (None, None) => None,
    };
    ready.store(true, Ordering::Relaxed);
    let serves_webhook = webhook.is_some();

    let work = async {
        if args.webhook_only {
            shutdown_signal().await;
            return Ok(());
        }
        let lease = leader::LeaseConfig {
            namespace: &args.namespace,
            name: &args.lease_name,
            identity: &identity,
            duration_seconds: args.lease_duration_seconds,
        };
        let controllers = || {
            let (namespace, concurrency) = (args.watch_namespace.clone(), args.concurrency);
            let training = training::Settings {
                grace: std::time::Duration::from_secs(args.worker_grace_seconds.max(1)),
            };
            controller::run(
                client.clone(),
                identity.clone(),
                metrics.clone(),
                namespace,
                concurrency,
                training,
            )
        };
        leader::lead(&client, lease, &metrics, controllers, shutdown_signal()).await
    };
    let result = tokio::select! {
        r = work => r,
        r = http => r.context("http server task")?.context("http server"),
        r = async { webhook.expect("guarded").await }, if webhook.is_some() => r.context("webhook task")?.context("webhook server"),
    };
    // Stopped by a signal: the webhook's task (detached, not dropped) serves on meanwhile.
    if result.is_ok() && serves_webhook && args.shutdown_delay_seconds > 0 {
        ready.store(false, Ordering::Relaxed);
        let seconds = args.shutdown_delay_seconds;
        info!(
            seconds,
            "not ready; the webhook serves on while this pod leaves its endpoints"
        );
        tokio::time::sleep(std::time::Duration::from_secs(seconds)).await;
    }
    info!("stopped");
    result
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn install_crds(client: &kube::Client) -> anyhow::Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (_, crd) in kernelflow_crds::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await?;
        info!(crd = name, "installed");
    }
    Ok(())
}

#[derive(Clone)]
struct HttpState {
    metrics: Metrics,
    ready: Arc<AtomicBool>,
}

async fn serve_http(
    addr: SocketAddr,
    metrics: Metrics,
    ready: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(|State(s): State<HttpState>| async move { s.metrics.render() }),
        )
        .with_state(HttpState { metrics, ready });
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    info!(%addr, "serving /healthz, /readyz and /metrics");
    axum::serve(listener, app).await?;
    Ok(())
}

async fn readyz(State(s): State<HttpState>) -> (StatusCode, &'static str) {
    if s.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::Args;

    #[test]
    fn a_lease_too_short_to_renew_is_refused() {
        let parse =
            |d: &str| Args::try_parse_from(["kernelflow-operator", "--lease-duration-seconds", d]);
        let err = parse("2").unwrap_err().to_string();
        assert!(err.contains("--lease-duration-seconds"), "{err}");
        assert_eq!(parse("3").unwrap().lease_duration_seconds, 3);
    }
}
