//! The shared test environment: one control plane per test run with the CRDs installed and
//! the admission webhook serving, the kernelflow binaries as child processes, and a
//! namespace per test so that tests run in parallel.

use std::path::PathBuf;
use std::process::Child;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, ListParams, PostParams};

use crate::cluster::{ControlPlane, free_port, supervised, tail};

/// Label on every namespace a test creates, so that leftovers on a shared cluster can be found.
pub const TEST_LABEL: &str = "kernelflow.dev/e2e";

/// Namespace of the operator's own objects (Lease, webhook certificate).
pub const SYSTEM_NAMESPACE: &str = "kernelflow-system";

/// The environment every test of a run shares.
#[derive(Debug)]
pub struct Shared {
    pub plane: ControlPlane,
    /// Directory for the logs of processes started by tests.
    pub logs: PathBuf,
}

static SHARED: OnceLock<Result<Shared, String>> = OnceLock::new();

/// The run's environment, started on first use by a thread that lives as long as the test
/// process, so that its child processes do too (and no longer).
pub fn shared() -> &'static Shared {
    let result = SHARED.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("control-plane".into())
            .spawn(move || {
                let _ = tx.send(start_shared().map_err(|e| format!("{e:#}")));
                loop {
                    std::thread::park();
                }
            })
            .expect("spawning the control-plane thread");
        rx.recv()
            .unwrap_or_else(|_| Err("the control-plane thread died".into()))
    });
    match result {
        Ok(shared) => shared,
        Err(e) => panic!("the test control plane did not start: {e}"),
    }
}

impl Shared {
    /// Starts the local control plane (or takes the `KUBECONFIG` cluster) with a logs
    /// directory under the temp dir named `<tag>-<pid>`. Its children are tied to the
    /// calling thread: they end with it.
    pub fn start(tag: &str) -> anyhow::Result<Self> {
        let plane = ControlPlane::start()?;
        let logs = std::env::temp_dir()
            .join(format!("{tag}-{}", std::process::id()))
            .join("logs");
        std::fs::create_dir_all(&logs)?;
        Ok(Self { plane, logs })
    }
}

fn start_shared() -> anyhow::Result<Shared> {
    let Shared { plane, logs } = Shared::start("kernelflow")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        plane.install_crds().await?;
        let client = plane.client().await?;
        ensure_namespace(&client, SYSTEM_NAMESPACE, false).await?;
        if !plane.embedded {
            delete_leftover_namespaces(&client).await?;
        }
        anyhow::Ok(())
    })?;
    // One webhook server for the run; controllers are started by the tests that need them.
    let port = free_port()?;
    let shared = Shared { plane, logs };
    let webhook = shared.spawn_operator(
        "webhook",
        &[
            "--webhook-only",
            &format!("--webhook-addr=127.0.0.1:{port}"),
            &format!("--webhook-url=https://127.0.0.1:{port}"),
        ],
    )?;
    rt.block_on(shared.wait_for_webhook(webhook))?;
    Ok(shared)
}

impl Shared {
    /// Starts `kernelflow-operator` with `args` (plus the kubeconfig, the system namespace and
    /// a free metrics port). It is killed when the calling thread ends.
    pub fn spawn_operator(&self, name: &str, args: &[&str]) -> anyhow::Result<Process> {
        let mut all = vec!["--namespace", SYSTEM_NAMESPACE];
        all.extend_from_slice(args);
        self.spawn("kernelflow-operator", name, &all)
    }

    /// Starts a kernelflow binary with `args` and `--http-addr` on a free loopback port; it
    /// is killed when the calling thread ends.
    pub fn spawn(&self, binary: &str, name: &str, args: &[&str]) -> anyhow::Result<Process> {
        self.spawn_as(binary, name, args, &self.plane.kubeconfig)
    }

    /// [`Shared::spawn`] with another kubeconfig: another identity, e.g. a ServiceAccount's.
    pub fn spawn_as(
        &self,
        binary: &str,
        name: &str,
        args: &[&str],
        kubeconfig: &std::path::Path,
    ) -> anyhow::Result<Process> {
        let http = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let log = self.logs.join(format!("{name}-{}.log", http.port()));
        let child = supervised(&binary_path(binary)?, &log)?
            .arg(format!("--http-addr={http}"))
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .spawn()
            .with_context(|| format!("starting {binary}"))?;
        Ok(Process {
            child,
            log,
            name: name.into(),
            http,
        })
    }

    /// Waits until the webhook rejects an invalid object (a dry run, so nothing is stored).
    async fn wait_for_webhook(&self, mut webhook: Process) -> anyhow::Result<()> {
        let client = self.plane.client().await?;
        let api: Api<kernelflow_crds::KernelDeployment> = Api::namespaced(client, SYSTEM_NAMESPACE);
        let probe: kernelflow_crds::KernelDeployment = serde_json::from_value(serde_json::json!({
            "apiVersion": "kernelflow.dev/v1alpha1", "kind": "KernelDeployment",
            "metadata": {"name": "webhook-probe"},
            "spec": {
                "kernel": {"artifact": {"url": "file:///probe", "sha256": "0".repeat(64)},
                           "conv2d": {"inChannels": 1, "outChannels": 1, "kernelSize": [1, 1]}},
                "nodeSelector": {},
                "rollout": {"steps": [{"trafficPercent": 50}]}
            }
        }))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = webhook.child.try_wait()? {
                bail!(
                    "the webhook operator exited ({status}):\n{}",
                    tail(&webhook.log)
                );
            }
            match api
                .create(
                    &PostParams {
                        dry_run: true,
                        ..Default::default()
                    },
                    &probe,
                )
                .await
            {
                Err(kube::Error::Api(s)) if s.message.contains("admission webhook") => break,
                _ if Instant::now() > deadline => {
                    bail!(
                        "the admission webhook did not start rejecting in 60s:\n{}",
                        tail(&webhook.log)
                    )
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        // Lives as long as the control-plane thread.
        std::mem::forget(webhook);
        Ok(())
    }
}

/// A kernelflow process started by a test; killed on drop.
#[derive(Debug)]
pub struct Process {
    pub child: Child,
    pub log: PathBuf,
    pub name: String,
    /// Where it serves /healthz and /metrics.
    pub http: std::net::SocketAddr,
}

impl Process {
    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// GETs `path` from its HTTP server; `None` while it is not answering.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.http, path).await
    }

    /// The value of an unlabelled metric, once it is served.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics").await?;
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// Waits until its /readyz answers 200.
    pub async fn wait_ready(&self, timeout: std::time::Duration) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        while self.get("/readyz").await.map(|r| r.0) != Some(200) {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "{} is not ready after {timeout:?}:\n{}",
                self.name,
                self.log_tail()
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// The end of its log, for assertion messages.
    pub fn log_tail(&self) -> String {
        format!(
            "--- {} ({}):\n{}",
            self.name,
            self.log.display(),
            tail(&self.log)
        )
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// GETs `path` from `addr` over plain HTTP/1.0: status and body; `None` while nothing answers,
/// or nothing whole within 10 s (a process that takes the connection and hangs must not hang
/// the test).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        Some(response)
    };
    let response = tokio::time::timeout(std::time::Duration::from_secs(10), exchange)
        .await
        .ok()??;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// Path of a kernelflow binary: `$KERNELFLOW_BIN_DIR/<name>`, or beside the test executable's
/// target directory (built by `cargo build --workspace --bins`).
pub fn binary_path(name: &str) -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("KERNELFLOW_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe()?;
            let deps = exe.parent().context("test executable has no directory")?;
            // target/<profile>/deps/<test> for tests; target/<profile>/<bin> for binaries.
            if deps.ends_with("deps") {
                deps.parent().unwrap_or(deps).to_path_buf()
            } else {
                deps.to_path_buf()
            }
        }
    };
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} is missing: build it first with `cargo build --workspace --bins`",
            path.display()
        );
    }
    Ok(path)
}

/// Packs a `channels`->`channels` 3x3 conv2d kernel with padding 1 (random weights from
/// `seed`, more `kernelflow-pack` flags in `extra`) into `path` with `kernelflow-pack`, as
/// users do; returns its sha256.
pub fn pack_kernel(
    path: &std::path::Path,
    channels: u32,
    seed: u64,
    extra: &[&str],
) -> anyhow::Result<String> {
    let channels = channels.to_string();
    let out = std::process::Command::new(binary_path("kernelflow-pack")?)
        .args(["--in-channels", &channels, "--out-channels", &channels])
        .args(["--kernel-size", "3,3", "--padding", "1,1"])
        .args(["--seed", &seed.to_string()])
        .args(extra)
        .arg("--out")
        .arg(path)
        .output()?;
    if !out.status.success() {
        bail!(
            "kernelflow-pack failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8(out.stdout)?;
    let sha256 = stdout.lines().find_map(|l| l.strip_prefix("sha256: "));
    Ok(sha256
        .context("kernelflow-pack printed no digest")?
        .to_string())
}

/// Creates a namespace `<prefix>-<random>` labelled as a test namespace.
pub async fn test_namespace(client: &kube::Client, prefix: &str) -> anyhow::Result<String> {
    let name = format!("{prefix}-{:08x}", rand_u32());
    ensure_namespace(client, &name, true).await?;
    Ok(name)
}

/// Creates namespace `name` unless it exists; `test` labels it as a test namespace.
pub async fn ensure_namespace(client: &kube::Client, name: &str, test: bool) -> anyhow::Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    let mut ns = Namespace::default();
    ns.metadata.name = Some(name.into());
    if test {
        ns.metadata.labels = Some([(TEST_LABEL.to_string(), "true".to_string())].into());
    }
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Deletes test namespaces over an hour old: left by runs that were killed. Younger ones may
/// belong to a run going on beside this one.
async fn delete_leftover_namespaces(client: &kube::Client) -> anyhow::Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    let cutoff =
        k8s_openapi::jiff::Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_hours(1);
    for ns in api
        .list(&ListParams::default().labels(&format!("{TEST_LABEL}=true")))
        .await?
    {
        let old = ns
            .metadata
            .creation_timestamp
            .as_ref()
            .is_some_and(|t| t.0 < cutoff);
        if let Some(name) = ns.metadata.name.filter(|_| old) {
            api.delete(&name, &DeleteParams::default()).await?;
        }
    }
    Ok(())
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish() as u32
}
