//! CUDA backend benchmarks: conv2d forward GFLOP/s on the shapes of the compute benchmark,
//! copy/compute overlap through pinned memory, and the engine's end-to-end rate on one stream
//! and on four. Needs a GPU with cuBLAS and cuDNN; without them it prints one line and exits.
//! On the GPU machine: `bench/cuda-device.sh`, beside `bench/torch_conv.py`.
//! `KF_CUDA_ITERS` sets the timed iterations per shape (default 50).

use std::sync::Arc;
use std::time::Instant;

use kernelflow_agent::compute::backend::{Backend, Op, take_download};
use kernelflow_agent::compute::cuda::{self, CudaBackend, CudaBuffer, CudaDevice};
use kernelflow_agent::compute::engine::{Engine, EngineConfig};
use kernelflow_agent::compute::ops::uniform;

mod shapes;
use shapes::{SHAPES, SMALL, params};

/// Blocks until everything enqueued on `stream` so far has run.
fn sync(b: &CudaBackend, stream: usize) {
    b.record(stream).wait_blocking();
}

/// Reads `buffer` back, failing the benchmark on a device error.
fn check(b: &CudaBackend, stream: usize, buffer: &CudaBuffer) -> Vec<f32> {
    let (event, sink) = b.download(stream, buffer);
    event.wait_blocking();
    take_download(&sink).unwrap_or_else(|e| panic!("the GPU failed: {e}"))
}

fn main() {
    // The backend warns when it falls back from a cuDNN graph plan to a legacy call.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let device = match CudaDevice::open() {
        Ok(d) => d,
        Err(why) => {
            println!("skipping the CUDA benchmark: no usable GPU ({why})");
            return;
        }
    };
    let iters: usize = std::env::var("KF_CUDA_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let b = CudaBackend::new(&device, 2).expect("CUDA streams");
    println!(
        "## kernelflow CUDA backend on {}, FP32 (no TF32)\n",
        device.name()
    );
    conv_throughput(&b, iters);
    train_step(&b, iters);
    launch_cost(&b);
    overlap(&b, iters);
    engine_rate(&device);
    drop(b);
    cuda::settle();
}

/// Forward conv2d with bias, back to back on one stream, inputs already on the device.
fn conv_throughput(b: &CudaBackend, iters: usize) {
    println!("| N,C,H,W,K,RxS,stride,pad | ms | GFLOP/s | host µs per launch |");
    println!("|---|---|---|---|");
    for shape in SHAPES {
        let p = params(shape);
        let x = b.upload(0, Arc::new(uniform(p.input_len(), 1, 1.0)));
        let w = b.upload(0, Arc::new(uniform(p.weight_len(), 2, 0.1)));
        let bias = b.upload(0, Arc::new(uniform(p.out_channels, 3, 0.1)));
        // Warm-up: the algorithm choice, the workspace, the memory pool.
        for _ in 0..3 {
            b.launch(0, Op::Conv2d(p), &[&x, &w, &bias]);
        }
        sync(b, 0);
        let start = Instant::now();
        let mut last = Vec::new();
        for _ in 0..iters {
            last = b.launch(0, Op::Conv2d(p), &[&x, &w, &bias]);
        }
        // What the host spends enqueueing: when it nears the total, launches are the limit.
        let host = start.elapsed().as_secs_f64() / iters as f64;
        sync(b, 0);
        let secs = start.elapsed().as_secs_f64() / iters as f64;
        check(b, 0, &last[0]);
        let (n, c, h, k, r, stride, pad) = shape;
        println!(
            "| {n},{c},{h},{h},{k},{r}x{r},{stride},{pad} | {:.3} | {:.0} | {:.1} |",
            secs * 1e3,
            p.flops() / secs / 1e9,
            host * 1e6
        );
    }
    println!();
}

/// A training step (forward, backward for input, weight and bias, SGD with momentum on the
/// weights) against the forward pass alone, on the first shape.
fn train_step(b: &CudaBackend, iters: usize) {
    let p = params(SHAPES[0]);
    let x = b.upload(0, Arc::new(uniform(p.input_len(), 1, 1.0)));
    let w = b.upload(0, Arc::new(uniform(p.weight_len(), 2, 0.1)));
    let bias = b.upload(0, Arc::new(uniform(p.out_channels, 3, 0.1)));
    let dy = b.upload(0, Arc::new(uniform(p.output_len(), 4, 1.0)));
    let v = b.upload(0, Arc::new(vec![0.0; p.weight_len()]));
    let forward = || b.launch(0, Op::Conv2d(p), &[&x, &w, &bias]);
    let step = || {
        let y = forward();
        let grads = b.launch(0, Op::Conv2dBackward(p), &[&x, &w, &dy]);
        let sgd = Op::Sgd {
            learning_rate: 0.01,
            momentum: 0.9,
        };
        [y, b.launch(0, sgd, &[&w, &grads[1], &v])].concat()
    };
    let time = |run: &dyn Fn() -> Vec<CudaBuffer>| {
        let mut last = run();
        sync(b, 0);
        let start = Instant::now();
        for _ in 0..iters {
            last = run();
        }
        sync(b, 0);
        let secs = start.elapsed().as_secs_f64() / iters as f64;
        check(b, 0, &last[0]);
        secs * 1e3
    };
    let (fwd, full) = (time(&forward), time(&step));
    println!("| {:?} | ms |\n|---|---|", SHAPES[0]);
    println!("| forward | {fwd:.3} |\n| step (forward, backward, update) | {full:.3} |");
    println!("| step / forward | {:.2}x |\n", full / fwd);
}

/// The host's cost of enqueueing: an empty piece of work (its two events and its hand-off to
/// the stream's waiter thread) and a ReLU over 1024 floats.
fn launch_cost(b: &CudaBackend) {
    let x = b.upload(0, Arc::new(uniform(1024, 5, 1.0)));
    let n = 2000;
    let time = |run: &dyn Fn()| {
        run();
        sync(b, 0);
        let start = Instant::now();
        for _ in 0..n {
            run();
        }
        let host = start.elapsed().as_secs_f64();
        sync(b, 0);
        (
            host / n as f64 * 1e6,
            start.elapsed().as_secs_f64() / n as f64 * 1e6,
        )
    };
    println!("| enqueued, {n} times | host µs each | µs each |");
    println!("|---|---|---|");
    let record = || drop(b.record(0));
    let relu = || drop(b.launch(0, Op::Relu, &[&x]));
    let runs: [(&str, &dyn Fn()); 2] = [
        ("nothing (events only)", &record),
        ("ReLU of 1024 floats", &relu),
    ];
    for (what, run) in runs {
        let (host, total) = time(run);
        println!("| {what} | {host:.1} | {total:.1} |");
    }
    println!();
}

/// Host-to-device copies on stream 1, submitted from a thread of their own, while conv2d runs
/// on stream 0: how much of the shorter of the two hides behind the longer (1: all of it, 0:
/// none). Uploads start from pageable memory that the host stages through pinned buffers, as
/// the engine's do.
fn overlap(b: &CudaBackend, iters: usize) {
    // The first shape at batch 32, so that the GPU rather than the host limits the compute.
    let shape = (
        32,
        SHAPES[0].1,
        SHAPES[0].2,
        SHAPES[0].3,
        SHAPES[0].4,
        SHAPES[0].5,
        SHAPES[0].6,
    );
    let p = params(shape);
    let x = b.upload(0, Arc::new(uniform(p.input_len(), 1, 1.0)));
    let w = b.upload(0, Arc::new(uniform(p.weight_len(), 2, 0.1)));
    let data = Arc::new(uniform(16 << 20, 4, 1.0)); // 64 MiB
    let copies = (iters / 5).max(4);
    let compute = |n: usize| {
        for _ in 0..n {
            b.launch(0, Op::Conv2d(p), &[&x, &w]);
        }
    };
    let copy = || {
        for _ in 0..copies {
            b.upload(1, data.clone());
        }
    };
    let time = |run: &dyn Fn()| {
        let start = Instant::now();
        run();
        sync(b, 0);
        sync(b, 1);
        start.elapsed().as_secs_f64()
    };
    // Warm-up, which also fills the pinned pool.
    time(&copy);
    let t_copy = time(&copy);
    // As many convolutions as take about as long as the copies: the most there is to hide.
    let each = time(&|| compute(iters)) / iters as f64;
    let n = ((t_copy / each) as usize).max(iters);
    let t_compute = time(&|| compute(n));
    let t_both = time(&|| {
        std::thread::scope(|s| {
            s.spawn(copy);
            compute(n);
        })
    });
    let hidden = (t_copy + t_compute - t_both) / t_copy.min(t_compute);
    let gbps = copies as f64 * (data.len() * 4) as f64 / t_copy / 1e9;
    println!("| copy/compute overlap | seconds |");
    println!("|---|---|");
    println!(
        "| {copies} x 64 MiB host-to-device (pageable, staged through pinned memory), alone: {gbps:.1} GB/s | {t_copy:.3} |"
    );
    println!("| {n} x conv2d {shape:?}, alone | {t_compute:.3} |");
    println!("| both, from two threads on two streams | {t_both:.3} |");
    println!("| overlap (1 = the shorter fully hidden) | {hidden:.2} |\n");
}

/// The async engine end to end (upload, conv2d, download per op) from 64 tasks.
fn engine_rate(device: &CudaDevice) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .build()
        .unwrap();
    let p = params(SMALL);
    let w = Arc::new(uniform(p.weight_len(), 2, 0.1));
    println!("| engine, {SMALL:?} with copies, 1024 ops | ops/s |");
    println!("|---|---|");
    for streams in [1, 4] {
        let engine = Engine::new(
            Arc::new(CudaBackend::new(device, streams).expect("CUDA streams")),
            EngineConfig {
                max_concurrent_ops: 64,
                fallback_on_error: false,
            },
        );
        let xs: Vec<Arc<Vec<f32>>> = (0..16)
            .map(|i| Arc::new(uniform(p.input_len(), 10 + i, 1.0)))
            .collect();
        let run = |ops: usize| {
            rt.block_on(async {
                let tasks: Vec<_> = (0..64)
                    .map(|t| {
                        let (engine, w, xs) = (engine.clone(), w.clone(), xs.clone());
                        tokio::spawn(async move {
                            for i in 0..ops / 64 {
                                let x = xs[(t + i) % xs.len()].clone();
                                engine.conv2d(p, x, w.clone(), None).await.unwrap();
                            }
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
            })
        };
        run(128);
        let start = Instant::now();
        run(1024);
        let rate = 1024.0 / start.elapsed().as_secs_f64();
        println!("| {streams} stream(s) | {rate:.0} |");
    }
}
