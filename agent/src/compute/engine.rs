//! The async API: ops from many tasks spread over a backend's stream pool, with a cap on ops
//! in flight and an optional synchronous fallback. Futures never block a runtime thread: they
//! await completion events that the streams (or the GPU) fire.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use faer::Par;
use kernelflow_crds::kernel_deployment::RolloutFlags;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::ComputeError;
use super::backend::{Backend, Op, take_download};
use super::cpu::run_op;

/// How an engine runs: the rollout flags that size and shape it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    pub max_concurrent_ops: usize,
    pub fallback_on_error: bool,
}

impl From<&RolloutFlags> for EngineConfig {
    fn from(f: &RolloutFlags) -> Self {
        Self {
            max_concurrent_ops: f.max_concurrent_ops as usize,
            fallback_on_error: f.fallback_on_error,
        }
    }
}

/// Counters of an engine's work.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub ops: AtomicU64,
    pub errors: AtomicU64,
    pub fallbacks: AtomicU64,
}

/// Runs ops on a backend's streams.
pub struct Engine<B: Backend> {
    backend: Arc<B>,
    limit: Arc<Semaphore>,
    in_flight: Arc<Vec<AtomicUsize>>,
    config: EngineConfig,
    pub stats: Arc<EngineStats>,
}

impl<B: Backend> Clone for Engine<B> {
    fn clone(&self) -> Self {
        Self {
            backend: self.backend.clone(),
            limit: self.limit.clone(),
            in_flight: self.in_flight.clone(),
            config: self.config,
            stats: self.stats.clone(),
        }
    }
}

/// A stream chosen for one op; frees its slot when dropped.
struct Lease {
    stream: usize,
    in_flight: Arc<Vec<AtomicUsize>>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.in_flight[self.stream].fetch_sub(1, Ordering::Relaxed);
    }
}

impl<B: Backend> Engine<B> {
    pub fn new(backend: Arc<B>, config: EngineConfig) -> Self {
        let in_flight = Arc::new(
            (0..backend.streams())
                .map(|_| AtomicUsize::new(0))
                .collect(),
        );
        Self {
            backend,
            limit: Arc::new(Semaphore::new(config.max_concurrent_ops.max(1))),
            in_flight,
            config,
            stats: Arc::default(),
        }
    }

    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    /// The least-loaded stream (ties to the lowest id).
    fn lease(&self) -> Lease {
        let stream = self
            .in_flight
            .iter()
            .enumerate()
            .min_by_key(|(_, n)| n.load(Ordering::Relaxed))
            .map_or(0, |(i, _)| i);
        self.in_flight[stream].fetch_add(1, Ordering::Relaxed);
        Lease {
            stream,
            in_flight: self.in_flight.clone(),
        }
    }

    /// Runs `op` asynchronously on the least-loaded stream and returns its outputs. With
    /// `fallbackOnError`, a failed op is re-run on the synchronous path and counted.
    pub async fn run(
        &self,
        op: Op,
        inputs: Vec<Arc<Vec<f32>>>,
    ) -> Result<Vec<Vec<f32>>, ComputeError> {
        Ok(self.run_with(op, inputs, &[]).await?.0)
    }

    /// Like [`Engine::run`], with the last inputs already on the device as `resident` (a
    /// kernel's weights, uploaded once): only the others are uploaded. The synchronous
    /// fallback still reads all of `inputs`. Also says whether the fallback produced the
    /// outputs.
    pub async fn run_with(
        &self,
        op: Op,
        inputs: Vec<Arc<Vec<f32>>>,
        resident: &[B::Buffer],
    ) -> Result<(Vec<Vec<f32>>, bool), ComputeError> {
        if resident.len() > inputs.len() {
            return Err(ComputeError::Shape(format!(
                "{} resident buffers for {} inputs",
                resident.len(),
                inputs.len()
            )));
        }
        // Held by this future and by the op on its stream, whichever ends last: an op whose
        // caller gave up keeps its place under the cap until the device is done with it.
        let permit = Arc::new(
            self.limit
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| ComputeError::Stopped("the engine is closed".into()))?,
        );
        self.stats.ops.fetch_add(1, Ordering::Relaxed);
        match self.on_stream(op, &inputs, resident, permit.clone()).await {
            Err(e) if self.config.fallback_on_error && e.may_fall_back() => {
                tracing::debug!(error = %e, ?op, "async op failed; re-running synchronously");
                self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
                let sync = tokio::task::spawn_blocking(move || run_sync(op, &inputs)).await;
                sync.unwrap_or_else(|e| Err(ComputeError::Stopped(e.to_string())))
                    .inspect_err(|_| {
                        self.stats.errors.fetch_add(1, Ordering::Relaxed);
                    })
                    .map(|out| (out, true))
            }
            Err(e) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
            Ok(out) => Ok((out, false)),
        }
    }

    /// conv2d forward: `y = conv2d(x, w) + b`.
    pub async fn conv2d(
        &self,
        p: super::conv::Conv2dParams,
        x: Arc<Vec<f32>>,
        w: Arc<Vec<f32>>,
        b: Option<Arc<Vec<f32>>>,
    ) -> Result<Vec<f32>, ComputeError> {
        let inputs = [Some(x), Some(w), b].into_iter().flatten().collect();
        Ok(self.run(Op::Conv2d(p), inputs).await?.swap_remove(0))
    }

    /// Runs `op` on the least-loaded stream, which it holds, with `permit`, until its last
    /// download lands, even if this future is dropped before.
    async fn on_stream(
        &self,
        op: Op,
        inputs: &[Arc<Vec<f32>>],
        resident: &[B::Buffer],
        permit: Arc<OwnedSemaphorePermit>,
    ) -> Result<Vec<Vec<f32>>, ComputeError> {
        let lease = self.lease();
        let stream = lease.stream;
        let buffers: Vec<B::Buffer> = inputs[..inputs.len() - resident.len()]
            .iter()
            .map(|d| self.backend.upload(stream, d.clone()))
            .chain(resident.iter().cloned())
            .collect();
        let refs: Vec<&B::Buffer> = buffers.iter().collect();
        let outputs = self.backend.launch(stream, op, &refs);
        let downloads: Vec<_> = outputs
            .iter()
            .map(|o| self.backend.download(stream, o))
            .collect();
        // Streams run in order: the last download's event covers the others.
        if let Some((event, _)) = downloads.last() {
            event.then(move || drop((lease, permit)));
            event.fired().await;
        }
        // Ours dropped, the downloads hold the only references: no copies.
        drop((buffers, outputs));
        downloads
            .into_iter()
            .map(|(_, sink)| take_download(&sink))
            .collect()
    }
}

/// The synchronous path: `op` runs to completion on the calling thread, on all cores.
pub fn run_sync(op: Op, inputs: &[Arc<Vec<f32>>]) -> Result<Vec<Vec<f32>>, ComputeError> {
    let views: Vec<&[f32]> = inputs.iter().map(|d| d.as_slice()).collect();
    run_op(op, &views, Par::rayon(0))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::compute::backend::Event;
    use crate::compute::conv::{self, Conv2dParams};
    use crate::compute::cpu::CpuBackend;
    use crate::compute::ops::uniform;

    fn params(batch: usize) -> Conv2dParams {
        Conv2dParams {
            padding: [1, 1],
            ..conv::tests::plain(batch, 8, [12, 12], 8, 3)
        }
    }

    fn engine(streams: usize, fallback: bool) -> Engine<CpuBackend> {
        capped(streams, 8, fallback)
    }

    fn capped(streams: usize, max_concurrent_ops: usize, fallback: bool) -> Engine<CpuBackend> {
        Engine::new(
            Arc::new(CpuBackend::new(streams, 1)),
            EngineConfig {
                max_concurrent_ops,
                fallback_on_error: fallback,
            },
        )
    }

    /// Holds up stream 0 until the returned event fires.
    fn hold_stream_0(e: &Engine<CpuBackend>) -> Event {
        let gate = Event::default();
        e.backend().wait(0, &gate);
        gate
    }

    /// A conv2d of `x` by `w` on `e`, as a task of its own.
    fn spawn_conv(
        e: &Engine<CpuBackend>,
        p: Conv2dParams,
        (x, w): (&Arc<Vec<f32>>, &Arc<Vec<f32>>),
    ) -> tokio::task::JoinHandle<Result<Vec<f32>, ComputeError>> {
        let (e, x, w) = (e.clone(), x.clone(), w.clone());
        tokio::spawn(async move { e.conv2d(p, x, w, None).await })
    }

    /// An input and weights for `params(batch)`.
    fn inputs(batch: usize) -> (Arc<Vec<f32>>, Arc<Vec<f32>>) {
        let p = params(batch);
        (
            Arc::new(uniform(p.input_len(), 1, 1.0)),
            Arc::new(uniform(p.weight_len(), 2, 1.0)),
        )
    }

    /// Many tasks at once on a two-thread runtime: every result equals the synchronous path's.
    #[test]
    fn concurrent_ops_match_the_synchronous_path() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let engine = engine(3, false);
        let p = params(2);
        let w = Arc::new(uniform(p.weight_len(), 1, 0.5));
        let results = rt.block_on(async {
            let tasks: Vec<_> = (0..64u64)
                .map(|i| {
                    let (engine, w) = (engine.clone(), w.clone());
                    tokio::spawn(async move {
                        let x = Arc::new(uniform(p.input_len(), 100 + i, 1.0));
                        let y = engine.conv2d(p, x.clone(), w.clone(), None).await.unwrap();
                        (x, y)
                    })
                })
                .collect();
            futures_join(tasks).await
        });
        for (x, y) in results {
            let sync = run_sync(Op::Conv2d(p), &[x, w.clone()]).unwrap();
            assert_eq!(y, sync[0]);
        }
        assert_eq!(engine.stats.ops.load(Ordering::Relaxed), 64);
        assert!(
            engine.backend().utilization().iter().all(|u| *u > 0.0),
            "every stream got work"
        );
    }

    async fn futures_join<T>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn failures_fall_back_to_the_synchronous_path_when_allowed() {
        let (p, (x, w)) = (params(1), inputs(1));
        let expected = run_sync(Op::Conv2d(p), &[x.clone(), w.clone()])
            .unwrap()
            .swap_remove(0);

        let with = engine(2, true);
        with.backend().faults.fail_every(1);
        assert_eq!(
            with.conv2d(p, x.clone(), w.clone(), None).await.unwrap(),
            expected
        );
        assert_eq!(with.stats.fallbacks.load(Ordering::Relaxed), 1);

        let without = engine(2, false);
        without.backend().faults.fail_every(1);
        assert_eq!(
            without.conv2d(p, x, w, None).await.unwrap_err(),
            ComputeError::Injected
        );
        assert_eq!(without.stats.errors.load(Ordering::Relaxed), 1);
    }

    /// A CPU op that panics fails as the device, naming the op; the synchronous path may
    /// still serve it, and counts it as a fallback, not an error.
    #[tokio::test]
    async fn a_panicking_op_is_a_device_error() {
        let (p, (x, w)) = (params(1), inputs(1));
        let panicking = |fallback| {
            let e = engine(1, fallback);
            e.backend().faults.fail_every(1);
            e.backend().faults.panic_instead();
            e
        };
        let without = panicking(false);
        let err = without.conv2d(p, x.clone(), w.clone(), None).await;
        assert!(
            matches!(&err, Err(ComputeError::Device(m)) if m.contains("Conv2d")),
            "{err:?}"
        );
        assert_eq!(without.stats.errors.load(Ordering::Relaxed), 1);
        let with = panicking(true);
        let y = with.conv2d(p, x.clone(), w.clone(), None).await.unwrap();
        assert_eq!(y, run_sync(Op::Conv2d(p), &[x, w]).unwrap()[0]);
        assert_eq!(with.stats.fallbacks.load(Ordering::Relaxed), 1);
        assert_eq!(with.stats.errors.load(Ordering::Relaxed), 0);
    }

    /// Inputs that do not fit fail as such, and are not re-run synchronously: that would
    /// fail alike and count a fallback for the caller's mistake.
    #[tokio::test]
    async fn shape_errors_are_typed() {
        for fallback in [false, true] {
            let e = engine(1, fallback);
            let (x, w) = (Arc::new(vec![0.0; 3]), Arc::new(vec![0.0; 3]));
            let err = e.conv2d(params(1), x, w, None).await.unwrap_err();
            assert!(matches!(err, ComputeError::Shape(_)), "{err}");
            assert_eq!(e.stats.fallbacks.load(Ordering::Relaxed), 0);
            assert_eq!(e.stats.errors.load(Ordering::Relaxed), 1);
        }
    }

    /// Weights already on the device take the place of the last inputs: the same result,
    /// and more resident buffers than inputs is a typed error, not a panic.
    #[tokio::test]
    async fn resident_inputs_replace_the_last_uploads() {
        let e = engine(2, false);
        let p = params(1);
        let (x, w) = (
            uniform(p.input_len(), 1, 1.0),
            uniform(p.weight_len(), 2, 0.5),
        );
        let (x, w) = (Arc::new(x), Arc::new(w));
        let resident = [e.backend().resident(w.clone())];
        let inputs = vec![x.clone(), w.clone()];
        let y = e.run_with(Op::Conv2d(p), inputs, &resident).await.unwrap();
        let sync = run_sync(Op::Conv2d(p), &[x.clone(), w]).unwrap();
        assert_eq!(y, (sync, false));
        let two = [resident[0].clone(), resident[0].clone()];
        let err = e.run_with(Op::Relu, vec![x], &two).await.unwrap_err();
        assert!(matches!(err, ComputeError::Shape(_)), "{err}");
    }

    /// A future dropped while its op waits in the stream: the op still runs later on buffers
    /// kept alive by the queue, and keeps its place under the cap until it has, so that
    /// callers who give up cannot pile work onto the device.
    #[tokio::test]
    async fn dropping_a_future_is_safe() {
        let e = capped(1, 1, false);
        let (p, (x, w)) = (params(2), inputs(2));
        let gate = hold_stream_0(&e);
        let give_up = |e: Engine<CpuBackend>, x: Arc<Vec<f32>>, w: Arc<Vec<f32>>| async move {
            tokio::time::timeout(Duration::from_millis(50), e.conv2d(p, x, w, None)).await
        };
        assert!(
            give_up(e.clone(), x.clone(), w.clone()).await.is_err(),
            "the op cannot finish while the stream waits on the gate"
        );
        assert!(give_up(e.clone(), x.clone(), w.clone()).await.is_err());
        assert_eq!(
            e.stats.ops.load(Ordering::Relaxed),
            1,
            "the abandoned op still holds the only place"
        );
        gate.fire();
        // Admitted once the abandoned op has run on the stream.
        let y = e.conv2d(p, x.clone(), w.clone(), None).await.unwrap();
        assert_eq!(y, run_sync(Op::Conv2d(p), &[x, w]).unwrap()[0]);
        assert_eq!(e.stats.ops.load(Ordering::Relaxed), 2);
        assert_eq!(e.in_flight[0].load(Ordering::Relaxed), 0, "stream freed");
    }

    /// `maxConcurrentOps` admits that many ops at a time; the others wait for a slot before
    /// anything of theirs is enqueued.
    #[tokio::test]
    async fn ops_past_the_cap_wait_for_a_slot() {
        let e = capped(1, 2, false);
        let (p, (x, w)) = (params(1), inputs(1));
        let gate = hold_stream_0(&e);
        let ops: Vec<_> = (0..5).map(|_| spawn_conv(&e, p, (&x, &w))).collect();
        // Every task runs as far as it can while the gate holds the stream.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(e.stats.ops.load(Ordering::Relaxed), 2, "ops admitted");
        gate.fire();
        let expected = run_sync(Op::Conv2d(p), &[x, w]).unwrap().swap_remove(0);
        for op in ops {
            assert_eq!(op.await.unwrap().unwrap(), expected);
        }
        assert_eq!(e.stats.ops.load(Ordering::Relaxed), 5);
    }

    /// Each op goes to the least-loaded stream: one held up on its stream does not hold up
    /// the next, which another stream runs.
    #[tokio::test]
    async fn a_held_up_stream_does_not_hold_up_the_next_op() {
        let e = engine(2, false);
        let (p, (x, w)) = (params(1), inputs(1));
        let gate = hold_stream_0(&e);
        let held = spawn_conv(&e, p, (&x, &w));
        // The first op takes stream 0 (ties go to the lowest) and stays there.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let next = tokio::time::timeout(
            Duration::from_secs(10),
            e.conv2d(p, x.clone(), w.clone(), None),
        )
        .await
        .expect("the second op ran on the idle stream")
        .unwrap();
        assert!(!held.is_finished(), "the first op waits for its stream");
        gate.fire();
        assert_eq!(held.await.unwrap().unwrap(), next);
        assert_eq!(next, run_sync(Op::Conv2d(p), &[x, w]).unwrap()[0]);
    }
}
