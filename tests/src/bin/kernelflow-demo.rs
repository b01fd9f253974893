//! The local demo: a real control plane (or the `KUBECONFIG` cluster), the operator, three
//! agents standing for three GPU nodes, and the examples applied, with a live view of the
//! resources. Ctrl-C stops everything it started.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use k8s_openapi::api::core::v1::Node;
use kernelflow_crds::{AsyncTrainingJob, KernelDeployment, NodeReport};
use kernelflow_e2e::cluster::free_port;
use kernelflow_e2e::env::{SYSTEM_NAMESPACE, Shared};
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::ApiResource;

const NODES: [&str; 3] = ["gpu-node-a", "gpu-node-b", "gpu-node-c"];
const NAMESPACE: &str = "default";

fn main() -> anyhow::Result<()> {
    let seconds = std::env::args()
        .skip_while(|a| a != "--duration")
        .nth(1)
        .map(|s| s.parse::<u64>())
        .transpose()?;
    // Children are tied to this (main) thread: they end when the demo does.
    let env = Shared::start("kernelflow")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(demo(&env, seconds.map(Duration::from_secs)))
}

async fn demo(env: &Shared, duration: Option<Duration>) -> anyhow::Result<()> {
    println!(
        "control plane: {} (kubeconfig {})",
        if env.plane.embedded {
            "embedded etcd + kube-apiserver"
        } else {
            "KUBECONFIG cluster"
        },
        env.plane.kubeconfig.display()
    );
    env.plane.install_crds().await?;
    let client = env.plane.client().await?;
    kernelflow_e2e::env::ensure_namespace(&client, SYSTEM_NAMESPACE, false).await?;

    let port = free_port()?;
    let operator = env.spawn_operator(
        "operator",
        &[
            &format!("--webhook-addr=127.0.0.1:{port}"),
            &format!("--webhook-url=https://127.0.0.1:{port}"),
        ],
    )?;
    let mut agents = Vec::new();
    let nodes: Api<Node> = Api::all(client.clone());
    for name in NODES {
        let node = serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"nvidia.com/gpu.present": "true", "kernelflow.dev/demo": "true"}},
        });
        nodes
            .patch(
                name,
                &PatchParams::apply("kernelflow-demo").force(),
                &Patch::Apply(&node),
            )
            .await?;
        agents.push(env.spawn(
            "kernelflow-agent",
            name,
            &[
                "--node-name",
                name,
                "--report-interval-seconds",
                "2",
                "--synthetic-ops-per-second",
                "50",
            ],
        )?);
    }
    operator.wait_ready(Duration::from_secs(60)).await?;

    let (url, sha256) = serve_artifact(env).await?;
    println!("serving a packed kernel artifact at {url} (sha256 {sha256})");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    for file in ["kerneldeployment.yaml", "asynctrainingjob.yaml"] {
        // The example names a placeholder artifact; the demo points it at the one it serves,
        // on smaller inputs and with shorter steps (ending in a pause, not a wait for a
        // promote) so that the whole rollout walks by in about a minute on a laptop.
        let step = |pct: u8| serde_json::json!({"trafficPercent": pct, "pause": "10s"});
        let artifact = serde_json::json!({"spec": {
            "kernel": {"artifact": {"url": url, "sha256": sha256}, "inputSize": [16, 16]},
            "rollout": {"steps": [step(1), step(10), step(50), step(100)],
                        "analysis": {"interval": "5s", "maxOverheadRatio": 1.5}}}});
        let patch = (file == "kerneldeployment.yaml").then_some(artifact);
        apply(&client, &examples.join(file), patch)
            .await
            .with_context(|| format!("applying examples/{file}"))?;
        println!("applied examples/{file}");
    }
    println!("operator metrics: http://{}/metrics", operator.http);
    for (name, agent) in NODES.iter().zip(&agents) {
        println!("agent {name} metrics: http://{}/metrics", agent.http);
    }
    println!("logs: {}", env.logs.display());
    println!(
        "kubectl: KUBECONFIG={} kubectl get kd,atj,nr",
        env.plane.kubeconfig.display()
    );
    println!(
        "rollout tree: KUBECONFIG={} target/debug/kubectl-kernelflow get resnet-conv3x3 --watch",
        env.plane.kubeconfig.display()
    );
    println!("Press Ctrl-C to stop; everything started here stops with it.\n");

    let live = std::io::stdout().is_terminal();
    let started = Instant::now();
    let mut last = String::new();
    loop {
        let view = render(&client).await?;
        if live {
            print!("\x1b[J{view}\x1b[{}A", view.lines().count());
            std::io::Write::flush(&mut std::io::stdout())?;
        } else if view != last {
            println!("{view}");
        }
        last = view;
        if duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        for p in std::iter::once(&operator).chain(&agents) {
            anyhow::ensure!(
                p.get("/healthz").await.is_some(),
                "{} stopped:\n{}",
                p.name,
                p.log_tail()
            );
        }
    }
    if live {
        println!("{last}");
    }
    println!("stopping");
    Ok(())
}

/// Packs the example's 64->64 3x3 kernel with `kernelflow-pack` and serves it over HTTP on
/// loopback, as an artifact store would.
async fn serve_artifact(env: &Shared) -> anyhow::Result<(String, String)> {
    let file = env.logs.join("conv3x3-64.safetensors");
    let sha256 = kernelflow_e2e::env::pack_kernel(&file, 64, 7, &[])?;
    let body = std::sync::Arc::new(std::fs::read(&file)?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut sock, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(head.as_bytes()).await;
                let _ = sock.write_all(&body).await;
            });
        }
    });
    Ok((format!("http://{addr}/conv3x3-64.safetensors"), sha256))
}

async fn apply(
    client: &kube::Client,
    path: &Path,
    patch: Option<serde_json::Value>,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)?;
    let mut value: serde_json::Value = serde_yaml::from_str(&text)?;
    if let Some(patch) = patch {
        kernelflow_crds::apply_merge_patch(&mut value, patch);
    }
    let object: DynamicObject = serde_json::from_value(value)?;
    let types = object.types.clone().context("no apiVersion/kind")?;
    let gvk = GroupVersionKind::try_from(&types)?;
    let plural = format!("{}s", gvk.kind.to_lowercase());
    let api: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        NAMESPACE,
        &ApiResource::from_gvk_with_plural(&gvk, &plural),
    );
    let name = object.metadata.name.clone().context("no name")?;
    api.patch(
        &name,
        &PatchParams::apply("kernelflow-demo").force(),
        &Patch::Apply(&object),
    )
    .await?;
    Ok(())
}

/// A table of the demo's resources.
async fn render(client: &kube::Client) -> anyhow::Result<String> {
    let lp = ListParams::default();
    let mut out =
        String::from("KERNELDEPLOYMENT            PHASE        STEP  TRAFFIC  WARM  KERNEL\n");
    let mut epochs = BTreeMap::new();
    for kd in Api::<KernelDeployment>::namespaced(client.clone(), NAMESPACE)
        .list(&lp)
        .await?
    {
        let s = kd.status.unwrap_or_default();
        let step = s.current_step_index.map_or("-".into(), |i| i.to_string());
        let kernel = s
            .conditions
            .iter()
            .find(|c| c.type_ == "KernelReady")
            .map_or("-".into(), |c| c.reason.clone());
        out += &format!(
            "{:<27} {:<12} {:<5} {:>6}%  {}/{}   {}\n",
            kd.metadata.name.clone().unwrap_or_default(),
            format!("{:?}", s.phase),
            step,
            s.traffic_percent,
            s.nodes.warmed,
            s.nodes.selected,
            kernel
        );
        if let Some(verdict) = s.analysis.as_ref().and_then(|a| a.verdict.as_ref()) {
            out += &format!("  analysis: {verdict}\n");
        }
        epochs.insert(kd.metadata.name.unwrap_or_default(), s.step_epoch);
    }
    out += "\nASYNCTRAININGJOB            PHASE        PROGRESS  LOSS      SAMPLES/S  RESTARTS  ACCEPTED\n";
    for job in Api::<AsyncTrainingJob>::namespaced(client.clone(), NAMESPACE)
        .list(&lp)
        .await?
    {
        let s = job.status.unwrap_or_default();
        out += &format!(
            "{:<27} {:<12} {:<9} {:<9} {:<10.0} {:<9} {}\n",
            job.metadata.name.unwrap_or_default(),
            format!("{:?}", s.phase),
            s.progress.unwrap_or_else(|| "-".into()),
            s.last_loss.map_or("-".into(), |l| format!("{l:.5}")),
            s.throughput,
            s.restarts,
            accepted(&s.conditions)
        );
    }
    out +=
        "\nNODE                        BACKEND  KERNELS  HEARTBEAT  THIS STEP: CANARY/STABLE OPS\n";
    let reports: BTreeMap<String, NodeReport> = Api::<NodeReport>::all(client.clone())
        .list(&lp)
        .await?
        .into_iter()
        .map(|r| (r.spec.node_name.clone(), r))
        .collect();
    let now = k8s_openapi::jiff::Timestamp::now();
    for node in NODES {
        match reports.get(node) {
            Some(r) => {
                let age = now.duration_since(r.spec.heartbeat_time.0).as_secs();
                let split: Vec<String> = r
                    .spec
                    .kernels
                    .iter()
                    .filter(|k| k.epoch.is_some() && k.epoch == epochs.get(&k.name).copied())
                    .map(|k| {
                        format!(
                            "{} {}/{}",
                            k.name, k.canary.traffic_ops, k.stable.traffic_ops
                        )
                    })
                    .collect();
                out += &format!(
                    "{node:<27} {:<8} {:<8} {:<10} {}\n",
                    r.spec.backend,
                    r.spec.kernel_count,
                    format!("{age}s ago"),
                    split.join(", ")
                );
            }
            None => out += &format!("{node:<27} (no report yet)\n"),
        }
    }
    Ok(out)
}

fn accepted(conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition]) -> String {
    conditions
        .iter()
        .find(|c| c.type_ == "Accepted")
        .map_or("-".into(), |c| {
            if c.status == "True" {
                "yes".into()
            } else {
                format!("no: {}", c.message)
            }
        })
}
