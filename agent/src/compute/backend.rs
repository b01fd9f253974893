//! The backend contract: device buffers, in-order streams, events, and the ops of training.
//!
//! It follows CUDA's model so that both backends fit it: work is enqueued on a stream and
//! runs in order there; an [`Event`] marks a point in a stream that other streams (or async
//! code) wait for; a failed op poisons the buffers it would have written, and the error
//! surfaces where they are read back.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

use super::conv::Conv2dParams;
use super::{ComputeError, lock};

/// An op a backend runs on a stream. Inputs and outputs are listed with each variant.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Op {
    /// `[x, w, b?] -> [y]`
    Conv2d(Conv2dParams),
    /// `[x, w, dy] -> [dx, dw, db]`
    Conv2dBackward(Conv2dParams),
    /// `[x] -> [max(x, 0)]`
    Relu,
    /// `[y, dy] -> [dy masked where y <= 0]`
    ReluBackward,
    /// `[prediction, target] -> [loss (1 element), d loss / d prediction]`
    Mse,
    /// `[w, grad, velocity] -> [w', velocity']`
    Sgd { learning_rate: f32, momentum: f32 },
    /// `[a, b] -> [alpha * a + b]`
    Axpy { alpha: f32 },
}

impl Op {
    /// How many outputs the op writes.
    pub fn outputs(&self) -> usize {
        match self {
            Op::Conv2dBackward(_) => 3,
            Op::Mse | Op::Sgd { .. } => 2,
            _ => 1,
        }
    }
}

/// A compute backend.
pub trait Backend: Send + Sync + 'static {
    /// A device buffer. Clones share it; the memory lives while any clone or queued op does.
    type Buffer: Clone + Send + Sync + 'static;

    /// `cuda` or `cpu`.
    fn name(&self) -> &'static str;
    /// Streams available; stream ids are `0..streams()`.
    fn streams(&self) -> usize;
    /// Enqueues a copy of host data into a new device buffer.
    fn upload(&self, stream: usize, data: Arc<Vec<f32>>) -> Self::Buffer;
    /// A buffer of long-lived data (a kernel's weights) that work on any stream may read:
    /// copied to the device once, or on the CPU the host data itself.
    fn resident(&self, data: Arc<Vec<f32>>) -> Self::Buffer;
    /// Enqueues `op` on `stream`; returns its output buffers.
    fn launch(&self, stream: usize, op: Op, inputs: &[&Self::Buffer]) -> Vec<Self::Buffer>;
    /// Enqueues a copy back to the host, complete when the returned event fires.
    fn download(&self, stream: usize, buffer: &Self::Buffer) -> (Event, Download);
    /// Records an event that fires once everything enqueued on `stream` so far has run.
    fn record(&self, stream: usize) -> Event;
    /// Makes later work on `stream` wait until `event` fires.
    fn wait(&self, stream: usize, event: &Event);
    /// Busy time over wall time of each stream since the backend started.
    fn utilization(&self) -> Vec<f64>;
}

/// Where a download's data lands: shared, so that a CPU buffer's data is handed over, not
/// copied.
pub type Download = Arc<Mutex<Option<Result<Arc<Vec<f32>>, ComputeError>>>>;

/// A landed download's data; a copy only when something else still holds it (a buffer the
/// caller kept).
pub fn take_download(sink: &Download) -> Result<Vec<f32>, ComputeError> {
    let landed = lock(sink).take();
    landed
        .unwrap_or_else(|| Err(ComputeError::Stopped("download lost".into())))
        .map(Arc::unwrap_or_clone)
}

/// A completion signal. Threads block on it; async code awaits it without blocking; work
/// can be left with it, to run when it fires.
#[derive(Clone, Default)]
pub struct Event(Arc<EventInner>);

#[derive(Default)]
struct EventInner {
    state: Mutex<EventState>,
    cv: Condvar,
    notify: Notify,
}

#[derive(Default)]
struct EventState {
    done: bool,
    then: Vec<Box<dyn FnOnce() + Send>>,
}

impl Event {
    fn state(&self) -> MutexGuard<'_, EventState> {
        lock(&self.0.state)
    }

    /// Fires the event: runs the work left with it (and any left meanwhile), then marks it
    /// done and wakes every waiter, which thus finds that work done (an op's place under the
    /// cap given back, say).
    pub fn fire(&self) {
        loop {
            let then = {
                let mut state = self.state();
                if state.then.is_empty() {
                    state.done = true;
                    break;
                }
                std::mem::take(&mut state.then)
            };
            then.into_iter().for_each(|f| f());
        }
        self.0.cv.notify_all();
        self.0.notify.notify_waiters();
    }

    /// Whether `other` is this event or a clone of it.
    pub fn same(&self, other: &Event) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    pub fn is_done(&self) -> bool {
        self.state().done
    }

    /// Runs `f` once the event has fired: on the thread that fires it, or at once on this
    /// one if it has.
    pub fn then(&self, f: impl FnOnce() + Send + 'static) {
        let mut state = self.state();
        if state.done {
            drop(state);
            f();
        } else {
            state.then.push(Box::new(f));
        }
    }

    /// Blocks the calling thread until the event fires. Never call it on an async runtime thread.
    pub fn wait_blocking(&self) {
        let mut state = self.state();
        while !state.done {
            state = self
                .0
                .cv
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Resolves once the event fires; dropping the future is harmless.
    pub async fn fired(&self) {
        loop {
            let notified = self.0.notify.notified();
            tokio::pin!(notified);
            // Register before checking, so that a fire in between is not missed.
            notified.as_mut().enable();
            if self.is_done() {
                return;
            }
            notified.await;
        }
    }
}
