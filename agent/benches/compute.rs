//! Compute engine benchmarks: `cargo bench -p kernelflow-agent --bench compute`.
//! Prints markdown tables for docs/benchmarks.md. Set `KF_BENCH=conv,train,async,pipeline,streams`
//! to run a subset, `KF_PIPELINE_MS=load,upload,compute,download` for the stage mix and
//! `KF_CONV_THREADS` for the conv2d threads (2) and `KF_CONV_SHAPES=0,3` for some of its shapes
//! (by index; all unless set); `KF_CONV_FRESH=1` allocates each conv2d output afresh instead of
//! reusing given-back memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use faer::Par;
use futures::stream::{self, StreamExt};
use kernelflow_agent::compute::backend::Op;
use kernelflow_agent::compute::cpu::{CpuBackend, run_op};
use kernelflow_agent::compute::engine::{Engine, EngineConfig};
use kernelflow_agent::compute::ops::uniform;
use kernelflow_agent::compute::pipeline::{self, STAGES, Stage};
use kernelflow_agent::compute::recycle;
use kernelflow_agent::compute::train::{Model, gradients};
use kernelflow_crds::Conv2dSpec;
use kernelflow_crds::training_job::PipelineMode;

mod shapes;
use shapes::{SHAPES, SMALL, params};

/// Median seconds of `f` over enough runs to fill about `budget`, after one warm-up.
fn median(budget: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 3 || (start.elapsed() < budget && times.len() < 200) {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// conv2d forward on `KF_CONV_THREADS` threads (2 unless set).
fn conv_throughput() {
    let threads: usize = std::env::var("KF_CONV_THREADS").map_or(2, |t| t.parse().unwrap());
    println!(
        "## conv2d forward, {threads} threads\n\n| N, C, H, W, K, RxS, stride, pad | ms | GFLOP/s |\n|---|---|---|"
    );
    let only: Option<Vec<usize>> = std::env::var("KF_CONV_SHAPES")
        .ok()
        .map(|s| s.split(',').map(|i| i.parse().unwrap()).collect());
    for (i, p) in SHAPES.map(params).into_iter().enumerate() {
        if only.as_ref().is_some_and(|only| !only.contains(&i)) {
            continue;
        }
        let x = uniform(p.input_len(), 1, 1.0);
        let w = uniform(p.weight_len(), 2, 0.1);
        let b = uniform(p.out_channels, 3, 0.1);
        // As the agent runs it: the synchronous path, each output given back when done with
        // (onnxruntime's arena reuses its outputs' memory too). KF_CONV_FRESH=1: fresh outputs.
        let fresh = std::env::var_os("KF_CONV_FRESH").is_some();
        let (op, inputs) = (Op::Conv2d(p), [&x[..], &w, &b]);
        let s = median(Duration::from_secs(3), || {
            let y = run_op(op, &inputs, Par::rayon(threads)).unwrap();
            if !fresh {
                y.into_iter().for_each(recycle::give);
            }
        });
        println!(
            "| {}, {}, {}, {}, {}, {}x{}, {}, {} | {:.2} | {:.1} |",
            p.batch,
            p.in_channels,
            p.height,
            p.width,
            p.out_channels,
            p.kernel[0],
            p.kernel[1],
            p.stride[0],
            p.padding[0],
            s * 1e3,
            p.flops() / s / 1e9
        );
    }
}

fn spec(c: u32, k: u32) -> Conv2dSpec {
    Conv2dSpec {
        padding: [1, 1],
        ..Conv2dSpec::new(c, k, [3, 3])
    }
}

fn training_step(rt: &tokio::runtime::Runtime) {
    println!(
        "\n## training step against forward (2 layers 32->64->32, 3x3, 28x28, batch 16)\n\n| what | ms |\n|---|---|"
    );
    let specs = [spec(32, 64), spec(64, 32)];
    let mut model = Model::new(&specs, [32, 28, 28], 1).unwrap();
    let x = uniform(16 * 32 * 28 * 28, 2, 1.0);
    let target = uniform(16 * 32 * 28 * 28, 3, 1.0);
    let engine = Engine::new(
        Arc::new(CpuBackend::new(1, 2)),
        EngineConfig {
            max_concurrent_ops: 64,
            fallback_on_error: false,
        },
    );
    let fwd = median(Duration::from_secs(3), || {
        std::hint::black_box(model.predict(&x, 16, Par::rayon(2)).unwrap());
    });
    let step = median(Duration::from_secs(3), || {
        let r = rt
            .block_on(gradients(&engine, &model, &x, &target, 16, 1))
            .unwrap();
        model.apply(&r.grads, 1e-4, 0.9);
    });
    println!(
        "| forward | {:.2} |\n| step (forward, backward, update) | {:.2} |\n| step / forward | {:.2}x |",
        fwd * 1e3,
        step * 1e3,
        step / fwd
    );
}

fn async_overhead(rt: &tokio::runtime::Runtime) {
    println!(
        "\n## async path overhead (1, 32, 32, 32, 32, 3x3; one stream)\n\n| op threads | async ops in flight | synchronous µs/op | async µs/op | overhead |\n|---|---|---|---|---|"
    );
    let p = params(SMALL);
    let x = Arc::new(uniform(p.input_len(), 1, 1.0));
    let w = Arc::new(uniform(p.weight_len(), 2, 0.1));
    // The same compute threads on both paths: what differs is only the stream around it.
    for threads in [1, 2] {
        // One op awaited before the next: each op pays for waking a pool thread to drain the
        // stream, and the awaiting thread when it is done. Several in flight: the stream's
        // drain goes from one op to the next.
        for in_flight in [1, 4] {
            let engine = Engine::new(
                Arc::new(CpuBackend::new(1, threads)),
                EngineConfig {
                    max_concurrent_ops: in_flight,
                    fallback_on_error: false,
                },
            );
            let ops = 50;
            let mut sync = Vec::new();
            let mut asynchronous = Vec::new();
            // Many short interleaved rounds, so that drift in machine load hits both paths alike
            // and the median leaves out the rounds that a burst of it hit.
            for _ in 0..41 {
                let t = Instant::now();
                for _ in 0..ops {
                    let out = run_op(Op::Conv2d(p), &[&x, &w], Par::rayon(threads));
                    std::hint::black_box(out.unwrap());
                }
                sync.push(t.elapsed().as_secs_f64() / ops as f64);
                let t = Instant::now();
                rt.block_on(
                    stream::iter(0..ops)
                        .map(|_| engine.conv2d(p, x.clone(), w.clone(), None))
                        .buffered(in_flight)
                        .for_each(|out| {
                            std::hint::black_box(out.unwrap());
                            async {}
                        }),
                );
                asynchronous.push(t.elapsed().as_secs_f64() / ops as f64);
            }
            let med = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let (s, a) = (med(&mut sync), med(&mut asynchronous));
            println!(
                "| {threads} | {in_flight} | {:.1} | {:.1} | {:.1} µs ({:+.2}%) |",
                s * 1e6,
                a * 1e6,
                (a - s) * 1e6,
                (a / s - 1.0) * 100.0
            );
        }
    }
}

fn pipelines() {
    let mix: Vec<u64> = std::env::var("KF_PIPELINE_MS")
        .unwrap_or_else(|_| "2,3,8,3".into())
        .split(',')
        .map(|v| {
            v.trim()
                .parse()
                .expect("KF_PIPELINE_MS: four integers (ms)")
        })
        .collect();
    assert_eq!(
        mix.len(),
        4,
        "KF_PIPELINE_MS: load,upload,compute,download in ms"
    );
    println!(
        "\n## pipeline overlap (stages sleep {} ms; 40 batches, prefetch 2)\n\n| mode | wall s | theoretical | measured | efficiency |\n|---|---|---|---|---|",
        STAGES
            .iter()
            .zip(&mix)
            .map(|(s, m)| format!("{s} {m}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for mode in [
        PipelineMode::Sequential,
        PipelineMode::Double,
        PipelineMode::Triple,
    ] {
        let stage = |ms: u64| -> Stage<'static, ()> {
            Box::new(move |()| {
                std::thread::sleep(Duration::from_millis(ms));
                Ok(())
            })
        };
        let stages = [stage(mix[0]), stage(mix[1]), stage(mix[2]), stage(mix[3])];
        let r = pipeline::run(mode, 2, (0..40).map(|_| ()), stages, drop).unwrap();
        println!(
            "| {mode:?} | {:.3} | {:.2}x | {:.2}x | {:.1}% |",
            r.wall_seconds,
            r.theoretical_speedup,
            r.measured_speedup,
            r.overlap_efficiency() * 100.0
        );
    }
}

fn stream_scaling(rt: &tokio::runtime::Runtime) {
    println!(
        "\n## stream scaling (1, 32, 32, 32, 32, 3x3; 64 ops in flight; 1 thread per op)\n\n| streams | ops/s |\n|---|---|"
    );
    let p = params(SMALL);
    let x = Arc::new(uniform(p.input_len(), 1, 1.0));
    let w = Arc::new(uniform(p.weight_len(), 2, 0.1));
    for streams in [1, 2, 4] {
        let engine = Engine::new(
            Arc::new(CpuBackend::new(streams, 1)),
            EngineConfig {
                max_concurrent_ops: 64,
                fallback_on_error: false,
            },
        );
        let total = 512;
        let s = median(Duration::from_secs(3), || {
            rt.block_on(async {
                let tasks: Vec<_> = (0..total)
                    .map(|_| {
                        let (e, x, w) = (engine.clone(), x.clone(), w.clone());
                        tokio::spawn(async move { e.conv2d(p, x, w, None).await.unwrap() })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
            })
        });
        println!("| {streams} | {:.0} |", total as f64 / s);
    }
}

fn main() {
    let only =
        std::env::var("KF_BENCH").unwrap_or_else(|_| "conv,train,async,pipeline,streams".into());
    let on = |name: &str| only.split(',').any(|s| s.trim() == name);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "# kernelflow compute benchmarks ({} cores)\n",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    if on("conv") {
        conv_throughput();
    }
    if on("train") {
        training_step(&rt);
    }
    if on("async") {
        async_overhead(&rt);
    }
    if on("pipeline") {
        pipelines();
    }
    if on("streams") {
        stream_scaling(&rt);
    }
}
