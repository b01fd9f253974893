//! A real Kubernetes control plane on loopback: Debian's etcd and a kube-apiserver built from
//! Debian's sources (`scripts/install-control-plane.sh`), with token authentication and RBAC.
//! When `KUBECONFIG` names a cluster already (kind, k3d, a real one) that cluster is used.
//!
//! Every process started here gets SIGKILL when the thread that started it ends
//! (`setpriv --pdeathsig`), so nothing outlives the test run or demo, even on a panic,
//! Ctrl-C or SIGKILL.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};

/// Token of the local control plane's administrator (member of `system:masters`).
const ADMIN_TOKEN: &str = "kernelflow-admin-token";

/// A control plane to talk to: one this process started, or the `KUBECONFIG` cluster.
#[derive(Debug)]
pub struct ControlPlane {
    /// Kubeconfig for clients and for the processes the tests start.
    pub kubeconfig: PathBuf,
    /// True when this process started etcd and kube-apiserver.
    pub embedded: bool,
}

impl ControlPlane {
    /// Uses the `KUBECONFIG` cluster if one is set, or starts etcd and kube-apiserver and
    /// waits until they serve. Blocks; the processes live as long as the calling thread.
    pub fn start() -> anyhow::Result<Self> {
        if let Some(path) = std::env::var_os("KUBECONFIG").filter(|p| !p.is_empty()) {
            return Ok(Self {
                kubeconfig: PathBuf::from(path),
                embedded: false,
            });
        }
        let dir = state_dir()?;
        let apiserver = find_apiserver()?;
        let etcd =
            which("etcd").context("etcd is not installed: run scripts/install-control-plane.sh")?;

        let [client_port, peer_port, api_port] = free_ports()?;
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd = supervised(&etcd, &dir.join("etcd.log"))?
            .args(["--name", "kf", "--data-dir"])
            .arg(dir.join("etcd"))
            .args([
                "--listen-client-urls",
                &etcd_url,
                "--advertise-client-urls",
                &etcd_url,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args([
                "--initial-cluster",
                &format!("kf={peer_url}"),
                "--unsafe-no-fsync",
            ])
            .spawn()
            .context("starting etcd")?;

        write_pki(&dir)?;
        let mut api = supervised(&apiserver, &dir.join("kube-apiserver.log"))?
            .arg(format!("--etcd-servers={etcd_url}"))
            .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
            .arg(format!("--secure-port={api_port}"))
            .arg(format!("--cert-dir={}", dir.display()))
            .arg(format!(
                "--tls-cert-file={}",
                dir.join("apiserver.crt").display()
            ))
            .arg(format!(
                "--tls-private-key-file={}",
                dir.join("apiserver.key").display()
            ))
            .arg(format!(
                "--token-auth-file={}",
                dir.join("tokens.csv").display()
            ))
            .arg("--authorization-mode=RBAC")
            .arg(format!(
                "--service-account-key-file={}",
                dir.join("sa.pub").display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                dir.join("sa.key").display()
            ))
            .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
            .arg("--service-cluster-ip-range=10.0.0.0/24")
            // No kubelets or controller-manager here: no endpoint reconciling, and no
            // ServiceAccount admission (it waits for default service accounts nobody creates).
            .args([
                "--endpoint-reconciler-type=none",
                "--disable-admission-plugins=ServiceAccount",
            ])
            .args([
                "--enable-priority-and-fairness=false",
                "--insecure-port=0",
                "--allow-privileged=true",
            ])
            .spawn()
            .context("starting kube-apiserver")?;

        let kubeconfig = dir.join("kubeconfig");
        write_kubeconfig(
            &kubeconfig,
            api_port,
            &std::fs::read_to_string(dir.join("apiserver.crt"))?,
        )?;
        let plane = Self {
            kubeconfig,
            embedded: true,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        loop {
            for (name, child, log) in [
                ("etcd", &mut etcd, "etcd.log"),
                ("kube-apiserver", &mut api, "kube-apiserver.log"),
            ] {
                if let Some(status) = child.try_wait()? {
                    bail!("{name} exited ({status}):\n{}", tail(&dir.join(log)));
                }
            }
            if rt.block_on(plane.ready()) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver not ready after 60s:\n{}",
                    tail(&dir.join("kube-apiserver.log"))
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // The children are reaped by the kernel after this process ends; forgetting the
        // handles keeps Rust from waiting on them.
        std::mem::forget((etcd, api));
        Ok(plane)
    }

    async fn ready(&self) -> bool {
        match self.client().await {
            Ok(c) => c
                .request_text(http_get("/readyz"))
                .await
                .is_ok_and(|body| body.trim() == "ok"),
            Err(_) => false,
        }
    }

    /// A client for this control plane, as the administrator.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        // The workspace links both rustls providers (kube's ring, object_store's aws-lc-rs).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kc = Kubeconfig::read_from(&self.kubeconfig)?;
        let config =
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// Applies the kernelflow CRDs (server-side) and waits until they are established.
    pub async fn install_crds(&self) -> anyhow::Result<()> {
        let client = self.client().await?;
        let api: Api<CustomResourceDefinition> = Api::all(client);
        let pp = PatchParams::apply("kernelflow-e2e").force();
        for (_, crd) in kernelflow_crds::crds() {
            let name = crd.metadata.name.clone().unwrap_or_default();
            api.patch(&name, &pp, &Patch::Apply(&crd)).await?;
            let established = await_condition(api.clone(), &name, conditions::is_crd_established());
            tokio::time::timeout(Duration::from_secs(30), established)
                .await
                .with_context(|| format!("CRD {name} not established in 30s"))??;
        }
        Ok(())
    }
}

fn http_get(path: &str) -> http::Request<Vec<u8>> {
    http::Request::get(path)
        .body(Vec::new())
        .expect("a valid request")
}

/// A command whose process gets SIGKILL when the calling thread ends, logging to `log`.
pub fn supervised(program: &Path, log: &Path) -> anyhow::Result<Command> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = Command::new("setpriv");
    cmd.args(["--pdeathsig", "KILL", "--"])
        .arg(program)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    Ok(cmd)
}

/// Where a process's state lives: `$TMPDIR/kernelflow-<pid>`, removed for runs that are gone
/// (with their other `kernelflow-<pid>-…` directories, as Prometheus's).
fn state_dir() -> anyhow::Result<PathBuf> {
    let base = std::env::temp_dir();
    for entry in std::fs::read_dir(&base)?.flatten() {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_prefix("kernelflow-"))
            .and_then(|p| p.split('-').next()?.parse::<u32>().ok());
        if pid.is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    let dir = base.join(format!("kernelflow-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn find_apiserver() -> anyhow::Result<PathBuf> {
    tool("kube-apiserver").context("set KUBECONFIG to use a cluster instead")
}

/// A tool that `make deps` installs: from its cache (`$KERNELFLOW_CACHE/bin`, default
/// `~/.cache/kernelflow/bin`), else from `PATH`.
pub fn tool(name: &str) -> anyhow::Result<PathBuf> {
    let cache = std::env::var_os("KERNELFLOW_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/kernelflow")));
    cache
        .map(|c| c.join("bin").join(name))
        .filter(|p| p.exists())
        .or_else(|| which(name))
        .with_context(|| format!("{name} not found: run `make deps`"))
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A port free now on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(free_ports::<1>()?[0])
}

/// `N` distinct ports free now on 127.0.0.1: each held until all are picked.
pub fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    let held = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    let mut ports = [0; N];
    for (port, l) in ports.iter_mut().zip(&held) {
        *port = l.local_addr()?.port();
    }
    Ok(ports)
}

fn write_pki(dir: &Path) -> anyhow::Result<()> {
    let key = rcgen::KeyPair::generate()?;
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])?;
    let cert = params.self_signed(&key)?;
    std::fs::write(dir.join("apiserver.crt"), cert.pem())?;
    std::fs::write(dir.join("apiserver.key"), key.serialize_pem())?;
    let sa = rcgen::KeyPair::generate()?;
    std::fs::write(dir.join("sa.key"), sa.serialize_pem())?;
    std::fs::write(dir.join("sa.pub"), sa.public_key_pem())?;
    std::fs::write(
        dir.join("tokens.csv"),
        format!("{ADMIN_TOKEN},kernelflow-admin,kernelflow-admin,system:masters\n"),
    )?;
    Ok(())
}

fn write_kubeconfig(path: &Path, port: u16, ca_pem: &str) -> anyhow::Result<()> {
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let yaml = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: kernelflow\n  cluster:\n    server: https://127.0.0.1:{port}\n    certificate-authority-data: {ca}\nusers:\n- name: admin\n  user:\n    token: {ADMIN_TOKEN}\ncontexts:\n- name: kernelflow\n  context: {{cluster: kernelflow, user: admin}}\ncurrent-context: kernelflow\n",
        ca = b64(ca_pem.as_bytes()),
    );
    std::fs::write(path, yaml)?;
    Ok(())
}

/// The last lines of a log, for error messages.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
