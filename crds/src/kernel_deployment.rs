//! `KernelDeployment`: ships a conv2d kernel artifact to GPU nodes with a staged rollout.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::CustomResource;
use kube::core::Duration;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{ArtifactRef, Conv2dSpec};
use crate::node_report::RevisionFigures;

/// Ships a compiled conv2d kernel artifact to the GPU nodes that `nodeSelector` picks and
/// rolls it out gradually, with health analysis against the stable revision and automatic
/// rollback.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kernelflow.dev",
    doc = "A KernelDeployment ships a conv2d kernel artifact to GPU nodes with a staged, analysed rollout.",
    version = "v1alpha1",
    kind = "KernelDeployment",
    namespaced,
    status = "KernelDeploymentStatus",
    shortname = "kd",
    shortname = "kdeploy",
    category = "kernelflow",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Step","type":"integer","jsonPath":".status.currentStepIndex"}"#,
    printcolumn = r#"{"name":"Traffic","type":"integer","jsonPath":".status.trafficPercent","description":"Percent of conv2d operations on the canary revision"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct KernelDeploymentSpec {
    /// The kernel: its artifact and the op it implements.
    pub kernel: KernelSpec,
    /// Selects the GPU nodes (by their Node labels) that serve this kernel.
    pub node_selector: LabelSelector,
    /// Execution flags. They are part of the revision: changing them starts a rollout.
    #[serde(default)]
    pub flags: RolloutFlags,
    /// How a new revision reaches all conv2d operations.
    #[serde(default)]
    pub rollout: RolloutSpec,
    /// Holds the rollout at its current step until set back to false.
    #[serde(default)]
    pub paused: bool,
}

/// Annotation through which a user (or `kubectl kernelflow`) asks for a manual action:
/// `promote`, `promote-full`, `abort` or `retry`, optionally followed by `:` and any id that
/// makes the value new. The operator acts once per distinct value.
pub const ACTION_ANNOTATION: &str = "kernelflow.dev/action";

/// A manual action on a rollout, in the style of Argo Rollouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManualAction {
    /// Skip the rest of the current step (its pause and analysis), or leave Degraded.
    Promote,
    /// Go straight to 100%.
    PromoteFull,
    /// Send all traffic back to the stable revision.
    Abort,
    /// Start a rolled-back, degraded or failed rollout again from its first step.
    Retry,
}

impl ManualAction {
    pub const ALL: [ManualAction; 4] = [
        ManualAction::Promote,
        ManualAction::PromoteFull,
        ManualAction::Abort,
        ManualAction::Retry,
    ];

    /// The verb as written in the annotation.
    pub fn verb(self) -> &'static str {
        match self {
            ManualAction::Promote => "promote",
            ManualAction::PromoteFull => "promote-full",
            ManualAction::Abort => "abort",
            ManualAction::Retry => "retry",
        }
    }

    /// Parses an annotation value, `verb` or `verb:id`.
    pub fn parse(value: &str) -> Result<Self, String> {
        let verb = value.split_once(':').map_or(value, |(verb, _)| verb);
        Self::ALL
            .into_iter()
            .find(|a| a.verb() == verb)
            .ok_or_else(|| {
                format!("unknown action {verb:?}: use promote, promote-full, abort or retry, optionally followed by :<id>")
            })
    }
}

/// A kernel artifact and the op it implements.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KernelSpec {
    /// The artifact: conv2d weights and op parameters in safetensors, pinned by sha256.
    pub artifact: ArtifactRef,
    /// The conv2d this kernel implements; the artifact's tensors must agree with it.
    pub conv2d: Conv2dSpec,
    /// Input height and width the agents use for shadow load and analysis. One sample's
    /// input and output, like the weights, may hold at most 2^24 values each.
    #[serde(default = "default_input_size")]
    #[schemars(default = "default_input_size", inner(range(min = 1, max = 65536)))]
    pub input_size: [u32; 2],
}

fn default_input_size() -> [u32; 2] {
    [32, 32]
}

/// How the agents execute this kernel's conv2d operations.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutFlags {
    /// Run conv2d on the asynchronous stream-pool path; false runs it synchronously.
    #[serde(default)]
    pub async_enabled: bool,
    /// Re-run a failed asynchronous op on the synchronous path (counted as a fallback).
    #[serde(default = "yes")]
    #[schemars(default = "yes")]
    pub fallback_on_error: bool,
    /// Cap on conv2d operations in flight per node, on either path; an operation that timed
    /// out holds its place until its work ends.
    #[serde(default = "default_max_concurrent_ops")]
    #[schemars(range(min = 1, max = 4096), default = "default_max_concurrent_ops")]
    pub max_concurrent_ops: u32,
    /// Streams per device in the pool.
    #[serde(default = "default_stream_pool_size")]
    #[schemars(range(min = 1, max = 64), default = "default_stream_pool_size")]
    pub stream_pool_size: u32,
}

fn yes() -> bool {
    true
}
fn default_max_concurrent_ops() -> u32 {
    64
}
fn default_stream_pool_size() -> u32 {
    4
}

impl Default for RolloutFlags {
    fn default() -> Self {
        Self {
            async_enabled: false,
            fallback_on_error: true,
            max_concurrent_ops: default_max_concurrent_ops(),
            stream_pool_size: default_stream_pool_size(),
        }
    }
}

/// The steps of a rollout and the analysis that gates them.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// Traffic steps, strictly increasing and ending at 100.
    #[serde(default = "default_steps")]
    #[schemars(length(min = 1, max = 32), default = "default_steps")]
    pub steps: Vec<RolloutStep>,
    /// Health analysis run at every step.
    #[serde(default)]
    pub analysis: AnalysisSpec,
    /// Send all traffic back to the stable revision when analysis fails `failureLimit` times;
    /// when false the rollout pauses as Degraded instead.
    #[serde(default = "yes")]
    #[schemars(default = "yes")]
    pub auto_rollback: bool,
    /// How long a rollout may wait on its nodes (to warm, or for the samples a window needs)
    /// before it counts as stalled: the `Progressing` condition turns False with reason
    /// `ProgressDeadlineExceeded`, with a Warning Event, and the rollout goes on waiting.
    /// Time paused (`spec.paused`, or a step awaiting its promote) does not count (Go
    /// duration).
    #[serde(
        default = "default_progress_deadline",
        deserialize_with = "go_duration::required"
    )]
    #[schemars(
        length(max = 100),
        regex(pattern = GO_DURATION),
        default = "default_progress_deadline"
    )]
    pub progress_deadline: Duration,
    /// Roll back once the progress deadline has passed, instead of going on waiting.
    #[serde(default)]
    pub progress_deadline_abort: bool,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            steps: default_steps(),
            analysis: AnalysisSpec::default(),
            auto_rollback: true,
            progress_deadline: default_progress_deadline(),
            progress_deadline_abort: false,
        }
    }
}

/// A Go duration of at most 8 parts, as the schema admits it.
const GO_DURATION: &str = r"^([0-9]{1,9}(\.[0-9]{1,9})?(ns|us|µs|ms|s|m|h)){1,8}$";

fn default_progress_deadline() -> Duration {
    "10m".parse().expect("a valid duration")
}

fn default_steps() -> Vec<RolloutStep> {
    let pause = Some("1m".parse().expect("a valid duration"));
    [1, 10, 50, 100]
        .into_iter()
        .map(|traffic_percent| RolloutStep {
            traffic_percent,
            pause,
        })
        .collect()
}

/// One step of a rollout.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStep {
    /// Percent of conv2d operations the canary revision takes at this step.
    #[schemars(range(max = 100))]
    pub traffic_percent: u8,
    /// Minimum time at this step (Go duration such as `30s` or `5m`). Without it the
    /// rollout waits here for a manual promote.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "go_duration::optional"
    )]
    #[schemars(
        length(max = 100),
        regex(pattern = GO_DURATION)
    )]
    pub pause: Option<Duration>,
}

/// Health analysis: the canary is compared with the stable revision over each interval.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisSpec {
    /// Length of one analysis window (Go duration).
    #[serde(
        default = "default_interval",
        deserialize_with = "go_duration::required"
    )]
    #[schemars(
        length(max = 100),
        regex(pattern = GO_DURATION),
        default = "default_interval"
    )]
    pub interval: Duration,
    /// Canary operations a window needs before it can pass; fewer is inconclusive.
    #[serde(default = "default_min_samples")]
    #[schemars(range(min = 1), default = "default_min_samples")]
    pub min_samples: u64,
    /// Lowest acceptable fraction of canary operations that succeed (0..1).
    #[serde(default = "default_min_success_rate")]
    #[schemars(range(min = 0.0, max = 1.0), default = "default_min_success_rate")]
    pub min_success_rate: f64,
    /// Highest acceptable canary latency over stable latency.
    #[serde(default = "default_max_overhead_ratio")]
    #[schemars(range(min = 0.0), default = "default_max_overhead_ratio")]
    pub max_overhead_ratio: f64,
    /// Largest acceptable absolute difference between canary and stable outputs on identical
    /// inputs, where both compute the same function.
    #[serde(default = "default_max_numeric_diff")]
    #[schemars(range(min = 0.0), default = "default_max_numeric_diff")]
    pub max_numeric_diff: f64,
    /// Failed analysis windows tolerated before rollback (or Degraded).
    #[serde(default = "default_failure_limit")]
    #[schemars(range(min = 1, max = 1000), default = "default_failure_limit")]
    pub failure_limit: u32,
}

/// Go durations read within bounds: kube's parser panics on one past `std::time::Duration`'s
/// range (`99999999999999999h`), which would take down every watcher of the object. The
/// schema's pattern keeps such values out of the API; this keeps them out of the process
/// where an object predates it.
mod go_duration {
    use kube::core::Duration;
    use serde::de::{Deserialize, Deserializer, Error};

    /// At most 9 digits in a row and 100 characters: under 2e14 seconds in all.
    fn parse<E: Error>(s: &str) -> Result<Duration, E> {
        let longest = s
            .split(|c: char| !c.is_ascii_digit())
            .map(str::len)
            .max()
            .unwrap_or(0);
        if longest > 9 || s.chars().count() > 100 {
            return Err(E::custom(format!(
                "duration {s:?} is out of range: at most 9 digits a number and 100 characters"
            )));
        }
        s.parse().map_err(E::custom)
    }

    pub fn required<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        parse(&String::deserialize(d)?)
    }

    pub fn optional<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| parse(&s))
            .transpose()
    }
}

fn default_interval() -> Duration {
    "30s".parse().expect("a valid duration")
}
fn default_min_samples() -> u64 {
    100
}
fn default_min_success_rate() -> f64 {
    0.999
}
fn default_max_overhead_ratio() -> f64 {
    1.1
}
fn default_max_numeric_diff() -> f64 {
    1e-4
}
fn default_failure_limit() -> u32 {
    3
}

impl Default for AnalysisSpec {
    fn default() -> Self {
        Self {
            interval: default_interval(),
            min_samples: default_min_samples(),
            min_success_rate: default_min_success_rate(),
            max_overhead_ratio: default_max_overhead_ratio(),
            max_numeric_diff: default_max_numeric_diff(),
            failure_limit: default_failure_limit(),
        }
    }
}

/// Where a KernelDeployment's rollout stands.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RolloutPhase {
    /// Accepted; nothing started yet.
    #[default]
    Pending,
    /// Nodes are fetching, verifying and loading the canary revision.
    Warming,
    /// The canary takes traffic and steps are advancing.
    Progressing,
    /// Held by `spec.paused` or an indefinite step pause.
    Paused,
    /// The revision takes all traffic.
    Healthy,
    /// Analysis failed and `autoRollback` is off: held for an operator's decision.
    Degraded,
    /// Analysis failed and all traffic went back to the stable revision.
    RolledBack,
    /// The revision cannot be served (for example an artifact that fails validation).
    Failed,
}

/// A revision: an artifact plus the flags it runs with. The artifact's URL is kept so that
/// nodes can fetch the stable revision after the spec has moved on.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Revision {
    /// The artifact.
    pub artifact: ArtifactRef,
    /// Flags the artifact runs with.
    pub flags: RolloutFlags,
}

impl Revision {
    /// The revision the spec asks for.
    pub fn of(spec: &KernelDeploymentSpec) -> Self {
        Self {
            artifact: spec.kernel.artifact.clone(),
            flags: spec.flags.clone(),
        }
    }

    /// The same artifact on the safe synchronous path: the baseline of a first revision.
    pub fn baseline(&self) -> Self {
        Self {
            artifact: self.artifact.clone(),
            flags: RolloutFlags {
                async_enabled: false,
                ..self.flags.clone()
            },
        }
    }
}

/// Node counts across the selected nodes.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeCounts {
    /// Nodes whose labels match `nodeSelector`.
    pub selected: u32,
    /// Selected nodes with the canary revision warm.
    pub warmed: u32,
    /// Selected nodes that failed to fetch, verify or load it.
    pub failed: u32,
    /// Selected nodes whose agent reported recently.
    pub reporting: u32,
}

/// The figures of the latest analysis window.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AnalysisFigures {
    /// Canary operations in the window.
    pub samples: u64,
    /// Fraction of canary operations that succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<f64>,
    /// Canary latency over stable latency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overhead_ratio: Option<f64>,
    /// Largest canary-vs-stable output difference; absent where it does not apply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_numeric_diff: Option<f64>,
    /// Failed windows at the current step.
    pub failures: u32,
    /// When the latest failed window was counted; failures count at most once per interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_time: Option<Time>,
    /// When analysis first passed at the current step: a step without a pause then awaits
    /// its promote, however thin its traffic since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passed_time: Option<Time>,
    /// Nodes whose figures for the current step went into this analysis.
    #[serde(default)]
    pub nodes: u32,
    /// Whether numeric agreement is checked: `Checked` when canary and stable compute the
    /// same function (same artifact, or one declared equivalent), `NotApplicable` for new
    /// weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numeric_agreement: Option<String>,
    /// `Passed`, `Failed` or `Inconclusive`, with the figure that decided it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    /// When this verdict was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
    /// Where the open window starts: the analysis judges what the nodes counted since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<WindowStart>,
}

/// When an analysis window opened, and what each node had counted in the step then. Agents
/// count from the step's start; a window is each node's difference, so that each window is
/// judged on its own operations and a failure is counted in one window only, however nodes
/// come and go.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WindowStart {
    /// When the window opened.
    pub time: Time,
    /// Each node's counts then, by node name; a node not named had counted nothing. Absent
    /// in a status written by an operator that kept sums over nodes: a window opens anew.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<BTreeMap<String, StepCounts>>,
}

/// What one node had counted in the step when an analysis window opened.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepCounts {
    /// When the node's agent began these counts (its report's `windowStart`): an agent that
    /// restarted counts afresh from a later time, and its entry no longer applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counted_since: Option<Time>,
    /// Canary counts.
    pub canary: RevisionFigures,
    /// Stable counts.
    pub stable: RevisionFigures,
    /// Shadow pairs.
    pub shadow_pairs: u64,
    /// Their canary seconds.
    #[schemars(range(min = 0.0))]
    pub shadow_canary_seconds_sum: f64,
    /// Their stable seconds.
    #[schemars(range(min = 0.0))]
    pub shadow_stable_seconds_sum: f64,
}

/// Observed state of a KernelDeployment.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KernelDeploymentStatus {
    /// Where the rollout stands.
    #[serde(default)]
    pub phase: RolloutPhase,
    /// Index into `spec.rollout.steps` of the current step, or of the step a rollback or a
    /// hold as Degraded happened at; absent once a rollout has completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_step_index: Option<u32>,
    /// Percent of conv2d operations on the canary revision now.
    #[serde(default)]
    pub traffic_percent: u8,
    /// The revision that takes the traffic the canary does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_revision: Option<Revision>,
    /// The revision being rolled out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_revision: Option<Revision>,
    /// Node counts.
    #[serde(default)]
    pub nodes: NodeCounts,
    /// Figures of the latest analysis window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<AnalysisFigures>,
    /// Increments whenever the traffic split changes (a step, a rollback, a new canary).
    /// Agents key their figures on it, so that a step's analysis sees only its own ops.
    #[serde(default)]
    pub step_epoch: u64,
    /// When the current step began; its pause runs from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_start_time: Option<Time>,
    /// The traffic percents of the steps the rollout in progress walks: when those of the
    /// spec change, the rollout starts again at the first step, as its index would mean
    /// another step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub step_traffic: Vec<u8>,
    /// When the current rollout began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_start_time: Option<Time>,
    /// Since when the rollout has waited on its nodes, to warm or for the samples a window
    /// needs; absent while it progresses or is paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_since: Option<Time>,
    /// The wait has outlasted `spec.rollout.progressDeadline`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub progress_deadline_exceeded: bool,
    /// The `kernelflow.dev/action` annotation value last acted on, so that each manual
    /// action (promote, abort, retry) runs exactly once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_action: Option<String>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard conditions: `Accepted` (the spec is valid), `KernelReady` (the kernel warm
    /// on the selected nodes) and `Progressing` (the rollout's state).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// A human-readable summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_out_of_range_are_errors_not_panics() {
        let step = |pause: &str| {
            serde_json::from_value::<RolloutStep>(
                serde_json::json!({"trafficPercent": 100, "pause": pause}),
            )
        };
        let pause = step("1h30m").unwrap().pause.unwrap();
        assert_eq!(std::time::Duration::from(pause).as_secs(), 5400);
        assert!(step("999999999.999999999h").is_ok());
        // The schema's length counts characters, as this does: `µ` takes two bytes.
        assert!(step(&"999999999.9999µs".repeat(6)).is_ok());
        for huge in ["99999999999999999h", "1234567890s"] {
            let err = step(huge).unwrap_err().to_string();
            assert!(err.contains("out of range"), "{err}");
        }
        let analysis = serde_json::from_value::<AnalysisSpec>(
            serde_json::json!({"interval": "99999999999999999h"}),
        );
        assert!(analysis.unwrap_err().to_string().contains("out of range"));
    }
}
