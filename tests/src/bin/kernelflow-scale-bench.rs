//! Scale benchmark of the operator: simulated agents (node reports written directly) for
//! many nodes and KernelDeployments against the local API server. Measures the time from a
//! report that passes analysis to the step advancing, the operator's CPU seconds per
//! reconcile and its peak RSS.
//!
//! cargo build --release --bins && target/release/kernelflow-scale-bench [--nodes 100] [--deployments 1000]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kernelflow_crds::kernel_deployment::RolloutPhase;
use kernelflow_crds::node_report::{KernelReport, RevisionFigures, ShadowFigures};
use kernelflow_crds::{KernelDeployment, NodeReport, NodeReportSpec};
use kernelflow_e2e::env::{SYSTEM_NAMESPACE, Shared, ensure_namespace};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};

/// Nodes per selector group: each deployment selects one group.
const GROUP: usize = 10;
const NAMESPACE: &str = "scale-bench";
const SHA: &str = "5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e";

fn arg(name: &str, default: usize) -> anyhow::Result<usize> {
    std::env::args()
        .skip_while(|a| a != name)
        .nth(1)
        .map_or(Ok(default), |v| v.parse().context(name.to_string()))
}

fn main() -> anyhow::Result<()> {
    let (nodes, deployments) = (arg("--nodes", 100)?, arg("--deployments", 1000)?);
    let env = Shared::start("kernelflow-scale")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(bench(&env, nodes, deployments))
}

/// When a report carrying passing figures for a deployment's epoch was first written.
type Written = Arc<Mutex<BTreeMap<(String, u64), Instant>>>;

async fn bench(env: &Shared, nodes: usize, deployments: usize) -> anyhow::Result<()> {
    env.plane.install_crds().await?;
    let client = env.plane.client().await?;
    ensure_namespace(&client, SYSTEM_NAMESPACE, false).await?;
    ensure_namespace(&client, NAMESPACE, false).await?;
    let operator = env.spawn_operator(
        "scale-operator",
        &["--watch-namespace", NAMESPACE, "--lease-name", "kf-scale"],
    )?;
    operator.wait_ready(Duration::from_secs(60)).await?;
    let groups = nodes.div_ceil(GROUP);
    let node_api: Api<Node> = Api::all(client.clone());
    let pp = PatchParams::apply("scale-bench").force();
    for i in 0..nodes {
        let name = format!("scale-{i:04}");
        let node = serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {"scale-group": (i % groups).to_string()}}});
        node_api.patch(&name, &pp, &Patch::Apply(&node)).await?;
    }
    let kds: Api<KernelDeployment> = Api::namespaced(client.clone(), NAMESPACE);
    let created = Instant::now();
    for j in 0..deployments {
        let kd: KernelDeployment = serde_json::from_value(serde_json::json!({
            "apiVersion": "kernelflow.dev/v1alpha1", "kind": "KernelDeployment",
            "metadata": {"name": format!("kd-{j:05}")},
            "spec": {"kernel": {"artifact": {"url": "file:///scale/kernel.safetensors", "sha256": SHA},
                                "conv2d": {"inChannels": 8, "outChannels": 8, "kernelSize": [3, 3], "padding": [1, 1]}},
                     "nodeSelector": {"matchLabels": {"scale-group": (j % groups).to_string()}},
                     "flags": {"asyncEnabled": true},
                     "rollout": {"steps": [{"trafficPercent": 1, "pause": "0s"}, {"trafficPercent": 10, "pause": "0s"},
                                           {"trafficPercent": 50, "pause": "0s"}, {"trafficPercent": 100, "pause": "0s"}],
                                 "analysis": {"interval": "10s", "minSamples": 100}}}
        }))?;
        kds.create(&PostParams::default(), &kd).await?;
    }
    println!(
        "created {nodes} nodes and {deployments} deployments in {:?}",
        created.elapsed()
    );

    let written: Written = Arc::default();
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let watch = tokio::spawn(observe(kds.clone(), written.clone(), latencies.clone()));
    let reports: Api<NodeReport> = Api::all(client.clone());
    let started = Instant::now();
    loop {
        let all = kds.list(&Default::default()).await?.items;
        let healthy = all
            .iter()
            .filter(|kd| {
                kd.status
                    .as_ref()
                    .is_some_and(|s| s.phase == RolloutPhase::Healthy)
            })
            .count();
        if healthy == deployments {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(1800),
            "{healthy} of {deployments} healthy after 30 minutes"
        );
        simulate_agents(&reports, &all, nodes, groups, &written).await?;
        // Real agents report every 10 s by default; twice as often here.
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let took = started.elapsed();
    watch.abort();

    let mut l = latencies.lock().expect("latencies").clone();
    l.sort();
    let pct = |p: f64| l[((l.len() - 1) as f64 * p).round() as usize];
    let pid = operator.child.id();
    let (cpu, rss) = (cpu_seconds(pid)?, peak_rss_bytes(pid)?);
    let reconciles = operator
        .get("/metrics")
        .await
        .and_then(|(_, text)| {
            text.lines().find_map(|l| {
                l.strip_prefix(
                    "kernelflow_reconciliations_total{controller=\"kerneldeployment\"} ",
                )?
                .parse::<f64>()
                .ok()
            })
        })
        .context("the operator's reconcile count")?;
    println!("all {deployments} rollouts healthy after {took:.1?}");
    println!(
        "step advance after passing data: p50 {:.3?}, p99 {:.3?}, max {:.3?} ({} advances)",
        pct(0.5),
        pct(0.99),
        l[l.len() - 1],
        l.len()
    );
    println!(
        "operator: {cpu:.1} CPU s over {reconciles} reconciles = {:.2} ms per reconcile; peak RSS {:.1} MiB",
        cpu * 1e3 / reconciles,
        rss as f64 / (1 << 20) as f64
    );
    Ok(())
}

/// Writes each node's report: every deployment selecting it warm, with passing figures for
/// its current epoch.
async fn simulate_agents(
    reports: &Api<NodeReport>,
    kds: &[KernelDeployment],
    nodes: usize,
    groups: usize,
    written: &Written,
) -> anyhow::Result<()> {
    let passing = |epoch| KernelReport {
        namespace: NAMESPACE.into(),
        canary_sha256: SHA.into(),
        state: "Warm".into(),
        epoch: Some(epoch),
        canary: RevisionFigures {
            ops: 200,
            traffic_ops: 100,
            latency_seconds_sum: 0.2,
            ..Default::default()
        },
        stable: RevisionFigures {
            ops: 200,
            traffic_ops: 100,
            latency_seconds_sum: 0.2,
            ..Default::default()
        },
        shadow: ShadowFigures {
            pairs: 100,
            canary_seconds_sum: 0.1,
            stable_seconds_sum: 0.1,
            comparable: true,
            max_numeric_diff: Some(0.0),
        },
        ..Default::default()
    };
    let mut by_group: Vec<Vec<KernelReport>> = vec![Vec::new(); groups];
    for kd in kds {
        let Some(status) = &kd.status else { continue };
        let group: usize = kd
            .spec
            .node_selector
            .match_labels
            .as_ref()
            .and_then(|l| l.get("scale-group")?.parse().ok())
            .unwrap_or(0);
        let mut k = passing(status.step_epoch);
        k.name = kd.metadata.name.clone().unwrap_or_default();
        by_group[group].push(k);
    }
    // As agents write: the operator takes a report's age from this manager's last write.
    let pp = PatchParams::apply(kernelflow_crds::node_report::AGENT_FIELD_MANAGER).force();
    let writes = (0..nodes).map(|i| {
        let name = format!("scale-{i:04}");
        let kernels = by_group[i % groups].clone();
        let report = NodeReport::new(
            &name,
            NodeReportSpec {
                node_name: name.clone(),
                agent_version: "scale-bench".into(),
                backend: "simulated".into(),
                heartbeat_time: Time(Timestamp::now()),
                kernel_count: kernels.len() as u32,
                kernels,
                workers: Vec::new(),
            },
        );
        let pp = &pp;
        async move { reports.patch(&name, pp, &Patch::Apply(&report)).await }
    });
    // Timed from the start of the writes: the operator may act on the first one, and an
    // epoch recorded after it had already advanced would go unmeasured.
    let now = Instant::now();
    {
        let mut w = written.lock().expect("written");
        for k in by_group.iter().flatten() {
            w.entry((k.name.clone(), k.epoch.unwrap_or_default()))
                .or_insert(now);
        }
    }
    let results: Vec<_> = futures::stream::iter(writes)
        .buffer_unordered(16)
        .collect()
        .await;
    results.into_iter().try_for_each(|r| r.map(drop))?;
    Ok(())
}

/// Watches the deployments and records, for each epoch that ends, the time since passing
/// data for it was first written.
async fn observe(
    kds: Api<KernelDeployment>,
    written: Written,
    latencies: Arc<Mutex<Vec<Duration>>>,
) {
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    let mut events = std::pin::pin!(watcher(kds, watcher::Config::default()).applied_objects());
    while let Some(Ok(kd)) = events.next().await {
        let (name, Some(status)) = (kd.metadata.name.clone().unwrap_or_default(), kd.status) else {
            continue;
        };
        let previous = last.insert(name.clone(), status.step_epoch);
        if let Some(epoch) = previous.filter(|e| *e < status.step_epoch)
            && let Some(at) = written.lock().expect("written").get(&(name, epoch))
        {
            latencies.lock().expect("latencies").push(at.elapsed());
        }
    }
}

/// User plus system CPU seconds of process `pid`.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at state: utime and
    // stime are the 14th and 15th fields overall.
    let rest = stat.rsplit_once(')').context("a /proc stat line")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // USER_HZ is 100 on Linux.
    Ok(ticks / 100.0)
}

/// Peak resident set size of process `pid`.
fn peak_rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("VmHWM in /proc status")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()?;
    Ok(kib * 1024)
}
