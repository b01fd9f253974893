//! The CUDA backend: cudarc over the CUDA driver API, cuDNN and cuBLAS, each library loaded at
//! run time, so the agent builds without a CUDA toolkit and runs on machines without a GPU.
//!
//! - **Streams**: a stream is a non-blocking CUDA stream with its own cuDNN and cuBLAS handles
//!   (a handle must not be used by two threads at once, so each sits behind the stream's lock)
//!   and a waiter thread. Every piece of work is enqueued between a timing event and a
//!   blocking-sync completion event; the waiter sleeps on the completion events in order, then
//!   fires download and record events, adds the GPU time to the stream's busy time and drops
//!   what the work kept alive. No async runtime thread ever blocks, and no CUDA host callback
//!   does real work.
//! - **Memory**: buffers are cudarc slices with its event tracking on (the default): a stream
//!   using a buffer that another stream writes waits for the write, and a dropped buffer's
//!   stream-ordered free waits for the last recorded use. cudarc remembers only the *last*
//!   reader, though, so every op and copy also keeps its inputs and outputs alive until its
//!   completion event fires: device memory outlives the device's use of it even when the
//!   caller drops everything at once, e.g. an abandoned future.
//! - **Copies** go through pinned staging buffers, pooled by length, so that they are truly
//!   asynchronous and overlap compute on other streams.
//! - **Convolutions** use cuDNN in FP32 (FMA math: no TF32 tensor cores, so results agree with
//!   the CPU backend's), with the algorithm chosen once per shape and op by cuDNN's heuristics
//!   and one growing workspace per stream. Forward runs an execution plan of cuDNN's graph API,
//!   built once per shape and stream (the legacy call spends 50-170 µs of host time per call
//!   re-deriving one); a shape the graph API cannot plan, and the backward passes, use the
//!   legacy calls. ReLU, bias and the bias gradient are legacy cuDNN
//!   calls; MSE, SGD and axpy are cuBLAS level-1 calls; nothing compiles code at run time.
//! - **Errors** of CUDA and its libraries become [`ComputeError::Device`]: a failed op's
//!   outputs carry its error, and downloads surface it. Nothing here panics on them.
//!
//! The only module allowed `unsafe`; each block says why it is sound.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;

use cudarc::cublas::{self, CudaBlas};
use cudarc::cudnn::{
    self, ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn,
    FilterDescriptor, TensorDescriptor,
};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{
    self, CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, PinnedHostSlice,
};

use super::backend::{Backend, Download, Event, Op};
use super::conv::Conv2dParams;
use super::{ComputeError, lock};

type Slice = CudaSlice<f32>;

/// Turns a CUDA, cuDNN or cuBLAS error into a [`ComputeError::Device`] saying what failed.
trait OrDevice<T> {
    fn or_device(self, what: &str) -> Result<T, ComputeError>;
}

impl<T, E: std::fmt::Debug> OrDevice<T> for Result<T, E> {
    fn or_device(self, what: &str) -> Result<T, ComputeError> {
        self.map_err(|e| ComputeError::Device(format!("{what}: {e:?}")))
    }
}

/// The GPU the agent computes on: device 0's primary context, shared by every backend made
/// from it, and the convolution algorithms chosen so far.
#[derive(Clone, Debug)]
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    name: String,
    algos: Arc<Mutex<HashMap<Conv2dParams, Algos>>>,
}

impl CudaDevice {
    /// Opens device 0 if this machine can run the CUDA backend, or says why not. cudarc
    /// panics when it calls into a library it cannot load, so each library is probed first;
    /// then a context and a first stream with its handles prove that the stack works.
    pub fn open() -> Result<Self, String> {
        // SAFETY: probing dlopens NVIDIA's libraries, running their initialisers as loading
        // them for use would; nothing else is touched.
        let present = unsafe {
            [
                (
                    "libcuda (the NVIDIA driver)",
                    driver::sys::is_culib_present(),
                ),
                ("libcublas", cublas::sys::is_culib_present()),
                ("libcudnn", cudnn::sys::is_culib_present()),
            ]
        };
        if let Some((lib, _)) = present.iter().find(|(_, found)| !found) {
            return Err(format!("{lib} not found"));
        }
        let count = CudaContext::device_count().map_err(|e| format!("CUDA driver: {e:?}"))?;
        if count < 1 {
            return Err("the CUDA driver sees no device".into());
        }
        // The bindings are cuDNN 9's (version numbers 9xxyy).
        let version = cudnn::result::get_version();
        if !(90_000..100_000).contains(&version) {
            return Err(format!("cuDNN {version} found; the backend needs cuDNN 9"));
        }
        let ctx = CudaContext::new(0).map_err(|e| format!("opening device 0: {e:?}"))?;
        keep_freed_memory(&ctx).map_err(|e| format!("configuring the memory pool: {e:?}"))?;
        let device = Self {
            name: ctx.name().unwrap_or_else(|_| "unknown".into()),
            ctx,
            algos: Arc::default(),
        };
        drop(CudaBackend::new(&device, 1).map_err(|e| e.to_string())?);
        // The probe is gone before the caller goes on, or exits.
        settle();
        Ok(device)
    }

    /// The GPU's name, e.g. `NVIDIA H200`.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Stream-ordered frees return memory to the device's pool, which by default hands it back to
/// the driver at every synchronisation, so that each op would pay for fresh allocations. Like
/// PyTorch's caching allocator, keep it.
fn keep_freed_memory(ctx: &CudaContext) -> Result<(), driver::DriverError> {
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    let mut threshold = u64::MAX;
    // SAFETY: the device is the context's own, and the release threshold is a u64 attribute:
    // `threshold` is one and outlives the call.
    unsafe {
        let pool = driver::result::device::get_default_mem_pool(ctx.cu_device())?;
        driver::result::mem_pool::set_attribute(
            pool,
            driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&raw mut threshold).cast(),
        )
    }
}

/// A device buffer: the memory, or the error of the op that should have written it. Clones
/// share it.
#[derive(Clone)]
pub struct CudaBuffer(Arc<Result<Slice, ComputeError>>);

impl CudaBuffer {
    /// A buffer that reads back as `error`.
    pub fn failed(error: ComputeError) -> Self {
        Self(Arc::new(Err(error)))
    }

    fn ok(slice: Slice) -> Self {
        Self(Arc::new(Ok(slice)))
    }

    fn slice(&self) -> Result<&Slice, ComputeError> {
        self.0.as_ref().as_ref().map_err(Clone::clone)
    }

    /// The error it holds instead of memory, if it does.
    pub fn error(&self) -> Option<&ComputeError> {
        self.0.as_ref().as_ref().err()
    }
}

/// Streams on the GPU running f32 ops.
pub struct CudaBackend {
    device: CudaDevice,
    streams: Vec<Stream>,
    uploads: Arc<PinnedPool>,
    downloads: Arc<PinnedPool>,
    /// Events this backend recorded and that have not fired yet, so that a stream waits for
    /// them on the GPU (`cuStreamWaitEvent`) rather than through the host.
    recorded: Mutex<Vec<(Event, Arc<CudaEvent>)>>,
    started: Instant,
}

impl CudaBackend {
    /// `streams` non-blocking streams on `device`, each with its handles and waiter thread.
    pub fn new(device: &CudaDevice, streams: usize) -> Result<Self, ComputeError> {
        let streams = (0..streams.max(1))
            .map(|i| Stream::new(&device.ctx, i))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            device: device.clone(),
            streams,
            // Write-combined memory is fast for the host to write and the device to read, and
            // very slow for the host to read: uploads only.
            uploads: Arc::new(PinnedPool::new(driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED)),
            downloads: Arc::new(PinnedPool::new(0)),
            recorded: Mutex::default(),
            started: Instant::now(),
        })
    }

    fn stream(&self, stream: usize) -> &Stream {
        &self.streams[stream % self.streams.len()]
    }

    fn try_upload(&self, s: &Stream, data: &[f32]) -> Result<CudaBuffer, ComputeError> {
        if data.is_empty() {
            // A limit of this backend, not of the op: the CPU's synchronous path serves it.
            return Err(ComputeError::Device(
                "the CUDA backend holds no empty buffers".into(),
            ));
        }
        let mut staging = self.uploads.take(&self.device.ctx, data.len())?;
        staging
            .as_mut_slice()
            .or_device("writing pinned memory")?
            .copy_from_slice(data);
        match s.submit(|_, st| st.clone_htod(&staging).or_device("copying to the device")) {
            Ok((slice, ticket)) => {
                let pool = self.uploads.clone();
                s.finish(ticket, move |_| pool.give(staging));
                Ok(CudaBuffer::ok(slice))
            }
            Err(e) => {
                self.uploads.give(staging);
                Err(e)
            }
        }
    }

    fn try_download(
        &self,
        s: &Stream,
        buffer: &CudaBuffer,
    ) -> Result<(PinnedHostSlice<f32>, Ticket), ComputeError> {
        let slice = buffer.slice()?;
        let mut staging = self.downloads.take(&self.device.ctx, slice.len())?;
        match s.submit(|_, st| {
            st.memcpy_dtoh(slice, &mut staging)
                .or_device("copying to the host")
        }) {
            Ok(((), ticket)) => Ok((staging, ticket)),
            Err(e) => {
                self.downloads.give(staging);
                Err(e)
            }
        }
    }
}

/// Teardowns of dropped backends that may still be running.
static TEARDOWNS: Mutex<Vec<std::thread::JoinHandle<()>>> = Mutex::new(Vec::new());

/// Waits until every backend dropped so far is torn down, its streams' waiter threads
/// included. A process must call this before it
/// exits: one that exits while a teardown is inside the driver or cuDNN can crash in their
/// exit handlers (seen on an H200 as a segmentation fault after the last test had passed).
pub fn settle() {
    let pending = std::mem::take(&mut *lock(&TEARDOWNS));
    for teardown in pending {
        let _ = teardown.join();
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // Destroying a cuDNN handle synchronizes the device, and freeing pinned memory may:
        // do both on a thread of its own, not on the caller's, often an async runtime's.
        let streams = std::mem::take(&mut self.streams);
        let pools = [self.uploads.clone(), self.downloads.clone()];
        let teardown = std::thread::Builder::new().name("cuda-teardown".into());
        // On failure the closure, and all it holds, drops here instead.
        let spawned = teardown.spawn(move || {
            streams.into_iter().for_each(Stream::tear_down);
            for pool in pools {
                drop(std::mem::take(&mut *lock(&pool.idle)));
            }
        });
        if let Ok(teardown) = spawned {
            let mut pending = lock(&TEARDOWNS);
            pending.retain(|t| !t.is_finished());
            pending.push(teardown);
        }
    }
}

impl Backend for CudaBackend {
    type Buffer = CudaBuffer;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn streams(&self) -> usize {
        self.streams.len()
    }

    fn upload(&self, stream: usize, data: Arc<Vec<f32>>) -> CudaBuffer {
        self.try_upload(self.stream(stream), &data)
            .unwrap_or_else(CudaBuffer::failed)
    }

    /// Uploaded on stream 0; work on other streams that reads it waits for the copy
    /// through cudarc's event tracking, as for any buffer written on another stream.
    fn resident(&self, data: Arc<Vec<f32>>) -> CudaBuffer {
        self.upload(0, data)
    }

    fn launch(&self, stream: usize, op: Op, inputs: &[&CudaBuffer]) -> Vec<CudaBuffer> {
        let s = self.stream(stream);
        let launched = inputs
            .iter()
            .map(|b| b.slice())
            .collect::<Result<Vec<_>, _>>()
            .and_then(|slices| {
                check_arity(op, slices.len())?;
                s.submit(|libs, st| libs.run(st, &self.device.algos, op, &slices))
            });
        match launched {
            Ok((outputs, ticket)) => {
                let outputs: Vec<CudaBuffer> = outputs.into_iter().map(CudaBuffer::ok).collect();
                let keep: Vec<CudaBuffer> = inputs
                    .iter()
                    .map(|b| (*b).clone())
                    .chain(outputs.iter().cloned())
                    .collect();
                s.finish(ticket, move |_| drop(keep));
                outputs
            }
            Err(e) => (0..op.outputs())
                .map(|_| CudaBuffer::failed(e.clone()))
                .collect(),
        }
    }

    fn download(&self, stream: usize, buffer: &CudaBuffer) -> (Event, Download) {
        let (event, sink) = (Event::default(), Download::default());
        let s = self.stream(stream);
        match self.try_download(s, buffer) {
            Ok((staging, ticket)) => {
                let (pool, keep) = (self.downloads.clone(), buffer.clone());
                let (out, signal) = (sink.clone(), event.clone());
                s.finish(ticket, move |outcome| {
                    let data = outcome.and_then(|()| {
                        staging
                            .as_slice()
                            .map(|d| Arc::new(d.to_vec()))
                            .or_device("reading pinned memory")
                    });
                    pool.give(staging);
                    drop(keep);
                    *lock(&out) = Some(data);
                    signal.fire();
                });
            }
            Err(e) => {
                *lock(&sink) = Some(Err(e));
                event.fire();
            }
        }
        (event, sink)
    }

    fn record(&self, stream: usize) -> Event {
        let event = Event::default();
        let s = self.stream(stream);
        match s.submit(|_, _| Ok(())) {
            Ok(((), ticket)) => {
                {
                    let mut recorded = lock(&self.recorded);
                    recorded.retain(|(e, _)| !e.is_done());
                    recorded.push((event.clone(), ticket.done.clone()));
                }
                let signal = event.clone();
                s.finish(ticket, move |_| signal.fire());
            }
            Err(e) => {
                // Firing it now beats leaving its waiters hanging forever.
                tracing::warn!(error = %e, "recording a CUDA event failed");
                event.fire();
            }
        }
        event
    }

    fn wait(&self, stream: usize, event: &Event) {
        if event.is_done() {
            return;
        }
        let own = lock(&self.recorded)
            .iter()
            .find(|(e, _)| e.same(event))
            .map(|(_, cu)| cu.clone());
        let s = self.stream(stream);
        // Between other threads' submissions, never inside one's timing events.
        let _order = lock(&s.libs);
        let waiting = match own {
            Some(cu) => s.stream.wait(&cu).or_device("waiting on an event"),
            None => s.block_on_host(event),
        };
        if let Err(e) = waiting {
            tracing::warn!(error = %e, "a CUDA stream cannot wait on an event");
        }
    }

    /// GPU time between each piece of work's timing and completion events (CUDA event
    /// timing), over wall time, per stream. It includes time a stream spends waiting for
    /// another stream's results.
    fn utilization(&self) -> Vec<f64> {
        let wall = self.started.elapsed().as_nanos().max(1) as f64;
        self.streams
            .iter()
            .map(|s| s.busy_nanos.load(Ordering::Relaxed) as f64 / wall)
            .collect()
    }
}

/// Work enqueued on a stream: a timing event before it and a completion event after.
struct Ticket {
    start: CudaEvent,
    done: Arc<CudaEvent>,
}

/// What a stream's waiter thread does once a ticket's work is finished (or failed).
struct Pending {
    ticket: Ticket,
    then: Box<dyn FnOnce(Result<(), ComputeError>) + Send>,
}

struct Stream {
    stream: Arc<CudaStream>,
    /// The stream's handles; holding the lock also keeps submissions whole.
    libs: Mutex<Libs>,
    waiter: mpsc::Sender<Pending>,
    /// The thread completing its work: joined at teardown, since the work it still holds
    /// frees device and pinned memory.
    completing: std::thread::JoinHandle<()>,
    busy_nanos: Arc<AtomicU64>,
}

impl Stream {
    fn new(ctx: &Arc<CudaContext>, index: usize) -> Result<Self, ComputeError> {
        let stream = ctx.new_stream().or_device("creating a stream")?;
        let libs = Libs::new(&stream)?;
        let (waiter, pending) = mpsc::channel();
        let busy_nanos = Arc::new(AtomicU64::new(0));
        let busy = busy_nanos.clone();
        let completing = std::thread::Builder::new()
            .name(format!("cuda-stream-{index}"))
            .spawn(move || complete(pending, &busy))
            .or_device("spawning a stream's waiter thread")?;
        Ok(Self {
            stream,
            libs: Mutex::new(libs),
            waiter,
            completing,
            busy_nanos,
        })
    }

    /// Drops the stream and its handles, then waits for its waiter thread to finish the
    /// work still queued (closing the queue ends it).
    fn tear_down(self) {
        let Self {
            stream,
            libs,
            waiter,
            completing,
            busy_nanos,
        } = self;
        // In the order a `Stream` drops its fields; the queue must close before the join.
        drop((stream, libs, waiter, busy_nanos));
        let _ = completing.join();
    }

    /// Enqueues `work` between a timing event and a completion event, holding the stream's
    /// lock so that no other thread's work lands in between.
    fn submit<T>(
        &self,
        work: impl FnOnce(&mut Libs, &Arc<CudaStream>) -> Result<T, ComputeError>,
    ) -> Result<(T, Ticket), ComputeError> {
        let mut libs = lock(&self.libs);
        let ctx = self.stream.context();
        ctx.bind_to_thread().or_device("binding the CUDA context")?;
        let start = self
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .or_device("recording an event")?;
        let out = work(&mut libs, &self.stream)?;
        // Blocking sync: the waiter thread sleeps on it instead of spinning.
        let done = self
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_BLOCKING_SYNC))
            .or_device("recording an event")?;
        // Failures that cudarc could only record, such as a cross-stream wait of its event
        // tracking: the work may have read memory before it was written.
        ctx.check_err().or_device("ordering work between streams")?;
        let done = Arc::new(done);
        Ok((out, Ticket { start, done }))
    }

    /// Runs `then` on the waiter thread once the ticket's work is finished.
    fn finish(&self, ticket: Ticket, then: impl FnOnce(Result<(), ComputeError>) + Send + 'static) {
        let pending = Pending {
            ticket,
            then: Box::new(then),
        };
        if let Err(mpsc::SendError(p)) = self.waiter.send(pending) {
            (p.then)(Err(ComputeError::Stopped(
                "the stream's waiter thread is gone".into(),
            )));
        }
    }

    /// Makes the stream wait for an event fired on the host: a host function on the stream
    /// blocks the driver's callback thread until it fires. This backend runs no other host
    /// function, so that holds up only the work that must wait anyway. But CUDA loads kernels
    /// lazily, and loading one may synchronize the whole context: until the event fires, a
    /// first launch of a kernel on any stream may wait for it, so the thread that fires it
    /// must not be one that launches new kernels meanwhile.
    fn block_on_host(&self, event: &Event) -> Result<(), ComputeError> {
        extern "C" fn block(user: *mut c_void) {
            // SAFETY: `user` is the `Box<Event>` leaked below for exactly this one call.
            let event = unsafe { Box::from_raw(user.cast::<Event>()) };
            event.wait_blocking();
        }
        self.stream
            .context()
            .bind_to_thread()
            .or_device("binding the CUDA context")?;
        let user = Box::into_raw(Box::new(event.clone())).cast::<c_void>();
        // SAFETY: the stream is live; `block` makes no CUDA call and frees `user`, which
        // stays valid until then.
        let launched = unsafe {
            driver::result::stream::launch_host_function(self.stream.cu_stream(), block, user)
        };
        if launched.is_err() {
            // SAFETY: the driver did not take `user`, so it is still ours to free, once.
            drop(unsafe { Box::from_raw(user.cast::<Event>()) });
        }
        launched.or_device("enqueueing a wait for a host event")
    }
}

/// A stream's waiter thread: completes its work in order, sleeping on each completion event.
/// It ends once the stream is dropped and its last work completed.
fn complete(pending: mpsc::Receiver<Pending>, busy_nanos: &AtomicU64) {
    for Pending { ticket, then } in pending {
        let outcome = ticket.done.synchronize().or_device("running work");
        if outcome.is_ok()
            && let Ok(ms) = ticket.start.elapsed_ms(&ticket.done)
        {
            busy_nanos.fetch_add((f64::from(ms) * 1e6) as u64, Ordering::Relaxed);
        }
        then(outcome);
    }
}

/// Page-locked staging buffers, pooled by exact length (cudarc copies whole host slices):
/// `cuMemHostAlloc` is slow, and the shapes of a workload repeat.
struct PinnedPool {
    flags: u32,
    idle: Mutex<Idle>,
}

#[derive(Default)]
struct Idle {
    by_len: HashMap<usize, Vec<PinnedHostSlice<f32>>>,
    bytes: usize,
}

/// Pinned bytes kept idle per pool; beyond that, returned buffers are freed.
const IDLE_PINNED_BYTES: usize = 256 << 20;

impl PinnedPool {
    fn new(flags: u32) -> Self {
        Self {
            flags,
            idle: Mutex::default(),
        }
    }

    fn take(
        &self,
        ctx: &Arc<CudaContext>,
        len: usize,
    ) -> Result<PinnedHostSlice<f32>, ComputeError> {
        let reused = {
            let mut idle = lock(&self.idle);
            let buffer = idle.by_len.get_mut(&len).and_then(Vec::pop);
            if let Some(b) = &buffer {
                idle.bytes -= b.num_bytes();
            }
            buffer
        };
        match reused {
            Some(buffer) => Ok(buffer),
            // SAFETY: the memory starts unset; every user writes all of it before reading it
            // (the host before an upload, the device before the host reads a download).
            None => unsafe { ctx.alloc_pinned_with_flags::<f32>(len, self.flags) }
                .or_device("allocating pinned memory"),
        }
    }

    /// Takes a buffer back once its copy is done (or never enqueued); a later user's access
    /// waits for cudarc's event on it anyway.
    fn give(&self, buffer: PinnedHostSlice<f32>) {
        let mut idle = lock(&self.idle);
        if idle.bytes + buffer.num_bytes() <= IDLE_PINNED_BYTES {
            idle.bytes += buffer.num_bytes();
            idle.by_len.entry(buffer.len()).or_default().push(buffer);
        } else {
            drop(idle);
            drop(buffer);
        }
    }
}

/// Convolution algorithms chosen for one shape, by op, each with its workspace size in bytes.
#[derive(Clone, Copy, Debug, Default)]
struct Algos {
    forward: Option<(cudnn::sys::cudnnConvolutionFwdAlgo_t, usize)>,
    data: Option<(cudnn::sys::cudnnConvolutionBwdDataAlgo_t, usize)>,
    filter: Option<(cudnn::sys::cudnnConvolutionBwdFilterAlgo_t, usize)>,
}

/// The algorithm in `slot` of `p`'s entry and its workspace size, found by `choose` and
/// `size` the first time. Both are cached: in cuDNN 9 the legacy size query costs 40 to
/// 170 µs of host time per call (measured on an H200), more than the convolution's launch.
fn pick<A: Copy>(
    algos: &Mutex<HashMap<Conv2dParams, Algos>>,
    p: &Conv2dParams,
    slot: impl Fn(&mut Algos) -> &mut Option<(A, usize)>,
    choose: impl FnOnce() -> Result<A, cudnn::CudnnError>,
    size: impl FnOnce(A) -> Result<usize, cudnn::CudnnError>,
) -> Result<(A, usize), ComputeError> {
    let mut algos = lock(algos);
    let entry = slot(algos.entry(*p).or_default());
    if let Some(chosen) = *entry {
        return Ok(chosen);
    }
    let algo = choose().or_device("choosing a cuDNN algorithm")?;
    let bytes = size(algo).or_device("sizing a cuDNN workspace")?;
    *entry = Some((algo, bytes));
    Ok((algo, bytes))
}

/// One stream's library state.
struct Libs {
    /// Graph plans by shape and pass (`None`: the graph API cannot plan it). Declared first,
    /// so dropped before the handle they were built on.
    graphs: HashMap<(Conv2dParams, Pass), Option<ConvGraph>>,
    /// Declared before `cudnn`, so dropped before the handle that keeps the stream alive.
    raw: RawCudnn,
    cudnn: Arc<Cudnn>,
    blas: CudaBlas,
    plans: HashMap<Conv2dParams, ConvPlan>,
    workspace: Option<CudaSlice<u8>>,
}

// SAFETY: cuDNN handles and descriptors may be used from any thread as long as no two
// threads use one at once (cuDNN's thread-safety rule); `Libs` is only reached through its
// stream's mutex.
unsafe impl Send for Libs {}

impl Libs {
    fn new(stream: &Arc<CudaStream>) -> Result<Self, ComputeError> {
        stream
            .context()
            .bind_to_thread()
            .or_device("binding the CUDA context")?;
        let raw = RawCudnn::new(stream).or_device("creating a cuDNN handle")?;
        // cudarc's `Cudnn::new` unwraps a context binding, which fails when another thread's
        // drop has just recorded an error in the context: an error here, not a panic that
        // would skip the caller's fallback to the CPU.
        let cudnn = std::panic::catch_unwind(|| Cudnn::new(stream.clone()))
            .map_err(|_| ComputeError::Device("creating a cuDNN handle: cudarc panicked".into()))?
            .or_device("creating a cuDNN handle")?;
        Ok(Self {
            raw,
            cudnn,
            blas: CudaBlas::new(stream.clone()).or_device("creating a cuBLAS handle")?,
            graphs: HashMap::new(),
            plans: HashMap::new(),
            workspace: None,
        })
    }

    /// Enqueues `op` on `st`, returning its outputs.
    fn run(
        &mut self,
        st: &Arc<CudaStream>,
        algos: &Mutex<HashMap<Conv2dParams, Algos>>,
        op: Op,
        x: &[&Slice],
    ) -> Result<Vec<Slice>, ComputeError> {
        match op {
            Op::Conv2d(p) => Ok(vec![self.conv_forward(
                st,
                algos,
                &p,
                x[0],
                x[1],
                x.get(2).copied(),
            )?]),
            Op::Conv2dBackward(p) => self.conv_backward(st, algos, &p, x[0], x[1], x[2]),
            Op::Relu => {
                let n = same_len(op, &x[..1])?;
                let mut y = zeros(st, x[0].len())?;
                self.raw.relu(st, n, x[0], &mut y)?;
                Ok(vec![y])
            }
            Op::ReluBackward => {
                let n = same_len(op, &x[..2])?;
                let mut dx = zeros(st, x[0].len())?;
                self.raw.relu_backward(st, n, x[0], x[1], &mut dx)?;
                Ok(vec![dx])
            }
            Op::Mse => {
                let n = same_len(op, &x[..2])?;
                // grad = p - t; loss = (grad . grad) / n; grad *= 2 / n.
                let mut grad = st.clone_dtod(x[0]).or_device("copying on the device")?;
                self.axpy(st, n, -1.0, x[1], &mut grad)?;
                let mut loss = zeros(st, 1)?;
                self.dot(st, n, &grad, &mut loss)?;
                let count = n.max(1) as f32;
                self.scal(st, 1, 1.0 / count, &mut loss)?;
                self.scal(st, n, 2.0 / count, &mut grad)?;
                Ok(vec![loss, grad])
            }
            Op::Sgd {
                learning_rate,
                momentum,
            } => {
                let n = same_len(op, &x[..3])?;
                // v' = m * v + g; w' = w - lr * v'.
                let mut v = st.clone_dtod(x[2]).or_device("copying on the device")?;
                self.scal(st, n, momentum, &mut v)?;
                self.axpy(st, n, 1.0, x[1], &mut v)?;
                let mut w = st.clone_dtod(x[0]).or_device("copying on the device")?;
                self.axpy(st, n, -learning_rate, &v, &mut w)?;
                Ok(vec![w, v])
            }
            Op::Axpy { alpha } => {
                let n = same_len(op, &x[..2])?;
                let mut y = st.clone_dtod(x[1]).or_device("copying on the device")?;
                self.axpy(st, n, alpha, x[0], &mut y)?;
                Ok(vec![y])
            }
        }
    }

    fn conv_forward(
        &mut self,
        st: &Arc<CudaStream>,
        algos: &Mutex<HashMap<Conv2dParams, Algos>>,
        p: &Conv2dParams,
        x: &Slice,
        w: &Slice,
        b: Option<&Slice>,
    ) -> Result<Slice, ComputeError> {
        check_conv(p, x.len(), w.len(), b.map(CudaSlice::len))?;
        let handle = self.raw.handle;
        let plan = plan(&mut self.plans, &self.cudnn, p)?;
        // SAFETY (both arms): the convolution writes all of `y` (beta = 0).
        let mut y = unsafe { unset(st, p.output_len()) }?;
        if let Some(graph) = graph(&mut self.graphs, handle, p, Pass::Forward) {
            let workspace = grow(&mut self.workspace, st, graph.workspace)?;
            graph.run(
                handle,
                st,
                [(x, X_ID), (w, W_ID)],
                (&mut y, Y_ID),
                workspace,
            )?;
        } else {
            let forward = ConvForward {
                conv: &plan.conv,
                x: &plan.x,
                w: &plan.w,
                y: &plan.y,
            };
            let (algo, bytes) = pick(
                algos,
                p,
                |a| &mut a.forward,
                || forward.pick_algorithm(),
                |a| forward.get_workspace_size(a),
            )?;
            let workspace = grow(&mut self.workspace, st, bytes)?;
            // SAFETY: the plan's descriptors are `p`'s shapes in f32, and the buffers' lengths
            // were checked against `p`.
            unsafe { forward.launch(algo, workspace, (1.0, 0.0), x, w, &mut y) }
                .or_device("cuDNN convolution forward")?;
        }
        if let Some(b) = b {
            self.raw.add_bias(st, &plan.bias, b, &plan.y_raw, &mut y)?;
        }
        Ok(y)
    }

    fn conv_backward(
        &mut self,
        st: &Arc<CudaStream>,
        algos: &Mutex<HashMap<Conv2dParams, Algos>>,
        p: &Conv2dParams,
        x: &Slice,
        w: &Slice,
        dy: &Slice,
    ) -> Result<Vec<Slice>, ComputeError> {
        check_conv(p, x.len(), w.len(), None)?;
        if dy.len() != p.output_len() {
            return Err(ComputeError::Shape(format!(
                "output gradient of {} elements; {p:?} needs {}",
                dy.len(),
                p.output_len()
            )));
        }
        let handle = self.raw.handle;
        let plan = plan(&mut self.plans, &self.cudnn, p)?;

        // SAFETY (both arms): the convolution writes all of `dx` (beta = 0).
        let mut dx = unsafe { unset(st, x.len()) }?;
        if let Some(graph) = graph(&mut self.graphs, handle, p, Pass::Data) {
            let workspace = grow(&mut self.workspace, st, graph.workspace)?;
            graph.run(
                handle,
                st,
                [(w, W_ID), (dy, Y_ID)],
                (&mut dx, X_ID),
                workspace,
            )?;
        } else {
            let data = ConvBackwardData {
                conv: &plan.conv,
                dx: &plan.x,
                w: &plan.w,
                dy: &plan.y,
            };
            let (algo, bytes) = pick(
                algos,
                p,
                |a| &mut a.data,
                || data.pick_algorithm(),
                |a| data.get_workspace_size(a),
            )?;
            let workspace = grow(&mut self.workspace, st, bytes)?;
            // SAFETY: as in `conv_forward`; `dy` was checked against `p` too.
            unsafe { data.launch(algo, workspace, (1.0, 0.0), &mut dx, w, dy) }
                .or_device("cuDNN convolution backward data")?;
        }

        // SAFETY (both arms): the convolution writes all of `dw` (beta = 0).
        let mut dw = unsafe { unset(st, w.len()) }?;
        if let Some(graph) = graph(&mut self.graphs, handle, p, Pass::Filter) {
            let workspace = grow(&mut self.workspace, st, graph.workspace)?;
            graph.run(
                handle,
                st,
                [(x, X_ID), (dy, Y_ID)],
                (&mut dw, W_ID),
                workspace,
            )?;
        } else {
            let filter = ConvBackwardFilter {
                conv: &plan.conv,
                x: &plan.x,
                dw: &plan.w,
                dy: &plan.y,
            };
            let (algo, bytes) = pick(
                algos,
                p,
                |a| &mut a.filter,
                || filter.pick_algorithm(),
                |a| filter.get_workspace_size(a),
            )?;
            let workspace = grow(&mut self.workspace, st, bytes)?;
            // SAFETY: as above.
            unsafe { filter.launch(algo, workspace, (1.0, 0.0), x, &mut dw, dy) }
                .or_device("cuDNN convolution backward filter")?;
        }

        let mut db = zeros(st, p.out_channels)?;
        self.raw
            .bias_grad(st, &plan.y_raw, dy, &plan.bias, &mut db)?;
        Ok(vec![dx, dw, db])
    }

    /// `y = alpha * x + y` over `n` elements.
    fn axpy(
        &self,
        st: &CudaStream,
        n: i32,
        alpha: f32,
        x: &Slice,
        y: &mut Slice,
    ) -> Result<(), ComputeError> {
        let (x, _read) = x.device_ptr(st);
        let (y, _write) = y.device_ptr_mut(st);
        // SAFETY: both buffers hold `n` f32 on this handle's device (checked by the op); the
        // guards order the call after the buffers' writers and record it for later users.
        unsafe {
            cublas::sys::cublasSaxpy_v2(
                *self.blas.handle(),
                n,
                &alpha,
                x as *const f32,
                1,
                y as *mut f32,
                1,
            )
        }
        .result()
        .or_device("cuBLAS axpy")
    }

    /// `x *= alpha` over `n` elements.
    fn scal(&self, st: &CudaStream, n: i32, alpha: f32, x: &mut Slice) -> Result<(), ComputeError> {
        let (x, _write) = x.device_ptr_mut(st);
        // SAFETY: as in `axpy`.
        unsafe { cublas::sys::cublasSscal_v2(*self.blas.handle(), n, &alpha, x as *mut f32, 1) }
            .result()
            .or_device("cuBLAS scal")
    }

    /// `out[0] = x . x` over `n` elements, written on the device.
    fn dot(&self, st: &CudaStream, n: i32, x: &Slice, out: &mut Slice) -> Result<(), ComputeError> {
        use cublas::sys::cublasPointerMode_t::{
            CUBLAS_POINTER_MODE_DEVICE, CUBLAS_POINTER_MODE_HOST,
        };
        self.blas
            .set_pointer_mode(CUBLAS_POINTER_MODE_DEVICE)
            .or_device("cuBLAS pointer mode")?;
        let status = {
            let (x, _read) = x.device_ptr(st);
            let (out, _write) = out.device_ptr_mut(st);
            // SAFETY: `x` holds `n` f32 and `out` at least one; in device pointer mode cuBLAS
            // writes the result there in stream order.
            unsafe {
                cublas::sys::cublasSdot_v2(
                    *self.blas.handle(),
                    n,
                    x as *const f32,
                    1,
                    x as *const f32,
                    1,
                    out as *mut f32,
                )
            }
        };
        self.blas
            .set_pointer_mode(CUBLAS_POINTER_MODE_HOST)
            .or_device("cuBLAS pointer mode")?;
        status.result().or_device("cuBLAS dot")
    }
}

/// Zeroed device memory for `len` f32.
fn zeros(st: &Arc<CudaStream>, len: usize) -> Result<Slice, ComputeError> {
    st.alloc_zeros::<f32>(len)
        .or_device("allocating device memory")
}

/// Device memory for `len` f32, left as it was: no memset enqueued.
///
/// # Safety
/// The caller's next use of it on `st` must write every element before anything reads it.
unsafe fn unset(st: &Arc<CudaStream>, len: usize) -> Result<Slice, ComputeError> {
    // SAFETY: passed on to the caller.
    unsafe { st.alloc::<f32>(len) }.or_device("allocating device memory")
}

/// The stream's workspace, grown to at least `bytes` (none when nothing is needed). A
/// replaced workspace is freed in stream order, after the work that used it.
fn grow<'a>(
    workspace: &'a mut Option<CudaSlice<u8>>,
    st: &Arc<CudaStream>,
    bytes: usize,
) -> Result<Option<&'a mut CudaSlice<u8>>, ComputeError> {
    if bytes == 0 {
        return Ok(None);
    }
    if workspace.as_ref().is_none_or(|w| w.len() < bytes) {
        *workspace = None;
        *workspace = Some(
            st.alloc_zeros::<u8>(bytes)
                .or_device("allocating a cuDNN workspace")?,
        );
    }
    Ok(workspace.as_mut())
}

fn check_arity(op: Op, inputs: usize) -> Result<(), ComputeError> {
    let n = match op {
        Op::Relu => 1,
        Op::Conv2d(_) | Op::ReluBackward | Op::Mse | Op::Axpy { .. } => 2,
        Op::Conv2dBackward(_) | Op::Sgd { .. } => 3,
    };
    if inputs < n {
        return Err(ComputeError::Shape(format!(
            "{op:?} takes {n} inputs, got {inputs}"
        )));
    }
    Ok(())
}

/// The common length of an element-wise op's inputs, as the libraries count. Unlike the CPU
/// path, which zips, inputs of different lengths are an error.
fn same_len(op: Op, x: &[&Slice]) -> Result<i32, ComputeError> {
    let n = x[0].len();
    if x.iter().any(|s| s.len() != n) {
        let lens: Vec<usize> = x.iter().map(|s| s.len()).collect();
        return Err(ComputeError::Shape(format!(
            "{op:?} on buffers of {lens:?} elements"
        )));
    }
    i32::try_from(n).map_err(|_| {
        ComputeError::Device(format!("{n} elements are more than one CUDA call takes"))
    })
}

fn check_conv(p: &Conv2dParams, x: usize, w: usize, b: Option<usize>) -> Result<(), ComputeError> {
    p.check()?;
    let want = (p.input_len(), p.weight_len(), p.out_channels);
    if x != want.0 || w != want.1 || b.is_some_and(|b| b != want.2) {
        return Err(ComputeError::Shape(format!(
            "buffers of {x}, {w} and {b:?} elements for input, weight and bias; {p:?} needs {}, {} and {}",
            want.0, want.1, want.2
        )));
    }
    Ok(())
}

/// cuDNN's descriptors of one convolution shape on one handle.
struct ConvPlan {
    conv: ConvDescriptor<f32>,
    x: TensorDescriptor<f32>,
    w: FilterDescriptor<f32>,
    y: TensorDescriptor<f32>,
    /// `y` and the bias (`[1, K, 1, 1]`) for the raw handle's calls.
    y_raw: RawTensor,
    bias: RawTensor,
}

fn plan<'a>(
    plans: &'a mut HashMap<Conv2dParams, ConvPlan>,
    cudnn: &Arc<Cudnn>,
    p: &Conv2dParams,
) -> Result<&'a ConvPlan, ComputeError> {
    Ok(match plans.entry(*p) {
        Entry::Occupied(e) => e.into_mut(),
        Entry::Vacant(e) => e.insert(ConvPlan::new(cudnn, p)?),
    })
}

impl ConvPlan {
    fn new(cudnn: &Arc<Cudnn>, p: &Conv2dParams) -> Result<Self, ComputeError> {
        use cudnn::sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION;
        use cudnn::sys::cudnnMathType_t::CUDNN_FMA_MATH;
        use cudnn::sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let dim = |v: usize| {
            i32::try_from(v)
                .map_err(|_| ComputeError::Device(format!("{p:?} is too large for cuDNN")))
        };
        let pair = |v: [usize; 2]| Ok::<_, ComputeError>([dim(v[0])?, dim(v[1])?]);
        let [oh, ow] = p.output();
        let x = [
            dim(p.batch)?,
            dim(p.in_channels)?,
            dim(p.height)?,
            dim(p.width)?,
        ];
        let w = [
            dim(p.out_channels)?,
            dim(p.in_channels / p.groups)?,
            dim(p.kernel[0])?,
            dim(p.kernel[1])?,
        ];
        let y = [dim(p.batch)?, dim(p.out_channels)?, dim(oh)?, dim(ow)?];
        let mut conv = cudnn
            .create_conv2d::<f32>(
                pair(p.padding)?,
                pair(p.stride)?,
                pair(p.dilation)?,
                CUDNN_CROSS_CORRELATION,
            )
            .or_device("describing a convolution")?;
        conv.set_group_count(dim(p.groups)?)
            .or_device("describing a convolution")?;
        conv.set_math_type(CUDNN_FMA_MATH)
            .or_device("describing a convolution")?;
        let described = "describing a tensor";
        Ok(Self {
            x: cudnn
                .create_4d_tensor(CUDNN_TENSOR_NCHW, x)
                .or_device(described)?,
            w: cudnn
                .create_4d_filter(CUDNN_TENSOR_NCHW, w)
                .or_device(described)?,
            y: cudnn
                .create_4d_tensor(CUDNN_TENSOR_NCHW, y)
                .or_device(described)?,
            y_raw: RawTensor::new(y)?,
            bias: RawTensor::new([1, y[1], 1, 1])?,
            conv,
        })
    }
}

/// A cuDNN graph-API ("backend") descriptor, destroyed on drop.
struct Desc(cudnn::sys::cudnnBackendDescriptor_t);

impl Desc {
    fn new(kind: cudnn::sys::cudnnBackendDescriptorType_t) -> Result<Self, cudnn::CudnnError> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: `raw` is a valid place for the new descriptor.
        unsafe { cudnn::sys::cudnnBackendCreateDescriptor(kind, &raw mut raw) }.result()?;
        Ok(Self(raw))
    }

    /// Sets attribute `name` to `values`.
    ///
    /// # Safety
    /// `T` must be the C type that cuDNN reads for `kind`, and `name` must take `kind`.
    unsafe fn set<T>(
        &self,
        name: cudnn::sys::cudnnBackendAttributeName_t,
        kind: cudnn::sys::cudnnBackendAttributeType_t,
        values: &[T],
    ) -> Result<(), cudnn::CudnnError> {
        let count = i64::try_from(values.len()).expect("a handful of values");
        // SAFETY: the descriptor is live; cuDNN copies `count` values of `T` (the caller's
        // promise) out of `values`, which outlives the call.
        unsafe {
            cudnn::sys::cudnnBackendSetAttribute(self.0, name, kind, count, values.as_ptr().cast())
        }
        .result()
    }

    fn ints(
        &self,
        name: cudnn::sys::cudnnBackendAttributeName_t,
        values: &[i64],
    ) -> Result<(), cudnn::CudnnError> {
        use cudnn::sys::cudnnBackendAttributeType_t::CUDNN_TYPE_INT64;
        // SAFETY: CUDNN_TYPE_INT64 values are int64_t.
        unsafe { self.set(name, CUDNN_TYPE_INT64, values) }
    }

    fn descs(
        &self,
        name: cudnn::sys::cudnnBackendAttributeName_t,
        values: &[&Desc],
    ) -> Result<(), cudnn::CudnnError> {
        use cudnn::sys::cudnnBackendAttributeType_t::CUDNN_TYPE_BACKEND_DESCRIPTOR;
        let raw: Vec<_> = values.iter().map(|d| d.0).collect();
        // SAFETY: CUDNN_TYPE_BACKEND_DESCRIPTOR values are descriptor handles, live here.
        unsafe { self.set(name, CUDNN_TYPE_BACKEND_DESCRIPTOR, &raw) }
    }

    /// Fills `out` with up to `out.len()` values of attribute `name`; returns how many values
    /// the attribute holds, which may be more.
    ///
    /// # Safety
    /// As for [`Desc::set`]; for descriptors, `out` holds created descriptors of the right
    /// type, which cuDNN fills in.
    unsafe fn get<T>(
        &self,
        name: cudnn::sys::cudnnBackendAttributeName_t,
        kind: cudnn::sys::cudnnBackendAttributeType_t,
        out: &mut [T],
    ) -> Result<usize, cudnn::CudnnError> {
        let mut count = 0;
        let room = i64::try_from(out.len()).expect("a handful of values");
        // SAFETY: cuDNN writes at most `room` values of `T` (the caller's promise) into `out`.
        unsafe {
            cudnn::sys::cudnnBackendGetAttribute(
                self.0,
                name,
                kind,
                room,
                &raw mut count,
                out.as_mut_ptr().cast(),
            )
        }
        .result()?;
        Ok(usize::try_from(count).unwrap_or(0))
    }

    fn finalize(self) -> Result<Self, cudnn::CudnnError> {
        // SAFETY: the descriptor is live; finalizing only validates and freezes it.
        unsafe { cudnn::sys::cudnnBackendFinalize(self.0) }.result()?;
        Ok(self)
    }
}

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created in `new` and destroyed only here.
        let _ = unsafe { cudnn::sys::cudnnBackendDestroyDescriptor(self.0) };
    }
}

/// Unique ids of a plan's tensors (the input or its gradient, the filter or its gradient, the
/// output or its gradient), which its variant packs pair with addresses.
const X_ID: i64 = 1;
const W_ID: i64 = 2;
const Y_ID: i64 = 3;

/// A convolution pass: what a graph plan computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Pass {
    /// `y` from `x` and `w`.
    Forward,
    /// `dx` from `w` and `dy`.
    Data,
    /// `dw` from `x` and `dy`.
    Filter,
}

/// A pass's operation descriptor type and attribute names, its tensors in `x, w, y` order.
struct PassAttributes {
    op: cudnn::sys::cudnnBackendDescriptorType_t,
    x: cudnn::sys::cudnnBackendAttributeName_t,
    w: cudnn::sys::cudnnBackendAttributeName_t,
    y: cudnn::sys::cudnnBackendAttributeName_t,
    conv: cudnn::sys::cudnnBackendAttributeName_t,
    alpha: cudnn::sys::cudnnBackendAttributeName_t,
    beta: cudnn::sys::cudnnBackendAttributeName_t,
}

impl Pass {
    fn attributes(self) -> PassAttributes {
        use cudnn::sys::cudnnBackendAttributeName_t::*;
        use cudnn::sys::cudnnBackendDescriptorType_t::*;
        match self {
            Pass::Forward => PassAttributes {
                op: CUDNN_BACKEND_OPERATION_CONVOLUTION_FORWARD_DESCRIPTOR,
                x: CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_X,
                w: CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_W,
                y: CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_Y,
                conv: CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_CONV_DESC,
                alpha: CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_ALPHA,
                beta: CUDNN_ATTR_OPERATION_CONVOLUTION_FORWARD_BETA,
            },
            Pass::Data => PassAttributes {
                op: CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_DATA_DESCRIPTOR,
                x: CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_DX,
                w: CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_W,
                y: CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_DY,
                conv: CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_CONV_DESC,
                alpha: CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_ALPHA,
                beta: CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_DATA_BETA,
            },
            Pass::Filter => PassAttributes {
                op: CUDNN_BACKEND_OPERATION_CONVOLUTION_BACKWARD_FILTER_DESCRIPTOR,
                x: CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_X,
                w: CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_DW,
                y: CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_DY,
                conv: CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_CONV_DESC,
                alpha: CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_ALPHA,
                beta: CUDNN_ATTR_OPERATION_CONVOLUTION_BWD_FILTER_BETA,
            },
        }
    }
}

/// A convolution pass as an execution plan of cuDNN's graph API, built for one shape on one
/// handle: running it costs a few µs of host time, where the legacy calls
/// (`cudnnConvolutionForward` and the backward ones) derive a plan again at every call.
struct ConvGraph {
    plan: Desc,
    workspace: usize,
}

impl ConvGraph {
    /// The operation graph of `p`'s `pass` on `handle`.
    fn describe(
        handle: cudnn::sys::cudnnHandle_t,
        p: &Conv2dParams,
        pass: Pass,
    ) -> Result<Desc, cudnn::CudnnError> {
        use cudnn::sys::cudnnBackendAttributeName_t::*;
        use cudnn::sys::cudnnBackendAttributeType_t::*;
        use cudnn::sys::cudnnBackendDescriptorType_t::*;
        use cudnn::sys::cudnnDataType_t::CUDNN_DATA_FLOAT;
        let as_i64 = |v: usize| i64::try_from(v).expect("checked shapes fit");
        let [oh, ow] = p.output();
        let tensor = |id: i64, dims: [usize; 4]| {
            let dims = dims.map(as_i64);
            let strides = [dims[1] * dims[2] * dims[3], dims[2] * dims[3], dims[3], 1];
            let t = Desc::new(CUDNN_BACKEND_TENSOR_DESCRIPTOR)?;
            // SAFETY: CUDNN_TYPE_DATA_TYPE values are cudnnDataType_t.
            unsafe {
                t.set(
                    CUDNN_ATTR_TENSOR_DATA_TYPE,
                    CUDNN_TYPE_DATA_TYPE,
                    &[CUDNN_DATA_FLOAT],
                )
            }?;
            t.ints(CUDNN_ATTR_TENSOR_DIMENSIONS, &dims)?;
            t.ints(CUDNN_ATTR_TENSOR_STRIDES, &strides)?;
            t.ints(CUDNN_ATTR_TENSOR_UNIQUE_ID, &[id])?;
            // Device allocations are 256-byte aligned.
            t.ints(CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, &[16])?;
            t.finalize()
        };
        let x = tensor(X_ID, [p.batch, p.in_channels, p.height, p.width])?;
        // Groups are implied: the filter's channels are the input's over the group count.
        let w = tensor(
            W_ID,
            [
                p.out_channels,
                p.in_channels / p.groups,
                p.kernel[0],
                p.kernel[1],
            ],
        )?;
        let y = tensor(Y_ID, [p.batch, p.out_channels, oh, ow])?;

        let conv = Desc::new(CUDNN_BACKEND_CONVOLUTION_DESCRIPTOR)?;
        // SAFETY: the types are cudnnDataType_t and cudnnConvolutionMode_t, as named.
        unsafe {
            conv.set(
                CUDNN_ATTR_CONVOLUTION_COMP_TYPE,
                CUDNN_TYPE_DATA_TYPE,
                &[CUDNN_DATA_FLOAT],
            )?;
            conv.set(
                CUDNN_ATTR_CONVOLUTION_CONV_MODE,
                CUDNN_TYPE_CONVOLUTION_MODE,
                &[cudnn::sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION],
            )?;
        }
        conv.ints(CUDNN_ATTR_CONVOLUTION_SPATIAL_DIMS, &[2])?;
        conv.ints(CUDNN_ATTR_CONVOLUTION_DILATIONS, &p.dilation.map(as_i64))?;
        conv.ints(CUDNN_ATTR_CONVOLUTION_FILTER_STRIDES, &p.stride.map(as_i64))?;
        conv.ints(CUDNN_ATTR_CONVOLUTION_PRE_PADDINGS, &p.padding.map(as_i64))?;
        conv.ints(CUDNN_ATTR_CONVOLUTION_POST_PADDINGS, &p.padding.map(as_i64))?;
        let conv = conv.finalize()?;

        let names = pass.attributes();
        let op = Desc::new(names.op)?;
        op.descs(names.x, &[&x])?;
        op.descs(names.w, &[&w])?;
        op.descs(names.y, &[&y])?;
        op.descs(names.conv, &[&conv])?;
        // SAFETY: with FP32 compute, alpha and beta are floats.
        unsafe {
            op.set(names.alpha, CUDNN_TYPE_FLOAT, &[1.0f32])?;
            op.set(names.beta, CUDNN_TYPE_FLOAT, &[0.0f32])?;
        }
        let op = op.finalize()?;

        let graph = Desc::new(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR)?;
        graph.descs(CUDNN_ATTR_OPERATIONGRAPH_OPS, &[&op])?;
        // SAFETY: CUDNN_TYPE_HANDLE values are cudnnHandle_t; the handle outlives the plan
        // (`Libs` drops its plans first).
        unsafe {
            graph.set(
                CUDNN_ATTR_OPERATIONGRAPH_HANDLE,
                CUDNN_TYPE_HANDLE,
                &[handle],
            )
        }?;
        let graph = graph.finalize()?;

        Ok(graph)
    }

    /// The first strict-FP32 engine of cuDNN's heuristics that can plan `p`: mode A's list
    /// first, which can hold no strict-FP32 engine for a shape (seen for 3x3 convolutions on
    /// an H200), then the fallback list. Without one, what was tried, for the log.
    fn new(
        handle: cudnn::sys::cudnnHandle_t,
        p: &Conv2dParams,
        pass: Pass,
    ) -> Result<Self, String> {
        use cudnn::sys::cudnnBackendHeurMode_t::*;
        let graph = Self::describe(handle, p, pass).map_err(|e| format!("describing it: {e:?}"))?;
        let mut tried = Vec::new();
        for (name, mode) in [
            ("A", CUDNN_HEUR_MODE_A),
            ("fallback", CUDNN_HEUR_MODE_FALLBACK),
        ] {
            let configs = match engine_configs(&graph, mode) {
                Ok(configs) => configs,
                Err(e) => {
                    tried.push(format!("heuristics {name}: {e:?}"));
                    continue;
                }
            };
            let (mut strict, mut refused) = (0, 0);
            for config in &configs {
                if !strict_fp32(config).unwrap_or(false) {
                    continue;
                }
                strict += 1;
                match Self::plan(handle, config) {
                    Ok(found) => return Ok(found),
                    Err(_) => refused += 1,
                }
            }
            tried.push(format!(
                "heuristics {name}: {} engines, {strict} in strict FP32, {refused} of them refused a plan",
                configs.len()
            ));
        }
        Err(tried.join("; "))
    }

    fn plan(handle: cudnn::sys::cudnnHandle_t, config: &Desc) -> Result<Self, cudnn::CudnnError> {
        use cudnn::sys::cudnnBackendAttributeName_t::*;
        use cudnn::sys::cudnnBackendAttributeType_t::*;
        let plan = Desc::new(
            cudnn::sys::cudnnBackendDescriptorType_t::CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR,
        )?;
        // SAFETY: as for the graph's handle.
        unsafe {
            plan.set(
                CUDNN_ATTR_EXECUTION_PLAN_HANDLE,
                CUDNN_TYPE_HANDLE,
                &[handle],
            )
        }?;
        plan.descs(CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, &[config])?;
        let plan = plan.finalize()?;
        let mut workspace = [0i64];
        // SAFETY: CUDNN_TYPE_INT64 values are int64_t.
        unsafe {
            plan.get(
                CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
                CUDNN_TYPE_INT64,
                &mut workspace,
            )
        }?;
        Ok(Self {
            plan,
            workspace: usize::try_from(workspace[0]).unwrap_or(0),
        })
    }

    /// Enqueues the pass on the handle's stream, `st`: `out` from `inputs`, each buffer with
    /// the id of its slot (`X_ID`, `W_ID`, `Y_ID`).
    fn run(
        &self,
        handle: cudnn::sys::cudnnHandle_t,
        st: &CudaStream,
        inputs: [(&Slice, i64); 2],
        out: (&mut Slice, i64),
        workspace: Option<&mut CudaSlice<u8>>,
    ) -> Result<(), ComputeError> {
        use cudnn::sys::cudnnBackendAttributeName_t::*;
        use cudnn::sys::cudnnBackendAttributeType_t::CUDNN_TYPE_VOID_PTR;
        let [(a, a_id), (b, b_id)] = inputs;
        let (out, out_id) = out;
        // The guards order this after the buffers' writers and record this use on drop.
        let (a, _read_a) = a.device_ptr(st);
        let (b, _read_b) = b.device_ptr(st);
        let (out, _write_out) = out.device_ptr_mut(st);
        let (space, _write_space) = workspace.map(|s| s.device_ptr_mut(st)).unzip();
        let address = |ptr: u64| ptr as usize as *mut c_void;
        let enqueue = || {
            let pack = Desc::new(
                cudnn::sys::cudnnBackendDescriptorType_t::CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR,
            )?;
            pack.ints(CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, &[a_id, b_id, out_id])?;
            // SAFETY: CUDNN_TYPE_VOID_PTR values are addresses: of live device buffers whose
            // lengths were checked against the plan's shape, and of a workspace of at least
            // the plan's size (or none when it needs none).
            unsafe {
                pack.set(
                    CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS,
                    CUDNN_TYPE_VOID_PTR,
                    &[address(a), address(b), address(out)],
                )?;
                pack.set(
                    CUDNN_ATTR_VARIANT_PACK_WORKSPACE,
                    CUDNN_TYPE_VOID_PTR,
                    &[space.map_or(std::ptr::null_mut(), address)],
                )?;
            }
            let pack = pack.finalize()?;
            // SAFETY: the plan was built on `handle`, whose stream is `st`; the pack holds
            // every tensor of the plan.
            unsafe { cudnn::sys::cudnnBackendExecute(handle, self.plan.0, pack.0) }.result()
        };
        enqueue().or_device("cuDNN graph convolution")
    }
}

/// `p`'s graph plan for `pass` on `handle`, built the first time; `None`, logged once, when
/// cuDNN's graph API cannot plan it and the legacy call serves instead.
fn graph<'a>(
    graphs: &'a mut HashMap<(Conv2dParams, Pass), Option<ConvGraph>>,
    handle: cudnn::sys::cudnnHandle_t,
    p: &Conv2dParams,
    pass: Pass,
) -> Option<&'a ConvGraph> {
    graphs
        .entry((*p, pass))
        .or_insert_with(|| {
            ConvGraph::new(handle, p, pass)
                .inspect_err(|e| {
                    tracing::warn!(?p, ?pass, error = %e, "cuDNN's graph API cannot plan this convolution; using the legacy call")
                })
                .ok()
        })
        .as_ref()
}

/// The engine configs that cuDNN's heuristics in `mode` propose for `graph`, best first.
fn engine_configs(
    graph: &Desc,
    mode: cudnn::sys::cudnnBackendHeurMode_t,
) -> Result<Vec<Desc>, cudnn::CudnnError> {
    use cudnn::sys::cudnnBackendAttributeName_t::*;
    use cudnn::sys::cudnnBackendAttributeType_t::*;
    use cudnn::sys::cudnnBackendDescriptorType_t::*;
    let heuristics = Desc::new(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR)?;
    heuristics.descs(CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, &[graph])?;
    // SAFETY: CUDNN_TYPE_HEUR_MODE values are cudnnBackendHeurMode_t.
    unsafe { heuristics.set(CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, &[mode]) }?;
    let heuristics = heuristics.finalize()?;
    // Room for more than cuDNN 9 proposes for a convolution.
    let configs = (0..64)
        .map(|_| Desc::new(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR))
        .collect::<Result<Vec<_>, _>>()?;
    let mut raw: Vec<_> = configs.iter().map(|c| c.0).collect();
    // SAFETY: `raw` holds created engine-config descriptors, which cuDNN fills in.
    let found = unsafe {
        heuristics.get(
            CUDNN_ATTR_ENGINEHEUR_RESULTS,
            CUDNN_TYPE_BACKEND_DESCRIPTOR,
            &mut raw,
        )
    }?;
    Ok(configs.into_iter().take(found).collect())
}

/// Whether an engine config computes in plain FP32: no tensor cores, no inputs converted down
/// to TF32, no reduced-precision sums, so that results agree with the CPU backend's.
fn strict_fp32(config: &Desc) -> Result<bool, cudnn::CudnnError> {
    use cudnn::sys::cudnnBackendAttributeName_t::*;
    use cudnn::sys::cudnnBackendAttributeType_t::*;
    use cudnn::sys::cudnnBackendNumericalNote_t::*;
    let engine =
        Desc::new(cudnn::sys::cudnnBackendDescriptorType_t::CUDNN_BACKEND_ENGINE_DESCRIPTOR)?;
    let mut raw = [engine.0];
    // SAFETY: `raw` holds a created engine descriptor, which cuDNN fills in.
    unsafe {
        config.get(
            CUDNN_ATTR_ENGINECFG_ENGINE,
            CUDNN_TYPE_BACKEND_DESCRIPTOR,
            &mut raw,
        )
    }?;
    // Read as plain integers: a newer cuDNN may name notes that this binding's enum lacks.
    let mut notes = [0u32; 32];
    // SAFETY: CUDNN_TYPE_NUMERICAL_NOTE values are C enums, 32-bit integers.
    let count = unsafe {
        engine.get(
            CUDNN_ATTR_ENGINE_NUMERICAL_NOTE,
            CUDNN_TYPE_NUMERICAL_NOTE,
            &mut notes,
        )
    }?;
    let lossy = [
        CUDNN_NUMERICAL_NOTE_TENSOR_CORE,
        CUDNN_NUMERICAL_NOTE_DOWN_CONVERT_INPUTS,
        CUDNN_NUMERICAL_NOTE_REDUCED_PRECISION_REDUCTION,
    ]
    .map(|n| n as u32);
    Ok(!notes[..count.min(notes.len())]
        .iter()
        .any(|n| lossy.contains(n)))
}

/// A cuDNN handle for the legacy calls that cudarc's safe API does not wrap (ReLU forward and
/// backward, bias add, bias gradient); cudarc keeps its own handle private. Both handles run
/// on the same stream.
struct RawCudnn {
    handle: cudnn::sys::cudnnHandle_t,
    relu: cudnn::sys::cudnnActivationDescriptor_t,
}

/// The address of an f32 scaling factor, as cuDNN takes them.
fn factor(v: &f32) -> *const c_void {
    (v as *const f32).cast()
}

impl RawCudnn {
    fn new(stream: &CudaStream) -> Result<Self, cudnn::CudnnError> {
        use cudnn::sys::cudnnActivationMode_t::CUDNN_ACTIVATION_RELU;
        use cudnn::sys::cudnnNanPropagation_t::CUDNN_NOT_PROPAGATE_NAN;
        let handle = cudnn::result::create_handle()?;
        let relu = match cudnn::result::create_activation_descriptor() {
            Ok(relu) => relu,
            Err(e) => {
                // SAFETY: created just above and not used since.
                let _ = unsafe { cudnn::result::destroy_handle(handle) };
                return Err(e);
            }
        };
        let raw = Self { handle, relu };
        // SAFETY: a handle and a descriptor just created; the stream is live, of the current
        // context, and outlives the handle (`Libs` drops this first).
        unsafe {
            cudnn::result::set_stream(raw.handle, stream.cu_stream() as _)?;
            cudnn::result::set_activation_descriptor(
                raw.relu,
                CUDNN_ACTIVATION_RELU,
                // max(NaN, 0) is 0, as on the CPU.
                CUDNN_NOT_PROPAGATE_NAN,
                0.0,
            )?;
        }
        Ok(raw)
    }

    /// `y = max(x, 0)` over `n` elements.
    fn relu(&self, st: &CudaStream, n: i32, x: &Slice, y: &mut Slice) -> Result<(), ComputeError> {
        let flat = RawTensor::new([1, 1, 1, n])?;
        let (x, _read) = x.device_ptr(st);
        let (y, _write) = y.device_ptr_mut(st);
        // SAFETY: `flat` describes `n` f32, which both buffers hold; the guards order the call
        // after the buffers' writers.
        unsafe {
            cudnn::sys::cudnnActivationForward(
                self.handle,
                self.relu,
                factor(&1.0),
                flat.0,
                x as *const c_void,
                factor(&0.0),
                flat.0,
                y as *mut c_void,
            )
        }
        .result()
        .or_device("cuDNN ReLU")
    }

    /// `dx = dy` where `y > 0`, else 0, over `n` elements. ReLU's output stands in for its
    /// input: both are positive at the same places.
    fn relu_backward(
        &self,
        st: &CudaStream,
        n: i32,
        y: &Slice,
        dy: &Slice,
        dx: &mut Slice,
    ) -> Result<(), ComputeError> {
        let flat = RawTensor::new([1, 1, 1, n])?;
        let (y, _read_y) = y.device_ptr(st);
        let (dy, _read_dy) = dy.device_ptr(st);
        let (dx, _write) = dx.device_ptr_mut(st);
        // SAFETY: as in `relu`.
        unsafe {
            cudnn::sys::cudnnActivationBackward(
                self.handle,
                self.relu,
                factor(&1.0),
                flat.0,
                y as *const c_void,
                flat.0,
                dy as *const c_void,
                flat.0,
                y as *const c_void,
                factor(&0.0),
                flat.0,
                dx as *mut c_void,
            )
        }
        .result()
        .or_device("cuDNN ReLU backward")
    }

    /// `y += b`, broadcast over the batch and the output plane.
    fn add_bias(
        &self,
        st: &CudaStream,
        bias: &RawTensor,
        b: &Slice,
        y_desc: &RawTensor,
        y: &mut Slice,
    ) -> Result<(), ComputeError> {
        let (b, _read) = b.device_ptr(st);
        let (y, _write) = y.device_ptr_mut(st);
        // SAFETY: the descriptors describe `b` and `y`, whose lengths were checked; the guards
        // order the call after the buffers' writers.
        unsafe {
            cudnn::sys::cudnnAddTensor(
                self.handle,
                factor(&1.0),
                bias.0,
                b as *const c_void,
                factor(&1.0),
                y_desc.0,
                y as *mut c_void,
            )
        }
        .result()
        .or_device("cuDNN bias add")
    }

    /// `db` = `dy` summed over the batch and the output plane.
    fn bias_grad(
        &self,
        st: &CudaStream,
        dy_desc: &RawTensor,
        dy: &Slice,
        bias: &RawTensor,
        db: &mut Slice,
    ) -> Result<(), ComputeError> {
        let (dy, _read) = dy.device_ptr(st);
        let (db, _write) = db.device_ptr_mut(st);
        // SAFETY: as in `add_bias`.
        unsafe {
            cudnn::sys::cudnnConvolutionBackwardBias(
                self.handle,
                factor(&1.0),
                dy_desc.0,
                dy as *const c_void,
                factor(&0.0),
                bias.0,
                db as *mut c_void,
            )
        }
        .result()
        .or_device("cuDNN bias gradient")
    }
}

impl Drop for RawCudnn {
    fn drop(&mut self) {
        // SAFETY: both were created in `new` and are destroyed only here.
        unsafe {
            let _ = cudnn::sys::cudnnDestroyActivationDescriptor(self.relu);
            let _ = cudnn::result::destroy_handle(self.handle);
        }
    }
}

/// A packed NCHW f32 tensor descriptor for the raw handle's calls.
struct RawTensor(cudnn::sys::cudnnTensorDescriptor_t);

impl RawTensor {
    fn new(dims: [i32; 4]) -> Result<Self, ComputeError> {
        use cudnn::sys::cudnnDataType_t::CUDNN_DATA_FLOAT;
        use cudnn::sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let tensor =
            Self(cudnn::result::create_tensor_descriptor().or_device("describing a tensor")?);
        // SAFETY: a descriptor just created and not destroyed yet.
        unsafe {
            cudnn::result::set_tensor4d_descriptor(
                tensor.0,
                CUDNN_TENSOR_NCHW,
                CUDNN_DATA_FLOAT,
                dims,
            )
        }
        .or_device("describing a tensor")?;
        Ok(tensor)
    }
}

impl Drop for RawTensor {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed only here.
        let _ = unsafe { cudnn::result::destroy_tensor_descriptor(self.0) };
    }
}

/// These need a GPU, cuBLAS and cuDNN: without them each prints one line and passes. On the
/// GPU machine: `bench/cuda-device.sh`.
#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{MutexGuard, OnceLock};
    use std::time::Duration;

    use faer::Par;

    use super::*;
    use crate::compute::backend::take_download;
    use crate::compute::cpu::run_op;
    use crate::compute::engine::{Engine, EngineConfig, run_sync};
    use crate::compute::ops::uniform;

    /// Held by every test that touches the GPU, so that they run one at a time: a test that
    /// holds a stream on a host event would stall any other test whose first launch of a
    /// kernel makes CUDA's lazy loader synchronize the context.
    pub(crate) fn exclusive() -> Exclusive {
        static GPU: Mutex<()> = Mutex::new(());
        Exclusive { _gpu: lock(&GPU) }
    }

    /// The GPU held by one test. Made first in a test, it drops last: then the test's
    /// backends are torn down before the next test starts or the process exits.
    pub(crate) struct Exclusive {
        _gpu: MutexGuard<'static, ()>,
    }

    impl Drop for Exclusive {
        fn drop(&mut self) {
            settle();
        }
    }

    /// The device, opened once for all tests, and the GPU to this test alone. The tests that
    /// need it are ignored unless asked for (`bench/cuda-device.sh` does, on a GPU machine):
    /// without a usable GPU they fail, saying why, rather than pass having run nothing.
    fn gpu(test: &str) -> (Exclusive, &'static CudaDevice) {
        static DEVICE: OnceLock<Result<CudaDevice, String>> = OnceLock::new();
        let alone = exclusive();
        match DEVICE.get_or_init(CudaDevice::open) {
            Ok(device) => (alone, device),
            Err(why) => panic!("{test} needs a usable GPU ({why})"),
        }
    }

    fn run_cuda(
        b: &CudaBackend,
        stream: usize,
        op: Op,
        inputs: &[&Vec<f32>],
    ) -> Result<Vec<Vec<f32>>, ComputeError> {
        let buffers: Vec<CudaBuffer> = inputs
            .iter()
            .map(|d| b.upload(stream, Arc::new((*d).clone())))
            .collect();
        let refs: Vec<&CudaBuffer> = buffers.iter().collect();
        b.launch(stream, op, &refs)
            .iter()
            .map(|o| {
                let (event, sink) = b.download(stream, o);
                event.wait_blocking();
                take_download(&sink)
            })
            .collect()
    }

    /// `|got - want| <= tolerance * (1 + |want|)` everywhere.
    fn assert_close(what: &str, got: &[f32], want: &[f32], tolerance: f32) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tolerance * (1.0 + w.abs()),
                "{what}[{i}]: {g} vs {w} (tolerance {tolerance})"
            );
        }
    }

    /// Random conv2d shapes mixing stride, padding, dilation and groups; all valid.
    fn shapes() -> Vec<Conv2dParams> {
        let mut state = 0x5eed_u64;
        let mut pick = |lo: usize, hi: usize| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            lo + (state >> 33) as usize % (hi - lo + 1)
        };
        let mut out = Vec::new();
        while out.len() < 24 {
            let groups = pick(1, 3);
            let p = Conv2dParams {
                batch: pick(1, 3),
                in_channels: groups * pick(1, 4),
                height: pick(4, 13),
                width: pick(4, 13),
                out_channels: groups * pick(1, 4),
                kernel: [pick(1, 3), pick(1, 3)],
                stride: [pick(1, 2), pick(1, 2)],
                padding: [pick(0, 2), pick(0, 2)],
                dilation: [pick(1, 2), pick(1, 2)],
                groups,
            };
            if p.check().is_ok() {
                out.push(p);
            }
        }
        out
    }

    /// Every op on the GPU against the CPU's `run_op`. Tolerances, relative to `1 + |want|`:
    /// 1e-3 for convolutions (cuDNN may pick FFT or Winograd algorithms, and sums in another
    /// order), 1e-5 for element-wise ops (cuBLAS may fuse a multiply-add), 1e-4 for the MSE
    /// loss (an f32 dot product against the CPU's f64 sum).
    #[test]
    #[ignore = "needs a GPU: bench/cuda-device.sh runs it on one"]
    fn every_op_matches_the_cpu() {
        let (_alone, device) = gpu("every_op_matches_the_cpu");
        let b = CudaBackend::new(device, 2).unwrap();
        let cpu = |op: Op, inputs: &[&Vec<f32>]| {
            let views: Vec<&[f32]> = inputs.iter().map(|v| v.as_slice()).collect();
            run_op(op, &views, Par::Seq).unwrap()
        };
        for (i, p) in shapes().into_iter().enumerate() {
            let seed = 10 * i as u64;
            let x = uniform(p.input_len(), seed, 1.0);
            let w = uniform(p.weight_len(), seed + 1, 0.5);
            let bias = uniform(p.out_channels, seed + 2, 0.5);
            let dy = uniform(p.output_len(), seed + 3, 1.0);
            let stream = i % 2;
            for inputs in [vec![&x, &w], vec![&x, &w, &bias]] {
                let got = run_cuda(&b, stream, Op::Conv2d(p), &inputs).unwrap();
                let want = cpu(Op::Conv2d(p), &inputs);
                assert_close(&format!("{p:?} y"), &got[0], &want[0], 1e-3);
            }
            let got = run_cuda(&b, stream, Op::Conv2dBackward(p), &[&x, &w, &dy]).unwrap();
            let want = cpu(Op::Conv2dBackward(p), &[&x, &w, &dy]);
            for (k, name) in ["dx", "dw", "db"].iter().enumerate() {
                assert_close(&format!("{p:?} {name}"), &got[k], &want[k], 1e-3);
            }
        }
        let n = 10_007;
        let (a, c, v) = (uniform(n, 1, 1.0), uniform(n, 2, 1.0), uniform(n, 3, 1.0));
        for (op, inputs) in [
            (Op::Relu, vec![&a]),
            (Op::ReluBackward, vec![&a, &c]),
            (Op::Axpy { alpha: -0.75 }, vec![&a, &c]),
            (
                Op::Sgd {
                    learning_rate: 0.1,
                    momentum: 0.9,
                },
                vec![&a, &c, &v],
            ),
            (Op::Mse, vec![&a, &c]),
        ] {
            let got = run_cuda(&b, 0, op, &inputs).unwrap();
            let want = cpu(op, &inputs);
            assert_eq!(got.len(), want.len(), "{op:?}");
            for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                let tolerance = if op == Op::Mse && k == 0 { 1e-4 } else { 1e-5 };
                assert_close(&format!("{op:?} output {k}"), g, w, tolerance);
            }
        }
    }

    /// A plain convolution's passes run on graph-API plans (no silent fall back to the legacy
    /// calls), with the legacy calls' results.
    #[test]
    #[ignore = "needs a GPU: bench/cuda-device.sh runs it on one"]
    fn convolutions_run_on_graph_plans() {
        let (_alone, device) = gpu("convolutions_run_on_graph_plans");
        let b = CudaBackend::new(device, 1).unwrap();
        let p = Conv2dParams {
            padding: [1, 1],
            ..crate::compute::conv::tests::plain(2, 8, [12, 12], 16, 3)
        };
        let (x, w) = (
            uniform(p.input_len(), 1, 1.0),
            uniform(p.weight_len(), 2, 0.5),
        );
        let (bias, dy) = (
            uniform(p.out_channels, 3, 0.5),
            uniform(p.output_len(), 4, 1.0),
        );
        let run_all = || {
            let y = run_cuda(&b, 0, Op::Conv2d(p), &[&x, &w, &bias]).unwrap();
            let grads = run_cuda(&b, 0, Op::Conv2dBackward(p), &[&x, &w, &dy]).unwrap();
            [y, grads].concat()
        };
        let got = run_all();
        let passes = [Pass::Forward, Pass::Data, Pass::Filter];
        for pass in passes {
            assert!(
                matches!(
                    lock(&b.streams[0].libs).graphs.get(&(p, pass)),
                    Some(Some(_))
                ),
                "no {pass:?} graph plan for {p:?}"
            );
        }
        for pass in passes {
            lock(&b.streams[0].libs).graphs.insert((p, pass), None);
        }
        let legacy = run_all();
        let views = [x.as_slice(), w.as_slice(), bias.as_slice()];
        let mut want = run_op(Op::Conv2d(p), &views, Par::Seq).unwrap();
        let views = [x.as_slice(), w.as_slice(), dy.as_slice()];
        want.extend(run_op(Op::Conv2dBackward(p), &views, Par::Seq).unwrap());
        for (k, name) in ["y", "dx", "dw", "db"].iter().enumerate() {
            assert_close(
                &format!("{name}: graph vs legacy"),
                &got[k],
                &legacy[k],
                1e-5,
            );
            assert_close(&format!("{name}: graph vs cpu"), &got[k], &want[k], 1e-3);
        }
    }

    /// Bad shapes, the backend's limits and failed inputs come back as errors from the
    /// download, not panics.
    #[test]
    #[ignore = "needs a GPU: bench/cuda-device.sh runs it on one"]
    fn errors_surface_through_the_outputs() {
        let (_alone, device) = gpu("errors_surface_through_the_outputs");
        let b = CudaBackend::new(device, 1).unwrap();
        let p = Conv2dParams {
            padding: [1, 1],
            ..crate::compute::conv::tests::plain(1, 4, [6, 6], 4, 3)
        };
        let (x, w) = (uniform(3, 1, 1.0), uniform(p.weight_len(), 2, 1.0));
        let err = run_cuda(&b, 0, Op::Conv2d(p), &[&x, &w]).unwrap_err();
        assert!(matches!(err, ComputeError::Shape(_)), "{err}");
        let err = run_cuda(&b, 0, Op::Axpy { alpha: 1.0 }, &[&x, &w]).unwrap_err();
        assert!(matches!(err, ComputeError::Shape(_)), "{err}");
        // Empty buffers are this backend's limit, which the synchronous path does not have.
        let err = run_cuda(&b, 0, Op::Relu, &[&Vec::new()]).unwrap_err();
        assert!(matches!(err, ComputeError::Device(_)), "{err}");
        let failed = CudaBuffer::failed(ComputeError::Injected);
        let out = b.launch(0, Op::Relu, &[&failed]);
        let (event, sink) = b.download(0, &out[0]);
        event.wait_blocking();
        assert_eq!(take_download(&sink), Err(ComputeError::Injected));
    }

    /// A stream waits for an event recorded on another (on the GPU), and for one fired on the
    /// host.
    #[test]
    #[ignore = "needs a GPU: bench/cuda-device.sh runs it on one"]
    fn streams_wait_for_events() {
        let (_alone, device) = gpu("streams_wait_for_events");
        let b = CudaBackend::new(device, 2).unwrap();
        let x = uniform(1 << 20, 7, 1.0);
        // Load the kernel before holding a stream: loading it later could wait for the gate.
        run_cuda(&b, 0, Op::Relu, &[&x]).unwrap();
        let gate = Event::default();
        b.wait(1, &gate);
        let uploaded = b.upload(1, Arc::new(x.clone()));
        let ready = b.record(1);
        b.wait(0, &ready);
        let y = b.launch(0, Op::Relu, &[&uploaded]);
        let (done, sink) = b.download(0, &y[0]);
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !done.is_done(),
            "stream 0 waits for stream 1, which waits on the gate"
        );
        gate.fire();
        done.wait_blocking();
        assert!(ready.is_done());
        let mut want = x;
        crate::compute::ops::relu(&mut want);
        assert_eq!(take_download(&sink).unwrap(), want);
    }

    /// Many tasks at once on a two-thread runtime over three streams: every result equals the
    /// synchronous path's within the convolution tolerance, and every stream did work.
    #[test]
    #[ignore = "needs a GPU: bench/cuda-device.sh runs it on one"]
    fn engine_concurrency_matches_the_synchronous_path() {
        let (_alone, device) = gpu("engine_concurrency_matches_the_synchronous_path");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap();
        let engine = Engine::new(
            Arc::new(CudaBackend::new(device, 3).unwrap()),
            EngineConfig {
                max_concurrent_ops: 8,
                fallback_on_error: false,
            },
        );
        let p = Conv2dParams {
            padding: [1, 1],
            ..crate::compute::conv::tests::plain(2, 8, [12, 12], 8, 3)
        };
        let w = Arc::new(uniform(p.weight_len(), 1, 0.5));
        let b = Arc::new(uniform(p.out_channels, 2, 0.5));
        let results = rt.block_on(async {
            let tasks: Vec<_> = (0..96u64)
                .map(|i| {
                    let (engine, w, b) = (engine.clone(), w.clone(), b.clone());
                    tokio::spawn(async move {
                        let x = Arc::new(uniform(p.input_len(), 100 + i, 1.0));
                        let (op, inputs) = if i % 2 == 0 {
                            (Op::Conv2d(p), vec![x, w, b])
                        } else {
                            (Op::Relu, vec![x])
                        };
                        let got = engine.run(op, inputs.clone()).await.unwrap();
                        (op, inputs, got)
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        });
        for (op, inputs, got) in results {
            let want = run_sync(op, &inputs).unwrap();
            assert_close(&format!("{op:?}"), &got[0], &want[0], 1e-3);
        }
        assert!(
            engine.backend().utilization().iter().all(|u| *u > 0.0),
            "every stream got work: {:?}",
            engine.backend().utilization()
        );
    }

    /// A future dropped while its op waits in the stream: the op still runs later on memory
    /// kept alive by its completion, and the engine stays usable.
    #[test]
    #[ignore = "needs a GPU: bench/cuda-device.sh runs it on one"]
    fn dropping_a_future_is_safe() {
        let (_alone, device) = gpu("dropping_a_future_is_safe");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async move {
            let engine = Engine::new(
                Arc::new(CudaBackend::new(device, 1).unwrap()),
                EngineConfig {
                    max_concurrent_ops: 4,
                    fallback_on_error: false,
                },
            );
            let p = Conv2dParams {
                padding: [1, 1],
                ..crate::compute::conv::tests::plain(2, 8, [12, 12], 8, 3)
            };
            let (x, w) = (
                Arc::new(uniform(p.input_len(), 1, 1.0)),
                Arc::new(uniform(p.weight_len(), 2, 1.0)),
            );
            let want = run_sync(Op::Conv2d(p), &[x.clone(), w.clone()]).unwrap();
            // Load the kernels before holding the stream: loading them later could wait for the
            // gate, which this thread fires.
            let y = engine.conv2d(p, x.clone(), w.clone(), None).await.unwrap();
            assert_close("y before", &y, &want[0], 1e-3);
            let gate = Event::default();
            engine.backend().wait(0, &gate);
            let abandoned = tokio::time::timeout(
                Duration::from_millis(50),
                engine.conv2d(p, x.clone(), w.clone(), None),
            )
            .await;
            assert!(abandoned.is_err(), "the op cannot finish before the gate");
            gate.fire();
            let y = engine.conv2d(p, x, w, None).await.unwrap();
            assert_close("y", &y, &want[0], 1e-3);
        });
    }
}
