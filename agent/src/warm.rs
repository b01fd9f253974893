//! Warming: every KernelDeployment whose `nodeSelector` matches this node's labels gets its
//! kernels (the spec's artifact, and the stable revision's when that differs) fetched,
//! verified, validated and loaded ahead of traffic. Failures are reported with their reason
//! and retried with backoff; kernels already warm keep serving.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kernelflow_crds::node_report::KernelReport;
use kernelflow_crds::{ArtifactRef, Conv2dSpec, KernelDeployment, validate};
use kube::api::Api;
use kube::core::{Selector, SelectorExt};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};

use crate::artifact::format::{ArtifactError, Kernel};
use crate::artifact::store::KernelStore;
use crate::rollout::Router;

/// A kernel's state on this node.
#[derive(Clone, Debug)]
enum State {
    Warming,
    Warm(Arc<Kernel>),
    Failed {
        error: ArtifactError,
        attempts: u32,
        retry_at: Instant,
    },
}

#[derive(Clone, Debug)]
struct Entry {
    artifact: ArtifactRef,
    conv2d: Conv2dSpec,
    state: State,
}

/// A KernelDeployment's namespace, name and artifact digest.
type Key = (String, String, String);

/// The kernels this node should serve, and where each stands.
pub struct Warmer {
    store: Arc<KernelStore>,
    entries: Mutex<BTreeMap<Key, Entry>>,
    /// Each selected deployment's spec digest: the kernel its report is about.
    primary: Mutex<BTreeMap<(String, String), String>>,
    /// When the warm kernels' disk copies were last marked used.
    touched: Mutex<Option<Instant>>,
}

/// How often warm kernels mark their disk copies used: served from memory, they would
/// otherwise look unused to the disk cache, and be evicted first.
const TOUCH_EVERY: Duration = Duration::from_secs(600);

/// Whether `kd` selects a node with `labels` and is not being deleted.
pub fn selects(kd: &KernelDeployment, labels: &BTreeMap<String, String>) -> bool {
    kd.metadata.deletion_timestamp.is_none()
        && Selector::try_from(kd.spec.node_selector.clone()).is_ok_and(|s| s.matches(labels))
}

/// Wait before retry `attempts` (1-based): doubling from 2 s, capped at a minute for store
/// failures and at five for artifacts that failed validation (their bytes rarely change).
fn retry_delay(error: &ArtifactError, attempts: u32) -> Duration {
    let cap = if error.retryable() { 60 } else { 300 };
    Duration::from_secs((2u64 << attempts.saturating_sub(1).min(8)).min(cap))
}

impl Warmer {
    pub fn new(store: Arc<KernelStore>) -> Arc<Self> {
        Arc::new(Self {
            store,
            entries: Mutex::default(),
            primary: Mutex::default(),
            touched: Mutex::default(),
        })
    }

    /// Brings the entries in line with the KernelDeployments selecting a node with `labels`,
    /// starting warm-ups that are due.
    pub fn sync(
        self: &Arc<Self>,
        deployments: &[Arc<KernelDeployment>],
        labels: &BTreeMap<String, String>,
    ) {
        let now = Instant::now();
        let mut wanted = BTreeMap::new();
        let mut primary = BTreeMap::new();
        for kd in deployments.iter().filter(|kd| selects(kd, labels)) {
            let (ns, name) = (kd.namespace().unwrap_or_default(), kd.name_any());
            let spec = &kd.spec.kernel;
            primary.insert((ns.clone(), name.clone()), spec.artifact.sha256.clone());
            let stable = kd.status.as_ref().and_then(|s| s.stable_revision.as_ref());
            for artifact in std::iter::once(&spec.artifact).chain(stable.map(|r| &r.artifact)) {
                let key = (ns.clone(), name.clone(), artifact.sha256.clone());
                wanted.insert(key, (artifact.clone(), spec.conv2d.clone()));
            }
        }
        *self.primary.lock().expect("primary lock") = primary;
        let mut entries = self.entries.lock().expect("entries lock");
        entries.retain(|key, _| wanted.contains_key(key));
        // What no deployment wants any more may now go, if memory is over its bound.
        self.store.trim();
        let mut touched = self.touched.lock().expect("touched lock");
        if touched.is_none_or(|t| t.elapsed() >= TOUCH_EVERY) {
            *touched = Some(now);
            let warm: Vec<String> = entries
                .iter()
                .filter(|(_, e)| matches!(e.state, State::Warm(_)))
                .map(|((_, _, digest), _)| digest.clone())
                .collect();
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || store.touch(&warm));
        }
        drop(touched);
        for (key, (artifact, conv2d)) in wanted {
            let due = match entries.get(&key) {
                Some(e) if e.artifact != artifact || e.conv2d != conv2d => true,
                Some(Entry {
                    state: State::Failed { retry_at, .. },
                    ..
                }) => *retry_at <= now,
                Some(_) => false,
                None => true,
            };
            if !due {
                continue;
            }
            let attempts = match entries.get(&key) {
                Some(Entry {
                    state: State::Failed { attempts, .. },
                    artifact: a,
                    ..
                }) if *a == artifact => *attempts,
                _ => 0,
            };
            entries.insert(
                key.clone(),
                Entry {
                    artifact: artifact.clone(),
                    conv2d: conv2d.clone(),
                    state: State::Warming,
                },
            );
            let warmer = self.clone();
            tokio::spawn(async move {
                let result = warmer.store.get(&artifact, &conv2d).await;
                let mut entries = warmer.entries.lock().expect("entries lock");
                // The deployment may have changed or gone while this ran.
                let Some(entry) = entries
                    .get_mut(&key)
                    .filter(|e| e.artifact == artifact && e.conv2d == conv2d)
                else {
                    return;
                };
                entry.state = match result {
                    Ok(kernel) => {
                        tracing::info!(
                            namespace = key.0,
                            name = key.1,
                            digest = key.2,
                            "kernel warm"
                        );
                        State::Warm(kernel)
                    }
                    Err(error) => {
                        let attempts = attempts + 1;
                        tracing::warn!(namespace = key.0, name = key.1, reason = error.reason(), %error, attempts, "kernel failed to warm");
                        let retry_at = Instant::now() + retry_delay(&error, attempts);
                        State::Failed {
                            error,
                            attempts,
                            retry_at,
                        }
                    }
                };
            });
        }
    }

    /// The warm kernel of a KernelDeployment's spec, if any.
    pub fn kernel(&self, namespace: &str, name: &str) -> Option<Arc<Kernel>> {
        let digest = self
            .primary
            .lock()
            .expect("primary lock")
            .get(&(namespace.to_string(), name.to_string()))?
            .clone();
        self.kernel_of(namespace, name, &digest)
    }

    /// The warm kernel with `digest` of a KernelDeployment, if any.
    pub fn kernel_of(&self, namespace: &str, name: &str, digest: &str) -> Option<Arc<Kernel>> {
        let key = (namespace.to_string(), name.to_string(), digest.to_string());
        match &self.entries.lock().expect("entries lock").get(&key)?.state {
            State::Warm(k) => Some(k.clone()),
            _ => None,
        }
    }

    /// Per-kernel entries of the node report: each deployment's spec kernel.
    pub fn report(&self) -> Vec<KernelReport> {
        let primary = self.primary.lock().expect("primary lock").clone();
        let entries = self.entries.lock().expect("entries lock");
        primary
            .into_iter()
            .filter_map(|((namespace, name), digest)| {
                let e = entries.get(&(namespace.clone(), name.clone(), digest))?;
                Some(((namespace, name), e))
            })
            .map(|((namespace, name), e)| {
                let (state, reason, message) = match &e.state {
                    State::Warming => ("Warming", None, None),
                    State::Warm(_) => ("Warm", None, None),
                    State::Failed { error, .. } => (
                        "Failed",
                        Some(error.reason().to_string()),
                        Some(error.to_string()),
                    ),
                };
                KernelReport {
                    namespace,
                    name,
                    canary_sha256: e.artifact.sha256.clone(),
                    state: state.into(),
                    reason,
                    message,
                    ..KernelReport::default()
                }
            })
            .collect()
    }
}

/// Watches KernelDeployments and this node's Node, keeping the warmer and the router in
/// sync, until dropped.
pub async fn run(
    client: Client,
    node: String,
    warmer: Arc<Warmer>,
    router: Arc<Router>,
    synced: Arc<std::sync::atomic::AtomicBool>,
) {
    let (kds, kd_writer) = reflector::store::<KernelDeployment>();
    let (nodes, node_writer) = reflector::store::<Node>();
    let kd_events = reflector::reflector(
        kd_writer,
        watcher(
            Api::<KernelDeployment>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .touched_objects()
    .map(|r| crate::watched("KernelDeployment", r));
    let node_events = reflector::reflector(
        node_writer,
        watcher(
            Api::<Node>::all(client),
            watcher::Config::default().fields(&format!("metadata.name={node}")),
        ),
    )
    .default_backoff()
    .touched_objects()
    .map(|r| crate::watched("Node", r));
    let mut events = std::pin::pin!(futures::stream::select(kd_events, node_events));
    // A tick retries failures whose backoff has passed and routes to kernels newly warm.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // Nothing is decided on partial caches: with no labels yet, a selector could match (a
    // `NotIn`) and start fetching kernels this node should not serve.
    let caches = async {
        kds.wait_until_ready().await.ok();
        nodes.wait_until_ready().await.ok();
    };
    let mut caches = std::pin::pin!(caches);
    let mut ready = false;
    loop {
        tokio::select! {
            Some(()) = events.next() => {}
            _ = tick.tick() => {}
            () = &mut caches, if !ready => ready = true,
        }
        if !ready {
            continue;
        }
        let kds = servable(kds.state());
        let labels = labels(&nodes, &node);
        warmer.sync(&kds, &labels);
        // Off the runtime: new lanes may create a GPU backend and upload weights.
        let (router, warmer) = (router.clone(), warmer.clone());
        let synced_splits =
            tokio::task::spawn_blocking(move || router.sync(&kds, &labels, &warmer));
        match synced_splits.await {
            Ok(()) => synced.store(true, std::sync::atomic::Ordering::Relaxed),
            Err(e) => tracing::error!(error = %e, "updating the splits failed"),
        }
    }
}

/// The deployments whose op an agent can run: one no node could hold the tensors of (an
/// object the webhook never saw; the operator's Accepted condition says why) is neither
/// warmed nor served.
fn servable(kds: Vec<Arc<KernelDeployment>>) -> Vec<Arc<KernelDeployment>> {
    kds.into_iter()
        .filter(|kd| validate::kernel_op(&kd.spec.kernel).is_ok())
        .collect()
}

fn labels(nodes: &Store<Node>, node: &str) -> BTreeMap<String, String> {
    nodes
        .state()
        .iter()
        .find(|n| n.name_any() == node)
        .map(|n| n.labels().clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::format::{pack, sha256_hex};
    use crate::artifact::metrics::CacheMetrics;
    use crate::artifact::store::StoreConfig;
    use crate::compute::ops::uniform;

    fn conv() -> Conv2dSpec {
        Conv2dSpec::new(2, 2, [1, 1])
    }

    fn kd(name: &str, url: &str, sha256: &str, selector: &str) -> Arc<KernelDeployment> {
        let value = serde_json::json!({
            "apiVersion": "kernelflow.dev/v1alpha1", "kind": "KernelDeployment",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"kernel": {"artifact": {"url": url, "sha256": sha256},
                                "conv2d": {"inChannels": 2, "outChannels": 2, "kernelSize": [1, 1]}},
                     "nodeSelector": {"matchLabels": {"pool": selector}}}
        });
        Arc::new(serde_json::from_value(value).unwrap())
    }

    async fn settle(w: &Arc<Warmer>) -> Vec<KernelReport> {
        for _ in 0..200 {
            let r = w.report();
            if r.iter().all(|k| k.state != "Warming") {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("warming did not settle: {:?}", w.report());
    }

    #[tokio::test]
    async fn warms_selected_kernels_and_reports_failures() {
        let dir = std::env::temp_dir().join(format!("kf-warm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bytes = pack(&conv(), &uniform(4, 1, 1.0), Some(&[0.0, 0.0]), None).unwrap();
        let good = dir.join("good.safetensors");
        std::fs::write(&good, &bytes).unwrap();
        let url = format!("file://{}", good.display());
        let store = KernelStore::for_tests();
        let warmer = Warmer::new(store);
        let labels: BTreeMap<String, String> = [("pool".to_string(), "a".to_string())].into();
        let deployments = vec![
            kd("ok", &url, &sha256_hex(&bytes), "a"),
            kd("corrupt", &url, &"0".repeat(64), "a"),
            kd("elsewhere", &url, &sha256_hex(&bytes), "b"),
        ];
        warmer.sync(&deployments, &labels);
        let report = settle(&warmer).await;
        let by_name: BTreeMap<_, _> = report.iter().map(|k| (k.name.as_str(), k)).collect();
        assert_eq!(by_name.len(), 2, "only selected deployments: {report:?}");
        assert_eq!(by_name["ok"].state, "Warm");
        assert_eq!(by_name["corrupt"].state, "Failed");
        assert_eq!(by_name["corrupt"].reason.as_deref(), Some("DigestMismatch"));
        assert!(warmer.kernel("ns", "ok").is_some());

        // The node's labels change: it leaves one rollout and joins another.
        let moved: BTreeMap<String, String> = [("pool".to_string(), "b".to_string())].into();
        warmer.sync(&deployments, &moved);
        let report = settle(&warmer).await;
        assert_eq!(
            report.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(),
            ["elsewhere"]
        );
    }

    #[test]
    fn an_op_no_node_could_hold_is_neither_warmed_nor_served() {
        let ok = kd("ok", "file:///k", &"a".repeat(64), "a");
        let mut huge = (*kd("huge", "file:///k", &"a".repeat(64), "a")).clone();
        huge.spec.kernel.conv2d = Conv2dSpec::new(1 << 20, 1 << 20, [3, 3]);
        let kept = servable(vec![ok, Arc::new(huge)]);
        let names: Vec<_> = kept.iter().map(|kd| kd.name_any()).collect();
        assert_eq!(names, ["ok"]);
    }

    /// Kernels served from memory mark their disk copies used every `TOUCH_EVERY`, so that
    /// the disk cache does not evict them first.
    #[tokio::test]
    async fn warm_kernels_mark_their_disk_copies_used() {
        let dir = std::env::temp_dir().join(format!("kf-touch-{}", std::process::id()));
        let disk = dir.join("disk");
        std::fs::create_dir_all(&disk).unwrap();
        let bytes = pack(&conv(), &uniform(4, 1, 1.0), Some(&[0.0, 0.0]), None).unwrap();
        let (file, digest) = (dir.join("k.safetensors"), sha256_hex(&bytes));
        std::fs::write(&file, &bytes).unwrap();
        let config = StoreConfig {
            disk_dir: Some(disk.clone()),
            file_root: Some(dir.clone()),
            ..StoreConfig::default()
        };
        let store = KernelStore::new(config, CacheMetrics::default()).unwrap();
        let warmer = Warmer::new(store);
        let labels: BTreeMap<String, String> = [("pool".to_string(), "a".to_string())].into();
        let deployments = vec![kd(
            "ok",
            &format!("file://{}", file.display()),
            &digest,
            "a",
        )];
        warmer.sync(&deployments, &labels);
        assert_eq!(settle(&warmer).await[0].state, "Warm");
        let cached = disk.join("sha256").join(&digest);
        let age = || {
            let modified = std::fs::metadata(&cached).unwrap().modified().unwrap();
            modified.elapsed().unwrap_or_default()
        };
        let old = std::time::SystemTime::now() - Duration::from_secs(3600);
        let set_old = || {
            let f = std::fs::File::options().append(true).open(&cached).unwrap();
            f.set_modified(old).unwrap();
        };
        set_old();
        // Within `TOUCH_EVERY` of the last touch: left alone.
        warmer.sync(&deployments, &labels);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(age() > Duration::from_secs(3000));
        // Past it: marked used.
        *warmer.touched.lock().unwrap() = Instant::now().checked_sub(TOUCH_EVERY);
        warmer.sync(&deployments, &labels);
        for _ in 0..200 {
            if age() < Duration::from_secs(60) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(age() < Duration::from_secs(60), "not touched: {:?}", age());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn retries_back_off_within_caps() {
        let store = ArtifactError::FetchFailed("x".into());
        let bad = ArtifactError::NonFinite {
            tensor: "weight".into(),
            index: 0,
        };
        assert_eq!(retry_delay(&store, 1), Duration::from_secs(2));
        assert_eq!(retry_delay(&store, 3), Duration::from_secs(8));
        assert_eq!(retry_delay(&store, 30), Duration::from_secs(60));
        assert_eq!(retry_delay(&bad, 30), Duration::from_secs(300));
    }
}
