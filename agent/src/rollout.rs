//! The agent's side of a rollout: each KernelDeployment's conv2d operations split between
//! its canary and stable revisions as the operator's status says, each revision run with
//! its own flags, a shadow load that runs identical inputs through both, and the figures of
//! the current step that the node report carries back to the operator's analysis.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kernelflow_crds::KernelDeployment;
use kernelflow_crds::kernel_deployment::{Revision, RolloutPhase};
use kernelflow_crds::node_report::{KernelReport, RevisionFigures, ShadowFigures, max_diff};
use kube::ResourceExt;
use prometheus::{GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use crate::artifact::format::Kernel;
use crate::artifact::memory::{MemoryCache, footprint};
use crate::artifact::metrics::{CacheMetrics, Tier};
use crate::compute::ComputeError;
use crate::compute::backend::{Backend, Op};
use crate::compute::conv::Conv2dParams;
use crate::compute::device::{Device, DeviceBackend, DeviceBuffer};
use crate::compute::engine::{Engine, EngineConfig, run_sync};
use crate::compute::ops::uniform;
use crate::compute::recycle;
use crate::compute::train::{KernelLayerRunner, Layer, SyncPath};
use crate::warm::{Warmer, selects};
use futures::future::BoxFuture;
use tokio::sync::Semaphore;

/// Why a routed operation failed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum OpError {
    #[error("no warm revision of {0} serves traffic on this node")]
    NotServing(String),
    #[error(transparent)]
    Compute(#[from] ComputeError),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("non-finite output at index {0}")]
    NonFinite(usize),
}

/// Which side of the split ran an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Canary,
    Stable,
}

impl Side {
    fn label(self) -> &'static str {
        match self {
            Side::Canary => "canary",
            Side::Stable => "stable",
        }
    }
}

/// How the agent routes and measures.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    /// An operation that takes longer than this counts as failed.
    pub op_timeout: Duration,
    /// Shadow pairs per second per rollout (0: none).
    pub shadow_ops_per_second: f64,
    /// Shadow operations issued at once per revision: the load a stream pool is judged under.
    pub shadow_concurrency: usize,
    /// Where the lanes' and the training workers' engines run.
    pub device: Device,
    /// Bytes of kernel weights kept on the device (the device cache tier).
    pub device_cache_bytes: usize,
}

/// A kernel's weight and bias where the backend computes, uploaded once per digest and
/// shared by every lane running that kernel.
type Weights = Arc<Vec<DeviceBuffer>>;

/// An operation in flight, counted until dropped.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }

    /// Another operation on the same count, which this one keeps above zero meanwhile.
    fn another(&self) -> Self {
        Self::new(&self.0)
    }
}

/// A split looked up for work, and counted in flight from the lookup on: taken under the
/// lock that [`Router::sync`] retires splits under, the count keeps a split retired
/// meanwhile from having its series removed while this work is still to record into them.
struct Held {
    serving: Arc<Serving>,
    busy: Busy,
}

impl Held {
    fn of(serving: &Arc<Serving>) -> Self {
        Self {
            busy: Busy::new(&serving.in_flight),
            serving: serving.clone(),
        }
    }
}

impl std::ops::Deref for Held {
    type Target = Serving;
    fn deref(&self) -> &Serving {
        &self.serving
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One revision as this node runs it.
struct Lane {
    kernel: Arc<Kernel>,
    /// `maxConcurrentOps`, on either path.
    cap: Arc<Semaphore>,
    path: Path,
}

/// How a revision's ops run.
enum Path {
    /// On the blocking pool.
    Sync,
    /// On the engine's stream pool, with the kernel's weights resident.
    Async(Engine<DeviceBackend>, Weights),
}

impl Lane {
    fn new(
        revision: &Revision,
        kernel: Arc<Kernel>,
        device: &Device,
        weights: &MemoryCache<Weights>,
    ) -> Self {
        let f = &revision.flags;
        // At least one, as the engine takes it: the schema's minimum, for any revision.
        let cap = Arc::new(Semaphore::new((f.max_concurrent_ops as usize).max(1)));
        if !f.async_enabled {
            return Self {
                kernel,
                cap,
                path: Path::Sync,
            };
        }
        // On the CPU backend a stream is one core's worker, so the pool size is the
        // revision's parallelism, as streams are on a GPU.
        let path = {
            let backend = device.backend(f.stream_pool_size as usize, 1);
            // Per backend kind: a GPU node's backend may have fallen back to the CPU.
            let key = format!("{}/{}", backend.name(), kernel.sha256);
            let resident = weights.get(&key).unwrap_or_else(|| {
                let host = [Some(kernel.weight.clone()), kernel.bias.clone()];
                let up: Weights = Arc::new(
                    host.into_iter()
                        .flatten()
                        .map(|d| backend.resident(d))
                        .collect(),
                );
                // A failed upload fails this lane's ops, not every later lane's.
                if !up.iter().any(DeviceBuffer::failed) {
                    weights.insert(key, up.clone(), footprint(&kernel));
                }
                up
            });
            Path::Async(
                Engine::new(Arc::new(backend), EngineConfig::from(f)),
                resident,
            )
        };
        Self { kernel, cap, path }
    }

    /// Runs the op once it has a place under the cap, in a task of its own that holds the
    /// place and `busy` until its work ends: a timeout while it waits drops the wait, one
    /// while it runs drops only the wait for its end, so neither the cap nor the drain count
    /// is freed while work still runs. Also says whether the synchronous fallback produced
    /// the output.
    async fn run(
        &self,
        p: Conv2dParams,
        x: Arc<Vec<f32>>,
        busy: Busy,
    ) -> Result<(Vec<f32>, bool), ComputeError> {
        let (w, b) = (self.kernel.weight.clone(), self.kernel.bias.clone());
        let inputs: Vec<_> = [Some(x), Some(w), b].into_iter().flatten().collect();
        let op = Op::Conv2d(p);
        let permit = self.cap.clone().acquire_owned().await;
        let held = (
            busy,
            permit.map_err(|_| ComputeError::Stopped("closed".into()))?,
        );
        let stopped = |e: tokio::task::JoinError| ComputeError::Stopped(e.to_string());
        let (mut out, fell_back) = match &self.path {
            Path::Async(engine, resident) => {
                let (engine, resident) = (engine.clone(), resident.clone());
                tokio::spawn(async move {
                    let _held = held;
                    engine.run_with(op, inputs, &resident).await
                })
                .await
                .map_err(stopped)??
            }
            Path::Sync => tokio::task::spawn_blocking(move || {
                let _held = held;
                run_sync(op, &inputs).map(|out| (out, false))
            })
            .await
            .map_err(stopped)??,
        };
        Ok((out.swap_remove(0), fell_back))
    }

    fn fallbacks(&self) -> u64 {
        match &self.path {
            Path::Async(e, _) => e.stats.fallbacks.load(Ordering::Relaxed),
            Path::Sync => 0,
        }
    }
}

/// What the node's split looks like for one deployment; a change starts new figures.
#[derive(Clone, Debug, PartialEq)]
struct Plan {
    epoch: u64,
    traffic_percent: u8,
    shadow: bool,
    canary: Option<(Revision, bool)>,
    stable: Option<(Revision, bool)>,
}

/// Figures of the current split.
#[derive(Default)]
struct Window {
    canary: RevisionFigures,
    stable: RevisionFigures,
    shadow: ShadowFigures,
}

impl Window {
    fn side(&mut self, side: Side) -> &mut RevisionFigures {
        match side {
            Side::Canary => &mut self.canary,
            Side::Stable => &mut self.stable,
        }
    }
}

/// One deployment's split on this node.
pub struct Serving {
    namespace: String,
    name: String,
    plan: Plan,
    params: Conv2dParams,
    canary: Option<Lane>,
    stable: Option<Lane>,
    /// Canary and stable compute the same function, so their outputs must agree.
    comparable: bool,
    seq: AtomicU64,
    /// Holds on the split: operations and shadow bursts under way (an operation until it
    /// has recorded its figures and its work has ended, even past a timeout). None left,
    /// nothing will record into its series.
    in_flight: Arc<AtomicUsize>,
    started: Timestamp,
    window: Mutex<Window>,
    timeout: Duration,
    metrics: RolloutMetrics,
    /// Fallbacks of this split's engines already added to the metric.
    fallbacks_counted: AtomicU64,
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.count_fallbacks();
    }
}

/// Whether operation `n` goes to the canary at `percent`: exactly `percent` of every 100
/// consecutive operations, spread evenly, with no randomness to skew a short window.
pub fn to_canary(n: u64, percent: u8) -> bool {
    let p = u64::from(percent.min(100));
    (n + 1) * p / 100 > n * p / 100
}

/// Where a new split's operation count starts: anywhere in a block of 100, at random. From
/// 0, every split would round the canary's share down (at 1%, a node that serves 99
/// operations a step would send none) and line up with callers that alternate.
fn split_start() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(0u8) % 100
}

impl Serving {
    fn lane(&self, side: Side) -> Option<&Lane> {
        match side {
            Side::Canary => self.canary.as_ref(),
            Side::Stable => self.stable.as_ref(),
        }
    }

    fn fallbacks(&self) -> (u64, u64) {
        let f = |l: &Option<Lane>| l.as_ref().map_or(0, Lane::fallbacks);
        (f(&self.canary), f(&self.stable))
    }

    /// Adds the fallbacks since the last call to the metric.
    fn count_fallbacks(&self) {
        let (c, s) = self.fallbacks();
        let new = (c + s).saturating_sub(self.fallbacks_counted.swap(c + s, Ordering::Relaxed));
        if new > 0 {
            self.metrics
                .fallbacks
                .with_label_values(&[&self.namespace, &self.name])
                .inc_by(new);
        }
    }

    /// Runs one operation over `p` on `side`, counted by `busy`, and records it; returns
    /// the output and its latency.
    async fn run(
        &self,
        side: Side,
        p: Conv2dParams,
        x: Arc<Vec<f32>>,
        traffic: bool,
        busy: Busy,
    ) -> Result<(Vec<f32>, Duration), OpError> {
        let (timeout, metrics) = (self.timeout, &self.metrics);
        let lane = self
            .lane(side)
            .ok_or_else(|| OpError::NotServing(format!("{}/{}", self.namespace, self.name)))?;
        let start = Instant::now();
        // `busy` lasts until the figures below are recorded; the lane's own count, until its
        // work ends (later, when the operation timed out).
        let result = match tokio::time::timeout(timeout, lane.run(p, x, busy.another())).await {
            Err(_) => Err(OpError::Timeout(timeout)),
            Ok(Err(e)) => Err(e.into()),
            Ok(Ok((y, fell_back))) => match y.iter().position(|v| !v.is_finite()) {
                Some(i) => Err(OpError::NonFinite(i)),
                None => Ok((y, fell_back)),
            },
        };
        let took = start.elapsed();
        let labels = [self.namespace.as_str(), self.name.as_str(), side.label()];
        metrics.ops.with_label_values(&labels).inc();
        {
            let mut w = self.window.lock().expect("window lock");
            let f = w.side(side);
            f.ops += 1;
            f.traffic_ops += u64::from(traffic);
            match &result {
                Ok((_, fell_back)) => {
                    f.latency_seconds_sum += took.as_secs_f64();
                    f.fallbacks += u64::from(*fell_back);
                }
                Err(_) => f.failures += 1,
            }
        }
        match result {
            Ok((y, _)) => {
                metrics
                    .duration
                    .with_label_values(&labels)
                    .observe(took.as_secs_f64());
                Ok((y, took))
            }
            Err(e) => {
                metrics.failures.with_label_values(&labels).inc();
                tracing::debug!(error = %e, side = side.label(), "operation failed");
                Err(e)
            }
        }
    }

    /// A traffic operation over `p` (this deployment's op on any batch and input size):
    /// canary or stable as the split says.
    async fn route(
        &self,
        p: Conv2dParams,
        x: Arc<Vec<f32>>,
        busy: Busy,
    ) -> Result<Vec<f32>, OpError> {
        let q = &self.params;
        let op = |c: &Conv2dParams| {
            (
                c.in_channels,
                c.out_channels,
                c.kernel,
                c.stride,
                c.padding,
                c.dilation,
                c.groups,
            )
        };
        if op(&p) != op(q) {
            let why = format!("{p:?} is not the op of {}/{}", self.namespace, self.name);
            return Err(ComputeError::Shape(why).into());
        }
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let side = if self.canary.is_some() && to_canary(n, self.plan.traffic_percent) {
            Side::Canary
        } else {
            Side::Stable
        };
        Ok(self.run(side, p, x, true, busy).await?.0)
    }
}

impl Held {
    /// One burst of shadow load: `n` inputs through both revisions, one revision's burst
    /// after the other's so that they do not compete, alternating which goes first.
    async fn shadow_burst(&self, n: usize, round: u64) {
        let inputs: Vec<Arc<Vec<f32>>> = (0..n as u64)
            .map(|i| Arc::new(uniform(self.params.input_len(), round * n as u64 + i, 1.0)))
            .collect();
        let burst = |side| {
            futures::future::join_all(
                inputs
                    .iter()
                    .map(|x| self.run(side, self.params, x.clone(), false, self.busy.another())),
            )
        };
        let (canary, stable) = if round.is_multiple_of(2) {
            let c = burst(Side::Canary).await;
            (c, burst(Side::Stable).await)
        } else {
            let s = burst(Side::Stable).await;
            (burst(Side::Canary).await, s)
        };
        let mut w = self.window.lock().expect("window lock");
        for (c, s) in canary.iter().zip(&stable) {
            let (Ok((yc, tc)), Ok((ys, ts))) = (c, s) else {
                continue;
            };
            let shadow = &mut w.shadow;
            shadow.pairs += 1;
            shadow.canary_seconds_sum += tc.as_secs_f64();
            shadow.stable_seconds_sum += ts.as_secs_f64();
            if self.comparable {
                let diff = max_abs_diff(yc, ys);
                shadow.max_numeric_diff =
                    Some(shadow.max_numeric_diff.map_or(diff, |d| max_diff(d, diff)));
            }
        }
        if let Some(d) = w.shadow.max_numeric_diff {
            self.metrics
                .numeric_diff
                .with_label_values(&[&self.namespace, &self.name])
                .set(d);
        }
        drop(w);
        // Out of the window's lock: the pool may free memory as it takes them.
        let outputs = canary.into_iter().chain(stable).flatten();
        outputs.for_each(|(y, _)| recycle::give(y));
    }
}

impl Serving {
    /// Fills `k`'s figures.
    fn fill(&self, k: &mut KernelReport, now: Timestamp) {
        let w = self.window.lock().expect("window lock");
        k.epoch = Some(self.plan.epoch);
        k.traffic_percent = if self.canary.is_some() {
            self.plan.traffic_percent
        } else {
            0
        };
        k.window_start = Some(Time(self.started));
        k.window_end = Some(Time(now));
        k.canary = w.canary.clone();
        k.stable = w.stable.clone();
        k.shadow = ShadowFigures {
            comparable: self.comparable,
            ..w.shadow.clone()
        };
    }
}

/// Largest absolute difference; NaN where either side has one. Taken in f64, where two
/// finite f32s differ by a finite amount (in f32, `3e38 - -3e38` is infinite), and the
/// largest f64 for outputs of different lengths: the report is JSON, which has no infinity
/// (serde_json writes it as null, read back as no difference at all).
fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::MAX;
    }
    a.iter().zip(b).fold(0.0, |m, (&x, &y)| {
        max_diff(m, (f64::from(x) - f64::from(y)).abs())
    })
}

/// Per-deployment Prometheus series of the split.
#[derive(Clone)]
pub struct RolloutMetrics {
    ops: IntCounterVec,
    failures: IntCounterVec,
    fallbacks: IntCounterVec,
    duration: HistogramVec,
    numeric_diff: GaugeVec,
    state: prometheus::IntGaugeVec,
}

impl RolloutMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let kd_side = &["namespace", "name", "revision"];
        let m = Self {
            ops: IntCounterVec::new(
                Opts::new(
                    "kernel_ops_total",
                    "conv2d operations, traffic and shadow, by revision.",
                ),
                kd_side,
            )?,
            failures: IntCounterVec::new(
                Opts::new(
                    "kernel_op_failures_total",
                    "Operations that errored, timed out or produced a non-finite output.",
                ),
                kd_side,
            )?,
            fallbacks: IntCounterVec::new(
                Opts::new(
                    "kernel_fallbacks_total",
                    "Failed asynchronous operations re-run on the synchronous path.",
                ),
                &["namespace", "name"],
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "kernel_op_duration_seconds",
                    "Latency of successful operations.",
                )
                .buckets(prometheus::exponential_buckets(1e-5, 4.0, 10)?),
                kd_side,
            )?,
            numeric_diff: GaugeVec::new(
                Opts::new(
                    "kernel_numeric_diff_max",
                    "Largest canary-vs-stable output difference in the current step.",
                ),
                &["namespace", "name"],
            )?,
            state: prometheus::IntGaugeVec::new(
                Opts::new(
                    "kernel_state",
                    "1 for the state of each deployment's kernel.",
                ),
                &["namespace", "name", "state"],
            )?,
        };
        registry.register(Box::new(m.ops.clone()))?;
        registry.register(Box::new(m.failures.clone()))?;
        registry.register(Box::new(m.fallbacks.clone()))?;
        registry.register(Box::new(m.duration.clone()))?;
        registry.register(Box::new(m.numeric_diff.clone()))?;
        registry.register(Box::new(m.state.clone()))?;
        Ok(m)
    }

    /// Drops the series of a deployment this node no longer serves.
    fn forget(&self, namespace: &str, name: &str) {
        for side in [Side::Canary, Side::Stable] {
            let labels = [namespace, name, side.label()];
            for v in [&self.ops, &self.failures] {
                let _ = v.remove_label_values(&labels);
            }
            let _ = self.duration.remove_label_values(&labels);
        }
        let _ = self.fallbacks.remove_label_values(&[namespace, name]);
        let _ = self.numeric_diff.remove_label_values(&[namespace, name]);
    }
}

/// Every deployment's split on this node.
pub struct Router {
    config: RouterConfig,
    metrics: RolloutMetrics,
    /// The device tier of the kernel cache.
    weights: MemoryCache<Weights>,
    serving: Mutex<BTreeMap<(String, String), Arc<Serving>>>,
    /// Replaced or removed splits with operations still in flight; a deleted deployment
    /// stays in the report until these finish.
    draining: Mutex<Vec<Arc<Serving>>>,
}

impl Router {
    pub fn new(
        config: RouterConfig,
        metrics: RolloutMetrics,
        cache_metrics: CacheMetrics,
    ) -> Arc<Self> {
        let weights = MemoryCache::new(config.device_cache_bytes, Tier::Device, cache_metrics);
        Arc::new(Self {
            config,
            metrics,
            weights,
            serving: Mutex::default(),
            draining: Mutex::default(),
        })
    }

    /// The device engines run on: the lanes', and the training workers' too.
    pub fn device(&self) -> &Device {
        &self.config.device
    }

    /// Brings the splits in line with the deployments' statuses and the warm kernels.
    ///
    /// New splits are built outside the lock that every operation's lookup takes: a GPU
    /// lane's streams and handles take a while to create. One caller at a time.
    pub fn sync(
        &self,
        deployments: &[Arc<KernelDeployment>],
        labels: &BTreeMap<String, String>,
        warmer: &Warmer,
    ) {
        let current = self.serving.lock().expect("serving lock").clone();
        let mut keep = BTreeMap::new();
        for kd in deployments.iter().filter(|kd| selects(kd, labels)) {
            let (ns, name) = (kd.namespace().unwrap_or_default(), kd.name_any());
            let Some(status) = &kd.status else { continue };
            let warm = |r: &Revision| warmer.kernel_of(&ns, &name, &r.artifact.sha256);
            let with_warmth = |r: &Option<Revision>| {
                r.clone().map(|r| {
                    let w = warm(&r).is_some();
                    (r, w)
                })
            };
            let plan = Plan {
                epoch: status.step_epoch,
                traffic_percent: status.traffic_percent,
                shadow: matches!(
                    status.phase,
                    RolloutPhase::Progressing | RolloutPhase::Paused | RolloutPhase::Degraded
                ),
                canary: with_warmth(&status.canary_revision),
                stable: with_warmth(&status.stable_revision),
            };
            let key = (ns.clone(), name.clone());
            if let Some(current) = current.get(&key).filter(|s| s.plan == plan) {
                keep.insert(key, current.clone());
                continue;
            }
            let Ok(params) =
                Conv2dParams::from_spec(&kd.spec.kernel.conv2d, 1, kd.spec.kernel.input_size)
            else {
                continue;
            };
            // Lanes exist only for warm kernels: a kernel takes traffic once warm.
            let lane = |r: &Option<(Revision, bool)>| {
                let (r, _) = r.as_ref()?;
                Some(Lane::new(r, warm(r)?, &self.config.device, &self.weights))
            };
            let (canary, stable) = (lane(&plan.canary), lane(&plan.stable));
            let comparable = match (&canary, &stable) {
                (Some(c), Some(s)) => {
                    c.kernel.sha256 == s.kernel.sha256
                        || c.kernel.equivalent_to.as_deref() == Some(s.kernel.sha256.as_str())
                }
                _ => false,
            };
            // The largest difference is the new split's.
            let _ = self.metrics.numeric_diff.remove_label_values(&[&ns, &name]);
            tracing::info!(
                namespace = ns,
                name,
                epoch = plan.epoch,
                traffic = plan.traffic_percent,
                canary = canary.is_some(),
                stable = stable.is_some(),
                "split updated"
            );
            keep.insert(
                key,
                Arc::new(Serving {
                    namespace: ns,
                    name,
                    plan,
                    params,
                    canary,
                    stable,
                    comparable,
                    seq: AtomicU64::new(split_start()),
                    in_flight: Arc::default(),
                    started: Timestamp::now(),
                    window: Mutex::default(),
                    timeout: self.config.op_timeout,
                    metrics: self.metrics.clone(),
                    fallbacks_counted: AtomicU64::new(0),
                }),
            );
        }
        let mut serving = self.serving.lock().expect("serving lock");
        let replaced = std::mem::take(&mut *serving)
            .into_values()
            .filter(|s| !keep.values().any(|k| Arc::ptr_eq(k, s)));
        let mut draining = self.draining.lock().expect("draining lock");
        draining.extend(replaced);
        let (busy, done): (Vec<_>, Vec<_>) = std::mem::take(&mut *draining)
            .into_iter()
            .partition(|s| s.in_flight.load(Ordering::Relaxed) > 0);
        *draining = busy;
        // The series of a deployment gone from this node go once its operations have.
        for s in done {
            let served = keep.contains_key(&(s.namespace.clone(), s.name.clone()));
            let busy = draining
                .iter()
                .any(|d| d.namespace == s.namespace && d.name == s.name);
            if !served && !busy {
                // Counted first, or the drop would bring the series back.
                s.count_fallbacks();
                self.metrics.forget(&s.namespace, &s.name);
            }
        }
        *serving = keep;
        // The weights of lanes gone may now go, if the device cache is over its bound.
        self.weights.trim();
    }

    fn get(&self, namespace: &str, name: &str) -> Option<Held> {
        self.serving
            .lock()
            .expect("serving lock")
            .get(&(namespace.to_string(), name.to_string()))
            .map(Held::of)
    }

    /// Runs one conv2d of a deployment's traffic over `p` (its op on any batch and input
    /// size) on the side of the split that the operation falls on.
    pub async fn conv2d(
        &self,
        namespace: &str,
        name: &str,
        p: Conv2dParams,
        x: Arc<Vec<f32>>,
    ) -> Result<Vec<f32>, OpError> {
        let Held { serving, busy } = self
            .get(namespace, name)
            .ok_or_else(|| OpError::NotServing(format!("{namespace}/{name}")))?;
        serving.route(p, x, busy).await
    }

    /// Runs shadow bursts for every rollout in progress, at the configured rate, forever.
    pub async fn shadow_load(self: Arc<Self>) {
        let (rate, n) = (
            self.config.shadow_ops_per_second,
            self.config.shadow_concurrency.max(1),
        );
        if rate <= 0.0 {
            return std::future::pending().await;
        }
        let mut tick = tokio::time::interval(Duration::from_secs_f64(n as f64 / rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for round in 0u64.. {
            tick.tick().await;
            let active: Vec<_> = self
                .serving
                .lock()
                .expect("serving lock")
                .values()
                .filter(|s| s.plan.shadow && s.canary.is_some() && s.stable.is_some())
                .map(Held::of)
                .collect();
            for s in active {
                s.shadow_burst(n, round).await;
            }
        }
    }

    /// Synthetic application traffic through the split at `rate` operations per second per
    /// deployment, for demos and tests of the split; real traffic comes from training jobs.
    pub async fn synthetic_traffic(self: Arc<Self>, rate: f64) {
        if rate <= 0.0 {
            return std::future::pending().await;
        }
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for round in 0u64.. {
            tick.tick().await;
            let all: Vec<_> = self
                .serving
                .lock()
                .expect("serving lock")
                .values()
                .map(Held::of)
                .collect();
            for Held { serving, busy } in all {
                // Bounded: a slow revision backs traffic up, it does not pile up tasks.
                if serving.in_flight.load(Ordering::Relaxed) > 64 {
                    continue;
                }
                let x = Arc::new(uniform(serving.params.input_len(), round, 1.0));
                tokio::spawn(async move {
                    let _ = serving.route(serving.params, x, busy).await;
                });
            }
        }
    }

    /// Adds each deployment's figures to the report's entries, keeps listing deleted
    /// deployments whose operations are still draining, and updates the state metrics.
    pub fn annotate(&self, kernels: &mut Vec<KernelReport>) {
        let now = Timestamp::now();
        let serving = self.serving.lock().expect("serving lock");
        for k in kernels.iter_mut() {
            if let Some(s) = serving.get(&(k.namespace.clone(), k.name.clone())) {
                s.fill(k, now);
                s.count_fallbacks();
            }
        }
        for s in self.draining.lock().expect("draining lock").iter() {
            let listed = kernels
                .iter()
                .any(|k| k.namespace == s.namespace && k.name == s.name);
            if !listed && s.in_flight.load(Ordering::Relaxed) > 0 {
                kernels.push(KernelReport {
                    namespace: s.namespace.clone(),
                    name: s.name.clone(),
                    state: "Draining".into(),
                    ..KernelReport::default()
                });
            }
        }
        self.metrics.state.reset();
        for k in kernels.iter() {
            self.metrics
                .state
                .with_label_values(&[&k.namespace, &k.name, &k.state])
                .set(1);
        }
    }
}

/// Frozen training layers through their KernelDeployment's split: each micro-batch's
/// conv2d goes to the canary or the stable revision as the rollout says. A deployment this
/// node does not serve (yet) runs on the layer's own weights.
pub struct RolloutLayers {
    router: Arc<Router>,
    namespace: String,
    /// The KernelDeployment of each layer, by index; None for inline layers.
    deployments: Vec<Option<String>>,
}

impl RolloutLayers {
    pub fn new(router: Arc<Router>, namespace: &str, deployments: Vec<Option<String>>) -> Self {
        Self {
            router,
            namespace: namespace.into(),
            deployments,
        }
    }
}

impl KernelLayerRunner for RolloutLayers {
    fn forward<'a>(
        &'a self,
        index: usize,
        layer: &'a Layer,
        params: Conv2dParams,
        x: Arc<Vec<f32>>,
    ) -> BoxFuture<'a, Result<Vec<f32>, ComputeError>> {
        Box::pin(async move {
            if let Some(name) = self.deployments.get(index).and_then(Option::as_ref) {
                let ns = &self.namespace;
                match self.router.conv2d(ns, name, params, x.clone()).await {
                    Ok(y) => return Ok(y),
                    Err(OpError::NotServing(_)) => {}
                    Err(OpError::Compute(e)) => return Err(e),
                    Err(e) => return Err(ComputeError::Kernel(format!("{ns}/{name}: {e}"))),
                }
            }
            SyncPath.forward(index, layer, params, x).await
        })
    }
}

#[cfg(test)]
pub(crate) mod tests;
