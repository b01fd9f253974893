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

/// One conv2d layer: either a KernelDeployment's kernel (it then follows that rollout's
/// traffic split and flags) or an inline conv2d initialised from the job's seed.
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

/// Training data: synthetic, or an artifact. Exactly one.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataSpec {
    /// Deterministic random samples and targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synthetic: Option<SyntheticData>,
    /// A dataset artifact (safetensors with `inputs` and `targets`), pinned by sha256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<ArtifactRef>,
}

/// Deterministic random data.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SyntheticData {
    /// Shape of one sample: channels, height, width.
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
    /// Streams per worker.
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
    /// Seconds from start after which the job fails with DeadlineExceeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<u64>,
    /// Stop the workers at a step boundary after a checkpoint; false resumes from it.
    #[serde(default)]
    pub suspend: bool,
    /// Seconds after finishing after which the job is deleted.
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
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum TrainingPhase {
    /// Accepted; workers not placed yet.
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

/// Progress of one worker.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerStatus {
    /// Worker index, 0..replicas.
    pub index: u32,
    /// Node the worker is assigned to.
    pub node: String,
    /// Optimiser steps completed.
    pub step: u64,
    /// Throughput over the last report interval.
    #[serde(default)]
    pub samples_per_second: f64,
    /// Loss of the latest step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_loss: Option<f64>,
    /// Step of the latest checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_step: Option<u64>,
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
    /// When the workers started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the job succeeded or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Per-worker progress.
    #[serde(default)]
    pub workers: Vec<WorkerStatus>,
    /// Samples per second over all workers.
    #[serde(default)]
    pub throughput: f64,
    /// Measured over theoretical pipeline speedup (0..1).
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
    /// Conditions: Created, Running, Restarting, Succeeded, Failed, Suspended.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}
