//! Which device the agent computes on: chosen once at startup (`--backend`), then every engine
//! (rollout lanes, training workers) gets its streams from it.

use std::sync::Arc;

use super::backend::{Backend, Download, Event, Op};
use super::cpu::{CpuBackend, CpuBuffer};
use super::cuda::{CudaBackend, CudaBuffer, CudaDevice};
use super::{ComputeError, lock};

/// The `--backend` flag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// CUDA when a GPU and its libraries are usable, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// The device engines run on.
#[derive(Clone, Debug)]
pub enum Device {
    Cpu,
    Cuda(CudaDevice),
}

/// Picks the device for `choice` and logs the choice, with the reason for a CPU fallback, in
/// one line. `cuda` without a usable GPU is an error.
pub fn detect(choice: BackendChoice) -> Result<Device, ComputeError> {
    match choice {
        BackendChoice::Cpu => {
            tracing::info!(backend = "cpu", "compute backend chosen by --backend");
            Ok(Device::Cpu)
        }
        BackendChoice::Cuda => {
            let device = CudaDevice::open()
                .map_err(|why| ComputeError::Device(format!("--backend cuda: {why}")))?;
            tracing::info!(backend = "cuda", gpu = device.name(), "compute backend");
            Ok(Device::Cuda(device))
        }
        BackendChoice::Auto => match CudaDevice::open() {
            Ok(device) => {
                tracing::info!(backend = "cuda", gpu = device.name(), "compute backend");
                Ok(Device::Cuda(device))
            }
            Err(why) => {
                tracing::info!(backend = "cpu", reason = %why, "compute backend: CUDA is unavailable");
                Ok(Device::Cpu)
            }
        },
    }
}

impl Device {
    /// `cuda` or `cpu`, as the node report says.
    pub fn name(&self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda(_) => "cuda",
        }
    }

    /// A backend of `streams` streams; on the CPU each op's matmuls use `threads` cores (0:
    /// all). Should the GPU refuse the streams (out of memory, say), the engine runs on the
    /// CPU rather than not at all.
    pub fn backend(&self, streams: usize, threads: usize) -> DeviceBackend {
        match self {
            Device::Cpu => DeviceBackend::Cpu(CpuBackend::new(streams, threads)),
            Device::Cuda(gpu) => match CudaBackend::new(gpu, streams) {
                Ok(b) => DeviceBackend::Cuda(b),
                Err(e) => {
                    tracing::warn!(error = %e, "CUDA streams unavailable; this engine runs on the CPU");
                    DeviceBackend::Cpu(CpuBackend::new(streams, threads))
                }
            },
        }
    }
}

/// The backend of either device, so that one engine type serves both.
pub enum DeviceBackend {
    Cpu(CpuBackend),
    Cuda(CudaBackend),
}

/// A buffer of a [`DeviceBackend`].
#[derive(Clone)]
pub enum DeviceBuffer {
    Cpu(CpuBuffer),
    Cuda(CudaBuffer),
}

impl DeviceBuffer {
    /// Whether it holds the error of a failed upload or op rather than data. (A CPU buffer's
    /// error shows only when read; the CPU's uploads do not fail.)
    pub fn failed(&self) -> bool {
        match self {
            DeviceBuffer::Cpu(_) => false,
            DeviceBuffer::Cuda(b) => b.error().is_some(),
        }
    }
}

fn foreign() -> ComputeError {
    ComputeError::Device("a buffer of another backend".into())
}

impl Backend for DeviceBackend {
    type Buffer = DeviceBuffer;

    fn name(&self) -> &'static str {
        match self {
            DeviceBackend::Cpu(b) => b.name(),
            DeviceBackend::Cuda(b) => b.name(),
        }
    }

    fn streams(&self) -> usize {
        match self {
            DeviceBackend::Cpu(b) => b.streams(),
            DeviceBackend::Cuda(b) => b.streams(),
        }
    }

    fn upload(&self, stream: usize, data: Arc<Vec<f32>>) -> DeviceBuffer {
        match self {
            DeviceBackend::Cpu(b) => DeviceBuffer::Cpu(b.upload(stream, data)),
            DeviceBackend::Cuda(b) => DeviceBuffer::Cuda(b.upload(stream, data)),
        }
    }

    fn resident(&self, data: Arc<Vec<f32>>) -> DeviceBuffer {
        match self {
            DeviceBackend::Cpu(b) => DeviceBuffer::Cpu(b.resident(data)),
            DeviceBackend::Cuda(b) => DeviceBuffer::Cuda(b.resident(data)),
        }
    }

    fn launch(&self, stream: usize, op: Op, inputs: &[&DeviceBuffer]) -> Vec<DeviceBuffer> {
        match self {
            DeviceBackend::Cpu(b) => {
                let inputs: Option<Vec<&CpuBuffer>> = inputs
                    .iter()
                    .map(|i| match i {
                        DeviceBuffer::Cpu(c) => Some(c),
                        DeviceBuffer::Cuda(_) => None,
                    })
                    .collect();
                match inputs {
                    Some(inputs) => b.launch(stream, op, &inputs),
                    None => vec![CpuBuffer::failed(foreign()); op.outputs()],
                }
                .into_iter()
                .map(DeviceBuffer::Cpu)
                .collect()
            }
            DeviceBackend::Cuda(b) => {
                let inputs: Option<Vec<&CudaBuffer>> = inputs
                    .iter()
                    .map(|i| match i {
                        DeviceBuffer::Cuda(c) => Some(c),
                        DeviceBuffer::Cpu(_) => None,
                    })
                    .collect();
                match inputs {
                    Some(inputs) => b.launch(stream, op, &inputs),
                    None => vec![CudaBuffer::failed(foreign()); op.outputs()],
                }
                .into_iter()
                .map(DeviceBuffer::Cuda)
                .collect()
            }
        }
    }

    fn download(&self, stream: usize, buffer: &DeviceBuffer) -> (Event, Download) {
        match (self, buffer) {
            (DeviceBackend::Cpu(b), DeviceBuffer::Cpu(buffer)) => b.download(stream, buffer),
            (DeviceBackend::Cuda(b), DeviceBuffer::Cuda(buffer)) => b.download(stream, buffer),
            _ => {
                let (event, sink) = (Event::default(), Download::default());
                *lock(&sink) = Some(Err(foreign()));
                event.fire();
                (event, sink)
            }
        }
    }

    fn record(&self, stream: usize) -> Event {
        match self {
            DeviceBackend::Cpu(b) => b.record(stream),
            DeviceBackend::Cuda(b) => b.record(stream),
        }
    }

    fn wait(&self, stream: usize, event: &Event) {
        match self {
            DeviceBackend::Cpu(b) => b.wait(stream, event),
            DeviceBackend::Cuda(b) => b.wait(stream, event),
        }
    }

    fn utilization(&self) -> Vec<f64> {
        match self {
            DeviceBackend::Cpu(b) => b.utilization(),
            DeviceBackend::Cuda(b) => b.utilization(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::backend::take_download;
    use crate::compute::engine::{Engine, EngineConfig, run_sync};
    use crate::compute::ops::uniform;

    /// On a machine without a usable GPU (this one, in CI), `auto` is the CPU, cleanly.
    #[test]
    fn auto_without_a_gpu_is_the_cpu() {
        let _alone = crate::compute::cuda::tests::exclusive();
        let device = detect(BackendChoice::Auto).unwrap();
        match CudaDevice::open() {
            Err(_) => assert!(matches!(device, Device::Cpu), "{device:?}"),
            Ok(_) => assert!(matches!(device, Device::Cuda(_)), "{device:?}"),
        }
    }

    #[test]
    fn cuda_without_a_gpu_is_a_clear_error() {
        let _alone = crate::compute::cuda::tests::exclusive();
        let Err(why) = CudaDevice::open() else {
            println!("skipping cuda_without_a_gpu_is_a_clear_error: a GPU is usable here");
            return;
        };
        let err = detect(BackendChoice::Cuda).unwrap_err();
        assert_eq!(err, ComputeError::Device(format!("--backend cuda: {why}")));
        assert!(why.contains("not found") || why.contains("device"), "{why}");
    }

    #[test]
    fn cpu_is_the_cpu() {
        let device = detect(BackendChoice::Cpu).unwrap();
        assert_eq!(device.name(), "cpu");
        assert_eq!(device.backend(3, 1).streams(), 3);
    }

    #[tokio::test]
    async fn an_engine_on_the_cpu_device_matches_the_synchronous_path() {
        let engine = Engine::new(
            Arc::new(Device::Cpu.backend(2, 1)),
            EngineConfig {
                max_concurrent_ops: 4,
                fallback_on_error: false,
            },
        );
        let (a, b) = (Arc::new(uniform(64, 1, 1.0)), Arc::new(uniform(64, 2, 1.0)));
        let op = Op::Axpy { alpha: 0.5 };
        let got = engine.run(op, vec![a.clone(), b.clone()]).await.unwrap();
        assert_eq!(got, run_sync(op, &[a, b]).unwrap());
        assert_eq!(engine.backend().name(), "cpu");
    }

    #[test]
    fn buffers_of_another_backend_fail_the_op() {
        let backend = Device::Cpu.backend(1, 1);
        let other = DeviceBuffer::Cuda(CudaBuffer::failed(ComputeError::Injected));
        let outputs = backend.launch(0, Op::Relu, &[&other]);
        let (event, sink) = backend.download(0, &outputs[0]);
        event.wait_blocking();
        assert_eq!(take_download(&sink), Err(foreign()));
        let (event, sink) = backend.download(0, &other);
        event.wait_blocking();
        assert_eq!(take_download(&sink), Err(foreign()));
    }
}
