//! The agent's training metrics. Per-worker series are read from the workers' progress at
//! scrape time, so that they go away with the worker; checkpoint counters count events.

use std::sync::{Arc, Mutex};

use kernelflow_crds::training_job::WorkerState;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{CounterVec, GaugeVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};

use super::Trainer;
use crate::compute::pipeline::STAGES;

/// Checkpoint events.
#[derive(Clone)]
pub struct Counters {
    pub checkpoints: IntCounter,
    pub checkpoint_failures: IntCounterVec,
    pub checkpoint_refusals: IntCounterVec,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            checkpoints: IntCounter::new(
                "training_checkpoints_total",
                "Checkpoints written by training workers.",
            )
            .expect("valid metric"),
            checkpoint_failures: IntCounterVec::new(
                Opts::new(
                    "training_checkpoint_failures_total",
                    "Checkpoints that could not be written, by reason.",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            checkpoint_refusals: IntCounterVec::new(
                Opts::new(
                    "training_checkpoint_refusals_total",
                    "Checkpoints not resumed from (damaged, or of another spec), by reason.",
                ),
                &["reason"],
            )
            .expect("valid metric"),
        }
    }
}

impl Counters {
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.checkpoints.clone()))?;
        registry.register(Box::new(self.checkpoint_failures.clone()))?;
        registry.register(Box::new(self.checkpoint_refusals.clone()))
    }
}

const WORKER: [&str; 3] = ["namespace", "job", "worker"];

/// Per-worker series, filled from the trainer on each scrape.
pub struct WorkerMetrics {
    trainer: Arc<Trainer>,
    /// Serialises scrapes: each one resets the series and fills them again.
    scrape: Mutex<()>,
    steps: IntCounterVec,
    samples: IntCounterVec,
    loss: GaugeVec,
    stage_seconds: CounterVec,
    overlap: GaugeVec,
    utilization: GaugeVec,
    fallbacks: IntCounterVec,
    workers: IntGaugeVec,
}

impl WorkerMetrics {
    pub fn new(trainer: Arc<Trainer>) -> Self {
        let with = |extra: &'static str| [&WORKER[..], &[extra]].concat();
        Self {
            trainer,
            scrape: Mutex::default(),
            steps: IntCounterVec::new(
                Opts::new("training_steps_total", "Optimiser steps run by a worker."),
                &WORKER,
            )
            .expect("valid metric"),
            samples: IntCounterVec::new(
                Opts::new("training_samples_total", "Samples trained on by a worker."),
                &WORKER,
            )
            .expect("valid metric"),
            loss: GaugeVec::new(
                Opts::new("training_loss", "Loss of a worker's latest step."),
                &WORKER,
            )
            .expect("valid metric"),
            stage_seconds: CounterVec::new(
                Opts::new(
                    "training_pipeline_stage_seconds_total",
                    "Time a worker's pipeline spent in each stage (load, upload, compute, download).",
                ),
                &with("stage"),
            )
            .expect("valid metric"),
            overlap: GaugeVec::new(
                Opts::new(
                    "training_overlap_efficiency",
                    "Measured over theoretical pipeline speedup of a worker's current run (0..1).",
                ),
                &WORKER,
            )
            .expect("valid metric"),
            utilization: GaugeVec::new(
                Opts::new(
                    "training_stream_utilization",
                    "Busy over wall time of each stream of a worker's current run.",
                ),
                &with("stream"),
            )
            .expect("valid metric"),
            fallbacks: IntCounterVec::new(
                Opts::new(
                    "training_fallbacks_total",
                    "Steps re-run on the synchronous path after an asynchronous failure.",
                ),
                &WORKER,
            )
            .expect("valid metric"),
            workers: IntGaugeVec::new(
                Opts::new("training_workers", "Workers on this node, by state."),
                &["state"],
            )
            .expect("valid metric"),
        }
    }

    fn fill(&self) {
        for state in [
            WorkerState::Starting,
            WorkerState::Running,
            WorkerState::Suspended,
            WorkerState::Succeeded,
            WorkerState::Failed,
        ] {
            self.workers
                .with_label_values(&[format!("{state:?}").as_str()])
                .set(0);
        }
        for (namespace, job, index, p) in self.trainer.snapshot() {
            let index = index.to_string();
            let labels = [namespace.as_str(), job.as_str(), index.as_str()];
            self.workers
                .with_label_values(&[format!("{:?}", p.state).as_str()])
                .inc();
            self.steps.with_label_values(&labels).inc_by(p.steps_total);
            self.samples
                .with_label_values(&labels)
                .inc_by(p.samples_total);
            self.fallbacks
                .with_label_values(&labels)
                .inc_by(p.fallbacks_total);
            if let Some(loss) = p.last_loss {
                self.loss.with_label_values(&labels).set(f64::from(loss));
            }
            for (stage, seconds) in STAGES.iter().zip(p.stage_seconds_total) {
                self.stage_seconds
                    .with_label_values(&[&labels[..], &[stage]].concat())
                    .inc_by(seconds);
            }
            if let Some(f) = p.figures() {
                self.overlap
                    .with_label_values(&labels)
                    .set(f.overlap_efficiency);
            }
            for (stream, u) in p.utilization.iter().enumerate() {
                let stream = stream.to_string();
                self.utilization
                    .with_label_values(&[&labels[..], &[stream.as_str()]].concat())
                    .set(*u);
            }
        }
    }

    fn families(&self) -> [&dyn Collector; 8] {
        [
            &self.steps,
            &self.samples,
            &self.loss,
            &self.stage_seconds,
            &self.overlap,
            &self.utilization,
            &self.fallbacks,
            &self.workers,
        ]
    }
}

impl Collector for WorkerMetrics {
    fn desc(&self) -> Vec<&Desc> {
        self.families()
            .into_iter()
            .flat_map(Collector::desc)
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _one_at_a_time = self.scrape.lock().expect("scrape lock");
        self.steps.reset();
        self.samples.reset();
        self.loss.reset();
        self.stage_seconds.reset();
        self.overlap.reset();
        self.utilization.reset();
        self.fallbacks.reset();
        self.fill();
        self.families()
            .into_iter()
            .flat_map(Collector::collect)
            .collect()
    }
}
