//! End-to-end tests against a real kube-apiserver and etcd (or the `KUBECONFIG` cluster).
//! One control plane serves the whole run; each test works in its own namespace.

mod admission;
mod agent;
mod alerts;
mod chart;
mod controllers;
mod kernels;
mod leader;
mod rollouts;
mod training;

use std::any::Any;
use std::cell::RefCell;
use std::future::Future;
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kernelflow_e2e::env::{Process, Shared, shared, test_namespace};
use kube::api::{Api, Patch, PatchParams};

/// Tests share the machine; a test that measures timing runs alone (see [`setup_alone`]).
static MACHINE: RwLock<()> = RwLock::new(());

thread_local! {
    /// This test's guard on [`MACHINE`], released when its thread ends (each test runs on
    /// a thread of its own).
    static HOLD: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

/// A client and a fresh namespace for one test.
pub async fn setup(prefix: &str) -> (&'static Shared, kube::Client, String) {
    let guard = MACHINE.read().unwrap_or_else(PoisonError::into_inner);
    HOLD.with(|h| *h.borrow_mut() = Some(Box::new(guard)));
    namespace(prefix).await
}

/// Like [`setup`], but waits until no other test runs and keeps the machine to itself:
/// for tests whose verdict depends on timing (two cores under a full suite are no place to
/// compare latencies).
pub async fn setup_alone(prefix: &str) -> (&'static Shared, kube::Client, String) {
    let guard = MACHINE.write().unwrap_or_else(PoisonError::into_inner);
    HOLD.with(|h| *h.borrow_mut() = Some(Box::new(guard)));
    namespace(prefix).await
}

async fn namespace(prefix: &str) -> (&'static Shared, kube::Client, String) {
    let env = shared();
    let client = env
        .plane
        .client()
        .await
        .expect("a client for the test control plane");
    let ns = test_namespace(&client, prefix)
        .await
        .expect("creating the test namespace");
    (env, client, ns)
}

/// GPU-labelled Nodes `<ns>-<suffix>` (label `pool: <ns>` too), each with an agent that
/// reports every second, caches on disk and takes `extra` flags.
pub async fn gpu_nodes(
    env: &Shared,
    client: &kube::Client,
    ns: &str,
    suffixes: &[&str],
    extra: &[&str],
) -> Vec<Process> {
    let mut agents = Vec::new();
    for suffix in suffixes {
        let name = format!("{ns}-{suffix}");
        let labels = serde_json::json!({"pool": ns});
        agents.push(gpu_node(env, client, &name, labels, extra).await);
    }
    agents
}

/// GPU-labelled Node `name` with `labels` too (registered as a kubelet would), and its
/// agent, which reports every second, caches on disk and takes `extra` flags.
pub async fn gpu_node(
    env: &Shared,
    client: &kube::Client,
    name: &str,
    labels: serde_json::Value,
    extra: &[&str],
) -> Process {
    let labels = merged(
        serde_json::json!({"nvidia.com/gpu.present": "true"}),
        labels,
    );
    let node = serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}});
    Api::<Node>::all(client.clone())
        .patch(
            name,
            &PatchParams::apply("e2e").force(),
            &Patch::Apply(&node),
        )
        .await
        .expect("creating a node");
    let cache = env.logs.join(format!("cache-{name}"));
    let mut args = vec!["--node-name", name, "--report-interval-seconds", "1"];
    args.extend(["--cache-dir", cache.to_str().expect("a UTF-8 path")]);
    // Where `pack` writes the test's kernels and data sets.
    args.extend(["--file-root", env.logs.to_str().expect("a UTF-8 path")]);
    args.extend_from_slice(extra);
    env.spawn("kernelflow-agent", name, &args)
        .expect("starting an agent")
}

/// An operator that watches only `ns`, with a Lease of its own.
pub fn operator(env: &Shared, ns: &str) -> Process {
    operator_with(env, ns, &[])
}

/// [`operator`] with `extra` flags.
pub fn operator_with(env: &Shared, ns: &str, extra: &[&str]) -> Process {
    let lease = format!("kf-{ns}");
    let mut args = vec!["--watch-namespace", ns, "--lease-name", &lease];
    args.extend_from_slice(extra);
    env.spawn_operator(ns, &args)
        .expect("starting the operator")
}

/// Packs a kernel (see `pack_kernel`) into the logs directory; returns its file URL and
/// sha256.
pub fn pack(
    env: &Shared,
    name: &str,
    channels: u32,
    seed: u64,
    extra: &[&str],
) -> (String, String) {
    let out = env.logs.join(format!("{name}.safetensors"));
    let sha =
        kernelflow_e2e::env::pack_kernel(&out, channels, seed, extra).expect("packing a kernel");
    (format!("file://{}", out.display()), sha)
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A YAML document as JSON.
pub fn yaml(text: &str) -> serde_json::Value {
    serde_yaml::from_str(text).expect("valid YAML in the test")
}

/// A valid KernelDeployment named `name`.
pub fn kernel_deployment(name: &str) -> serde_json::Value {
    yaml(&format!(
        r#"
apiVersion: kernelflow.dev/v1alpha1
kind: KernelDeployment
metadata: {{name: {name}}}
spec:
  kernel:
    artifact: {{url: "https://artifacts.example/conv.safetensors", sha256: "{}"}}
    conv2d: {{inChannels: 64, outChannels: 64, kernelSize: [3, 3], padding: [1, 1]}}
    inputSize: [56, 56]
  nodeSelector: {{matchLabels: {{nvidia.com/gpu.present: "true"}}}}
  flags: {{asyncEnabled: true, streamPoolSize: 4}}
  rollout:
    steps: [{{trafficPercent: 1, pause: 30s}}, {{trafficPercent: 10, pause: 1m}}, {{trafficPercent: 50}}, {{trafficPercent: 100}}]
"#,
        "ab".repeat(32)
    ))
}

/// A valid AsyncTrainingJob named `name`.
pub fn training_job(name: &str) -> serde_json::Value {
    yaml(&format!(
        r#"
apiVersion: kernelflow.dev/v1alpha1
kind: AsyncTrainingJob
metadata: {{name: {name}}}
spec:
  model:
    layers:
    - {{name: conv1, conv2d: {{inChannels: 3, outChannels: 16, kernelSize: [3, 3], padding: [1, 1]}}}}
    - {{name: conv2, conv2d: {{inChannels: 16, outChannels: 3, kernelSize: [3, 3], padding: [1, 1]}}}}
  data: {{synthetic: {{shape: [3, 32, 32], samples: 256, seed: 7}}}}
  training: {{batchSize: 16, steps: 100, learningRate: 0.01, momentum: 0.9}}
  pipeline: {{mode: triple, prefetchDepth: 2, streams: 2}}
  placement: {{nodeSelector: {{matchLabels: {{nvidia.com/gpu.present: "true"}}}}, replicas: 1}}
"#
    ))
}

/// Deep-merges `patch` into `base` (objects merge, everything else replaces; null removes).
pub fn merged(mut base: serde_json::Value, patch: serde_json::Value) -> serde_json::Value {
    kernelflow_crds::apply_merge_patch(&mut base, patch);
    base
}
