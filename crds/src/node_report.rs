//! `NodeReport`: one cluster-scoped object per node, written only by that node's agent, so
//! that agents never write into the shared KernelDeployments and the operator reads N small
//! objects instead of N writers contending for one.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::training_job::{PipelineFigures, WorkerState};

/// The field manager under which agents write their reports: the API server's time of the
/// manager's last change tells when a report was last written, on the server's clock.
pub const AGENT_FIELD_MANAGER: &str = "kernelflow-agent";

/// What one node's agent reports: its kernels and training workers.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kernelflow.dev",
    doc = "A NodeReport is one node agent's report of its kernels and training workers.",
    version = "v1alpha1",
    kind = "NodeReport",
    shortname = "nr",
    category = "kernelflow",
    printcolumn = r#"{"name":"Backend","type":"string","jsonPath":".spec.backend"}"#,
    printcolumn = r#"{"name":"Kernels","type":"integer","jsonPath":".spec.kernelCount"}"#,
    printcolumn = r#"{"name":"Heartbeat","type":"date","jsonPath":".spec.heartbeatTime"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NodeReportSpec {
    /// The node this report is about; equal to the object's name.
    pub node_name: String,
    /// Version of the reporting agent.
    pub agent_version: String,
    /// Compute backend in use: `cuda` or `cpu`.
    pub backend: String,
    /// When the agent last wrote this report, on its own clock. The operator judges whether
    /// an agent is gone by when the API server stored its last write, which no agent's clock
    /// can move.
    pub heartbeat_time: Time,
    /// Number of entries in `kernels`, for `kubectl get`.
    #[serde(default)]
    pub kernel_count: u32,
    /// Per-kernel state and figures of the current window.
    #[serde(default)]
    pub kernels: Vec<KernelReport>,
    /// The AsyncTrainingJob workers assigned to this node, with their progress.
    #[serde(default)]
    pub workers: Vec<WorkerReport>,
}

/// One KernelDeployment's revisions as seen on one node.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KernelReport {
    /// Namespace of the KernelDeployment.
    pub namespace: String,
    /// Name of the KernelDeployment.
    pub name: String,
    /// Artifact digest of the canary revision.
    pub canary_sha256: String,
    /// `Warming`, `Warm` or `Failed`; `Draining` for a deleted deployment whose operations
    /// are still finishing.
    pub state: String,
    /// Why the kernel failed, as a typed reason (for example `DigestMismatch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Details of the failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The KernelDeployment's `status.stepEpoch` the figures below belong to; absent until
    /// the node serves a split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// Percent of this node's conv2d operations sent to the canary.
    #[serde(default)]
    pub traffic_percent: u8,
    /// When this node began the current epoch's figures.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_start: Option<Time>,
    /// When the figures were taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_end: Option<Time>,
    /// The canary revision's operations in the window.
    #[serde(default)]
    pub canary: RevisionFigures,
    /// The stable revision's operations in the window.
    #[serde(default)]
    pub stable: RevisionFigures,
    /// The shadow load's paired runs in the window.
    #[serde(default)]
    pub shadow: ShadowFigures,
}

/// One revision's operations on one node in one window.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevisionFigures {
    /// Operations of real traffic routed to the revision by the split.
    pub traffic_ops: u64,
    /// All operations, traffic and shadow.
    pub ops: u64,
    /// Operations that errored, timed out or produced a non-finite output.
    pub failures: u64,
    /// Operations whose asynchronous run failed and whose synchronous re-run served them
    /// (counted in `ops`, not in `failures`; analysis counts them as failures of the canary).
    pub fallbacks: u64,
    /// Total latency of the successful operations, in seconds.
    #[schemars(range(min = 0.0))]
    pub latency_seconds_sum: f64,
}

impl RevisionFigures {
    /// These figures and `other`'s together. Counts saturate: a report's are an agent's word,
    /// and a wrapped (or, unoptimised, a panicking) sum would be worse than a pinned one.
    pub fn plus(&self, other: &Self) -> Self {
        Self {
            traffic_ops: self.traffic_ops.saturating_add(other.traffic_ops),
            ops: self.ops.saturating_add(other.ops),
            failures: self.failures.saturating_add(other.failures),
            fallbacks: self.fallbacks.saturating_add(other.fallbacks),
            latency_seconds_sum: self.latency_seconds_sum + other.latency_seconds_sum,
        }
    }

    /// What was counted since `start`; `None` where a count fell (counted afresh, as by an
    /// agent restarted). Seconds summed in another order may come out a rounding apart: the
    /// counts tell a fall, and seconds only never go below zero.
    pub fn since(&self, start: &Self) -> Option<Self> {
        Some(Self {
            traffic_ops: self.traffic_ops.checked_sub(start.traffic_ops)?,
            ops: self.ops.checked_sub(start.ops)?,
            failures: self.failures.checked_sub(start.failures)?,
            fallbacks: self.fallbacks.checked_sub(start.fallbacks)?,
            latency_seconds_sum: (self.latency_seconds_sum - start.latency_seconds_sum).max(0.0),
        })
    }
}

/// The shadow load: identical inputs through canary and stable.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShadowFigures {
    /// Pairs where both revisions succeeded.
    pub pairs: u64,
    /// Total canary latency over those pairs, in seconds.
    #[schemars(range(min = 0.0))]
    pub canary_seconds_sum: f64,
    /// Total stable latency over those pairs, in seconds.
    #[schemars(range(min = 0.0))]
    pub stable_seconds_sum: f64,
    /// Whether both revisions compute the same function, so their outputs must agree.
    pub comparable: bool,
    /// Largest absolute output difference over the pairs, where comparable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_numeric_diff: Option<f64>,
}

impl ShadowFigures {
    /// These pairs and `other`'s together, with the larger difference; comparability stays
    /// this one's, for the caller to judge.
    pub fn plus(&self, other: &Self) -> Self {
        Self {
            pairs: self.pairs.saturating_add(other.pairs),
            canary_seconds_sum: self.canary_seconds_sum + other.canary_seconds_sum,
            stable_seconds_sum: self.stable_seconds_sum + other.stable_seconds_sum,
            comparable: self.comparable,
            max_numeric_diff: match (self.max_numeric_diff, other.max_numeric_diff) {
                (Some(a), Some(b)) => Some(max_diff(a, b)),
                (a, b) => a.or(b),
            },
        }
    }
}

/// The larger of two numeric differences, NaN if either is: `f64::max` drops a NaN, and a
/// NaN difference (a revision producing NaN) must never be hidden by a later finite one.
pub fn max_diff(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// One AsyncTrainingJob worker as run on one node. The operator folds these into the job's
/// status, taking only reports whose job uid, worker index and attempt match the assignment.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerReport {
    /// Namespace of the AsyncTrainingJob.
    pub namespace: String,
    /// Name of the AsyncTrainingJob.
    pub name: String,
    /// UID of the AsyncTrainingJob, so that a job recreated under the same name is told apart.
    pub uid: String,
    /// Worker index.
    pub index: u32,
    /// The assignment attempt this run belongs to.
    pub attempt: u32,
    /// Where the worker stands.
    pub state: WorkerState,
    /// Optimiser steps completed.
    pub step: u64,
    /// Throughput since the previous report.
    #[serde(default)]
    pub samples_per_second: f64,
    /// Loss of the first step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_loss: Option<f64>,
    /// Loss of the latest step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_loss: Option<f64>,
    /// Step of the latest checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_step: Option<u64>,
    /// Step of the checkpoint this run resumed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from_step: Option<u64>,
    /// SHA-256 of the final weights, once succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_weights_sha256: Option<String>,
    /// Pipeline figures of this run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<PipelineFigures>,
    /// Why the worker waits or failed, as a typed reason (for example `InvalidModel`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// A failure that restarting cannot fix (the model or data do not fit together): the
    /// job fails at once instead of spending its backoff limit.
    #[serde(default)]
    pub permanent: bool,
}

#[cfg(test)]
mod tests {
    use super::max_diff;

    #[test]
    fn a_nan_difference_wins_from_either_side() {
        assert_eq!(max_diff(1e-6, 2e-6), 2e-6);
        assert!(max_diff(f64::NAN, 1.0).is_nan());
        assert!(max_diff(1.0, f64::NAN).is_nan());
    }
}
