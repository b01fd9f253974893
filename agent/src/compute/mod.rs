//! The compute engine: async conv2d on stream pools, its gradients, training steps and
//! pipelines. No Kubernetes in here: the agent's controllers drive it.

pub mod backend;
pub mod conv;
pub mod cpu;
// The one module that talks to CUDA, and the only one allowed `unsafe`.
#[allow(unsafe_code)]
pub mod cuda;
pub mod device;
pub mod engine;
mod gemm;
pub mod ops;
pub mod pipeline;
pub mod recycle;
pub mod train;
mod winograd;

/// Locks `m`, poisoned or not: a panic elsewhere leaves this module's locked state (queues,
/// flags, lists) whole, and one failed op must not take the engine down with it.
fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Errors of compute work.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ComputeError {
    /// Tensors or parameters that do not fit together.
    #[error("shape: {0}")]
    Shape(String),
    /// Work read a buffer before the op producing it ran.
    #[error("ordering: {0}")]
    Ordering(String),
    /// A fault injected by a test.
    #[error("injected fault")]
    Injected,
    /// The engine or a pipeline stopped before the work finished.
    #[error("stopped: {0}")]
    Stopped(String),
    /// A KernelDeployment's revision failed the op (it timed out or produced a non-finite
    /// output).
    #[error("kernel: {0}")]
    Kernel(String),
    /// The device failed the op: the GPU, its driver or a CUDA library, or a CPU op that
    /// panicked.
    #[error("device: {0}")]
    Device(String),
}

impl ComputeError {
    /// Whether the synchronous path may succeed where this failed: not for inputs that do not
    /// fit the op, which it would refuse alike.
    pub fn may_fall_back(&self) -> bool {
        !matches!(self, ComputeError::Shape(_))
    }

    /// A short, stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ComputeError::Shape(_) => "shape",
            ComputeError::Ordering(_) => "ordering",
            ComputeError::Injected => "injected",
            ComputeError::Kernel(_) => "kernel",
            ComputeError::Stopped(_) => "stopped",
            ComputeError::Device(_) => "device",
        }
    }
}
