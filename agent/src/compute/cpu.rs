//! The CPU backend: a stream is an in-order queue drained on rayon's pool, an event a
//! completion signal, and the ops use the pool's threads too.
//!
//! A stream's steps run on the pool rather than on a thread of the stream's own: an op's
//! work then fans out from a pool thread, where rayon needs no hand-off to reach the rest
//! of the pool, and a stream needs no thread of its own to wake (on this project's VMs,
//! each cross-thread wake-up is a good part of the async overhead on a small convolution).

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use faer::Par;

use super::backend::{Backend, Download, Event, Op};
use super::{ComputeError, conv, lock, ops, recycle};

type Job = Box<dyn FnOnce() + Send>;
type Slot = OnceLock<Result<Arc<Vec<f32>>, ComputeError>>;

/// A CPU device buffer: written once by the op that produces it. The last one to let go of
/// its data gives it to [`recycle`], for a later op's output.
#[derive(Clone, Default)]
pub struct CpuBuffer(Arc<Slot>);

impl Drop for CpuBuffer {
    fn drop(&mut self) {
        let data = Arc::get_mut(&mut self.0).and_then(OnceLock::take);
        if let Some(Ok(data)) = data
            && let Ok(data) = Arc::try_unwrap(data)
        {
            recycle::give(data);
        }
    }
}

impl CpuBuffer {
    /// A buffer holding `data` now, readable from any stream.
    fn ready(data: Arc<Vec<f32>>) -> Self {
        let buffer = Self::default();
        drop(buffer.0.set(Ok(data)));
        buffer
    }

    /// A buffer that reads back as `error`.
    pub fn failed(error: ComputeError) -> Self {
        Self(Arc::new(OnceLock::from(Err(error))))
    }

    fn read(&self) -> Result<Arc<Vec<f32>>, ComputeError> {
        match self.0.get() {
            Some(r) => r.clone(),
            None => Err(ComputeError::Ordering(
                "a buffer was read before the op writing it ran (missing event wait)".into(),
            )),
        }
    }
}

/// A step of a stream: work to run, or an event to wait for.
enum Step {
    Run(Job),
    Wait(Event),
}

/// An in-order queue of steps. One pool task at a time drains it; waiting for an event that
/// has not fired ends that task, and the event's firing starts the next, so that a wait
/// never holds a pool thread.
#[derive(Default)]
struct Stream {
    steps: Mutex<Steps>,
    busy_nanos: AtomicU64,
}

#[derive(Default)]
struct Steps {
    queue: VecDeque<Step>,
    draining: bool,
}

impl Stream {
    fn steps(&self) -> MutexGuard<'_, Steps> {
        lock(&self.steps)
    }

    fn push(self: &Arc<Self>, step: Step) {
        let mut steps = self.steps();
        steps.queue.push_back(step);
        if !std::mem::replace(&mut steps.draining, true) {
            drop(steps);
            self.clone().resume();
        }
    }

    fn resume(self: Arc<Self>) {
        rayon::spawn(move || self.drain());
    }

    /// Runs the steps in order until the queue is empty or an event is pending.
    fn drain(self: Arc<Self>) {
        loop {
            let step = {
                let mut steps = self.steps();
                let Some(step) = steps.queue.pop_front() else {
                    steps.draining = false;
                    return;
                };
                step
            };
            match step {
                Step::Run(job) => {
                    let start = Instant::now();
                    // A panic would abort the process on a pool thread. Caught, it leaves
                    // the job's outputs unwritten, which their readers see as an error.
                    if std::panic::catch_unwind(AssertUnwindSafe(job)).is_err() {
                        tracing::error!("a CPU stream's work panicked");
                    }
                    let busy = start.elapsed().as_nanos() as u64;
                    self.busy_nanos.fetch_add(busy, Ordering::Relaxed);
                }
                Step::Wait(event) => {
                    if !event.is_done() {
                        return event.then(move || self.resume());
                    }
                }
            }
        }
    }
}

/// Test hook: makes every `n`-th launched op fail, or panic. Off unless a test sets it;
/// nothing a KernelDeployment says can reach it.
#[derive(Default)]
pub struct FaultInjection {
    every: AtomicUsize,
    count: AtomicUsize,
    panics: AtomicBool,
}

impl FaultInjection {
    pub fn fail_every(&self, n: usize) {
        self.every.store(n, Ordering::Relaxed);
    }

    /// The ops that fail panic instead.
    pub fn panic_instead(&self) {
        self.panics.store(true, Ordering::Relaxed);
    }

    fn trip(&self) -> Result<(), ComputeError> {
        let every = self.every.load(Ordering::Relaxed);
        if every == 0 || self.count.fetch_add(1, Ordering::Relaxed) % every != every - 1 {
            return Ok(());
        }
        assert!(!self.panics.load(Ordering::Relaxed), "injected panic");
        Err(ComputeError::Injected)
    }
}

/// Streams running f32 ops on rayon's pool.
pub struct CpuBackend {
    streams: Vec<Arc<Stream>>,
    par: Par,
    started: Instant,
    pub faults: Arc<FaultInjection>,
}

impl CpuBackend {
    /// `streams` streams; each op's work uses `threads` cores (0: all).
    pub fn new(streams: usize, threads: usize) -> Self {
        Self {
            streams: (0..streams.max(1)).map(|_| Arc::default()).collect(),
            par: Par::rayon(threads),
            started: Instant::now(),
            faults: Arc::default(),
        }
    }

    fn enqueue(&self, stream: usize, step: Step) {
        self.streams[stream % self.streams.len()].push(step);
    }
}

/// Runs `op` on host data; the CPU backend's ops and the synchronous path share this.
pub fn run_op(op: Op, inputs: &[&[f32]], par: Par) -> Result<Vec<Vec<f32>>, ComputeError> {
    let arity = |n: usize| {
        if inputs.len() < n {
            Err(ComputeError::Shape(format!(
                "{op:?} takes {n} inputs, got {}",
                inputs.len()
            )))
        } else {
            Ok(())
        }
    };
    // Element-wise ops take inputs of one length, as on CUDA: zipping would drop a tail.
    let same = |n: usize| {
        arity(n)?;
        let lens: Vec<usize> = inputs[..n].iter().map(|i| i.len()).collect();
        if lens.windows(2).any(|l| l[0] != l[1]) {
            return Err(ComputeError::Shape(format!(
                "{op:?} takes inputs of one length, got {lens:?}"
            )));
        }
        Ok(())
    };
    match op {
        Op::Conv2d(p) => {
            arity(2)?;
            p.check()?;
            let mut y = recycle::take(p.output_len());
            let (x, w, b) = (inputs[0], inputs[1], inputs.get(2).copied());
            match conv::forward_into(&p, x, w, b, &mut y, par) {
                Ok(()) => Ok(vec![y]),
                Err(e) => {
                    recycle::give(y);
                    Err(e)
                }
            }
        }
        Op::Conv2dBackward(p) => {
            arity(3)?;
            let g = conv::backward(&p, inputs[0], inputs[1], inputs[2], par)?;
            Ok(vec![g.dx, g.dw, g.db])
        }
        Op::Relu => {
            arity(1)?;
            let mut y = inputs[0].to_vec();
            ops::relu(&mut y);
            Ok(vec![y])
        }
        Op::ReluBackward => {
            same(2)?;
            let mut dy = inputs[1].to_vec();
            ops::relu_backward(inputs[0], &mut dy);
            Ok(vec![dy])
        }
        Op::Mse => {
            same(2)?;
            let (loss, grad) = ops::mse(inputs[0], inputs[1]);
            Ok(vec![vec![loss], grad])
        }
        Op::Sgd {
            learning_rate,
            momentum,
        } => {
            same(3)?;
            let (mut w, mut v) = (inputs[0].to_vec(), inputs[2].to_vec());
            ops::sgd(&mut w, inputs[1], &mut v, learning_rate, momentum);
            Ok(vec![w, v])
        }
        Op::Axpy { alpha } => {
            same(2)?;
            Ok(vec![
                inputs[0]
                    .iter()
                    .zip(inputs[1])
                    .map(|(a, b)| alpha * a + b)
                    .collect(),
            ])
        }
    }
}

/// Runs `op` on the data of `inputs` into `outputs`: every output gets the result or the error.
fn execute(
    op: Op,
    inputs: &[CpuBuffer],
    outputs: &[CpuBuffer],
    par: Par,
    faults: Option<&FaultInjection>,
) {
    let result = inputs
        .iter()
        .map(CpuBuffer::read)
        .collect::<Result<Vec<_>, _>>()
        .and_then(|data| {
            let views: Vec<&[f32]> = data.iter().map(|d| d.as_slice()).collect();
            // Caught here, a panic becomes the outputs' error, which names the op.
            std::panic::catch_unwind(AssertUnwindSafe(|| {
                faults.map_or(Ok(()), FaultInjection::trip)?;
                run_op(op, &views, par)
            }))
            .unwrap_or_else(|_| Err(ComputeError::Device(format!("{op:?} panicked"))))
        });
    match result {
        Ok(values) => outputs
            .iter()
            .zip(values)
            .for_each(|(o, v)| drop(o.0.set(Ok(Arc::new(v))))),
        Err(e) => outputs.iter().for_each(|o| drop(o.0.set(Err(e.clone())))),
    }
}

/// Copies a buffer into a download's sink and fires its event.
fn land(buffer: CpuBuffer, sink: &Download, signal: &Event) {
    let data = buffer.read();
    // Let go of the buffer before the waiter wakes, so that it may take the data uncopied.
    drop(buffer);
    *lock(sink) = Some(data);
    signal.fire();
}

/// The synchronous path as a backend: every call does its work at once on the calling thread,
/// with nothing in flight. The ops and their arithmetic are the streams' own, so the same op
/// sequence with the same `threads` gives the same bits, which is what makes it a fallback
/// that does not change a training run's results.
pub struct InlineBackend {
    par: Par,
    started: Instant,
    busy_nanos: AtomicU64,
}

impl InlineBackend {
    /// Each op's matmuls use `threads` cores (0: all).
    pub fn new(threads: usize) -> Self {
        Self {
            par: Par::rayon(threads),
            started: Instant::now(),
            busy_nanos: AtomicU64::new(0),
        }
    }
}

impl Backend for InlineBackend {
    type Buffer = CpuBuffer;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn streams(&self) -> usize {
        1
    }

    fn upload(&self, _stream: usize, data: Arc<Vec<f32>>) -> CpuBuffer {
        CpuBuffer::ready(data)
    }

    fn resident(&self, data: Arc<Vec<f32>>) -> CpuBuffer {
        CpuBuffer::ready(data)
    }

    fn launch(&self, _stream: usize, op: Op, inputs: &[&CpuBuffer]) -> Vec<CpuBuffer> {
        let start = Instant::now();
        let outputs: Vec<CpuBuffer> = (0..op.outputs()).map(|_| CpuBuffer::default()).collect();
        let inputs: Vec<CpuBuffer> = inputs.iter().map(|b| (*b).clone()).collect();
        execute(op, &inputs, &outputs, self.par, None);
        self.busy_nanos
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        outputs
    }

    fn download(&self, _stream: usize, buffer: &CpuBuffer) -> (Event, Download) {
        let (event, sink) = (Event::default(), Download::default());
        land(buffer.clone(), &sink, &event);
        (event, sink)
    }

    fn record(&self, _stream: usize) -> Event {
        let event = Event::default();
        event.fire();
        event
    }

    fn wait(&self, _stream: usize, event: &Event) {
        // Work here is done when enqueued, so only another backend's event can be pending.
        event.wait_blocking();
    }

    fn utilization(&self) -> Vec<f64> {
        let wall = self.started.elapsed().as_nanos().max(1) as f64;
        vec![self.busy_nanos.load(Ordering::Relaxed) as f64 / wall]
    }
}

impl Backend for CpuBackend {
    type Buffer = CpuBuffer;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn streams(&self) -> usize {
        self.streams.len()
    }

    fn resident(&self, data: Arc<Vec<f32>>) -> CpuBuffer {
        CpuBuffer::ready(data)
    }

    fn upload(&self, stream: usize, data: Arc<Vec<f32>>) -> CpuBuffer {
        let buffer = CpuBuffer::default();
        let slot = buffer.0.clone();
        self.enqueue(
            stream,
            Step::Run(Box::new(move || drop(slot.set(Ok(data))))),
        );
        buffer
    }

    fn launch(&self, stream: usize, op: Op, inputs: &[&CpuBuffer]) -> Vec<CpuBuffer> {
        let outputs: Vec<CpuBuffer> = (0..op.outputs()).map(|_| CpuBuffer::default()).collect();
        let inputs: Vec<CpuBuffer> = inputs.iter().map(|b| (*b).clone()).collect();
        let written = outputs.clone();
        let (par, faults) = (self.par, self.faults.clone());
        self.enqueue(
            stream,
            Step::Run(Box::new(move || {
                execute(op, &inputs, &written, par, Some(&faults))
            })),
        );
        outputs
    }

    fn download(&self, stream: usize, buffer: &CpuBuffer) -> (Event, Download) {
        let event = Event::default();
        let out: Download = Arc::default();
        let (buffer, sink, signal) = (buffer.clone(), out.clone(), event.clone());
        self.enqueue(
            stream,
            Step::Run(Box::new(move || land(buffer, &sink, &signal))),
        );
        (event, out)
    }

    fn record(&self, stream: usize) -> Event {
        let event = Event::default();
        let signal = event.clone();
        self.enqueue(stream, Step::Run(Box::new(move || signal.fire())));
        event
    }

    fn wait(&self, stream: usize, event: &Event) {
        self.enqueue(stream, Step::Wait(event.clone()));
    }

    fn utilization(&self) -> Vec<f64> {
        let wall = self.started.elapsed().as_nanos().max(1) as f64;
        self.streams
            .iter()
            .map(|s| s.busy_nanos.load(Ordering::Relaxed) as f64 / wall)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;
    use crate::compute::backend::take_download;

    /// A buffer's last holder gives its memory to the pool; while anyone else still holds the
    /// data, it stays theirs.
    #[test]
    fn a_buffer_let_go_gives_its_memory_back() {
        // A length no other test's outputs come near, so that none takes it meanwhile.
        const LEN: usize = 777_773;
        let data = Arc::new(vec![3.5; LEN]);
        let at = data.as_ptr();
        drop(CpuBuffer::ready(data.clone()));
        assert!(recycle::take(LEN).is_empty(), "still held");
        let buffer = CpuBuffer::ready(data);
        drop(buffer.clone());
        assert!(
            recycle::take(LEN).is_empty(),
            "a clone of the buffer still holds it"
        );
        drop(buffer);
        let back = recycle::take(LEN);
        assert_eq!((back.as_ptr(), back.len()), (at, LEN));
    }

    /// Fires `tx` once `event` has fired.
    fn signal(event: &Event) -> mpsc::Receiver<()> {
        let (tx, rx) = mpsc::channel();
        event.then(move || {
            let _ = tx.send(());
        });
        rx
    }

    #[test]
    fn element_wise_ops_refuse_inputs_of_different_lengths() {
        let (long, short) = ([1.0, 2.0], [1.0]);
        let sgd = Op::Sgd {
            learning_rate: 0.1,
            momentum: 0.9,
        };
        for (op, inputs) in [
            (Op::Axpy { alpha: 2.0 }, vec![&long[..], &short]),
            (Op::Mse, vec![&long, &short]),
            (Op::ReluBackward, vec![&short, &long]),
            (sgd, vec![&long, &short, &long]),
        ] {
            let err = run_op(op, &inputs, Par::Seq).unwrap_err();
            assert!(matches!(err, ComputeError::Shape(_)), "{op:?}: {err}");
        }
        let ok = run_op(sgd, &[&long, &long, &long], Par::Seq).unwrap();
        assert_eq!(ok.len(), 2);
    }

    #[test]
    fn waiting_streams_hold_no_pool_thread() {
        // More streams held up than the pool has threads: were a wait to block its thread,
        // the last stream's work would find none free.
        let held = rayon::current_num_threads() + 1;
        let b = CpuBackend::new(held + 1, 1);
        let gate = Event::default();
        let uploads: Vec<_> = (0..held)
            .map(|s| {
                b.wait(s, &gate);
                b.upload(s, Arc::new(vec![s as f32]))
            })
            .collect();
        let (done, sink) = b.download(held, &b.upload(held, Arc::new(vec![7.0])));
        let free = signal(&done).recv_timeout(Duration::from_secs(30));
        assert!(free.is_ok(), "a free stream's work waited for held-up ones");
        assert_eq!(take_download(&sink).unwrap(), [7.0]);
        assert!(
            uploads.iter().all(|u| u.read().is_err()),
            "work ran past a wait"
        );

        gate.fire();
        for (s, upload) in uploads.iter().enumerate() {
            let (landed, sink) = b.download(s, upload);
            assert!(
                signal(&landed)
                    .recv_timeout(Duration::from_secs(30))
                    .is_ok()
            );
            assert_eq!(take_download(&sink).unwrap(), [s as f32]);
        }
    }
}
