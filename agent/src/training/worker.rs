//! One worker's run: build the model (inline layers from the job's seed; KernelDeployment
//! layers from their warm kernels, frozen), load the data and the last checkpoint, then train
//! through the job's pipeline until the last step, a stop request or an error.
//!
//! The pipeline's stages for one step: **load** the batch (a pure function of seed, worker
//! and step), **upload** it onto the streams, **compute** forward, backward and the SGD
//! update, and **download** the results to the host: progress, metrics and, every
//! `checkpoint.everySteps`, the checkpoint written to disk. Compute runs the steps in order
//! whatever the mode, so every mode gives the same weights; the modes differ in how much of
//! the other stages they hide behind it.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kernelflow_crds::training_job::{
    AsyncTrainingJobSpec, PipelineFigures, PipelineMode, WorkerState,
};
use kernelflow_crds::{Conv2dSpec, validate};
use sha2::{Digest, Sha256};
use tokio::runtime::Handle;

use super::Env;
use super::checkpoint::{CheckpointError, Checkpoints, Meta, weights_digest};
use super::data::{self, Data};
use crate::artifact::format::{ArtifactError, Kernel, Limits};
use crate::compute::ComputeError;
use crate::compute::backend::Backend;
use crate::compute::cpu::InlineBackend;
use crate::compute::pipeline::{self, PipelineReport, Stage};
use crate::compute::train::{KernelLayerRunner, Model, Staged, staged_gradients, upload};
use crate::rollout::RolloutLayers;

/// Cores each op's matmuls use, on the streams and on the synchronous fallback alike: the
/// same on both so that a fallback step gives the same bits.
const OP_THREADS: usize = 1;

/// Why a worker stopped before its last step.
#[derive(Debug, thiserror::Error)]
pub enum TrainingError {
    #[error("the model does not fit together: {0}")]
    InvalidModel(String),
    #[error("the training data cannot be used: {0}")]
    InvalidData(String),
    #[error("the training data is unavailable: {0}")]
    DataUnavailable(ArtifactError),
    #[error("compute failed: {0}")]
    Compute(#[from] ComputeError),
    #[error("writing a checkpoint failed: {0}")]
    Checkpoint(#[from] CheckpointError),
}

impl TrainingError {
    /// A stable CamelCase reason for the node report and the job's status.
    pub fn reason(&self) -> &'static str {
        match self {
            TrainingError::InvalidModel(_) => "InvalidModel",
            TrainingError::InvalidData(_) => "InvalidData",
            TrainingError::DataUnavailable(_) => "DataUnavailable",
            TrainingError::Compute(_) => "ComputeFailed",
            TrainingError::Checkpoint(_) => "CheckpointFailed",
        }
    }

    /// Whether restarting cannot help: the spec, its kernels or its data do not fit together.
    pub fn permanent(&self) -> bool {
        matches!(
            self,
            TrainingError::InvalidModel(_) | TrainingError::InvalidData(_)
        )
    }
}

/// What the worker's run is asked to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Stop {
    /// Keep training.
    No = 0,
    /// Stop at the next step boundary after writing a checkpoint (suspension).
    AtCheckpoint = 1,
    /// Stop at the next step boundary (the assignment went elsewhere or the job is gone).
    Now = 2,
}

/// A [`Stop`] request shared with a running worker.
#[derive(Debug, Default)]
pub struct StopFlag(AtomicU8);

impl StopFlag {
    pub fn set(&self, stop: Stop) {
        self.0.store(stop as u8, Ordering::Relaxed);
    }

    pub fn get(&self) -> Stop {
        match self.0.load(Ordering::Relaxed) {
            0 => Stop::No,
            1 => Stop::AtCheckpoint,
            _ => Stop::Now,
        }
    }
}

/// A worker's progress, shared between its run, the node report and the metrics.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub state: WorkerState,
    pub step: u64,
    pub first_loss: Option<f32>,
    pub last_loss: Option<f32>,
    pub checkpoint_step: Option<u64>,
    pub resumed_from_step: Option<u64>,
    pub final_weights_sha256: Option<String>,
    /// Why the worker waits or failed: reason, message, and whether it is permanent.
    pub reason: Option<&'static str>,
    pub message: Option<String>,
    pub permanent: bool,
    /// The current (or last) run's pipeline: its mode, steps, stage times, start and end.
    pub mode: PipelineMode,
    pub run_steps: u64,
    pub stage_seconds: [f64; 4],
    pub started: Option<Instant>,
    pub ended: Option<Instant>,
    /// Busy over wall time of each stream of the current run.
    pub utilization: Vec<f64>,
    /// Totals over every run of this worker on this agent, for the metrics' counters.
    pub steps_total: u64,
    pub samples_total: u64,
    pub stage_seconds_total: [f64; 4],
    pub fallbacks_total: u64,
}

impl Progress {
    /// The current (or last) run's pipeline figures, once one has started.
    pub fn figures(&self) -> Option<PipelineFigures> {
        let started = self.started?;
        let wall = self.ended.unwrap_or_else(Instant::now) - started;
        let r = PipelineReport::new(
            self.mode,
            self.run_steps as usize,
            self.stage_seconds,
            wall.as_secs_f64(),
        );
        Some(PipelineFigures {
            steps: self.run_steps,
            wall_seconds: r.wall_seconds,
            stage_seconds: r.stage_seconds,
            theoretical_speedup: r.theoretical_speedup,
            measured_speedup: r.measured_speedup,
            overlap_efficiency: r.overlap_efficiency(),
        })
    }

    fn fail(&mut self, e: &TrainingError) {
        self.state = WorkerState::Failed;
        self.reason = Some(e.reason());
        self.message = Some(e.to_string());
        self.permanent = e.permanent();
    }
}

/// The worker to run.
#[derive(Clone, Debug)]
pub struct Assignment {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub index: u32,
    pub spec: AsyncTrainingJobSpec,
}

/// How a run ended, when it did not fail.
enum Outcome {
    Finished(String),
    Suspended,
    Stopped,
}

/// Runs one worker until it finishes, fails or is stopped, recording where it stands in
/// `progress`. A run replacing an earlier one of the same worker waits for it first, so that
/// two never write its checkpoint at once.
pub async fn run(
    a: Assignment,
    env: Arc<Env>,
    progress: Arc<Mutex<Progress>>,
    stop: Arc<StopFlag>,
    previous: Option<tokio::task::JoinHandle<()>>,
) {
    if let Some(previous) = previous {
        let _ = previous.await;
    }
    {
        let mut p = progress.lock().expect("progress lock");
        p.state = WorkerState::Starting;
        (p.reason, p.message, p.permanent) = (None, None, false);
        (p.started, p.ended) = (None, None);
        p.mode = a.spec.pipeline.mode;
    }
    let result = train(&a, &env, &progress, &stop).await;
    let mut p = progress.lock().expect("progress lock");
    if p.started.is_some() {
        p.ended = Some(Instant::now());
    }
    match result {
        Ok(Outcome::Finished(digest)) => {
            tracing::info!(job = a.name, worker = a.index, digest, "worker finished");
            p.state = WorkerState::Succeeded;
            p.final_weights_sha256 = Some(digest);
        }
        Ok(Outcome::Suspended) => p.state = WorkerState::Suspended,
        Ok(Outcome::Stopped) => {}
        Err(e) => {
            tracing::warn!(job = a.name, worker = a.index, reason = e.reason(), error = %e, "worker failed");
            p.fail(&e);
        }
    }
}

async fn train(
    a: &Assignment,
    env: &Arc<Env>,
    progress: &Arc<Mutex<Progress>>,
    stop: &Arc<StopFlag>,
) -> Result<Outcome, TrainingError> {
    let Some(layers) = resolve_layers(a, env, progress, stop).await? else {
        return Ok(stopped(stop.get()));
    };
    let specs: Vec<Conv2dSpec> = layers.iter().map(|(spec, _)| spec.clone()).collect();
    let spec = &a.spec;
    let (dataset, shape) = match (&spec.data.synthetic, &spec.data.artifact) {
        (Some(s), _) => (None, s.shape),
        (None, Some(artifact)) => {
            let set = data::fetch(env.store.remote(), artifact, &Limits::default())
                .await
                .map_err(|e| match e.retryable() {
                    true => TrainingError::DataUnavailable(e),
                    false => TrainingError::InvalidData(e.to_string()),
                })?;
            let shape = set.shape;
            (Some(set), shape)
        }
        (None, None) => return Err(TrainingError::InvalidData("no data source".into())),
    };
    // Admission could not see the shapes of frozen layers or of an artifact's data: the
    // step's sizes are checked here, before anything is allocated for them.
    validate::model(&specs, shape, spec.training.batch_size)
        .map_err(|e| TrainingError::InvalidModel(validate::describe(&e)))?;
    let mut model = Model::new(&specs, shape, spec.training.seed)
        .map_err(|e| TrainingError::InvalidModel(e.to_string()))?;
    for (i, (_, kernel)) in layers.iter().enumerate() {
        if let Some(k) = kernel {
            model
                .freeze(i, &k.weight, k.bias.as_deref().map(Vec::as_slice))
                .map_err(|e| TrainingError::InvalidModel(e.to_string()))?;
        }
    }
    let data = match (dataset, &spec.data.synthetic) {
        (Some(set), _) => set.into_data(&model).map_err(TrainingError::InvalidData)?,
        (None, Some(s)) => {
            Data::synthetic(s, &specs).map_err(|e| TrainingError::InvalidModel(e.to_string()))?
        }
        (None, None) => unreachable!("checked above"),
    };
    let job = Steps {
        fingerprint: fingerprint(spec, &layers),
        a: a.clone(),
        env: env.clone(),
        progress: progress.clone(),
        stop: stop.clone(),
        data,
    };
    let handle = Handle::current();
    let (device, streams) = (env.router.device().clone(), spec.pipeline.streams as usize);
    tokio::task::spawn_blocking(move || {
        // Off the runtime: a checkpoint is read from disk, and CUDA streams start with
        // handles that take a while to create.
        let (start, first_loss) = job.resume(&mut model)?;
        if start >= job.a.spec.training.steps {
            return Ok(Outcome::Finished(weights_digest(&model)));
        }
        let backend = device.backend(streams, OP_THREADS);
        job.run(&handle, backend, model, start, first_loss)
    })
    .await
    .map_err(|e| ComputeError::Stopped(e.to_string()))?
}

fn stopped(stop: Stop) -> Outcome {
    match stop {
        Stop::AtCheckpoint => Outcome::Suspended,
        _ => Outcome::Stopped,
    }
}

/// Each layer's conv2d and, for KernelDeployment layers, the warm kernel. Waits while a
/// kernel warms; `None` when stopped meanwhile.
async fn resolve_layers(
    a: &Assignment,
    env: &Env,
    progress: &Mutex<Progress>,
    stop: &StopFlag,
) -> Result<Option<Vec<(Conv2dSpec, Option<Arc<Kernel>>)>>, TrainingError> {
    loop {
        let mut layers = Vec::new();
        let mut waiting = None;
        for layer in &a.spec.model.layers {
            match (&layer.kernel_deployment_ref, &layer.conv2d) {
                (Some(kd), _) => match env.warmer.kernel(&a.namespace, kd) {
                    Some(k) => layers.push((k.conv2d.clone(), Some(k))),
                    None => {
                        let state = env
                            .warmer
                            .report()
                            .into_iter()
                            .find(|k| k.namespace == a.namespace && k.name == *kd)
                            .map_or_else(
                                || "not warming on this node: the KernelDeployment is missing, does not select it, or has an op no node could hold (its Accepted condition says why)".to_string(),
                                |k| match k.reason {
                                    Some(r) => format!("{} ({r})", k.state),
                                    None => k.state,
                                },
                            );
                        waiting = Some(format!(
                            "waiting for layer {}'s kernel from KernelDeployment {kd}: {state}",
                            layer.name
                        ));
                        break;
                    }
                },
                (None, Some(conv)) => layers.push((conv.clone(), None)),
                // The webhook refuses it; a job that got past it fails instead.
                (None, None) => {
                    return Err(TrainingError::InvalidModel(format!(
                        "layer {} sets neither conv2d nor kernelDeploymentRef",
                        layer.name
                    )));
                }
            }
        }
        let Some(message) = waiting else {
            progress.lock().expect("progress lock").message = None;
            return Ok(Some(layers));
        };
        progress.lock().expect("progress lock").message = Some(message);
        for _ in 0..10 {
            if stop.get() != Stop::No {
                return Ok(None);
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

/// Digest of everything that the weights after a given step depend on: the spec, and the
/// frozen layers' kernels (a KernelDeployment may change its artifact). The step count is
/// left out (the weights at step k do not depend on how many follow), and so is the pipeline
/// mode (compute runs the steps in order in every mode); the stream count is in
/// (micro-batches sum in another order), and so are the replicas (they shard the data).
/// Without frozen layers it is the digest agents before the kernels were in wrote, so that
/// their checkpoints still resume.
fn fingerprint(
    spec: &AsyncTrainingJobSpec,
    layers: &[(Conv2dSpec, Option<Arc<Kernel>>)],
) -> String {
    let t = &spec.training;
    let settings = (t.batch_size, t.learning_rate, t.momentum, t.seed);
    let (streams, replicas) = (spec.pipeline.streams, spec.placement.replicas);
    let kernels: Vec<Option<&str>> = layers
        .iter()
        .map(|(_, k)| k.as_ref().map(|k| k.sha256.as_str()))
        .collect();
    let json = if kernels.iter().all(Option::is_none) {
        serde_json::to_vec(&(&spec.model, &spec.data, settings, streams, replicas))
    } else {
        let relevant = (
            &spec.model,
            kernels,
            &spec.data,
            settings,
            streams,
            replicas,
        );
        serde_json::to_vec(&relevant)
    };
    hex::encode(Sha256::digest(json.expect("a spec serialises")))
}

/// The blocking part of a run: the steps through the pipeline.
struct Steps {
    /// What a checkpoint must have been written for: see [`fingerprint`].
    fingerprint: String,
    a: Assignment,
    env: Arc<Env>,
    progress: Arc<Mutex<Progress>>,
    stop: Arc<StopFlag>,
    data: Data,
}

/// One step on its way through the pipeline.
struct Item<B: Backend> {
    step: u64,
    batch: Option<(Vec<f32>, Vec<f32>)>,
    staged: Option<Staged<B>>,
    loss: Option<f32>,
    checkpoint: Option<(Meta, Model)>,
}

impl Steps {
    /// [`Self::restore`], recording in the progress where the run starts.
    fn resume(&self, model: &mut Model) -> Result<(u64, Option<f32>), TrainingError> {
        let (start, first_loss) = self.restore(model)?;
        let mut p = self.progress.lock().expect("progress lock");
        let resumed = (start > 0).then_some(start);
        (p.step, p.first_loss) = (start, first_loss);
        (p.checkpoint_step, p.resumed_from_step) = (resumed, resumed);
        Ok((start, first_loss))
    }

    /// Restores the last checkpoint into `model` when there is a usable one; returns the step
    /// to start from and the run's first loss. A damaged or foreign checkpoint is refused
    /// (counted, and said in the worker's message): training restarts from the seed rather
    /// than from a bad state. One that cannot be read now fails the run, to be retried: the
    /// run's first checkpoint would replace it. Reads a file.
    fn restore(&self, model: &mut Model) -> Result<(u64, Option<f32>), TrainingError> {
        let (a, env) = (&self.a, &self.env);
        let fresh = model.clone();
        let refused = |why: &str, detail: String| {
            tracing::warn!(
                job = a.name,
                worker = a.index,
                why,
                detail,
                "not resuming from the checkpoint"
            );
            env.metrics
                .checkpoint_refusals
                .with_label_values(&[why])
                .inc();
            self.progress.lock().expect("progress lock").message = Some(format!(
                "started from step 0: the checkpoint was refused ({why}: {detail})"
            ));
            Ok((0, None))
        };
        let loaded = match env
            .checkpoints
            .load(&a.uid, a.index, Checkpoints::room(model))
        {
            Ok(Some(l)) => l,
            Ok(None) => return Ok((0, None)),
            Err(e @ CheckpointError::Io(_)) => return Err(e.into()),
            Err(e) => return refused(e.reason(), e.to_string()),
        };
        if loaded.meta.fingerprint != self.fingerprint {
            let why = "written for another spec or other frozen kernels".to_string();
            return refused("SpecChanged", why);
        }
        let mut tensors = loaded.tensors;
        if let Err(e) = model.load_state_dict(|k| tensors.remove(k)) {
            *model = fresh;
            return refused("Corrupt", e.to_string());
        }
        let step = loaded.meta.step;
        tracing::info!(
            job = a.name,
            worker = a.index,
            step,
            "resuming from the checkpoint"
        );
        Ok((step, loaded.meta.first_loss))
    }

    /// Runs steps `start..` on this (blocking) thread, entering the runtime of `handle` for
    /// the async compute.
    fn run<B: Backend>(
        self,
        handle: &Handle,
        backend: B,
        mut model: Model,
        start: u64,
        mut first_loss: Option<f32>,
    ) -> Result<Outcome, TrainingError> {
        let spec = &self.a.spec;
        let t = &spec.training;
        let (steps, batch) = (t.steps, t.batch_size as usize);
        let (lr, momentum) = (t.learning_rate as f32, t.momentum as f32);
        let every = spec.checkpoint.every_steps.max(1);
        let micro = spec.pipeline.streams as usize;
        let fallback = InlineBackend::new(OP_THREADS);
        let deployments = spec
            .model
            .layers
            .iter()
            .map(|l| l.kernel_deployment_ref.clone())
            .collect();
        let layers = RolloutLayers::new(self.env.router.clone(), &self.a.namespace, deployments);
        let kernels: &dyn KernelLayerRunner = &layers;
        let sizes = model.sample_sizes();
        let fingerprint = self.fingerprint.clone();
        let checkpoint_error: Mutex<Option<CheckpointError>> = Mutex::default();
        let mut done = start;
        {
            let mut p = self.progress.lock().expect("progress lock");
            p.state = WorkerState::Running;
            (p.started, p.ended) = (Some(Instant::now()), None);
            (p.run_steps, p.stage_seconds) = (0, [0.0; 4]);
        }

        let stop = &self.stop;
        let source = (start..steps)
            .take_while(|_| stop.get() == Stop::No)
            .map(|step| Item {
                step,
                batch: None,
                staged: None,
                loss: None,
                checkpoint: None,
            });
        let load: Stage<'_, Item<B>> = Box::new(|mut item| {
            item.batch =
                Some(
                    self.data
                        .batch(item.step, self.a.index, spec.placement.replicas, batch)?,
                );
            Ok(item)
        });
        let upload_stage: Stage<'_, Item<B>> = Box::new(|mut item| {
            if let Some((x, t)) = &item.batch {
                item.staged = Some(upload(&backend, sizes, x, t, batch, micro)?);
            }
            Ok(item)
        });
        let compute: Stage<'_, Item<B>> = Box::new(|mut item| {
            let (Some(staged), Some((x, t))) = (item.staged.take(), item.batch.take()) else {
                return Ok(item);
            };
            if stop.get() != Stop::No {
                return Ok(item); // Stops at this step boundary.
            }
            let result = match handle.block_on(staged_gradients(&backend, &model, staged, kernels))
            {
                Err(e) if e.may_fall_back() => {
                    // The synchronous path runs the same ops with the same arithmetic.
                    tracing::debug!(error = %e, step = item.step, "async step failed; re-running it synchronously");
                    self.progress.lock().expect("progress lock").fallbacks_total += 1;
                    let again = upload(&fallback, sizes, &x, &t, batch, micro)?;
                    handle.block_on(staged_gradients(&fallback, &model, again, kernels))?
                }
                r => r?,
            };
            model.apply(&result.grads, lr, momentum);
            done = item.step + 1;
            first_loss.get_or_insert(result.loss);
            item.loss = Some(result.loss);
            if done.is_multiple_of(every) || done == steps {
                item.checkpoint = Some((
                    Meta {
                        step: done,
                        first_loss,
                        fingerprint: fingerprint.clone(),
                    },
                    model.clone(),
                ));
            }
            Ok(item)
        });
        let download: Stage<'_, Item<B>> = Box::new(|item| {
            if let Some(loss) = item.loss {
                let mut p = self.progress.lock().expect("progress lock");
                p.step = item.step + 1;
                p.last_loss = Some(loss);
                p.first_loss.get_or_insert(loss);
                p.steps_total += 1;
                p.run_steps += 1;
                p.samples_total += batch as u64;
                p.utilization = backend.utilization();
            }
            if let Some((meta, snapshot)) = &item.checkpoint {
                self.save(meta, snapshot).map_err(|e| {
                    let message = e.to_string();
                    *checkpoint_error.lock().expect("error lock") = Some(e);
                    ComputeError::Stopped(message)
                })?;
            }
            Ok(item)
        });
        let stages = [load, upload_stage, compute, download]
            .into_iter()
            .enumerate()
            .map(|(i, stage)| self.timed(i, stage))
            .collect::<Vec<_>>()
            .try_into()
            .unwrap_or_else(|_| unreachable!("four stages"));
        let result = pipeline::run(
            spec.pipeline.mode,
            spec.pipeline.prefetch_depth as usize,
            source,
            stages,
            drop,
        );
        if let Some(e) = checkpoint_error.into_inner().expect("error lock") {
            return Err(e.into());
        }
        result?;
        if done == steps {
            return Ok(Outcome::Finished(weights_digest(&model)));
        }
        let stop = self.stop.get();
        if stop == Stop::AtCheckpoint && done > start && !done.is_multiple_of(every) {
            let meta = Meta {
                step: done,
                first_loss,
                fingerprint,
            };
            self.save(&meta, &model)?;
        }
        Ok(stopped(stop))
    }

    /// Writes a checkpoint and records it.
    fn save(&self, meta: &Meta, model: &Model) -> Result<(), CheckpointError> {
        let result = self
            .env
            .checkpoints
            .save(&self.a.uid, self.a.index, meta, model);
        match &result {
            Ok(()) => {
                self.env.metrics.checkpoints.inc();
                self.progress.lock().expect("progress lock").checkpoint_step = Some(meta.step);
            }
            Err(e) => self
                .env
                .metrics
                .checkpoint_failures
                .with_label_values(&[e.reason()])
                .inc(),
        }
        result
    }

    /// `stage`, adding its time to the progress.
    fn timed<'a, T: 'a>(&'a self, index: usize, mut stage: Stage<'a, T>) -> Stage<'a, T> {
        Box::new(move |item| {
            let t = Instant::now();
            let out = stage(item);
            let seconds = t.elapsed().as_secs_f64();
            let mut p = self.progress.lock().expect("progress lock");
            p.stage_seconds[index] += seconds;
            p.stage_seconds_total[index] += seconds;
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use super::*;
    use crate::artifact::format::{pack, sha256_hex};
    use crate::artifact::store::KernelStore;
    use crate::compute::cpu::CpuBackend;
    use crate::compute::ops::uniform;
    use crate::training::checkpoint::Checkpoints;
    use crate::training::metrics::Counters;
    use crate::warm::Warmer;

    /// A small job: 3x8x8 inputs, 3 -> 4 -> 3 channels.
    fn spec(patch: serde_json::Value) -> AsyncTrainingJobSpec {
        let mut base = serde_json::json!({
            "model": {"layers": [
                {"name": "a", "conv2d": {"inChannels": 3, "outChannels": 4, "kernelSize": [3, 3], "padding": [1, 1]}},
                {"name": "b", "conv2d": {"inChannels": 4, "outChannels": 3, "kernelSize": [3, 3], "padding": [1, 1]}}]},
            "data": {"synthetic": {"shape": [3, 8, 8], "samples": 64, "seed": 7}},
            "training": {"batchSize": 4, "steps": 30, "learningRate": 0.05, "momentum": 0.9, "seed": 1},
            "pipeline": {"mode": "triple", "prefetchDepth": 2, "streams": 2},
            "placement": {"nodeSelector": {}},
            "checkpoint": {"everySteps": 5}
        });
        kernelflow_crds::apply_merge_patch(&mut base, patch);
        serde_json::from_value(base).unwrap()
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kf-worker-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn env(checkpoints: Option<PathBuf>) -> Arc<Env> {
        let store = KernelStore::for_tests();
        Arc::new(Env {
            warmer: Warmer::new(store.clone()),
            router: crate::rollout::tests::router(),
            store,
            checkpoints: Checkpoints::new(checkpoints),
            metrics: Counters::default(),
        })
    }

    fn assignment(uid: &str, spec: AsyncTrainingJobSpec) -> Assignment {
        Assignment {
            namespace: "ns".into(),
            name: "job".into(),
            uid: uid.into(),
            index: 0,
            spec,
        }
    }

    async fn run_to_end(a: Assignment, env: &Arc<Env>) -> Progress {
        let progress = Arc::new(Mutex::new(Progress::default()));
        run(a, env.clone(), progress.clone(), Arc::default(), None).await;
        progress.lock().unwrap().clone()
    }

    fn digest(p: &Progress) -> String {
        assert_eq!(p.state, WorkerState::Succeeded, "{p:?}");
        p.final_weights_sha256.clone().unwrap()
    }

    /// A checkpoint there but unreadable now is not dropped (the run's first checkpoint
    /// would replace it): the run fails, to be retried.
    #[tokio::test]
    async fn a_checkpoint_that_cannot_be_read_fails_the_run_to_be_retried() {
        let root = dir("unreadable");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("u-io"), b"a file where the job's directory goes").unwrap();
        let p = run_to_end(
            assignment("u-io", spec(serde_json::json!({}))),
            &env(Some(root)),
        )
        .await;
        assert_eq!(
            (p.state, p.reason, p.permanent),
            (WorkerState::Failed, Some("CheckpointFailed"), false),
            "{p:?}"
        );
        assert_eq!(p.run_steps, 0, "steps ran past a checkpoint left unread");
    }

    /// Checkpoints written by earlier agents resume: without frozen layers the fingerprint
    /// is the digest of the spec alone, as it always was.
    #[test]
    fn the_fingerprint_of_a_job_without_frozen_layers_does_not_change() {
        let s = spec(serde_json::json!({}));
        let layers: Vec<_> = s
            .model
            .layers
            .iter()
            .map(|l| (l.conv2d.clone().unwrap(), None))
            .collect();
        assert_eq!(
            fingerprint(&s, &layers),
            "ff9d0b3bb70d4203d8cf3b33e5c28322f35d3c8bab0a95bc25883be80c356e62"
        );
    }

    #[tokio::test]
    async fn a_layer_without_a_source_fails_the_worker_for_good() {
        let mut s = spec(serde_json::json!({}));
        s.model.layers[1].conv2d = None;
        let p = run_to_end(assignment("u-nosource", s), &env(None)).await;
        assert_eq!(
            (p.state, p.reason, p.permanent),
            (WorkerState::Failed, Some("InvalidModel"), true)
        );
        assert!(p.message.unwrap().contains("layer b sets neither"));
    }

    #[tokio::test]
    async fn a_worker_trains_to_its_last_step_and_lowers_the_loss() {
        let env = env(Some(dir("end")));
        let p = run_to_end(assignment("u-end", spec(serde_json::json!({}))), &env).await;
        assert_eq!(
            (p.step, p.checkpoint_step, p.resumed_from_step),
            (30, Some(30), None)
        );
        let (first, last) = (p.first_loss.unwrap(), p.last_loss.unwrap());
        assert!(last < 0.7 * first, "loss {first} -> {last}");
        assert_eq!(p.steps_total, 30);
        let figures = p.figures().unwrap();
        assert_eq!(figures.steps, 30);
        assert!(figures.wall_seconds > 0.0 && figures.measured_speedup > 0.0);
        assert_eq!(p.samples_total, 120);
        assert_eq!(p.utilization.len(), 2);
        assert!(p.stage_seconds_total.iter().all(|s| *s > 0.0), "{p:?}");
        assert_eq!(env.metrics.checkpoints.get(), 6);
        let saved = env
            .checkpoints
            .load("u-end", 0, usize::MAX)
            .unwrap()
            .unwrap();
        assert_eq!(saved.meta.step, 30);
        // A finished worker started again reports the same result without training.
        let again = run_to_end(assignment("u-end", spec(serde_json::json!({}))), &env).await;
        assert_eq!((digest(&again), again.steps_total), (digest(&p), 0));
    }

    /// Compute runs the steps in order in every mode, and a checkpoint holds the optimiser
    /// state: the final weights are the same bits however the run got there.
    #[tokio::test]
    async fn pipeline_modes_and_resuming_give_the_same_weights() {
        let env = env(Some(dir("modes")));
        let reference =
            digest(&run_to_end(assignment("u-ref", spec(serde_json::json!({}))), &env).await);
        for mode in ["sequential", "double"] {
            let s = spec(serde_json::json!({"pipeline": {"mode": mode}}));
            let got = digest(&run_to_end(assignment(&format!("u-{mode}"), s), &env).await);
            assert_eq!(got, reference, "{mode}");
        }
        // Twelve steps (the checkpoint of the last one), then the rest from it.
        let short = spec(serde_json::json!({"training": {"steps": 12}}));
        assert_eq!(
            run_to_end(assignment("u-resume", short), &env)
                .await
                .checkpoint_step,
            Some(12)
        );
        let resumed = run_to_end(assignment("u-resume", spec(serde_json::json!({}))), &env).await;
        assert_eq!(resumed.resumed_from_step, Some(12));
        assert_eq!(resumed.steps_total, 18);
        assert_eq!(digest(&resumed), reference);
        // A checkpoint of another spec is not resumed from.
        let other = spec(serde_json::json!({"training": {"learningRate": 0.01}}));
        let fresh = run_to_end(assignment("u-resume", other), &env).await;
        assert_eq!((fresh.resumed_from_step, fresh.steps_total), (None, 30));
        assert_eq!(
            env.metrics
                .checkpoint_refusals
                .with_label_values(&["SpecChanged"])
                .get(),
            1
        );
    }

    #[tokio::test]
    async fn a_suspended_worker_checkpoints_where_it_stops_and_resumes_there() {
        let env = env(Some(dir("suspend")));
        let long = || {
            spec(
                serde_json::json!({"training": {"steps": 400}, "checkpoint": {"everySteps": 1000}}),
            )
        };
        let progress = Arc::new(Mutex::new(Progress::default()));
        let stop = Arc::new(StopFlag::default());
        let watcher = {
            let (progress, stop) = (progress.clone(), stop.clone());
            std::thread::spawn(move || {
                while progress.lock().unwrap().step < 3 {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                stop.set(Stop::AtCheckpoint);
            })
        };
        run(
            assignment("u-s", long()),
            env.clone(),
            progress.clone(),
            stop,
            None,
        )
        .await;
        watcher.join().unwrap();
        let suspended = progress.lock().unwrap().clone();
        assert_eq!(suspended.state, WorkerState::Suspended, "{suspended:?}");
        let at = suspended.step;
        assert!((3..400).contains(&at), "stopped at {at}");
        assert_eq!(
            suspended.checkpoint_step,
            Some(at),
            "a checkpoint where it stopped"
        );
        let resumed = run_to_end(assignment("u-s", long()), &env).await;
        assert_eq!(resumed.resumed_from_step, Some(at));
        let reference = run_to_end(assignment("u-s-ref", long()), &env).await;
        assert_eq!(digest(&resumed), digest(&reference));
    }

    #[tokio::test]
    async fn failed_async_steps_rerun_synchronously_with_the_same_result() {
        let env = env(None);
        let s = spec(serde_json::json!({}));
        let reference = digest(&run_to_end(assignment("u-clean", s.clone()), &env).await);
        let a = assignment("u-faulty", s.clone());
        let progress = Arc::new(Mutex::new(Progress::default()));
        let steps = Steps {
            // The run starts at 0 and reads no checkpoint.
            fingerprint: String::new(),
            data: Data::synthetic(
                s.data.synthetic.as_ref().unwrap(),
                &s.model
                    .layers
                    .iter()
                    .map(|l| l.conv2d.clone().unwrap())
                    .collect::<Vec<_>>(),
            )
            .unwrap(),
            a,
            env: env.clone(),
            progress: progress.clone(),
            stop: Arc::default(),
        };
        let specs: Vec<Conv2dSpec> = s
            .model
            .layers
            .iter()
            .map(|l| l.conv2d.clone().unwrap())
            .collect();
        let model = Model::new(&specs, [3, 8, 8], 1).unwrap();
        let backend = CpuBackend::new(2, OP_THREADS);
        backend.faults.fail_every(40);
        let handle = Handle::current();
        let outcome =
            tokio::task::spawn_blocking(move || steps.run(&handle, backend, model, 0, None))
                .await
                .unwrap()
                .unwrap();
        let Outcome::Finished(got) = outcome else {
            panic!("the run did not finish")
        };
        assert!(progress.lock().unwrap().fallbacks_total > 0);
        assert_eq!(got, reference);
    }

    /// Packs a 1x1 conv2d of `channels` in and 4 out into a file; returns a KernelDeployment
    /// serving it to nodes labelled pool=a.
    fn kernel_deployment(
        name: &str,
        channels: u32,
        seed: u64,
    ) -> (Arc<kernelflow_crds::KernelDeployment>, Vec<f32>) {
        let conv = Conv2dSpec::new(channels, 4, [1, 1]);
        let weight = uniform(4 * channels as usize, seed, 0.5);
        let bytes = pack(&conv, &weight, Some(&[0.1; 4]), None).unwrap();
        let path = dir(name).with_extension("safetensors");
        std::fs::write(&path, &bytes).unwrap();
        let kd = serde_json::json!({
            "apiVersion": "kernelflow.dev/v1alpha1", "kind": "KernelDeployment",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"kernel": {"artifact": {"url": format!("file://{}", path.display()), "sha256": sha256_hex(&bytes)},
                                "conv2d": {"inChannels": channels, "outChannels": 4, "kernelSize": [1, 1]}},
                     "nodeSelector": {"matchLabels": {"pool": "a"}}}
        });
        (Arc::new(serde_json::from_value(kd).unwrap()), weight)
    }

    fn kd_job(kd: &str) -> AsyncTrainingJobSpec {
        spec(serde_json::json!({"model": {"layers": [
            {"name": "a", "conv2d": {"inChannels": 3, "outChannels": 4, "kernelSize": [3, 3], "padding": [1, 1]}},
            {"name": "k", "kernelDeploymentRef": kd},
            {"name": "b", "conv2d": {"inChannels": 4, "outChannels": 3, "kernelSize": [1, 1]}}]}}))
    }

    #[tokio::test]
    async fn kernel_deployment_layers_are_frozen_with_the_warm_kernel() {
        let env = env(Some(dir("kd")));
        let (good, weight) = kernel_deployment("good", 4, 11);
        let (wide, _) = kernel_deployment("wide", 5, 11);
        let labels: BTreeMap<String, String> = [("pool".to_string(), "a".to_string())].into();
        env.warmer.sync(&[good, wide.clone()], &labels);

        let p = run_to_end(assignment("u-kd", kd_job("good")), &env).await;
        digest(&p);
        assert!(p.last_loss.unwrap() < p.first_loss.unwrap(), "{p:?}");
        let saved = env
            .checkpoints
            .load("u-kd", 0, usize::MAX)
            .unwrap()
            .unwrap();
        assert_eq!(
            saved.tensors["layers.1.weight"], weight,
            "the kernel's weights, untouched"
        );
        assert_eq!(saved.tensors["layers.1.bias"], [0.1; 4]);

        // The KernelDeployment moves to other weights: the finished run's checkpoint was
        // trained against the old ones, and a run again starts over.
        let (moved, _) = kernel_deployment("good", 4, 12);
        env.warmer.sync(&[moved, wide], &labels);
        let again = run_to_end(assignment("u-kd", kd_job("good")), &env).await;
        assert_ne!(digest(&again), digest(&p));
        assert_eq!(again.resumed_from_step, None);
        let message = again.message.unwrap_or_default();
        assert!(message.contains("refused (SpecChanged"), "{message}");

        let p = run_to_end(assignment("u-wide", kd_job("wide")), &env).await;
        assert_eq!(
            (p.state, p.reason, p.permanent),
            (WorkerState::Failed, Some("InvalidModel"), true)
        );
        let message = p.message.unwrap();
        assert!(
            message.contains("spec.model.layers[1].conv2d.inChannels: is 5 but 4 channels come"),
            "{message}"
        );
        // What admission could not bound, behind the frozen layer, the agent refuses before
        // allocating: 3 x 8200 x 8200 outputs of a 1x1 layer padded by 4096.
        let mut padded = kd_job("good");
        padded.model.layers[2].conv2d.as_mut().unwrap().padding = [4096, 4096];
        assert_eq!(validate::training_job(&padded), Ok(()));
        let p = run_to_end(assignment("u-padded", padded), &env).await;
        assert_eq!(
            (p.state, p.reason, p.permanent),
            (WorkerState::Failed, Some("InvalidModel"), true)
        );
        let message = p.message.unwrap();
        assert!(message.contains("one sample's output"), "{message}");

        let missing = Arc::new(StopFlag::default());
        let progress = Arc::new(Mutex::new(Progress::default()));
        let waiting = tokio::spawn(run(
            assignment("u-none", kd_job("none")),
            env.clone(),
            progress.clone(),
            missing.clone(),
            None,
        ));
        while progress.lock().unwrap().message.is_none() {
            tokio::task::yield_now().await;
        }
        let message = progress.lock().unwrap().message.clone().unwrap();
        assert!(
            message.contains("KernelDeployment none: not warming on this node"),
            "{message}"
        );
        missing.set(Stop::Now);
        waiting.await.unwrap();
        assert_eq!(progress.lock().unwrap().state, WorkerState::Starting);
    }
}
