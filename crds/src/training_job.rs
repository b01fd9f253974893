//! `AsyncTrainingJob`: an async conv2d training workload run by the node agents.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{ArtifactRef, Conv2dSpec};

/// Trains a stack of conv2d layers on the GPU nodes, pipelining upload, compute and download
/// on stream pools, with checkpoints and a run policy.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kernelflow.dev",
    doc = "An AsyncTrainingJob trains conv2d layers on GPU nodes with pipelining, checkpoints and a run policy.",
    version = "v1alpha1",
    kind = "AsyncTrainingJob",
    namespaced,
    status = "AsyncTrainingJobStatus",
    shortname = "atj",
    category = "kernelflow",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Progress","type":"string","jsonPath":".status.progress"}"#,
    printcolumn = r#"{"name":"Loss","type":"number","jsonPath":".status.lastLoss"}"#,
    printcolumn = r#"{"name":"Restarts","type":"integer","jsonPath":".status.restarts"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AsyncTrainingJobSpec {
    /// The model: conv2d layers applied in order, each followed by ReLU except the last.
    pub model: ModelSpec,
    /// Training data.
    pub data: DataSpec,
    /// Optimisation settings.
    pub training: TrainingSpec,
    /// How batches move through upload, compute and download.
    #[serde(default)]
    pub pipeline: PipelineSpec,
    /// Where the workers run.
    pub placement: PlacementSpec,
    /// Restarts, deadline, suspension and clean-up.
    #[serde(default)]
    pub run_policy: RunPolicy,
    /// Checkpointing.
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
}

/// The model's layers.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// Layers in order.
    #[schemars(length(min = 1, max = 64))]
    pub layers: Vec<LayerSpec>,
}

/// One conv2d layer: either a KernelDeployment's kernel, frozen (training leaves its weights
/// as they are; the KernelDeployment must select the workers' nodes), or an inline conv2d
/// initialised from the job's seed and trained.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LayerSpec {
    /// Layer name, unique within the model.
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"), length(max = 63))]
    pub name: String,
    /// Name of a KernelDeployment in the job's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_deployment_ref: Option<String>,
    /// An inline conv2d.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conv2d: Option<Conv2dSpec>,
}

/// Training data: synthetic, or an artifact. Exactly one. Worker `w` of `r` reads samples
/// `(step * r + w) * batchSize ..` of the data set, wrapping around, so that a batch is a
/// pure function of the data, the worker and the step.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataSpec {
    /// Deterministic random samples; targets are a random "teacher" model's outputs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synthetic: Option<SyntheticData>,
    /// A dataset artifact, pinned by sha256: safetensors with F32 `inputs` `[N, C, H, W]` and
    /// `targets` `[N, ...]` matching the model's output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<ArtifactRef>,
}

/// Deterministic random data.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SyntheticData {
    /// Shape of one sample: channels, height, width.
    #[schemars(inner(range(min = 1, max = 65536)))]
    pub shape: [u32; 3],
    /// Number of samples.
    #[schemars(range(min = 1, max = 10_000_000))]
    pub samples: u64,
    /// Seed of the generator.
    #[serde(default)]
    pub seed: u64,
}

/// Optimisation settings: SGD with momentum on an MSE loss.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainingSpec {
    /// Samples per step, per worker.
    #[schemars(range(min = 1, max = 65536))]
    pub batch_size: u32,
    /// Optimiser steps per worker.
    #[schemars(range(min = 1, max = 100_000_000))]
    pub steps: u64,
    /// SGD learning rate.
    #[schemars(range(min = 0.0, max = 10.0))]
    pub learning_rate: f64,
    /// SGD momentum, in [0, 1).
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub momentum: f64,
    /// Seed for weight initialisation of inline layers.
    #[serde(default)]
    pub seed: u64,
}

/// Pipelining modes: how many batches are in flight across upload, compute and download.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PipelineMode {
    /// One batch at a time.
    Sequential,
    /// Upload batch N while computing N-1.
    #[default]
    Double,
    /// Upload N, compute N-1 and download N-2 at once.
    Triple,
}

/// Pipeline settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PipelineSpec {
    /// Pipelining mode.
    #[serde(default)]
    pub mode: PipelineMode,
    /// Batches prepared ahead of compute.
    #[serde(default = "default_prefetch")]
    #[schemars(range(min = 1, max = 16), default = "default_prefetch")]
    pub prefetch_depth: u32,
    /// Streams per worker; each step's batch is split into this many micro-batches.
    #[serde(default = "default_streams")]
    #[schemars(range(min = 1, max = 64), default = "default_streams")]
    pub streams: u32,
}

fn default_prefetch() -> u32 {
    2
}
fn default_streams() -> u32 {
    2
}

impl Default for PipelineSpec {
    fn default() -> Self {
        Self {
            mode: PipelineMode::default(),
            prefetch_depth: default_prefetch(),
            streams: default_streams(),
        }
    }
}

/// Where the workers run.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlacementSpec {
    /// Nodes eligible for workers, by their Node labels.
    pub node_selector: LabelSelector,
    /// Workers, each on its own node.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1024), default = "one")]
    pub replicas: u32,
}

fn one() -> u32 {
    1
}

/// Restarts, deadline, suspension and clean-up, as in Kubernetes Jobs.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunPolicy {
    /// Worker restarts (across all workers) before the job fails.
    #[serde(default = "default_backoff_limit")]
    #[schemars(range(min = 0, max = 1000), default = "default_backoff_limit")]
    pub backoff_limit: u32,
    /// Seconds from the start (or from resuming after a suspension) after which the job
    /// fails with DeadlineExceeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<u64>,
    /// Stop the workers at a step boundary after a checkpoint; false resumes from it. The only
    /// part of the spec, with the rest of runPolicy, that may change after creation.
    #[serde(default)]
    pub suspend: bool,
    /// Seconds after the job succeeded or failed after which it is deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds_after_finished: Option<u64>,
}

fn default_backoff_limit() -> u32 {
    3
}

impl Default for RunPolicy {
    fn default() -> Self {
        Self {
            backoff_limit: default_backoff_limit(),
            active_deadline_seconds: None,
            suspend: false,
            ttl_seconds_after_finished: None,
        }
    }
}

/// Checkpoint settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointSpec {
    /// Write a checkpoint every this many steps; a restarted worker loses at most this many.
    #[serde(default = "default_every_steps")]
    #[schemars(range(min = 1), default = "default_every_steps")]
    pub every_steps: u64,
}

fn default_every_steps() -> u64 {
    100
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        Self {
            every_steps: default_every_steps(),
        }
    }
}

/// Where a training job stands.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum TrainingPhase {
    /// Accepted; workers not all placed and started yet.
    #[default]
    Created,
    /// Workers are training.
    Running,
    /// A worker is being restarted from the last checkpoint.
    Restarting,
    /// Stopped at a checkpoint by `runPolicy.suspend`.
    Suspended,
    /// All workers finished their steps.
    Succeeded,
    /// Backoff limit or deadline exceeded, or the job cannot run.
    Failed,
}

impl TrainingPhase {
    /// Every phase, for metrics that list them.
    pub const ALL: [TrainingPhase; 6] = [
        TrainingPhase::Created,
        TrainingPhase::Running,
        TrainingPhase::Restarting,
        TrainingPhase::Suspended,
        TrainingPhase::Succeeded,
        TrainingPhase::Failed,
    ];

    /// Succeeded or Failed: nothing runs any more and nothing will.
    pub fn is_finished(self) -> bool {
        matches!(self, TrainingPhase::Succeeded | TrainingPhase::Failed)
    }
}

/// Where one worker stands, as its agent reports it.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum WorkerState {
    /// Assigned, but its agent has not reported it yet (or it waits for a node).
    #[default]
    Pending,
    /// Loading kernels, data and the last checkpoint.
    Starting,
    /// Training.
    Running,
    /// Stopped at a checkpoint because the job is suspended.
    Suspended,
    /// Finished its steps; `finalWeightsSha256` is set.
    Succeeded,
    /// Stopped by an error; the operator restarts it (counted against `backoffLimit`).
    Failed,
}

/// Pipeline figures of one worker's current (or last) run.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PipelineFigures {
    /// Steps the run computed.
    pub steps: u64,
    /// Seconds the run took (so far).
    pub wall_seconds: f64,
    /// Seconds spent in each stage: load, upload, compute, download.
    pub stage_seconds: [f64; 4],
    /// Sum of stage times over the busiest lane's: the speedup perfect overlap would give.
    pub theoretical_speedup: f64,
    /// Sum of stage times over wall time: the speedup overlap gave.
    pub measured_speedup: f64,
    /// Measured over theoretical speedup (0..1).
    pub overlap_efficiency: f64,
}

/// Assignment and progress of one worker.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerStatus {
    /// Worker index, 0..replicas.
    pub index: u32,
    /// Node the worker is assigned to; absent while it waits for one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    /// Assignment number, raised on every restart. Agents report the attempt they run, so
    /// that a report from before a restart is never taken for the current one.
    #[serde(default)]
    pub attempt: u32,
    /// Where the worker stands.
    #[serde(default)]
    pub state: WorkerState,
    /// Optimiser steps completed.
    pub step: u64,
    /// Throughput over the last report interval.
    #[serde(default)]
    pub samples_per_second: f64,
    /// Loss of the first step, to compare the latest with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_loss: Option<f64>,
    /// Loss of the latest step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_loss: Option<f64>,
    /// Step of the latest checkpoint of the current run: the one it resumed from, or wrote
    /// since. A run started afresh (on a node without the checkpoint) has none until it
    /// writes one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_step: Option<u64>,
    /// Step of the checkpoint the current run resumed from; absent when it started afresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from_step: Option<u64>,
    /// SHA-256 of the final weights (every layer's weight then bias, f32 little-endian),
    /// once the worker succeeded: equal for runs with the same spec and seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_weights_sha256: Option<String>,
    /// Pipeline figures of the current run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<PipelineFigures>,
    /// Why the worker waits or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the operator found this attempt failed. Its restart waits 10 s, doubled for each
    /// restart the job has had, at most 6 min, as a Job's pods do: a passing outage must not
    /// use up `backoffLimit` in a minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_time: Option<Time>,
}

/// Observed state of an AsyncTrainingJob.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AsyncTrainingJobStatus {
    /// Where the job stands.
    #[serde(default)]
    pub phase: TrainingPhase,
    /// Steps completed over steps asked, as a percentage, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// When the job started running (or resumed after a suspension): `activeDeadlineSeconds`
    /// counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the job succeeded or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Per-worker assignment and progress, one entry per replica.
    #[serde(default)]
    pub workers: Vec<WorkerStatus>,
    /// Samples per second over all workers.
    #[serde(default)]
    pub throughput: f64,
    /// Mean over the workers of measured over theoretical pipeline speedup (0..1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlap_efficiency: Option<f64>,
    /// Mean loss of the workers' latest steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_loss: Option<f64>,
    /// Worker restarts so far, counted against `runPolicy.backoffLimit`.
    #[serde(default)]
    pub restarts: u32,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Conditions: Accepted, and Created, Running, Restarting, Succeeded, Failed, Suspended
    /// once each has applied.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}
