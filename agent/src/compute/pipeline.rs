//! The pipeline runner: batches flow through four stages (load, upload, compute, download),
//! grouped into lanes that run at once on their own threads, joined by bounded queues.
//!
//! - sequential: one lane; one batch at a time.
//! - double: `[load, upload]` and `[compute, download]`: upload N while computing N-1.
//! - triple: `[load, upload]`, `[compute]`, `[download]`: upload N, compute N-1, download N-2.
//!
//! Lanes stop cleanly when the source ends or any stage fails: the failing lane drops its
//! queues, its neighbours see them close, and the first error is returned.

use std::ops::Range;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use kernelflow_crds::training_job::PipelineMode;

use super::ComputeError;

/// The stages, in order.
pub const STAGES: [&str; 4] = ["load", "upload", "compute", "download"];

/// One stage's work on a batch.
pub type Stage<'a, T> = Box<dyn FnMut(T) -> Result<T, ComputeError> + Send + 'a>;

/// Which stages each lane runs.
pub fn lanes(mode: PipelineMode) -> Vec<Range<usize>> {
    match mode {
        PipelineMode::Sequential => std::iter::once(0..4).collect(),
        PipelineMode::Double => vec![0..2, 2..4],
        PipelineMode::Triple => vec![0..2, 2..3, 3..4],
    }
}

/// Times of one run.
#[derive(Clone, Debug, PartialEq)]
pub struct PipelineReport {
    pub mode: PipelineMode,
    pub batches: usize,
    /// Total time spent in each stage, in [`STAGES`] order.
    pub stage_seconds: [f64; 4],
    pub wall_seconds: f64,
    /// Sum of stage times over the busiest lane's time: the best overlap can do.
    pub theoretical_speedup: f64,
    /// Sum of stage times over wall time: what overlap did.
    pub measured_speedup: f64,
}

impl PipelineReport {
    /// The figures of `batches` batches that spent `stage_seconds` in the stages over
    /// `wall_seconds`.
    pub fn new(
        mode: PipelineMode,
        batches: usize,
        stage_seconds: [f64; 4],
        wall_seconds: f64,
    ) -> Self {
        let total: f64 = stage_seconds.iter().sum();
        Self {
            mode,
            batches,
            stage_seconds,
            wall_seconds,
            theoretical_speedup: theoretical_speedup(mode, stage_seconds),
            measured_speedup: if wall_seconds > 0.0 {
                total / wall_seconds
            } else {
                1.0
            },
        }
    }

    /// Measured over theoretical speedup.
    pub fn overlap_efficiency(&self) -> f64 {
        if self.theoretical_speedup > 0.0 {
            self.measured_speedup / self.theoretical_speedup
        } else {
            0.0
        }
    }
}

/// Runs every batch from `source` through `stages` and hands the results to `sink`, with up
/// to `prefetch` batches done with one lane and not yet taken by the next. Blocks until done; call it from a blocking
/// thread, never an async runtime thread.
pub fn run<T: Send>(
    mode: PipelineMode,
    prefetch: usize,
    source: impl Iterator<Item = T> + Send,
    stages: [Stage<'_, T>; 4],
    sink: impl FnMut(T) + Send,
) -> Result<PipelineReport, ComputeError> {
    let plan = lanes(mode);
    let mut stages = stages.map(Some);
    let mut sink = Some(sink);
    let started = Instant::now();
    let results: Vec<Result<(usize, Vec<Duration>), ComputeError>> = std::thread::scope(|scope| {
        let mut input: Option<Receiver<T>> = None;
        let mut source = Some(source);
        let mut handles = Vec::new();
        for (i, range) in plan.iter().enumerate() {
            let last = i + 1 == plan.len();
            let (tx, rx): (Option<SyncSender<T>>, Option<Receiver<T>>) = if last {
                (None, None)
            } else {
                // A lane blocked on a full queue holds one more batch, done with its stages.
                let (tx, rx) = sync_channel(prefetch.max(1) - 1);
                (Some(tx), Some(rx))
            };
            let mut own: Vec<Stage<'_, T>> = range
                .clone()
                .map(|s| stages[s].take().expect("each stage in one lane"))
                .collect();
            let from = input.take();
            let mut items: Box<dyn Iterator<Item = T> + Send> = match from {
                Some(rx) => Box::new(rx.into_iter()),
                None => Box::new(source.take().expect("the first lane reads the source")),
            };
            let mut sink = if last { sink.take() } else { None };
            handles.push(scope.spawn(move || {
                let mut times = vec![Duration::ZERO; own.len()];
                let mut count = 0;
                for mut item in &mut items {
                    for (stage, time) in own.iter_mut().zip(times.iter_mut()) {
                        let t = Instant::now();
                        item = stage(item)?;
                        *time += t.elapsed();
                    }
                    count += 1;
                    match (&tx, &mut sink) {
                        (Some(tx), _) => {
                            if tx.send(item).is_err() {
                                break; // The next lane stopped; its error is reported.
                            }
                        }
                        (None, Some(sink)) => sink(item),
                        (None, None) => unreachable!("the last lane has the sink"),
                    }
                }
                Ok((count, times))
            }));
            input = rx;
        }
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(ComputeError::Stopped("a pipeline stage panicked".into()))
                })
            })
            .collect()
    });
    let wall = started.elapsed().as_secs_f64();
    let mut stage_seconds = [0.0; 4];
    let mut batches = 0;
    for (range, result) in plan.iter().zip(results) {
        let (count, times) = result?;
        batches = count;
        for (s, t) in range.clone().zip(times) {
            stage_seconds[s] = t.as_secs_f64();
        }
    }
    Ok(PipelineReport::new(mode, batches, stage_seconds, wall))
}

/// Sum of stage times over the busiest lane's: the speedup perfect overlap would give.
pub fn theoretical_speedup(mode: PipelineMode, stage_seconds: [f64; 4]) -> f64 {
    let total: f64 = stage_seconds.iter().sum();
    let busiest = lanes(mode)
        .into_iter()
        .map(|r| stage_seconds[r].iter().sum::<f64>())
        .fold(0.0, f64::max);
    if busiest > 0.0 { total / busiest } else { 1.0 }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn sleeper<'a>(ms: u64, tag: u32) -> Stage<'a, Vec<u32>> {
        Box::new(move |mut v: Vec<u32>| {
            std::thread::sleep(Duration::from_millis(ms));
            v.push(tag);
            Ok(v)
        })
    }

    #[test]
    fn every_mode_runs_every_stage_on_every_batch_in_order() {
        for mode in [
            PipelineMode::Sequential,
            PipelineMode::Double,
            PipelineMode::Triple,
        ] {
            let mut out = Vec::new();
            let report = run(
                mode,
                2,
                (0..5u32).map(|i| vec![i]),
                [sleeper(0, 1), sleeper(0, 2), sleeper(0, 3), sleeper(0, 4)],
                |v| out.push(v),
            )
            .unwrap();
            assert_eq!(report.batches, 5);
            assert_eq!(
                out,
                (0..5).map(|i| vec![i, 1, 2, 3, 4]).collect::<Vec<_>>(),
                "{mode:?}"
            );
        }
    }

    #[test]
    fn no_more_than_prefetch_batches_wait_ahead_of_compute() {
        for prefetch in [1, 3] {
            let loaded = AtomicUsize::new(0);
            let (open, gate) = std::sync::mpsc::channel::<()>();
            let gate = std::sync::Mutex::new(gate);
            let load: Stage<'_, u32> = Box::new(|v| {
                loaded.fetch_add(1, Ordering::SeqCst);
                Ok(v)
            });
            let compute: Stage<'_, u32> = Box::new(|v| {
                gate.lock().unwrap().recv().unwrap();
                Ok(v)
            });
            let id = || -> Stage<'_, u32> { Box::new(Ok) };
            std::thread::scope(|s| {
                let stages = [load, id(), compute, id()];
                let running = s.spawn(|| run(PipelineMode::Double, prefetch, 0..20, stages, drop));
                // The first batch is held in compute while the lane before it fills up.
                let start = std::time::Instant::now();
                while loaded.load(Ordering::SeqCst) <= prefetch && start.elapsed().as_secs() < 10 {
                    std::thread::sleep(Duration::from_millis(1));
                }
                std::thread::sleep(Duration::from_millis(100));
                let ahead = loaded.load(Ordering::SeqCst) - 1;
                (0..20).for_each(|_| open.send(()).unwrap());
                assert_eq!(running.join().unwrap().unwrap().batches, 20);
                assert_eq!(ahead, prefetch, "batches ahead of compute");
            });
        }
    }

    #[test]
    fn theoretical_speedup_follows_the_lanes() {
        // Stages of 1, 1, 4 and 2: sequential 1x; double lanes (2, 6) 8/6; triple (2, 4, 2) 8/4.
        let stages = [1.0, 1.0, 4.0, 2.0];
        assert_eq!(theoretical_speedup(PipelineMode::Sequential, stages), 1.0);
        assert_eq!(theoretical_speedup(PipelineMode::Double, stages), 8.0 / 6.0);
        assert_eq!(theoretical_speedup(PipelineMode::Triple, stages), 2.0);
        assert_eq!(theoretical_speedup(PipelineMode::Triple, [0.0; 4]), 1.0);
    }

    #[test]
    fn a_failing_stage_stops_every_lane_and_reports_its_error() {
        let fail_third: Stage<'_, u32> = Box::new(|v| {
            if v == 3 {
                Err(ComputeError::Injected)
            } else {
                Ok(v)
            }
        });
        let id = || -> Stage<'_, u32> { Box::new(Ok) };
        let mut seen = Vec::new();
        let err = run(
            PipelineMode::Triple,
            1,
            0..1000u32,
            [id(), id(), fail_third, id()],
            |v| seen.push(v),
        )
        .unwrap_err();
        assert_eq!(err, ComputeError::Injected);
        assert_eq!(seen, [0, 1, 2]);
    }
}
