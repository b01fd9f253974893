use kernelflow_crds::Conv2dSpec;

use super::*;
use crate::artifact::format::{pack, sha256_hex};
use crate::artifact::metrics::CacheMetrics;
use crate::artifact::store::KernelStore;

#[test]
fn the_split_sends_exactly_the_step_share_to_the_canary() {
    for percent in [0u8, 1, 7, 10, 33, 50, 99, 100] {
        for window in [100u64, 1000] {
            // Any run of 100 consecutive operations, wherever it starts.
            for start in [0u64, 37, 1234] {
                let canary = (start..start + window)
                    .filter(|n| to_canary(*n, percent))
                    .count();
                assert_eq!(
                    canary as u64,
                    window * u64::from(percent) / 100,
                    "{percent}% from {start}"
                );
            }
        }
    }
}

#[test]
fn splits_start_anywhere_so_a_short_one_gets_its_share_on_average() {
    let starts: std::collections::HashSet<u64> = (0..200).map(|_| split_start()).collect();
    assert!(starts.iter().all(|s| *s < 100));
    assert!(starts.len() > 10, "{starts:?}");
    // From a start uniform over 0..100, 50 operations at 1% send 0.5 to the canary on average.
    let canary: usize = (0..100u64)
        .map(|s| (s..s + 50).filter(|n| to_canary(*n, 1)).count())
        .sum();
    assert_eq!(canary, 50);
}

fn conv() -> Conv2dSpec {
    Conv2dSpec {
        padding: [1, 1],
        ..Conv2dSpec::new(2, 3, [3, 3])
    }
}

/// Files for artifacts, and the deployments that name them.
struct Fixture {
    dir: std::path::PathBuf,
    warmer: Arc<Warmer>,
    labels: BTreeMap<String, String>,
}

impl Fixture {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("kf-split-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = KernelStore::for_tests();
        Self {
            dir,
            warmer: Warmer::new(store),
            labels: [("gpu".to_string(), "true".to_string())].into(),
        }
    }

    /// Packs weights (scaled by `scale`) and returns the artifact's `{url, sha256}`.
    fn artifact(&self, seed: u64, scale: f32, equivalent_to: Option<&str>) -> serde_json::Value {
        let w = uniform(3 * 2 * 9, seed, scale);
        let bytes = pack(&conv(), &w, Some(&[0.25; 3]), equivalent_to).unwrap();
        let digest = sha256_hex(&bytes);
        let path = self.dir.join(&digest);
        std::fs::write(&path, &bytes).unwrap();
        serde_json::json!({"url": format!("file://{}", path.display()), "sha256": digest})
    }

    fn kd(
        &self,
        canary: &serde_json::Value,
        canary_async: bool,
        stable: &serde_json::Value,
        percent: u8,
        phase: &str,
    ) -> Arc<KernelDeployment> {
        let flags = |a: bool| serde_json::json!({"asyncEnabled": a, "fallbackOnError": true, "maxConcurrentOps": 64, "streamPoolSize": 2});
        let value = serde_json::json!({
            "apiVersion": "kernelflow.dev/v1alpha1", "kind": "KernelDeployment",
            "metadata": {"name": "k", "namespace": "ns"},
            "spec": {"kernel": {"artifact": canary, "inputSize": [8, 8],
                                "conv2d": {"inChannels": 2, "outChannels": 3, "kernelSize": [3, 3], "padding": [1, 1]}},
                     "nodeSelector": {"matchLabels": {"gpu": "true"}}, "flags": flags(canary_async)},
            "status": {"phase": phase, "trafficPercent": percent, "stepEpoch": 4,
                       "canaryRevision": {"artifact": canary, "flags": flags(canary_async)},
                       "stableRevision": {"artifact": stable, "flags": flags(false)}}
        });
        Arc::new(serde_json::from_value(value).unwrap())
    }

    /// Syncs until both revisions' kernels are warm and the router serves them.
    async fn serve(&self, router: &Router, kd: &Arc<KernelDeployment>) {
        let kds = [kd.clone()];
        for _ in 0..500 {
            self.warmer.sync(&kds, &self.labels);
            router.sync(&kds, &self.labels, &self.warmer);
            let ready = router
                .get("ns", "k")
                .is_some_and(|s| s.canary.is_some() && s.stable.is_some());
            if ready {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("kernels did not warm: {:?}", self.warmer.report());
    }
}

/// A router with no shadow load, for tests here and in training.
pub(crate) fn router() -> Arc<Router> {
    router_with(CacheMetrics::default(), Duration::from_secs(10))
}

fn router_with(cache: CacheMetrics, op_timeout: Duration) -> Arc<Router> {
    Router::new(
        RouterConfig {
            op_timeout,
            shadow_ops_per_second: 0.0,
            shadow_concurrency: 4,
            device: Device::Cpu,
            device_cache_bytes: 1 << 30,
        },
        RolloutMetrics::new(&Registry::new()).unwrap(),
        cache,
    )
}

/// The engine of a split's async canary.
fn canary_engine(s: &Serving) -> &Engine<DeviceBackend> {
    match &s.canary {
        Some(Lane {
            path: Path::Async(engine, _),
            ..
        }) => engine,
        _ => panic!("the canary runs async"),
    }
}

/// The fixture deployment's op on one 8x8 input.
fn params() -> Conv2dParams {
    Conv2dParams::from_spec(&conv(), 1, [8, 8]).unwrap()
}

fn report(router: &Router) -> KernelReport {
    let mut kernels = vec![KernelReport {
        namespace: "ns".into(),
        name: "k".into(),
        ..Default::default()
    }];
    router.annotate(&mut kernels);
    kernels.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_over_its_sync_baseline_agrees_and_takes_the_step_share() {
    let f = Fixture::new("baseline");
    let a = f.artifact(1, 0.5, None);
    let kd = f.kd(&a, true, &a, 10, "Progressing");
    let router = router();
    f.serve(&router, &kd).await;
    let s = router.get("ns", "k").unwrap();
    assert!(s.comparable, "same artifact: outputs must agree");
    let ops = (0..200).map(|i| {
        let x = Arc::new(uniform(2 * 8 * 8, i, 1.0));
        router.conv2d("ns", "k", params(), x)
    });
    let outputs = futures::future::join_all(ops).await;
    assert!(outputs.iter().all(Result::is_ok));
    s.shadow_burst(4, 0).await;
    s.shadow_burst(4, 1).await;

    let k = report(&router);
    assert_eq!(k.epoch, Some(4));
    assert_eq!(k.traffic_percent, 10);
    assert_eq!(
        (k.canary.traffic_ops, k.stable.traffic_ops),
        (20, 180),
        "exactly 10%"
    );
    assert_eq!(
        (k.canary.ops, k.stable.ops),
        (28, 188),
        "traffic plus 8 shadow each"
    );
    assert_eq!((k.canary.failures, k.stable.failures), (0, 0));
    assert_eq!(k.shadow.pairs, 8);
    assert!(k.shadow.comparable);
    // conv2d gives the same bits on any thread count: a stream and the synchronous path
    // agree exactly.
    assert_eq!(k.shadow.max_numeric_diff, Some(0.0));
    assert!(k.shadow.canary_seconds_sum > 0.0 && k.shadow.stable_seconds_sum > 0.0);
}

/// An async lane's weights go to the device once per kernel: a lane built again for the same
/// kernel (a new step here) finds them in the device tier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_go_to_the_device_once_per_kernel() {
    let f = Fixture::new("device");
    let a = f.artifact(1, 0.5, None);
    let cache = CacheMetrics::default();
    let router = router_with(cache.clone(), Duration::from_secs(10));
    f.serve(&router, &f.kd(&a, true, &a, 10, "Progressing"))
        .await;
    let mut next = (*f.kd(&a, true, &a, 50, "Progressing")).clone();
    next.status.as_mut().unwrap().step_epoch = 5;
    f.serve(&router, &Arc::new(next)).await;
    let count = |m: &IntCounterVec| m.with_label_values(&["device"]).get();
    assert_eq!((count(&cache.misses), count(&cache.hits)), (1, 1));
    assert_eq!(
        router.weights.bytes(),
        4 * (3 * 2 * 9 + 3),
        "weight and bias"
    );
    let x = Arc::new(uniform(2 * 8 * 8, 7, 1.0));
    assert!(router.conv2d("ns", "k", params(), x).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_that_overflow_are_failures_and_new_weights_are_not_compared() {
    let f = Fixture::new("overflow");
    let stable = f.artifact(1, 0.5, None);
    // Finite weights (they pass validation) whose outputs overflow f32.
    let huge = f.artifact(2, 3e38, None);
    let kd = f.kd(&huge, true, &stable, 50, "Progressing");
    let router = router();
    f.serve(&router, &kd).await;
    // Counted from 0, so that `to_canary(i)` says where operation i goes.
    router
        .get("ns", "k")
        .unwrap()
        .seq
        .store(0, Ordering::Relaxed);
    for i in 0..100 {
        let r = router
            .conv2d("ns", "k", params(), Arc::new(uniform(2 * 8 * 8, i, 1.0)))
            .await;
        if to_canary(i, 50) {
            assert!(matches!(r, Err(OpError::NonFinite(_))), "{r:?}");
        } else {
            assert!(r.is_ok(), "the stable revision keeps serving: {r:?}");
        }
    }
    router.get("ns", "k").unwrap().shadow_burst(2, 0).await;
    let k = report(&router);
    assert_eq!((k.canary.ops, k.canary.failures), (52, 52));
    assert_eq!(k.shadow.pairs, 0, "a pair needs both sides to succeed");
    assert!(!k.shadow.comparable);
    assert_eq!(k.shadow.max_numeric_diff, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_equivalent_is_compared_and_its_difference_measured() {
    let f = Fixture::new("equivalent");
    let stable = f.artifact(1, 0.5, None);
    let liar = f.artifact(3, 0.5, stable["sha256"].as_str());
    let kd = f.kd(&liar, false, &stable, 1, "Progressing");
    let router = router();
    f.serve(&router, &kd).await;
    let s = router.get("ns", "k").unwrap();
    assert!(s.comparable);
    s.shadow_burst(2, 0).await;
    let diff = report(&router).shadow.max_numeric_diff.unwrap();
    assert!(diff > 1e-2, "different weights must show: {diff}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_epoch_starts_new_figures_and_a_removed_deployment_stops_serving() {
    let f = Fixture::new("epoch");
    let a = f.artifact(1, 0.5, None);
    let router = router();
    f.serve(&router, &f.kd(&a, true, &a, 10, "Progressing"))
        .await;
    router
        .conv2d("ns", "k", params(), Arc::new(uniform(128, 0, 1.0)))
        .await
        .unwrap();
    let k = report(&router);
    assert_eq!(k.canary.ops + k.stable.ops, 1);

    let next = f.kd(&a, true, &a, 50, "Progressing");
    f.serve(&router, &next).await;
    let k = report(&router);
    assert_eq!(
        k.canary.ops + k.stable.ops,
        0,
        "a changed split starts from zero"
    );
    router
        .conv2d("ns", "k", params(), Arc::new(uniform(128, 0, 1.0)))
        .await
        .unwrap();
    // A new epoch alone (a retry at the same percent) starts from zero too.
    let mut again = (*next).clone();
    again.status.as_mut().unwrap().step_epoch += 1;
    f.serve(&router, &Arc::new(again)).await;
    let k = report(&router);
    assert_eq!((k.canary.ops + k.stable.ops, k.epoch), (0, Some(5)));

    router.sync(&[], &f.labels, &f.warmer);
    let r = router
        .conv2d("ns", "k", params(), Arc::new(uniform(128, 0, 1.0)))
        .await;
    assert!(matches!(r, Err(OpError::NotServing(_))), "{r:?}");
}

#[test]
fn differences_are_finite_unless_an_output_is_nan() {
    assert!(max_abs_diff(&[f32::NAN, 0.0], &[0.0, 1.0]).is_nan());
    assert!(max_abs_diff(&[0.0, f32::NAN], &[1.0, 0.0]).is_nan());
    assert_eq!(max_abs_diff(&[1.0, 2.0], &[1.5, 2.0]), 0.5);
    let far = max_abs_diff(&[f32::MAX], &[f32::MIN]);
    assert!(far.is_finite() && far > f64::from(f32::MAX), "{far}");
    assert_eq!(max_abs_diff(&[1.0], &[]), f64::MAX);
}

/// Operations the synchronous path rescued serve their callers and are counted once, as
/// rescued, not as failures too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rescued_operations_serve_and_are_counted_as_fallbacks() {
    let f = Fixture::new("rescued");
    let a = f.artifact(1, 0.5, None);
    let router = router();
    f.serve(&router, &f.kd(&a, true, &a, 100, "Progressing"))
        .await;
    let s = router.get("ns", "k").unwrap();
    let crate::compute::device::DeviceBackend::Cpu(cpu) = &**canary_engine(&s).backend() else {
        panic!("the CPU backend")
    };
    cpu.faults.fail_every(2);
    for i in 0..10 {
        let x = Arc::new(uniform(2 * 8 * 8, i, 1.0));
        assert!(router.conv2d("ns", "k", params(), x).await.is_ok());
    }
    let k = report(&router);
    assert_eq!(
        (k.canary.ops, k.canary.failures, k.canary.fallbacks),
        (10, 0, 5)
    );
}

/// A timed-out operation holds its place until its work ends: the split is not drained
/// under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_operation_counts_as_in_flight_until_its_work_ends() {
    let f = Fixture::new("timeout");
    let a = f.artifact(1, 0.5, None);
    let router = router_with(CacheMetrics::default(), Duration::from_millis(50));
    f.serve(&router, &f.kd(&a, true, &a, 100, "Progressing"))
        .await;
    let s = router.get("ns", "k").unwrap().serving;
    let engine = canary_engine(&s);
    let gate = crate::compute::backend::Event::default();
    for stream in 0..engine.backend().streams() {
        engine.backend().wait(stream, &gate);
    }
    let x = Arc::new(uniform(2 * 8 * 8, 7, 1.0));
    let err = router.conv2d("ns", "k", params(), x).await.unwrap_err();
    assert!(matches!(err, OpError::Timeout(_)), "{err}");
    assert_eq!(s.in_flight.load(Ordering::Relaxed), 1);
    gate.fire();
    drained(&s).await;
}

/// Waits until no operation of `s` is in flight.
async fn drained(s: &Serving) {
    for _ in 0..500 {
        if s.in_flight.load(Ordering::Relaxed) == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the operation never ended");
}

/// A deployment gone from the node takes its series with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_no_longer_served_takes_its_series_with_it() {
    let f = Fixture::new("forget");
    let a = f.artifact(1, 0.5, None);
    let router = router();
    f.serve(&router, &f.kd(&a, true, &a, 10, "Progressing"))
        .await;
    let x = Arc::new(uniform(2 * 8 * 8, 7, 1.0));
    assert!(router.conv2d("ns", "k", params(), x).await.is_ok());
    let series = |router: &Router| {
        prometheus::core::Collector::collect(&router.metrics.ops)[0]
            .get_metric()
            .len()
    };
    assert_eq!(series(&router), 1);
    router.sync(&[], &f.labels, &f.warmer);
    assert_eq!(series(&router), 0);
}

/// Work that looked its split up before the deployment went still records into the series,
/// which go once that work has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_under_way_when_a_deployment_goes_keeps_its_series_until_it_ends() {
    let f = Fixture::new("forget-later");
    let a = f.artifact(1, 0.5, None);
    let router = router();
    f.serve(&router, &f.kd(&a, true, &a, 10, "Progressing"))
        .await;
    let series = |router: &Router| {
        prometheus::core::Collector::collect(&router.metrics.ops)[0]
            .get_metric()
            .len()
    };
    let Held { serving, busy } = router.get("ns", "k").unwrap();
    router.sync(&[], &f.labels, &f.warmer);
    let x = Arc::new(uniform(2 * 8 * 8, 7, 1.0));
    assert!(serving.route(params(), x, busy).await.is_ok());
    assert_eq!(series(&router), 1, "recorded");
    drained(&serving).await;
    router.sync(&[], &f.labels, &f.warmer);
    assert_eq!(series(&router), 0, "gone with the work");
}
